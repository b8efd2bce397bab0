"""The fast B-cos path against the plain formulas: gradients (float64 gradcheck), explanation-mode gradients,
fused kernels against their PyTorch fallback, saved activations, and whole-model torch.compile(fullgraph=True)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bcos_hf import BcosConv2d, BcosLayerNorm, BcosLinear
from bcos_hf.convert import convert
from bcos_hf.modeling import bcos_activations, bcos_kernels
from bcos_hf.modeling.bcos_kernels import NORM_EPS, SCALE_EPS, bcos_scale

from .families import FAMILIES, IMAGE_MEAN, IMAGE_STD

torch.manual_seed(0)

CONV_SHAPES = [
    dict(in_channels=4, out_channels=6, kernel_size=3, padding=1),
    dict(in_channels=4, out_channels=4, kernel_size=3, stride=2, padding=1, groups=2),
    dict(in_channels=4, out_channels=8, kernel_size=3, padding=2, dilation=2, groups=4),  # depthwise, multiplier 2
    dict(in_channels=4, out_channels=4, kernel_size=3, padding=1, groups=4),  # depthwise (ConvNeXt's): norm per unit
]


def plain_scale(out: torch.Tensor, norm_sq: torch.Tensor, b: float, detach: bool) -> torch.Tensor:
    """The B-cos factor written as plain autograd ops: ``out * |out / n|^(B-1)`` (Böhle et al., CVPR 2022)."""
    cos = out.abs() / (norm_sq + NORM_EPS).sqrt()
    scale = cos if b == 2 else (cos + SCALE_EPS).pow(b - 1)
    return out * (scale.detach() if detach else scale)


def plain_linear(layer: BcosLinear, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    out = F.linear(x, weight)
    return out if layer.b == 1 else plain_scale(out, x.square().sum(-1, keepdim=True), layer.b, layer.explaining)


def plain_conv(layer: BcosConv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    out = F.conv2d(x, weight, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    if layer.b == 1:
        return out
    squares = x.square().unflatten(1, (layer.groups, -1)).sum(2)
    ones = torch.ones(layer.groups, 1, *layer.kernel_size, dtype=x.dtype)
    norm_sq = F.conv2d(squares, ones, None, layer.stride, layer.padding, layer.dilation, layer.groups)
    grouped = plain_scale(out.unflatten(1, (layer.groups, -1)), norm_sq.unsqueeze(2), layer.b, layer.explaining)
    return grouped.flatten(1, 2)


def fast(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.func.functional_call(layer, {"weight": weight}, (x,))


LAYER_CASES = [
    case
    for b in (1.0, 2.0, 2.5)
    for case in [
        pytest.param(BcosLinear(5, 4, b=b), (2, 3, 5), plain_linear, id=f"linear-b{b:g}"),
        *(
            pytest.param(BcosConv2d(**kwargs, b=b), (1, kwargs["in_channels"], 5, 4), plain_conv, id=f"conv{i}-b{b:g}")
            for i, kwargs in enumerate(CONV_SHAPES)
        ),
    ]
]


@pytest.mark.parametrize(("layer", "shape", "plain"), LAYER_CASES)
@pytest.mark.parametrize("explaining", [False, True], ids=["train", "explain"])
def test_fast_path_gradients_equal_the_plain_formula(layer, shape, plain, explaining):
    """Outputs and gradients (input and weight) of the fast path equal the plain formula's, in float64."""
    layer = layer.double()
    layer.explaining = explaining
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    weight = layer.weight.detach().clone().requires_grad_(True)
    expected = plain(layer, x, weight)
    actual = fast(layer, x, weight)
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)
    upstream = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (x, weight), upstream)
    actual_grads = torch.autograd.grad(actual, (x, weight), upstream)
    for got, want in zip(actual_grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    if not explaining and layer.b != 1:  # explanation mode's gradient is W(x) by design, not the derivative
        assert torch.autograd.gradcheck(lambda x, w: fast(layer, x, w), (x, weight), fast_mode=True)


@pytest.mark.parametrize("explaining", [False, True], ids=["train", "explain"])
def test_depthwise_conv_gives_the_same_values_and_gradients_in_channels_last(explaining):
    """ConvNeXt feeds its depthwise convolutions channels-last tensors (a permuted residual stream): the output,
    viewed per unit without a copy, and every gradient are those of the contiguous input."""
    layer = BcosConv2d(6, 6, 7, padding=3, groups=6, b=2.0).double()
    layer.explaining = explaining
    x = torch.randn(2, 6, 9, 9, dtype=torch.float64)
    results = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        inputs = x.clone(memory_format=memory_format).requires_grad_(True)
        layer.zero_grad(set_to_none=True)
        out = layer(inputs)
        out.backward(torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out))
        results.append((out, inputs.grad, layer.weight.grad))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


WINDOWS = {"rows": None, "grouped-windows": (2, (3, 3), (2, 1), (1, 1), (1, 2))}


@pytest.mark.parametrize("b", [2.0, 2.5])
@pytest.mark.parametrize("window", WINDOWS.values(), ids=WINDOWS.keys())
def test_scale_function_gradcheck(b, window):
    """The autograd function alone, ``out`` and ``x`` independent: closed-form gradients to both, and in
    explanation mode the constant factor ``s = y / out`` as the gradient to ``out`` and none to ``x``."""
    if window is None:
        x, out = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 4, 1, dtype=torch.float64)
    else:
        x, out = torch.randn(1, 4, 5, 4, dtype=torch.float64), torch.randn(2, 3, 6, dtype=torch.float64)
    x.requires_grad_(True)
    out.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda o, x: bcos_scale(o, x, window, b, False), (out, x), fast_mode=True)
    y = bcos_scale(out, x, window, b, True)
    grad_out, grad_x = torch.autograd.grad(y.sum(), (out, x), allow_unused=True)
    torch.testing.assert_close(grad_out, (y / out).detach())
    assert grad_x is None or not grad_x.any()


def plain_explained_layer_norm(norm: BcosLayerNorm, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm with the standard deviation detached, as plain autograd ops (Böhle et al., CVPR 2022)."""
    x = x.permute(0, 2, 3, 1) if norm.channels_first else x
    centred = x - x.mean(dim=-1, keepdim=True)
    out = centred / (centred.square().mean(dim=-1, keepdim=True) + norm.eps).sqrt().detach() * norm.weight
    out = out + norm.bias if norm.bias is not None else out
    return out.permute(0, 3, 1, 2) if norm.channels_first else out


@pytest.mark.parametrize("channels_first", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_explained_layer_norm_equals_the_plain_formula(channels_first, bias):
    """Explanation-mode LayerNorm: values and gradients (input, weight, bias) of the detached-variance formula."""
    norm = BcosLayerNorm.from_module(nn.LayerNorm(6), keep_bias=bias, channels_first=channels_first).double()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    norm.explaining = True
    x = torch.randn((2, 6, 3, 3) if channels_first else (2, 5, 6), dtype=torch.float64, requires_grad=True)
    expected, actual = plain_explained_layer_norm(norm, x), norm(x)
    torch.testing.assert_close(actual, expected)
    upstream = torch.randn_like(expected)
    inputs = (x, *norm.parameters())
    for got, want in zip(
        torch.autograd.grad(actual, inputs, upstream), torch.autograd.grad(expected, inputs, upstream), strict=True
    ):
        torch.testing.assert_close(got, want)


def _all_kernels(grad, out, y, norm):
    """Every elementwise kernel of the fast path, so that one compilation covers them all."""
    weight = torch.linspace(0.5, 1.5, out.shape[-1])
    return (
        bcos_kernels.layer_norm_input_grad(grad, weight, norm, (-1,)),
        bcos_activations.ACTIVATION_GATES["gelu"](out.float()),  # in bf16, eager rounds every step and inductor once
        bcos_kernels.scale2_forward(out, norm),
        *bcos_kernels.scale2_backward(grad, y, norm),
        bcos_kernels.scale2_backward_detached(grad, y, norm),
        bcos_kernels.scale_forward(out, norm, 2.5),
        *bcos_kernels.scale_backward(grad, out, norm, 2.5),
        bcos_kernels.scale_backward_detached(grad, out, norm, 2.5),
    )


def test_fused_kernels_match_their_pytorch_fallback():
    """The kernels CUDA runs fused (``torch.compile``, here with inductor on the CPU) equal the plain ones,
    on bf16 tensors as under autocast (the fused ones round once, the eager chains once per step: 1e-2);
    the benchmark checks them on CUDA too."""
    dtype = torch.bfloat16
    torch._dynamo.reset()
    fused = torch.compile(_all_kernels, dynamic=True, fullgraph=True)
    grad, out = torch.randn(6, 7, 3, dtype=dtype), torch.randn(6, 7, 3, dtype=dtype)
    norm = torch.rand(6, 1, 3) * 4 + 0.5
    y = bcos_kernels.scale2_forward(out, norm)
    got_all, want_all = fused(grad, out, y, norm), _all_kernels(grad, out, y, norm)
    coef_index = 4  # B = 2's dL/dn / n: eager multiplies in bf16 (exact to 2^-8 of each product), sums in float32
    for index, (got, want) in enumerate(zip(got_all, want_all, strict=True)):
        assert got.dtype == want.dtype
        if index == coef_index:
            bound = 2**-8 * (grad.float() * y.float()).abs().sum(dim=1, keepdim=True) / norm.square()
            assert ((got - want).abs() <= bound + 1e-6).all()
        else:
            torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-5)


def test_fused_path_is_used_only_on_cuda_and_never_inside_compile(monkeypatch):
    out, norm = torch.randn(2, 3, 1), torch.rand(2, 1, 1) + 1
    assert bcos_kernels.compiled_kernel(bcos_kernels.scale2_forward, (out, norm)) is None
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    monkeypatch.setattr(bcos_kernels, "_COMPILED", {})
    assert bcos_kernels.compiled_kernel(bcos_kernels.scale2_forward, (out, norm)) is None  # too small to pay
    with bcos_kernels.fusion(min_bytes=0):
        compiled = bcos_kernels.compiled_kernel(bcos_kernels.scale2_forward, (out, norm))
        assert compiled is not None
        assert bcos_kernels.compiled_kernel(bcos_kernels.scale2_forward, (out * 2, norm)) is compiled  # once per kind
        conv_like = bcos_kernels.compiled_kernel(
            bcos_kernels.scale2_forward, (torch.randn(2, 3, 4), torch.rand(2, 1, 4))
        )
        assert conv_like is not None and conv_like is not compiled  # another kind of call: another copy
        with bcos_kernels.fusion(on_cuda=False):
            assert bcos_kernels.compiled_kernel(bcos_kernels.scale2_forward, (out, norm)) is None
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
        assert bcos_kernels.compiled_kernel(bcos_kernels.scale2_forward, (out, norm)) is None
    assert bcos_kernels.FUSION.min_bytes == 2**26  # restored on exit


def _saved_bytes(module: nn.Module, x: torch.Tensor) -> int:
    parameters = {p.untyped_storage().data_ptr() for p in module.parameters()}
    storages = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in parameters:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        module(x)
    return sum(storages.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bcos_layers_save_only_the_norm_beside_what_the_plain_layers_save(dtype):
    """Linear + GELU and conv + GELU: the B-cos layer adds one float32 norm per row / window, nothing else."""
    autocast = torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32)
    x = torch.randn(4, 10, 16, requires_grad=True)
    plain_linear_layer = nn.Sequential(nn.Linear(16, 32, bias=False), nn.GELU())
    bcos_linear_layer = nn.Sequential(BcosLinear.from_module(plain_linear_layer[0], b=2, keep_bias=False), nn.GELU())
    with autocast:
        extra = _saved_bytes(bcos_linear_layer, x) - _saved_bytes(plain_linear_layer, x)
    assert extra == 4 * 10 * 4  # one float32 norm per row

    images = torch.randn(2, 8, 9, 9, requires_grad=True)
    plain_conv_layer = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False), nn.GELU())
    bcos_conv_layer = nn.Sequential(BcosConv2d.from_module(plain_conv_layer[0], b=2, keep_bias=False), nn.GELU())
    with autocast:
        extra = _saved_bytes(bcos_conv_layer, images) - _saved_bytes(plain_conv_layer, images)
    assert extra == 2 * 2 * 9 * 9 * 4  # one float32 norm per window and group


def test_vit_s_shaped_model_saves_at_most_1_3x_the_original_activations():
    """A 2-layer ViT-S/16 (64 px): what the benchmark measures for the full-size models, at test size."""
    from benchmarks.run import Runner

    source, _ = FAMILIES["vit"](
        hidden_size=384,
        num_hidden_layers=2,
        num_attention_heads=6,
        intermediate_size=1536,
        image_size=64,
        patch_size=16,
    )
    model = convert(source, image_mean=IMAGE_MEAN, image_std=IMAGE_STD).model
    images = torch.rand(2, 3, 64, 64)
    original = Runner(source, images, torch.float32, bcos=False).saved_bytes()
    bcos = Runner(model, images, torch.float32, bcos=True).saved_bytes()
    assert bcos / original <= 1.3, (bcos, original)


@pytest.mark.parametrize("family", ["vit", "convnext", "clip_vision_model-backbone"])
def test_model_forward_compiles_with_fullgraph(family):
    """torch.compile(fullgraph=True) captures the whole training forward (the closed-form autograd functions
    included) without a graph break, and it computes what eager mode computes. Dynamo only (backend
    "eager"), to keep the test fast: the kernels' compilation is covered above."""
    source, processor = FAMILIES[family]()
    model = convert(source, image_processor=processor).model.train()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="eager")
    images = torch.rand(2, 3, 32, 32)
    expected, actual = model(pixel_values=images), compiled(pixel_values=images)
    for name in ("logits", "pooler_output"):
        if getattr(expected, name, None) is not None:
            torch.testing.assert_close(getattr(actual, name), getattr(expected, name), rtol=1e-5, atol=1e-6)
            assert getattr(actual, name).requires_grad
