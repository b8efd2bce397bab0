"""The training examples run end to end on Fashion-MNIST (smoke runs: a few steps, small subsets)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from bcos_hf.convert import convert
from bcos_hf.fashion_mnist import FASHION_MNIST_LABELS

from .assets import needs_fashion_mnist
from .families import save_family
from .train_tiny import TINY_VIT

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = needs_fashion_mnist


def run_example(name: str, argv: list[str], monkeypatch) -> dict:
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "argv", [name, *argv])
    return module.main()


def test_finetune_example_smoke_run(tmp_path, monkeypatch):
    labels = dict(enumerate(FASHION_MNIST_LABELS))
    _, source = save_family("vit", tmp_path / "vit", **{**TINY_VIT, "num_labels": 10, "id2label": labels})
    convert(str(source), tmp_path / "bcos")
    output = tmp_path / "run"
    common = ["--max_steps", "2", "--train_size", "32", "--test_size", "16", "--explain_images", "2"]
    summary = run_example(
        "finetune_image_classification",
        ["--model", str(tmp_path / "bcos"), "--output_dir", str(output), *common, "--disable_tqdm", "true"],
        monkeypatch,
    )
    assert summary["optimiser_steps"] == 2 and 0 <= summary["accuracy_after"] <= 1
    assert json.loads((output / "summary.json").read_text()) == summary
    assert {"model.safetensors", "explanations.png", "README.md", "conversion_report.json"} <= {
        path.name for path in output.iterdir()
    }
    assert "| accuracy | " in (output / "README.md").read_text()


def test_distill_clip_example_smoke_run(tmp_path, monkeypatch):
    output = tmp_path / "clip"
    summary = run_example(
        "distill_clip",
        [
            "--output_dir",
            str(output),
            "--max_steps",
            "2",
            "--train_size",
            "32",
            "--test_size",
            "16",
            "--disable_tqdm",
            "true",
        ],
        monkeypatch,
    )
    assert summary["optimiser_steps"] == 2
    assert summary["before"]["loss"] > 0 and -1 <= summary["after"]["cosine"] <= 1
    assert (output / "model.safetensors").is_file() and (output / "README.md").is_file()
