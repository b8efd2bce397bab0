"""Host time per step: the Python and dispatch work of a model, which bounds GPU runs of small kernels.

    python -m benchmarks.host_time

A 12-layer ViT-S-shaped model at 32 px (batch 1, one CPU thread) does almost no arithmetic, so its step
time is what the host spends issuing the work. On a GPU, when the kernels of a layer finish faster than
the host issues them (bf16 at batch 128 on an H100/H200 for the models here), the B-cos/original ratio of
these times is what the GPU ratio tends to. For activations under ``FUSE_MIN_BYTES`` the B-cos layers run
the same code on CUDA as here.
"""

from __future__ import annotations

import argparse

import torch
from transformers import ViTConfig, ViTForImageClassification

from bcos_hf.convert import convert

from .run import Runner, Settings, paired_times

DEEP_NARROW_VIT = dict(
    hidden_size=64, num_hidden_layers=12, num_attention_heads=4, intermediate_size=128, image_size=32, patch_size=8
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.host_time", description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=30, help="timed pairs per step (median ratio)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    original = ViTForImageClassification(ViTConfig(**DEEP_NARROW_VIT, num_labels=10)).eval()
    bcos = convert(original, image_mean=[0.5] * 3, image_std=[0.5] * 3).model
    images = torch.rand(1, 3, 32, 32)
    plain = Runner(original, images * 2 - 1, torch.float32, bcos=False)
    converted = Runner(bcos, images, torch.float32, bcos=True)
    settings = Settings(batch=1, warmup=5, iterations=args.pairs)
    cpu = torch.device("cpu")
    results = {
        step: paired_times(getattr(plain, step), getattr(converted, step), cpu, settings)
        for step in ("forward", "train", "explain")
    }
    for step, figure in results.items():
        print(f"{step}: {figure['bcos_ms']:.2f} / {figure['original_ms']:.2f} ms = {figure['ratio']:.2f}x host time")
    return results


if __name__ == "__main__":
    main()
