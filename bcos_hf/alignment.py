"""Label-free alignment of a B-cos model with the model it was converted from (B-cosification, step two).

A conversion to B = 2 without biases changes every block, and in a deep network the changes compound until
the features carry little of the original (measured in docs/keeping-knowledge.md). Alignment brings them
back without labels: the frozen original (the teacher) and the B-cos model (the student) see the same
images, and the student learns to reproduce the teacher's output after every block (its "alignment
blocks": stem, each residual / inverted-residual / transformer block, the final normalisation), plus the
logits (KL) or image embeddings where the model has them (``BcosTrainer`` adds those).

Three modes differ in what each student block sees:

- ``"teacher_forced"``: the teacher's input to the same block. Every block learns to imitate its
  original in isolation, from the first step, and no error compounds: the fastest start.
- ``"chained"``: the student's own input, detached. Each block learns to correct the errors of the blocks
  before it, which is what the model meets at inference; gradients still stay inside each block.
- ``"end_to_end"``: the student's own input, not detached: plain multi-depth feature distillation.

The recipes (``RECIPES``, ``alignment_arguments``) pick the mode per family. The loss of one block is the
squared error relative to the teacher's output energy: per token for token sequences (ViTs carry a few tokens
of very high norm, which would otherwise dominate), per image for feature maps and pooled vectors. The idea
of aligning a B-cos student with its original at several depths without labels follows ALOE (CVPR 2026);
the block-local (teacher-forced, chained) modes are this project's.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .modeling.adapters import get_adapter

ALIGNMENT_MODES = ("teacher_forced", "chained", "end_to_end")


def _source_config(model: nn.Module):
    config = model.config
    return getattr(config, "source_config", None) or config


def default_alignment_blocks(model: nn.Module) -> tuple[str, ...]:
    """The family's alignment-block patterns (``*`` matches one path component), from its adapter."""
    return get_adapter(_source_config(model).model_type).alignment_blocks


def resolve_blocks(network: nn.Module, patterns: tuple[str, ...] | list[str]) -> list[str]:
    """Module paths inside ``network`` (a transformers model) that match ``patterns``, in forward order.

    Patterns are relative to ``network.base_model``; the returned paths are relative to ``network``, so the
    same paths address the teacher (the source model) and the student's ``network`` (its rewritten copy).
    """
    base = network.base_model
    prefix = next((name for name, module in network.named_modules() if module is base), "")
    regexes = [re.compile("^" + re.escape(pattern).replace(r"\*", r"[^.]+") + "$") for pattern in patterns]
    paths = [
        f"{prefix}.{name}" if prefix else name
        for name, _ in base.named_modules()
        if name and any(regex.match(name) for regex in regexes)
    ]
    if not paths:
        raise ValueError(
            f"No module of {type(network).__name__} matches the alignment blocks {list(patterns)}; expected module "
            "paths relative to the base model, with * for one path component (e.g. 'encoder.layer.*')."
        )
    return paths


def relative_squared_error(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Squared error over the teacher's energy: per token for (batch, tokens, dim), per image otherwise."""
    student, teacher = student.float(), teacher.float()
    dims = (-1,) if teacher.dim() == 3 else tuple(range(1, teacher.dim()))
    error = (student - teacher).pow(2).sum(dims)
    energy = teacher.pow(2).sum(dims).clamp_min(1e-12)
    return (error / energy).mean()


def _first_tensor(value):
    return value[0] if isinstance(value, (tuple, list)) else value


class FeatureAlignment:
    """Hooks that record the teacher's and the student's block outputs and give the alignment loss.

    Args:
        student_network: the B-cos model's ``network`` (the rewritten transformers model).
        teacher: the original model (same module paths).
        blocks: module paths (``resolve_blocks``) whose outputs are aligned.
        mode: one of ``ALIGNMENT_MODES`` (see the module docstring).

    Run the teacher first, then the student, then ``loss()``; ``remove()`` (or ``with``) takes the hooks off.
    A block's input is replaced only while the student is in training mode: evaluation sees the student as it
    runs on its own.
    """

    def __init__(self, student_network: nn.Module, teacher: nn.Module, blocks: list[str], mode: str) -> None:
        if mode not in ALIGNMENT_MODES:
            raise ValueError(f"alignment mode must be one of {ALIGNMENT_MODES}; got {mode!r}.")
        self.blocks = list(blocks)
        self.mode = mode
        self.teacher_inputs: dict[str, torch.Tensor] = {}
        self.teacher_outputs: dict[str, torch.Tensor] = {}
        self.student_outputs: dict[str, torch.Tensor] = {}
        self._handles = []
        for path in self.blocks:
            teacher_block = teacher.get_submodule(path)
            student_block = student_network.get_submodule(path)
            self._handles += [
                teacher_block.register_forward_pre_hook(self._record_teacher_input(path)),
                teacher_block.register_forward_hook(self._record(self.teacher_outputs, path)),
                student_block.register_forward_pre_hook(self._student_input(path)),
                student_block.register_forward_hook(self._record(self.student_outputs, path)),
            ]

    def _record_teacher_input(self, path: str):
        def hook(module, args):
            if args and torch.is_tensor(args[0]):
                self.teacher_inputs[path] = args[0].detach()

        return hook

    @staticmethod
    def _record(store: dict, path: str):
        def hook(module, args, output):
            store[path] = _first_tensor(output)

        return hook

    def _student_input(self, path: str):
        def hook(module, args):
            # Only training changes what a block sees: evaluation measures the student as it will run.
            if self.mode == "end_to_end" or not module.training or not args or not torch.is_tensor(args[0]):
                return None
            own = args[0]
            if self.mode == "teacher_forced":
                forced = self.teacher_inputs.get(path)
                if forced is None:
                    raise RuntimeError("Teacher-forced alignment needs the teacher's forward before the student's.")
                # The first block sees the image: the student's encoding differs from the teacher's, keep its own.
                if forced.shape == own.shape:
                    return (forced.to(own.dtype), *args[1:])
            return (own.detach(), *args[1:])

        return hook

    def _block_errors(self) -> list[torch.Tensor]:
        missing = [path for path in self.blocks if path not in self.student_outputs or path not in self.teacher_outputs]
        if missing:
            raise RuntimeError(f"No recorded output for alignment blocks {missing}: run the teacher and the student.")
        errors = [
            relative_squared_error(self.student_outputs[path], self.teacher_outputs[path].detach())
            for path in self.blocks
        ]
        self.student_outputs.clear()
        self.teacher_outputs.clear()
        self.teacher_inputs.clear()
        return errors

    def loss(self) -> torch.Tensor:
        """Mean relative squared error over the blocks of the last teacher and student forwards."""
        return torch.stack(self._block_errors()).mean()

    def block_losses(self) -> list[float]:
        """Each block's relative squared error for the last forwards (for diagnosis; no gradient)."""
        return [error.item() for error in self._block_errors()]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> FeatureAlignment:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def batchnorms(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm of ``model`` (torch's and bcos_hf's uncentred one): the modules with running statistics."""
    return [module for module in model.modules() if getattr(module, "running_var", None) is not None]


@contextmanager
def frozen_batchnorm_statistics(model: nn.Module) -> Iterator[None]:
    """Keep every BatchNorm in evaluation mode (running statistics) while the rest trains.

    Training-mode BatchNorm divides by the batch variance while the evaluation mode divides by the running
    one; during alignment the blocks learn the scale themselves, so both modes then compute the same model.
    """
    norms = [norm for norm in batchnorms(model) if norm.training]
    for norm in norms:
        norm.eval()
    try:
        yield
    finally:
        for norm in norms:
            norm.train()


@torch.no_grad()
def calibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Re-estimate every BatchNorm's running statistics on unlabelled images; returns the number of batches.

    A conversion to B = 2 shrinks every layer's output by ``|cos|`` while the BatchNorms still divide by the
    original's running variances, so deep BatchNorm networks output exact zeros (docs/keeping-knowledge.md measures it).
    Running the model in training mode over a few batches with a cumulative average (``momentum=None``)
    gives the statistics of the converted model itself; the momentum is restored afterwards.
    """
    norms = batchnorms(model)
    saved = [(norm, norm.momentum) for norm in norms]
    for norm in norms:
        norm.running_var.fill_(1.0)  # uncentred BatchNorm has no running mean; a centred one's is reset too
        if getattr(norm, "running_mean", None) is not None:
            norm.running_mean.zero_()
        norm.num_batches_tracked.zero_()
        norm.momentum = None
    was_training = model.training
    model.train()
    count = 0
    try:
        for pixel_values in batches:
            model(pixel_values=pixel_values)
            count += 1
    finally:
        model.train(was_training)
        for norm, momentum in saved:
            norm.momentum = momentum
    if norms and count == 0:
        raise ValueError("calibrate_batchnorm needs at least one batch of images.")
    return count


RECIPES = {
    "batchnorm": {
        "learning_rate": 1e-3,
        "alignment_mode": "chained",
        "teacher_forced_share": 0.5,
        "freeze_batchnorm_statistics": True,
    },
    "other": {
        "learning_rate": 1e-4,
        "alignment_mode": "end_to_end",
        "teacher_forced_share": 0.0,
        "freeze_batchnorm_statistics": False,
    },
}
"""The label-free alignment recipes, chosen by measurement in ``examples/keep_knowledge.py`` (docs/keeping-knowledge.md), with AdamW, a cosine schedule, alignment weight 1 and global-norm clipping:

- BatchNorm networks (MobileNetV2, ResNet): calibrate first (``calibrate_batchnorm``), keep the running
  statistics while training (training and evaluation then compute the same model), the first half of the
  steps teacher-forced, the second half chained, learning rate 1e-3. On MobileNetV2 this keeps nothing of
  the original yet (400 steps: probe 0.253, random init 0.292; at 1e-4 0.148 vs 0.194): the best found, not a
  good one.
- Everything else (ViTs, DINOv2, CLIP, ConvNeXt): end-to-end at 1e-4. On DINOv2-S, 300 steps: probe 0.310
  against 0.222 for a random-init B-cos model aligned the same way; at 3e-4 the pretrained start's edge was
  trained away (0.267 vs 0.261); teacher-forced then chained did worse still in exploratory runs.

The label recipe's adaptive clipping is off: it stalled the chained phase (a flat loss)."""


def has_batchnorm(model: nn.Module) -> bool:
    return bool(batchnorms(model))


def alignment_arguments(model: nn.Module, output_dir: str, max_steps: int, **overrides):
    """``BcosTrainingArguments`` with the alignment recipe (``RECIPES``) for ``model``'s family.

    ``overrides`` are any ``BcosTrainingArguments`` fields (batch size, seed, logging, ...), applied last.
    """
    from .training import BcosTrainingArguments

    if max_steps < 1:
        raise ValueError(f"max_steps must be at least 1; got {max_steps}.")
    recipe = RECIPES["batchnorm" if has_batchnorm(model) else "other"]
    settings = {
        "output_dir": output_dir,
        "max_steps": max_steps,
        "learning_rate": recipe["learning_rate"],
        "alignment_weight": 1.0,
        "alignment_mode": recipe["alignment_mode"],
        "teacher_forced_steps": int(max_steps * recipe["teacher_forced_share"]),
        "freeze_batchnorm_statistics": recipe["freeze_batchnorm_statistics"],
        "adaptive_clipping": False,
        "max_grad_norm": 1.0,
        "save_strategy": "no",
        "logging_steps": max(1, max_steps // 20),
        "report_to": "none",
    }
    settings.update(overrides)
    return BcosTrainingArguments(**settings)
