"""Shared fixtures: offline settings, tiny source checkpoints saved to disk, and a Python without bcos_hf."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil, ViTModel

import bcos_hf  # noqa: F401

IMAGE_MEAN = [0.485, 0.456, 0.406]
IMAGE_STD = [0.229, 0.224, 0.225]


def tiny_vit_config(**overrides) -> ViTConfig:
    settings = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
        num_labels=3,
    )
    settings.update(overrides)
    return ViTConfig(**settings)


def save_source(model, folder: Path, image_size: int, mean=IMAGE_MEAN, std=IMAGE_STD) -> Path:
    """Save a source model with a ViT-style image processor (resize to image_size, ImageNet normalisation)."""
    model.save_pretrained(folder)
    ViTImageProcessorPil(
        size={"height": image_size, "width": image_size}, image_mean=mean, image_std=std
    ).save_pretrained(folder)
    return folder


@pytest.fixture
def tiny_vit_dir(tmp_path) -> Path:
    """A saved tiny ViTForImageClassification with randomised biases and layer norms (3 labels, 32 px)."""
    torch.manual_seed(0)
    model = randomise(ViTForImageClassification(tiny_vit_config(id2label={0: "cat", 1: "dog", 2: "car"})))
    return save_source(model, tmp_path / "tiny-vit", 32)


@pytest.fixture
def tiny_vit_model_dir(tmp_path) -> Path:
    """A saved tiny ViTModel backbone (with its pooler)."""
    torch.manual_seed(0)
    return save_source(randomise(ViTModel(tiny_vit_config())), tmp_path / "tiny-vit-backbone", 32)


def randomise(model: torch.nn.Module) -> torch.nn.Module:
    """Give every parameter random values, so biases, norms and embeddings all matter in comparisons."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn_like(parameter) * 0.2)
    return model.eval()


def run_without_bcos_hf(code: str, hf_home: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python where ``import bcos_hf`` fails, with its own HF_HOME (remote-code cache)."""
    script = "import sys\nsys.modules['bcos_hf'] = None  # bcos_hf is not importable here\n" + textwrap.dedent(code)
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout, cwd=hf_home
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result
