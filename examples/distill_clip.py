"""B-cosify a CLIP model by distilling its image embeddings (SigLIP loss, no captions), on Fashion-MNIST images.

    python examples/distill_clip.py --output_dir runs/clip --max_steps 20                # smoke run, tiny CLIP
    python examples/distill_clip.py --model path/to/clip-vit-b32 --output_dir runs/clip  # a real CLIP folder

The student is the CLIP converted by bcos_hf (B-cos image tower, original frozen text tower), starting from the
pretrained weights; the teacher is the original CLIP, frozen. Both see the same images; the loss is SigLIP
between their L2-normalised image embeddings (scale 10, bias -10). No CLIP weights install offline, so without
``--model`` a small randomly initialised CLIP stands in (the run then shows the mechanics, not a useful model).
Before/after it reports the mean cosine between student and teacher embeddings on test images and, when the
model folder has a tokenizer, zero-shot accuracy with prompts "a photo of a {label}".
Needs Fashion-MNIST: ``apt-get install dataset-fashion-mnist``.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    AutoModel,
    AutoTokenizer,
    CLIPConfig,
    CLIPImageProcessorPil,
    CLIPModel,
    HfArgumentParser,
)

import bcos_hf  # noqa: F401  (registers the B-cos Auto classes)
from bcos_hf.convert import convert
from bcos_hf.data import ImageClassificationCollator
from bcos_hf.fashion_mnist import FASHION_MNIST_LABELS, load_fashion_mnist
from bcos_hf.training import BcosTrainer, BcosTrainingArguments


@dataclass
class ScriptArguments:
    model: str | None = field(
        default=None, metadata={"help": "A CLIPModel folder (with its processor); default: a small random CLIP."}
    )
    train_size: int = field(default=2000, metadata={"help": "Training images (the first N of the 60k)."})
    test_size: int = field(default=500, metadata={"help": "Test images (the first N of the 10k)."})


def small_random_clip(folder: Path) -> Path:
    """A small CLIPModel (ViT image tower, 32 px) with CLIP's image processor, saved to ``folder``."""
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(
            vocab_size=1000,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            bos_token_id=998,
            eos_token_id=999,
            pad_token_id=999,
        ),
        vision_config=dict(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=4,
            num_attention_heads=4,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=64,
    )
    CLIPModel(config).save_pretrained(folder)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


@torch.no_grad()
def agreement(trainer: BcosTrainer, dataset, collator, tokenizer=None) -> dict[str, float]:
    """Mean cosine(student, teacher) of the image embeddings; zero-shot accuracy of both when there is a tokenizer."""
    student = trainer.accelerator.unwrap_model(trainer.model).eval()
    batch = collator([dataset[index] for index in range(len(dataset))])
    pixels = batch["pixel_values"].to(student.device)
    student_embeddings = F.normalize(student.get_image_features(pixels).pooler_output.float(), dim=-1)
    teacher_embeddings = F.normalize(trainer.teacher_image_embeddings(pixels).float(), dim=-1)
    result = {"cosine": float((student_embeddings * teacher_embeddings).sum(-1).mean())}
    if tokenizer is not None:
        prompts = tokenizer(
            [f"a photo of a {label}" for label in FASHION_MNIST_LABELS], padding=True, return_tensors="pt"
        )
        text = F.normalize(student.get_text_features(**prompts.to(student.device)).pooler_output.float(), dim=-1)
        for name, embeddings in (("student", student_embeddings), ("teacher", teacher_embeddings)):
            predicted = (embeddings @ text.T).argmax(-1).cpu()
            result[f"zero_shot_{name}"] = float((predicted == batch["labels"]).float().mean())
    return result


def main() -> dict:
    options, args = HfArgumentParser((ScriptArguments, BcosTrainingArguments)).parse_args_into_dataclasses()
    output = Path(args.output_dir)
    started = time.perf_counter()
    source = options.model or str(small_random_clip(output / "source" / "small-random-clip"))
    conversion = convert(source, output / "source" / "converted", overwrite=True)
    student = AutoModel.from_pretrained(output / "source" / "converted", dtype=torch.float32)
    teacher = CLIPModel.from_pretrained(source, dtype=torch.float32)
    has_tokenizer = (Path(source) / "tokenizer_config.json").is_file()
    tokenizer = AutoTokenizer.from_pretrained(source) if has_tokenizer else None

    train = load_fashion_mnist("train", limit=options.train_size)
    test = load_fashion_mnist("test", limit=options.test_size)
    collator = ImageClassificationCollator(conversion.image_processor)
    trainer = BcosTrainer(
        student, args, train_dataset=train, eval_dataset=test, data_collator=collator, teacher=teacher
    )
    before = {"loss": trainer.evaluate()["eval_loss"], **agreement(trainer, test, collator, tokenizer)}
    train_started = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - train_started
    after = {"loss": trainer.evaluate()["eval_loss"], **agreement(trainer, test, collator, tokenizer)}
    trainer.save_model()
    if args.push_to_hub:
        trainer.push_to_hub(dataset="fashion_mnist (images only)")
    else:
        trainer.create_model_card(dataset="fashion_mnist (images only)")

    summary = {
        "model": options.model or "small random CLIP",
        "optimiser_steps": trainer.state.global_step,
        "before": {key: round(value, 4) for key, value in before.items()},
        "after": {key: round(value, 4) for key, value in after.items()},
        "train_seconds": round(train_seconds, 1),
        "total_seconds": round(time.perf_counter() - started, 1),
        "output_dir": str(output),
    }
    if trainer.is_world_process_zero():
        (output / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(
            f"\nSigLIP distillation loss {before['loss']:.4f} -> {after['loss']:.4f}; student/teacher embedding cosine "
            f"{before['cosine']:.4f} -> {after['cosine']:.4f} after {trainer.state.global_step} steps "
            f"({train_seconds:.0f} s training, {summary['total_seconds']:.0f} s in all)\nModel and model card: {output}"
        )
    return summary


if __name__ == "__main__":
    main()
