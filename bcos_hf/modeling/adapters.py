"""The registry of supported architectures: one adapter per transformers model type, registered here."""

from .adapter_clip import CLIP_ADAPTER, CLIP_VISION_ADAPTER
from .adapter_convnext import CONVNEXT_ADAPTER
from .adapter_deit import DEIT_ADAPTER
from .adapter_dinov2 import DINOV2_ADAPTER
from .adapter_mobilenet_v2 import MOBILENET_V2_ADAPTER
from .adapter_resnet import RESNET_ADAPTER
from .adapter_siglip import SIGLIP_ADAPTER
from .adapter_vit import VIT_ADAPTER
from .rewriting import ArchitectureAdapter, UnsupportedModelError

ADAPTERS: dict[str, ArchitectureAdapter] = {
    adapter.model_type: adapter
    for adapter in (
        VIT_ADAPTER,
        CONVNEXT_ADAPTER,
        RESNET_ADAPTER,
        MOBILENET_V2_ADAPTER,
        DEIT_ADAPTER,
        DINOV2_ADAPTER,
        CLIP_ADAPTER,
        CLIP_VISION_ADAPTER,
        SIGLIP_ADAPTER,
    )
}


def get_adapter(model_type: str) -> ArchitectureAdapter:
    """The adapter for ``model_type``, or an error listing the supported families."""
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"bcos_hf cannot convert model_type {model_type!r}. Supported: {', '.join(sorted(ADAPTERS))}."
        ) from None
