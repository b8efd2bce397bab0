"""Activations of B-cos networks, each written as ``x * gate(x)``: explanation mode detaches the gate, so the
activation becomes an input-dependent weight on ``x`` (dynamic linear).

Part of the remote-loadable model code: imports only torch and siblings, with single dots.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .bcos_kernels import launch
from .explainable import ExplainableMixin


def _gelu_gate(x: torch.Tensor) -> torch.Tensor:
    """``Phi(x) = 0.5 * (1 + erf(x / sqrt(2)))``, the standard normal CDF, as one kernel (``ndtr``): one pass
    over the activation where the written-out formula takes four."""
    return torch.special.ndtr(x)


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
        return x * launch(ACTIVATION_GATES[self.gate], x.detach())

    def extra_repr(self) -> str:
        return f"gate={self.gate!r}"
