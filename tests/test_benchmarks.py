"""The benchmark suite runs end to end in --quick mode and writes what the tables of docs/performance.md are made of."""

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
    assert "| tiny ViT | cpu | fp32 | eager | 2 |" in table and "saved_bytes, cpu fp32 eager" in table


def test_host_time_reports_a_ratio_per_step():
    from benchmarks.host_time import main as host_time

    results = host_time(["--pairs", "1"])
    assert set(results) == {"forward", "train", "explain"}
    assert all(figure["ratio"] > 0 for figure in results.values())


def test_compiled_benchmark_runs_both_models_compiled(tmp_path, monkeypatch):
    """``--compile`` (what ``benchmarks/gpu_check.sh`` runs on the GPU), here with dynamo alone (backend "eager"): both
    models go through ``torch.compile``, the compilations stay out of the timed pairs, and the rows say so."""
    import torch

    compiled = []
    real_compile = torch.compile

    def recording_compile(model, **options):
        compiled.append((type(model).__name__, options))
        return real_compile(model, **options)

    monkeypatch.setattr(torch, "compile", recording_compile)
    arguments = ["--quick", "--devices", "cpu", "--dtypes", "fp32", "--models", "tiny ViT", "--iterations", "1"]
    results = main([*arguments, "--warmup", "0", "--compile", "--compile-backend", "eager", "--out", str(tmp_path)])
    options = {"fullgraph": True, "dynamic": False, "backend": "eager", "mode": None}
    assert compiled == [("ViTForImageClassification", options), ("BcosForImageClassification", options)]
    assert results["settings"]["cpu"]["warmup"] == 1
    [row] = results["rows"]
    assert row["mode"] == "compiled" and "saved_bytes" not in row
    assert all(row[figure]["ratio"] > 0 for figure in ("forward", "train", "explain"))
    assert "| tiny ViT | cpu | fp32 | compiled | 2 |" in (tmp_path / "results.md").read_text()
