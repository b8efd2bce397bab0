"""Adapter for ViT (ViTModel, ViTForImageClassification).

Pooling: the classifier reads the final-LayerNorm'd class token, as in the source model. The class token and
position embeddings are constant parameters kept as they are; explanation mode folds them into input-linear form
(``constant_tokens``), so contributions add up to the logit.
"""

from .rewriting import ArchitectureAdapter

VIT_ADAPTER = ArchitectureAdapter(
    model_type="vit",
    model_classes={"base": "ViTModel", "image-classification": "ViTForImageClassification"},
    first_layer="embeddings.patch_embeddings.projection",
    channel_attributes=("embeddings.patch_embeddings.num_channels",),
    containers=frozenset(
        {
            "ViTModel",
            "ViTEmbeddings",
            "ViTPatchEmbeddings",
            "ViTLayer",
            "ViTAttention",
            "ViTMLP",
            "ViTPooler",
        }
    ),
    constant_parameters=frozenset({"cls_token", "position_embeddings", "mask_token"}),
    attention_query_key=frozenset({"q_proj", "k_proj"}),
    attention_value=frozenset({"v_proj"}),
    constant_tokens="embeddings",
    pooling_note="The classifier reads the class token after the final LayerNorm, as in the source ViT.",
    alignment_blocks=("embeddings", "layers.*", "layernorm"),
)
