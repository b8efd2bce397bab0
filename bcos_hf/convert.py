"""Convert a pretrained Hugging Face vision checkpoint into a B-cos model (B-cosification, step one).

``convert`` loads the source model, folds its input normalisation into the first layer, rewrites every
module with the architecture's adapter, measures how far the B = 1, biases-kept conversion is from the
source (the equivalence check, run on every conversion), and optionally saves a folder that loads with
``from_pretrained`` (with or without bcos_hf installed), works in pipelines and carries a model card and a
``conversion_report.json``.
"""

from __future__ import annotations

import copy
import importlib
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import transformers
from safetensors import SafetensorError
from transformers import AutoConfig, AutoImageProcessor, AutoProcessor, PreTrainedModel

from .alignment import calibrate_batchnorm, has_batchnorm
from .guards import atomic_folder, check_output_folder, dump_json, resolve_model_reference
from .model_card import render_model_card
from .modeling.adapters import get_adapter
from .modeling.bcos_layers import check_b, check_logit_layer
from .modeling.modeling_bcos import (
    BcosPreTrainedModel,
    non_finite_parameters,
)
from .modeling.rewriting import (
    ArchitectureAdapter,
    RewriteOptions,
    UnsupportedModelError,
    bcosify,
    fold_input_normalisation,
)
from .modeling.tasks import TASKS, BcosTask

logger = logging.getLogger(__name__)

REPORT_FILE = "conversion_report.json"
EQUIVALENCE_BATCH = 2
EQUIVALENCE_SEED = 0


def _bcos_class(task: BcosTask) -> type[BcosPreTrainedModel]:
    module, name = task.model_class.rsplit(".", 1)
    return getattr(importlib.import_module(f".modeling.{module}", __package__), name)


BCOS_CLASSES: dict[str, type[BcosPreTrainedModel]] = {task.name: _bcos_class(task) for task in TASKS}
"""The B-cos class a source model becomes, by the task its adapter lists it under (``model_classes``); derived
from the task registry (``bcos_hf.modeling.tasks.TASKS``)."""

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
    batchnorm_calibration: str | None
    """How the BatchNorm running statistics were re-estimated after the rewrite (None: kept from the source)."""
    seconds: float
    """Wall time of the whole conversion: loading, equivalence check, rewriting and saving."""
    bcos_hf_version: str
    transformers_version: str = transformers.__version__
    torch_version: str = torch.__version__
    output_dir: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return dump_json(asdict(self))


@dataclass
class Conversion:
    """The result of ``convert``: the B-cos model, its image processor (normalisation off) and the report.

    Image-text models also get their full ``processor`` (tokenizer and that image processor).
    """

    model: BcosPreTrainedModel
    image_processor: object | None
    report: ConversionReport
    processor: object | None = None
    started: float | None = field(default=None, repr=False)
    """``time.perf_counter()`` when the conversion began: saving sets ``report.seconds`` from it."""

    def save_pretrained(self, output_dir: str | Path, overwrite: bool = False) -> Path:
        """Save the model, its processor, the model code, a model card and ``conversion_report.json``.

        Atomic: everything is written to a staging folder beside ``output_dir`` that is renamed to it only when
        complete. An existing non-empty ``output_dir`` is refused unless ``overwrite``; the source checkpoint's
        folder (``report.source``) is refused always. A failed write (e.g. a full disk) leaves nothing behind.
        """
        self.report.output_dir = str(output_dir)
        try:
            with atomic_folder(output_dir, overwrite, protected=[self.report.source]) as staging:
                self._write(staging)
        except (FileExistsError, FileNotFoundError, NotADirectoryError):
            raise
        except (OSError, SafetensorError, RuntimeError) as error:
            raise OSError(
                f"Could not write the converted model to {output_dir}: {error}. Nothing was written there; free "
                "some disk space or choose another folder, and convert again."
            ) from error
        return Path(output_dir)

    def _write(self, folder: Path) -> None:
        model_class = type(self.model)
        self.model.save_pretrained(folder)
        if self.processor is not None:
            self.processor.save_pretrained(folder)
        elif "text" in model_class.input_modalities:
            self.report.notes.append(
                "The source has no processor with a tokenizer: none was saved, so pipelines need one."
            )
        if self.image_processor is not None and self.processor is None:
            self.image_processor.save_pretrained(folder)
        elif self.image_processor is None:
            self.report.notes.append("The source has no image processor: none was saved, so pipelines need one passed.")
        if self.started is not None:
            self.report.seconds = round(time.perf_counter() - self.started, 3)
        (folder / REPORT_FILE).write_text(self.report.to_json() + "\n")
        model_id = Path(self.report.output_dir or folder).name
        (folder / "README.md").write_text(
            render_model_card(
                self.model.config, report=asdict(self.report), model_id=self.report.output_dir or model_id
            )
        )


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
        return AutoProcessor.from_pretrained(str(source), trust_remote_code=False)
    except (OSError, ValueError) as error:
        logger.info("No processor in %s: %s", source, error)
        return None


def check_parameters(
    b: float, logit_bias: float | None, logit_temperature: float, image_mean, image_std
) -> tuple[float, float | None, float]:
    """The one check of ``convert``'s numbers, before anything is loaded: B in [1, 10], a finite logit bias,
    a finite positive temperature, and the mean and std given together (one without the other is an error,
    not silently ignored)."""
    b = check_b(b)
    bias, temperature = check_logit_layer(0.0 if logit_bias is None else logit_bias, logit_temperature)
    if (image_mean is None) != (image_std is None):
        given, missing = ("image_mean", "image_std") if image_std is None else ("image_std", "image_mean")
        raise ValueError(
            f"{given} was given without {missing}: the normalisation needs both (CLI: --image-mean and --image-std, "
            "3 values each), or neither to take the source's image processor's."
        )
    return b, (None if logit_bias is None else bias), temperature


def resolve_source(
    source: str | Path | PreTrainedModel, image_processor
) -> tuple[PreTrainedModel, str, ArchitectureAdapter, object | None]:
    """The source model (a float32 copy in eval mode), its name, its adapter and its image processor.

    A folder or Hub id is loaded with the class its config names (the backbone class when it names none),
    never running code from the folder; the image processor is read from it when none is given.
    """
    if isinstance(source, PreTrainedModel):
        adapter = get_adapter(source.config.model_type)
        return (
            copy.deepcopy(source).float().eval(),
            source.name_or_path or type(source).__name__,
            adapter,
            image_processor,
        )
    name = resolve_model_reference(source, "the source")
    config = _read(name, "config", lambda: AutoConfig.from_pretrained(name, trust_remote_code=False))
    if config.model_type in {bcos_class.config_class.model_type for bcos_class in BCOS_CLASSES.values()}:
        raise UnsupportedModelError(f"{name} is already a B-cos model; load it with from_pretrained.")
    adapter = get_adapter(config.model_type)
    class_name = (config.architectures or [adapter.model_classes.get("base")])[0]
    if adapter.task_of(class_name) is None:
        raise UnsupportedModelError(
            f"{name} is a {class_name}; bcos_hf converts these {adapter.model_type} classes: "
            f"{_supported_classes(adapter)}."
        )
    logger.info("Loading %s", name)
    model_class = getattr(transformers, class_name)
    model, info = _read(
        name, "weights", lambda: model_class.from_pretrained(name, dtype=torch.float32, output_loading_info=True)
    )
    missing = sorted(info.get("missing_keys") or [])
    if missing:  # transformers would initialise them randomly, and the conversion would carry them on
        raise ValueError(
            f"{name} lacks {len(missing)} weights of its {class_name} ({', '.join(missing[:5])}"
            f"{', ...' if len(missing) > 5 else ''}): they would be random. Save or download the checkpoint again."
        )
    if image_processor is None:
        try:
            image_processor = AutoImageProcessor.from_pretrained(name, trust_remote_code=False)
        except (OSError, ValueError) as error:
            logger.info("No image processor in %s: %s", name, error)
    return model.eval(), name, adapter, image_processor


def _read(name: str, what: str, load):
    """Run ``load``; a failure to read becomes an OSError that says what could not be read and what to do."""
    try:
        return load()
    except (UnsupportedModelError, ValueError):
        raise
    except (OSError, SafetensorError, RuntimeError) as error:
        local = Path(name).exists()
        hint = (
            "The files may be truncated or corrupt: save or download the checkpoint again."
            if local
            else "It is not a local folder, and the Hub could not provide it: check the id and the connection "
            "(or HF_HUB_OFFLINE)."
        )
        reason = (str(error).splitlines() or [type(error).__name__])[0].rstrip(".")
        raise OSError(f"Could not read the {what} of {name}: {reason}. {hint}") from error


def input_normalisation(source_name: str, image_processor, image_mean, image_std) -> tuple[list[float], list[float]]:
    """The source's input mean and std: those given, else its image processor's (none if it does not
    normalise); 3 finite values each, std > 0."""
    if image_mean is None:
        if image_processor is None:
            raise ValueError(
                f"No image processor found for {source_name}, so its input normalisation is unknown. Pass "
                "image_processor=..., or image_mean=[...] and image_std=[...] (CLI: --image-mean/--image-std)."
            )
        normalizes = getattr(image_processor, "do_normalize", False)
        image_mean = list(image_processor.image_mean) if normalizes else [0.0, 0.0, 0.0]
        image_std = list(image_processor.image_std) if normalizes else [1.0, 1.0, 1.0]
    mean, std = [float(v) for v in image_mean], [float(v) for v in image_std]
    if len(mean) != 3 or len(std) != 3 or not all(math.isfinite(v) for v in mean + std) or min(std) <= 0:
        raise ValueError(f"image_mean and image_std need 3 finite values each, std > 0; got {mean}, {std}.")
    return mean, std


def probe_batch(config, image_processor) -> torch.Tensor:
    """The fixed batch of seeded random images in [0, 1] the equivalence check runs on."""
    height, width = _image_size(config, image_processor)
    generator = torch.Generator().manual_seed(EQUIVALENCE_SEED)
    return torch.rand(EQUIVALENCE_BATCH, 3, height, width, generator=generator)


CALIBRATION_IMAGES = 32
CALIBRATION_SIDE = 128
"""Seeded uniform-noise images (at most this side) on which an inexactly converted BatchNorm network re-estimates
its running statistics: noise is stationary, so a small side gives the same per-channel statistics for less."""


def calibrate_converted_batchnorms(model: BcosPreTrainedModel, probe: torch.Tensor) -> str | None:
    """Re-estimate the BatchNorm running statistics of an inexact conversion; returns what was done, for the report.

    A conversion to B > 1 shrinks every layer's output by ``|cos|`` while each BatchNorm still divides by the
    source's running variance, so a deep BatchNorm network (MobileNetV2) outputs exact zeros and its logits tie
    (docs/keeping-knowledge.md). Statistics measured on the converted model itself restore the scale. Seeded
    uniform noise needs no data and measured better than Fashion-MNIST images for the frozen-feature probe.
    Users with images can calibrate again on them (``bcos_hf.alignment.calibrate_batchnorm``).
    """
    if not has_batchnorm(model):
        return None
    height, width = (min(side, CALIBRATION_SIDE) for side in probe.shape[2:])
    generator = torch.Generator().manual_seed(EQUIVALENCE_SEED + 1)
    batches = [torch.rand(16, 3, height, width, generator=generator) for _ in range(CALIBRATION_IMAGES // 16)]
    calibrate_batchnorm(model, batches)
    return f"re-estimated on {CALIBRATION_IMAGES} seeded uniform-noise images of {height} x {width} px"


def rewrite_checked(
    source_model: PreTrainedModel,
    adapter: ArchitectureAdapter,
    mean,
    std,
    probe: torch.Tensor,
    requested: RewriteOptions,
) -> tuple[PreTrainedModel, float]:
    """Rewrite ``source_model`` in place with ``requested`` and return it with the equivalence gap: the largest
    |difference| between the source's output and the B = 1, biases-kept rewrite's on ``probe``."""
    expected = _source_output(source_model, probe, mean, std)
    if not torch.isfinite(expected).all():
        broken = non_finite_parameters(source_model)
        raise ValueError(
            "The source model's output on images in [0, 1] holds NaN or infinity"
            + (f": its weights do ({', '.join(broken[:5])})" if broken else "")
            + ". Convert a checkpoint that works."
        )
    equivalence = RewriteOptions(b=1.0, keep_bias=True, normalize_weights=False, adapter=adapter)
    if requested == equivalence:
        _rewrite(source_model, adapter, mean, std, requested)
        actual = _bcos_output(source_model, probe)
    else:
        equivalent = copy.deepcopy(source_model)
        _rewrite(equivalent, adapter, mean, std, equivalence)
        actual = _bcos_output(equivalent, probe)
        del equivalent
        _rewrite(source_model, adapter, mean, std, requested)
    return source_model, float((expected - actual).abs().max())


def _rewrite(model: PreTrainedModel, adapter: ArchitectureAdapter, mean, std, options: RewriteOptions) -> None:
    fold_input_normalisation(model, adapter, mean, std)
    bcosify(model, adapter, options)


def default_logit_bias(network: PreTrainedModel, task: str, keep_bias: bool) -> float:
    """The recipe's starting point: ``-log(C - 1)`` for C > 2 classes without biases (every class at
    probability 1/C under the BCE loss), else 0."""
    num_labels = len(network.config.id2label or {}) if task == "image-classification" else 0
    return -math.log(num_labels - 1) if (num_labels > 2 and not keep_bias) else 0.0


def build_model(
    network: PreTrainedModel, model_class: type[BcosPreTrainedModel], options: RewriteOptions, **recorded
) -> BcosPreTrainedModel:
    """Wrap the rewritten ``network`` in its B-cos class, with a config that rebuilds it bit for bit; refuse a
    result with NaN or infinite weights."""
    config = model_class.config_class(
        source_config=network.config,
        b=options.b,
        keep_bias=options.keep_bias,
        normalize_weights=options.normalize_weights,
        bcos_hf_version=_bcos_hf_version(),
        **recorded,
    )
    model = model_class(config, network=network).eval()
    broken = non_finite_parameters(model)
    if broken:
        raise ValueError(
            f"The converted model has NaN or infinite weights ({', '.join(broken[:5])}): the source's weights or "
            "the normalisation are not finite. Nothing was saved."
        )
    return model


def _processors(source, model_class: type[BcosPreTrainedModel], image_processor) -> tuple[object | None, object | None]:
    """The image processor with normalisation off (it is folded into the model) and, for image-text models, the
    source's full processor carrying it."""
    if image_processor is not None:
        image_processor = copy.deepcopy(image_processor)
        image_processor.do_normalize = False
    processor = _load_processor(source, model_class)
    if processor is not None:
        processor.image_processor = image_processor
    return image_processor, processor


def _report(
    model: BcosPreTrainedModel,
    source_name: str,
    options: RewriteOptions,
    logit_bias: float,
    gap: float,
    probe_shape: list[int],
    calibration: str | None,
    is_image_text: bool,
) -> ConversionReport:
    """What the conversion did and measured (its ``seconds`` are filled in when it is saved)."""
    config = model.config
    return ConversionReport(
        source=source_name,
        source_architecture=config.source_architecture,
        model_class=type(model).__name__,
        b=options.b,
        keep_bias=options.keep_bias,
        logit_bias=float(logit_bias),
        parameters=sum(p.numel() for p in model.parameters()),
        equivalence_max_abs_diff=gap,
        equivalence_inputs=probe_shape,
        batchnorm_calibration=calibration,
        seconds=0.0,
        bcos_hf_version=_bcos_hf_version(),
        notes=[IMAGE_TEXT_NOTE] if is_image_text else [],
    )


def convert(
    source: str | Path | PreTrainedModel,
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
    batchnorm_calibration: bool = True,
    overwrite: bool = False,
) -> Conversion:
    """Convert a checkpoint of a supported family (see ``ADAPTERS``) into a B-cos model: the conversion's steps, each
    a function of this module (the length is this docstring's).

    Args:
        source: hub id or local folder of a supported checkpoint, or a loaded model (which is copied, not
            changed). A ``...Model`` backbone becomes a ``BcosModel``, a ``...ForImageClassification`` a
            ``BcosForImageClassification``, a ``CLIPModel`` (``SiglipModel``) a ``BcosCLIPModel``
            (``BcosSiglipModel``) whose text tower stays the original (see ``BCOS_CLASSES``).
        output_dir: if given, save the model there (``Conversion.save_pretrained``: atomic, never over the
            source, an existing non-empty folder only with ``overwrite``).
        b: the B-cos exponent (1 to 10). ``b=1, keep_bias=True`` is the equivalence mode: the converted model
            computes exactly what the source computes. The default (B = 2, no biases) is the model to fine-tune.
        keep_bias: keep the pretrained biases.
        normalize_weights: use unit-norm weights instead of the raw pretrained ones.
        logit_bias: constant added to the logits; defaults to ``-log(C - 1)`` for C classes when biases are
            removed (the recipe's BCE starting point) and 0 when they are kept.
        logit_temperature: the logits are divided by it.
        image_processor: the source's image processor, when ``source`` is a model or has none saved.
        image_mean, image_std: the source's input normalisation, overriding the processor's (both or neither).
        batchnorm_calibration: BatchNorm networks converted inexactly (B > 1 or biases removed) re-estimate their
            running statistics on seeded noise images (``calibrate_converted_batchnorms``); exact conversions
            never do.
        overwrite: replace an existing non-empty ``output_dir``.

    Returns:
        A ``Conversion`` with the model, the image processor (normalisation off) and the report.
    """
    started = time.perf_counter()
    b, logit_bias, logit_temperature = check_parameters(b, logit_bias, logit_temperature, image_mean, image_std)
    if output_dir is not None:  # refuse a bad target before the work, not after it
        check_output_folder(output_dir, overwrite, [source] if isinstance(source, (str, Path)) else [])
    source_model, source_name, adapter, image_processor = resolve_source(source, image_processor)
    task = _task_for(source_model, adapter)
    model_class = BCOS_CLASSES[task]
    source_architecture = type(source_model).__name__
    mean, std = input_normalisation(source_name, image_processor, image_mean, image_std)
    probe = probe_batch(source_model.config, image_processor)
    options = RewriteOptions(b=b, keep_bias=keep_bias, normalize_weights=normalize_weights, adapter=adapter)
    is_image_text = hasattr(source_model, "get_image_features")
    network, gap = rewrite_checked(source_model, adapter, mean, std, probe, options)
    if logit_bias is None:
        logit_bias = default_logit_bias(network, task, keep_bias)
    model = build_model(
        network,
        model_class,
        options,
        input_mean=mean,
        input_std=std,
        logit_bias=logit_bias,
        logit_temperature=logit_temperature,
        source_checkpoint=source_name,
        source_architecture=source_architecture,
    )
    exact = b == 1 and keep_bias
    calibration = calibrate_converted_batchnorms(model, probe) if batchnorm_calibration and not exact else None
    image_processor, processor = _processors(source, model_class, image_processor)
    report = _report(model, source_name, options, logit_bias, gap, list(probe.shape), calibration, is_image_text)
    conversion = Conversion(model, image_processor, report, processor, started=started)
    if output_dir is not None:
        conversion.save_pretrained(output_dir, overwrite=overwrite)
    else:
        report.seconds = round(time.perf_counter() - started, 3)
    return conversion
