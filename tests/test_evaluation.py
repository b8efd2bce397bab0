"""The explanation metrics as `evaluate` modules (offline, same figures as the Python API) and `bcos-hf evaluate`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from bcos_hf.cli import main
from bcos_hf.evaluation import METRICS, PixelClassifier, format_table, metric_path
from bcos_hf.faithfulness import area_under_curve, perturbation_curves
from bcos_hf.localisation import pointing_scores
from bcos_hf.synthetic import SQUARE_COLOURS, coloured_squares

from .families import FAMILIES

evaluate = pytest.importorskip("evaluate")
pytest.importorskip("captum")


def test_gridpg_module_loads_offline_by_path_and_matches_pointing_scores():
    maps = torch.rand(6, 16, 16, generator=torch.Generator().manual_seed(0)) - 0.3
    cells = [0, 3, 1, 2, 3, 0]
    expected = pointing_scores(maps, grid=2, smoothing=3, cells=cells).double()
    gridpg = evaluate.load(metric_path("gridpg"))
    result = gridpg.compute(predictions=maps.numpy(), references=cells, grid=2, smoothing=3)
    assert result["count"] == 6
    assert result["gridpg"] == pytest.approx(float(expected.mean()), abs=1e-6)
    assert result["gridpg_std"] == pytest.approx(float(expected.std()), abs=1e-6)
    for batch in (slice(0, 4), slice(4, 6)):  # incremental use, as in an evaluation loop
        gridpg.add_batch(predictions=maps[batch].numpy(), references=cells[batch])
    assert gridpg.compute(grid=2, smoothing=3)["gridpg"] == pytest.approx(result["gridpg"], abs=1e-6)


def test_perturbation_auc_module_matches_area_under_curve():
    model = PixelClassifier(FAMILIES["vit"]()[0], [0.5] * 3, [0.25] * 3).eval()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = torch.tensor([2, 0, 1])
    curves = perturbation_curves(model, images, torch.rand(3, 32, 32), targets, steps=5)
    areas = area_under_curve(curves)
    result = evaluate.load(metric_path("perturbation_auc")).compute(predictions=curves.tolist())
    assert result["count"] == 3
    assert result["auc"] == pytest.approx(float(areas.mean()), abs=1e-9)
    assert result["auc_std"] == pytest.approx(float(areas.std()), abs=1e-9)


def test_unknown_metric_paths_name_the_bundled_ones():
    with pytest.raises(ValueError, match="ships gridpg, perturbation_auc"):
        metric_path("road")


def test_pixel_classifier_normalises_inside():
    source = FAMILIES["vit"]()[0].eval()
    wrapped = PixelClassifier(source, [0.4, 0.5, 0.6], [0.2, 0.3, 0.4])
    images = torch.rand(2, 3, 32, 32)
    normalised = (images - torch.tensor([0.4, 0.5, 0.6]).view(1, 3, 1, 1)) / torch.tensor([0.2, 0.3, 0.4]).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        torch.testing.assert_close(wrapped(pixel_values=images).logits, source(pixel_values=normalised).logits)


def test_quick_evaluate_command_scores_models_methods_and_metrics(trained_vit, tmp_path, capsys):
    """A trained B-cos ViT (coloured squares) and an untrained standard ViT, on an imagefolder of squares."""
    model, processor = trained_vit
    model.save_pretrained(tmp_path / "bcos")
    processor.save_pretrained(tmp_path / "bcos")
    names = list(SQUARE_COLOURS)[:4]
    source, source_processor = FAMILIES["vit"](
        image_size=16, patch_size=4, num_labels=4, id2label=dict(enumerate(names))
    )
    source.save_pretrained(tmp_path / "standard")
    source_processor.save_pretrained(tmp_path / "standard")
    images, labels = coloured_squares(24, seed=3)
    for index, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
        folder = tmp_path / "data" / "train" / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(folder / f"{index}.png")
    out = tmp_path / "out"
    arguments = [str(tmp_path / "standard"), str(tmp_path / "bcos"), "--dataset", str(tmp_path / "data")]
    methods = ["bcos", "ixg", "gradcam", "random"]
    assert main(["evaluate", *arguments, "--out", str(out), "--quick", "--methods", *methods, "--images", "24"]) == 0
    table = capsys.readouterr().out
    assert "| model | method | gridpg (↑) | deletion (↓) | insertion (↑) | randomisation (↓) |" in table
    assert "| standard | bcos | – | – | – | – |" in table
    saved = json.loads((out / "results.json").read_text())
    assert saved["settings"]["images"] == 24 and saved["methods"] == methods
    rows = {(row["model"], row["method"], row["metric"]): row for row in saved["results"]}
    expected = {(model, method, metric) for model in ("standard", "bcos") for method in methods for metric in METRICS}
    assert rows.keys() == expected
    assert all("skipped" not in rows["bcos", method, metric] for method in methods for metric in METRICS)
    assert all(rows["bcos", method, "deletion"]["n"] == 24 for method in methods)
    assert rows["bcos", "bcos", "gridpg"]["mean"] > 0.6  # the trained model's explanations point at the squares
    assert "not a B-cos model" in rows["standard", "bcos", "gridpg"]["skipped"]
    assert (out / "results.md").read_text().strip() == format_table(saved["results"])
    assert Image.open(out / "results.png").size[1] > 4 * 250
    assert main(["evaluate", *arguments, "--out", str(out), "--metrics", "road"]) == 2
    assert "Unknown metrics ['road']" in capsys.readouterr().err
