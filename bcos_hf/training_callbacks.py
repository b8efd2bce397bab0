"""Trainer callbacks of the B-cos recipe: the B ramp, the bias anneal, and the stop at the first non-finite
weight. Each recomputes its state from the global step, so a resumed run continues where it stopped."""

from __future__ import annotations

import torch
from torch import nn
from transformers import TrainerCallback

from .modeling.bcos_layers import BcosConv2d, BcosLinear, DetachableLinear
from .modeling.modeling_bcos import non_finite_parameters


def bcos_layers(model: nn.Module) -> list[nn.Module]:
    """The modules that carry a B exponent."""
    return [module for module in model.modules() if isinstance(module, (BcosLinear, BcosConv2d))]


def set_b(model: nn.Module, b: float) -> None:
    """Set B on every B-cos layer of ``model`` (the config is left alone: see ``BWarmupCallback``)."""
    for module in bcos_layers(model):
        module.b = float(b)


class BWarmupCallback(TrainerCallback):
    """Ramps B linearly from 1 to ``final_b`` over ``steps`` optimiser steps, then holds it.

    B is recomputed from the global step before every step, so a resumed run continues the ramp where it
    stopped; at the end the layers and ``config.b`` agree on ``final_b``.
    """

    def __init__(self, final_b: float, steps: int) -> None:
        self.final_b = float(final_b)
        self.steps = steps

    def b_at(self, step: int) -> float:
        return 1.0 + (self.final_b - 1.0) * min(1.0, step / self.steps)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        set_b(model, self.b_at(state.global_step))

    def on_train_end(self, args, state, control, model=None, **kwargs):
        set_b(model, self.final_b)
        model.config.b = self.final_b


def constant_biases(model: nn.Module) -> list[tuple[nn.Module, nn.Parameter]]:
    """(module, bias) for every bias that adds a constant term: all but attention queries' and keys' (those only
    shape the attention pattern, and a bias-free conversion keeps them too)."""
    return [
        (module, module.bias)
        for module in model.modules()
        if isinstance(getattr(module, "bias", None), nn.Parameter) and not isinstance(module, DetachableLinear)
    ]


class BiasAnnealCallback(TrainerCallback):
    """Scales the constant-term biases linearly from their value to zero over ``steps`` optimiser steps, holds
    them at zero (frozen), and removes them at the end of training: the model is then what a bias-free
    conversion builds (``config.keep_bias`` False), so it saves and reloads as a bias-free B-cos model.

    The scale is recomputed from the global step, so a resumed run continues where it stopped (the checkpoint
    holds the biases already scaled).
    """

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.applied = 1.0

    def scale_at(self, step: int) -> float:
        return max(0.0, 1.0 - step / self.steps)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.applied = self.scale_at(state.global_step)
        if self.applied == 0.0:
            self._freeze(model)

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        target = self.scale_at(state.global_step)
        if target == self.applied:
            return
        with torch.no_grad():
            for _, bias in constant_biases(model):
                bias.mul_(target / self.applied)
        self.applied = target
        if target == 0.0:
            self._freeze(model)

    @staticmethod
    def _freeze(model: nn.Module) -> None:
        for _, bias in constant_biases(model):
            bias.requires_grad_(False).zero_()

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.applied == 0.0:
            for module, _ in constant_biases(model):
                module.bias = None
            model.config.keep_bias = False


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or infinite loss or weight; raised at the first step where it happens."""


class FiniteWeightsCallback(TrainerCallback):
    """Stop at the first optimiser step that leaves a NaN or infinite weight, naming the step and the weights
    (the Trainer would log a loss of 0.0 and go on with a broken model)."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        broken = non_finite_parameters(model) if model is not None else []
        if broken:
            raise NonFiniteError(
                f"Step {state.global_step}: the optimiser step left NaN or infinite weights "
                f"({', '.join(broken[:5])}{', ...' if len(broken) > 5 else ''}). Lower the learning rate, check the "
                "clipping (clip_factor) and the data, and resume from the last checkpoint."
            )
