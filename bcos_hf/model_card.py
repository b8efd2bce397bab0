"""Render the model card (README.md) of a B-cos model from the template in ``model_cards/``."""

from __future__ import annotations

import json
from importlib.resources import files
from pathlib import Path
from string import Template

from .guards import dump_json, is_hub_id
from .modeling.tasks import TASKS_BY_MODEL_CLASS, TASKS_BY_NAME

TEMPLATE = "bcos_model_card.md"
KEEPING_KNOWLEDGE_URL = "https://github.com/bcos-hf/bcos_hf/blob/main/docs/keeping-knowledge.md"


def _plain(text: str, limit: int = 200) -> str:
    """``text`` without control characters, backticks, quotes or angle brackets, at most ``limit`` characters:
    recorded names (``source_checkpoint``, a folder) come from files and must not inject Markdown, HTML or
    front-matter keys into the card."""
    kept = "".join(" " if ord(c) < 32 or c in '`"<>' else c for c in str(text))
    return kept[:limit]


def _yaml_string(text: str) -> str:
    """A YAML double-quoted scalar (JSON's string syntax is a subset of it): one value, never more keys."""
    return json.dumps(_plain(text))


def _escaped_json(value) -> str:
    """JSON for a fenced code block: backticks (which could close the block) and angle brackets (HTML) escaped as
    JSON unicode escapes, so the data stays exact."""
    text = dump_json(value)
    return text.replace("`", "\\u0060").replace("<", "\\u003c").replace(">", "\\u003e")


def _source_reference(name: str) -> str:
    """Markdown for the source checkpoint: a link to its Hub page for a Hub id, else the name as code."""
    if is_hub_id(name) and not Path(name).exists():
        return f"[`{name}`](https://huggingface.co/{name})"
    return f"`{_plain(name)}`"


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
    base_model = str(config.source_checkpoint or "unknown")
    model_id = _plain(model_id or (Path(config.name_or_path).name if config.name_or_path else "path/to/model"))
    model_class = (config.architectures or ["BcosForImageClassification"])[0]
    task = TASKS_BY_MODEL_CLASS.get(model_class, TASKS_BY_NAME["base"])
    pipeline_tag, auto_class, processor_class, pipeline_call = task.card
    conversion = (
        "```json\n" + _escaped_json(report) + "\n```" if report else "No conversion report was saved with this model."
    )
    status = (
        "\n> This is the converted model **before fine-tuning**: with B = $b and no biases its predictions differ "
        "from the source model's. Align it with the source without labels (`bcos-hf align MODEL IMAGES OUT`, or "
        "`BcosTrainer` with `bcos_hf.alignment.alignment_arguments`) or fine-tune it (`BcosTrainer`) to recover "
        "accuracy. What label-free alignment keeps of an original, measured on real weights and natural photos: "
        f"[Keeping what the original knows]({KEEPING_KNOWLEDGE_URL}).\n"
        if report is not None and not fine_tuned and (config.b != 1 or not config.keep_bias)
        else ""
    )
    rendered_sections = "".join(f"## {title}\n\n{body.strip()}\n\n" for title, body in (sections or {}).items())
    return _template().substitute(
        pipeline_tag=pipeline_tag,
        base_model=_yaml_string(base_model),
        base_model_reference=_source_reference(base_model),
        model_name=f"{model_id} (B-cos)",
        model_id=model_id,
        auto_class=auto_class,
        processor_class=processor_class,
        pipeline_call=pipeline_call,
        bcos_hf_version=config.bcos_hf_version or "",
        source_architecture=_plain(config.source_architecture or config.source_config.model_type),
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
