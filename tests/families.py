"""Tiny source models of every supported family, built in code: the shared fixtures of per-family tests.

Each builder returns ``(model, image_processor)`` for a small randomly initialised source model in eval
mode, with random (non-trivial) biases and norms. Tests save them to a temporary folder and convert the
folder, so the real loading path is exercised. Add one entry per family to ``FAMILIES``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil, ViTModel

IMAGE_MEAN = [0.485, 0.456, 0.406]
IMAGE_STD = [0.229, 0.224, 0.225]


def randomise(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter random values, so biases, norms and embeddings all matter in comparisons."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return model.eval()


def vit_processor(image_size: int) -> ViTImageProcessorPil:
    """Resize to a square and normalise with ImageNet statistics (the processor most families use)."""
    return ViTImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=IMAGE_MEAN, image_std=IMAGE_STD
    )


def tiny_vit_config(**overrides) -> ViTConfig:
    settings = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
        num_labels=3,
        id2label={0: "cat", 1: "dog", 2: "car"},
    )
    settings.update(overrides)
    return ViTConfig(**settings)


def vit_classifier(**overrides):
    config = tiny_vit_config(**overrides)
    return randomise(ViTForImageClassification(config)), vit_processor(config.image_size)


def vit_backbone(**overrides):
    config = tiny_vit_config(**overrides)
    return randomise(ViTModel(config)), vit_processor(config.image_size)


FAMILIES: dict[str, Callable[[], tuple[torch.nn.Module, object]]] = {
    "vit": vit_classifier,
    "vit-backbone": vit_backbone,
}
"""Family name -> builder of a tiny source model and its processor (classification heads and backbones)."""


def save_family(name: str, folder, **overrides):
    """Build the family's tiny model, save it with its processor to ``folder`` and return (model, folder)."""
    model, processor = FAMILIES[name](**overrides)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, folder
