"""B-cos CLIP and SigLIP for zero-shot image classification, on AutoModel and the zero-shot Auto class.

The network is the source ``CLIPModel`` (``SiglipModel``) rewritten by its adapter: the vision tower is B-cos,
the text tower is the original, frozen. The forward is the source's own, so ``logits_per_image`` are
``logit_scale * cos(image embedding, text embedding)`` (plus SigLIP's logit bias) as in the source, and the
zero-shot pipeline works unchanged (it calls ``model(**text_inputs, **image_inputs)``).

Part of the remote-loadable model code: imports only torch, transformers and siblings, with single dots.
"""

from __future__ import annotations

import torch
from transformers.models.clip.modeling_clip import CLIPOutput
from transformers.utils.generic import can_return_tuple

from .adapters import get_adapter
from .configuration_bcos_clip import BcosCLIPConfig, BcosSiglipConfig
from .explanation_bcos import BcosExplanation, Target, explain_image_text
from .modeling_bcos import BcosPreTrainedModel


class BcosCLIPModel(BcosPreTrainedModel):
    """CLIP with a B-cos vision tower: image embeddings, text embeddings and their scaled cosine similarities."""

    config: BcosCLIPConfig
    config_class = BcosCLIPConfig
    input_modalities = ("image", "text")
    task = "zero-shot-image-classification"
    text_padding = {"padding": True}
    """How ``explain`` pads prompts: as the zero-shot pipeline does for this family."""

    def __init__(self, config: BcosCLIPConfig, network=None) -> None:
        super().__init__(config, network)
        self.post_init()

    def freeze_text_tower(self) -> None:
        """Freeze the submodules the adapter keeps original (``text_model``, ``text_projection``)."""
        for path in get_adapter(self.config.source_config.model_type).frozen:
            self.network.get_submodule(path).requires_grad_(False)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """Load as transformers does, then freeze the text tower again: loading makes every weight trainable."""
        loaded = super().from_pretrained(*args, **kwargs)
        (loaded[0] if isinstance(loaded, tuple) else loaded).freeze_text_tower()
        return loaded

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        return_loss: bool | None = None,
        **kwargs,
    ) -> CLIPOutput:
        r"""
        input_ids (`torch.LongTensor` of shape `(num_texts, sequence_length)`):
            Token ids from the CLIP tokenizer saved with the model.
        pixel_values (`torch.Tensor` of shape `(batch, 3 or 6, height, width)`):
            Images in [0, 1] without mean/std normalisation, or their `[x, 1 - x]` encoding.
        return_loss (`bool`, *optional*): also return CLIP's contrastive loss.
        kwargs: passed to the source CLIPModel (e.g. `output_hidden_states`, `interpolate_pos_encoding`).
        """
        return self.network(
            input_ids=input_ids,
            pixel_values=self.encode_pixels(pixel_values),
            attention_mask=attention_mask,
            position_ids=position_ids,
            return_loss=return_loss,
            **kwargs,
        )

    def get_image_features(self, pixel_values: torch.Tensor, **kwargs):
        """The B-cos vision tower's output; ``pooler_output`` holds the (unnormalised) image embeddings."""
        return self.network.get_image_features(pixel_values=self.encode_pixels(pixel_values), **kwargs)

    def get_text_features(self, input_ids: torch.Tensor, **kwargs):
        """The original text tower's output; ``pooler_output`` holds the (unnormalised) text embeddings."""
        return self.network.get_text_features(input_ids=input_ids, **kwargs)

    def explain(
        self,
        pixel_values: torch.Tensor,
        target: Target = None,
        *,
        text: list[str] | None = None,
        tokenizer=None,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
    ) -> BcosExplanation:
        """Explain the image-text similarities (``logits_per_image``) for the prompts ``text``.

        One forward and one backward for the batch; the contributions add up to ``logit_scale * cos`` (SigLIP's
        logit bias is left out, like a classifier's). ``target``: None (the best-matching prompt), a prompt
        (string or index) for all images, or one per image. The prompts are tokenised with ``tokenizer``
        (default: the one saved with the model), or pass ``input_ids`` (and ``attention_mask``) instead.
        """
        if input_ids is None:
            if not text or isinstance(text, str):
                raise ValueError(
                    'Pass the prompts to explain as a list, e.g. text=["a photo of a cat", "a photo of a dog"].'
                )
            if tokenizer is None:
                from transformers import AutoTokenizer

                try:
                    tokenizer = AutoTokenizer.from_pretrained(self.name_or_path, trust_remote_code=False)
                except (OSError, ValueError) as error:
                    raise ValueError(
                        f"No tokenizer saved with this model ({self.name_or_path or 'not loaded from a folder'}): "
                        "pass tokenizer=... (e.g. the source CLIP's) or input_ids=... instead of text only."
                    ) from error
            tokens = tokenizer(list(text), return_tensors="pt", **self.text_padding)
            input_ids, attention_mask = tokens["input_ids"], tokens.get("attention_mask")
        with torch.no_grad():
            mask = None if attention_mask is None else attention_mask.to(self.device)
            text_embeddings = self.get_text_features(input_ids=input_ids.to(self.device), attention_mask=mask)
        return explain_image_text(
            self,
            pixel_values,
            lambda encoded: self.network.get_image_features(pixel_values=encoded).pooler_output,
            text_embeddings.pooler_output,
            float(self.network.logit_scale.exp()),
            target,
            prompts=list(text) if text is not None else None,
            logit_bias=float(getattr(self.network, "logit_bias", None) or 0.0),  # SigLIP's; CLIP has none
        )


class BcosSiglipModel(BcosCLIPModel):
    """SigLIP with a B-cos vision tower; ``logits_per_image`` are SigLIP's (sigmoid scores, with its logit bias)."""

    config: BcosSiglipConfig
    config_class = BcosSiglipConfig
    task = "zero-shot-image-classification-sigmoid"
    text_padding = {"padding": "max_length", "max_length": 64}  # SigLIP was trained on prompts padded to 64


BcosCLIPConfig.register_for_auto_class()
BcosCLIPModel.register_for_auto_class("AutoModelForZeroShotImageClassification")
BcosSiglipConfig.register_for_auto_class()
BcosSiglipModel.register_for_auto_class("AutoModelForZeroShotImageClassification")
