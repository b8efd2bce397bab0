"""Share B-cos models on the Hub: everything a model needs in one commit, with a B-cos model card.

``push_to_hub`` uploads the config, the safetensors weights, the image processor, the remote-code files
(so the model loads with ``trust_remote_code=True`` where bcos_hf is not installed), the conversion report
and a model card rendered from ``model_cards/``. ``BcosTrainer.push_to_hub`` renders the same card with the
training set-up and the evaluation results (``training_card_details``). The Hub client is injectable
(``api=``), so pushes are testable offline; tokens are passed through, never written or logged.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import HfApi

from .model_card import KEEPING_KNOWLEDGE_URL, render_model_card

EXPLANATION_PICTURE = "explanations.png"
"""File name of the explanation picture a card shows when it is saved next to the model."""

LOCALISATION_KEYS = ("gridpg", "localisation", "localization")


def _latest(log_history: list[dict], key_filter) -> tuple[str, float] | None:
    for entry in reversed(log_history):
        for key, value in entry.items():
            if key_filter(key):
                return key, value
    return None


def _value(option) -> str:
    """An enum option (``OptimizerNames.ADAMW_TORCH``) as users write it (``adamw_torch``)."""
    return str(getattr(option, "value", option))


def explanation_section(folder: Path) -> dict[str, str]:
    """A card section showing ``explanations.png`` when the folder has one."""
    if not (Path(folder) / EXPLANATION_PICTURE).is_file():
        return {}
    return {
        "Explanations": f"![B-cos explanations: the input-dependent linear map W(x) of the predicted class, coloured "
        f"as in the B-cos papers]({EXPLANATION_PICTURE})"
    }


def training_card_details(trainer, dataset: str | list[str] | None = None, **_ignored) -> tuple[dict, dict]:
    """Summary rows and sections for a card written after training: data, hyper-parameters, results.

    ``dataset`` names the training data (``trainer.push_to_hub(dataset="fashion_mnist")``), as in
    ``Trainer.create_model_card``; other keyword arguments of that method are accepted and ignored.
    """
    args, state = trainer.args, trainer.state
    train_dataset = trainer.train_dataset
    if dataset is None:
        info = getattr(train_dataset, "info", None)
        dataset = getattr(info, "dataset_name", None) or getattr(info, "builder_name", None)
    data = ", ".join(dataset) if isinstance(dataset, list) else (dataset or "not recorded")
    if train_dataset is not None and hasattr(train_dataset, "__len__"):
        data += f" ({len(train_dataset):,} training images)"
    rows = {
        "training data": data,
        "fine-tuning": f"{state.global_step:,} optimiser steps ({state.epoch or 0:.3g} epochs)",
    }
    accuracy = _latest(state.log_history, lambda key: key.startswith("eval_") and key.endswith("accuracy"))
    if accuracy is not None:
        rows["accuracy"] = f"{accuracy[1]:.4f} ({accuracy[0][len('eval_') :]} on the evaluation set)"
    localisation = _latest(state.log_history, lambda key: any(word in key for word in LOCALISATION_KEYS))
    if localisation is not None:
        rows["localisation score"] = f"{localisation[1]:.4f} ({localisation[0]})"

    distillation = (
        f"from the original model, alpha {args.distillation_alpha:g}, temperature {args.distillation_temperature:g}"
        if getattr(trainer, "teacher", None) is not None
        else "none"
    )
    precision = "bf16" if args.bf16 else "fp16" if args.fp16 else "fp32"
    hyper_parameters = {
        "loss": args.loss + (f" (wrong-class target {args.bce_off_target:g})" if args.bce_off_target else ""),
        "distillation": distillation,
        "optimiser": f"{_value(args.optim)}, learning rate {args.learning_rate:g}, weight decay {args.weight_decay:g}",
        "schedule": f"{_value(args.lr_scheduler_type)}, warm-up {args.warmup_steps:g}",
        "batch": f"{args.per_device_train_batch_size} per device x {args.gradient_accumulation_steps} accumulation "
        f"x {args.world_size} processes",
        "gradient clipping": (
            f"adaptive, clip factor {args.clip_factor:g}, eps {args.clip_eps:g}"
            if args.adaptive_clipping
            else f"global norm {args.max_grad_norm:g}"
        ),
        "B warm-up": f"1 -> B over {args.b_warmup_steps} steps" if args.b_warmup_steps else "none",
        "bias decay": f"{args.bias_decay:g}" if args.bias_decay else "none",
        "bias anneal": f"biases -> 0 over {args.bias_anneal_steps} steps, then removed"
        if args.bias_anneal_steps
        else "none",
        "alignment with the original": (
            f"weight {args.alignment_weight:g}, {args.alignment_mode}"
            + (f" after {args.teacher_forced_steps} teacher-forced steps" if args.teacher_forced_steps else "")
            + (", BatchNorm statistics frozen" if args.freeze_batchnorm_statistics else "")
            if args.alignment_weight > 0
            else "none"
        ),
        "precision": precision,
        "seed": str(args.seed),
    }
    table = "| hyper-parameter | value |\n|---|---|\n" + "\n".join(
        f"| {k} | {v} |" for k, v in hyper_parameters.items()
    )
    training = f"Fine-tuned with bcos_hf's `BcosTrainer`.\n\n{table}"
    if args.alignment_weight > 0:
        training += (
            "\n\nHow much of an original label-free alignment keeps, measured on real weights and natural photos: "
            f"[Keeping what the original knows]({KEEPING_KNOWLEDGE_URL})."
        )
    sections = {"Training": training}
    sections.update(explanation_section(Path(args.output_dir)))
    return rows, sections


def conversion_report(model) -> dict | None:
    """The conversion report saved next to the folder the model was loaded from, if any."""
    path = Path(model.config.name_or_path or "") / "conversion_report.json"
    return json.loads(path.read_text()) if path.is_file() else None


def save_for_hub(
    model,
    folder: str | Path,
    image_processor=None,
    *,
    model_id: str | None = None,
    extra_rows: dict[str, str] | None = None,
    sections: dict[str, str] | None = None,
    fine_tuned: bool = False,
    explanation_picture: str | Path | None = None,
) -> Path:
    """Write what a Hub repository of a B-cos model holds into ``folder``; returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if image_processor is not None:
        image_processor.save_pretrained(folder)
    report = conversion_report(model)
    if report is not None:
        (folder / "conversion_report.json").write_text(json.dumps(report, indent=2) + "\n")
    if explanation_picture is not None:
        shutil.copyfile(explanation_picture, folder / EXPLANATION_PICTURE)
    card_sections = dict(sections or {})
    card_sections.update(explanation_section(folder))
    (folder / "README.md").write_text(
        render_model_card(
            model.config,
            report=report,
            model_id=model_id,
            extra_rows=extra_rows,
            sections=card_sections,
            fine_tuned=fine_tuned,
        )
    )
    return folder


def push_to_hub(
    model,
    repo_id: str,
    image_processor=None,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload B-cos model",
    extra_rows: dict[str, str] | None = None,
    sections: dict[str, str] | None = None,
    fine_tuned: bool = False,
    explanation_picture: str | Path | None = None,
    api: HfApi | None = None,
    **upload_options,
):
    """Publish a B-cos model in one commit: config, weights, image processor, remote code, report and card.

    ``model.push_to_hub`` does the same once bcos_hf is imported (``push_model_to_hub``); after training,
    ``BcosTrainer.push_to_hub`` adds the training set-up and results to the card. ``upload_options`` go to
    ``HfApi.upload_folder`` (``revision``, ``create_pr``, ``commit_description``). Returns the ``CommitInfo``.
    """
    api = api or HfApi()
    repo_id = api.create_repo(repo_id, token=token, private=private, exist_ok=True).repo_id
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_for_hub(
            model,
            tmp,
            image_processor,
            model_id=repo_id,
            extra_rows=extra_rows,
            sections=sections,
            fine_tuned=fine_tuned,
            explanation_picture=explanation_picture,
        )
        return api.upload_folder(
            repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, token=token, **upload_options
        )


def saved_image_processor(model):
    """The image processor saved next to the folder the model was loaded from, or None."""
    folder = Path(model.config.name_or_path or "")
    if not (folder / "preprocessor_config.json").is_file():
        return None
    from transformers import AutoImageProcessor

    return AutoImageProcessor.from_pretrained(folder, trust_remote_code=False)


def push_model_to_hub(
    self,
    repo_id: str,
    *,
    image_processor=None,
    commit_message: str | None = None,
    private: bool | None = None,
    token: str | None = None,
    api: HfApi | None = None,
    **upload_options,
):
    """``model.push_to_hub`` for B-cos models (installed by ``import bcos_hf``): ``push_to_hub`` of the model.

    Unlike the plain transformers method it also publishes the image processor (``image_processor``, or the
    one saved next to the model's folder) and the B-cos model card, so the repository works in pipelines and
    explains itself. ``upload_options``: ``revision``, ``create_pr``, ``commit_description``.
    """
    return push_to_hub(
        self,
        repo_id,
        image_processor if image_processor is not None else saved_image_processor(self),
        token=token,
        private=private,
        commit_message=commit_message or "Upload B-cos model",
        api=api,
        **upload_options,
    )
