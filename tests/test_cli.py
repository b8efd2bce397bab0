"""The `bcos-hf` command line, run as users run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys

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
