"""The benchmark suite runs end to end in --quick mode and writes what the README table is made of."""

from __future__ import annotations

import json

from benchmarks.run import main, markdown


def test_quick_benchmark_writes_json_and_markdown(tmp_path):
    results = main(
        [
            "--quick",
            "--devices",
            "cpu",
            "--models",
            "tiny ViT",
            "--iterations",
            "1",
            "--warmup",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert [(row["model"], row["dtype"]) for row in saved["rows"]] == [("tiny ViT", "fp32"), ("tiny ViT", "bf16")]
    for row in saved["rows"]:
        for figure in ("forward", "train", "explain"):
            assert row[figure]["original_ms"] > 0 and row[figure]["bcos_ms"] > 0
        assert row["saved_bytes"]["original"] > 0
        assert row["saved_bytes"]["ratio"] == row["saved_bytes"]["bcos"] / row["saved_bytes"]["original"]
    assert saved["conversions"][0]["equivalence_max_abs_diff"] < 1e-5
    assert {check["figure"] for check in saved["targets"]} == {"saved_bytes", "train"}
    assert saved["environment"]["torch"]
    table = (tmp_path / "results.md").read_text()
    assert table == markdown(saved)
    assert "| tiny ViT | cpu | fp32 | 2 |" in table and "saved_bytes, cpu fp32" in table


def test_host_time_reports_a_ratio_per_step():
    from benchmarks.host_time import main as host_time

    results = host_time(["--pairs", "1"])
    assert set(results) == {"forward", "train", "explain"}
    assert all(figure["ratio"] > 0 for figure in results.values())
