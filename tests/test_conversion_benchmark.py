"""The conversion-time benchmark runs end to end on the tiny test configs (``--quick``)."""

from __future__ import annotations

import json

from benchmarks import conversion_time


def test_quick_benchmark_times_every_cnn_family_and_writes_json(tmp_path, capsys):
    models = "tiny vit,tiny convnext,tiny resnet,tiny mobilenet_v2"
    out = tmp_path / "conversion_time.json"
    assert conversion_time.main(["--quick", "--repeats", "2", "--models", models, "--out", str(out)]) == 0

    result = json.loads(out.read_text())
    measured = {m["model"]: m for m in result["measurements"]}
    assert list(measured) == models.split(",") and result["skipped"] == {}
    for measurement in measured.values():
        assert len(measurement["seconds"]) == 2 and measurement["median_seconds"] > 0
        assert measurement["equivalence_max_abs_diff"] < 1e-5 and measurement["parameters"] > 0
    assert measured["tiny resnet"]["source_class"] == "ResNetForImageClassification"
    printed = capsys.readouterr().out
    assert "| tiny mobilenet_v2 | MobileNetV2ForImageClassification |" in printed and result["table"] in printed
