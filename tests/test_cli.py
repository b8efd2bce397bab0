"""The `bcos-hf` command line, run as users run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch

from bcos_hf.cli import main


def bcos_hf_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    return subprocess.run(
        [sys.executable, "-m", "bcos_hf.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def test_convert_command_writes_a_loadable_folder_and_summary(tiny_vit_dir, tmp_path):
    result = bcos_hf_cli("convert", str(tiny_vit_dir), str(tmp_path / "out"), "--b", "1", "--keep-bias")
    assert result.returncode == 0, result.stderr
    assert "equivalence check" in result.stdout and "B = 1" in result.stdout
    report = json.loads((tmp_path / "out" / "conversion_report.json").read_text())
    assert report["b"] == 1 and report["keep_bias"] is True and report["equivalence_max_abs_diff"] < 1e-5


def test_convert_errors_exit_with_status_2_and_a_message(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["convert", str(tmp_path / "empty"), str(tmp_path / "out")]) == 2
    assert "bcos-hf convert: error:" in capsys.readouterr().err
    assert main(["convert", "no-such/model-anywhere", str(tmp_path / "out")]) == 2


def test_align_command_aligns_a_converted_model_on_a_folder_of_images(tmp_path, capsys):
    """The user story: a converted folder, a folder of unlabelled images, no labels: an aligned model comes out."""
    from PIL import Image
    from transformers import AutoModelForImageClassification

    from .families import random_images, save_family

    _, source = save_family("mobilenet_v2", tmp_path / "source")
    assert main(["convert", str(source), str(tmp_path / "bcos")]) == 0
    images = tmp_path / "images"
    images.mkdir()
    for index, image in enumerate(random_images(6, 40, seed=4)):
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype("uint8")).save(images / f"{index}.png")
    status = main(
        [
            "align",
            str(tmp_path / "bcos"),
            str(images),
            str(tmp_path / "aligned"),
            "--max-steps",
            "2",
            "--batch-size",
            "3",
            "--calibration-batches",
            "1",
        ]
    )
    assert status == 0, capsys.readouterr().err
    assert "Aligned" in capsys.readouterr().out
    aligned = AutoModelForImageClassification.from_pretrained(tmp_path / "aligned")
    start = AutoModelForImageClassification.from_pretrained(tmp_path / "bcos")
    assert type(aligned).__name__ == "BcosForImageClassification"
    changed = [k for k, v in aligned.state_dict().items() if not torch.equal(v, start.state_dict()[k])]
    assert any("running_var" in k for k in changed) and any("weight" in k for k in changed)


def test_align_command_refuses_a_model_that_is_not_bcos(tiny_vit_dir, tmp_path, capsys):
    assert main(["align", str(tiny_vit_dir), str(tmp_path), str(tmp_path / "out")]) == 2
    assert "convert it first" in capsys.readouterr().err
