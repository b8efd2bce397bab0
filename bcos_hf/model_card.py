"""Render the model card (README.md) of a B-cos model from the template in ``model_cards/``."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from string import Template

TEMPLATE = "bcos_model_card.md"

USAGE = {
    "classification": (
        "image-classification",
        "AutoModelForImageClassification",
        "AutoImageProcessor",
        'print(pipe("cat.jpg"))',
    ),
    "zero-shot": (
        "zero-shot-image-classification",
        "AutoModel",
        "AutoProcessor",
        'print(pipe("cat.jpg", candidate_labels=["a photo of a cat", "a photo of a dog"]))',
    ),
    "backbone": ("image-feature-extraction", "AutoModel", "AutoImageProcessor", 'features = pipe("cat.jpg")'),
}
"""Per kind of B-cos model: pipeline task, Auto class, processor class and a pipeline call for the card."""


def _model_kind(model_class: str) -> str:
    if "ForImageClassification" in model_class:
        return "classification"
    return "zero-shot" if model_class in ("BcosCLIPModel", "BcosSiglipModel") else "backbone"


def _template() -> Template:
    return Template(files("bcos_hf.model_cards").joinpath(TEMPLATE).read_text())


def render_model_card(
    config,
    report: dict | None = None,
    model_id: str | None = None,
    extra_rows: dict[str, str] | None = None,
    sections: dict[str, str] | None = None,
    fine_tuned: bool = False,
) -> str:
    """The model card of a B-cos model.

    Args:
        config: the model's ``BcosConfig``.
        report: the conversion report (``conversion_report.json``), shown as the conversion section.
        model_id: the hub id or folder users load the model from (defaults to the model's name).
        extra_rows: more rows for the summary table (training data, accuracy, localisation score, ...).
        sections: more markdown sections, title -> body (training details, an explanation picture, ...).
        fine_tuned: the model was trained after conversion (drops the "before fine-tuning" note).
    """
    base_model = config.source_checkpoint or "unknown"
    model_id = model_id or (Path(config.name_or_path).name if config.name_or_path else "path/to/model")
    is_local = Path(base_model).exists() or base_model.startswith((".", "/"))
    model_class = (config.architectures or ["BcosForImageClassification"])[0]
    pipeline_tag, auto_class, processor_class, pipeline_call = USAGE[_model_kind(model_class)]
    conversion = (
        "```json\n" + json.dumps(report, indent=2) + "\n```"
        if report
        else "No conversion report was saved with this model."
    )
    status = (
        "\n> This is the converted model **before fine-tuning**: with B = $b and no biases its predictions differ "
        "from the source model's. Align it with the source without labels (`bcos-hf align MODEL IMAGES OUT`, or "
        "`BcosTrainer` with `bcos_hf.alignment.alignment_arguments`) or fine-tune it (`BcosTrainer`) to recover "
        "accuracy.\n"
        if report is not None and not fine_tuned and (config.b != 1 or not config.keep_bias)
        else ""
    )
    rendered_sections = "".join(f"## {title}\n\n{body.strip()}\n\n" for title, body in (sections or {}).items())
    return _template().substitute(
        pipeline_tag=pipeline_tag,
        base_model=base_model,
        base_model_link=base_model if is_local else f"https://huggingface.co/{base_model}",
        model_name=f"{model_id} (B-cos)",
        model_id=model_id,
        auto_class=auto_class,
        processor_class=processor_class,
        pipeline_call=pipeline_call,
        bcos_hf_version=config.bcos_hf_version or "",
        source_architecture=config.source_architecture or config.source_config.model_type,
        model_class=model_class,
        b=f"{config.b:g}",
        keep_bias="yes" if config.keep_bias else "no",
        logit_bias=f"{config.logit_bias:.4g}",
        logit_temperature=f"{config.logit_temperature:g}",
        input_mean=config.input_mean,
        input_std=config.input_std,
        parameters=f"{report['parameters']:,}" if report else "see the weights",
        extra_rows="\n".join(f"| {key} | {value} |" for key, value in (extra_rows or {}).items()),
        status=Template(status).safe_substitute(b=f"{config.b:g}"),
        conversion=conversion,
        sections=rendered_sections,
    )
