"""Convert a pretrained Hugging Face vision checkpoint into a B-cos model (B-cosification, step one).

``convert`` loads the source model, folds its input normalisation into the first layer, rewrites every
module with the architecture's adapter, measures how far the B = 1, biases-kept conversion is from the
source (the equivalence check, run on every conversion), and optionally saves a folder that loads with
``from_pretrained`` (with or without bcos_hf installed), works in pipelines and carries a model card and a
``conversion_report.json``.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, PreTrainedModel

from .model_card import render_model_card
from .modeling.adapters import get_adapter
from .modeling.modeling_bcos import BcosForImageClassification, BcosModel, BcosPreTrainedModel
from .modeling.modeling_bcos_clip import BcosCLIPModel, BcosSiglipModel
from .modeling.rewriting import (
    ArchitectureAdapter,
    RewriteOptions,
    UnsupportedModelError,
    bcosify,
    fold_input_normalisation,
)

logger = logging.getLogger(__name__)

REPORT_FILE = "conversion_report.json"
EQUIVALENCE_BATCH = 2
EQUIVALENCE_SEED = 0

BCOS_CLASSES: dict[str, type[BcosPreTrainedModel]] = {
    "base": BcosModel,
    "image-classification": BcosForImageClassification,
    "zero-shot-image-classification": BcosCLIPModel,
    "zero-shot-image-classification-sigmoid": BcosSiglipModel,
}
"""The B-cos class a source model becomes, by the task its adapter lists it under (``model_classes``)."""

IMAGE_TEXT_NOTE = (
    "Equivalence is measured on the image embeddings (get_image_features): only the vision tower is converted, "
    "so logits_per_image match the source's as closely as the image embeddings do."
)


@dataclass
class ConversionReport:
    """What a conversion did and measured; saved as ``conversion_report.json``."""

    source: str
    source_architecture: str
    model_class: str
    b: float
    keep_bias: bool
    logit_bias: float
    parameters: int
    equivalence_max_abs_diff: float
    """Largest |difference| between the source model's output (logits, the last hidden state of backbones, the
    image embeddings of image-text models) and the B = 1, biases-kept conversion's, on a fixed batch of seeded
    random images in [0, 1]."""
    equivalence_inputs: list[int]
    seconds: float
    """Wall time of the whole conversion: loading, equivalence check, rewriting and saving."""
    bcos_hf_version: str
    transformers_version: str = transformers.__version__
    torch_version: str = torch.__version__
    output_dir: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


@dataclass
class Conversion:
    """The result of ``convert``: the B-cos model, its image processor (normalisation off) and the report.

    Image-text models also get their full ``processor`` (tokenizer and that image processor).
    """

    model: BcosPreTrainedModel
    image_processor: object | None
    report: ConversionReport
    processor: object | None = None


def _bcos_hf_version() -> str:
    from . import __version__

    return __version__


def _supported_classes(adapter: ArchitectureAdapter) -> str:
    return ", ".join([*adapter.model_classes.values(), *adapter.variant_classes])


def _task_for(model: PreTrainedModel, adapter: ArchitectureAdapter) -> str:
    name = type(model).__name__
    task = adapter.task_of(name)
    if task is None:
        raise UnsupportedModelError(
            f"bcos_hf converts {adapter.model_type} checkpoints of these classes: {_supported_classes(adapter)}; "
            f"got {name}."
        )
    return task


def _load_source(source: str, adapter: ArchitectureAdapter, config) -> PreTrainedModel:
    """Load the checkpoint with the class its config names (the backbone class when it names none)."""
    architectures = list(config.architectures or [adapter.model_classes.get("base")])
    class_name = architectures[0]
    if adapter.task_of(class_name) is None:
        raise UnsupportedModelError(
            f"{source} is a {class_name}; bcos_hf converts these {adapter.model_type} classes: "
            f"{_supported_classes(adapter)}."
        )
    return getattr(transformers, class_name).from_pretrained(source, dtype=torch.float32)


def _image_size(config, image_processor) -> tuple[int, int]:
    """The resolution the source model expects: the processor's crop or resize size, else the config's."""
    for attribute in ("crop_size", "size"):
        size = getattr(image_processor, attribute, None) if image_processor is not None else None
        height = getattr(size, "height", None) if size is not None else None
        width = getattr(size, "width", None) if size is not None else None
        if height and width:
            return int(height), int(width)
    side = getattr(getattr(config, "vision_config", config), "image_size", 224)
    return (side, side) if isinstance(side, int) else tuple(side)


def _primary_output(model: PreTrainedModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """What the equivalence check compares: the logits, the last hidden state of backbones, or the image
    embeddings of image-text models (those with ``get_image_features``), whose text tower is not converted."""
    if hasattr(model, "get_image_features"):
        return model.get_image_features(pixel_values=pixel_values).pooler_output
    outputs = model(pixel_values=pixel_values)
    logits = getattr(outputs, "logits", None)
    return logits if logits is not None else outputs.last_hidden_state


def _source_output(model: PreTrainedModel, images: torch.Tensor, mean: list[float], std: list[float]) -> torch.Tensor:
    """The source model's output on images in [0, 1], normalised the way its processor does."""
    normalised = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.inference_mode():
        return _primary_output(model, normalised)


def _bcos_output(network: PreTrainedModel, images: torch.Tensor) -> torch.Tensor:
    """A rewritten network's output on the ``[x, 1 - x]`` encoding of the same images."""
    with torch.inference_mode():
        return _primary_output(network, torch.cat([images, 1 - images], dim=1))


def _load_processor(source: str | PreTrainedModel, model_class: type[BcosPreTrainedModel]):
    """The source's full processor (tokenizer and image processor) for models that also read text, else None."""
    if "text" not in model_class.input_modalities or isinstance(source, PreTrainedModel):
        return None
    try:
        return AutoProcessor.from_pretrained(str(source))
    except (OSError, ValueError) as error:
        logger.info("No processor in %s: %s", source, error)
        return None


def _rewrite(model: PreTrainedModel, adapter: ArchitectureAdapter, mean, std, options: RewriteOptions) -> None:
    fold_input_normalisation(model, adapter, mean, std)
    bcosify(model, adapter, options)


def convert(
    source: str | PreTrainedModel,
    output_dir: str | Path | None = None,
    *,
    b: float = 2.0,
    keep_bias: bool = False,
    normalize_weights: bool = False,
    logit_bias: float | None = None,
    logit_temperature: float = 1.0,
    image_processor=None,
    image_mean: list[float] | None = None,
    image_std: list[float] | None = None,
) -> Conversion:
    """Convert a checkpoint of a supported family (see ``ADAPTERS``) into a B-cos model.

    Args:
        source: hub id or local folder of a supported checkpoint, or a loaded model (which is copied, not
            changed). A ``...Model`` backbone becomes a ``BcosModel``, a ``...ForImageClassification`` a
            ``BcosForImageClassification``, a ``CLIPModel`` (``SiglipModel``) a ``BcosCLIPModel``
            (``BcosSiglipModel``) whose text tower stays the original (see ``BCOS_CLASSES``).
        output_dir: if given, save the model, its image processor, the remote code, a model card and
            ``conversion_report.json`` there.
        b: the B-cos exponent (>= 1). ``b=1, keep_bias=True`` is the equivalence mode: the converted model
            computes exactly what the source computes. The default (B = 2, no biases) is the model to fine-tune.
        keep_bias: keep the pretrained biases.
        normalize_weights: use unit-norm weights instead of the raw pretrained ones.
        logit_bias: constant added to the logits; defaults to ``-log(C - 1)`` for C classes when biases are
            removed (the recipe's BCE starting point) and 0 when they are kept.
        logit_temperature: the logits are divided by it.
        image_processor: the source's image processor, when ``source`` is a model or has none saved.
        image_mean, image_std: the source's input normalisation, overriding the processor's.

    Returns:
        A ``Conversion`` with the model, the image processor (normalisation off) and the report.
    """
    started = time.perf_counter()
    b = float(b)
    if not b >= 1:
        raise ValueError(f"b must be >= 1 (1 = plain linear, 2 = the usual B-cos model); got {b}.")

    if isinstance(source, PreTrainedModel):
        source_name = source.name_or_path or type(source).__name__
        adapter = get_adapter(source.config.model_type)
        source_model = copy.deepcopy(source).float()
    else:
        source_name = str(source)
        config = AutoConfig.from_pretrained(source_name)
        if config.model_type in {bcos_class.config_class.model_type for bcos_class in BCOS_CLASSES.values()}:
            raise UnsupportedModelError(f"{source_name} is already a B-cos model; load it with from_pretrained.")
        adapter = get_adapter(config.model_type)
        logger.info("Loading %s", source_name)
        source_model = _load_source(source_name, adapter, config)
        if image_processor is None:
            try:
                image_processor = AutoImageProcessor.from_pretrained(source_name)
            except (OSError, ValueError) as error:
                logger.info("No image processor in %s: %s", source_name, error)
    source_model.eval()
    task = _task_for(source_model, adapter)
    model_class = BCOS_CLASSES[task]
    source_architecture = type(source_model).__name__

    if image_mean is None or image_std is None:
        if image_processor is None:
            raise ValueError(
                f"No image processor found for {source_name}, so its input normalisation is unknown. Pass "
                "image_processor=..., or image_mean=[...] and image_std=[...] (CLI: --image-mean/--image-std)."
            )
        normalizes = getattr(image_processor, "do_normalize", False)
        image_mean = list(image_processor.image_mean) if normalizes else [0.0, 0.0, 0.0]
        image_std = list(image_processor.image_std) if normalizes else [1.0, 1.0, 1.0]
    image_mean, image_std = [float(v) for v in image_mean], [float(v) for v in image_std]
    if len(image_mean) != 3 or len(image_std) != 3 or min(image_std) <= 0:
        raise ValueError(f"image_mean and image_std need 3 values each, std > 0; got {image_mean}, {image_std}.")

    height, width = _image_size(source_model.config, image_processor)
    generator = torch.Generator().manual_seed(EQUIVALENCE_SEED)
    probe = torch.rand(EQUIVALENCE_BATCH, 3, height, width, generator=generator)

    equivalence = RewriteOptions(b=1.0, keep_bias=True, normalize_weights=False, adapter=adapter)
    requested = RewriteOptions(b=b, keep_bias=keep_bias, normalize_weights=normalize_weights, adapter=adapter)
    expected = _source_output(source_model, probe, image_mean, image_std)
    network = source_model
    if requested == equivalence:
        _rewrite(network, adapter, image_mean, image_std, requested)
        actual = _bcos_output(network, probe)
    else:
        equivalent = copy.deepcopy(source_model)
        _rewrite(equivalent, adapter, image_mean, image_std, equivalence)
        actual = _bcos_output(equivalent, probe)
        del equivalent
        _rewrite(network, adapter, image_mean, image_std, requested)
    gap = float((expected - actual).abs().max())

    num_labels = len(network.config.id2label or {}) if task == "image-classification" else 0
    if logit_bias is None:
        logit_bias = -math.log(num_labels - 1) if (num_labels > 2 and not keep_bias) else 0.0
    config = model_class.config_class(
        source_config=network.config,
        b=b,
        keep_bias=keep_bias,
        normalize_weights=normalize_weights,
        input_mean=image_mean,
        input_std=image_std,
        logit_bias=float(logit_bias),
        logit_temperature=float(logit_temperature),
        source_checkpoint=source_name,
        source_architecture=source_architecture,
        bcos_hf_version=_bcos_hf_version(),
    )
    model = model_class(config, network=network).eval()

    if image_processor is not None:
        image_processor = copy.deepcopy(image_processor)
        image_processor.do_normalize = False
    processor = _load_processor(source, model_class)
    if processor is not None:
        processor.image_processor = image_processor

    report = ConversionReport(
        source=source_name,
        source_architecture=source_architecture,
        model_class=model_class.__name__,
        b=b,
        keep_bias=keep_bias,
        logit_bias=float(logit_bias),
        parameters=sum(p.numel() for p in model.parameters()),
        equivalence_max_abs_diff=gap,
        equivalence_inputs=list(probe.shape),
        seconds=0.0,
        bcos_hf_version=_bcos_hf_version(),
        output_dir=str(output_dir) if output_dir is not None else None,
    )
    if hasattr(source_model, "get_image_features"):
        report.notes.append(IMAGE_TEXT_NOTE)
    if output_dir is not None:
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(output_dir)
        if processor is not None:
            processor.save_pretrained(output_dir)
        elif "text" in model_class.input_modalities:
            report.notes.append("The source has no processor with a tokenizer: none was saved, so pipelines need one.")
        if image_processor is not None and processor is None:
            image_processor.save_pretrained(output_dir)
        elif image_processor is None:
            report.notes.append("The source has no image processor: none was saved, so pipelines need one passed.")
    report.seconds = round(time.perf_counter() - started, 3)
    if output_dir is not None:
        (output_dir / REPORT_FILE).write_text(report.to_json() + "\n")
        (output_dir / "README.md").write_text(
            render_model_card(model.config, report=asdict(report), model_id=str(output_dir))
        )
    return Conversion(model=model, image_processor=image_processor, report=report, processor=processor)
