"""B-cos building blocks: every layer a converted model is made of, and the switch into explanation mode.

A B-cos network computes ``y = W(x) x``: each layer is linear in its input with weights that depend on the
input through a few *dynamic* factors (the B-cos scale, normalisation divisors, activation gates, attention
scores). In *explanation mode* those factors are detached from the autograd graph, so that the gradient of a
logit with respect to the input is exactly ``W(x)`` (Böhle et al., "B-cos Networks", CVPR 2022).

All layers subclass the torch modules they replace, keep their parameter names, and are built without
allocating memory (``from_module`` takes over the original parameters), so conversion is cheap and state
dicts keep the original layout.

This file is part of the remote-loadable model code: it imports only torch and siblings, with single dots.
"""

from __future__ import annotations

import math
import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

NORM_EPS = 1e-6
"""Added to the squared input norm before the square root: a black patch keeps a finite scale."""

SCALE_EPS = 1e-6
"""Added to ``|cos|`` before raising it to ``B - 1`` for B != 2, as the reference implementation does."""


class ExplainableMixin:
    """Marks a module with input-dependent factors that explanation mode detaches.

    ``explaining`` is a plain attribute (not a buffer): it is never saved, and ``torch.compile`` guards on it.
    """

    explaining: bool = False


def _autocast_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` in the autocast dtype when autocast is on: the norm and the matrix product then read (and save
    for backward) one and the same tensor, instead of the product saving a cast copy beside ``x``."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        if x.dtype != dtype:
            return x.to(dtype)
    return x


# Elementwise kernels on (A, C, B) views: ``out`` and the gradients are (A, C, B); ``norm`` is
# ``sqrt(||x||^2 + eps)`` of the input row (linear) or receptive field (conv group), (A, 1, B) in float32,
# broadcast over the C output units that share it. Norms, squares and reductions are float32; the B = 2 kernels are chains of
# in-place operations on one fresh tensor of the activation dtype (the cosine is formed before the
# product, so float16 does not overflow): three passes over the activation in the forward, four in the
# backward. On CUDA, tensors of FUSE_MIN_BYTES and more run them as one fused kernel (``_launch``).


def _wide(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32, or float64 if it is float64 (gradient checks)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def _norm(norm_sq: torch.Tensor) -> torch.Tensor:
    """``n = sqrt(||x||^2 + eps)``, in place: ``norm_sq`` is always a fresh tensor here."""
    return norm_sq.add_(NORM_EPS).sqrt_()


def _sum_of_products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(dim=1, keepdim=True)`` in float32; for linear layers (B = 1) eagerly one batched dot product."""
    if not torch.compiler.is_compiling() and a.shape[2] == 1:
        return _wide(torch.bmm(a.transpose(1, 2), b))
    return (_wide(a) * _wide(b)).sum(dim=1, keepdim=True)


def _scale2_forward(out: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    return out.abs().div_(norm).mul_(out)


def _scale2_backward(grad: torch.Tensor, y: torch.Tensor, norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B = 2 from the saved output: ``|out| / n = sqrt(|y| / n)``, so ``dy/dout = 2|out|/n`` and
    ``dy/dn = -y / n`` need only ``y`` (which the next layer saves anyway) and the norm. Returns the
    gradient to ``out`` and ``dL/dn / n`` per row or window (what the input gradient of the norm needs)."""
    grad_out = y.abs().div_(norm * 0.25).sqrt_().mul_(grad)
    return grad_out, _sum_of_products(grad, y).div_(norm.square()).neg_()


def _scale2_backward_detached(grad: torch.Tensor, y: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Explanation mode, B = 2: ``y = s * out`` with the constant ``s = |out| / n``, so ``dy/dout = s``."""
    return y.abs().div_(norm).sqrt_().mul_(grad)


def _scale_forward(out: torch.Tensor, norm: torch.Tensor, b: float) -> torch.Tensor:
    wide = _wide(out)
    return (wide * (wide.abs() / norm + SCALE_EPS).pow(b - 1)).to(out.dtype)


def _scale_backward(
    grad: torch.Tensor, out: torch.Tensor, norm: torch.Tensor, b: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """General B: with ``c = |out| / n`` and ``s = (c + eps)^(B-1)``, ``dy/dout = s + c s'(c)`` and
    ``dy/dn = -out c s'(c) / n``, where ``s'(c) = (B-1)(c + eps)^(B-2)``."""
    grad_wide, out_wide = _wide(grad), _wide(out)
    cos = out_wide.abs() / norm
    slope = (b - 1) * (cos + SCALE_EPS).pow(b - 2) * cos
    grad_out = grad_wide * ((cos + SCALE_EPS).pow(b - 1) + slope)
    return grad_out.to(grad.dtype), -_sum_of_products(grad_wide * out_wide, slope) / norm.square()


def _scale_backward_detached(grad: torch.Tensor, out: torch.Tensor, norm: torch.Tensor, b: float) -> torch.Tensor:
    return (_wide(grad) * (_wide(out).abs() / norm + SCALE_EPS).pow(b - 1)).to(grad.dtype)


FUSE_ON_CUDA = True
"""Run the elementwise kernels as fused ``torch.compile``d kernels on CUDA, for large tensors (False: never)."""

FUSE_MIN_BYTES = 2**26
"""Smallest activation (bytes) worth a fused kernel. A compiled call costs about 100 µs of host time
(measured through the CPU backend) against about 10 µs per eager operation; the fused kernel saves two
passes over the tensor, which at about 4 TB/s pays for that only from some 64 MiB on. Below it the eager
chains run, so that a model at small batch is not bound by host time."""

_COMPILED: dict = {}


def _call_kind(arg):
    """What a compiled kernel specialises on in an argument (beyond sizes, which are dynamic)."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.is_inference(), tuple(size == 1 for size in arg.shape), arg.is_contiguous()
    return arg


def _compiled(kernel: Callable, args: tuple) -> Callable | None:
    """The fused (``torch.compile``d) copy of ``kernel`` for these arguments: on CUDA, for an activation
    (the first argument) of at least FUSE_MIN_BYTES; None where the plain kernel runs, and always while an
    enclosing ``torch.compile`` traces (it fuses the plain kernel itself).

    Compiled lazily with dynamic shapes, so layers of every size share a copy. Each kind of call (dtypes,
    inference tensors, which sizes are 1: linear rows, conv windows, depthwise groups; contiguity) gets its
    own copy of the function, hence its own code object: dynamo keeps only a few specialisations per code
    object. Arguments are passed detached (the kernels run inside autograd functions): no grad guards.
    """
    first = args[0]
    if not (FUSE_ON_CUDA and first.is_cuda) or torch.compiler.is_compiling():
        return None
    if first.numel() * first.element_size() < FUSE_MIN_BYTES:
        return None
    key = (kernel, *(_call_kind(arg) for arg in args))
    compiled = _COMPILED.get(key)
    if compiled is None:
        code = kernel.__code__.replace()  # a fresh code object: its own dynamo cache
        copy = types.FunctionType(code, kernel.__globals__, kernel.__name__, kernel.__defaults__, kernel.__closure__)
        compiled = _COMPILED[key] = torch.compile(copy, dynamic=True)
    return compiled


def _launch(kernel: Callable, *args):
    """Run ``kernel`` fused where that pays (see ``_compiled``), plainly elsewhere."""
    compiled = _compiled(kernel, args)
    if compiled is None:
        return kernel(*args)
    return compiled(*(arg.detach() if isinstance(arg, torch.Tensor) else arg for arg in args))


Window = tuple
"""A convolution's (groups, kernel_size, stride, padding, dilation), with the padding as numbers."""


def _norm_sq(x: torch.Tensor, window: Window | None) -> torch.Tensor:
    """``||x||^2`` of every row of ``x`` (``window`` None: (..., 1)) or of every receptive field of a
    convolution per group ((N, groups, H_out, W_out)), float32 (float64 for float64 input).

    The window sums are a convolution of the per-group sum of squares with a kernel of ones (same stride,
    padding and dilation), so grouped, depthwise, strided and dilated convolutions are exact.
    """
    if window is None:
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        return torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=dtype).square_()
    groups, kernel_size, stride, padding, dilation = window
    squares = _wide(x).square()
    if squares.shape[1] != groups:
        squares = squares.unflatten(1, (groups, -1)).sum(dim=2)
    ones = torch.ones((groups, 1, *kernel_size), device=x.device, dtype=squares.dtype)
    with torch.autocast(x.device.type, enabled=False):
        return F.conv2d(squares, ones, None, stride, padding, dilation, groups)


def _norm_input_grad(x: torch.Tensor, coef: torch.Tensor, window: Window | None) -> torch.Tensor:
    """The gradient to ``x`` through ``n = sqrt(||x||^2 + eps)``, given ``coef = dL/dn / n`` per row or
    window: ``coef * x`` for rows; for windows the transposed convolution of ``coef`` with the ones kernel,
    times ``x`` (``d||x||^2/dx = 2x`` and ``dn/d||x||^2 = 1/(2n)``)."""
    if window is None:
        return x * coef.to(x.dtype)
    groups, kernel_size, stride, padding, dilation = window
    ones = torch.ones((groups, 1, *kernel_size), device=x.device, dtype=coef.dtype)
    with torch.autocast(x.device.type, enabled=False):
        per_group = torch.nn.grad.conv2d_input(
            (x.shape[0], groups, *x.shape[2:]), ones, coef, stride, padding, dilation, groups
        )
    return (x.unflatten(1, (groups, -1)) * per_group.unsqueeze(2).to(x.dtype)).flatten(1, 2)


def _scaled(
    out: torch.Tensor, x: torch.Tensor, window: Window | None, b: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """The forward of the B-cos factor: ``y``, the norm (A, 1, B) and the shape of the per-row/window norms."""
    norm_sq = _norm_sq(x, window)
    norm = _norm(norm_sq.reshape(out.shape[0], 1, out.shape[2]))
    y = _launch(_scale2_forward, out, norm) if b == 2 else _launch(_scale_forward, out, norm, b)
    return y, norm, norm_sq.shape


class _BcosScale(torch.autograd.Function):
    """``y = out * |cos|^(B-1)``, ``cos = out / sqrt(||x||^2 + eps)``, for a layer's output ``out`` (A, C, B)
    and its input ``x``; one autograd node per layer, with a closed-form backward to ``out`` and ``x``.

    Saves ``y`` (B = 2) or ``out``, the float32 norms and ``x``, which the matrix product saves anyway.
    With ``detached`` (explanation mode) the factor is a constant: ``x`` gets no gradient from it.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, x: torch.Tensor, window: Window | None, b: float, detached: bool):
        y, norm, norm_shape = _scaled(out, x, window, b)
        ctx.save_for_backward(y if b == 2 else out, norm, None if detached else x)
        ctx.window, ctx.b, ctx.detached, ctx.norm_shape = window, b, detached, norm_shape
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved, norm, x = ctx.saved_tensors
        b = ctx.b
        if ctx.detached:
            if b == 2:
                return _launch(_scale2_backward_detached, grad, saved, norm), None, None, None, None
            return _launch(_scale_backward_detached, grad, saved, norm, b), None, None, None, None
        if b == 2:
            grad_out, coef = _launch(_scale2_backward, grad, saved, norm)
        else:
            grad_out, coef = _launch(_scale_backward, grad, saved, norm, b)
        grad_x = _norm_input_grad(x, coef.reshape(ctx.norm_shape), ctx.window) if ctx.needs_input_grad[1] else None
        return grad_out, grad_x, None, None, None


def bcos_scale(out: torch.Tensor, x: torch.Tensor, window: Window | None, b: float, detached: bool) -> torch.Tensor:
    """Apply the B-cos factor ``|cos|^(B-1)`` to a layer's output.

    ``out`` is ``w^T x`` (raw or unit-norm weights) viewed as (A, C, B): C output units share one input
    norm, the norm of a row of ``x`` (``window`` None; B = 1) or of a receptive field of a convolution
    group (``window``, see ``_norm_sq``). The result has ``out``'s dtype and shape. ``detached``: explanation
    mode, the factor is a constant.
    """
    if torch.is_grad_enabled():
        return _BcosScale.apply(out, x, window, b, detached)
    return _scaled(out, x, window, b)[0]


def _unit_rows(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` with every output unit (row of a linear weight, filter of a convolution) of norm 1."""
    norms = weight.float().flatten(1).norm(dim=1).clamp_min(1e-12).to(weight.dtype)
    return weight / norms.view(-1, *[1] * (weight.ndim - 1))


def _validate_b(b: float) -> float:
    b = float(b)
    if not b >= 1:
        raise ValueError(f"B must be a number >= 1 (1 is a plain linear layer, 2 the usual B-cos choice); got {b}.")
    return b


class BcosLinear(nn.Linear, ExplainableMixin):
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
        self.b = _validate_b(b)
        self.normalize_weights = normalize_weights

    @classmethod
    def from_module(cls, linear: nn.Linear, b: float, keep_bias: bool, normalize_weights: bool = False) -> BcosLinear:
        """Wrap an existing linear layer, sharing its parameters (no copy, no allocation)."""
        with torch.device("meta"):
            layer = cls(linear.in_features, linear.out_features, bias=False, b=b, normalize_weights=normalize_weights)
        layer.weight = linear.weight
        layer.bias = linear.bias if keep_bias else None
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = _unit_rows(self.weight) if self.normalize_weights else self.weight
        if self.b == 1:
            return F.linear(x, weight, self.bias)
        x = _autocast_input(x)
        out = F.linear(x, weight, self.bias)
        return bcos_scale(out.view(-1, out.shape[-1], 1), x, None, self.b, self.explaining).view(out.shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, b={self.b:g}, normalize_weights={self.normalize_weights}"


class BcosConv2d(nn.Conv2d, ExplainableMixin):
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
        self.b = _validate_b(b)
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
        if self.b == 1:
            return self._conv_forward(x, weight, self.bias)
        x = _autocast_input(x)
        out = self._conv_forward(x, weight, self.bias)
        batch, channels, height, width = out.shape
        grouped = out.reshape(batch * self.groups, channels // self.groups, height * width)
        return bcos_scale(grouped, x, self._window, self.b, self.explaining).reshape(out.shape)

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


def _layer_norm_input_grad(
    grad: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor, dims: tuple[int, ...]
) -> torch.Tensor:
    """The input gradient of ``(x - mean(x)) * rstd * weight`` with ``rstd`` a constant."""
    scaled = _wide(grad) if weight is None else _wide(grad) * weight
    return (scaled - scaled.mean(dim=dims, keepdim=True)).mul_(rstd)


class _LayerNormDetachedVariance(torch.autograd.Function):
    """LayerNorm in explanation mode: the values of one fused layer-norm kernel (float32), and a backward in
    which the variance is a constant, so only the mean subtraction and the affine map carry gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, normalized_shape: tuple[int, ...], eps: float) -> torch.Tensor:
        weight_wide = None if weight is None else _wide(weight)
        bias_wide = None if bias is None else _wide(bias)
        with torch.autocast(x.device.type, enabled=False):
            out, mean, rstd = torch.native_layer_norm(_wide(x), normalized_shape, weight_wide, bias_wide, eps)
        ctx.save_for_backward(x, weight, mean, rstd)
        ctx.dims = tuple(range(-len(normalized_shape), 0))
        ctx.bias_dtype = None if bias is None else bias.dtype
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, mean, rstd = ctx.saved_tensors
        leading = tuple(range(grad.ndim - len(ctx.dims)))
        grad_x = grad_weight = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = _launch(_layer_norm_input_grad, grad, weight, rstd, ctx.dims).to(x.dtype)
        if ctx.needs_input_grad[1]:
            normalised = (_wide(x) - mean).mul_(rstd)
            grad_weight = (_wide(grad) * normalised).sum(dim=leading).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = _wide(grad).sum(dim=leading).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, None, None


class BcosLayerNorm(nn.LayerNorm, ExplainableMixin):
    """LayerNorm whose variance is detached in explanation mode (the mean subtraction is linear and stays).

    ``channels_first`` normalises dim 1 of an (N, C, H, W) tensor, as ConvNeXt's stem and downsampling do.
    """

    def __init__(self, *args, channels_first: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.channels_first = channels_first

    @classmethod
    def from_module(cls, norm: nn.LayerNorm, keep_bias: bool, channels_first: bool = False) -> BcosLayerNorm:
        with torch.device("meta"):
            layer = cls(
                norm.normalized_shape,
                eps=norm.eps,
                elementwise_affine=norm.elementwise_affine,
                bias=False,
                channels_first=channels_first,
            )
        layer.weight = norm.weight
        layer.bias = norm.bias if keep_bias else None
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_first:
            x = x.permute(0, 2, 3, 1)
        if self.explaining:
            out = _LayerNormDetachedVariance.apply(x, self.weight, self.bias, tuple(self.normalized_shape), self.eps)
        else:
            out = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return out.permute(0, 3, 1, 2) if self.channels_first else out


class BcosGroupNorm(nn.GroupNorm, ExplainableMixin):
    """GroupNorm whose variance is detached in explanation mode."""

    @classmethod
    def from_module(cls, norm: nn.GroupNorm, keep_bias: bool) -> BcosGroupNorm:
        with torch.device("meta"):
            layer = cls(norm.num_groups, norm.num_channels, eps=norm.eps, affine=norm.affine)
        layer.weight = norm.weight
        layer.bias = norm.bias if keep_bias else None
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.explaining:
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        grouped = x.float().unflatten(1, (self.num_groups, -1))
        dims = tuple(range(2, grouped.ndim))
        centred = grouped - grouped.mean(dim=dims, keepdim=True)
        std = (centred.square().mean(dim=dims, keepdim=True) + self.eps).sqrt()
        out = (centred / std.detach()).flatten(1, 2)
        affine_shape = (1, -1) + (1,) * (x.ndim - 2)
        if self.weight is not None:
            out = out * self.weight.view(affine_shape)
        if self.bias is not None:
            out = out + self.bias.view(affine_shape)
        return out.to(x.dtype)


class UncentredBatchNorm2d(nn.Module, ExplainableMixin):
    """BatchNorm that divides by the standard deviation without subtracting the mean.

    Subtracting a batch mean is not a function of one image alone, and a running mean is a constant offset;
    both break dynamic linearity. At conversion the running mean is folded into the bias,
    ``beta' = beta - gamma * mu / sqrt(var + eps)``, which is exact in eval mode. In training mode the
    divisor is the batch standard deviation and the running variance is updated as BatchNorm does.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(num_features, **factory))
        self.bias = nn.Parameter(torch.zeros(num_features, **factory)) if bias else None
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    @classmethod
    def from_module(cls, norm: nn.BatchNorm2d, keep_bias: bool) -> UncentredBatchNorm2d:
        """Take over a BatchNorm2d, folding its running mean into the bias."""
        if not (norm.affine and norm.track_running_stats):
            raise NotImplementedError(
                "Only affine BatchNorm2d with running statistics can be made uncentred "
                f"(got affine={norm.affine}, track_running_stats={norm.track_running_stats})."
            )
        with torch.device("meta"):
            layer = cls(norm.num_features, eps=norm.eps, momentum=norm.momentum, bias=False)
        layer.weight = norm.weight
        layer.running_var = norm.running_var
        layer.num_batches_tracked = norm.num_batches_tracked
        if keep_bias:
            with torch.no_grad():
                folded = norm.bias - norm.weight * norm.running_mean / (norm.running_var + norm.eps).sqrt()
            layer.bias = nn.Parameter(folded, requires_grad=norm.bias.requires_grad)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            var = x.float().var(dim=(0, 2, 3), unbiased=False)
            with torch.no_grad():
                n = x.numel() / x.shape[1]
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.running_var.mul_(1 - momentum).add_(var * (n / max(n - 1, 1)) * momentum)
                self.num_batches_tracked.add_(1)
        else:
            var = self.running_var.float()
        inv_std = (var + self.eps).rsqrt()
        if self.explaining:
            inv_std = inv_std.detach()
        scale = (self.weight.float() * inv_std).to(x.dtype)
        out = x * scale[None, :, None, None]
        if self.bias is not None:
            out = out + self.bias.to(x.dtype)[None, :, None, None]
        return out

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, bias={self.bias is not None}"


def _gelu_gate(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _gelu_tanh_gate(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _ratio_gate(fn):
    """Gate ``fn(x) / x`` for activations through the origin, with its limit ``fn'(0)`` at 0."""

    def gate(x: torch.Tensor) -> torch.Tensor:
        safe = torch.where(x == 0, torch.ones_like(x), x)
        return torch.where(x == 0, torch.ones_like(x), fn(safe) / safe)

    return gate


ACTIVATION_GATES = {
    "gelu": _gelu_gate,
    "gelu_tanh": _gelu_tanh_gate,
    "quick_gelu": lambda x: torch.sigmoid(1.702 * x),
    "silu": lambda x: torch.sigmoid(x),
    "relu": lambda x: (x > 0).to(x.dtype),
    "relu6": lambda x: torch.where(x > 0, F.relu6(x) / x.clamp_min(1e-12), torch.zeros_like(x)),
    "tanh": _ratio_gate(torch.tanh),
}
"""Each supported activation written as ``x * gate(x)``: in explanation mode the gate is detached."""


class DetachableActivation(nn.Module, ExplainableMixin):
    """Wraps an activation ``f(x) = x * gate(x)``; explanation mode detaches the gate.

    Outside explanation mode the original activation module runs unchanged, so equivalence is exact.
    """

    def __init__(self, activation: nn.Module, gate: str) -> None:
        super().__init__()
        if gate not in ACTIVATION_GATES:
            raise ValueError(f"Unknown activation gate {gate!r}; known: {sorted(ACTIVATION_GATES)}.")
        self.activation = activation
        self.gate = gate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.explaining:
            return self.activation(x)
        return x * _launch(ACTIVATION_GATES[self.gate], x.detach())

    def extra_repr(self) -> str:
        return f"gate={self.gate!r}"


class LogitLayer(nn.Module):
    """Final affine map of the logits: ``logits / temperature + logit_bias``.

    The B-cosification recipe uses ``logit_bias = -log(C - 1)`` so that an untrained model starts at
    sigmoid(logit) = 1/C for every class under the BCE loss; both values come from the config, not weights.
    """

    def __init__(self, logit_bias: float = 0.0, temperature: float = 1.0) -> None:
        super().__init__()
        if not temperature > 0:
            raise ValueError(f"logit_temperature must be positive; got {temperature}.")
        self.logit_bias = float(logit_bias)
        self.temperature = float(temperature)

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        if self.temperature != 1.0:
            logits = logits / self.temperature
        return logits + self.logit_bias if self.logit_bias else logits

    def extra_repr(self) -> str:
        return f"logit_bias={self.logit_bias:g}, temperature={self.temperature:g}"


@contextmanager
def explanation_mode(model: nn.Module, enabled: bool = True) -> Iterator[nn.Module]:
    """Put every B-cos module of ``model`` in explanation mode (or out of it) and restore the previous state.

    Inside, the gradient of an output with respect to the input is the dynamic linear map ``W(x)``::

        with explanation_mode(model):
            pixel_values.requires_grad_(True)
            model(pixel_values).logits[0, c].backward()
    """
    modules = [module for module in model.modules() if isinstance(module, ExplainableMixin)]
    previous = [module.explaining for module in modules]
    # ``explaining`` is a plain attribute: set it past nn.Module.__setattr__, which costs more than the
    # layers' own work in an explanation of a small batch.
    for module in modules:
        object.__setattr__(module, "explaining", enabled)
    try:
        yield model
    finally:
        for module, state in zip(modules, previous, strict=True):
            object.__setattr__(module, "explaining", state)
