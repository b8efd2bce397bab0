"""The grid pointing game on a synthetic task whose answer is known: each class is a coloured square."""

from __future__ import annotations

import json

import numpy as np
import torch
from datasets import ClassLabel, Dataset, Features
from datasets import Image as ImageFeature
from PIL import Image

from bcos_hf.attribution import grad_cam, input_x_gradient
from bcos_hf.cli import main
from bcos_hf.data import ImageDataset
from bcos_hf.localisation import (
    confident_images,
    grid_pointing_game,
    pointing_scores,
    sample_grids,
    tile,
    window_offsets,
)
from bcos_hf.synthetic import SQUARE_COLOURS, coloured_squares

from .families import FAMILIES

COLOURS = list(SQUARE_COLOURS)[:4]
SIZE = 16


def test_trained_bcos_model_localises_far_above_chance_and_random_attributions_do_not(trained_vit):
    model, _ = trained_vit
    test_set = coloured_squares(160, seed=10_000)
    with torch.no_grad():
        accuracy = (model(pixel_values=test_set[0]).logits.argmax(dim=1) == test_set[1]).float().mean()
    assert accuracy > 0.95
    results = grid_pointing_game(
        model, test_set, grid=2, num_grids=12, methods=("bcos", "ixg", "gradcam", "random"), smoothing=3
    )
    assert results["bcos"].chance == 0.25 and results["bcos"].num_grids == 12
    assert results["bcos"].mean > 0.75, results["bcos"]
    assert abs(results["random"].mean - 0.25) < 0.03
    assert results["bcos"].mean > max(results["ixg"].mean, results["gradcam"].mean) + 0.2
    for result in results.values():
        assert len(result.scores) == 12 * 4 and all(0 <= score <= 1 for score in result.scores)
        assert set(result.percentiles) == {"p5", "p25", "p50", "p75", "p95"}


def test_random_attributions_score_chance_without_sliding_windows(trained_vit):
    """Whole-grid attribution (no sliding window, as for CNNs): random maps score 1/4 on 2x2 grids."""
    model, _ = trained_vit
    result = grid_pointing_game(
        model, coloured_squares(160, seed=4), grid=2, num_grids=30, methods=("random",), sliding_window=False
    )["random"]
    assert result.num_grids == 30 and abs(result.mean - 0.25) < 0.01


def test_pointing_scores_measure_the_positive_share_inside_the_own_cell():
    maps = torch.zeros(4, 8, 8)
    maps[0, :4, :4] = 1.0  # all inside its own cell (top left)
    maps[1] = 1.0  # spread evenly: chance
    maps[2] = -1.0  # no positive evidence at all
    maps[3, :4, :4] = 1.0  # cell 3 is bottom right: none of it inside
    maps[3, 4:, 4:] = -5.0  # negative evidence does not count
    torch.testing.assert_close(pointing_scores(maps, grid=2, smoothing=1), torch.tensor([1.0, 0.25, 0.0, 0.0]))


def test_grids_are_seeded_distinct_and_use_each_image_once():
    per_class = {label: [label * 10 + rank for rank in range(3)] for label in range(5)}
    grids = sample_grids(per_class, grid=2, num_grids=100, seed=7)
    assert grids == sample_grids(per_class, grid=2, num_grids=100, seed=7)
    assert len(grids) == 3  # every class has 3 images: after 3 full rounds fewer than 4 classes are left
    used = [index for cells in grids for _, index in cells]
    assert len(used) == len(set(used))
    assert all(len({label for label, _ in cells}) == 4 for cells in grids)
    assert sample_grids(per_class, grid=3, num_grids=5) == []  # 5 classes cannot fill 9 cells


def test_tiles_and_windows():
    images = torch.arange(4.0).view(4, 1, 1, 1).expand(4, 1, 2, 2)
    assert tile(images, 2)[0].tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
    assert window_offsets(32, 16) == [0, 8, 16]
    assert window_offsets(48, 16) == [0, 8, 16, 24, 32]
    assert window_offsets(20, 16) == [0, 4]


def test_confidence_filter_keeps_correct_confident_images_most_confident_first(trained_vit):
    model, _ = trained_vit
    images, labels = coloured_squares(24, seed=5)
    wrong = labels.clone()
    wrong[:4] = (labels[:4] + 1) % 4
    per_class = confident_images(model, ImageDataset((images, wrong)), progress=False)
    kept = [index for indices in per_class.values() for index in indices]
    assert not set(kept) & {0, 1, 2, 3} and len(kept) >= 18
    with torch.no_grad():
        confidence = torch.sigmoid(model(pixel_values=images).logits).gather(1, labels[:, None]).squeeze(1)
    for indices in per_class.values():
        assert confidence[indices].tolist() == sorted(confidence[indices].tolist(), reverse=True)


def test_cli_on_an_imagefolder_and_a_datasets_object(trained_vit, tmp_path, capsys):
    model, processor = trained_vit
    model.save_pretrained(tmp_path / "model")
    processor.save_pretrained(tmp_path / "model")
    images, labels = coloured_squares(48, seed=11)
    names = COLOURS
    pictures = []
    for index, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
        folder = tmp_path / "data" / "train" / names[label]
        folder.mkdir(parents=True, exist_ok=True)
        picture = Image.fromarray((image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        picture.save(folder / f"{index}.png")
        pictures.append(picture)

    out = tmp_path / "gridpg.json"
    arguments = ["localisation", str(tmp_path / "model"), str(tmp_path / "data"), "--grid", "2", "--num-grids", "3"]
    assert main([*arguments, "--methods", "bcos", "random", "--smoothing", "3", "--out", str(out)]) == 0
    table = capsys.readouterr().out
    assert "| bcos | 2x2 |" in table and "| random | 2x2 |" in table
    saved = json.loads(out.read_text())
    assert [entry["method"] for entry in saved] == ["bcos", "random"] and saved[0]["num_grids"] == 3
    assert saved[0]["mean"] > 0.6

    features = Features({"img": ImageFeature(), "colour": ClassLabel(names=names)})
    dataset = Dataset.from_dict({"img": pictures, "colour": labels.tolist()}, features=features)
    result = grid_pointing_game(model, dataset, image_processor=processor, grid=2, num_grids=3, smoothing=3)
    assert result["bcos"].mean > 0.6 and result["bcos"].num_grids == 3
    assert main([*arguments, "--methods", "shap"]) == 2
    assert "Unknown attribution method 'shap'; known: bcos, ixg, gradcam, random" in capsys.readouterr().err


def test_baselines_run_on_the_original_model_too():
    """Post-hoc baselines need no B-cos model: here the tiny source ViT (on normalised pixels)."""
    source, _ = FAMILIES["vit"](image_size=SIZE, patch_size=4, num_labels=4)
    images = torch.randn(3, 3, SIZE, SIZE)
    targets = torch.tensor([0, 3, 1])
    assert input_x_gradient(source, images, targets).shape == (3, SIZE, SIZE)
    cam = grad_cam(source, images, targets)
    assert cam.shape == (3, SIZE, SIZE) and (cam >= 0).all() and cam.sum() > 0
    assert all(parameter.grad is None for parameter in source.parameters())
