"""Faithfulness of attribution maps: pixel deletion and insertion, and the model-randomisation sanity check.

**Deletion and insertion** (Samek et al., IEEE TNNLS 2017; Petsiuk et al., RISE, BMVC 2018, Sec. 4.1): pixels are
ranked by their attribution and changed in that order, in ``steps`` equal shares; the curve is the model's score
for the explained class after each share, and its area under the curve (trapezoids over the changed share in
[0, 1]) summarises it. Deletion sets pixels to ``fill`` starting from the image (a faithful map drops the score
fast: lower is better); insertion starts from an image of ``fill`` and puts pixels back (higher is better). The
order is most relevant first (``"most"``), least relevant first (``"least"``) or random (``"random"``, the
control: a random map gives it too). With one ``fill``, insertion most-relevant-first is deletion
least-relevant-first read backwards, so the two are one measurement. ``fill`` is a value in the model's
``pixel_values`` space: 0.5 is mid grey for B-cos models and for classifiers wrapped by
``bcos_hf.evaluation.PixelClassifier``, which all take images in [0, 1]. The score is the softmax probability
of the class (``score="logit"``: the logit).

**Randomisation** (Adebayo et al., Sanity checks for saliency maps, NeurIPS 2018, Sec. 3.1): the top layers of
the model are re-initialised; maps that explain the model must change. Reported: Spearman's rank correlation of
each image's absolute map before and after (1 = unchanged, ~0 = unrelated).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .attribution import Attribution, get_attribution
from .data import ImageDataset

Order = Literal["most", "least", "random"]
Mode = Literal["deletion", "insertion"]

FILL = 0.5
"""Default value of deleted (and not yet inserted) pixels: mid grey in [0, 1] pixel space."""

STEPS = 20
"""Default number of equal shares the pixels are changed in (21 points per curve)."""


def pixel_order(maps: torch.Tensor, order: Order, generator: torch.Generator | None = None) -> torch.Tensor:
    """Per image, the rank (0 = changed first) of every pixel of ``maps`` (N, H, W), as (N, H * W)."""
    flat = maps.detach().flatten(1).float().cpu()
    if order == "random":
        ranking = torch.stack([torch.randperm(flat.shape[1], generator=generator) for _ in range(flat.shape[0])])
    elif order in ("most", "least"):
        ranking = torch.argsort(flat, dim=1, descending=order == "most", stable=True)
    else:
        raise ValueError(f"order must be 'most', 'least' or 'random'; got {order!r}.")
    ranks = torch.empty_like(ranking)
    ranks.scatter_(1, ranking, torch.arange(flat.shape[1]).expand_as(ranking))
    return ranks


def perturbation_curves(
    model: nn.Module,
    images: torch.Tensor,
    maps: torch.Tensor,
    targets: torch.Tensor,
    *,
    mode: Mode = "deletion",
    order: Order = "most",
    steps: int = STEPS,
    fill: float = FILL,
    score: Literal["probability", "logit"] = "probability",
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Deletion or insertion curves (N, steps + 1) of ``images`` (N, 3, H, W) ranked by ``maps`` (N, H, W):
    the score of class ``targets`` after 0, 1/steps, ..., 1 of the pixels were changed."""
    if mode not in ("deletion", "insertion"):
        raise ValueError(f"mode must be 'deletion' or 'insertion'; got {mode!r}.")
    if score not in ("probability", "logit"):
        raise ValueError(f"score must be 'probability' or 'logit'; got {score!r}.")
    if maps.shape != (images.shape[0], *images.shape[2:]):
        raise ValueError(f"maps must be (N, H, W) = {(images.shape[0], *images.shape[2:])}; got {tuple(maps.shape)}.")
    ranks = pixel_order(maps, order, generator).view(images.shape[0], 1, *images.shape[2:])
    pixels = ranks[0].numel()
    counts = [round(pixels * step / steps) for step in range(steps + 1)]
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    jobs = [(image, count) for image in range(images.shape[0]) for count in counts]
    scores = torch.empty(len(jobs))
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(jobs), batch_size):
            chunk = jobs[start : start + batch_size]
            index = torch.tensor([image for image, _ in chunk])
            changed = ranks[index] < torch.tensor([count for _, count in chunk]).view(-1, 1, 1, 1)
            if mode == "insertion":
                changed = ~changed
            batch = torch.where(changed, torch.as_tensor(fill, dtype=images.dtype), images[index].cpu())
            with torch.no_grad():
                logits = model(pixel_values=batch.to(device, dtype)).logits.float()
            if score == "probability":
                logits = logits.softmax(dim=1)
            scores[start : start + len(chunk)] = logits.gather(1, targets[index].to(logits.device)[:, None])[:, 0].cpu()
    finally:
        model.train(was_training)
    return scores.view(images.shape[0], steps + 1)


def area_under_curve(curves: torch.Tensor | np.ndarray | Sequence[Sequence[float]]) -> torch.Tensor:
    """Area under each curve (N, points), sampled at evenly spaced shares of [0, 1] (trapezoid rule)."""
    curves = torch.as_tensor(np.asarray(curves, dtype=np.float64))
    if curves.ndim != 2 or curves.shape[1] < 2:
        raise ValueError(f"curves must be (N, points) with at least 2 points; got shape {tuple(curves.shape)}.")
    return torch.trapezoid(curves, dx=1 / (curves.shape[1] - 1), dim=1)


def rank_correlation(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Spearman's rank correlation of each pair of maps (N, ...) -> (N,); ties broken by position."""

    def ranks(maps: torch.Tensor) -> torch.Tensor:
        flat = maps.detach().flatten(1).double().cpu()
        return torch.argsort(torch.argsort(flat, dim=1, stable=True), dim=1).double()

    a, b = ranks(first), ranks(second)
    a, b = a - a.mean(dim=1, keepdim=True), b - b.mean(dim=1, keepdim=True)
    return (a * b).sum(dim=1) / (a.norm(dim=1) * b.norm(dim=1))


def randomise_top_layers(model: nn.Module, share: float = 0.25, seed: int = 0) -> tuple[nn.Module, list[str]]:
    """A copy of ``model`` whose last ``share`` of parameterised modules (the head first, then the blocks
    below it, in definition order) are re-initialised; returns it and their names. Modules with
    ``reset_parameters`` use it (norms also reset running statistics); others get N(0, 0.02) weights."""
    if not 0 < share <= 1:
        raise ValueError(f"share is the fraction of layers to re-initialise, in (0, 1]; got {share}.")
    randomised = copy.deepcopy(model)
    layers = [(name, module) for name, module in randomised.named_modules() if list(module.parameters(recurse=False))]
    chosen = layers[len(layers) - max(1, math.ceil(share * len(layers))) :]
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        with torch.no_grad():
            for _, module in chosen:
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
                else:
                    for parameter in module.parameters(recurse=False):
                        parameter.normal_(0.0, 0.02)
    finally:
        torch.random.set_rng_state(generator_state)
    return randomised, [name for name, _ in chosen]


@dataclass
class MetricSummary:
    """One figure per image of one method on one metric, with its mean and spread."""

    method: str
    metric: str
    values: list[float] = field(repr=False)
    mean: float
    std: float
    count: int

    @classmethod
    def of(cls, method: str, metric: str, values: Sequence[float]) -> MetricSummary:
        array = np.asarray(values, dtype=np.float64)
        mean = float(array.mean()) if len(array) else float("nan")
        std = float(array.std(ddof=1)) if len(array) > 1 else 0.0
        return cls(method, metric, [float(v) for v in array], mean, std, len(array))

    def to_dict(self, with_values: bool = False) -> dict:
        result = {"method": self.method, "metric": self.metric, "mean": self.mean, "std": self.std, "n": self.count}
        if with_values:
            result["values"] = self.values
        return result


FAITHFULNESS_METRICS = ("deletion", "insertion", "randomisation")
"""The metrics ``faithfulness`` computes: deletion and insertion AUC (most relevant first) and the rank
correlation after randomisation."""


def faithfulness(
    model: nn.Module,
    data: ImageDataset | tuple[torch.Tensor, torch.Tensor],
    methods: Sequence[str | tuple[str, Attribution]] = ("bcos",),
    *,
    metrics: Sequence[str] = FAITHFULNESS_METRICS,
    targets: Literal["predicted", "labels"] = "predicted",
    steps: int = STEPS,
    fill: float = FILL,
    score: Literal["probability", "logit"] = "probability",
    randomised_share: float = 0.25,
    seed: int = 0,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, dict[str, MetricSummary]]:
    """Score each method's maps on ``data`` with ``metrics``; returns ``{method: {metric: MetricSummary}}``.

    ``targets``: explain the model's predicted class (default) or the dataset's labels. Deletion and insertion
    rank pixels most relevant first; the ``"random"`` method is the random-order control. Maps, curves and the
    randomised model run in batches of ``batch_size`` images.
    """
    unknown = [metric for metric in metrics if metric not in FAITHFULNESS_METRICS]
    if unknown:
        raise ValueError(f"Unknown faithfulness metrics {unknown}; known: {', '.join(FAITHFULNESS_METRICS)}.")
    data = data if isinstance(data, ImageDataset) else ImageDataset(data)
    chosen = [(method, get_attribution(method)) if isinstance(method, str) else tuple(method) for method in methods]
    device = next(model.parameters()).device
    randomised = randomise_top_layers(model, randomised_share, seed)[0] if "randomisation" in metrics else None
    values: dict[str, dict[str, list[float]]] = {name: {metric: [] for metric in metrics} for name, _ in chosen}
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    bar = tqdm(total=math.ceil(len(data) / batch_size) * len(chosen), desc="faithfulness", disable=not progress)
    for start in range(0, len(data), batch_size):
        images, labels = data.batch(range(start, min(start + batch_size, len(data))))
        images = images.to(device, next(model.parameters()).dtype)
        if targets == "predicted":
            with torch.no_grad():
                labels = model.eval()(pixel_values=images).logits.argmax(dim=1)
        labels = labels.to(device)
        for name, attribution in chosen:
            maps = attribution(model, images, labels).float().cpu()
            for mode in ("deletion", "insertion"):
                if mode in metrics:
                    curves = perturbation_curves(
                        model,
                        images,
                        maps,
                        labels,
                        mode=mode,
                        steps=steps,
                        fill=fill,
                        score=score,
                        batch_size=batch_size * 4,
                        generator=generator,
                    )
                    values[name][mode].extend(area_under_curve(curves).tolist())
            if randomised is not None:
                after = attribution(randomised, images, labels).float().cpu()
                values[name]["randomisation"].extend(rank_correlation(maps.abs(), after.abs()).tolist())
            bar.set_postfix_str(name)
            bar.update()
    bar.close()
    return {
        name: {metric: MetricSummary.of(name, metric, scores) for metric, scores in by_metric.items()}
        for name, by_metric in values.items()
    }
