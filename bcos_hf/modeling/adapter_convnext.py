"""Adapter for ConvNeXt (ConvNextModel, ConvNextForImageClassification).

Pooling: the classifier stays *after* global average pooling and the final LayerNorm, as in the source
model. The B-cosification reference moves the classifier before the pooling (per-position logits, then
the mean); here the pooled features are layer-normalised before the classifier, and a LayerNorm does not
commute with the mean, so moving the classifier would change the function and lose exact equivalence.
HF's order is already dynamic linear: the mean is linear and the LayerNorm's divisor is detached in
explanation mode.

ConvNextLayerNorm (a LayerNorm subclass with a ``data_format``) becomes a ``BcosLayerNorm`` that keeps the
data format; the depthwise 7x7 convolutions become grouped B-cos convolutions (norm per group, i.e. per
channel window); the layer-scale parameter is a constant per-channel scale, linear, kept as it is.
Stochastic depth (ConvNextDropPath) multiplies whole samples by an input-independent 0 or 1/keep: kept.
"""

from torch import nn

from .bcos_norms import BcosLayerNorm
from .rewriting import ArchitectureAdapter, RewriteOptions


def _convnext_layer_norm(norm: nn.LayerNorm, path: str, options: RewriteOptions) -> nn.Module:
    return BcosLayerNorm.from_module(norm, options.keep_bias, channels_first=norm.data_format == "channels_first")


def _keep(module: nn.Module, path: str, options: RewriteOptions) -> nn.Module:
    return module


CONVNEXT_ADAPTER = ArchitectureAdapter(
    model_type="convnext",
    model_classes={"base": "ConvNextModel", "image-classification": "ConvNextForImageClassification"},
    first_layer="embeddings.patch_embeddings",
    channel_attributes=("embeddings.num_channels",),
    containers=frozenset({"ConvNextModel", "ConvNextEmbeddings", "ConvNextEncoder", "ConvNextStage", "ConvNextLayer"}),
    constant_parameters=frozenset({"layer_scale_parameter"}),
    rules={"ConvNextLayerNorm": _convnext_layer_norm, "ConvNextDropPath": _keep},
    pooling_note=(
        "The classifier reads the layer-normalised global average of the last stage, as in the source ConvNeXt "
        "(the reference's classifier-before-pooling would change the function, the LayerNorm sits in between)."
    ),
    alignment_blocks=("embeddings", "encoder.stages.*.layers.*", "layernorm"),
)
