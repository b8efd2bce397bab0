"""Adapters for CLIP: the image-text model (CLIPModel), its image classifier and its vision tower alone.

Only the vision tower is B-cosified: the vision transformer and ``visual_projection`` (no bias), which map
the image to its embedding. The text tower (``text_model``, ``text_projection``) stays the original network,
frozen: text embeddings are constants for the image, and the zero-shot logits ``logit_scale * cos(image
embedding, text embedding)`` are a fixed linear map of the normalised image embedding.

Pooling: CLIPModel and CLIPVisionModel read the class token after ``post_layernorm`` (then the projection);
CLIPForImageClassification averages the patch tokens of the last layer (no final norm), as in the source.
The class embedding and the position embedding table (an ``nn.Embedding`` looked up at fixed positions) are
constants kept as they are; explanation mode folds them into input-linear form (``constant_tokens``), so
contributions add up to the logit.
"""

from torch import nn

from .rewriting import ArchitectureAdapter, RewriteOptions


def keep_position_embedding(module: nn.Embedding, path: str, options: RewriteOptions) -> nn.Module:
    """The position embedding table is read at fixed positions: a constant term, kept as it is."""
    return module


VISION_CONTAINERS = frozenset(
    {"CLIPVisionModel", "CLIPVisionEmbeddings", "CLIPEncoder", "CLIPEncoderLayer", "CLIPAttention", "CLIPMLP"}
)
VISION_SETTINGS = dict(
    containers=VISION_CONTAINERS,
    constant_parameters=frozenset({"class_embedding"}),
    attention_query_key=frozenset({"q_proj", "k_proj"}),
    attention_value=frozenset({"v_proj"}),
    rules={"Embedding": keep_position_embedding},
)

CLIP_ADAPTER = ArchitectureAdapter(
    model_type="clip",
    model_classes={
        "zero-shot-image-classification": "CLIPModel",
        "image-classification": "CLIPForImageClassification",
    },
    first_layer="vision_model.embeddings.patch_embedding",
    constant_tokens="vision_model.embeddings",
    frozen=frozenset({"text_model", "text_projection"}),
    pooling_note=(
        "CLIPModel: the class token after post_layernorm, projected by visual_projection, is the image "
        "embedding; CLIPForImageClassification: the mean of the last layer's patch tokens feeds the classifier."
    ),
    alignment_blocks=("vision_model.embeddings", "vision_model.encoder.layers.*", "vision_model.post_layernorm"),
    **VISION_SETTINGS,
)

CLIP_VISION_ADAPTER = ArchitectureAdapter(
    model_type="clip_vision_model",
    model_classes={"base": "CLIPVisionModel"},
    first_layer="embeddings.patch_embedding",
    constant_tokens="embeddings",
    pooling_note="The pooled output is the class token after post_layernorm, as in the source CLIPVisionModel.",
    alignment_blocks=("embeddings", "encoder.layers.*", "post_layernorm"),
    **VISION_SETTINGS,
)
