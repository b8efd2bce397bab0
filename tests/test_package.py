"""The package behaves like a transformers model library: default configs build, public names import."""

import torch
from transformers import AutoConfig, ViTConfig

import bcos_hf
from bcos_hf import BcosConfig, BcosForImageClassification, BcosTrainer, BcosTrainingArguments


def test_default_config_builds_a_bcos_vit_base_and_round_trips(tmp_path):
    config = BcosConfig()
    assert isinstance(config.source_config, ViTConfig)
    assert config.source_config.num_channels == 6 and config.source_config.hidden_size == 768
    assert config.b == 2.0 and config.keep_bias is False
    config.save_pretrained(tmp_path)
    reloaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(reloaded, BcosConfig) and reloaded.source_config.num_channels == 6


def test_default_config_with_a_small_source_builds_a_working_model():
    source = {"model_type": "vit", "num_channels": 6, "hidden_size": 32, "num_hidden_layers": 1}
    source |= {"num_attention_heads": 2, "intermediate_size": 64, "image_size": 32, "patch_size": 16}
    model = BcosForImageClassification(BcosConfig(source_config=source)).eval()
    logits = model(pixel_values=torch.rand(2, 3, 32, 32)).logits
    assert logits.shape == (2, 2) and torch.isfinite(logits).all()


def test_trainer_and_arguments_are_exported_at_the_top_level():
    assert {"BcosTrainer", "BcosTrainingArguments"} <= set(bcos_hf.__all__)
    assert BcosTrainer.__module__ == "bcos_hf.training"
    assert BcosTrainingArguments(output_dir="unused").alignment_weight == 0.0


def test_the_task_registry_is_the_one_source_of_tasks():
    """Adapters, model classes, Auto registration, auto_map and model cards all follow bcos_hf.modeling.tasks."""
    import transformers

    from bcos_hf.convert import BCOS_CLASSES
    from bcos_hf.modeling.adapters import ADAPTERS
    from bcos_hf.modeling.tasks import TASKS, TASKS_BY_NAME, remote_code_auto_map

    assert set(BCOS_CLASSES) == set(TASKS_BY_NAME)
    for task in TASKS:
        model_class = BCOS_CLASSES[task.name]
        assert model_class.task == task.name and model_class.__name__ == task.model_class_name
        config_auto_map = model_class.config_class().auto_map if task.name != "base" else BcosConfig().auto_map
        assert config_auto_map == remote_code_auto_map(task.config_class)
        for auto_class in task.auto_classes:
            assert getattr(transformers, auto_class)._model_mapping[model_class.config_class] is model_class
    for adapter in ADAPTERS.values():
        assert set(adapter.model_classes) <= set(TASKS_BY_NAME), adapter.model_type


def test_the_core_import_loads_no_machine_specific_loader():
    """Loaders that know this machine (Debian data, weight packages, photos) stay out of ``import bcos_hf``."""
    import subprocess
    import sys

    code = "import sys, bcos_hf; print(sorted(m for m in sys.modules if m.startswith('bcos_hf.')))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for module in ("bcos_hf.fashion_mnist", "bcos_hf.pretrained", "bcos_hf.photos"):
        assert f"'{module}'" not in loaded
    assert "'bcos_hf.training'" in loaded  # the check itself sees the package's modules
