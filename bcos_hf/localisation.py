"""The grid pointing game (GridPG; Böhle et al., CoDA-Nets, CVPR 2021): how well explanations point at the right
part of an image.

Confidently and correctly classified images of n x n distinct classes are tiled into a grid; each cell's class
is explained over the whole grid, and the score is the share of positive attribution that falls inside that
cell (1 is perfect, 1/n² is chance). The same protocol scores the B-cos explanation (``"bcos"``) and, on the
same model, post-hoc baselines: input x gradient with explanation mode off (``"ixg"``), Grad-CAM
(``"gradcam"``) and random attributions (``"random"``, the chance level).

    from bcos_hf.localisation import grid_pointing_game
    results = grid_pointing_game(model, dataset, image_processor=processor, grid=3, methods=("bcos", "gradcam"))
    print(results["bcos"].mean)

From the command line: ``bcos-hf localisation MODEL DATASET --grid 2 3 --methods bcos ixg gradcam``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .data import to_rgb
from .guards import dump_json
from .modeling.explainable import explanation_mode
from .modeling.explanation_bcos import explain_scores

Attribution = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""(model, images (N, 3, H, W) in [0, 1], target classes (N,)) -> attribution maps (N, H, W)."""

PERCENTILES = (5, 25, 50, 75, 95)


def bcos_attribution(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The B-cos explanation: per-pixel contributions ``(z · W(x)).sum(channels)``."""
    return model.explain(images, target=targets).contributions


def input_x_gradient(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Post-hoc baseline: input x gradient of the logit, explanation mode off (the plain gradient).

    On a B-cos model the input is the encoded image ``[x, 1 - x]``, as for its explanation; any other image
    classifier (e.g. the source model, on its normalised pixels) works too.
    """
    if hasattr(model, "encode_pixels"):
        explanation = explain_scores(
            model, images, lambda encoded: model(pixel_values=encoded).logits, targets, dynamic_linear=False
        )
        return explanation.contributions
    images = images.detach().requires_grad_(True)
    with _post_hoc(model):
        logits = model(pixel_values=images).logits
        (gradients,) = torch.autograd.grad(logits.gather(1, targets[:, None].to(logits.device)).sum(), images)
    return (images.detach() * gradients).sum(dim=1)


@contextmanager
def _post_hoc(model: nn.Module) -> Iterator[None]:
    """Eval mode, gradients on and (for B-cos models) explanation mode off; the training flag is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad(), explanation_mode(model, False):
            yield
    finally:
        model.train(was_training)


def random_attribution(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Chance reference: uniform random positive attributions (seeded by the caller's generator state)."""
    return torch.rand(images.shape[0], *images.shape[2:])


def _feature_map(output: torch.Tensor, height: int, width: int) -> torch.Tensor | None:
    """A module output as an (N, C, h, w) map: a 4-D feature map, or patch tokens after a few leading ones."""
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        return None
    if output.ndim == 4 and output.shape[2] > 1 and output.shape[3] > 1:
        return output
    if output.ndim == 3 and output.shape[1] > 1:
        for leading in range(0, min(8, output.shape[1] - 1) + 1):
            patches = output.shape[1] - leading
            rows = round(math.sqrt(patches * height / width))
            if rows > 1 and patches % rows == 0 and rows * width == (patches // rows) * height:
                return output[:, leading:].transpose(1, 2).unflatten(2, (rows, patches // rows))
    return None


def last_feature_layer(model: nn.Module, images: torch.Tensor) -> str:
    """Name of the last module whose spatial output the logits depend on: Grad-CAM's default layer.

    "Depend on" matters for ViTs, whose final norm also outputs patch tokens that the class token never reads.
    """
    key = (id(model), tuple(images.shape[1:]))
    if key in _FEATURE_LAYERS:
        return _FEATURE_LAYERS[key]
    height, width = images.shape[2:]
    captured: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module, args, output):
            if _feature_map(output, height, width) is not None and output.requires_grad:
                captured[name] = output

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in model.named_modules() if name]
    try:
        with _post_hoc(model):
            logits = model(pixel_values=images[:1].detach().requires_grad_(True)).logits
            names = list(captured)
            gradients = torch.autograd.grad(logits.sum(), [captured[n] for n in names], allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    used = [
        name
        for name, gradient in zip(names, gradients, strict=True)
        if gradient is not None and _feature_map(gradient, height, width).abs().sum() > 0
    ]
    if not used:
        raise ValueError(f"{type(model).__name__} has no module with a spatial output: pass a Grad-CAM layer name.")
    _FEATURE_LAYERS[key] = used[-1]
    return used[-1]


_FEATURE_LAYERS: dict[tuple, str] = {}


def grad_cam(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, layer: str | None = None) -> torch.Tensor:
    """Post-hoc baseline: Grad-CAM on ``layer`` (default: the last spatial feature map), upsampled to the image."""
    layer = layer or last_feature_layer(model, images[:1])
    captured: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda module, args, output: captured.append(output))
    try:
        with _post_hoc(model):
            logits = model(pixel_values=images.detach().requires_grad_(True)).logits
            selected = logits.gather(1, targets.to(logits.device)[:, None]).sum()
            (gradients,) = torch.autograd.grad(selected, captured[0])
    finally:
        handle.remove()
    height, width = images.shape[2:]
    activations = _feature_map(captured[0].detach(), height, width).float()
    gradients = _feature_map(gradients, height, width).float()
    cam = F.relu((gradients.mean(dim=(2, 3), keepdim=True) * activations).sum(dim=1, keepdim=True))
    return F.interpolate(cam, size=(height, width), mode="bilinear", align_corners=False)[:, 0]


ATTRIBUTIONS: dict[str, Attribution] = {
    "bcos": bcos_attribution,
    "ixg": input_x_gradient,
    "gradcam": grad_cam,
    "random": random_attribution,
}
"""The built-in attribution methods, by the names the CLI takes."""


class ImageDataset:
    """Images in [0, 1] at the model's input size, with integer labels, read in batches.

    ``source``: a ``(images, labels)`` pair of tensors (N x 3 x H x W in [0, 1], N), a ``datasets.Dataset``
    (its image column and ClassLabel column are found by type), or a folder (an ``imagefolder`` tree of one
    sub-folder per class, or a dataset saved with ``save_to_disk``). Datasets go through ``image_processor``
    (the one saved with the B-cos model: no normalisation). Labels are matched to the model's (``id2label``)
    by name (an imagefolder numbers its classes alphabetically); a class name the model does not have is an
    error. Only a model with generic labels (``LABEL_0``, ...) takes the dataset's label ids as its own.
    """

    def __init__(self, source, image_processor=None, split: str = "train", id2label: dict | None = None) -> None:
        self.to_model_label: dict[int, int] | None = None
        if isinstance(source, tuple):
            self.images, self.labels = source
            self.dataset = None
            return
        if isinstance(source, (str, Path)):
            source = _load_dataset(Path(source), split)
        if image_processor is None:
            raise ValueError("A dataset of images needs the model's image_processor to resize them.")
        self.dataset, self.image_processor = source, image_processor
        self.image_column = _column_of_type(source, "Image")
        self.label_column = _column_of_type(source, "ClassLabel")
        names = source.features[self.label_column].names
        model_ids = {str(name): int(index) for index, name in (id2label or {}).items()}
        if names and all(name in model_ids for name in names):
            self.to_model_label = {index: model_ids[name] for index, name in enumerate(names)}
        elif any(name != f"LABEL_{index}" for name, index in model_ids.items()):
            unknown = [name for name in names if name not in model_ids]
            raise ValueError(
                f"The dataset's classes {unknown[:5]}{' ...' if len(unknown) > 5 else ''} are not among the model's "
                f"labels {list(model_ids)[:10]}: name the dataset's classes (its class folders) after the model's "
                "labels, so that each image is scored for its own class."
            )
        if len(source) == 0:
            raise ValueError("The dataset holds no images.")

    def __len__(self) -> int:
        return len(self.labels) if self.dataset is None else len(self.dataset)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B, 3, H, W), labels (B,)) for ``indices``."""
        if self.dataset is None:
            return self.images[list(indices)].float(), torch.as_tensor(self.labels)[list(indices)]
        rows = self.dataset[list(indices)]
        images = [to_rgb(image) for image in rows[self.image_column]]
        pixel_values = self.image_processor(images=images, return_tensors="pt")["pixel_values"].float()
        labels = rows[self.label_column]
        if self.to_model_label is not None:
            labels = [self.to_model_label[label] for label in labels]
        return pixel_values, torch.tensor(labels)


def _load_dataset(path: Path, split: str):
    import datasets

    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder: expected class folders of images or a saved dataset.")
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        loaded = datasets.load_from_disk(str(path))
    else:
        loaded = datasets.load_dataset("imagefolder", data_dir=str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{path} has no split {split!r}; it has {', '.join(loaded)}.")
        loaded = loaded[split]
    return loaded


def _column_of_type(dataset, type_name: str) -> str:
    for name, feature in dataset.features.items():
        if type(feature).__name__ == type_name:
            return name
    raise ValueError(f"The dataset has no {type_name} column; its columns are {dict(dataset.features)}.")


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


def pointing_scores(maps: torch.Tensor, grid: int, smoothing: int = 15) -> torch.Tensor:
    """Share of positive attribution inside each map's own cell (cell k of maps[k]), 0 when none (step 4)."""
    if smoothing > 1:
        maps = F.avg_pool2d(maps[:, None], smoothing, stride=1, padding=smoothing // 2, count_include_pad=False)[:, 0]
    maps = maps.clamp(min=0)
    cells = maps.unflatten(1, (grid, -1)).unflatten(3, (grid, -1)).sum(dim=(2, 4)).flatten(1)  # (k, grid²)
    total = cells.sum(dim=1)
    inside = cells[torch.arange(maps.shape[0]), torch.arange(maps.shape[0])]
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
        methods: names from ``ATTRIBUTIONS`` or ``(name, function)`` pairs.
        smoothing: average-pooling window applied to the maps before scoring (15 for 224 px tiles; 1: none).
        sliding_window: explain tile-sized windows with stride half a tile and sum them back; None decides by
            ``uses_fixed_resolution``.
    """
    check_protocol(grid, num_grids, confidence, smoothing, batch_size)
    data = dataset
    if not isinstance(dataset, ImageDataset):
        data = ImageDataset(dataset, image_processor, split, getattr(model.config, "id2label", None))
    chosen = []
    for method in methods:
        if isinstance(method, str) and method not in ATTRIBUTIONS:
            raise ValueError(f"Unknown attribution method {method!r}; known: {', '.join(ATTRIBUTIONS)}.")
        chosen.append((method, ATTRIBUTIONS[method]) if isinstance(method, str) else tuple(method))
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


SQUARE_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "orange": (1.0, 0.5, 0.0),
}


def coloured_squares(
    count: int, seed: int, num_classes: int = 4, size: int = 16, square: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """A task whose answer is known, to check an attribution method or this benchmark: grey-noise images with
    one square of the class's colour (``SQUARE_COLOURS``, first ``num_classes``) at a random place.

    Returns (images (count, 3, size, size) in [0, 1], labels (count,)).
    """
    generator = torch.Generator().manual_seed(seed)
    images = 0.3 + 0.4 * torch.rand(count, 3, size, size, generator=generator)
    labels = torch.randint(0, num_classes, (count,), generator=generator)
    corners = torch.randint(0, size - square + 1, (count, 2), generator=generator)
    colours = torch.tensor(list(SQUARE_COLOURS.values())[:num_classes])
    for image, label, (y, x) in zip(images, labels, corners.tolist(), strict=True):
        image[:, y : y + square, x : x + square] = colours[label][:, None, None]
    return images, labels


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
