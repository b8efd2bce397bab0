"""Adapter for DINOv2 (Dinov2Model, Dinov2ForImageClassification).

Pooling: the classifier reads the final-LayerNorm'd class token concatenated with the mean of the patch
tokens, as in the source model (a mean is linear, so this stays dynamic linear). Layer scale multiplies each
channel by a fixed learnt factor: a linear map with no constant term, kept as it is (``Dinov2LayerScale`` is
a container whose bare parameter ``lambda1`` is declared constant). Drop path is the identity at inference
and a per-sample 0/1 scaling in training, so it passes through too. The SwiGLU feed-forward of the largest
checkpoints, ``down(silu(gate(x)) * up(x))``, would be quadratic in the input with both branches B-cos:
``gate_proj`` stays a plain linear layer detached in explanation mode, like attention queries and keys, so
``silu(gate(x))`` acts as an input-dependent weight on the B-cos ``up_proj`` branch. The class token and the
(interpolated) position embeddings are constants; explanation mode folds them into input-linear form
(``constant_tokens``), so contributions add up to the logit.
"""

from .rewriting import ArchitectureAdapter

DINOV2_ADAPTER = ArchitectureAdapter(
    model_type="dinov2",
    model_classes={"base": "Dinov2Model", "image-classification": "Dinov2ForImageClassification"},
    first_layer="embeddings.patch_embeddings.projection",
    channel_attributes=("embeddings.patch_embeddings.num_channels",),
    containers=frozenset(
        {
            "Dinov2Model",
            "Dinov2Embeddings",
            "Dinov2PatchEmbeddings",
            "Dinov2Encoder",
            "Dinov2Layer",
            "Dinov2Attention",
            "Dinov2LayerScale",
            "Dinov2DropPath",
            "Dinov2MLP",
            "Dinov2SwiGLUFFN",
        }
    ),
    constant_parameters=frozenset({"cls_token", "mask_token", "position_embeddings", "lambda1"}),
    attention_query_key=frozenset({"q_proj", "k_proj", "gate_proj"}),
    attention_value=frozenset({"v_proj"}),
    constant_tokens="embeddings",
    pooling_note=(
        "The classifier reads the class token and the mean of the patch tokens after the final LayerNorm, "
        "concatenated, as in the source DINOv2."
    ),
    alignment_blocks=("embeddings", "encoder.layer.*", "layernorm"),
)
