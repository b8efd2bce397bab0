"""Fine-tune and distil B-cos models with the transformers ``Trainer`` (B-cosification, step two).

``BcosTrainer`` is a ``Trainer`` whose defaults follow the released B-cosification recipe (Arya et al.,
"B-cosification", NeurIPS 2024, and its released training configurations): binary cross-entropy with targets 1
for the true class and 1/C elsewhere on logits that already carry the model's logit bias, adaptive gradient clipping instead of global-norm
clipping, AdamW with a cosine schedule. It adds the paper's ablation schedules (B ramped up from 1, decay of
the biases) and distillation from the original model (KL on logits for classifiers, SigLIP on the image
embeddings for CLIP). Everything else is the Trainer: mixed precision, DDP/FSDP under ``torchrun`` or
``accelerate launch``, safetensors checkpoints, ``resume_from_checkpoint`` and ``push_to_hub`` (with a B-cos
model card).

    args = BcosTrainingArguments(output_dir="out", max_steps=1000)
    trainer = BcosTrainer(model, args, train_dataset=train, eval_dataset=test,
                          data_collator=ImageClassificationCollator(processor), compute_metrics=compute_accuracy)
    trainer.train()
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import AutoConfig, PreTrainedModel, Trainer, TrainingArguments
from transformers.dynamic_module_utils import custom_object_save, get_relative_import_files

from .alignment import FeatureAlignment, default_alignment_blocks, frozen_batchnorm_statistics, resolve_blocks
from .data import check_dataset_labels
from .hub import conversion_report, training_card_details
from .losses import adaptive_clip_grad_, bce_loss, distillation_kl, siglip_distillation_loss
from .model_card import render_model_card
from .modeling.modeling_bcos import BcosModel
from .modeling.modeling_bcos_clip import BcosCLIPModel
from .training_args import BcosTrainingArguments
from .training_callbacks import (
    BiasAnnealCallback,
    BWarmupCallback,
    FiniteWeightsCallback,
    NonFiniteError,
    constant_biases,
)

logger = logging.getLogger(__name__)


def source_with_labels(source: str | Path, labels: list[str]) -> PreTrainedModel:
    """Load a pretrained classifier with a new head for ``labels`` (freshly initialised, the rest pretrained).

    The first step of fine-tuning on a new label set: convert the result with ``bcos_hf.convert.convert``
    (pass the source's image processor), then train it with ``BcosTrainer``.
    """
    config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    name = (config.architectures or ["AutoModelForImageClassification"])[0]
    model_class = getattr(transformers, name, None)
    if not (isinstance(model_class, type) and hasattr(model_class, "from_pretrained")):
        raise ValueError(f"{source} names {name!r}, which is not a transformers model class: bcos_hf loads only those.")
    remote = {"trust_remote_code": False} if name.startswith("Auto") else {}
    return model_class.from_pretrained(
        source,
        **remote,
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: index for index, label in enumerate(labels)},
        ignore_mismatched_sizes=True,
        dtype=torch.float32,
    )


def is_bcos_model(model: nn.Module) -> bool:
    """A model converted by bcos_hf (loaded with bcos_hf or through remote code)."""
    config = getattr(model, "config", None)
    return str(getattr(config, "model_type", "")).startswith("bcos")


def _check_bcos_model(model: nn.Module | None) -> None:
    if model is None:
        raise ValueError("BcosTrainer needs a model (model_init is not supported): pass model=<a B-cos model>.")
    if not is_bcos_model(model):
        raise TypeError(
            f"BcosTrainer trains B-cos models; got a {type(model).__name__} "
            f"(model_type {getattr(getattr(model, 'config', None), 'model_type', None)!r}). Convert it first: "
            "bcos_hf.convert.convert(model_or_hub_id, output_dir) (CLI: bcos-hf convert SRC OUT), then load the "
            "folder with AutoModelForImageClassification.from_pretrained, or use the plain transformers Trainer "
            "for a non-B-cos model."
        )


def _train_image_tower_only(model: BcosCLIPModel) -> None:
    """Image-embedding distillation trains the B-cos image tower: the text tower and the zero-shot logit scale
    (and SigLIP's logit bias) stay as pretrained, and out of DDP's gradient reduction."""
    model.freeze_text_tower()
    for name in ("logit_scale", "logit_bias"):
        parameter = getattr(model.network, name, None)
        if isinstance(parameter, nn.Parameter):
            parameter.requires_grad_(False)


def _without_normalisation(processor):
    """The image processor B-cos models need: the same one with mean/std normalisation off (folded into the model)."""
    if not getattr(processor, "do_normalize", False):
        return processor
    logger.warning(
        "The image processor given to BcosTrainer normalises images; B-cos models take images in [0, 1] (the "
        "normalisation is folded into the first layer), so a copy with do_normalize=False is saved and pushed."
    )
    processor = copy.deepcopy(processor)
    processor.do_normalize = False
    return processor


def _check_teacher(teacher: nn.Module, student: PreTrainedModel) -> None:
    """The teacher must be the original model the student was converted from (or a B-cos copy of it)."""
    config = student.config
    teacher_config = getattr(teacher, "config", None)
    teacher_type = getattr(teacher_config, "model_type", None)
    expected_type = config.source_config.model_type
    fix = (
        f"Pass the model the student was converted from ({config.source_checkpoint or config.source_architecture}, "
        f"loaded with {config.source_architecture}.from_pretrained), or a B-cos model of the same architecture."
    )
    if teacher_type == config.model_type:
        teacher_type = teacher_config.source_config.model_type
    if teacher_type != expected_type:
        raise ValueError(
            f"The teacher's architecture ({type(teacher).__name__}, model_type {teacher_type!r}) does not match "
            f"the student's ({config.source_architecture}, model_type {expected_type!r}). {fix}"
        )
    teacher_labels = getattr(teacher_config, "num_labels", None)
    if not isinstance(student, BcosCLIPModel) and teacher_labels != config.num_labels:
        raise ValueError(
            f"The teacher has {teacher_labels} labels but the student has {config.num_labels}: their logits cannot "
            f"be compared. {fix}"
        )


class BcosTrainer(Trainer):
    """A ``Trainer`` for B-cos models: the recipe's loss and clipping, ablation schedules and distillation.

    Args:
        model: a B-cos model: a ``BcosForImageClassification`` (label loss, optionally with distillation) or a
            ``BcosCLIPModel``/``BcosSiglipModel`` (image-embedding distillation, SigLIP loss; only the image
            tower trains). Anything else raises with how to convert it.
        args: ``BcosTrainingArguments`` (plain ``TrainingArguments`` raise: they lack the recipe's fields).
        teacher: frozen teacher for distillation (required for CLIP): the original (non-B-cos) model the student
            was converted from. It is prepared by accelerate in evaluation mode, outside the student, the optimiser
            and DDP; it sees the images normalised as the source expects (``config.input_mean/std``).
        **kwargs: everything ``Trainer`` takes (``train_dataset``, ``data_collator``, ``compute_metrics``, ...).

    Losses are per-batch means, so ``loss_is_scaled_for_ga = False``: the Trainer divides them by the number
    of accumulation steps, and accumulation 4 x batch 2 gives the gradient of one batch of 8.
    """

    loss_is_scaled_for_ga = False

    def __init__(
        self, model: PreTrainedModel | None = None, args: TrainingArguments | None = None, *, teacher=None, **kwargs
    ):
        _check_bcos_model(model)
        if args is None:
            args = BcosTrainingArguments(output_dir="trainer_output")
        elif not isinstance(args, BcosTrainingArguments):
            raise TypeError(
                "BcosTrainer takes BcosTrainingArguments (TrainingArguments plus the recipe's loss, clipping and "
                "schedules); got TrainingArguments. Build BcosTrainingArguments(...) with the same fields."
            )
        self.distils_embeddings = isinstance(model, BcosCLIPModel)
        if self.distils_embeddings and teacher is None:
            raise ValueError(
                f"A {type(model).__name__} is trained by distilling the original model's image embeddings: pass "
                f"teacher=<the {model.config.source_architecture} it was converted from "
                f"({model.config.source_checkpoint})>."
            )
        if args.alignment_weight > 0 and teacher is None:
            raise ValueError(
                f"alignment_weight={args.alignment_weight} aligns the student with its original: pass "
                f"teacher=<the {model.config.source_architecture} it was converted from "
                f"({model.config.source_checkpoint})>, or set alignment_weight=0."
            )
        label_free = self.distils_embeddings or args.alignment_weight > 0
        for split in ("train_dataset", "eval_dataset"):
            dataset = kwargs.get(split)
            if dataset is not None and hasattr(dataset, "__len__") and len(dataset) == 0:
                raise ValueError(f"The {split} is empty: it must hold at least one example.")
            if dataset is not None and not label_free:
                check_dataset_labels(dataset, model.config, split)
        if teacher is not None:
            _check_teacher(teacher, model)
        if self.distils_embeddings:
            _train_image_tower_only(model)
        processor = kwargs.get("processing_class") or getattr(kwargs.get("data_collator"), "image_processor", None)
        if processor is not None:  # saved with every checkpoint and pushed to the Hub
            kwargs["processing_class"] = _without_normalisation(processor)
        super().__init__(model=model, args=args, **kwargs)
        self.final_b = float(model.config.b)
        if args.b_warmup_steps > 0:
            self.add_callback(BWarmupCallback(self.final_b, args.b_warmup_steps))
        if args.bias_anneal_steps > 0:
            if not model.config.keep_bias:
                raise ValueError(
                    f"bias_anneal_steps={args.bias_anneal_steps} anneals the biases of a model converted with "
                    "keep_bias=True, but this model has none: convert with keep_bias=True (CLI: --keep-bias) to "
                    "start from the exact original, or set bias_anneal_steps=0."
                )
            self.add_callback(BiasAnnealCallback(args.bias_anneal_steps))
        self.add_callback(FiniteWeightsCallback())
        self.teacher = None
        if teacher is not None:
            teacher.eval().requires_grad_(False)
            self.teacher = self.accelerator.prepare_model(teacher, evaluation_mode=True)
        self.teacher_takes_raw_pixels = teacher is not None and is_bcos_model(teacher)
        self.alignment_paths: list[str] | None = None

    # Loss ------------------------------------------------------------------------------------------------

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        """The Trainer's step, stopped with a clear error at the first NaN or infinite loss (the Trainer's logs
        would filter it out and show 0.0)."""
        loss = super().training_step(model, inputs, num_items_in_batch)
        if not bool(torch.isfinite(loss).all()):
            raise NonFiniteError(
                f"Step {self.state.global_step + 1}: the loss is {float(loss.float().mean())}. Check the data (NaN "
                "images), the model's weights and the loss settings; lower the learning rate or resume from the "
                "last checkpoint."
            )
        return loss

    def label_loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        classes = logits.shape[-1]
        valid = (labels >= 0) & (labels < classes)
        if self.args.loss == "cross_entropy":
            valid |= labels == -100  # cross-entropy's "ignore" label
        if not bool(valid.all()):
            raise ValueError(
                f"Labels must be class indices in [0, {classes}) for this model; the batch has "
                f"{sorted(set(labels[~valid].tolist()))[:5]}. The dataset's labels do not match the model's: see "
                "bcos_hf.data.check_dataset_labels."
            )
        if self.args.loss == "cross_entropy":
            return F.cross_entropy(logits.float(), labels)
        return bce_loss(logits, labels, self.args.bce_off_target)

    def teacher_inputs(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The images as the teacher expects them: normalised like the source model (``config.input_mean/std``)."""
        if self.teacher_takes_raw_pixels:
            return pixel_values
        config = self.accelerator.unwrap_model(self.model).config
        mean = torch.tensor(config.input_mean, device=pixel_values.device).view(1, 3, 1, 1)
        std = torch.tensor(config.input_std, device=pixel_values.device).view(1, 3, 1, 1)
        return (pixel_values[:, :3] - mean) / std

    @torch.no_grad()
    def teacher_image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The frozen teacher's image embeddings (CLIP: projected class token) of the same images."""
        features = self.teacher.get_image_features(pixel_values=self.teacher_inputs(pixel_values))
        return getattr(features, "pooler_output", features)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """Label loss (BCE or cross-entropy), mixed with the KL to the teacher when there is one; for CLIP the
        SigLIP distillation of the image embeddings (labels, if any, are ignored); plus, with
        ``alignment_weight``, the feature alignment with the teacher after every alignment block.

        A per-batch mean (``num_items_in_batch`` is not needed: ``loss_is_scaled_for_ga`` is False).
        """
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        if self.args.alignment_weight > 0:
            with self._alignment() as alignment, self._batchnorm_context(model):
                loss, outputs = self._task_loss(model, inputs, labels)
                aligned = alignment.loss()
            loss = aligned * self.args.alignment_weight if loss is None else loss + self.args.alignment_weight * aligned
        else:
            with self._batchnorm_context(model):
                loss, outputs = self._task_loss(model, inputs, labels)
        return (loss, outputs) if return_outputs else loss

    def _batchnorm_context(self, model):
        return frozen_batchnorm_statistics(model) if self.args.freeze_batchnorm_statistics else nullcontext()

    def _alignment(self) -> FeatureAlignment:
        """Hooks for this step: teacher-forced for the first ``teacher_forced_steps``, then ``alignment_mode``."""
        student = self.accelerator.unwrap_model(self.model)
        teacher = self.accelerator.unwrap_model(self.teacher)
        if self.alignment_paths is None:
            self.alignment_paths = resolve_blocks(
                teacher, self.args.alignment_blocks or default_alignment_blocks(student)
            )
        forced = self.state.global_step < self.args.teacher_forced_steps
        return FeatureAlignment(
            student.network, teacher, self.alignment_paths, "teacher_forced" if forced else self.args.alignment_mode
        )

    def _task_loss(self, model, inputs: dict, labels) -> tuple[torch.Tensor | None, object]:
        """The loss on the model's own output (None for a backbone aligned without labels) and the outputs.

        The teacher runs first: teacher-forced alignment feeds its block inputs to the student.
        """
        pixel_values = inputs["pixel_values"]
        if self.distils_embeddings:
            teacher_embeddings = self.teacher_image_embeddings(pixel_values)
            placeholder = torch.zeros((1, 1), dtype=torch.long, device=pixel_values.device)
            outputs = model(pixel_values=pixel_values, input_ids=placeholder)
            return siglip_distillation_loss(outputs.image_embeds, teacher_embeddings), outputs
        teacher_logits = None
        if self.teacher is not None:
            with torch.no_grad():
                teacher_outputs = self.teacher(pixel_values=self.teacher_inputs(pixel_values))
            teacher_logits = getattr(teacher_outputs, "logits", None)
        outputs = model(**inputs)
        logits = getattr(outputs, "logits", None)
        if logits is None:  # a backbone: only the alignment trains it
            return None, outputs
        if labels is None and teacher_logits is None:
            raise ValueError(
                "The batch has no 'labels' and there is no teacher to distil from: use a collator that returns "
                "labels (bcos_hf.data.ImageClassificationCollator), or pass teacher=<the original model>."
            )
        loss = self.label_loss(logits, labels) if labels is not None else None
        if teacher_logits is not None:
            distillation = distillation_kl(logits, teacher_logits, self.args.distillation_temperature)
            alpha = self.args.distillation_alpha if loss is not None else 1.0
            loss = alpha * distillation + (1 - alpha) * loss if loss is not None else distillation
        return loss, outputs

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation of an image-embedding distillation or a backbone's alignment is its loss (CLIP's forward needs
        texts otherwise; a backbone has no logits)."""
        if not (self.distils_embeddings or isinstance(self.accelerator.unwrap_model(model), BcosModel)):
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys)
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    # Optimiser and clipping ------------------------------------------------------------------------------

    def create_optimizer(self, model=None):
        """AdamW as the Trainer builds it; with ``bias_decay`` the constant-term biases get their own decay group."""
        optimizer = super().create_optimizer(model)
        biases = self._decayable_biases(model or self.model) if self.args.bias_decay > 0 else []
        if biases:
            ids = {id(bias) for bias in biases}
            for group in optimizer.param_groups:
                group["params"] = [p for p in group["params"] if id(p) not in ids]
            optimizer.add_param_group({"params": biases, "weight_decay": self.args.bias_decay})
        return optimizer

    @staticmethod
    def _decayable_biases(model: nn.Module) -> list[nn.Parameter]:
        return [bias for _, bias in constant_biases(model) if bias.requires_grad]

    def _clip_grad_norm(self, model):
        """Adaptive clipping replaces the Trainer's global-norm clipping when ``adaptive_clipping`` is on."""
        if not self.args.adaptive_clipping:
            return super()._clip_grad_norm(model)
        self.accelerator.unscale_gradients()  # fp16: clip the true gradients, not the loss-scaled ones
        return adaptive_clip_grad_(model.parameters(), self.args.clip_factor, self.args.clip_eps)

    # Checkpoints -----------------------------------------------------------------------------------------

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Load a checkpoint's weights the way ``from_pretrained`` does.

        The Trainer loads ``model.safetensors`` with ``load_state_dict(strict=False)``, but transformers 5 saves
        some architectures (ViT among them) under their v4 key names and renames them only in
        ``from_pretrained``: the renamed weights would silently keep their pre-resume values.
        """
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or not _has_safetensors(resume_from_checkpoint):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        _load_weights(model or self.model, resume_from_checkpoint)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """Save as the Trainer does, then repair what FSDP2 breaks: it swaps the model's class for a subclass
        defined in torch, so ``save_pretrained`` copies torch's files instead of the B-cos model code and points
        ``auto_map`` at them; the folder would not load with ``trust_remote_code``."""
        model = self.accelerator.unwrap_model(self.model)
        model_class = next(cls for cls in type(model).__mro__ if not cls.__module__.startswith("torch."))
        auto_map = dict(model.config.auto_map or {})
        super()._save(output_dir, state_dict)
        if model_class is not type(model) and self.args.should_save:
            _restore_model_code(model, model_class, Path(output_dir or self.args.output_dir), auto_map)

    def _load_best_model(self) -> None:
        """``load_best_model_at_end`` through ``from_pretrained`` too (see ``_load_from_checkpoint``)."""
        best = self.state.best_model_checkpoint
        if self.is_fsdp_enabled or self.is_deepspeed_enabled or not _has_safetensors(best):
            return super()._load_best_model()
        _load_weights(self.model, best)

    # Hub -------------------------------------------------------------------------------------------------

    def create_model_card(self, model_name: str | None = None, **kwargs) -> None:
        """Write the B-cos model card (model_cards/) with the training set-up and the evaluation results.

        ``Trainer.push_to_hub`` calls it before uploading the output folder; keyword arguments are those of
        ``Trainer.create_model_card`` (``dataset=...`` names the training data on the card).
        """
        if not self.is_world_process_zero():
            return
        model = self.accelerator.unwrap_model(self.model)
        rows, sections = training_card_details(self, **kwargs)
        output_dir = Path(self.args.output_dir)
        report = conversion_report(model)
        if report is not None:
            (output_dir / "conversion_report.json").write_text(json.dumps(report, indent=2) + "\n")
        card = render_model_card(
            model.config,
            report=report,
            model_id=self.hub_model_id or model_name or output_dir.name,
            extra_rows=rows,
            sections=sections,
            fine_tuned=True,
        )
        (output_dir / "README.md").write_text(card)


def _has_safetensors(folder: str | None) -> bool:
    return folder is not None and any(Path(folder).glob("model*.safetensors"))


def _load_weights(model: PreTrainedModel, folder: str) -> None:
    """Copy the weights saved in ``folder`` into ``model``, every key mapped as ``from_pretrained`` maps it."""
    saved = type(model).from_pretrained(folder, dtype=model.dtype)
    model.load_state_dict(saved.state_dict(), strict=True)


def _restore_model_code(model: PreTrainedModel, model_class: type, folder: Path, auto_map: dict) -> None:
    """Replace the wrapper's source files in a saved folder by the model's own code and ``auto_map``."""
    wrapper_file = Path(sys.modules[type(model).__module__].__file__)
    for name in {wrapper_file.name, *(Path(path).name for path in get_relative_import_files(str(wrapper_file)))}:
        (folder / name).unlink(missing_ok=True)
    custom_object_save(model_class, folder)
    model.config.auto_map = auto_map
    model.config.save_pretrained(folder)
