"""Score models x attribution methods x metrics on one dataset, and write a JSON, a Markdown table and a plot.

Every model is scored on images in [0, 1]: B-cos models take them as they are, other classifiers through
``PixelClassifier`` (their processor's mean/std applied inside), so the masking value of deletion and insertion
is the same colour for all. Metrics: ``gridpg`` (``bcos_hf.localisation``), ``deletion``, ``insertion`` and
``randomisation`` (``bcos_hf.faithfulness``). Explained class: the dataset's label when its class names are the
model's labels, else the model's prediction (e.g. ImageNet models on photos of coarser categories; GridPG then
tiles confidently predicted images of distinct predicted classes).

    bcos-hf evaluate MODEL [MODEL ...] --dataset DIR|photos --out results/evaluation [--quick]

GridPG and the deletion/insertion AUC also ship as ``evaluate`` metric modules (``metric_path``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from torch import nn
from tqdm.auto import tqdm

from .data import ImageDataset
from .faithfulness import FAITHFULNESS_METRICS, faithfulness
from .guards import dump_json
from .localisation import grid_pointing_game

METRICS = ("gridpg", *FAITHFULNESS_METRICS)
"""What ``evaluate_explanations`` scores, in table order."""

BETTER = {"gridpg": "higher", "deletion": "lower", "insertion": "higher", "randomisation": "lower"}

METRICS_DIR = Path(__file__).parent / "metrics"


def metric_path(name: str) -> str:
    """Path of a bundled ``evaluate`` metric module (``"gridpg"``, ``"perturbation_auc"``) for ``evaluate.load``."""
    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        known = sorted(child.name for child in METRICS_DIR.iterdir() if (child / f"{child.name}.py").is_file())
        raise ValueError(f"No bundled metric {name!r}; bcos_hf ships {', '.join(known)}.")
    return str(path)


class PixelClassifier(nn.Module):
    """A standard image classifier that takes images in [0, 1], as B-cos models do: ``(x - mean) / std`` inside."""

    def __init__(self, model: nn.Module, image_mean: Sequence[float], image_std: Sequence[float]) -> None:
        super().__init__()
        self.model = model
        self.config = model.config
        self.register_buffer("mean", torch.tensor(image_mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(image_std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    def forward(self, pixel_values: torch.Tensor):
        return self.model(pixel_values=(pixel_values - self.mean) / self.std)


@dataclass(frozen=True)
class Settings:
    """How much of each metric to run (``QUICK`` for tests, ``FULL`` by default)."""

    images: int = 64
    image_size: int | None = None
    grid: int = 2
    num_grids: int = 16
    steps: int = 20
    fill: float = 0.5
    randomised_share: float = 0.25
    smoothing: int = 15
    confidence: float = 0.5
    batch_size: int = 16
    seed: int = 0


FULL = Settings()
QUICK = Settings(images=8, num_grids=2, steps=4, smoothing=3, batch_size=8)


def load_classifier(path: str | Path) -> tuple[nn.Module, object, bool]:
    """(model taking images in [0, 1], its image processor without normalisation, whether it is a B-cos model)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    import bcos_hf  # noqa: F401  (registers the B-cos Auto classes)

    is_bcos = str(AutoConfig.from_pretrained(path).model_type).startswith("bcos")
    model = AutoModelForImageClassification.from_pretrained(path, dtype=torch.float32).eval()
    processor = AutoImageProcessor.from_pretrained(path)
    if not is_bcos:
        if not getattr(processor, "do_normalize", False):
            raise ValueError(f"{path}: its image processor does not normalise; pass the processor it was trained with.")
        model = PixelClassifier(model, processor.image_mean, processor.image_std).eval()
    processor.do_normalize = False
    return model, processor, is_bcos


def resize_to(processor, side: int) -> None:
    """Make ``processor`` give side x side images (shortest edge and crop, or height and width)."""
    size = dict(getattr(processor, "size", None) or {})
    processor.size = {"shortest_edge": side} if "shortest_edge" in size else {"height": side, "width": side}
    if getattr(processor, "crop_size", None):
        processor.crop_size = {"height": side, "width": side}


def model_view(model: nn.Module, dataset, processor, settings: Settings) -> ImageDataset:
    """The first ``settings.images`` images at the model's input size in [0, 1], labelled with the model's class
    ids: the dataset's labels when its class names are the model's, else the model's predictions."""
    if settings.image_size is not None:
        resize_to(processor, settings.image_size)
    data = dataset if isinstance(dataset, ImageDataset) else ImageDataset(dataset, processor, id2label=_id2label(model))
    images, labels = data.batch(range(min(settings.images, len(data))))
    if isinstance(dataset, ImageDataset) or data.to_model_label is not None:
        return ImageDataset((images, labels))
    device = next(model.parameters()).device
    with torch.no_grad():
        predicted = torch.cat(
            [
                model(pixel_values=images[start : start + settings.batch_size].to(device)).logits.argmax(dim=1).cpu()
                for start in range(0, len(images), settings.batch_size)
            ]
        )
    return ImageDataset((images, predicted))


def _id2label(model: nn.Module) -> dict | None:
    return getattr(getattr(model, "config", None), "id2label", None)


def evaluate_explanations(
    models: dict[str, tuple[nn.Module, object, bool]],
    dataset,
    methods: Sequence[str],
    metrics: Sequence[str] = METRICS,
    settings: Settings = FULL,
    progress: bool = True,
) -> list[dict]:
    """One row per (model, method, metric): ``{"model", "method", "metric", "mean", "std", "n"}``, plus
    ``"skipped"`` with the reason where a method does not apply (``bcos`` on a standard model) or GridPG found
    too few confident images. ``models`` maps a name to ``load_classifier``'s triple."""
    unknown = [metric for metric in metrics if metric not in METRICS]
    if unknown:
        raise ValueError(f"Unknown metrics {unknown}; known: {', '.join(METRICS)}.")
    rows: list[dict] = []
    for name, (model, processor, is_bcos) in tqdm(models.items(), desc="models", disable=not progress):
        data = model_view(model, dataset, processor, settings)
        usable = [method for method in methods if is_bcos or method != "bcos"]
        rows += [
            dict(model=name, method="bcos", metric=metric, skipped="not a B-cos model")
            for metric in metrics
            if "bcos" in methods and not is_bcos
        ]
        faithful = [metric for metric in metrics if metric in FAITHFULNESS_METRICS]
        if faithful:
            scores = faithfulness(
                model,
                data,
                usable,
                metrics=faithful,
                steps=settings.steps,
                fill=settings.fill,
                randomised_share=settings.randomised_share,
                seed=settings.seed,
                batch_size=settings.batch_size,
                progress=progress,
            )
            rows += [{"model": name, **summary.to_dict()} for by in scores.values() for summary in by.values()]
        if "gridpg" in metrics:
            rows += _gridpg_rows(name, model, data, usable, settings, progress)
    order = {metric: index for index, metric in enumerate(METRICS)}
    return sorted(rows, key=lambda row: (list(models).index(row["model"]), order[row["metric"]]))


def _gridpg_rows(
    name: str, model: nn.Module, data: ImageDataset, methods: Sequence[str], settings: Settings, progress: bool
) -> list[dict]:
    try:
        results = grid_pointing_game(
            model,
            data,
            grid=settings.grid,
            num_grids=settings.num_grids,
            methods=methods,
            seed=settings.seed,
            confidence=settings.confidence,
            smoothing=settings.smoothing,
            batch_size=settings.batch_size,
            progress=progress,
        )
    except ValueError as error:  # too few confident images of distinct classes
        return [dict(model=name, method=method, metric="gridpg", skipped=str(error)) for method in methods]
    rows = []
    for method, result in results.items():
        values = torch.tensor(result.scores, dtype=torch.float64)
        std = float(values.std()) if len(values) > 1 else 0.0
        rows.append(dict(model=name, method=method, metric="gridpg", mean=result.mean, std=std, n=len(values)))
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """Markdown: one line per model and method, one column per metric (mean ± standard deviation over images,
    or over explained cells for GridPG)."""
    metrics = [metric for metric in METRICS if any(row["metric"] == metric for row in rows)]
    header = " | ".join(f"{metric} ({'↑' if BETTER[metric] == 'higher' else '↓'})" for metric in metrics)
    lines = [f"| model | method | {header} |", "|---|---|" + "---|" * len(metrics)]
    cells: dict[tuple[str, str], dict[str, str]] = {}
    for row in rows:
        text = "–" if "skipped" in row else f"{row['mean']:.3f} ± {row['std']:.3f}"
        cells.setdefault((row["model"], row["method"]), {})[row["metric"]] = text
    for (model, method), by_metric in cells.items():
        lines.append(f"| {model} | {method} | " + " | ".join(by_metric.get(m, "") for m in metrics) + " |")
    return "\n".join(lines)


PALETTE = [(214, 39, 40), (31, 119, 180), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75)]


def plot_results(rows: Sequence[dict], path: str | Path, panel: tuple[int, int] = (520, 300)) -> None:
    """Grouped bars, one panel per metric: a group per method, a bar per model, whiskers at ± one standard
    deviation (Pillow only)."""
    scored = [row for row in rows if "skipped" not in row]
    metrics = [metric for metric in METRICS if any(row["metric"] == metric for row in scored)]
    models = list(dict.fromkeys(row["model"] for row in rows))
    methods = list(dict.fromkeys(row["method"] for row in rows))
    width, height = panel
    legend = 22 * len(models) + 10
    image = Image.new("RGB", (width, height * len(metrics) + legend), "white")
    draw = ImageDraw.Draw(image)
    for row_index, name in enumerate(models):
        y = 6 + 22 * row_index
        draw.rectangle([10, y, 24, y + 12], fill=PALETTE[row_index % len(PALETTE)])
        draw.text((30, y), name, fill="black")
    for panel_index, metric in enumerate(metrics):
        top = legend + panel_index * height
        left, right, bottom, inner_top = 50, width - 10, top + height - 40, top + 24
        values = {(r["model"], r["method"]): r for r in scored if r["metric"] == metric}
        low = min(0.0, *(r["mean"] - r["std"] for r in values.values()))
        high = max(1.0, *(r["mean"] + r["std"] for r in values.values()))

        def to_y(value: float, low: float = low, high: float = high, bottom: int = bottom, top_: int = inner_top):
            return bottom - (bottom - top_) * (value - low) / (high - low)

        arrow = "higher" if BETTER[metric] == "higher" else "lower"
        draw.text((left, top + 6), f"{metric} ({arrow} is better; mean ± sd)", fill="black")
        draw.line([left, inner_top, left, bottom], fill="black")
        for tick in range(5):
            value = low + (high - low) * tick / 4
            draw.line([left - 4, to_y(value), left, to_y(value)], fill="black")
            draw.text((6, to_y(value) - 6), f"{value:.2f}", fill="black")
        draw.line([left, to_y(0.0), right, to_y(0.0)], fill="black")
        group = (right - left) / max(1, len(methods))
        bar = group * 0.8 / max(1, len(models))
        for method_index, method in enumerate(methods):
            x0 = left + method_index * group + group * 0.1
            draw.text((x0, bottom + 8), method[:10], fill="black")
            for model_index, name in enumerate(models):
                row = values.get((name, method))
                if row is None:
                    continue
                x = x0 + model_index * bar
                colour = PALETTE[model_index % len(PALETTE)]
                draw.rectangle(
                    [x, min(to_y(row["mean"]), to_y(0.0)), x + bar - 2, max(to_y(row["mean"]), to_y(0.0))], fill=colour
                )
                centre = x + (bar - 2) / 2
                draw.line(
                    [centre, to_y(row["mean"] - row["std"]), centre, to_y(row["mean"] + row["std"])], fill="black"
                )
                for value in (row["mean"] - row["std"], row["mean"] + row["std"]):
                    draw.line([centre - 3, to_y(value), centre + 3, to_y(value)], fill="black")
    image.save(path)


def write_results(rows: Sequence[dict], out: str | Path, settings: Settings, extra: dict | None = None) -> Path:
    """``results.json`` (settings, rows, ``extra``), ``results.md`` (the table) and ``results.png`` in ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {"settings": asdict(settings), **(extra or {}), "results": list(rows)}
    (out / "results.json").write_text(dump_json(summary) + "\n")
    (out / "results.md").write_text(format_table(rows) + "\n")
    plot_results(rows, out / "results.png")
    return out


def run_evaluation(
    model_paths: Sequence[str],
    dataset: str,
    out: str | Path,
    methods: Sequence[str],
    metrics: Sequence[str] = METRICS,
    quick: bool = False,
    split: str = "train",
    **overrides,
) -> list[dict]:
    """The ``bcos-hf evaluate`` command: load the models and the dataset (a folder, or ``"photos"`` for
    ``bcos_hf.photos.load_photo_dataset``), score, write the results."""
    from .data import load_image_dataset

    settings = replace(QUICK if quick else FULL, **{k: v for k, v in overrides.items() if v is not None})
    started = time.perf_counter()
    models = {Path(path).name: load_classifier(path) for path in model_paths}
    if dataset == "photos":
        from .photos import load_photo_dataset

        data = load_photo_dataset()
    else:
        data = load_image_dataset(dataset, split)
    torch.manual_seed(settings.seed)
    rows = evaluate_explanations(models, data, methods, metrics, settings)
    extra = {
        "models": list(model_paths),
        "dataset": dataset,
        "methods": list(methods),
        "seconds": round(time.perf_counter() - started, 1),
        "threads": torch.get_num_threads(),
    }
    write_results(rows, out, settings, extra)
    return rows
