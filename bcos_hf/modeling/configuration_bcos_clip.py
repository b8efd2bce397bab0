"""Configurations of B-cos image-text models (CLIP, SigLIP): the vision tower is B-cos, the text tower original.

Part of the remote-loadable model code: imports only transformers and siblings, with single dots.
"""

from __future__ import annotations

from transformers import AutoConfig
from transformers.configuration_utils import SubConfigSpec

from .configuration_bcos import BcosConfig
from .tasks import remote_code_auto_map

CLIP_REMOTE_CODE_AUTO_MAP = remote_code_auto_map("configuration_bcos_clip.BcosCLIPConfig")
SIGLIP_REMOTE_CODE_AUTO_MAP = remote_code_auto_map("configuration_bcos_clip.BcosSiglipConfig")


class BcosCLIPConfig(BcosConfig):
    r"""Configuration of a [`BcosCLIPModel`]: the fields of [`BcosConfig`] with a [`CLIPConfig`] as source.

    ``source_config`` is the source ``CLIPConfig`` with ``vision_config.num_channels=6``; ``b``, ``keep_bias``
    and ``normalize_weights`` apply to the vision tower only (the text tower is the original, frozen).
    ``logit_bias`` and ``logit_temperature`` are not used: CLIP's own learnt ``logit_scale`` scales the
    image-text similarities.
    """

    model_type = "bcos_clip"
    sub_configs_defaults = {"source_config": SubConfigSpec(config_class=AutoConfig, model_type="clip")}

    def __post_init__(self, **kwargs):
        kwargs.setdefault("auto_map", dict(CLIP_REMOTE_CODE_AUTO_MAP))
        super().__post_init__(**kwargs)


class BcosSiglipConfig(BcosCLIPConfig):
    r"""Configuration of a [`BcosSiglipModel`]: a [`BcosCLIPConfig`] with a [`SiglipConfig`] as source.

    Its own model type (containing "siglip") tells the zero-shot pipeline to score labels with a sigmoid and
    to pad texts to 64 tokens, as SigLIP was trained.
    """

    model_type = "bcos_siglip"
    sub_configs_defaults = {"source_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip")}

    def __post_init__(self, **kwargs):
        kwargs.setdefault("auto_map", dict(SIGLIP_REMOTE_CODE_AUTO_MAP))
        super().__post_init__(**kwargs)
