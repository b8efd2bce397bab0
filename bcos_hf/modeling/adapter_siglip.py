"""Adapters for SigLIP: the image-text model (SiglipModel) and its image classifier.

As for CLIP, only the vision tower is B-cosified; the text tower (``text_model``, with its own head) stays the
original network, frozen. SigLIP has no class token: the vision tower pools the last layer's tokens with a
multi-head attention pooling head, a learnt probe attending over the tokens. That attention is B-cos the way
the encoder's is: queries and keys stay plain and are detached in explanation mode (the attention pattern is
an input-dependent weight), values are a plain linear map, the output projection is B-cos. The probe enters
only through the queries, so it adds no constant term. SiglipForImageClassification averages the last
layer's tokens (no head) before its classifier, as in the source. The position embedding table is a
constant, kept as it is; explanation mode folds it into input-linear form (``constant_tokens``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .adapter_clip import keep_position_embedding
from .bcos_layers import BcosLinear
from .explainable import ExplainableMixin
from .rewriting import ArchitectureAdapter, RewriteOptions, UnsupportedModelError


class BcosMultiheadAttention(nn.MultiheadAttention, ExplainableMixin):
    """``torch.nn.MultiheadAttention`` (batch first, no masks) in B-cos form, with the same parameters.

    Queries and keys use the packed input projection as it is (biases included: they only shape the attention
    pattern) and are detached in explanation mode; values use it without their bias unless biases are kept;
    ``out_proj`` is a ``BcosLinear``. Returns ``(output, attention weights)`` like the torch module.
    """

    value_bias: bool = True

    @classmethod
    def from_module(cls, attention: nn.MultiheadAttention, options: RewriteOptions) -> BcosMultiheadAttention:
        """Take over a torch MultiheadAttention's parameters (no copy); refuse the variants it does not cover."""
        if not (attention.batch_first and attention._qkv_same_embed_dim) or attention.bias_k is not None:
            raise UnsupportedModelError(
                "B-cos MultiheadAttention supports batch_first=True with one packed input projection and no "
                f"bias_k/bias_v; got {attention}."
            )
        if attention.add_zero_attn:
            raise UnsupportedModelError("B-cos MultiheadAttention does not support add_zero_attn=True.")
        with torch.device("meta"):
            layer = cls(
                attention.embed_dim, attention.num_heads, dropout=attention.dropout, bias=False, batch_first=True
            )
        layer.in_proj_weight = attention.in_proj_weight
        layer.in_proj_bias = attention.in_proj_bias
        layer.value_bias = options.keep_bias
        layer.out_proj = BcosLinear.from_module(
            attention.out_proj, options.b, options.keep_bias, options.normalize_weights
        )
        return layer

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if key_padding_mask is not None or attn_mask is not None or is_causal:
            raise NotImplementedError("B-cos MultiheadAttention does not support attention masks.")
        weight_q, weight_k, weight_v = self.in_proj_weight.chunk(3)
        bias_q, bias_k, bias_v = self.in_proj_bias.chunk(3) if self.in_proj_bias is not None else (None,) * 3
        queries = F.linear(query, weight_q, bias_q)
        keys = F.linear(key, weight_k, bias_k)
        values = F.linear(value, weight_v, bias_v if self.value_bias else None)
        if self.explaining:
            queries, keys = queries.detach(), keys.detach()

        def split_heads(tokens: torch.Tensor) -> torch.Tensor:
            return tokens.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2)

        scores = split_heads(queries) @ split_heads(keys).transpose(-2, -1) * self.head_dim**-0.5
        weights = scores.softmax(dim=-1)
        mixed = F.dropout(weights, self.dropout, self.training) @ split_heads(values)
        output = self.out_proj(mixed.transpose(1, 2).flatten(2))
        if not need_weights:
            return output, None
        return output, weights.mean(dim=1) if average_attn_weights else weights


def _bcos_multihead_attention(module: nn.MultiheadAttention, path: str, options: RewriteOptions) -> nn.Module:
    return BcosMultiheadAttention.from_module(module, options)


VISION_SETTINGS = dict(
    containers=frozenset(
        {
            "SiglipVisionModel",
            "SiglipVisionEmbeddings",
            "SiglipEncoder",
            "SiglipEncoderLayer",
            "SiglipAttention",
            "SiglipMLP",
            "SiglipMultiheadAttentionPoolingHead",
        }
    ),
    constant_parameters=frozenset({"probe"}),
    attention_query_key=frozenset({"q_proj", "k_proj"}),
    attention_value=frozenset({"v_proj"}),
    rules={"Embedding": keep_position_embedding, "MultiheadAttention": _bcos_multihead_attention},
)

SIGLIP_ADAPTER = ArchitectureAdapter(
    model_type="siglip",
    model_classes={
        "zero-shot-image-classification-sigmoid": "SiglipModel",
        "image-classification": "SiglipForImageClassification",
    },
    first_layer="vision_model.embeddings.patch_embedding",
    constant_tokens="vision_model.embeddings",
    frozen=frozenset({"text_model"}),
    pooling_note=(
        "SiglipModel: the attention pooling head's output is the image embedding; "
        "SiglipForImageClassification: the mean of the last layer's tokens feeds the classifier."
    ),
    alignment_blocks=("vision_model.embeddings", "vision_model.encoder.layers.*", "vision_model.post_layernorm"),
    **VISION_SETTINGS,
)
