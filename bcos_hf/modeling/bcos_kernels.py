"""The arithmetic under the B-cos layers: the B-cos factor ``|cos|^(B-1)`` as one autograd node per layer with a
closed-form backward, the detached-variance LayerNorm, and the optional fusion of their elementwise kernels
on CUDA.

The layers (``bcos_layers``, ``bcos_norms``, ``bcos_activations``) call ``bcos_scale``, ``launch`` and
``LayerNormDetachedVariance``; benchmarks and tests reach the kernels by their public names here and change
the fusion settings only through ``fusion(...)``.

Part of the remote-loadable model code: imports only torch, with single dots.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

NORM_EPS = 1e-6
"""Added to the squared input norm before the square root: a black patch keeps a finite scale."""

SCALE_EPS = 1e-6
"""Added to ``|cos|`` before raising it to ``B - 1`` for B != 2, as the reference implementation does."""


def autocast_input(x: torch.Tensor) -> torch.Tensor:
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
# broadcast over the C output units that share it (depthwise convolutions: (N, C, H*W) for out and norm alike,
# one norm per unit, a view of the output in any memory format). Norms, squares and reductions are float32; the B = 2 kernels are chains of
# in-place operations on one fresh tensor of the activation dtype (the cosine is formed before the
# product, so float16 does not overflow): three passes over the activation in the forward, four in the
# backward. On CUDA, tensors of ``FUSION.min_bytes`` and more run them as one fused kernel (``launch``).


def wide(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` in float32, or float64 if it is float64 (gradient checks)."""
    return tensor if tensor.dtype == torch.float64 else tensor.float()


def _norm(norm_sq: torch.Tensor) -> torch.Tensor:
    """``n = sqrt(||x||^2 + eps)``, in place: ``norm_sq`` is always a fresh tensor here."""
    return norm_sq.add_(NORM_EPS).sqrt_()


def _sum_of_products(a: torch.Tensor, b: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``(a * b)`` summed over the output units that share a norm (dim 1, unless ``norm`` has one per unit, as
    depthwise windows do), accumulated in float32 (float64 for float64 input).

    For linear layers (B = 1) on CUDA, eagerly, one batched dot product; elsewhere the product in the inputs'
    dtype and a float32 sum, which on the CPU is some 3x faster than ``bmm`` of 1 x C by C x 1 matrices."""
    if norm.shape[1] == a.shape[1]:  # one unit per norm: nothing to sum
        return wide(a * b)
    if a.is_cuda and a.shape[2] == 1 and not torch.compiler.is_compiling():
        return wide(torch.bmm(a.transpose(1, 2), b))
    return (a * b).sum(dim=1, keepdim=True, dtype=torch.float64 if a.dtype == torch.float64 else torch.float32)


def _per_unit(norm: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``norm`` for the elementwise work on ``like``: in ``like``'s dtype where one norm is shared by several
    output units (broadcast), since CPU kernels that both broadcast and mix dtypes run an unvectorised loop
    (some 20x slower in bf16); a norm per unit (depthwise windows) stays float32 (no broadcast, no extra pass)."""
    if norm.shape[1] == like.shape[1]:
        return norm
    return norm.to(like.dtype)


def scale2_forward(out: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    return out.abs().div_(_per_unit(norm, out)).mul_(out)


def scale2_backward(grad: torch.Tensor, y: torch.Tensor, norm: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """B = 2 from the saved output: ``|out| / n = sqrt(|y| / n)``, so ``dy/dout = 2|out|/n`` and
    ``dy/dn = -y / n`` need only ``y`` (which the next layer saves anyway) and the norm. Returns the
    gradient to ``out`` and ``dL/dn / n`` per row or window (what the input gradient of the norm needs)."""
    grad_out = y.abs().div_(_per_unit(norm * 0.25, y)).sqrt_().mul_(grad)
    return grad_out, _sum_of_products(grad, y, norm).div_(norm.square()).neg_()


def scale2_backward_detached(grad: torch.Tensor, y: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """Explanation mode, B = 2: ``y = s * out`` with the constant ``s = |out| / n``, so ``dy/dout = s``."""
    return y.abs().div_(_per_unit(norm, y)).sqrt_().mul_(grad)


def scale_forward(out: torch.Tensor, norm: torch.Tensor, b: float | torch.Tensor) -> torch.Tensor:
    out_wide = wide(out)
    return (out_wide * (out_wide.abs() / norm + SCALE_EPS).pow(b - 1)).to(out.dtype)


def scale_backward(
    grad: torch.Tensor, out: torch.Tensor, norm: torch.Tensor, b: float | torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """General B: with ``c = |out| / n`` and ``s = (c + eps)^(B-1)``, ``dy/dout = s + c s'(c)`` and
    ``dy/dn = -out c s'(c) / n``, where ``s'(c) = (B-1)(c + eps)^(B-2)``."""
    grad_wide, out_wide = wide(grad), wide(out)
    cos = out_wide.abs() / norm
    slope = (b - 1) * (cos + SCALE_EPS).pow(b - 2) * cos
    grad_out = grad_wide * ((cos + SCALE_EPS).pow(b - 1) + slope)
    return grad_out.to(grad.dtype), -_sum_of_products(grad_wide * out_wide, slope, norm) / norm.square()


def scale_backward_detached(
    grad: torch.Tensor, out: torch.Tensor, norm: torch.Tensor, b: float | torch.Tensor
) -> torch.Tensor:
    return (wide(grad) * (wide(out).abs() / norm + SCALE_EPS).pow(b - 1)).to(grad.dtype)


@dataclass
class FusionSettings:
    """When the elementwise kernels run as fused ``torch.compile``d kernels (change with ``fusion(...)``).

    Attributes:
        on_cuda: fuse on CUDA at all (False: the eager chains always run).
        min_bytes: smallest activation worth a fused kernel. A compiled call costs about 100 µs of host time
            (measured through the CPU backend) against about 10 µs per eager operation; the fused kernel saves
            two passes over the tensor, which at about 4 TB/s pays for that only from some 64 MiB on. Below it
            the eager chains run, so that a model at small batch is not bound by host time.
    """

    on_cuda: bool = True
    min_bytes: int = 2**26


FUSION = FusionSettings()
"""The settings in force; read at every call."""


@contextmanager
def fusion(on_cuda: bool | None = None, min_bytes: int | None = None) -> Iterator[FusionSettings]:
    """Change the fusion settings inside a ``with`` block (benchmarks, tests); restored on exit."""
    saved = replace(FUSION)
    FUSION.on_cuda = FUSION.on_cuda if on_cuda is None else on_cuda
    FUSION.min_bytes = FUSION.min_bytes if min_bytes is None else min_bytes
    try:
        yield FUSION
    finally:
        FUSION.on_cuda, FUSION.min_bytes = saved.on_cuda, saved.min_bytes


_COMPILED: dict = {}


def _call_kind(arg):
    """What a compiled kernel specialises on in an argument (beyond sizes, which are dynamic)."""
    if isinstance(arg, torch.Tensor):
        return arg.dtype, arg.is_inference(), tuple(size == 1 for size in arg.shape), arg.is_contiguous()
    return arg


def compiled_kernel(kernel: Callable, args: tuple) -> Callable | None:
    """The fused (``torch.compile``d) copy of ``kernel`` for these arguments: on CUDA, for an activation
    (the first argument) of at least ``FUSION.min_bytes``; None where the plain kernel runs, and always while an
    enclosing ``torch.compile`` traces (it fuses the plain kernel itself).

    Compiled lazily with dynamic shapes, so layers of every size share a copy. Each kind of call (dtypes,
    inference tensors, which sizes are 1: linear rows, conv windows, depthwise groups; contiguity) gets its
    own copy of the function, hence its own code object: dynamo keeps only a few specialisations per code
    object. Arguments are passed detached (the kernels run inside autograd functions): no grad guards.
    """
    first = args[0]
    if not (FUSION.on_cuda and first.is_cuda) or torch.compiler.is_compiling():
        return None
    if first.numel() * first.element_size() < FUSION.min_bytes:
        return None
    key = (kernel, *(_call_kind(arg) for arg in args))
    compiled = _COMPILED.get(key)
    if compiled is None:
        code = kernel.__code__.replace()  # a fresh code object: its own dynamo cache
        copy = types.FunctionType(code, kernel.__globals__, kernel.__name__, kernel.__defaults__, kernel.__closure__)
        compiled = _COMPILED[key] = torch.compile(copy, dynamic=True)
    return compiled


def launch(kernel: Callable, *args):
    """Run ``kernel`` fused where that pays (see ``compiled_kernel``), plainly elsewhere."""
    compiled = compiled_kernel(kernel, args)
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
    squares = wide(x).square()
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
    if groups == x.shape[1]:  # depthwise
        return x * per_group.to(x.dtype)
    return (x.unflatten(1, (groups, -1)) * per_group.unsqueeze(2).to(x.dtype)).flatten(1, 2)


Exponent = float | torch.Tensor
"""B as the kernels take it: a number, or a 0-dim tensor (what a layer passes for B != 2, so that a compiled
model does not specialise on its value; see ``bcos_layers.BExponent``). Only the number 2 takes the B = 2 path."""


def _is_two(b: Exponent) -> bool:
    return not isinstance(b, torch.Tensor) and b == 2


def _scaled(
    out: torch.Tensor, x: torch.Tensor, window: Window | None, b: Exponent
) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """The forward of the B-cos factor: ``y``, the norm (A, 1, B) and the shape of the per-row/window norms."""
    norm_sq = _norm_sq(x, window)
    norm = _norm(norm_sq.reshape(out.shape[0], -1, out.shape[2]))
    y = launch(scale2_forward, out, norm) if _is_two(b) else launch(scale_forward, out, norm, b)
    return y, norm, norm_sq.shape


class _BcosScale(torch.autograd.Function):
    """``y = out * |cos|^(B-1)``, ``cos = out / sqrt(||x||^2 + eps)``, for a layer's output ``out`` (A, C, B)
    and its input ``x``; one autograd node per layer, with a closed-form backward to ``out`` and ``x``.

    Saves ``y`` (B = 2) or ``out``, the float32 norms and ``x``, which the matrix product saves anyway.
    With ``detached`` (explanation mode) the factor is a constant: ``x`` gets no gradient from it.
    """

    @staticmethod
    def forward(ctx, out: torch.Tensor, x: torch.Tensor, window: Window | None, b: Exponent, detached: bool):
        y, norm, norm_shape = _scaled(out, x, window, b)
        two, tensor_b = _is_two(b), isinstance(b, torch.Tensor)
        ctx.save_for_backward(y if two else out, norm, None if detached else x, b if tensor_b else None)
        ctx.window, ctx.two, ctx.detached, ctx.norm_shape = window, two, detached, norm_shape
        ctx.number_b = None if tensor_b else b
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        saved, norm, x, b = ctx.saved_tensors
        b = ctx.number_b if b is None else b
        if ctx.detached:
            if ctx.two:
                return launch(scale2_backward_detached, grad, saved, norm), None, None, None, None
            return launch(scale_backward_detached, grad, saved, norm, b), None, None, None, None
        if ctx.two:
            grad_out, coef = launch(scale2_backward, grad, saved, norm)
        else:
            grad_out, coef = launch(scale_backward, grad, saved, norm, b)
        grad_x = _norm_input_grad(x, coef.reshape(ctx.norm_shape), ctx.window) if ctx.needs_input_grad[1] else None
        return grad_out, grad_x, None, None, None


def bcos_scale(out: torch.Tensor, x: torch.Tensor, window: Window | None, b: Exponent, detached: bool) -> torch.Tensor:
    """Apply the B-cos factor ``|cos|^(B-1)`` to a layer's output.

    ``out`` is ``w^T x`` (raw or unit-norm weights) viewed as (A, C, B): C output units share one input
    norm, the norm of a row of ``x`` (``window`` None; B = 1) or of a receptive field of a convolution
    group (``window``, see ``_norm_sq``); a depthwise convolution's output may come as (N, C, H*W), one norm
    per unit. The result has ``out``'s dtype and shape. ``detached``: explanation
    mode, the factor is a constant.
    """
    if torch.is_grad_enabled():
        return _BcosScale.apply(out, x, window, b, detached)
    return _scaled(out, x, window, b)[0]


def layer_norm_input_grad(
    grad: torch.Tensor, weight: torch.Tensor | None, rstd: torch.Tensor, dims: tuple[int, ...]
) -> torch.Tensor:
    """The input gradient of ``(x - mean(x)) * rstd * weight`` with ``rstd`` a constant."""
    scaled = wide(grad) if weight is None else wide(grad) * weight
    return (scaled - scaled.mean(dim=dims, keepdim=True)).mul_(rstd)


class LayerNormDetachedVariance(torch.autograd.Function):
    """LayerNorm in explanation mode: the values of one fused layer-norm kernel (float32), and a backward in
    which the variance is a constant, so only the mean subtraction and the affine map carry gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, normalized_shape: tuple[int, ...], eps: float) -> torch.Tensor:
        weight_wide = None if weight is None else wide(weight)
        bias_wide = None if bias is None else wide(bias)
        with torch.autocast(x.device.type, enabled=False):
            out, mean, rstd = torch.native_layer_norm(wide(x), normalized_shape, weight_wide, bias_wide, eps)
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
            grad_x = launch(layer_norm_input_grad, grad, weight, rstd, ctx.dims).to(x.dtype)
        if ctx.needs_input_grad[1]:
            normalised = (wide(x) - mean).mul_(rstd)
            grad_weight = (wide(grad) * normalised).sum(dim=leading).to(weight.dtype)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            grad_bias = wide(grad).sum(dim=leading).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, None, None
