"""The B-cos layers: linear and convolutional layers with the B-cos transform, the plain linear layer of
attention queries and keys, and the logit layer.

Each layer subclasses the torch module it replaces, keeps its parameter names, and is built without
allocating memory (``from_module`` takes over the original parameters), so conversion is cheap and state
dicts keep the original layout. The arithmetic is in ``bcos_kernels``; normalisation layers are in
``bcos_norms``, activations in ``bcos_activations``.

Part of the remote-loadable model code: imports only torch and siblings, with single dots.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .bcos_kernels import Window, autocast_input, bcos_scale
from .explainable import ExplainableMixin


def _unit_rows(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with every output unit (row of a linear weight, filter of a convolution) of norm 1."""
    norms = weight.float().flatten(1).norm(dim=1).clamp_min(1e-12).to(weight.dtype)
    return weight / norms.view(-1, *[1] * (weight.ndim - 1))


B_MAX = 10.0
"""Largest accepted B: ``|cos|^(B-1)`` of higher B vanishes for every unit, and with it every logit but the
bias (B-cos papers use 1 to 2.5)."""


def check_b(b) -> float:
    """``b`` as a float, or a ValueError: the one check of the B-cos exponent (converter, config, layers)."""
    try:
        value = float(b)
    except (TypeError, ValueError):
        value = math.nan
    if not 1 <= value <= B_MAX:
        raise ValueError(
            f"B must be a number >= 1 (1 is a plain linear layer, 2 the usual B-cos choice) and at most {B_MAX:g} "
            f"(above, |cos|^(B-1) vanishes and every logit is the same); got {b!r}."
        )
    return value


class BExponent:
    """B of a layer, held so that changing it (the B ramp of training) does not recompile a compiled model.

    ``b`` is a float for people and configs. The forward reads only ``b_kind`` ("plain" for B = 1, "two" for
    the B = 2 fast path, "general") and, for "general", ``b_exponent``, a 0-dim float32 tensor that a compiled
    graph takes as an input: ``torch.compile`` guards on a float attribute's value (one graph per B), on a
    tensor only on its dtype and device. A ramp from 1 to 2 thus compiles at most three graphs. The tensor is
    a plain attribute, not a buffer: never saved, never cast with the model's dtype, untouched by loading; it
    follows the weight's device (``_apply``).
    """

    weight: torch.Tensor
    b_kind: str
    b_exponent: torch.Tensor

    @property
    def b(self) -> float:
        return self._b

    @b.setter
    def b(self, value: float) -> None:
        value = check_b(value)
        self._b = value
        self.b_kind = "plain" if value == 1 else "two" if value == 2 else "general"
        device = self.weight.device if self.weight.device.type != "meta" else torch.device("cpu")
        self.b_exponent = torch.tensor(value, dtype=torch.float32, device=device)

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> nn.Module:
        """``Module.to``/``cuda``/``half`` and the like, then the exponent tensor to the weight's (new) device."""
        module = super()._apply(fn, recurse)  # type: ignore[misc]
        if self.weight.device.type != "meta":
            self.b_exponent = self.b_exponent.to(self.weight.device)
        return module

    def _b_argument(self) -> float | torch.Tensor:
        """What the kernels take as B: the constant 2.0 for the fast path, else the exponent tensor."""
        return 2.0 if self.b_kind == "two" else self.b_exponent


class BcosLinear(BExponent, nn.Linear, ExplainableMixin):
    """Linear layer with the B-cos transform ``|cos(x, w)|^(B-1) * w^T x``.

    With ``normalize_weights=False`` (the B-cosification default) the pretrained weights are used raw: the
    output is then ``||w||^B`` times the unit-norm B-cos output, a per-unit constant later layers absorb.
    At ``b=1`` with a bias the layer is exactly ``nn.Linear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        b: float = 2.0,
        normalize_weights: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.b = b
        self.normalize_weights = normalize_weights

    @classmethod
    def from_module(cls, linear: nn.Linear, b: float, keep_bias: bool, normalize_weights: bool = False) -> BcosLinear:
        """Wrap an existing linear layer, sharing its parameters (no copy, no allocation)."""
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, bias=False, b=b, normalize_weights=normalize_weights)
        layer.weight = linear.weight
        layer.bias = linear.bias if keep_bias else None
        layer.b = b  # the exponent tensor on the weight's device
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _unit_rows(self.weight) if self.normalize_weights else self.weight
        if self.b_kind == "plain":
            return F.linear(x, weight, self.bias)
        x = autocast_input(x)
        out = F.linear(x, weight, self.bias)
        return bcos_scale(out.view(-1, out.shape[-1], 1), x, None, self._b_argument(), self.explaining).view(out.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, b={self.b:g}, normalize_weights={self.normalize_weights}"


class BcosConv2d(BExponent, nn.Conv2d, ExplainableMixin):
    """2D convolution with the B-cos transform, per output position and per group.

    The input norm of each receptive field is the square root of the sum of squares over the kernel window
    and the input channels of the group, computed as a convolution of the per-group sum of squares with a
    kernel of ones (same stride, padding and dilation), so grouped and depthwise convolutions are exact.
    Only zero padding is supported: it keeps padded positions out of both the output and the norm.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = False,
        b: float = 2.0,
        normalize_weights: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            bias=bias,
            device=device,
            dtype=dtype,
        )
        self.b = b
        self.normalize_weights = normalize_weights

    @classmethod
    def from_module(cls, conv: nn.Conv2d, b: float, keep_bias: bool, normalize_weights: bool = False) -> BcosConv2d:
        """Wrap an existing convolution, sharing its parameters (no copy, no allocation)."""
        if conv.padding_mode != "zeros":
            raise NotImplementedError(
                f"B-cos convolutions support zero padding only; got padding_mode={conv.padding_mode!r}."
            )
        with torch.device("meta"):
            layer = cls(
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                stride=conv.stride,
                padding=conv.padding,
                dilation=conv.dilation,
                groups=conv.groups,
                bias=False,
                b=b,
                normalize_weights=normalize_weights,
            )
        layer.weight = conv.weight
        layer.bias = conv.bias if keep_bias else None
        layer.b = b  # the exponent tensor on the weight's device
        return layer

    @property
    def _window(self) -> Window:
        """(groups, kernel_size, stride, padding, dilation) with the padding as numbers, for the norm."""
        padding = self.padding
        if isinstance(padding, str):  # "valid" or "same" (stride 1): symmetric zero padding
            totals = [d * (k - 1) for d, k in zip(self.dilation, self.kernel_size, strict=True)]
            if padding == "same" and any(total % 2 for total in totals):
                raise NotImplementedError("B-cos convolutions support padding='same' only with symmetric padding.")
            padding = tuple(total // 2 for total in totals) if padding == "same" else (0, 0)
        return self.groups, self.kernel_size, self.stride, padding, self.dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _unit_rows(self.weight) if self.normalize_weights else self.weight
        if self.b_kind == "plain":
            return self._conv_forward(x, weight, self.bias)
        x = autocast_input(x)
        out = self._conv_forward(x, weight, self.bias)
        batch, channels, height, width = out.shape
        if self.groups == channels:  # depthwise: one norm per output unit, (N, C, H*W) is a view in any layout
            grouped = out.flatten(2)
        else:
            grouped = out.reshape(batch * self.groups, channels // self.groups, height * width)
        return bcos_scale(grouped, x, self._window, self._b_argument(), self.explaining).reshape(out.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, b={self.b:g}, normalize_weights={self.normalize_weights}"


class DetachableLinear(nn.Linear, ExplainableMixin):
    """A plain linear layer whose output is detached in explanation mode.

    Used for attention queries and keys: softmax(q k^T) then acts as an input-dependent weight on the
    values, which keeps attention dynamic linear. Detaching at the projection works with every attention
    kernel (eager, SDPA, flash, flex) without registering anything. Its bias only shapes the attention
    pattern, never the output, so it is kept.
    """

    @classmethod
    def from_module(cls, linear: nn.Linear) -> DetachableLinear:
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, bias=False)
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out.detach() if self.explaining else out


def check_logit_layer(logit_bias, temperature) -> tuple[float, float]:
    """``(logit_bias, temperature)`` as floats, or a ValueError: the bias must be finite, the temperature
    finite and positive (either NaN would make every logit NaN)."""
    bias, scale = float(logit_bias), float(temperature)
    if not math.isfinite(bias):
        raise ValueError(f"logit_bias must be a finite number; got {logit_bias!r}.")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"logit_temperature must be a finite positive number; got {temperature!r}.")
    return bias, scale


class LogitLayer(nn.Module):
    """Final affine map of the logits: ``logits / temperature + logit_bias``.

    The B-cosification recipe uses ``logit_bias = -log(C - 1)`` so that an untrained model starts at
    sigmoid(logit) = 1/C for every class under the BCE loss; both values come from the config, not weights.
    """

    def __init__(self, logit_bias: float = 0.0, temperature: float = 1.0) -> None:
        super().__init__()
        self.logit_bias, self.temperature = check_logit_layer(logit_bias, temperature)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits + self.logit_bias if self.logit_bias else logits

    def extra_repr(self) -> str:
        return f"logit_bias={self.logit_bias:g}, temperature={self.temperature:g}"
