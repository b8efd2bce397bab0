"""The natural-photo explanation script's quick mode: heads fitted on the frozen features, explanations scored."""

from __future__ import annotations

import json

import pytest

from .assets import needs_dinov2_weights, needs_stamps, run_example

pytestmark = [needs_dinov2_weights, needs_stamps]


@pytest.mark.slow
def test_quick_photo_localisation_fits_heads_and_scores_explanations(tmp_path, monkeypatch):
    summary = run_example(monkeypatch, "photo_localisation", ["--quick", "--output", str(tmp_path)])

    heads = summary["heads"]
    assert heads.keys() == {"original", "bcosified", "random"}
    chance = 1 / len(summary["photos"]["categories"])
    assert heads["original"]["held_out_accuracy"] > 2 * chance  # the original's features know the photos
    assert summary["photos"]["fit"] + summary["photos"]["held_out"] > 200
    saved = json.loads((tmp_path / "results.json").read_text())
    rows = {(row["model"], row["method"], row["metric"]): row for row in saved["results"]}
    assert "skipped" in rows[("original", "bcos", "deletion")]  # not a B-cos model
    for model in ("original", "bcosified", "random"):
        assert 0 <= rows[(model, "ixg", "deletion")]["mean"] <= 1
    assert 0 <= rows[("bcosified", "bcos", "deletion")]["mean"] <= 1
    assert (tmp_path / "results.png").is_file()
