"""Attribution methods scored by the explanation metrics: the B-cos explanation and post-hoc baselines from captum.

Every method is a callable ``(model, images, targets) -> maps``: ``images`` (N, 3, H, W) are the model's
``pixel_values``, ``targets`` (N,) one class per image, ``maps`` (N, H, W) one score per pixel (channels summed).
Methods run batched, in eval mode, and leave no gradient on parameters or inputs.

- ``bcos``: the B-cos explanation, ``(z · W(x))`` summed over channels (B-cos models only).
- captum baselines (``pip install bcos-hf[captum]``; captum is imported only when one is asked for), taken with
  explanation mode off (the model's plain gradient), w.r.t. the model's input: the encoded image ``[x, 1 - x]``
  of a B-cos model, as for its explanation, or ``pixel_values`` of any other classifier. "Zero" below is the
  zero of that input (for a B-cos model: no input at all, where its output is the logit bias alone):
  ``ixg`` input × gradient, ``saliency`` |gradient| (Simonyan et al., 2014), ``ig`` integrated gradients from
  zero (Sundararajan et al., 2017), ``deeplift`` DeepLIFT rescale from zero (Shrikumar et al., 2017),
  ``occlusion`` the logit drop when a window is set to zero (Zeiler & Fergus, 2014), ``gradcam`` Grad-CAM on the
  last spatial layer the logits depend on (Selvaraju et al., 2017), ``smoothgrad`` the noise tunnel over
  saliency (Smilkov et al., 2017).
- ``random``: uniform random maps, the chance level.

    from bcos_hf.attribution import get_attribution
    maps = get_attribution("ig")(model, pixel_values, targets)
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .modeling.explainable import explanation_mode

CAPTUM_HINT = "Post-hoc baselines need captum: pip install 'bcos-hf[captum]' (or pip install captum==0.9.0)."

IG_STEPS = 32
"""Integration steps of integrated gradients (Gauss-Legendre, captum's default rule)."""

SMOOTHGRAD_SAMPLES, SMOOTHGRAD_NOISE = 16, 0.15
"""Noisy copies per image, and the noise level as a share of the input's range (Smilkov et al., 2017, Sec. 3)."""

OCCLUSION_WINDOWS = 8
"""Occlusion windows per image side: a window of side / 8, moved by its own width (64 windows an image)."""


class Attribution(Protocol):
    """(model, images (N, 3, H, W), targets (N,)) -> attribution maps (N, H, W)."""

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...


def _captum() -> Any:
    try:
        import captum.attr
    except ImportError as error:
        raise ImportError(CAPTUM_HINT) from error
    return captum.attr


@contextmanager
def post_hoc(model: nn.Module) -> Iterator[None]:
    """Eval mode, gradients on (even under a caller's no_grad) and, for B-cos models, explanation mode off; the
    training flag is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode(False), torch.enable_grad(), explanation_mode(model, False):
            yield
    finally:
        model.train(was_training)


class Logits(nn.Module):
    """The model's logits as a function of one tensor: captum's forward function (DeepLIFT needs a module).

    B-cos models refuse inputs outside [0, 1]; SmoothGrad's noisy copies are clipped to it in value only (the
    gradient passes as if unclipped), so every method sees the same function.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.clip = hasattr(model, "encode_pixels")

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        if not self.clip:
            return self.model(pixel_values=inputs).logits
        inputs = inputs + (inputs.clamp(0, 1) - inputs).detach()
        if inputs.shape[1] == 3:  # layer methods (Grad-CAM) pass the images themselves
            inputs = torch.cat([inputs, 1 - inputs], dim=1)
        # The network itself: integration paths, occlusion fills and noise leave the [x, 1 - x] encoding, which
        # the model's own forward refuses as a malformed input.
        return self.model.logit_layer(self.model.network(pixel_values=inputs.to(self.model.dtype)).logits)


def model_input(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What post-hoc methods attribute to: the encoded image ``[x, 1 - x]`` of a B-cos model, else ``images``;
    a fresh leaf that requires grad."""
    inputs = model.encode_pixels(images) if hasattr(model, "encode_pixels") else images
    return inputs.detach().clone().requires_grad_(True)


def bcos_attribution(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The B-cos explanation: per-pixel contributions ``(z · W(x)).sum(channels)``."""
    if not hasattr(model, "explain"):
        raise ValueError(
            f"'bcos' explains B-cos models only; {type(model).__name__} is not one (convert it with bcos-hf convert) "
            "- score its post-hoc baselines instead (ixg, ig, gradcam, ...)."
        )
    return model.explain(images, target=targets).contributions


def random_attribution(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Chance reference: uniform random positive attributions (seeded by the caller's generator state)."""
    return torch.rand(images.shape[0], *images.shape[2:])


def _attribute(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, method: str, **options) -> torch.Tensor:
    """Run one captum method on the model's input and sum its attributions over channels."""
    attr = _captum()
    with post_hoc(model):
        inputs = model_input(model, images)
        forward = Logits(model)
        targets = targets.to(inputs.device)
        if method == "smoothgrad":
            spread = (inputs.amax(dim=(1, 2, 3)) - inputs.amin(dim=(1, 2, 3))).mean().item()
            explainer = attr.NoiseTunnel(attr.Saliency(forward))
            options = dict(
                nt_type="smoothgrad", nt_samples=SMOOTHGRAD_SAMPLES, stdevs=SMOOTHGRAD_NOISE * spread, **options
            )
        else:
            explainer = getattr(attr, method)(forward)
        with warnings.catch_warnings():  # DeepLIFT announces the hooks it sets (and removes) on every call
            warnings.filterwarnings("ignore", message="Setting forward, backward hooks", category=UserWarning)
            maps = explainer.attribute(inputs, target=targets, **options)
    return maps.detach().float().sum(dim=1)


def input_x_gradient(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Input x gradient of the logit (captum ``InputXGradient``)."""
    return _attribute(model, images, targets, "InputXGradient")


def saliency(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Absolute gradient of the logit (captum ``Saliency``)."""
    return _attribute(model, images, targets, "Saliency")


def integrated_gradients(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Integrated gradients from zero, ``IG_STEPS`` steps (captum ``IntegratedGradients``)."""
    return _attribute(
        model, images, targets, "IntegratedGradients", n_steps=IG_STEPS, internal_batch_size=len(images) * 8
    )


def deeplift(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """DeepLIFT (rescale rule) from zero (captum ``DeepLift``). Nonlinearities captum does not know (GELU, ReLU6,
    B-cos layers) pass plain gradients."""
    return _attribute(model, images, targets, "DeepLift")


def occlusion(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Logit drop when a window (side / ``OCCLUSION_WINDOWS``, not overlapping) is set to zero (captum ``Occlusion``)."""
    channels, height, width = model_input(model, images[:1]).shape[1:]
    window = max(1, round(min(height, width) / OCCLUSION_WINDOWS))
    stride = window
    return (1 / channels) * _attribute(  # each window spans all channels: their sum counts its drop C times
        model,
        images,
        targets,
        "Occlusion",
        sliding_window_shapes=(channels, window, window),
        strides=(channels, stride, stride),
        baselines=0.0,
        perturbations_per_eval=16,
    )


def smoothgrad(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """SmoothGrad: saliency averaged over ``SMOOTHGRAD_SAMPLES`` noisy copies (captum ``NoiseTunnel``)."""
    return _attribute(model, images, targets, "smoothgrad", nt_samples_batch_size=len(images) * 4)


def _token_grid(tokens: torch.Tensor, height: int, width: int) -> tuple[int, int, int] | None:
    """(leading tokens, rows, columns) when ``tokens`` (N, T, D) end in a patch grid of the image's aspect."""
    for leading in range(0, min(8, tokens.shape[1] - 1) + 1):
        patches = tokens.shape[1] - leading
        rows = round(math.sqrt(patches * height / width))
        if rows > 1 and patches % rows == 0 and rows * width == (patches // rows) * height:
            return leading, rows, patches // rows
    return None


def _feature_map(output: Any, height: int, width: int) -> torch.Tensor | None:
    """A module output as an (N, C, h, w) map: a 4-D feature map, or patch tokens after a few leading ones."""
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        return None
    if output.ndim == 4 and output.shape[2] > 1 and output.shape[3] > 1:
        return output
    if output.ndim == 3 and output.shape[1] > 1 and (layout := _token_grid(output, height, width)):
        leading, rows, columns = layout
        return output[:, leading:].transpose(1, 2).unflatten(2, (rows, columns))
    return None


def last_feature_layer(model: nn.Module, images: torch.Tensor) -> str:
    """Name of the last module whose spatial output the logits depend on: Grad-CAM's default layer.

    "Depend on" matters for ViTs, whose final norm also outputs patch tokens that the class token never reads.
    """
    height, width = images.shape[2:]
    captured: dict[str, torch.Tensor] = {}

    def record(name: str):
        def hook(module, args, output):
            if _feature_map(output, height, width) is not None and output.requires_grad:
                captured[name] = output

        return hook

    handles = [module.register_forward_hook(record(name)) for name, module in model.named_modules() if name]
    try:
        with post_hoc(model):
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
    return used[-1]


class _FeatureMap(nn.Module):
    """Identity on a layer's feature map, which a forward hook routes the layer's output through: captum's
    Grad-CAM hooks this module, so CNN feature maps and ViT patch tokens take the same path."""

    def forward(self, feature_map: torch.Tensor) -> torch.Tensor:
        return feature_map


@contextmanager
def _as_feature_map(model: nn.Module, layer: str, height: int, width: int) -> Iterator[nn.Module]:
    """A ``_FeatureMap`` that ``layer``'s output passes through (patch tokens laid out as a grid, leading tokens
    kept aside); values are unchanged and the hook is removed on exit."""
    feature_map = _FeatureMap()

    def through_feature_map(module, args, output):
        if output.ndim == 4:
            return feature_map(output)
        leading, rows, columns = _token_grid(output, height, width)
        patches = feature_map(output[:, leading:].transpose(1, 2).unflatten(2, (rows, columns)))
        return torch.cat([output[:, :leading], patches.flatten(2).transpose(1, 2)], dim=1)

    handle = model.get_submodule(layer).register_forward_hook(through_feature_map)
    try:
        yield feature_map
    finally:
        handle.remove()


class GradCam:
    """Grad-CAM (captum ``LayerGradCam``, ReLU'd, upsampled bilinearly to the image) on ``layer``, by default
    the last spatial layer the logits depend on (found once per model and input size, for this instance)."""

    def __init__(self, layer: str | None = None) -> None:
        self.layer = layer
        self._layers: weakref.WeakKeyDictionary[nn.Module, dict[tuple, str]] = weakref.WeakKeyDictionary()

    def layer_of(self, model: nn.Module, images: torch.Tensor) -> str:
        if self.layer is not None:
            return self.layer
        found = self._layers.setdefault(model, {})
        shape = tuple(images.shape[1:])
        if shape not in found:
            found[shape] = last_feature_layer(model, images[:1])
        return found[shape]

    def __call__(self, model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        attr = _captum()
        height, width = images.shape[2:]
        layer = self.layer_of(model, images)
        with post_hoc(model), _as_feature_map(model, layer, height, width) as spatial:
            explainer = attr.LayerGradCam(Logits(model), spatial)
            cam = explainer.attribute(
                images.detach().clone().requires_grad_(True),
                target=targets.to(images.device),
                relu_attributions=True,
            )
        cam = F.interpolate(cam.detach().float(), size=(height, width), mode="bilinear", align_corners=False)
        return cam[:, 0]


def grad_cam(model: nn.Module, images: torch.Tensor, targets: torch.Tensor, layer: str | None = None) -> torch.Tensor:
    """Grad-CAM on ``layer`` (default: the last spatial feature map), upsampled to the image."""
    return GradCam(layer)(model, images, targets)


ATTRIBUTIONS: dict[str, Callable[[], Attribution]] = {
    "bcos": lambda: bcos_attribution,
    "ixg": lambda: input_x_gradient,
    "gradcam": GradCam,
    "random": lambda: random_attribution,
    "saliency": lambda: saliency,
    "ig": lambda: integrated_gradients,
    "deeplift": lambda: deeplift,
    "occlusion": lambda: occlusion,
    "smoothgrad": lambda: smoothgrad,
}
"""The built-in methods, by the names the CLI takes: each entry makes a fresh method (Grad-CAM keeps its layer)."""

POST_HOC = ("ixg", "saliency", "ig", "deeplift", "occlusion", "gradcam", "smoothgrad")
"""The captum baselines, in the order of the tables."""


def get_attribution(method: str | Attribution) -> Attribution:
    """The attribution method ``method`` names (see ``ATTRIBUTIONS``), or ``method`` itself if it is callable."""
    if callable(method):
        return method
    if method not in ATTRIBUTIONS:
        raise ValueError(f"Unknown attribution method {method!r}; known: {', '.join(ATTRIBUTIONS)}.")
    return ATTRIBUTIONS[method]()
