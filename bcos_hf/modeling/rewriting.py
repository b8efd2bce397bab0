"""Module surgery that turns a loaded Hugging Face vision model into its B-cos counterpart.

The rewriting is driven by small per-type rules (shared ones for torch layers and transformers activations,
plus the adapter's own) and walks the model from the root. Every module it meets is either rewritten by a
rule, passed through (parameter-free and already dynamic linear: dropout, ReLU, average pooling, ...),
or walked into as a container the adapter declares. Anything else is collected and refused by name: a model
is converted whole or not at all.

Part of the remote-loadable model code: imports only torch, transformers and siblings, with single dots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers import activations

from .bcos_activations import DetachableActivation
from .bcos_layers import BcosConv2d, BcosLinear, DetachableLinear
from .bcos_norms import BcosGroupNorm, BcosLayerNorm, UncentredBatchNorm2d
from .explainable import ExplainableMixin
from .explanation_bcos import fold_constant_tokens


class UnsupportedModelError(ValueError):
    """The model (or a part of it) cannot be converted to B-cos by bcos_hf."""


@dataclass(frozen=True)
class RewriteOptions:
    """What every rule needs to know: the B-cos exponent, biases, weight normalisation and the adapter."""

    b: float
    keep_bias: bool
    normalize_weights: bool
    adapter: ArchitectureAdapter


Rule = Callable[[nn.Module, str, RewriteOptions], nn.Module]
"""A rule takes (module, dotted path, options) and returns the module that replaces it."""


@dataclass(frozen=True)
class ArchitectureAdapter:
    """Everything bcos_hf needs to know about one transformers architecture.

    Attributes:
        model_type: ``config.model_type`` of the source checkpoints (e.g. ``"vit"``).
        model_classes: transformers class per task: ``"base"`` (becomes ``BcosModel``),
            ``"image-classification"`` (becomes ``BcosForImageClassification``),
            ``"zero-shot-image-classification"`` (image-text models; becomes ``BcosCLIPModel``) and
            ``"zero-shot-image-classification-sigmoid"`` (SigLIP; becomes ``BcosSiglipModel``).
        variant_classes: further source classes that convert as one of those tasks (class name -> task),
            e.g. DeiT's distilled classifier; a converted model rebuilds the class its config records.
        first_layer: path, inside the base model, of the convolution that sees the image; the input
            normalisation is folded into it and it is widened from 3 to 6 input channels.
        channel_attributes: paths, inside the base model, of attributes that record the input channel count
            (set to 6 with the first layer).
        containers: class names of the architecture's own modules that the rewriting walks into; they may
            hold only the parameters named in ``constant_parameters``.
        constant_parameters: parameters owned directly by containers (class token, position embeddings,
            layer scale, ...): kept as they are.
        attention_query_key: names of the linear layers producing attention queries and keys: they stay
            plain and are detached in explanation mode.
        attention_value: names of the value projections: plain linear layers (attention is already linear
            in the values), biases dropped with the others.
        rules: extra rules for the architecture's own module types, by class name.
        frozen: paths of submodules kept exactly as the source has them, with frozen parameters (the text
            tower of an image-text model): the rewriting does not enter them.
        constant_tokens: path, inside the base model, of the embeddings module that adds constant tokens
            (position embeddings, class / distillation / register tokens) to the patch tokens; in explanation
            mode ``fold_constant_tokens`` makes them input-linear, value-identical (docs/explanations.md).
        pooling_note: where pooling happens relative to the classifier and why (documentation).
        alignment_blocks: modules, inside the base model, whose outputs label-free alignment matches to the
            original's (``*`` matches one path component): the stem, every residual or transformer block and
            the final normalisation, in forward order (see ``bcos_hf.alignment``).
    """

    model_type: str
    model_classes: dict[str, str]
    first_layer: str
    variant_classes: dict[str, str] = field(default_factory=dict)
    channel_attributes: tuple[str, ...] = ()
    containers: frozenset[str] = frozenset()
    constant_parameters: frozenset[str] = frozenset()
    attention_query_key: frozenset[str] = frozenset()
    attention_value: frozenset[str] = frozenset()
    rules: dict[str, Rule] = field(default_factory=dict)
    frozen: frozenset[str] = frozenset()
    constant_tokens: str | None = None
    pooling_note: str = ""
    alignment_blocks: tuple[str, ...] = ()

    def task_of(self, class_name: str) -> str | None:
        """The task a source class converts as, or None when this adapter does not convert it."""
        tasks = {name: task for task, name in self.model_classes.items()} | self.variant_classes
        return tasks.get(class_name)

    def source_class(self, task: str, recorded: str | None = None) -> str:
        """The class to rebuild for ``task``: the ``recorded`` source class when it is a variant of that task."""
        if recorded and self.variant_classes.get(recorded) == task:
            return recorded
        if task not in self.model_classes:
            raise UnsupportedModelError(
                f"A B-cos {self.model_type} model converted from {recorded} cannot be loaded as a {task!r} model; "
                f"this family converts {', '.join(self.model_classes.values())}. Load it with the Auto class of "
                "its own task (see the model card)."
            )
        return self.model_classes[task]


def _linear_rule(module: nn.Linear, path: str, options: RewriteOptions) -> nn.Module:
    name = path.rsplit(".", 1)[-1]
    if name in options.adapter.attention_query_key:
        return DetachableLinear.from_module(module)
    if name in options.adapter.attention_value:
        if not options.keep_bias:
            module.bias = None
        return module
    return BcosLinear.from_module(module, options.b, options.keep_bias, options.normalize_weights)


def _activation_rule(gate: str) -> Rule:
    return lambda module, path, options: DetachableActivation(module, gate)


def _gelu_rule(module: nn.GELU, path: str, options: RewriteOptions) -> nn.Module:
    return DetachableActivation(module, "gelu_tanh" if module.approximate == "tanh" else "gelu")


SHARED_RULES: dict[type, Rule] = {
    nn.Linear: _linear_rule,
    nn.Conv2d: lambda m, p, o: BcosConv2d.from_module(m, o.b, o.keep_bias, o.normalize_weights),
    nn.LayerNorm: lambda m, p, o: BcosLayerNorm.from_module(m, o.keep_bias),
    nn.GroupNorm: lambda m, p, o: BcosGroupNorm.from_module(m, o.keep_bias),
    nn.BatchNorm2d: lambda m, p, o: UncentredBatchNorm2d.from_module(m, o.keep_bias),
    nn.GELU: _gelu_rule,
    nn.SiLU: _activation_rule("silu"),
    nn.Tanh: _activation_rule("tanh"),
    nn.ReLU6: _activation_rule("relu6"),
    activations.GELUActivation: _activation_rule("gelu"),
    activations.GELUTanh: _activation_rule("gelu_tanh"),
    activations.NewGELUActivation: _activation_rule("gelu_tanh"),
    activations.FastGELUActivation: _activation_rule("gelu_tanh"),
    activations.QuickGELUActivation: _activation_rule("quick_gelu"),
    activations.SiLUActivation: _activation_rule("silu"),
}
"""Rules for torch layers and transformers activations, by exact type (a subclass may compute otherwise)."""

PASSTHROUGH: tuple[type, ...] = (
    nn.Dropout,
    nn.Identity,
    nn.ReLU,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.MaxPool2d,
    nn.Flatten,
)
"""Parameter-free modules that are already dynamic linear (ReLU's gradient is its detached gate; max-pooling
selects one input per window, so its gradient is that 0/1 selection)."""

GENERIC_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def _describe(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def bcosify(model: nn.Module, adapter: ArchitectureAdapter, options: RewriteOptions) -> nn.Module:
    """Rewrite ``model`` in place into its B-cos counterpart and return it.

    Raises:
        UnsupportedModelError: naming every module type (and a path to one instance) that no rule covers,
            before anything is changed.
    """
    plan: list[tuple[nn.Module, str, str, nn.Module, Rule]] = []
    unhandled: dict[str, str] = {}

    def visit(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            path = f"{prefix}.{name}" if prefix else name
            if path in adapter.frozen:
                child.requires_grad_(False)
                continue
            rule = SHARED_RULES.get(type(child)) or adapter.rules.get(type(child).__name__)
            if rule is not None:
                plan.append((parent, name, path, child, rule))
            elif isinstance(child, ExplainableMixin) or type(child) in PASSTHROUGH:
                continue
            elif isinstance(child, GENERIC_CONTAINERS) or type(child).__name__ in adapter.containers:
                own = [n for n, _ in child.named_parameters(recurse=False) if n not in adapter.constant_parameters]
                if own:
                    unhandled.setdefault(f"{_describe(child)} (parameters {own})", path)
                visit(child, path)
            else:
                unhandled.setdefault(_describe(child), path)

    visit(model, "")
    if unhandled:
        listing = "\n".join(f"  - {kind} at '{path}'" for kind, path in unhandled.items())
        raise UnsupportedModelError(
            f"Cannot convert {type(model).__name__} to B-cos: no rule for these module types:\n{listing}\n"
            "Nothing was converted. Add a rule for them to the architecture's adapter (see docs/conversion.md, "
            "'Adding an architecture')."
        )
    for parent, name, path, child, rule in plan:
        replacement = rule(child, path, options)
        replacement.train(child.training)
        setattr(parent, name, replacement)
    if adapter.constant_tokens is not None:
        embeddings = model.base_model.get_submodule(adapter.constant_tokens)
        embeddings.register_forward_hook(fold_constant_tokens, with_kwargs=True)
    return model


def fold_input_normalisation(
    model: nn.Module, adapter: ArchitectureAdapter, mean: list[float], std: list[float]
) -> None:
    """Widen the first layer to the ``[x, 1 - x]`` encoding with the normalisation folded in, exactly.

    The source computes ``W (x - mean) / std + bias``. Since ``x + (1 - x) = 1`` per channel, this equals
    ``W (1 - mean) / std * x - W mean / std * (1 - x) + bias``: a linear map of the 6-channel input with no
    extra constant (docs/conversion.md). Zero padding stays exact too: the source pads the normalised image with
    zeros and the 6-channel image is padded with zeros, both contributing nothing.
    """
    base = model.base_model
    conv = base.get_submodule(adapter.first_layer)
    if type(conv) is not nn.Conv2d or conv.in_channels != 3 or conv.groups != 1:
        raise UnsupportedModelError(
            f"Expected the first layer '{adapter.first_layer}' to be a 3-channel, ungrouped nn.Conv2d; got {conv}."
        )
    mean_t = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    weight = conv.weight.detach().double()
    folded = torch.cat([weight * (1 - mean_t) / std_t, -weight * mean_t / std_t], dim=1)
    widened = nn.Conv2d(
        6,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=False,
        device="meta",
    )
    widened.weight = nn.Parameter(folded.to(conv.weight.dtype), requires_grad=conv.weight.requires_grad)
    widened.bias = conv.bias
    parent_path, _, name = adapter.first_layer.rpartition(".")
    setattr(base.get_submodule(parent_path), name, widened)
    for attribute_path in adapter.channel_attributes:
        owner_path, _, attribute = attribute_path.rpartition(".")
        setattr(base.get_submodule(owner_path), attribute, 6)
    getattr(model.config, "vision_config", model.config).num_channels = 6  # image-text models: the vision config
