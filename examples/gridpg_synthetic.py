"""GridPG on a task whose answer is known: a tiny B-cos ViT that tells coloured squares apart.

Each image is grey noise with one square of its class's colour at a random place, so the right explanation of
a class is that square and nothing else. The script converts a tiny ViT to B-cos (B = 2, no biases), trains it
for a few seconds, saves it, and writes a test set as an ``imagefolder`` tree (one folder per colour). Then:

    bcos-hf localisation outputs/gridpg/model outputs/gridpg/squares --split test --grid 2 3 \\
        --methods bcos ixg gradcam random --smoothing 3

scores the B-cos explanations against input x gradient, Grad-CAM and random maps on the same model, and

    bcos-hf evaluate outputs/gridpg/model --dataset outputs/gridpg/squares --split test --images 256 \\
        --num-grids 32 --smoothing 3 --out results/explanation-metrics-squares

scores every attribution method on every metric (GridPG, deletion, insertion, randomisation).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

from bcos_hf.convert import convert
from bcos_hf.synthetic import SQUARE_COLOURS, coloured_squares

SIZE, PATCH = 16, 4


def train_model(output_dir: Path, steps: int, seed: int) -> tuple[torch.nn.Module, float]:
    """Convert a randomly initialised tiny ViT to B-cos, train it on fresh batches, save it; return accuracy."""
    torch.manual_seed(seed)
    names = list(SQUARE_COLOURS)
    config = ViTConfig(
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=96,
        image_size=SIZE,
        patch_size=PATCH,
        id2label=dict(enumerate(names)),
    )
    processor = ViTImageProcessorPil(size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    conversion = convert(ViTForImageClassification(config), image_processor=processor)
    model = conversion.model.train()
    optimiser = torch.optim.Adam(model.parameters(), lr=5e-3)
    for step in range(steps):
        images, labels = coloured_squares(64, seed=seed + 1 + step, num_classes=len(names), size=SIZE)
        logits = model(pixel_values=images).logits
        loss = F.binary_cross_entropy_with_logits(logits, F.one_hot(labels, len(names)).float())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    model.eval()
    images, labels = coloured_squares(1000, seed=seed + 10**6, num_classes=len(names), size=SIZE)
    with torch.no_grad():
        accuracy = (model(pixel_values=images).logits.argmax(dim=1) == labels).float().mean().item()
    model.save_pretrained(output_dir)
    conversion.image_processor.save_pretrained(output_dir)  # normalisation off: it is folded into the model
    return model, accuracy


def write_imagefolder(folder: Path, count: int, seed: int) -> None:
    """``folder/test/<colour>/<index>.png``: the layout ``load_dataset("imagefolder")`` reads."""
    names = list(SQUARE_COLOURS)
    images, labels = coloured_squares(count, seed=seed, num_classes=len(names), size=SIZE)
    for index, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
        target = folder / "test" / names[label]
        target.mkdir(parents=True, exist_ok=True)
        pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(pixels).save(target / f"{index:04d}.png")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/gridpg"), help="default: outputs/gridpg")
    parser.add_argument("--steps", type=int, default=300, help="training steps of 64 images (default 300)")
    parser.add_argument("--test-images", type=int, default=1000, help="images in the test set (default 1000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    _, accuracy = train_model(args.output_dir / "model", args.steps, args.seed)
    write_imagefolder(args.output_dir / "squares", args.test_images, seed=args.seed + 2 * 10**6)
    print(f"B-cos ViT trained: test accuracy {accuracy:.3f}; model in {args.output_dir / 'model'}")
    print(
        f"Now: bcos-hf localisation {args.output_dir / 'model'} {args.output_dir / 'squares'} --split test "
        "--grid 2 3 --methods bcos ixg gradcam random --smoothing 3"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
