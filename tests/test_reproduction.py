"""The reproduction script's quick mode: four arms, GridPG and pictures, end to end on real data."""

from __future__ import annotations

import json
import os

import pytest
import torch
from PIL import Image

from .assets import needs_fashion_mnist, needs_mobilenet_v2_weights, run_example

pytestmark = [needs_mobilenet_v2_weights, needs_fashion_mnist]


@pytest.fixture
def all_cores():
    """MobileNetV2 batches are big enough for every core (tests default to one thread, see conftest)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(threads)


def test_quick_reproduction_runs_end_to_end(tmp_path, monkeypatch, all_cores):
    summary = run_example(monkeypatch, "reproduce_bcosification", ["--quick", "--output", str(tmp_path)])

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["arms"].keys() == {"standard", "bcosified", "scratch", "standard-scratch"}
    assert len(saved["arms"]["bcosified"]["accuracy"]) == summary["budget"]["epochs"] + 1
    for name in ("scratch", "standard-scratch"):
        assert len(saved["arms"][name]["accuracy"]) == summary["budget"]["scratch_epochs"] + 1
    assert saved["conversion"]["equivalence_max_abs_diff"] < 1e-3
    localisation = saved["localisation_2x2"]
    assert localisation.keys() == saved["arms"].keys()
    for name, methods in localisation.items():  # scored, or skipped with the reason (too few confident images)
        expected = {"ixg", "gradcam"} if name.startswith("standard") else {"bcos", "ixg", "gradcam"}
        assert methods.keys() == expected or set(methods) == {"skipped"}
    assert "skipped" not in localisation["standard"]
    for name in ("accuracy.png", "explanations.png"):
        with Image.open(tmp_path / name) as picture:
            assert picture.width > 100 and picture.height > 100
