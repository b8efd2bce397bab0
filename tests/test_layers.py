"""B-cos building blocks against the formulas of the reference (Böhle et al., CVPR 2022), in fp32 and bf16."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import GELUActivation, GELUTanh, QuickGELUActivation

from bcos_hf import (
    BcosConv2d,
    BcosGroupNorm,
    BcosLayerNorm,
    BcosLinear,
    DetachableActivation,
    DetachableLinear,
    UncentredBatchNorm2d,
    explanation_mode,
)

torch.manual_seed(0)


def reference_bcos(x_rows: torch.Tensor, weight: torch.Tensor, b: float) -> torch.Tensor:
    """|cos(x, w_hat)|^(B-1) * w_hat^T x for rows of x, computed from the definition in float64."""
    x_rows, weight = x_rows.double(), weight.double()
    unit = weight / weight.norm(dim=1, keepdim=True)
    linear = x_rows @ unit.T
    cos = linear / (x_rows.square().sum(-1, keepdim=True) + 1e-6).sqrt()
    return cos.abs().pow(b - 1) * linear


@pytest.mark.parametrize("b", [1.0, 2.0, 2.5])
def test_linear_matches_definition(b):
    layer = BcosLinear(7, 5, b=b, normalize_weights=True)
    x = torch.randn(4, 3, 7)
    expected = reference_bcos(x.reshape(-1, 7), layer.weight, b).reshape(4, 3, 5)
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("b", [2.0, 2.5])
def test_raw_weights_scale_by_weight_norm_power_b(b):
    """With raw weights the output is ||w||^B times the unit-norm output (Arya et al., NeurIPS 2024)."""
    raw = BcosLinear(6, 4, b=b)
    unit = BcosLinear(6, 4, b=b, normalize_weights=True)
    unit.weight = raw.weight
    x = torch.randn(10, 6)
    norms = raw.weight.norm(dim=1).pow(b)
    torch.testing.assert_close(raw(x), unit(x) * norms, rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(in_channels=6, out_channels=8, kernel_size=3, padding=1),
        dict(in_channels=6, out_channels=8, kernel_size=3, stride=2, padding=1),
        dict(in_channels=6, out_channels=4, kernel_size=(3, 2), stride=(2, 1), padding=(0, 1), dilation=2),
        dict(in_channels=6, out_channels=6, kernel_size=3, padding=1, groups=2),
        dict(in_channels=6, out_channels=12, kernel_size=7, padding=3, groups=6),  # depthwise, multiplier 2
        dict(in_channels=6, out_channels=16, kernel_size=4, stride=4),  # patch embedding
    ],
)
@pytest.mark.parametrize("b", [1.0, 2.0, 2.5])
def test_conv_matches_definition_per_group_patch(kwargs, b):
    conv = BcosConv2d(**kwargs, b=b, normalize_weights=True)
    x = torch.randn(2, kwargs["in_channels"], 11, 10)
    out = conv(x)
    groups = conv.groups
    patches = F.unfold(x, conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    patches = patches.view(2, groups, -1, patches.shape[-1])  # N, G, Cin/G * k * k, L
    per_group_out = conv.out_channels // groups
    expected = []
    for g in range(groups):
        rows = patches[:, g].transpose(1, 2).reshape(-1, patches.shape[2])
        weight = conv.weight[g * per_group_out : (g + 1) * per_group_out].reshape(per_group_out, -1)
        expected.append(reference_bcos(rows, weight, b).reshape(2, -1, per_group_out))
    expected = torch.cat(expected, dim=2).transpose(1, 2).reshape(out.shape)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


def test_b1_with_bias_is_the_plain_layer():
    linear, conv = nn.Linear(5, 3), nn.Conv2d(6, 4, 3, padding=1, groups=2)
    x_lin, x_conv = torch.randn(2, 5), torch.randn(2, 6, 8, 8)
    expected_lin, expected_conv = linear(x_lin), conv(x_conv)
    assert torch.equal(BcosLinear.from_module(linear, b=1, keep_bias=True)(x_lin), expected_lin)
    assert torch.equal(BcosConv2d.from_module(conv, b=1, keep_bias=True)(x_conv), expected_conv)


def test_from_module_shares_parameters_and_can_drop_bias():
    linear = nn.Linear(5, 3)
    layer = BcosLinear.from_module(linear, b=2, keep_bias=False)
    assert layer.weight is linear.weight and layer.bias is None
    assert "bias" not in layer.state_dict()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_squares_and_norms_in_fp32(dtype):
    layer = BcosLinear(64, 8)
    conv = BcosConv2d(6, 8, 3, padding=1)
    x = torch.randn(4, 64) * 300  # squares overflow fp16
    x_conv = torch.randn(2, 6, 8, 8) * 300
    with torch.autocast("cpu", dtype=dtype):
        out, out_conv = layer(x), conv(x_conv)
    assert out.dtype == dtype and out_conv.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(out_conv).all()
    torch.testing.assert_close(out.float(), layer(x), rtol=3e-2, atol=3e-2 * layer(x).abs().max().item())


def test_bf16_weights_match_fp32_within_bf16_precision():
    layer = BcosLinear(16, 8)
    x = torch.randn(5, 16)
    expected = layer(x)
    out = layer.to(torch.bfloat16)(x.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=5e-2)


def _completeness(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    with explanation_mode(model):
        y = model(x).sum()
        (grad,) = torch.autograd.grad(y, x)
    return y.detach(), (grad * x).sum().detach()


@pytest.mark.parametrize("gate", ["gelu", "gelu_tanh", "quick_gelu", "silu", "tanh", "relu6"])
def test_bias_free_network_is_exactly_dynamic_linear(gate):
    """In explanation mode, W(x) = dy/dx and y = W(x) x (no bias, no constant terms)."""
    activations = {
        "gelu": GELUActivation(),
        "gelu_tanh": GELUTanh(),
        "quick_gelu": QuickGELUActivation(),
        "silu": nn.SiLU(),
        "tanh": nn.Tanh(),
        "relu6": nn.ReLU6(),
    }
    model = nn.Sequential(
        BcosConv2d(6, 8, 3, padding=1),
        UncentredBatchNorm2d(8, bias=False).eval(),
        DetachableActivation(activations[gate], gate),
        BcosConv2d(8, 8, 3, stride=2, padding=1, groups=8),
        BcosGroupNorm.from_module(nn.GroupNorm(2, 8), keep_bias=False),
        nn.Flatten(2),
    )
    head = nn.Sequential(BcosLayerNorm.from_module(nn.LayerNorm(16), keep_bias=False), BcosLinear(16, 3))
    full = nn.Sequential(model, head)
    y, reconstructed = _completeness(full, torch.rand(2, 6, 8, 8) + 0.1)
    torch.testing.assert_close(reconstructed, y, rtol=1e-4, atol=1e-4)


def test_explanation_mode_changes_gradients_not_values_and_restores_state():
    model = nn.Sequential(BcosLinear(6, 6), DetachableActivation(GELUActivation(), "gelu"), BcosLinear(6, 2))
    x = torch.randn(3, 6)
    expected = model(x)
    with explanation_mode(model):
        assert all(m.explaining for m in model if hasattr(m, "explaining"))
        torch.testing.assert_close(model(x), expected)
    assert not any(m.explaining for m in model if hasattr(m, "explaining"))


def test_activation_gates_reproduce_activation_values():
    x = torch.linspace(-8, 8, 101)
    for module, gate in [
        (GELUActivation(), "gelu"),
        (GELUTanh(), "gelu_tanh"),
        (QuickGELUActivation(), "quick_gelu"),
        (nn.SiLU(), "silu"),
        (nn.Tanh(), "tanh"),
        (nn.ReLU6(), "relu6"),
    ]:
        wrapped = DetachableActivation(module, gate)
        with explanation_mode(wrapped):
            torch.testing.assert_close(wrapped(x), module(x), rtol=1e-5, atol=1e-6)


def test_detachable_linear_detaches_only_in_explanation_mode():
    layer = DetachableLinear.from_module(nn.Linear(4, 4))
    x = torch.randn(2, 4, requires_grad=True)
    assert layer(x).requires_grad
    with explanation_mode(layer):
        assert not layer(x).requires_grad


def test_uncentred_batchnorm_folds_running_mean_exactly_in_eval():
    bn = nn.BatchNorm2d(5).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
    x = torch.randn(3, 5, 4, 4)
    expected = bn(x)
    uncentred = UncentredBatchNorm2d.from_module(bn, keep_bias=True).eval()
    torch.testing.assert_close(uncentred(x), expected, rtol=1e-5, atol=1e-6)


def test_uncentred_batchnorm_training_divides_by_batch_std_and_tracks_variance():
    bn = UncentredBatchNorm2d(3, bias=False)
    x = torch.randn(8, 3, 5, 5) * 2 + 1
    out = bn(x)
    std = (x.var(dim=(0, 2, 3), unbiased=False) + bn.eps).sqrt()
    torch.testing.assert_close(out, x / std[None, :, None, None])
    assert bn.num_batches_tracked.item() == 1
    assert (bn.running_var > 1).all()  # moved from 1 towards the batch variance of about 4


def test_layernorm_channels_first_and_explanation_values():
    norm = BcosLayerNorm.from_module(nn.LayerNorm(4), keep_bias=True, channels_first=True)
    x = torch.randn(2, 4, 3, 3)
    expected = F.layer_norm(x.permute(0, 2, 3, 1), (4,), norm.weight, norm.bias, norm.eps).permute(0, 3, 1, 2)
    torch.testing.assert_close(norm(x), expected)
    with explanation_mode(norm):
        torch.testing.assert_close(norm(x), expected, rtol=1e-5, atol=1e-5)


def test_invalid_b_is_refused():
    with pytest.raises(ValueError, match="B must be a number >= 1"):
        BcosLinear(3, 3, b=0.5)
