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
import torch.nn.functional as F

import bcos_hf  # noqa: F401
from bcos_hf.convert import convert
from bcos_hf.synthetic import SQUARE_COLOURS, coloured_squares

from .families import FAMILIES, save_family

# Tests run tiny models: a second intra-op thread only adds synchronisation, and costs many times over when
# another process shares the cores. Tests that need more threads set them themselves.
torch.set_num_threads(1)


@pytest.fixture
def tiny_vit_dir(tmp_path) -> Path:
    """A saved tiny ViTForImageClassification (labels cat, dog, car; 32 px) with its image processor."""
    return save_family("vit", tmp_path / "tiny-vit")[1]


@pytest.fixture
def tiny_vit_model_dir(tmp_path) -> Path:
    """A saved tiny ViTModel backbone (with its pooler) and its image processor."""
    return save_family("vit-backbone", tmp_path / "tiny-vit-backbone")[1]


def run_without_bcos_hf(code: str, hf_home: Path, timeout: int = 240) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh Python where ``import bcos_hf`` fails, with its own HF_HOME (remote-code cache)."""
    script = "import sys\nsys.modules['bcos_hf'] = None  # bcos_hf is not importable here\n" + textwrap.dedent(code)
    hf_home.mkdir(parents=True, exist_ok=True)
    # One intra-op thread, as in the tests (set above): results then match bit for bit across processes.
    env = dict(os.environ, HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout, cwd=hf_home
    )
    assert result.returncode == 0, f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    return result


@pytest.fixture(scope="session")
def trained_vit():
    """A tiny B-cos ViT (16 px, 4 px patches) trained for a few seconds to tell four coloured squares apart
    (``bcos_hf.synthetic``): a model whose explanations should point at the squares."""
    colours = list(SQUARE_COLOURS)[:4]
    torch.manual_seed(0)
    source, processor = FAMILIES["vit"](image_size=16, patch_size=4, num_labels=4, id2label=dict(enumerate(colours)))
    conversion = convert(source, image_processor=processor)
    model = conversion.model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-3)
    for step in range(80):
        images, labels = coloured_squares(32, seed=step + 1)
        logits = model(pixel_values=images).logits
        loss = F.binary_cross_entropy_with_logits(logits, F.one_hot(labels, len(colours)).float())  # the recipe's BCE
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return model.eval(), conversion.image_processor
