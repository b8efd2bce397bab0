"""The registry of B-cos tasks: one entry per kind of B-cos model, from which the rest is derived.

An entry names the task key the adapters use in ``model_classes`` (which source class becomes which B-cos
class), the B-cos model class and its config class, the Auto classes it registers with (in ``bcos_hf`` and in
the ``auto_map`` that remote code loads through) and how its model card shows it. A new task (detection,
segmentation) is one entry here plus its model class.

Part of the remote-loadable model code: imports nothing from bcos_hf.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BcosTask:
    """One kind of B-cos model.

    Attributes:
        name: the task key of the adapters' ``model_classes`` and of ``BcosPreTrainedModel.task``.
        model_class: the B-cos model class, as ``"module.ClassName"`` inside ``bcos_hf.modeling``.
        config_class: its config class, as ``"module.ClassName"``.
        auto_classes: the transformers Auto classes that load it (``AutoConfig`` is implied).
        card: how the model card shows it: pipeline task, Auto class, processor class and a pipeline call.
    """

    name: str
    model_class: str
    config_class: str
    auto_classes: tuple[str, ...]
    card: tuple[str, str, str, str]

    @property
    def model_class_name(self) -> str:
        return self.model_class.rsplit(".", 1)[1]


ZERO_SHOT_CARD = (
    "zero-shot-image-classification",
    "AutoModel",
    "AutoProcessor",
    'print(pipe("cat.jpg", candidate_labels=["a photo of a cat", "a photo of a dog"]))',
)

TASKS: tuple[BcosTask, ...] = (
    BcosTask(
        "base",
        "modeling_bcos.BcosModel",
        "configuration_bcos.BcosConfig",
        ("AutoModel",),
        ("image-feature-extraction", "AutoModel", "AutoImageProcessor", 'features = pipe("cat.jpg")'),
    ),
    BcosTask(
        "image-classification",
        "modeling_bcos.BcosForImageClassification",
        "configuration_bcos.BcosConfig",
        ("AutoModelForImageClassification",),
        ("image-classification", "AutoModelForImageClassification", "AutoImageProcessor", 'print(pipe("cat.jpg"))'),
    ),
    BcosTask(
        "zero-shot-image-classification",
        "modeling_bcos_clip.BcosCLIPModel",
        "configuration_bcos_clip.BcosCLIPConfig",
        ("AutoModel", "AutoModelForZeroShotImageClassification"),
        ZERO_SHOT_CARD,
    ),
    BcosTask(
        # SigLIP scores each label with a sigmoid, not a softmax over labels: its own B-cos class and config.
        "zero-shot-image-classification-sigmoid",
        "modeling_bcos_clip.BcosSiglipModel",
        "configuration_bcos_clip.BcosSiglipConfig",
        ("AutoModel", "AutoModelForZeroShotImageClassification"),
        ZERO_SHOT_CARD,
    ),
)

TASKS_BY_NAME = {task.name: task for task in TASKS}
TASKS_BY_MODEL_CLASS = {task.model_class_name: task for task in TASKS}


def remote_code_auto_map(config_class: str) -> dict[str, str]:
    """The ``auto_map`` a saved config carries: every Auto class that loads a model of ``config_class``."""
    auto_map = {"AutoConfig": config_class}
    for task in TASKS:
        if task.config_class == config_class:
            auto_map.update(dict.fromkeys(task.auto_classes, task.model_class))
    return auto_map
