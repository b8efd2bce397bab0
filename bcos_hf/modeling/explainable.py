"""Explanation mode: the switch that detaches every input-dependent factor of a B-cos network.

A B-cos network computes ``y = W(x) x``: each layer is linear in its input with weights that depend on the
input through a few *dynamic* factors (the B-cos scale, normalisation divisors, activation gates, attention
scores). In *explanation mode* those factors are detached from the autograd graph, so that the gradient of a
logit with respect to the input is exactly ``W(x)`` (Böhle et al., "B-cos Networks", CVPR 2022, Sec. 3.2).

Part of the remote-loadable model code: imports only torch.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


class ExplainableMixin:
    """Marks a module with input-dependent factors that explanation mode detaches.

    ``explaining`` is a plain attribute (not a buffer): it is never saved, and ``torch.compile`` guards on it.
    """

    explaining: bool = False


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
