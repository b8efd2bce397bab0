"""Tiny source models of every supported family, built in code: the shared fixtures of per-family tests.

Each builder returns ``(model, image_processor)`` for a small randomly initialised source model in eval
mode, with random (non-trivial) biases and norms. Tests save them to a temporary folder and convert the
folder, so the real loading path is exercised. Add one entry per family to ``FAMILIES``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from transformers import (
    CLIPConfig,
    CLIPForImageClassification,
    CLIPImageProcessorPil,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
    CLIPVisionConfig,
    CLIPVisionModel,
    ConvNextConfig,
    ConvNextForImageClassification,
    ConvNextImageProcessorPil,
    ConvNextModel,
    DeiTConfig,
    DeiTForImageClassification,
    DeiTForImageClassificationWithTeacher,
    DeiTModel,
    Dinov2Config,
    Dinov2ForImageClassification,
    Dinov2Model,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    MobileNetV2ImageProcessorPil,
    MobileNetV2Model,
    ResNetConfig,
    ResNetForImageClassification,
    ResNetModel,
    SiglipConfig,
    SiglipForImageClassification,
    SiglipImageProcessorPil,
    SiglipModel,
    SiglipProcessor,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessorPil,
    ViTModel,
)

IMAGE_MEAN = [0.485, 0.456, 0.406]
IMAGE_STD = [0.229, 0.224, 0.225]


def random_images(batch: int, height: int = 32, width: int | None = None, seed: int = 1) -> torch.Tensor:
    """Seeded images in [0, 1] (square unless ``width`` is given)."""
    return torch.rand(batch, 3, height, width or height, generator=torch.Generator().manual_seed(seed))


def normalised(images: torch.Tensor, mean=IMAGE_MEAN, std=IMAGE_STD) -> torch.Tensor:
    """Images in [0, 1] normalised the way a source model's processor does it."""
    return (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def assert_same_outputs(actual, expected, backbone: bool, atol: float = 1e-5) -> None:
    """A B-cos model's outputs equal its source's: logits of classifiers, hidden states and pooling of backbones."""
    if backbone:
        torch.testing.assert_close(actual.last_hidden_state, expected.last_hidden_state, rtol=0, atol=atol)
        torch.testing.assert_close(actual.pooler_output, expected.pooler_output, rtol=0, atol=atol)
    else:
        torch.testing.assert_close(actual.logits, expected.logits, rtol=0, atol=atol)


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


TINY_LABELS = {0: "cat", 1: "dog", 2: "car"}

TINY_TRANSFORMER = dict(
    hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8, id2label=TINY_LABELS
)
"""The settings every tiny vision transformer shares (ViT, DeiT, DINOv2)."""


def tiny_vit_config(**overrides) -> ViTConfig:
    return ViTConfig(**{**TINY_TRANSFORMER, "intermediate_size": 37, **overrides})


def vit_classifier(**overrides):
    config = tiny_vit_config(**overrides)
    return randomise(ViTForImageClassification(config)), vit_processor(config.image_size)


def vit_backbone(**overrides):
    config = tiny_vit_config(**overrides)
    return randomise(ViTModel(config)), vit_processor(config.image_size)


def randomise_running_statistics(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every BatchNorm non-trivial running statistics, so that folding the running mean matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.2)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
    return model


def tiny_convnext_config(**overrides) -> ConvNextConfig:
    settings = dict(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 2, 1], image_size=32, id2label=TINY_LABELS)
    settings.update(overrides)
    return ConvNextConfig(**settings)


def convnext_processor(image_size: int) -> ConvNextImageProcessorPil:
    """ConvNeXt's own processor (resize to size / crop_pct, centre crop), with ImageNet statistics."""
    return ConvNextImageProcessorPil(size={"shortest_edge": image_size}, image_mean=IMAGE_MEAN, image_std=IMAGE_STD)


def convnext_classifier(**overrides):
    config = tiny_convnext_config(**overrides)
    return randomise(ConvNextForImageClassification(config)), convnext_processor(config.image_size)


def convnext_backbone(**overrides):
    config = tiny_convnext_config(**overrides)
    return randomise(ConvNextModel(config)), convnext_processor(config.image_size)


def tiny_resnet_config(**overrides) -> ResNetConfig:
    settings = dict(
        embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 2, 1, 1], layer_type="basic", id2label=TINY_LABELS
    )
    settings.update(overrides)
    return ResNetConfig(**settings)


def resnet_classifier(**overrides):
    """ResNet checkpoints on the Hub use ConvNeXt's image processor; the config has no image size (224 px)."""
    model = randomise_running_statistics(randomise(ResNetForImageClassification(tiny_resnet_config(**overrides))))
    return model, convnext_processor(32)


def resnet_backbone(**overrides):
    model = randomise_running_statistics(randomise(ResNetModel(tiny_resnet_config(**overrides))))
    return model, convnext_processor(32)


def tiny_mobilenet_v2_config(**overrides) -> MobileNetV2Config:
    settings = dict(
        depth_multiplier=0.25,
        finegrained_output=False,
        image_size=32,
        classifier_dropout_prob=0.1,
        id2label=TINY_LABELS,
    )
    settings.update(overrides)
    return MobileNetV2Config(**settings)


def mobilenet_v2_processor(image_size: int) -> MobileNetV2ImageProcessorPil:
    """MobileNetV2's own processor: resize the short side, centre crop, ImageNet statistics."""
    return MobileNetV2ImageProcessorPil(
        size={"shortest_edge": image_size + 8},
        crop_size={"height": image_size, "width": image_size},
        image_mean=IMAGE_MEAN,
        image_std=IMAGE_STD,
    )


def mobilenet_v2_classifier(**overrides):
    config = tiny_mobilenet_v2_config(**overrides)
    model = randomise_running_statistics(randomise(MobileNetV2ForImageClassification(config)))
    return model, mobilenet_v2_processor(config.image_size)


def mobilenet_v2_backbone(**overrides):
    config = tiny_mobilenet_v2_config(**overrides)
    model = randomise_running_statistics(randomise(MobileNetV2Model(config)))
    return model, mobilenet_v2_processor(config.image_size)


def tiny_deit_config(**overrides) -> DeiTConfig:
    return DeiTConfig(**{**TINY_TRANSFORMER, "intermediate_size": 37, **overrides})


def deit_classifier(**overrides):
    config = tiny_deit_config(**overrides)
    return randomise(DeiTForImageClassification(config)), vit_processor(config.image_size)


def deit_distilled_classifier(**overrides):
    """DeiT's distilled classifier: two heads (class and distillation tokens), logits averaged."""
    config = tiny_deit_config(**overrides)
    return randomise(DeiTForImageClassificationWithTeacher(config)), vit_processor(config.image_size)


def deit_backbone(**overrides):
    config = tiny_deit_config(**overrides)
    return randomise(DeiTModel(config)), vit_processor(config.image_size)


def tiny_dinov2_config(**overrides) -> Dinov2Config:
    return Dinov2Config(**{**TINY_TRANSFORMER, "mlp_ratio": 2, **overrides})


def dinov2_classifier(**overrides):
    config = tiny_dinov2_config(**overrides)
    return randomise(Dinov2ForImageClassification(config)), vit_processor(config.image_size)


def dinov2_backbone(**overrides):
    config = tiny_dinov2_config(**overrides)
    return randomise(Dinov2Model(config)), vit_processor(config.image_size)


CLIP_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def tiny_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer over single letters (no merges), so every id lies inside the tiny text vocabulary:
    letters 0-25, word-final letters 26-51, start of text 52, end of text (also padding) 53."""
    vocab = {letter: index for index, letter in enumerate(CLIP_LETTERS)}
    vocab |= {f"{letter}</w>": 26 + index for index, letter in enumerate(CLIP_LETTERS)}
    vocab |= {"<|startoftext|>": 52, "<|endoftext|>": 53}
    return CLIPTokenizer(vocab=vocab, merges=[])


def clip_image_processor(image_size: int) -> CLIPImageProcessorPil:
    """CLIP's own processor (resize the short side, centre crop) with CLIP's default statistics."""
    return CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
    )


def tiny_clip_vision_config(**overrides) -> dict:
    settings = dict(
        hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8
    )
    settings.update(overrides)
    return settings


def tiny_clip_config(vision: dict | None = None, **overrides) -> CLIPConfig:
    text = dict(
        vocab_size=54,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=32,
        bos_token_id=52,
        eos_token_id=53,
        pad_token_id=53,
    )
    settings = dict(text_config=text, vision_config=tiny_clip_vision_config(**(vision or {})), projection_dim=16)
    settings.update(overrides)
    return CLIPConfig(**settings)


def clip_zero_shot(vision: dict | None = None, **overrides):
    """A tiny CLIPModel with its processor (letter tokenizer and image processor): a zero-shot classifier."""
    config = tiny_clip_config(vision, **overrides)
    processor = CLIPProcessor(
        image_processor=clip_image_processor(config.vision_config.image_size), tokenizer=tiny_clip_tokenizer()
    )
    return randomise(CLIPModel(config)), processor


def clip_classifier(vision: dict | None = None, **overrides):
    config = tiny_clip_config(vision, id2label=TINY_LABELS, **overrides)
    model = randomise(CLIPForImageClassification(config))
    return model, clip_image_processor(config.vision_config.image_size)


def clip_vision_backbone(**overrides):
    config = CLIPVisionConfig(**tiny_clip_vision_config(**overrides))
    return randomise(CLIPVisionModel(config)), clip_image_processor(config.image_size)


def tiny_siglip_config(vision: dict | None = None, **overrides) -> SiglipConfig:
    """Text positions for the 64 tokens SigLIP's zero-shot pipeline pads to; the letter tokenizer's ids."""
    text = dict(
        vocab_size=54,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=64,
        bos_token_id=52,
        eos_token_id=53,
        pad_token_id=53,
    )
    vision_config = tiny_clip_vision_config(**(vision or {}))
    text["projection_size"] = vision_config["hidden_size"]  # text and image embeddings share one space
    settings = dict(text_config=text, vision_config=vision_config)
    settings.update(overrides)
    return SiglipConfig(**settings)


def siglip_image_processor(image_size: int) -> SiglipImageProcessorPil:
    """SigLIP's own processor: resize to a square, normalise with mean 0.5 and std 0.5."""
    return SiglipImageProcessorPil(size={"height": image_size, "width": image_size})


def siglip_zero_shot(vision: dict | None = None, **overrides):
    """A tiny SiglipModel (attention-pooling head) with a processor pairing its image processor and the letter
    tokenizer (SigLIP's own tokenizer needs a sentencepiece model)."""
    config = tiny_siglip_config(vision, **overrides)
    processor = SiglipProcessor(
        image_processor=siglip_image_processor(config.vision_config.image_size), tokenizer=tiny_clip_tokenizer()
    )
    return randomise(SiglipModel(config)), processor


def siglip_classifier(vision: dict | None = None, **overrides):
    config = tiny_siglip_config(vision, id2label=TINY_LABELS, **overrides)
    model = randomise(SiglipForImageClassification(config))
    return model, siglip_image_processor(config.vision_config.image_size)


FAMILIES: dict[str, Callable[[], tuple[torch.nn.Module, object]]] = {
    "vit": vit_classifier,
    "vit-backbone": vit_backbone,
    "convnext": convnext_classifier,
    "convnext-backbone": convnext_backbone,
    "resnet": resnet_classifier,
    "resnet-backbone": resnet_backbone,
    "mobilenet_v2": mobilenet_v2_classifier,
    "mobilenet_v2-backbone": mobilenet_v2_backbone,
    "deit": deit_classifier,
    "deit-distilled": deit_distilled_classifier,
    "deit-backbone": deit_backbone,
    "dinov2": dinov2_classifier,
    "dinov2-backbone": dinov2_backbone,
    "clip": clip_zero_shot,
    "clip-classifier": clip_classifier,
    "clip_vision_model-backbone": clip_vision_backbone,
    "siglip": siglip_zero_shot,
    "siglip-classifier": siglip_classifier,
}
"""Family name -> builder of a tiny source model and its processor (classification heads and backbones)."""


def save_family(name: str, folder, **overrides):
    """Build the family's tiny model, save it with its processor to ``folder`` and return (model, folder)."""
    model, processor = FAMILIES[name](**overrides)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return model, folder
