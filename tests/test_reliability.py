"""Nothing lost, nothing silently wrong: bad input and faults at every boundary end in a clear error.

Each test is one guarantee of docs/reliability.md: data loss (writing over the source or a
user's folder, interrupted conversions), silently wrong results (random weights, NaN, ignored options,
mismatched labels), errors that say what to do, and security (no code run from folders, no injection into
model cards, no token leaks, no writes outside the output folder).
"""

from __future__ import annotations

import copy
import json
import math
import pickle
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageClassification, pipeline

from bcos_hf.cli import main
from bcos_hf.convert import REPORT_FILE, convert
from bcos_hf.data import ImageClassificationCollator, to_rgb
from bcos_hf.guards import STAGING_SUFFIX, dump_json, unique_names
from bcos_hf.localisation import LocalisationResult, grid_pointing_game, save_results
from bcos_hf.model_card import render_model_card
from bcos_hf.modeling.modeling_bcos import INCOMPLETE_MARKER
from bcos_hf.training import BcosTrainer, BcosTrainingArguments
from bcos_hf.training_callbacks import NonFiniteError

from .families import IMAGE_MEAN, random_images, save_family


def strict_json(text: str):
    """``json.loads`` that refuses the bare NaN / Infinity Python's json module writes by default."""
    return json.loads(text, parse_constant=lambda constant: pytest.fail(f"bare {constant} in JSON"))


def folder_state(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


@pytest.fixture
def converted_classifier(tiny_vit_dir, tmp_path) -> Path:
    """A converted tiny ViT classifier (labels cat, dog, car; 32 px), B = 1 with biases: the source's function."""
    convert(tiny_vit_dir, tmp_path / "bcos", b=1, keep_bias=True)
    return tmp_path / "bcos"


def argparse_error(argv: list[str], capsys) -> str:
    """Run the CLI with arguments argparse must refuse; return its message (exit status 2)."""
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    return capsys.readouterr().err


# Data loss ---------------------------------------------------------------------------------------------------


def test_converting_into_the_source_folder_is_refused_and_leaves_it_intact(tiny_vit_dir, tmp_path, capsys):
    before = folder_state(tiny_vit_dir)
    for overwrite in ([], ["--overwrite"]):
        assert main(["convert", str(tiny_vit_dir), str(tiny_vit_dir), *overwrite]) == 2
        assert "would destroy the source" in capsys.readouterr().err
    assert main(["convert", str(tiny_vit_dir), str(tiny_vit_dir.parent), "--overwrite"]) == 2  # holds the source
    assert folder_state(tiny_vit_dir) == before


def test_an_existing_folder_is_kept_unless_overwrite_is_asked_for(tiny_vit_dir, tmp_path, capsys):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "README.md").write_text("my notes")
    (target / "model-00001-of-00002.safetensors").write_bytes(b"my shard")
    before = folder_state(target)
    assert main(["convert", str(tiny_vit_dir), str(target)]) == 2
    error = capsys.readouterr().err
    assert "exists and is not empty" in error and "--overwrite" in error
    assert folder_state(target) == before
    assert main(["convert", str(tiny_vit_dir), str(target), "--overwrite"]) == 0
    assert not (target / "model-00001-of-00002.safetensors").exists() and (target / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing left beside it
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(tiny_vit_dir), str(tmp_path / "empty")]) == 0  # an empty folder is fine


def test_a_link_to_the_source_is_the_source(tiny_vit_dir, tmp_path):
    (tmp_path / "link").symlink_to(tiny_vit_dir, target_is_directory=True)
    before = folder_state(tiny_vit_dir)
    with pytest.raises(FileExistsError, match="would destroy the source"):
        convert(tiny_vit_dir, tmp_path / "link", overwrite=True)
    assert folder_state(tiny_vit_dir) == before


def test_a_folder_filled_by_someone_else_during_the_conversion_is_kept(tiny_vit_dir, tmp_path, monkeypatch):
    import bcos_hf.convert as conversion

    write = conversion.Conversion._write

    def racing(self, folder):
        write(self, folder)
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "theirs.txt").write_text("theirs")

    monkeypatch.setattr(conversion.Conversion, "_write", racing)
    with pytest.raises(FileExistsError, match="was kept"):
        convert(tiny_vit_dir, tmp_path / "out")
    assert folder_state(tmp_path / "out") == {"theirs.txt": b"theirs"}
    assert not list(tmp_path.glob(f".out.*{STAGING_SUFFIX}"))


def test_a_failed_write_leaves_nothing_behind(tiny_vit_dir, tmp_path, monkeypatch):
    """A full disk: the error says so, and neither the target nor a staging folder remains."""
    from safetensors import SafetensorError

    from bcos_hf.modeling.modeling_bcos import BcosPreTrainedModel

    for error in (OSError(28, "No space left on device"), SafetensorError("Error while serializing: IoError")):

        def fail(self, folder, *args, error=error, **kwargs):
            (Path(folder) / "model.safetensors").write_bytes(b"partial")
            raise error

        monkeypatch.setattr(BcosPreTrainedModel, "save_pretrained", fail)
        with pytest.raises(OSError, match=r"Could not write the converted model.*Nothing was written"):
            convert(tiny_vit_dir, tmp_path / "out")
        assert sorted(tmp_path.iterdir()) == [tiny_vit_dir]


def test_a_killed_conversion_leaves_no_folder_that_loads_and_its_leftovers_go(tiny_vit_dir, tmp_path):
    """SIGKILL after the weights are written: the target does not exist, the staging folder refuses to load
    and the next conversion into the same target removes it."""
    script = f"""
        import os, signal
        import bcos_hf.convert as conversion
        write = conversion.Conversion._write
        def killed(self, folder):
            self.model.save_pretrained(folder)
            os.kill(os.getpid(), signal.SIGKILL)
        conversion.Conversion._write = killed
        conversion.convert({str(tiny_vit_dir)!r}, {str(tmp_path / "out")!r})
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, timeout=240)
    assert result.returncode == -signal.SIGKILL
    assert not (tmp_path / "out").exists()
    (leftover,) = tmp_path.glob(f".out.*{STAGING_SUFFIX}")
    assert (leftover / "model.safetensors").is_file() and (leftover / INCOMPLETE_MARKER).is_file()
    with pytest.raises(OSError, match="interrupted write"):
        AutoModelForImageClassification.from_pretrained(leftover)
    convert(tiny_vit_dir, tmp_path / "out")
    assert not leftover.exists() and (tmp_path / "out" / REPORT_FILE).is_file()


# Silently wrong ----------------------------------------------------------------------------------------------


def test_explaining_a_backbone_folder_is_refused(tiny_vit_model_dir, tmp_path, capsys):
    convert(tiny_vit_model_dir, tmp_path / "backbone")
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    assert main(["explain", str(tmp_path / "backbone"), str(tmp_path / "a.png"), "--out", str(tmp_path / "x")]) == 2
    assert "they would be random" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_a_folder_missing_a_tensor_does_not_load(converted_classifier):
    weights = load_file(converted_classifier / "model.safetensors")
    del weights[next(key for key in weights if "classifier.weight" in key)]
    save_file(weights, converted_classifier / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 weights.*classifier\.weight"):
        AutoModelForImageClassification.from_pretrained(converted_classifier)


def test_a_source_missing_a_tensor_is_not_converted(tiny_vit_dir, tmp_path):
    """Transformers would initialise the missing classifier randomly, and the conversion would carry it on."""
    weights = load_file(tiny_vit_dir / "model.safetensors")
    del weights[next(key for key in weights if key.endswith("classifier.weight"))]
    save_file(weights, tiny_vit_dir / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks 1 weights of its ViTForImageClassification \(classifier\.weight\)"):
        convert(tiny_vit_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_classifier_folder_loads_as_its_backbone_with_pretrained_weights(converted_classifier):
    """AutoModel on a classifier's folder gives its backbone (as transformers does), weights included."""
    from transformers import AutoModel

    classifier = AutoModelForImageClassification.from_pretrained(converted_classifier)
    backbone = AutoModel.from_pretrained(converted_classifier)
    images = random_images(2)
    expected = classifier.network.vit(pixel_values=classifier.encode_pixels(images)).last_hidden_state
    torch.testing.assert_close(backbone(pixel_values=images).last_hidden_state, expected)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"logit_bias": math.nan}, "logit_bias must be a finite number"),
        ({"logit_temperature": math.inf}, "logit_temperature must be a finite positive number"),
        ({"image_mean": IMAGE_MEAN, "image_std": [math.nan, 1, 1]}, "3 finite values each"),
        ({"image_mean": IMAGE_MEAN}, "image_mean was given without image_std"),
        ({"b": math.inf}, "B must be a number >= 1"),
        ({"b": 1e6}, "at most 10"),
        ({"b": None}, "B must be a number >= 1"),
        ({"b": "two"}, "B must be a number >= 1"),
    ],
)
def test_conversion_parameters_that_give_a_broken_model_are_refused(tiny_vit_dir, tmp_path, options, message):
    with pytest.raises(ValueError, match=message):
        convert(tiny_vit_dir, tmp_path / "out", **options)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        (["--logit-bias", "nan"], "expected a finite number"),
        (["--image-std", "nan", "1", "1"], "expected a finite number"),
        (["--b", "inf"], "expected a finite number"),
    ],
)
def test_the_convert_command_refuses_non_finite_numbers(tiny_vit_dir, tmp_path, capsys, arguments, message):
    assert message in argparse_error(["convert", str(tiny_vit_dir), str(tmp_path / "out"), *arguments], capsys)


def test_the_convert_command_refuses_a_mean_without_a_std(tiny_vit_dir, tmp_path, capsys):
    assert main(["convert", str(tiny_vit_dir), str(tmp_path / "out"), "--image-mean", "0.5", "0.5", "0.5"]) == 2
    assert "--image-mean and --image-std" in capsys.readouterr().err


def test_nan_source_weights_are_refused_and_nan_folders_do_not_load(tmp_path, converted_classifier):
    save_family("vit", tmp_path / "nan-source")
    weights = load_file(tmp_path / "nan-source" / "model.safetensors")
    key = next(key for key in weights if key.endswith("classifier.weight"))
    weights[key][0, 0] = math.nan
    save_file(weights, tmp_path / "nan-source" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"holds NaN or infinity: its weights do \(classifier\.weight\)"):
        convert(tmp_path / "nan-source", tmp_path / "out")
    assert not (tmp_path / "out").exists()

    weights = load_file(converted_classifier / "model.safetensors")
    weights[next(key for key in weights if "classifier.weight" in key)][0, 0] = math.inf
    save_file(weights, converted_classifier / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="holds NaN or infinite weights"):
        AutoModelForImageClassification.from_pretrained(converted_classifier)


def test_json_outputs_never_hold_a_bare_nan(converted_classifier, tmp_path):
    strict_json((converted_classifier / REPORT_FILE).read_text())
    assert strict_json(dump_json({"mean": math.nan, "scores": [1.0, math.inf]})) == {
        "mean": None,
        "scores": [1.0, None],
    }
    save_results([LocalisationResult.from_scores("bcos", 2, [], 0)], tmp_path / "gridpg.json")
    assert strict_json((tmp_path / "gridpg.json").read_text())[0]["mean"] is None


def test_a_six_channel_input_must_be_the_encoding(converted_classifier):
    model = AutoModelForImageClassification.from_pretrained(converted_classifier)
    images = random_images(2)
    model(pixel_values=torch.cat([images, 1 - images], dim=1))  # the encoding is accepted
    with pytest.raises(ValueError, match=r"must be the encoding \[x, 1 - x\]"):
        model(pixel_values=torch.cat([images, images], dim=1))


def test_float_images_are_not_turned_black(converted_classifier):
    from transformers import AutoImageProcessor

    grey = np.full((32, 32), 0.6, dtype=np.float32)
    for image in (Image.fromarray(grey, mode="F"), grey, Image.fromarray((grey * 65535).astype(np.uint16))):
        assert np.asarray(to_rgb(image)).mean() == pytest.approx(153, abs=1)
    collator = ImageClassificationCollator(AutoImageProcessor.from_pretrained(converted_classifier))
    batch = collator([{"image": Image.fromarray(grey, mode="F"), "label": 0}])
    assert batch["pixel_values"].mean() == pytest.approx(0.6, abs=0.01)
    with pytest.raises(ValueError, match="values run from 0 to 300"):
        to_rgb(Image.fromarray(np.full((4, 4), 300.0, dtype=np.float32), mode="F"))
    with pytest.raises(ValueError, match="NaN"):
        to_rgb(Image.fromarray(np.full((4, 4), np.nan, dtype=np.float32), mode="F"))


def test_explaining_images_with_the_same_name_keeps_every_picture(converted_classifier, tmp_path, capsys):
    (tmp_path / "b").mkdir()
    paths = [tmp_path / "a.png", tmp_path / "a_2.png", tmp_path / "b" / "a.png"]
    for index, path in enumerate(paths):
        Image.new("RGB", (32, 32), (80 * index, 40, 200 - 80 * index)).save(path)
    assert unique_names(["a", "a_2", "a"]) == ["a", "a_2", "a_3"]
    out = tmp_path / "out"
    assert main(["explain", str(converted_classifier), *map(str, paths), "--out", str(out)]) == 0, capsys.readouterr()
    summary = strict_json((out / "summary.json").read_text())
    assert [entry["explanation"] for entry in summary] == [f"{n}_explanation.png" for n in ("a", "a_2", "a_3")]
    assert len(list(out.glob("*_heatmap.png"))) == 3


def test_gridpg_refuses_a_dataset_whose_classes_are_not_the_models(converted_classifier):
    from datasets import ClassLabel, Dataset, Features
    from datasets import Image as ImageFeature
    from transformers import AutoImageProcessor

    model = AutoModelForImageClassification.from_pretrained(converted_classifier)
    features = Features({"image": ImageFeature(), "label": ClassLabel(names=["red", "green", "blue"])})
    dataset = Dataset.from_dict({"image": [Image.new("RGB", (32, 32))] * 3, "label": [0, 1, 2]}, features=features)
    processor = AutoImageProcessor.from_pretrained(converted_classifier)
    with pytest.raises(ValueError, match=r"classes \['red', 'green', 'blue'\] are not among the model's labels"):
        grid_pointing_game(model, dataset, image_processor=processor, grid=2, progress=False)


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"grid": 0}, "grid must be a whole number >= 2"),
        ({"grid": 1}, "grid must be a whole number >= 2"),
        ({"smoothing": -3}, "smoothing must be an odd whole number"),
        ({"smoothing": 4}, "smoothing must be an odd whole number"),
        ({"num_grids": 0}, "num_grids must be a whole number >= 1"),
        ({"confidence": math.nan}, "confidence must lie in"),
        ({"batch_size": 0}, "batch_size must be a whole number >= 1"),
    ],
)
def test_gridpg_settings_without_a_meaning_are_refused(setting, message):
    images = (torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match=message):
        grid_pointing_game(torch.nn.Identity(), images, progress=False, **setting)


@pytest.mark.parametrize("arguments", [["--grid", "0"], ["--grid", "-1"], ["--num-grids", "0"], ["--batch-size", "0"]])
def test_the_localisation_command_refuses_counts_below_one(tmp_path, capsys, arguments):
    assert "expected a whole number >= 1" in argparse_error(["localisation", "m", "d", *arguments], capsys)


# Errors that say what to do ----------------------------------------------------------------------------------


def test_a_missing_local_path_is_named_as_such(tiny_vit_dir, tmp_path, capsys):
    for command in (
        ["convert", "./no-such-folder", str(tmp_path / "out")],
        ["explain", "/no/such", "a.png", "--out", "o"],
    ):
        assert main(command) == 2
        assert "There is no folder" in capsys.readouterr().err
    assert main(["explain", str(tiny_vit_dir), str(tmp_path / "missing.png"), "--out", str(tmp_path / "o")]) == 2
    assert "No image file" in capsys.readouterr().err
    assert main(["convert", "no-such-owner/no-such-model", str(tmp_path / "out")]) == 2
    assert "not a local folder, and the Hub could not provide it" in capsys.readouterr().err


def test_a_truncated_checkpoint_says_so(tiny_vit_dir, tmp_path, capsys):
    weights = tiny_vit_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["convert", str(tiny_vit_dir), str(tmp_path / "out")]) == 2
    assert "may be truncated or corrupt" in capsys.readouterr().err


def test_an_empty_batch_and_a_negative_target_are_refused(converted_classifier, tmp_path, capsys):
    model = AutoModelForImageClassification.from_pretrained(converted_classifier)
    with pytest.raises(ValueError, match="holds no images"):
        model(pixel_values=torch.rand(0, 3, 32, 32))
    assert "a class index must be >= 0" in argparse_error(
        ["explain", str(converted_classifier), "a.png", "--out", "o", "--target", "-1"], capsys
    )
    assert "expected a whole number >= 1" in argparse_error(
        ["explain", str(converted_classifier), "a.png", "--out", "o", "--batch-size", "0"], capsys
    )


def test_per_image_targets_work_in_the_pipeline_at_the_default_batch_size(converted_classifier):
    explainer = pipeline("image-explanation", model=str(converted_classifier))
    images = [Image.new("RGB", (32, 32), colour) for colour in ((255, 0, 0), (0, 255, 0))]
    results = explainer(images, target=["dog", 2])
    assert [result["target"] for result in results] == ["dog", "car"]
    with pytest.raises(ValueError, match="target has 3 entries for 2 images"):
        explainer(images, target=[0, 1, 2])


class Labelled(torch.utils.data.Dataset):
    def __init__(self, labels: list[int]) -> None:
        self.labels = labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"pixel_values": random_images(1, seed=index)[0], "labels": torch.tensor(self.labels[index])}


def training_arguments(tmp_path: Path, **overrides) -> BcosTrainingArguments:
    options = {"output_dir": str(tmp_path / "run"), "max_steps": 2, "per_device_train_batch_size": 2}
    return BcosTrainingArguments(**options, save_strategy="no", report_to=[], use_cpu=True, **overrides)


def test_training_refuses_labels_out_of_range_and_an_empty_dataset(converted_classifier, tmp_path):
    model = AutoModelForImageClassification.from_pretrained(converted_classifier)
    trainer = BcosTrainer(model, training_arguments(tmp_path), train_dataset=Labelled([0, 7]))
    with pytest.raises(ValueError, match=r"Labels must be class indices in \[0, 3\).*\[7\]"):
        trainer.train()
    with pytest.raises(ValueError, match="train_dataset is empty"):
        BcosTrainer(model, training_arguments(tmp_path), train_dataset=Labelled([]))


@pytest.mark.parametrize(
    "field", ["clip_factor", "clip_eps", "bias_decay", "distillation_temperature", "learning_rate"]
)
def test_training_arguments_refuse_nan(tmp_path, field):
    with pytest.raises(ValueError, match=field):
        training_arguments(tmp_path, **{field: math.nan})


def test_training_stops_at_the_first_non_finite_loss_or_weight(converted_classifier, tmp_path):
    model = AutoModelForImageClassification.from_pretrained(converted_classifier)
    with torch.no_grad():
        model.network.classifier.weight[0, 0] = math.nan
    trainer = BcosTrainer(model, training_arguments(tmp_path), train_dataset=Labelled([0, 1, 2, 0]))
    with pytest.raises(NonFiniteError, match="Step 1: the loss is nan"):
        trainer.train()

    model = AutoModelForImageClassification.from_pretrained(converted_classifier)
    model.network.classifier.weight.register_hook(lambda gradient: gradient * math.nan)  # the loss stays finite
    trainer = BcosTrainer(model, training_arguments(tmp_path), train_dataset=Labelled([0, 1, 2, 0]))
    with pytest.raises(NonFiniteError, match=r"Step 1: the optimiser step left NaN.*classifier\.weight"):
        trainer.train()


# Security ----------------------------------------------------------------------------------------------------


def test_explain_never_runs_code_from_the_model_folder(converted_classifier, tmp_path, capsys, monkeypatch):
    """A processor of an unknown type with an ``auto_map`` to code in the folder: transformers would ask whether to
    run it. A user who answers yes still runs nothing: bcos_hf never lets transformers load code from folders."""
    witness = tmp_path / "code-ran"
    (converted_classifier / "evil.py").write_text(f"open({str(witness)!r}, 'w').write('ran')\nclass Evil: pass\n")
    config = json.loads((converted_classifier / "preprocessor_config.json").read_text())
    config.update(image_processor_type="EvilImageProcessor", auto_map={"AutoImageProcessor": "evil.Evil"})
    (converted_classifier / "preprocessor_config.json").write_text(json.dumps(config))
    monkeypatch.setattr("builtins.input", lambda *args: "y")
    Image.new("RGB", (32, 32)).save(tmp_path / "a.png")
    status = main(["explain", str(converted_classifier), str(tmp_path / "a.png"), "--out", str(tmp_path / "out")])
    assert status == 2 and "trust_remote_code" in capsys.readouterr().err
    assert not witness.exists()


def test_recorded_names_cannot_inject_into_the_model_card(converted_classifier):
    from bcos_hf.modeling.configuration_bcos import BcosConfig

    config = BcosConfig.from_pretrained(converted_classifier)
    config.source_checkpoint = 'x"\nextra_key: injected\n<script>alert(1)</script> [a](javascript:alert(1)) `'
    card = render_model_card(config, report={"source": config.source_checkpoint, "parameters": 1})
    front_matter = yaml.safe_load(card.split("---")[1])
    assert set(front_matter) == {"library_name", "pipeline_tag", "base_model", "tags"}
    (reference,) = [line for line in card.splitlines() if line.startswith("A **B-cos** version of")]
    assert reference.count("`") == 2  # the name is one code span: no link, no HTML
    assert card.count("```") == 8  # the report's block and the template's three: none closed early
    body = card.split("---", 2)[2]  # the Markdown after the front matter (whose one value was checked above)
    outside_code = re.sub(r"`[^`]*`", "", re.sub(r"```.*?```", "", body, flags=re.S))
    assert "<script>" not in card and "javascript:" not in outside_code and "injected" not in outside_code
    saved = json.loads((converted_classifier / "config.json").read_text())
    saved["source_architecture"] = "x\n<b>bold</b>"
    (converted_classifier / "config.json").write_text(json.dumps(saved))
    with pytest.raises(ValueError, match="source_architecture must name a transformers class"):
        BcosConfig.from_pretrained(converted_classifier)


def test_training_arguments_hide_the_hub_token_but_copies_keep_it(tmp_path):
    arguments = training_arguments(tmp_path, hub_token="hf_secret_token")
    assert "hf_secret_token" not in repr(arguments) and "hf_secret_token" not in str(arguments)
    assert copy.copy(arguments).hub_token == "hf_secret_token"
    assert copy.deepcopy(arguments).hub_token == "hf_secret_token"
    assert pickle.loads(pickle.dumps(arguments)).hub_token is None  # checkpoints never carry it


def test_explanation_names_cannot_leave_the_folder(converted_classifier, tmp_path):
    model = AutoModelForImageClassification.from_pretrained(converted_classifier)
    explanation = model.explain(random_images(2))
    for names in (["../x", "y"], ["/etc/x", "y"], ["..", "y"], ["a", "a"], ["", "y"]):
        with pytest.raises(ValueError):
            explanation.save(tmp_path / "out", names=names)
    assert not list(tmp_path.glob("*.png")) and not list((tmp_path / "out").glob("*"))
    explanation.save(tmp_path / "out", names=["a", "b"])
    assert sorted(p.name for p in (tmp_path / "out").iterdir())[0] == "a_explanation.png"


def test_an_output_folder_that_is_a_file_is_refused(tiny_vit_dir, tmp_path):
    (tmp_path / "file").write_text("mine")
    with pytest.raises(FileExistsError, match="is a file"):
        convert(tiny_vit_dir, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"
