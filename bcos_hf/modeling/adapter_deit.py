"""Adapter for DeiT (DeiTModel, DeiTForImageClassification, DeiTForImageClassificationWithTeacher).

DeiT is a ViT with a second leading token, the distillation token. Pooling: the plain classifier reads the
final-LayerNorm'd class token; the distilled variant has two B-cos heads, one on the class token and one on
the distillation token, and averages their logits (an average of dynamic linear maps is dynamic linear). The
class and distillation tokens and the position embeddings are constant parameters kept as they are; explanation
mode folds them into input-linear form (``constant_tokens``), so contributions add up to the logit.
"""

from .rewriting import ArchitectureAdapter

DEIT_ADAPTER = ArchitectureAdapter(
    model_type="deit",
    model_classes={"base": "DeiTModel", "image-classification": "DeiTForImageClassification"},
    variant_classes={"DeiTForImageClassificationWithTeacher": "image-classification"},
    first_layer="embeddings.patch_embeddings.projection",
    channel_attributes=("embeddings.patch_embeddings.num_channels",),
    containers=frozenset(
        {
            "DeiTModel",
            "DeiTEmbeddings",
            "DeiTPatchEmbeddings",
            "DeiTLayer",
            "DeiTAttention",
            "DeiTMLP",
            "DeiTPooler",
        }
    ),
    constant_parameters=frozenset({"cls_token", "distillation_token", "position_embeddings", "mask_token"}),
    attention_query_key=frozenset({"q_proj", "k_proj"}),
    attention_value=frozenset({"v_proj"}),
    constant_tokens="embeddings",
    pooling_note=(
        "The classifier reads the class token after the final LayerNorm; the distilled variant averages the "
        "logits of its class-token and distillation-token heads, as in the source DeiT."
    ),
    alignment_blocks=("embeddings", "layers.*", "layernorm"),
)
