"""The ``image-explanation`` pipeline: ``pipeline("image-explanation", model=...)`` classifies and explains.

Registered with transformers' ``PIPELINE_REGISTRY`` on ``import bcos_hf``. It takes what the
image-classification pipeline takes (paths, URLs, PIL images, lists of them) and returns, per image, the
predicted label and score, the explained target, and the explanation pictures (``BcosExplanation``).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForImageClassification, ImageClassificationPipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .modeling.explanation_bcos import OPACITY_PERCENTILE, SMOOTHING_KERNEL, BcosExplanation, Compile

TASK = "image-explanation"


class ImageExplanationPipeline(ImageClassificationPipeline):
    """Classify images with a B-cos model and explain each prediction (one forward and backward per batch).

    Call parameters:
        target: what to explain for every image: None (the predicted class), a class index or a label name.
        smoothing, percentile: how the coloured explanation is rendered (``BcosExplanation.rgba``).
        with_image: put the input image on the left of each picture.
        compile: explain with the model compiled whole (True: inductor, or a ``torch.compile`` backend name);
            pays off over many batches of one size (``batch_size=`` keeps them alike).

    Returns, per image, a dict with ``label`` and ``score`` (the prediction, softmax), ``target`` (the explained
    label), ``logit`` and ``residual`` of the explained class, ``explanation`` (PIL RGBA), ``heatmap`` (PIL RGB)
    and ``contributions`` (H x W tensor).
    """

    def __call__(self, inputs, **kwargs):
        """As the image-classification pipeline; a list of targets (one per image) explains each image for its own
        target, whatever the batch size."""
        target = kwargs.get("target")
        if isinstance(target, torch.Tensor):
            target = target.tolist()
        if not isinstance(target, (list, tuple)):
            return super().__call__(inputs, **kwargs)
        images = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        if len(target) != len(images):
            raise ValueError(
                f"target has {len(target)} entries for {len(images)} images: pass one target per image, or one "
                "class index or label name for all of them."
            )
        options = {key: value for key, value in kwargs.items() if key not in ("target", "batch_size")}
        call = super().__call__
        results = [call(image, target=entry, **options) for image, entry in zip(images, target, strict=True)]
        return results if isinstance(inputs, (list, tuple)) else results[0]

    def _sanitize_parameters(
        self,
        target: int | str | None = None,
        smoothing: int | None = None,
        percentile: float | None = None,
        with_image: bool | None = None,
        timeout: float | None = None,
        compile: Compile | None = None,
    ):
        preprocess_params = {"timeout": timeout} if timeout is not None else {}
        forward_params = {"target": target}
        if compile is not None:  # given at construction, it holds for every call that does not say otherwise
            forward_params["compile"] = compile
        postprocess_params = {
            "smoothing": SMOOTHING_KERNEL if smoothing is None else smoothing,
            "percentile": OPACITY_PERCENTILE if percentile is None else percentile,
            "with_image": bool(with_image),
        }
        return preprocess_params, forward_params, postprocess_params

    def _forward(
        self, model_inputs, target: int | str | None = None, compile: Compile = False
    ) -> dict[str, torch.Tensor]:
        """One explanation of the batch (``explain`` turns autograd back on inside the pipeline's no_grad)."""
        if not hasattr(self.model, "explain"):
            raise ValueError(
                f"The image-explanation pipeline needs a B-cos model (with .explain); got {type(self.model).__name__}. "
                "Convert it first: bcos-hf convert SOURCE OUTPUT_DIR."
            )
        explanation = self.model.explain(model_inputs["pixel_values"], target=target, compile=compile)
        return {
            "logits": explanation.logits,
            "target": explanation.target,
            "contributions": explanation.contributions,
            "dynamic_weights": explanation.dynamic_weights,
            "residual": explanation.residual,
            "pixel_values": explanation.pixel_values,
        }

    def postprocess(
        self, model_outputs, smoothing: int = SMOOTHING_KERNEL, percentile: float = OPACITY_PERCENTILE, with_image=False
    ) -> dict[str, Any]:
        explanation = BcosExplanation(**model_outputs)
        id2label = self.model.config.id2label or {}
        probabilities = explanation.logits[0].float().softmax(dim=-1)
        predicted = int(probabilities.argmax())
        target = int(explanation.target[0])
        return {
            "label": id2label.get(predicted, str(predicted)),
            "score": float(probabilities[predicted]),
            "target": id2label.get(target, str(target)),
            "logit": float(explanation.target_logits[0]),
            "residual": float(explanation.residual[0]),
            "explanation": explanation.explanation_images(with_image, smoothing=smoothing, percentile=percentile)[0],
            "heatmap": explanation.heatmap_images(with_image, percentile=percentile)[0],
            "contributions": explanation.contributions[0],
        }


def register_pipeline() -> None:
    """Make ``pipeline("image-explanation", ...)`` available (called on ``import bcos_hf``)."""
    if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=ImageExplanationPipeline, pt_model=AutoModelForImageClassification, type="image"
        )
