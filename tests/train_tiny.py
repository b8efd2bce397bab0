"""A tiny, deterministic B-cos training run: shared by the training tests and run as a script by the DDP and
resume tests (``torchrun tests/train_tiny.py ...`` / ``python tests/train_tiny.py ...``).

The model is a converted tiny ViT (16 px, one layer) saved to disk; the data are seeded random images with
labels that depend on the image (so the loss can fall). Final weights are written per rank as safetensors.
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForImageClassification, TrainerCallback

TINY_VIT = dict(
    hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, image_size=16, patch_size=8
)
IMAGE_SIZE = 16


class TinyImages(torch.utils.data.Dataset):
    """``size`` seeded random RGB images in [0, 1] of 16 x 16 px; label = brightest third of the mean (3 classes)."""

    def __init__(self, size: int = 64, seed: int = 0) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.images = torch.rand(size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
        means = self.images.mean(dim=(1, 2, 3))
        self.labels = torch.bucketize(means, means.quantile(torch.tensor([1 / 3, 2 / 3])))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[index], "labels": self.labels[index]}


def save_tiny_bcos(folder: Path, **convert_kwargs) -> Path:
    """Convert a tiny ViT classifier (labels cat, dog, car) and save it to ``folder``; returns the folder."""
    from bcos_hf.convert import convert

    from .families import save_family

    _, source = save_family("vit", Path(folder).parent / f"{Path(folder).name}-source", **TINY_VIT)
    convert(str(source), folder, **convert_kwargs)
    return Path(folder)


def load(folder: Path):
    return AutoModelForImageClassification.from_pretrained(folder, dtype=torch.float32)


class StepDelay(TrainerCallback):
    """Sleep after each optimiser step, so that a test can kill the run between two checkpoints."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(self.seconds)


def full_weights(trainer) -> dict[str, torch.Tensor]:
    """The model's full weights on this rank: under FSDP2 every DTensor shard is all-gathered (a collective)."""
    from torch.distributed.tensor import DTensor

    state = trainer.model_wrapped.state_dict()
    return {name: value.full_tensor() if isinstance(value, DTensor) else value for name, value in state.items()}


def fsdp_on_cpu() -> None:
    """Let accelerate shard with FSDP on CPU processes (gloo), for the FSDP test.

    accelerate (1.15) enters its FSDP state only on accelerators and falls back to DDP on the CPU, although
    torch's ``fully_shard`` runs on CPU tensors over gloo. Under ``accelerate launch`` with an FSDP config (its
    ``ACCELERATE_USE_FSDP``), this switches the state to FSDP with the plugin the launch configured, as
    accelerate does on GPUs; everything after (wrapping, clipping, gathering, saving) is the real code path.
    """
    from accelerate import state

    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() != "true":
        return
    original_init = state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs) -> None:
        original_init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if self.distributed_type == state.DistributedType.MULTI_CPU and fsdp_plugin is not None:
            # Both shared states: every later AcceleratorState() copies the process state over its own.
            state.PartialState._shared_state["distributed_type"] = state.DistributedType.FSDP
            self.distributed_type = state.DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin

    state.AcceleratorState.__init__ = init


def main(argv: list[str] | None = None) -> None:
    import bcos_hf  # noqa: F401  (Auto classes)
    from bcos_hf.training import BcosTrainer, BcosTrainingArguments

    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir", type=Path)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--max_steps", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=8, help="per device")
    parser.add_argument("--save_steps", type=int, default=0, help="0: no checkpoints")
    parser.add_argument("--step_delay", type=float, default=0.0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--gpu", action="store_true", help="train on the accelerator (default: CPU)")
    parser.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    parser.add_argument("--teacher", type=Path, help="source model folder: align with it (first step teacher-forced)")
    options = parser.parse_args(argv)

    torch.set_num_threads(1)
    fsdp_on_cpu()
    args = BcosTrainingArguments(
        output_dir=str(options.output_dir),
        max_steps=options.max_steps,
        per_device_train_batch_size=options.batch_size,
        learning_rate=1e-3,
        save_strategy="steps" if options.save_steps else "no",
        save_steps=options.save_steps or 500,
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=not options.gpu,
        bf16=options.precision == "bf16",
        fp16=options.precision == "fp16",
        seed=0,
        data_seed=0,
        alignment_weight=1.0 if options.teacher else 0.0,
        teacher_forced_steps=1,
    )
    teacher = None
    if options.teacher:
        teacher = AutoModelForImageClassification.from_pretrained(options.teacher, dtype=torch.float32)
    callbacks = [StepDelay(options.step_delay)] if options.step_delay else []
    trainer = BcosTrainer(
        load(options.model_dir), args, teacher=teacher, train_dataset=TinyImages(), callbacks=callbacks
    )
    trainer.train(resume_from_checkpoint=True if options.resume else None)
    rank = int(os.environ.get("RANK", "0"))
    parameter = next(trainer.model_wrapped.parameters())
    print(f"train_tiny: rank {rank}, fsdp {trainer.is_fsdp_enabled}, parameters are {type(parameter).__name__}")
    if trainer.is_fsdp_enabled:  # on every rank, so that the ranks can be compared
        state = full_weights(trainer)
    else:
        state = trainer.accelerator.get_state_dict(trainer.model_wrapped)
    if state:
        weights = {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}
        save_file(weights, str(options.output_dir / f"final-rank{rank}.safetensors"))
    if torch.distributed.is_initialized():
        del trainer, parameter, state
        shut_down_process_group()


def shut_down_process_group() -> None:
    """End a multi-process run without a teardown race in gloo.

    A gloo worker thread frees each finished collective's Python tensors, which needs the GIL. Left to the end of
    ``main`` or to interpreter exit, the trainer's process group is destroyed by a thread that holds the GIL and
    joins those workers: the run hangs (DDP's reducer freed on return) or aborts ("terminate called without an
    active exception"), after it completed. So: wait until every rank is here (the wait releases the GIL, and the
    workers finish), free the wrapped model while the group is still registered, then destroy the group.
    """
    torch.distributed.barrier()
    gc.collect()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
