"""How long ``bcos_hf.convert.convert(folder, out)`` takes on full-size models saved to disk.

    python -m benchmarks.conversion_time            # ViT-B/16, ConvNeXt-T, ResNet-50, MobileNetV2, CLIP ViT-B/32
    python -m benchmarks.conversion_time --quick    # the tiny test configs (what the tests run)

Each model is built from its published config with seeded random weights (plus the real ImageNet
MobileNetV2 when its weights package is installed), saved with an image processor to a temporary folder,
and converted in the default mode (B = 2, no biases) ``--repeats`` times; the figure is the median wall
time of the whole ``convert`` call: loading, the equivalence check (a B = 1 copy against the source on two
random images), rewriting and saving, with the process CPU time beside it (on a machine shared with other
jobs the CPU time is the steadier figure; the JSON records the load average before and after). The
equivalence error of each conversion (max absolute difference of the outputs) is reported too. Prints a
markdown table and writes it with the raw timings to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import transformers
from transformers import (
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    ConvNextConfig,
    ConvNextForImageClassification,
    MobileNetV2Config,
    MobileNetV2ForImageClassification,
    PreTrainedModel,
    ResNetConfig,
    ResNetForImageClassification,
    ViTConfig,
    ViTForImageClassification,
)

import bcos_hf
from bcos_hf.convert import convert
from bcos_hf.pretrained import imagenet_image_processor, imagenet_mobilenet_v2, mobilenet_v2_weights_path
from tests.families import FAMILIES

Builder = Callable[[], tuple[PreTrainedModel, object]]


def _random(model_class: type[PreTrainedModel], config) -> Builder:
    """A full-size model with seeded random weights and an ImageNet-style image processor (224 px)."""

    def build():
        torch.manual_seed(0)
        return model_class(config).eval(), imagenet_image_processor()

    return build


def _random_clip() -> tuple[PreTrainedModel, object]:
    torch.manual_seed(0)
    return CLIPModel(CLIPConfig()).eval(), CLIPImageProcessorPil()


FULL_SIZE: dict[str, tuple[str, Builder]] = {
    "ViT-B/16": ("vit", _random(ViTForImageClassification, ViTConfig(num_labels=1000))),
    "ConvNeXt-T": ("convnext", _random(ConvNextForImageClassification, ConvNextConfig(num_labels=1000))),
    "ResNet-50": ("resnet", _random(ResNetForImageClassification, ResNetConfig(num_labels=1000))),
    "MobileNetV2": ("mobilenet_v2", _random(MobileNetV2ForImageClassification, MobileNetV2Config(num_labels=1000))),
    "CLIP ViT-B/32": ("clip", _random_clip),
    "MobileNetV2, ImageNet weights": ("mobilenet_v2", imagenet_mobilenet_v2),
}
"""Name -> (adapter model type, builder). The transformers default configs are the published sizes."""

QUICK: dict[str, tuple[str, Builder]] = {
    f"tiny {family}": (family, FAMILIES[family])
    for family in ("vit", "convnext", "resnet", "mobilenet_v2", "clip")
    if family in FAMILIES
}
"""The tiny test configs of ``tests/families.py`` (those it has)."""


@dataclass
class Measurement:
    model: str
    model_type: str
    source_class: str
    parameters: int
    seconds: list[float]
    median_seconds: float
    median_cpu_seconds: float
    """Process CPU time (all threads): robust to other jobs on the machine, unlike the wall time."""
    equivalence_max_abs_diff: float


def measure(name: str, model_type: str, build: Builder, repeats: int, workdir: Path) -> Measurement:
    """Save the model to ``workdir`` and time ``convert(folder, out)`` ``repeats`` times."""
    model, processor = build()
    source = workdir / "source"
    model.save_pretrained(source)
    processor.save_pretrained(source)
    seconds, cpu_seconds, gaps = [], [], []
    for repeat in range(repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        conversion = convert(source, workdir / f"bcos-{repeat}")
        seconds.append(time.perf_counter() - started)
        cpu_seconds.append(time.process_time() - cpu_started)
        gaps.append(conversion.report.equivalence_max_abs_diff)
    return Measurement(
        model=name,
        model_type=model_type,
        source_class=type(model).__name__,
        parameters=sum(p.numel() for p in model.parameters()),
        seconds=[round(s, 3) for s in seconds],
        median_seconds=round(statistics.median(seconds), 3),
        median_cpu_seconds=round(statistics.median(cpu_seconds), 3),
        equivalence_max_abs_diff=max(gaps),
    )


def skip_reason(name: str, model_type: str) -> str | None:
    if model_type not in bcos_hf.ADAPTERS:
        return f"no '{model_type}' adapter registered"
    if "ImageNet weights" in name:
        try:
            mobilenet_v2_weights_path()
        except FileNotFoundError as missing:
            return str(missing)
    return None


def markdown(measurements: list[Measurement], repeats: int) -> str:
    lines = [
        f"| model | source class | parameters | convert(folder, out): wall, median of {repeats} | CPU time, median "
        "| equivalence max abs diff |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for m in measurements:
        lines.append(
            f"| {m.model} | {m.source_class} | {m.parameters / 1e6:.1f} M | {m.median_seconds:.2f} s "
            f"| {m.median_cpu_seconds:.2f} s | {m.equivalence_max_abs_diff:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny test configs instead of full-size models")
    parser.add_argument("--repeats", type=int, default=3, help="conversions per model; the median is reported")
    parser.add_argument("--models", default=None, help="comma-separated subset of the model names")
    parser.add_argument("--out", type=Path, default=Path("outputs/benchmarks/conversion_time.json"))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")

    catalogue = QUICK if args.quick else FULL_SIZE
    selected = list(catalogue) if args.models is None else [name.strip() for name in args.models.split(",")]
    unknown = [name for name in selected if name not in catalogue]
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(catalogue)}")

    load_before = os.getloadavg()[0]
    measurements, skipped = [], {}
    for name in selected:
        model_type, build = catalogue[name]
        reason = skip_reason(name, model_type)
        if reason is not None:
            skipped[name] = reason
            print(f"skipping {name}: {reason}", file=sys.stderr)
            continue
        with tempfile.TemporaryDirectory() as workdir:
            measurements.append(measure(name, model_type, build, args.repeats, Path(workdir)))
        print(f"{name}: {measurements[-1].median_seconds:.2f} s", file=sys.stderr)

    table = markdown(measurements, args.repeats)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "command": "python -m benchmarks.conversion_time "
                + " ".join(argv if argv is not None else sys.argv[1:]),
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads",
                "load_average_before_after": [load_before, os.getloadavg()[0]],
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "measurements": [asdict(m) for m in measurements],
                "skipped": skipped,
                "table": table,
            },
            indent=2,
        )
        + "\n"
    )
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
