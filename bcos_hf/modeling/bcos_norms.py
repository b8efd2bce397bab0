"""Normalisation layers of B-cos networks: their divisors are input-dependent factors that explanation mode
detaches, and their constant offsets go with the biases.

``BcosLayerNorm`` and ``BcosGroupNorm`` subclass the torch modules they replace. ``UncentredBatchNorm2d``
replaces ``nn.BatchNorm2d`` without subclassing it: it has no running mean, and BatchNorm's forward (and its
state-dict handling of ``running_mean``) would have to be overridden whole.

Part of the remote-loadable model code: imports only torch and siblings, with single dots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .bcos_kernels import LayerNormDetachedVariance
from .explainable import ExplainableMixin


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
            out = LayerNormDetachedVariance.apply(x, self.weight, self.bias, tuple(self.normalized_shape), self.eps)
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
