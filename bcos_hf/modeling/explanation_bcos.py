"""Explanations of B-cos models: the dynamic linear map ``W(x)`` behind each prediction, and its pictures.

A B-cos model computes ``logit = W(x) · z + logit_bias`` with ``z = [x, 1 - x]`` the encoded image. In
explanation mode autograd returns ``W(x)`` exactly, so one forward and one backward give, for a whole batch,
the dynamic weights, the per-pixel contributions ``(z · W).sum(channels)`` (which add up to the logit) and the
coloured explanations of the B-cos papers (Böhle et al., CVPR 2022). Images in a batch are independent (the model runs
in eval mode), so the gradient of the *sum* of the selected logits is every image's own ``W(x)``.

Constant terms (position embeddings, class and register tokens) are not a linear function of the image and
would make the contributions fall short of the logit. ``fold_constant_tokens`` is a forward hook that, in
explanation mode only, rewrites them in input-linear form without changing any value (docs/explanations.md).

Part of the remote-loadable model code: imports only torch, numpy, PIL (lazily) and siblings, with single dots.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .explainable import ExplainableMixin, explanation_mode

Target = int | str | Sequence[int | str] | torch.Tensor | Callable[[Any], torch.Tensor] | None
"""What to explain: None (the predicted class), a class index or label name for every image, one per image,
or (backbones) a callable mapping the model outputs to one score per image."""

SMOOTHING_KERNEL = 15
"""Side of the average-pooling window that smooths the explanation's opacity (Böhle et al., CVPR 2022)."""

OPACITY_PERCENTILE = 99.5
"""Opacity and heat maps are scaled so that this percentile of each image maps to full strength."""


def _is_explaining(module: nn.Module) -> bool:
    return any(child.explaining for child in module.modules() if isinstance(child, ExplainableMixin))


def _patch_size(module: nn.Module) -> tuple[int, int]:
    for child in module.modules():
        if isinstance(child, nn.Conv2d):
            return tuple(child.stride)
    raise ValueError(f"{type(module).__name__} has no patch convolution; constant tokens cannot be folded.")


def fold_constant_tokens(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor | None:
    """Forward hook on a transformer's embeddings: make its constant terms input-linear in explanation mode.

    The embeddings compute ``tokens = L(z) + c``: the patch projection ``L`` (no constant, as the converter
    leaves it) plus constants ``c`` (position embeddings, class / distillation / register tokens, and the
    projection bias if kept). Since every pixel pair sums to one, ``u_p = mean over patch p of z.sum(channels)
    / 3`` is 1 in value and linear in ``z``: the hook adds ``c * (u - u.detach())``, which is exactly zero in
    value (outputs are bit-identical) and gives ``c`` the gradient ``c ∂u/∂z``, so the contributions of the
    pixels of patch p add up to its constant (``z · ∂u/∂z = u = 1``). Leading tokens (class, distillation,
    registers) are spread over the whole image. Assumes the usual layout: leading tokens, then one token per
    patch in row-major order, patches of the first convolution's stride. Outside explanation mode it does
    nothing.
    """
    if not _is_explaining(module):
        return None
    pixel_values = args[0] if args else kwargs["pixel_values"]
    other_kwargs = {name: value for name, value in kwargs.items() if name != "pixel_values"}
    with torch.no_grad():
        constants = module.forward(torch.zeros_like(pixel_values[:1]), *args[1:], **other_kwargs)
    pixel_units = pixel_values.sum(dim=1, keepdim=True) / (pixel_values.shape[1] / 2)  # 1 at every pixel
    patch_units = F.avg_pool2d(pixel_units, _patch_size(module)).flatten(1)
    leading = output.shape[1] - patch_units.shape[1]
    if leading < 0:
        raise ValueError(
            f"{type(module).__name__} returned {output.shape[1]} tokens for {patch_units.shape[1]} patches; "
            "its constant terms cannot be folded (expected leading tokens followed by one token per patch)."
        )
    image_units = pixel_units.mean(dim=(1, 2, 3))[:, None].expand(-1, leading)
    units = torch.cat([image_units, patch_units], dim=1)[..., None].to(output.dtype)
    return output + constants * (units - units.detach())


def resolve_targets(target: Target, scores: torch.Tensor, label2id: Mapping[str, int] | None = None) -> torch.Tensor:
    """Turn ``target`` into one index per image into the columns of ``scores`` (N x K), with clear errors."""
    batch, classes = scores.shape
    if target is None:
        return scores.argmax(dim=1)
    if isinstance(target, (torch.Tensor, np.ndarray)):
        target = target.tolist()
    entries = list(target) if isinstance(target, Sequence) and not isinstance(target, str) else [target] * batch
    if len(entries) != batch:
        raise ValueError(
            f"target has {len(entries)} entries but the batch has {batch} images: pass one target per image, "
            "or a single class index or label name for all of them."
        )
    indices = []
    for entry in entries:
        if isinstance(entry, str):
            if not label2id or entry not in label2id:
                known = sorted(label2id or {}, key=lambda name: label2id[name])
                shown = ", ".join(repr(name) for name in known[:10]) + (", ..." if len(known) > 10 else "")
                raise ValueError(
                    f"Unknown label {entry!r}; the model's labels are: {shown or 'none (pass class indices)'}."
                )
            entry = label2id[entry]
        if isinstance(entry, bool) or not isinstance(entry, (int, np.integer)):
            raise ValueError(f"A target must be a class index or a label name; got {entry!r}.")
        if not 0 <= int(entry) < classes:
            raise ValueError(
                f"target {int(entry)} is out of range: the model has {classes} outputs (0 to {classes - 1})."
            )
        indices.append(int(entry))
    return torch.tensor(indices, device=scores.device, dtype=torch.long)


def explain_scores(
    model: nn.Module,
    pixel_values: torch.Tensor,
    compute_scores: Callable[[torch.Tensor], torch.Tensor],
    target: Target = None,
    *,
    label2id: Mapping[str, int] | None = None,
    id2label: Mapping[int, str] | None = None,
    score_offset: float = 0.0,
    dynamic_linear: bool = True,
) -> BcosExplanation:
    """Explain the scores ``compute_scores(encoded_images)`` (N x K) of ``model`` for the chosen targets.

    One forward and one backward for the whole batch, in eval mode and (with ``dynamic_linear``) in explanation
    mode; the model's training flag and explanation state are restored, and no gradient is left on parameters
    or inputs (``torch.autograd.grad`` only computes the input's). ``score_offset`` is the part of a score that
    is constant by design (the logit bias): ``residual = score - score_offset - sum of contributions``.
    ``dynamic_linear=False`` gives plain input x gradient, the post-hoc baseline.
    """
    was_training = model.training
    model.eval()
    try:  # autograd on, also under a caller's no_grad or inference_mode (a pipeline's, say)
        with torch.inference_mode(False), torch.enable_grad(), explanation_mode(model, dynamic_linear):
            encoded = model.encode_pixels(pixel_values.clone()).detach().requires_grad_(True)
            scores = compute_scores(encoded)
            targets = resolve_targets(target, scores.detach(), label2id)
            selected = scores.gather(1, targets[:, None]).squeeze(1)
            (weights,) = torch.autograd.grad(selected.sum(), encoded)
    finally:
        model.train(was_training)
    weights = weights.float()
    contributions = (encoded.detach().float() * weights).sum(dim=1)
    selected = selected.detach().float()
    return BcosExplanation(
        logits=scores.detach(),
        target=targets,
        contributions=contributions,
        dynamic_weights=weights,
        residual=selected - score_offset - contributions.sum(dim=(1, 2)),
        pixel_values=encoded.detach()[:, :3].float(),
        labels=[id2label.get(int(index), str(int(index))) for index in targets] if id2label else None,
    )


Compile = bool | str | Callable
"""How ``explain`` runs the model: False (eagerly), True (``torch.compile`` with inductor) or a backend (name or
callable, as ``torch.compile`` takes it)."""


def compiled(model: nn.Module, compile: Compile = False) -> Callable:
    """``model`` itself, or (``compile``) the whole model under ``torch.compile(fullgraph=True)``: True for the
    default backend (inductor), or a backend (name or callable). Dynamo keeps the graphs with the model's code, so a fresh
    wrapper per call compiles only the first time (and once more, with a dynamic batch, when the batch size
    changes); explanation mode and the training flag are guarded, each state compiles once."""
    if not compile:
        return model
    return torch.compile(model, fullgraph=True, backend="inductor" if compile is True else compile)


def explain(
    model: nn.Module, pixel_values: torch.Tensor, target: Target = None, compile: Compile = False, **kwargs
) -> BcosExplanation:
    """``model.explain``: classifiers explain a logit; backbones a pooled feature or a callable's score.
    ``compile``: run the forward compiled (see ``compiled``)."""
    forward = compiled(model, compile)
    id2label = {int(index): str(name) for index, name in (model.config.id2label or {}).items()}
    label2id = {name: index for index, name in id2label.items()}
    if model.task == "image-classification":
        return explain_scores(
            model,
            pixel_values,
            lambda encoded: forward(pixel_values=encoded, **kwargs).logits,
            target,
            label2id=label2id,
            id2label=id2label,
            score_offset=model.logit_layer.logit_bias,
        )
    if callable(target):
        score_fn = target

        def compute_scores(encoded: torch.Tensor) -> torch.Tensor:
            scores = score_fn(forward(pixel_values=encoded, **kwargs))
            if scores.shape != (encoded.shape[0],):
                raise ValueError(
                    f"The target callable must return one score per image; got shape {tuple(scores.shape)}."
                )
            return scores[:, None]

        return explain_scores(model, pixel_values, compute_scores, 0)
    if target is None:
        raise ValueError(
            "A B-cos backbone has no classes: pass target=<feature index> (into the pooled output) or a callable "
            "mapping the model outputs to one score per image, e.g. target=lambda out: out.last_hidden_state[:, 0, 7]."
        )

    def pooled_features(encoded: torch.Tensor) -> torch.Tensor:
        pooled = getattr(forward(pixel_values=encoded, **kwargs), "pooler_output", None)
        if pooled is None:
            raise ValueError(
                "This backbone has no pooled output to index: pass a callable target mapping the model outputs to "
                "one score per image, e.g. target=lambda out: out.last_hidden_state[:, 0, 7]."
            )
        return pooled.flatten(1)

    return explain_scores(model, pixel_values, pooled_features, target)


def explain_image_text(
    model: nn.Module,
    pixel_values: torch.Tensor,
    image_embeddings: Callable[[torch.Tensor], torch.Tensor],
    text_embeddings: torch.Tensor,
    logit_scale: float,
    target: Target = None,
    prompts: Sequence[str] | None = None,
    logit_bias: float = 0.0,
) -> BcosExplanation:
    """Explain CLIP-style similarities ``logit_scale * cos(image embedding, text embedding) + logit_bias``.

    The text embeddings are constants for the image. The image embedding is dynamic linear, and its norm is a
    dynamic scale detached like every other one, so the contributions add up to the similarity (minus SigLIP's
    ``logit_bias``, reported like a classifier's). ``target``: None (the best-matching prompt), a prompt index
    or prompt string for all images, or one per image.
    """
    text = F.normalize(text_embeddings.detach().float(), dim=-1)

    def similarities(encoded: torch.Tensor) -> torch.Tensor:
        image = image_embeddings(encoded).float()
        cosines = (image / image.norm(dim=-1, keepdim=True).detach()) @ text.T.to(image.device)
        return logit_scale * cosines + logit_bias

    id2label = dict(enumerate(prompts)) if prompts is not None else None
    label2id = {prompt: index for index, prompt in enumerate(prompts)} if prompts is not None else None
    return explain_scores(
        model, pixel_values, similarities, target, label2id=label2id, id2label=id2label, score_offset=logit_bias
    )


def _to_numpy(images: torch.Tensor) -> np.ndarray:
    return images.detach().cpu().float().numpy()


@dataclass
class BcosExplanation:
    """What ``model.explain`` returns for a batch of N images of H x W pixels.

    Attributes:
        logits: (N, K) the model's scores (logits, or the explained scores for backbones).
        target: (N,) the explained index of each image.
        contributions: (N, H, W) per-pixel contribution to the target score, ``(z · W).sum(channels)``.
        dynamic_weights: (N, 6, H, W) ``W(x)`` on the encoded image ``z = [x, 1 - x]``.
        residual: (N,) target score - logit bias - sum of contributions: ~0 for a model without constant terms;
            what is left of the biases when they were kept.
        pixel_values: (N, 3, H, W) the images in [0, 1], for pictures side by side.
        labels: the target label names, when the model has them.
    """

    logits: torch.Tensor
    target: torch.Tensor
    contributions: torch.Tensor
    dynamic_weights: torch.Tensor
    residual: torch.Tensor
    pixel_values: torch.Tensor
    labels: list[str] | None = None

    def __len__(self) -> int:
        return self.target.shape[0]

    @property
    def target_logits(self) -> torch.Tensor:
        """(N,) the explained score of each image."""
        return self.logits.gather(1, self.target[:, None]).squeeze(1).float()

    def rgba(self, smoothing: int = SMOOTHING_KERNEL, percentile: float = OPACITY_PERCENTILE) -> np.ndarray:
        """(N, H, W, 4) float RGBA explanations in [0, 1], as in the B-cos papers (Böhle et al., CVPR 2022).

        Colour: the direction of ``W(x)`` per pixel, read as the RGB colour it aligns with (the positive parts
        of the x and 1 - x weights, normalised per channel pair). Opacity: the norm of ``W(x)``, zero where the
        contribution is negative, smoothed over ``smoothing`` pixels and scaled by the ``percentile``.
        """
        weights = self.dynamic_weights.float()
        rgb = (weights / (weights.abs().amax(dim=1, keepdim=True) + 1e-12)).clamp(min=0)
        rgb = rgb[:, :3] / (rgb[:, :3] + rgb[:, 3:] + 1e-12)
        alpha = weights.norm(dim=1, keepdim=True) * (self.contributions[:, None] >= 0)
        if smoothing > 1:
            alpha = F.avg_pool2d(alpha, smoothing, stride=1, padding=(smoothing - 1) // 2)
        scale = torch.quantile(alpha.flatten(1), percentile / 100, dim=1).view(-1, 1, 1, 1)
        alpha = (alpha / (scale + 1e-12)).clamp(0, 1)
        return _to_numpy(torch.cat([rgb, alpha], dim=1).permute(0, 2, 3, 1))

    def heatmap(self, percentile: float = OPACITY_PERCENTILE) -> np.ndarray:
        """(N, H, W, 3) float RGB contribution maps: red for positive, blue for negative, white for zero."""
        contributions = self.contributions.float()
        scale = torch.quantile(contributions.abs().flatten(1), percentile / 100, dim=1).view(-1, 1, 1)
        signed = (contributions / (scale + 1e-12)).clamp(-1, 1)
        positive, negative = signed.clamp(min=0), (-signed).clamp(min=0)
        rgb = torch.stack([1 - negative, 1 - positive - negative, 1 - positive], dim=-1)
        return _to_numpy(rgb)

    def explanation_images(self, with_image: bool = False, **rgba_options) -> list:
        """PIL RGBA explanations; ``with_image`` puts the input image on their left."""
        from PIL import Image

        pictures = [Image.fromarray(_to_uint8(rgba), "RGBA") for rgba in self.rgba(**rgba_options)]
        return [self._beside_image(i, p) for i, p in enumerate(pictures)] if with_image else pictures

    def heatmap_images(self, with_image: bool = False, percentile: float = OPACITY_PERCENTILE) -> list:
        """PIL RGB contribution heat maps; ``with_image`` puts the input image on their left."""
        from PIL import Image

        pictures = [Image.fromarray(_to_uint8(rgb), "RGB") for rgb in self.heatmap(percentile)]
        return [self._beside_image(i, p) for i, p in enumerate(pictures)] if with_image else pictures

    def _beside_image(self, index: int, picture):
        from PIL import Image

        image = Image.fromarray(_to_uint8(_to_numpy(self.pixel_values[index].permute(1, 2, 0))), "RGB")
        canvas = Image.new(picture.mode, (image.width + picture.width, max(image.height, picture.height)))
        canvas.paste(image.convert(picture.mode), (0, 0))
        canvas.paste(picture, (image.width, 0))
        return canvas

    def save(self, directory: str | Path, names: Sequence[str] | None = None, with_image: bool = False) -> list[dict]:
        """Write ``<name>_explanation.png`` (RGBA) and ``<name>_heatmap.png`` per image; return their paths."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        names = list(names) if names is not None else [f"image_{index}" for index in range(len(self))]
        if len(names) != len(self):
            raise ValueError(f"save got {len(names)} names for {len(self)} explanations.")
        for name in names:
            check_file_name(name)
        if len(set(names)) != len(names):
            raise ValueError(f"save got repeated names {names}: each image's pictures would overwrite another's.")
        written = []
        pairs = zip(self.explanation_images(with_image), self.heatmap_images(with_image), names, strict=True)
        for explanation, heatmap, name in pairs:
            paths = {"explanation": directory / f"{name}_explanation.png", "heatmap": directory / f"{name}_heatmap.png"}
            explanation.save(paths["explanation"])
            heatmap.save(paths["heatmap"])
            written.append(paths)
        return written


def check_file_name(name: str) -> str:
    """``name`` if it is a plain file name (no folder part, not ``.``/``..``, no control characters), else a
    ValueError: names given for output files must not reach outside their folder."""
    if (
        not isinstance(name, str)
        or name in ("", ".", "..")
        or "/" in name
        or "\\" in name
        or any(ord(character) < 32 for character in name)
    ):
        raise ValueError(
            f"{name!r} is not a plain file name: names must not be empty, '.' or '..', or hold '/', '\\' or "
            "control characters (they name files inside the output folder)."
        )
    return name


def _to_uint8(array: np.ndarray) -> np.ndarray:
    return (np.clip(array, 0, 1) * 255).round().astype(np.uint8)
