"""The benchmarked model pairs: full-size configs with random weights (224 px) and tiny ones for ``--quick``.

Each entry builds the *original* Hugging Face model in code; the runner converts it with
``bcos_hf.convert.convert`` and puts the two side by side. Families whose adapter is not registered are
skipped with a note.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import (
    CLIPVisionConfig,
    CLIPVisionModel,
    ConvNextConfig,
    ConvNextForImageClassification,
    PreTrainedModel,
    ViTConfig,
    ViTForImageClassification,
)

from tests.families import IMAGE_MEAN, IMAGE_STD, tiny_clip_vision_config, tiny_convnext_config, tiny_vit_config

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass(frozen=True)
class ModelSpec:
    """One benchmarked architecture: how to build the original, its adapter's model type and its input."""

    name: str
    model_type: str
    build: Callable[[], PreTrainedModel]
    image_size: int
    image_mean: list[float]
    image_std: list[float]


def _vit(**config) -> Callable[[], PreTrainedModel]:
    return lambda: ViTForImageClassification(ViTConfig(**config))


def _convnext(**config) -> Callable[[], PreTrainedModel]:
    return lambda: ConvNextForImageClassification(ConvNextConfig(**config))


def _clip_vision(**config) -> Callable[[], PreTrainedModel]:
    return lambda: CLIPVisionModel(CLIPVisionConfig(**config))


FULL_SIZE = [
    ModelSpec(
        "ViT-S/16",
        "vit",
        _vit(hidden_size=384, num_hidden_layers=12, num_attention_heads=6, intermediate_size=1536, num_labels=1000),
        224,
        IMAGE_MEAN,
        IMAGE_STD,
    ),
    ModelSpec("ViT-B/16", "vit", _vit(num_labels=1000), 224, IMAGE_MEAN, IMAGE_STD),
    ModelSpec(
        "ConvNeXt-T",
        "convnext",
        _convnext(hidden_sizes=[96, 192, 384, 768], depths=[3, 3, 9, 3], num_labels=1000),
        224,
        IMAGE_MEAN,
        IMAGE_STD,
    ),
    ModelSpec(
        "CLIP ViT-B/32 vision",
        "clip_vision_model",
        _clip_vision(
            hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, patch_size=32
        ),
        224,
        CLIP_MEAN,
        CLIP_STD,
    ),
]
"""ViT-S/16, ViT-B/16, ConvNeXt-T and the CLIP ViT-B/32 vision tower, as their published configs."""

TINY = [
    ModelSpec("tiny ViT", "vit", lambda: ViTForImageClassification(tiny_vit_config()), 32, IMAGE_MEAN, IMAGE_STD),
    ModelSpec(
        "tiny ConvNeXt",
        "convnext",
        lambda: ConvNextForImageClassification(tiny_convnext_config()),
        32,
        IMAGE_MEAN,
        IMAGE_STD,
    ),
    ModelSpec(
        "tiny CLIP vision",
        "clip_vision_model",
        _clip_vision(**tiny_clip_vision_config()),
        32,
        CLIP_MEAN,
        CLIP_STD,
    ),
]
"""The same families at test size, for ``--quick``."""


def build_original(spec: ModelSpec, seed: int = 0) -> PreTrainedModel:
    """The original model with seeded random weights, in eval mode and float32."""
    torch.manual_seed(seed)
    return spec.build().float().eval()
