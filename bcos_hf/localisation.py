"""The grid pointing game (GridPG; Böhle et al., CoDA-Nets, CVPR 2021): how well explanations point at the right
part of an image.

Confidently and correctly classified images of n x n distinct classes are tiled into a grid; each cell's class
is explained over the whole grid, and the score is the share of positive attribution that falls inside that
cell (1 is perfect, 1/n² is chance). The same protocol scores the B-cos explanation (``"bcos"``) and, on the
same model, the post-hoc baselines of ``bcos_hf.attribution`` (input x gradient, Grad-CAM, integrated
gradients, ...; ``"random"`` is the chance level).

    from bcos_hf.localisation import grid_pointing_game
    results = grid_pointing_game(model, dataset, image_processor=processor, grid=3, methods=("bcos", "gradcam"))
    print(results["bcos"].mean)

From the command line: ``bcos-hf localisation MODEL DATASET --grid 2 3 --methods bcos ixg gradcam``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .attribution import Attribution, get_attribution
from .data import ImageDataset
from .guards import dump_json

PERCENTILES = (5, 25, 50, 75, 95)


def confident_images(
    model: nn.Module, data: ImageDataset, confidence: float = 0.5, batch_size: int = 32, progress: bool = True
) -> dict[int, list[int]]:
    """Per class, the indices of correctly classified images with sigmoid(logit) > ``confidence``, most
    confident first (step 1 of the protocol)."""
    by_class: dict[int, list[tuple[float, int]]] = {}
    starts = range(0, len(data), batch_size)
    for start in tqdm(starts, desc="classifying", disable=not progress):
        indices = list(range(start, min(start + batch_size, len(data))))
        images, labels = data.batch(indices)
        with torch.no_grad():
            logits = model(pixel_values=images.to(model.device, model.dtype)).logits.float().cpu()
        sure = torch.sigmoid(logits.gather(1, labels[:, None])).squeeze(1)
        keep = (logits.argmax(dim=1) == labels) & (sure > confidence)
        for index, label, score in zip(indices, labels.tolist(), sure.tolist(), strict=True):
            if keep[index - start]:
                by_class.setdefault(label, []).append((score, index))
    return {label: [index for _, index in sorted(pairs, reverse=True)] for label, pairs in sorted(by_class.items())}


def sample_grids(
    per_class: dict[int, list[int]], grid: int, num_grids: int, seed: int = 0
) -> list[list[tuple[int, int]]]:
    """Up to ``num_grids`` grids of grid x grid (class, image index) pairs: distinct classes drawn with a fixed
    seed, each taking its next most confident image (step 2)."""
    cells = grid * grid
    rng = np.random.default_rng(seed)
    next_image = dict.fromkeys(per_class, 0)
    grids = []
    while len(grids) < num_grids:
        available = sorted(label for label, images in per_class.items() if next_image[label] < len(images))
        if len(available) < cells:
            break
        classes = rng.choice(available, size=cells, replace=False).tolist()
        grids.append([(label, per_class[label][next_image[label]]) for label in classes])
        for label in classes:
            next_image[label] += 1
    return grids


def tile(images: torch.Tensor, grid: int) -> torch.Tensor:
    """grid² images (grid², C, H, W) into one (C, grid H, grid W) image, row by row."""
    rows = images.unflatten(0, (grid, grid))  # gy, gx, C, H, W
    return rows.permute(2, 0, 3, 1, 4).flatten(3, 4).flatten(1, 2)


def window_offsets(size: int, window: int) -> list[int]:
    """Window starts, stride half a window, covering ``size`` (step 5, fixed-resolution models)."""
    stride = max(window // 2, 1)
    offsets = list(range(0, size - window + 1, stride))
    return offsets if offsets[-1] == size - window else [*offsets, size - window]


def attribute_grid(
    model: nn.Module,
    attribution: Attribution,
    grid_image: torch.Tensor,
    classes: Sequence[int],
    tile_size: tuple[int, int],
    sliding_window: bool,
    batch_size: int = 32,
) -> torch.Tensor:
    """Attribution maps (len(classes), grid H, grid W) of each class over the whole grid image (step 3)."""
    height, width = grid_image.shape[1:]
    windows = (
        [(y, x) for y in window_offsets(height, tile_size[0]) for x in window_offsets(width, tile_size[1])]
        if sliding_window
        else [(0, 0)]
    )
    window_height, window_width = tile_size if sliding_window else (height, width)
    jobs = [(window, label) for window in windows for label in classes]
    maps = torch.zeros(len(classes), height, width)
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        crops = torch.stack([grid_image[:, y : y + window_height, x : x + window_width] for (y, x), _ in chunk])
        targets = torch.tensor([label for _, label in chunk])
        result = attribution(model, crops.to(model.device, model.dtype), targets.to(model.device)).float().cpu()
        for ((y, x), label), crop_map in zip(chunk, result, strict=True):
            maps[list(classes).index(label), y : y + window_height, x : x + window_width] += crop_map
    return maps


def pointing_scores(
    maps: torch.Tensor, grid: int, smoothing: int = 15, cells: Sequence[int] | torch.Tensor | None = None
) -> torch.Tensor:
    """Share of positive attribution inside each map's own cell, 0 when there is none (step 4).

    ``maps`` (k, grid H, grid W); ``cells`` the cell index (row by row) each map should point at, by default
    cell i for map i (one map per cell, as GridPG makes them).
    """
    if smoothing > 1:
        maps = F.avg_pool2d(maps[:, None], smoothing, stride=1, padding=smoothing // 2, count_include_pad=False)[:, 0]
    maps = maps.clamp(min=0)
    cell_sums = maps.unflatten(1, (grid, -1)).unflatten(3, (grid, -1)).sum(dim=(2, 4)).flatten(1)  # (k, grid²)
    total = cell_sums.sum(dim=1)
    own = torch.arange(maps.shape[0]) if cells is None else torch.as_tensor(cells, dtype=torch.long)
    inside = cell_sums[torch.arange(maps.shape[0]), own]
    return torch.where(total > 0, inside / total.clamp_min(1e-30), torch.zeros_like(total))


@dataclass
class LocalisationResult:
    """GridPG scores of one attribution method on grid x grid grids."""

    method: str
    grid: int
    scores: list[float] = field(repr=False)
    mean: float
    percentiles: dict[str, float]
    chance: float
    num_grids: int

    @classmethod
    def from_scores(cls, method: str, grid: int, scores: list[float], num_grids: int) -> LocalisationResult:
        values = np.asarray(scores, dtype=np.float64)
        percentiles = {f"p{p}": float(np.percentile(values, p)) for p in PERCENTILES} if len(values) else {}
        mean = float(values.mean()) if len(values) else float("nan")
        return cls(method, grid, list(map(float, scores)), mean, percentiles, 1 / grid**2, num_grids)

    def to_dict(self, with_scores: bool = False) -> dict:
        result = asdict(self)
        if not with_scores:
            result.pop("scores")
        return result


def uses_fixed_resolution(model: nn.Module) -> bool:
    """Models with learnt position embeddings (ViTs) take one input size: they are explained in sliding windows."""
    return any("position_embedding" in name for name, _ in model.named_parameters()) or any(
        "position_embedding" in name for name, _ in model.named_modules()
    )


def check_protocol(grid: int, num_grids: int, confidence: float, smoothing: int, batch_size: int) -> None:
    """Raise a ValueError that says what is expected when a GridPG setting cannot give a meaningful score."""
    problems = []
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 2:
        problems.append(f"grid must be a whole number >= 2 (cells per side; 1 cell always scores 1); got {grid!r}")
    if isinstance(num_grids, bool) or not isinstance(num_grids, int) or num_grids < 1:
        problems.append(f"num_grids must be a whole number >= 1; got {num_grids!r}")
    if not 0 <= confidence < 1:
        problems.append(f"confidence must lie in [0, 1) (a sigmoid threshold); got {confidence!r}")
    if isinstance(smoothing, bool) or not isinstance(smoothing, int) or smoothing < 1 or smoothing % 2 == 0:
        problems.append(
            f"smoothing must be an odd whole number >= 1 (1: none; the window is centred); got {smoothing!r}"
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        problems.append(f"batch_size must be a whole number >= 1; got {batch_size!r}")
    if problems:
        raise ValueError("; ".join(problems) + ".")


def grid_pointing_game(
    model: nn.Module,
    dataset,
    *,
    image_processor=None,
    grid: int = 3,
    num_grids: int = 500,
    methods: Sequence[str | tuple[str, Attribution]] = ("bcos",),
    seed: int = 0,
    confidence: float = 0.5,
    smoothing: int = 15,
    sliding_window: bool | None = None,
    split: str = "train",
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, LocalisationResult]:
    """Run GridPG with the reference protocol (Böhle et al., CoDA-Nets, CVPR 2021) and return one result per method.

    Args:
        model: a B-cos image classifier (baselines run on the same model).
        dataset: see ``ImageDataset`` (tensors, a ``datasets.Dataset`` or a folder); ``split`` picks the split.
        grid: cells per side (2 or 3 in the papers). num_grids: at most this many grids (fewer when the
            confident images run out). seed: fixes the grids. confidence: the sigmoid threshold of step 1.
        methods: names from ``bcos_hf.attribution.ATTRIBUTIONS`` or ``(name, function)`` pairs.
        smoothing: average-pooling window applied to the maps before scoring (15 for 224 px tiles; 1: none).
        sliding_window: explain tile-sized windows with stride half a tile and sum them back; None decides by
            ``uses_fixed_resolution``.
    """
    check_protocol(grid, num_grids, confidence, smoothing, batch_size)
    data = dataset
    if not isinstance(dataset, ImageDataset):
        data = ImageDataset(
            dataset, image_processor, split, getattr(model.config, "id2label", None), require_model_labels=True
        )
    chosen = [(method, get_attribution(method)) if isinstance(method, str) else tuple(method) for method in methods]
    if sliding_window is None:
        sliding_window = uses_fixed_resolution(model)
    was_training = model.training
    model.eval()
    try:
        per_class = confident_images(model, data, confidence, batch_size, progress)
    finally:
        model.train(was_training)
    grids = sample_grids(per_class, grid, num_grids, seed)
    if not grids:
        raise ValueError(
            f"Not enough confidently classified images for a {grid}x{grid} grid: {len(per_class)} classes have "
            f"correct predictions with sigmoid(logit) > {confidence} (need {grid * grid})."
        )
    scores: dict[str, list[float]] = {name: [] for name, _ in chosen}
    torch.manual_seed(seed)
    for cells in tqdm(grids, desc=f"GridPG {grid}x{grid}", disable=not progress):
        classes = [label for label, _ in cells]
        images, _ = data.batch([index for _, index in cells])
        grid_image = tile(images, grid)
        for name, attribution in chosen:
            maps = attribute_grid(model, attribution, grid_image, classes, images.shape[2:], sliding_window, batch_size)
            scores[name].extend(pointing_scores(maps, grid, smoothing).tolist())
    return {name: LocalisationResult.from_scores(name, grid, values, len(grids)) for name, values in scores.items()}


def format_results(results: Sequence[LocalisationResult]) -> str:
    """A small Markdown table: method, grid, mean, median, chance, grids."""
    lines = ["| method | grid | mean | p25 | median | p75 | chance | grids |", "|---|---|---|---|---|---|---|---|"]
    for result in results:
        p = result.percentiles
        lines.append(
            f"| {result.method} | {result.grid}x{result.grid} | {result.mean:.3f} | {p.get('p25', float('nan')):.3f} | "
            f"{p.get('p50', float('nan')):.3f} | {p.get('p75', float('nan')):.3f} | {result.chance:.3f} | "
            f"{result.num_grids} |"
        )
    return "\n".join(lines)


def save_results(results: Sequence[LocalisationResult], path: str | Path) -> None:
    """Write the results (without per-grid scores) as JSON."""
    Path(path).write_text(dump_json([result.to_dict() for result in results]) + "\n")
