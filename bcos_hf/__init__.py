"""bcos_hf: turn pretrained Hugging Face vision models into B-cos models, on the transformers Auto classes.

``import bcos_hf`` registers the B-cos config and model classes with ``AutoConfig``, ``AutoModel``,
``AutoModelForImageClassification`` and (B-cos CLIP, SigLIP) ``AutoModelForZeroShotImageClassification`` and
``AutoProcessor``, so ``from_pretrained`` on a converted folder returns bcos_hf classes.
"""

from importlib.metadata import PackageNotFoundError, version

import transformers
from transformers import (
    AutoConfig,
    AutoProcessor,
    CLIPProcessor,
    SiglipProcessor,
)

from .convert import BCOS_CLASSES
from .hub import push_model_to_hub
from .modeling.adapters import ADAPTERS, get_adapter
from .modeling.bcos_activations import DetachableActivation
from .modeling.bcos_layers import BcosConv2d, BcosLinear, DetachableLinear, LogitLayer
from .modeling.bcos_norms import BcosGroupNorm, BcosLayerNorm, UncentredBatchNorm2d
from .modeling.configuration_bcos import BcosConfig
from .modeling.configuration_bcos_clip import BcosCLIPConfig, BcosSiglipConfig
from .modeling.explainable import explanation_mode
from .modeling.explanation_bcos import BcosExplanation
from .modeling.modeling_bcos import BcosForImageClassification, BcosModel, BcosPreTrainedModel
from .modeling.modeling_bcos_clip import BcosCLIPModel, BcosSiglipModel
from .modeling.rewriting import ArchitectureAdapter, UnsupportedModelError
from .modeling.tasks import TASKS
from .pipelines import ImageExplanationPipeline, register_pipeline
from .training import BcosTrainer, BcosTrainingArguments

try:
    __version__ = version("bcos-hf")
except PackageNotFoundError:  # running from a source tree that was not installed
    __version__ = "0.0.0+unknown"


def _register_auto_classes() -> None:
    """Every task of the registry (``bcos_hf.modeling.tasks``) with the Auto classes it names."""
    for task in TASKS:
        model_class = BCOS_CLASSES[task.name]
        config_class = model_class.config_class
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        for auto_class in task.auto_classes:
            getattr(transformers, auto_class).register(config_class, model_class, exist_ok=True)


_register_auto_classes()
register_pipeline()
# Image-text models load with transformers' own processors (tokenizer and image processor).
AutoProcessor.register(BcosCLIPConfig, CLIPProcessor, exist_ok=True)
AutoProcessor.register(BcosSiglipConfig, SiglipProcessor, exist_ok=True)

# With bcos_hf installed, model.push_to_hub also publishes the image processor and the B-cos model card (the
# model code itself cannot: it is remote code that must not import bcos_hf).
BcosPreTrainedModel.push_to_hub = push_model_to_hub

__all__ = [
    "ADAPTERS",
    "ArchitectureAdapter",
    "BcosCLIPConfig",
    "BcosCLIPModel",
    "BcosConfig",
    "BcosConv2d",
    "BcosExplanation",
    "BcosForImageClassification",
    "BcosGroupNorm",
    "BcosLayerNorm",
    "BcosLinear",
    "BcosModel",
    "BcosPreTrainedModel",
    "BcosSiglipConfig",
    "BcosSiglipModel",
    "BcosTrainer",
    "BcosTrainingArguments",
    "DetachableActivation",
    "DetachableLinear",
    "ImageExplanationPipeline",
    "LogitLayer",
    "UncentredBatchNorm2d",
    "UnsupportedModelError",
    "__version__",
    "explanation_mode",
    "get_adapter",
]
