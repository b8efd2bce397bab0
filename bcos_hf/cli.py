"""The ``bcos-hf`` command line: ``convert``, ``align`` (label-free, with the original), ``explain``, ``localisation``,
``evaluate`` (explanation metrics)."""

from __future__ import annotations

import argparse
import logging
import math
import sys

from .modeling.rewriting import UnsupportedModelError


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1; got {text!r}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a finite number (NaN and infinity give models that output NaN or nothing)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number; got {text!r}")
    return value


def class_target(text: str) -> int | str:
    """``--target``: a class index (a whole number >= 0) or a label name."""
    if text.lstrip("+-").isdigit():
        if int(text) < 0:
            raise argparse.ArgumentTypeError(f"a class index must be >= 0; got {text}")
        return int(text)
    return text


def _add_convert(subparsers) -> None:
    parser = subparsers.add_parser(
        "convert",
        help="Convert a pretrained checkpoint (hub id or folder) into a B-cos model folder.",
        description="Convert a pretrained checkpoint into a B-cos model. `--b 1 --keep-bias` is the equivalence "
        "mode (same outputs as the source); the default (B = 2, no biases) is the model to fine-tune.",
    )
    parser.add_argument("source", help="hub id or local folder of a supported checkpoint")
    parser.add_argument("output_dir", help="folder to write the B-cos model to")
    parser.add_argument("--b", type=finite_float, default=2.0, help="B-cos exponent, 1 to 10 (default: 2)")
    parser.add_argument("--keep-bias", action="store_true", help="keep the pretrained biases")
    parser.add_argument("--normalize-weights", action="store_true", help="unit-norm weights instead of raw ones")
    parser.add_argument(
        "--logit-bias", type=finite_float, default=None, help="default: -log(C-1) without biases, else 0"
    )
    parser.add_argument(
        "--logit-temperature", type=finite_float, default=1.0, help="logits are divided by it (default 1)"
    )
    parser.add_argument("--image-mean", type=finite_float, nargs=3, default=None, help="override the source's mean")
    parser.add_argument(
        "--image-std", type=finite_float, nargs=3, default=None, help="override the source's std (with --image-mean)"
    )
    parser.add_argument(
        "--no-batchnorm-calibration",
        dest="batchnorm_calibration",
        action="store_false",
        help="keep the source's BatchNorm statistics (default: re-estimated on seeded noise after an inexact conversion)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT_DIR if it exists and is not empty")
    parser.set_defaults(handler=_run_convert)


def _run_convert(args: argparse.Namespace) -> None:
    from .convert import convert

    conversion = convert(
        args.source,
        args.output_dir,
        b=args.b,
        keep_bias=args.keep_bias,
        normalize_weights=args.normalize_weights,
        logit_bias=args.logit_bias,
        logit_temperature=args.logit_temperature,
        image_mean=args.image_mean,
        image_std=args.image_std,
        batchnorm_calibration=args.batchnorm_calibration,
        overwrite=args.overwrite,
    )
    report = conversion.report
    print(
        f"Converted {report.source} ({report.source_architecture}) -> {report.output_dir} ({report.model_class})\n"
        f"  B = {report.b:g}, biases kept: {report.keep_bias}, logit bias: {report.logit_bias:.4g}, "
        f"parameters: {report.parameters:,}\n"
        f"  equivalence check (B = 1, biases kept vs source): max |diff| = {report.equivalence_max_abs_diff:.3g}\n"
        + (f"  BatchNorm statistics {report.batchnorm_calibration}\n" if report.batchnorm_calibration else "")
        + f"  {report.seconds:.2f} s; report: {report.output_dir}/conversion_report.json"
    )


def _add_explain(subparsers) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="Explain a B-cos classifier's predictions on images: PNG pictures and a JSON summary.",
        description="Writes <image>_explanation.png (the coloured B-cos explanation, RGBA) and "
        "<image>_heatmap.png (contributions: red positive, blue negative) per image, and summary.json.",
    )
    parser.add_argument("model", help="folder (or hub id) of a converted B-cos image classifier")
    parser.add_argument("images", nargs="+", help="image paths or URLs")
    parser.add_argument("--out", required=True, help="folder to write the pictures and summary.json to")
    parser.add_argument(
        "--target", type=class_target, default=None, help="label name or class index to explain (default: predicted)"
    )
    parser.add_argument("--with-image", action="store_true", help="put each image left of its explanation")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="images per forward/backward (default 8)")
    parser.set_defaults(handler=_run_explain)


def load_classifier(reference: str):
    """A B-cos image classifier and its image processor from a folder or Hub id, never running the folder's code
    (its own saved image processor could ask to)."""
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from .guards import resolve_model_reference

    reference = resolve_model_reference(reference, "MODEL")
    model = AutoModelForImageClassification.from_pretrained(reference, trust_remote_code=False).eval()
    if not hasattr(model, "explain"):
        raise ValueError(
            f"{reference} holds a {type(model).__name__}, not a B-cos model: convert it first "
            "(bcos-hf convert SOURCE OUTPUT_DIR)."
        )
    return model, AutoImageProcessor.from_pretrained(reference, trust_remote_code=False)


def _run_explain(args: argparse.Namespace) -> None:
    from pathlib import Path

    from transformers import pipeline

    from .guards import dump_json, resolve_model_reference, unique_names

    resolve_model_reference(args.model, "MODEL")  # a mistyped model folder first, then the images, then loading
    missing = [
        image for image in args.images if not image.startswith(("http://", "https://")) and not Path(image).is_file()
    ]
    if missing:
        raise FileNotFoundError(f"No image file {', '.join(missing[:5])}: pass image files or http(s) URLs.")
    model, processor = load_classifier(args.model)
    explainer = pipeline("image-explanation", model=model, image_processor=processor)
    results = explainer(args.images, target=args.target, with_image=args.with_image, batch_size=args.batch_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = unique_names([Path(image.split("?")[0]).stem or "image" for image in args.images])
    summary = []
    for image, name, result in zip(args.images, names, results, strict=True):
        result["explanation"].save(out / f"{name}_explanation.png")
        result["heatmap"].save(out / f"{name}_heatmap.png")
        entry = {key: result[key] for key in ("label", "score", "target", "logit", "residual")}
        entry.update(image=image, explanation=f"{name}_explanation.png", heatmap=f"{name}_heatmap.png")
        summary.append(entry)
        print(f"{image}: {result['label']} ({result['score']:.3f}); explained {result['target']} -> {out / name}_*.png")
    (out / "summary.json").write_text(dump_json(summary) + "\n")


def _add_localisation(subparsers) -> None:
    parser = subparsers.add_parser(
        "localisation",
        help="Grid pointing game (GridPG) of a B-cos classifier's explanations and post-hoc baselines.",
        description="Tiles confidently classified images of distinct classes into grids and scores how much "
        "positive attribution each class puts in its own cell (1 = perfect, 1/n^2 = chance).",
    )
    parser.add_argument("model", help="folder (or hub id) of a converted B-cos image classifier")
    parser.add_argument("dataset", help="imagefolder tree (one folder per class) or a save_to_disk dataset")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument(
        "--grid", type=positive_int, nargs="+", default=[2, 3], help="cells per side, >= 2 (default: 2 3)"
    )
    parser.add_argument(
        "--image-size", type=positive_int, default=None, help="resize images to this side (default: the model's)"
    )
    parser.add_argument("--num-grids", type=positive_int, default=500, help="grids per size (default 500)")
    parser.add_argument(
        "--methods", nargs="+", default=["bcos", "ixg", "gradcam"], help="names from bcos_hf.attribution.ATTRIBUTIONS"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the grid sampling (default 0)")
    parser.add_argument("--confidence", type=finite_float, default=0.5, help="sigmoid(logit) threshold (default 0.5)")
    parser.add_argument(
        "--smoothing", type=positive_int, default=15, help="average-pooling window, odd, 1 = none (default 15)"
    )
    parser.add_argument(
        "--sliding-window", choices=["auto", "on", "off"], default="auto", help="auto: for position-embedding models"
    )
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per forward/backward (default 32)")
    parser.add_argument("--out", default=None, help="write the results as JSON to this file")
    parser.set_defaults(handler=_run_localisation)


def _run_localisation(args: argparse.Namespace) -> None:
    from .localisation import ImageDataset, format_results, grid_pointing_game, save_results

    model, processor = load_classifier(args.model)
    data = ImageDataset(args.dataset, processor, args.split, model.config.id2label, require_model_labels=True)
    sliding = {"auto": None, "on": True, "off": False}[args.sliding_window]
    results = []
    for grid in args.grid:
        scores = grid_pointing_game(
            model,
            data,
            grid=grid,
            num_grids=args.num_grids,
            methods=args.methods,
            seed=args.seed,
            confidence=args.confidence,
            smoothing=args.smoothing,
            sliding_window=sliding,
            batch_size=args.batch_size,
        )
        results.extend(scores.values())
    print(format_results(results))
    if args.out:
        save_results(results, args.out)


def _add_evaluate(subparsers) -> None:
    from .attribution import ATTRIBUTIONS
    from .evaluation import FULL, METRICS

    parser = subparsers.add_parser(
        "evaluate",
        help="Score explanations: models x attribution methods x metrics (GridPG, deletion, insertion, randomisation).",
        description="Scores each model's B-cos explanation (B-cos models) and post-hoc baselines (captum) on one "
        "dataset with GridPG, pixel deletion and insertion AUC and the randomisation check; writes results.json, "
        "results.md (the table) and results.png (grouped bars, mean ± sd) to --out.",
    )
    parser.add_argument("models", nargs="+", help="model folders: B-cos or standard image classifiers")
    parser.add_argument("--dataset", required=True, help="imagefolder tree, save_to_disk folder, or 'photos'")
    parser.add_argument("--split", default="train", help="dataset split (default: train)")
    parser.add_argument("--out", required=True, help="folder for results.json, results.md and results.png")
    parser.add_argument("--methods", nargs="+", default=list(ATTRIBUTIONS), help="default: all of them")
    parser.add_argument("--metrics", nargs="+", default=list(METRICS), help="default: all of them")
    parser.add_argument("--quick", action="store_true", help="a few images and grids: seconds on tiny models")
    parser.add_argument("--images", type=int, default=None, help=f"images per model (default {FULL.images})")
    parser.add_argument(
        "--image-size", type=int, default=None, help="resize images to this side (default: the model's)"
    )
    parser.add_argument("--num-grids", type=int, default=None, help=f"GridPG grids (default {FULL.num_grids})")
    parser.add_argument("--steps", type=int, default=None, help=f"deletion/insertion steps (default {FULL.steps})")
    parser.add_argument("--fill", type=float, default=None, help=f"value of deleted pixels (default {FULL.fill})")
    parser.add_argument("--smoothing", type=int, default=None, help=f"GridPG pooling (default {FULL.smoothing})")
    parser.add_argument("--batch-size", type=int, default=None, help=f"default {FULL.batch_size}")
    parser.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> None:
    from .evaluation import format_table, run_evaluation

    rows = run_evaluation(
        args.models,
        args.dataset,
        args.out,
        args.methods,
        args.metrics,
        quick=args.quick,
        split=args.split,
        images=args.images,
        image_size=args.image_size,
        num_grids=args.num_grids,
        steps=args.steps,
        fill=args.fill,
        smoothing=args.smoothing,
        batch_size=args.batch_size,
    )
    print(format_table(rows))
    print(f"results: {args.out}/results.json, results.md, results.png")


def _add_align(subparsers) -> None:
    parser = subparsers.add_parser(
        "align",
        help="Train a converted B-cos model to match its original on unlabelled images (no labels needed).",
        description="Label-free alignment (bcos_hf.alignment): the B-cos model learns to reproduce its original's "
        "outputs after every block, and its logits or image embeddings, on a folder of images (labels, if "
        "any, are ignored). Saves the aligned model to OUTPUT_DIR.",
    )
    parser.add_argument("model", help="a B-cos model folder (from `bcos-hf convert`)")
    parser.add_argument("images", help="a folder of images (any sub-folders), or a saved datasets.Dataset")
    parser.add_argument("output_dir", help="folder to save the aligned model to")
    parser.add_argument("--teacher", help="the original model (default: the source recorded at conversion)")
    parser.add_argument("--max-steps", type=positive_int, default=600, help="optimiser steps (default 600)")
    parser.add_argument("--batch-size", type=positive_int, default=32, help="images per step (default 32)")
    parser.add_argument("--learning-rate", type=finite_float, default=None, help="default: the recipe's (1e-3)")
    parser.add_argument(
        "--calibration-batches",
        type=positive_int,
        default=8,
        help="BatchNorm networks: batches to re-estimate running statistics on before training (default 8)",
    )
    parser.set_defaults(handler=_run_align)


def _run_align(args: argparse.Namespace) -> None:
    import itertools

    import torch
    import transformers
    from transformers import AutoConfig, AutoImageProcessor

    import bcos_hf

    from .alignment import alignment_arguments, calibrate_batchnorm, has_batchnorm
    from .data import ImageClassificationCollator, load_image_dataset
    from .guards import resolve_model_reference
    from .training import BcosTrainer

    config = AutoConfig.from_pretrained(resolve_model_reference(args.model, "MODEL"), trust_remote_code=False)
    if not str(config.model_type).startswith("bcos"):
        raise ValueError(f"{args.model} is not a B-cos model (model_type {config.model_type!r}): convert it first.")
    model_class = getattr(bcos_hf, (config.architectures or ["BcosForImageClassification"])[0], None)
    if not (isinstance(model_class, type) and issubclass(model_class, bcos_hf.BcosPreTrainedModel)):
        raise ValueError(f"{args.model} names {config.architectures}, which is not a B-cos model class.")
    model = model_class.from_pretrained(args.model, dtype=torch.float32)
    teacher_source = args.teacher or config.source_checkpoint
    if not teacher_source:
        raise ValueError("The model does not record the checkpoint it was converted from: pass --teacher.")
    teacher_class = getattr(transformers, config.source_architecture or "", None)
    if not (isinstance(teacher_class, type) and issubclass(teacher_class, transformers.PreTrainedModel)):
        raise ValueError(f"The model records no transformers source class ({config.source_architecture!r}).")
    teacher_source = resolve_model_reference(teacher_source, "the teacher")
    teacher, loading = teacher_class.from_pretrained(teacher_source, dtype=torch.float32, output_loading_info=True)
    if loading.get("missing_keys"):
        raise ValueError(
            f"The teacher {teacher_source} lacks weights of a {teacher_class.__name__} "
            f"({', '.join(sorted(loading['missing_keys'])[:5])}): pass the original checkpoint with --teacher."
        )
    processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=False)
    images = load_image_dataset(args.images)
    images = images.remove_columns([c for c in images.column_names if c not in {"image", "img"}])
    if len(images) == 0:
        raise ValueError(f"{args.images} holds no images.")
    collator = ImageClassificationCollator(processor)
    if has_batchnorm(model):
        batches = (
            collator([images[i] for i in range(start, min(start + args.batch_size, len(images)))])["pixel_values"]
            for start in range(0, len(images), args.batch_size)
        )
        calibrate_batchnorm(model, itertools.islice(batches, args.calibration_batches))
    overrides = {"per_device_train_batch_size": args.batch_size}
    if args.learning_rate is not None:
        overrides["learning_rate"] = args.learning_rate
    training_args = alignment_arguments(model, str(args.output_dir), args.max_steps, **overrides)
    trainer = BcosTrainer(model, training_args, teacher=teacher, train_dataset=images, data_collator=collator)
    trainer.train()
    trainer.save_model(args.output_dir)
    print(f"Aligned {args.model} with {teacher_source} for {args.max_steps} steps -> {args.output_dir}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bcos-hf", description="B-cos models for Hugging Face transformers.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_convert(subparsers)
    _add_explain(subparsers)
    _add_localisation(subparsers)
    _add_align(subparsers)
    _add_evaluate(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    from safetensors import SafetensorError

    import bcos_hf  # noqa: F401  (registers the Auto classes)

    try:
        args.handler(args)
    except (UnsupportedModelError, ValueError, OSError, SafetensorError) as error:
        print(f"bcos-hf {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
