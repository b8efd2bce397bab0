"""``BcosTrainingArguments``: ``TrainingArguments`` plus the B-cosification recipe's loss, clipping, schedules,
distillation and label-free alignment, each field with its help text (``HfArgumentParser`` reads them)."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments

from .alignment import ALIGNMENT_MODES

LOSSES = ("bce", "cross_entropy")


@dataclass(repr=False)  # keep TrainingArguments' repr, which hides the Hub token
class BcosTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the B-cosification recipe's defaults and its extra knobs.

    Every field has help text, so ``HfArgumentParser(BcosTrainingArguments)`` gives a command line.
    Changed defaults: ``learning_rate=1e-4``, ``lr_scheduler_type="cosine"``, ``weight_decay=0``,
    ``remove_unused_columns=False`` (image columns must reach the collator).
    """

    learning_rate: float = field(
        default=1e-4, metadata={"help": "Peak learning rate of AdamW (the recipe: 1e-4 for CNNs, 1e-3 for ViTs)."}
    )
    lr_scheduler_type: str = field(
        default="cosine", metadata={"help": "Learning-rate schedule; the recipe uses cosine without warm-up."}
    )
    remove_unused_columns: bool = field(
        default=False,
        metadata={
            "help": "Drop dataset columns the model's forward does not take. Off: the collator needs the "
            "'image' column, which the model's forward does not name."
        },
    )
    loss: str = field(
        default="bce",
        metadata={
            "help": "Label loss of classifiers: 'bce' (binary cross-entropy, targets 1 for the true class and "
            "bce_off_target elsewhere; the recipe) or 'cross_entropy'.",
            "choices": list(LOSSES),
        },
    )
    bce_off_target: float | None = field(
        default=None, metadata={"help": "BCE target of the wrong classes; default 1/C for C classes (the recipe)."}
    )
    adaptive_clipping: bool = field(
        default=True,
        metadata={
            "help": "Adaptive gradient clipping (Brock et al. 2021) per unit (row of a weight, filter of a conv): "
            "a unit's gradient norm is capped at clip_factor * max(|unit|, clip_eps). Replaces max_grad_norm "
            "clipping (max_grad_norm is then ignored)."
        },
    )
    clip_factor: float = field(default=0.01, metadata={"help": "Adaptive clipping: the cap relative to the unit norm."})
    clip_eps: float = field(default=1e-3, metadata={"help": "Adaptive clipping: the smallest unit norm used."})
    b_warmup_steps: int = field(
        default=0,
        metadata={
            "help": "Ramp B linearly from 1 to the model's B over this many optimiser steps (paper ablation); "
            "0 trains at the model's B from the start."
        },
    )
    bias_decay: float = field(
        default=0.0,
        metadata={
            "help": "Weight decay applied to the biases only (paper ablation, for models converted with "
            "keep_bias=True): drives the constant terms to zero during fine-tuning. Attention query/key "
            "biases are left alone (they only shape the attention pattern)."
        },
    )
    bias_anneal_steps: int = field(
        default=0,
        metadata={
            "help": "For models converted with keep_bias=True: shrink the constant-term biases linearly to zero "
            "over this many optimiser steps, then remove them, so the trained model is bias-free "
            "(config.keep_bias becomes False). With b_warmup_steps, the gentle path from the exact original."
        },
    )
    distillation_alpha: float = field(
        default=0.5,
        metadata={"help": "Classifier distillation: loss = alpha * KL(teacher || student) + (1 - alpha) * label loss."},
    )
    distillation_temperature: float = field(
        default=1.0, metadata={"help": "Classifier distillation: softmax temperature of the KL term."}
    )
    alignment_weight: float = field(
        default=0.0,
        metadata={
            "help": "Weight of label-free feature alignment with the teacher: the relative squared error between "
            "the student's and the teacher's outputs after every alignment block (stem, each residual or "
            "transformer block, final normalisation), added to the loss. 0 turns it off; needs teacher=."
        },
    )
    alignment_mode: str = field(
        default="chained",
        metadata={
            "help": "What each student block sees during alignment: 'chained' (its own input, detached: every "
            "block corrects the errors before it), 'teacher_forced' (the teacher's input to the same block) or "
            "'end_to_end' (its own input, gradients through the whole network).",
            "choices": list(ALIGNMENT_MODES),
        },
    )
    teacher_forced_steps: int = field(
        default=0,
        metadata={
            "help": "Alignment: the first this many optimiser steps run teacher-forced (every block imitates its "
            "original in isolation, the fastest start) before alignment_mode takes over."
        },
    )
    alignment_blocks: list[str] | None = field(
        default=None,
        metadata={
            "help": "Alignment blocks as module paths inside the base model, '*' for one path component (e.g. "
            "'encoder.layer.*'); default: the architecture's own list (its adapter's alignment_blocks)."
        },
    )
    torch_compile: bool | None = field(
        default=None,
        metadata={
            "help": "Compile the model whole with torch.compile (torch_compile_backend, default inductor). Default: "
            "on when training on CUDA without feature alignment (its per-step hooks would recompile), off on "
            "the CPU; True or False decides."
        },
    )
    freeze_batchnorm_statistics: bool = field(
        default=False,
        metadata={
            "help": "Keep BatchNorm layers on their running statistics while training, so that training and "
            "evaluation compute the same model (use after bcos_hf.alignment.calibrate_batchnorm)."
        },
    )

    def __post_init__(self):
        if self.torch_compile is None:
            self.torch_compile = compiles_by_default(self)
        super().__post_init__()
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}; got {self.loss!r}.")
        if self.bce_off_target is not None and not 0 <= self.bce_off_target < 1:
            raise ValueError(f"bce_off_target must lie in [0, 1); got {self.bce_off_target}.")
        if not 0 <= self.distillation_alpha <= 1:
            raise ValueError(f"distillation_alpha must lie in [0, 1]; got {self.distillation_alpha}.")
        if not 0 < self.distillation_temperature < math.inf:
            raise ValueError(
                f"distillation_temperature must be a finite positive number; got {self.distillation_temperature}."
            )
        if min(self.b_warmup_steps, self.bias_anneal_steps) < 0 or not 0 <= self.bias_decay < math.inf:
            raise ValueError(
                "b_warmup_steps, bias_anneal_steps and bias_decay must be >= 0 (and finite); got "
                f"{self.b_warmup_steps}, {self.bias_anneal_steps}, {self.bias_decay}."
            )
        if not (0 < self.clip_factor < math.inf and 0 < self.clip_eps < math.inf):
            raise ValueError(
                "clip_factor and clip_eps must be finite positive numbers (a NaN factor makes every gradient NaN); "
                f"got {self.clip_factor}, {self.clip_eps}."
            )
        if not 0 <= self.learning_rate < math.inf:
            raise ValueError(f"learning_rate must be a finite number >= 0; got {self.learning_rate}.")
        if self.alignment_mode not in ALIGNMENT_MODES:
            raise ValueError(
                f"alignment_mode must be one of {', '.join(ALIGNMENT_MODES)}; got {self.alignment_mode!r}."
            )
        if not 0 <= self.alignment_weight < math.inf or self.teacher_forced_steps < 0:
            raise ValueError(
                "alignment_weight and teacher_forced_steps must be >= 0; got "
                f"{self.alignment_weight}, {self.teacher_forced_steps}."
            )
        block_local = self.alignment_mode != "end_to_end" or self.teacher_forced_steps > 0
        if self.alignment_weight > 0 and block_local and self.ddp_find_unused_parameters is None:
            # Block-local alignment cuts the graph between blocks, so DDP's search for unused parameters, which
            # walks back from the model's outputs, would take every block but the last for unused and then see
            # its gradient arrive from the block's own loss. Every block has a loss: none is unused.
            self.ddp_find_unused_parameters = False
        if self.adaptive_clipping and self.max_grad_norm <= 0:
            raise ValueError(
                "max_grad_norm <= 0 turns clipping off, but adaptive_clipping is on. To train without any "
                "clipping pass adaptive_clipping=False (CLI: --adaptive_clipping False) as well."
            )

    def __getstate__(self) -> dict:
        """Never pickle the Hub token: the Trainer saves these arguments as training_args.bin in every checkpoint."""
        state = self.__dict__.copy()
        state["hub_token"] = None
        return state

    def __copy__(self) -> BcosTrainingArguments:
        """A copy keeps the token (``copy`` would otherwise go through ``__getstate__``, which drops it)."""
        clone = type(self).__new__(type(self))
        clone.__dict__.update(self.__dict__)
        return clone

    def __deepcopy__(self, memo: dict) -> BcosTrainingArguments:
        """A deep copy keeps the token too (see ``__copy__``)."""
        clone = type(self).__new__(type(self))
        memo[id(self)] = clone
        clone.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return clone


def compiles_by_default(args: BcosTrainingArguments) -> bool:
    """Whether ``BcosTrainer`` compiles when ``torch_compile`` is not given: on CUDA, where the B-cos layers'
    extra elementwise work and host time cost most in eager mode (docs/performance.md), unless feature
    alignment adds and removes hooks every step; not on the CPU, where compilation takes minutes."""
    return not args.use_cpu and torch.cuda.is_available() and not args.alignment_weight > 0
