"""The keep-knowledge yardstick's quick mode: both real models, both arms, the probe, agreement, plot, table."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from .assets import needs_dinov2_weights, needs_mobilenet_v2_weights, needs_stamps, run_example

pytestmark = [needs_mobilenet_v2_weights, needs_dinov2_weights, needs_stamps]


@pytest.mark.slow
def test_quick_keep_knowledge_runs_end_to_end(tmp_path, monkeypatch):
    summary = run_example(monkeypatch, "keep_knowledge", ["--quick", "--output", str(tmp_path)])
    results = summary["results"]
    assert set(results) == {"mobilenet_v2", "dinov2"}
    for name, result in results.items():
        reference = result["reference"]
        assert reference["original_probe"] > reference["pixels_probe"]  # the yardstick can see knowledge
        for arm in ("bcosified", "random"):
            history = result["arms"][arm]["history"]
            assert [entry["step"] for entry in history] == [0, 2, 4]
            assert all(0 <= entry["probe"] <= 1 for entry in history)
            assert ("top1_agreement" in history[-1]) == (name == "mobilenet_v2")
        before = result["arms"]["bcosified"]["before_training"]
        if name == "mobilenet_v2":  # as converted, BatchNorm networks at B = 2 output exact zeros ...
            assert before["dead_features"] == 1.0
            assert result["arms"]["bcosified"]["after_calibration"]["dead_features"] < 0.5  # ... not after calibration
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["results"]["dinov2"]["arms"]["random"]["steps"] == 4
    assert "| mobilenet_v2 | bcosified |" in (tmp_path / "results.md").read_text()
    assert Image.open(tmp_path / "probe.png").size[0] > 1000

    # The saved MobileNetV2 arms: a classifier refitted to the original's logits (features frozen) gets closer to them.
    argv = ["--quick", "--refit-classifier", "--refit-images", "32", "--output", str(tmp_path)]
    refit = run_example(monkeypatch, "keep_knowledge", argv)
    for arm in ("bcosified", "random"):
        kl_before, kl_after = refit[arm]["kl"]
        assert kl_after < kl_before
        assert refit[arm]["classifier_refit"]["probe"] == refit[arm]["aligned"]["probe"]  # the features did not move
    assert json.loads((tmp_path / "classifier_refit.json").read_text()).keys() == {"bcosified", "random"}
