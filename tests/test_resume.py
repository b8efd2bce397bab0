"""Nothing lost: a training process killed with SIGKILL resumes from its last safetensors checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from .test_distributed import SCRIPT, run_script, train_in_process
from .train_tiny import save_tiny_bcos


@pytest.mark.slow
def test_sigkill_mid_run_then_resume_ends_with_the_uninterrupted_weights(tmp_path):
    model_dir = save_tiny_bcos(tmp_path / "model")
    train_in_process(str(model_dir), str(tmp_path / "uninterrupted"), "--max_steps", "8")

    output = tmp_path / "killed"
    options = [str(model_dir), str(output), "--max_steps", "8", "--save_steps", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    process = subprocess.Popen(
        [sys.executable, str(SCRIPT), *options, "--step_delay", "1.0"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    checkpoint = output / "checkpoint-4"
    deadline = time.monotonic() + 180
    while not (checkpoint / "trainer_state.json").is_file():
        assert process.poll() is None, "the training process ended before its second checkpoint"
        assert time.monotonic() < deadline, "no checkpoint-4 after 180 s"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=30)
    assert process.returncode == -signal.SIGKILL
    assert not (output / "final-rank0.safetensors").exists()
    assert (checkpoint / "model.safetensors").is_file()
    assert not (checkpoint / "pytorch_model.bin").exists()

    run_script(*options, "--resume")
    resumed = load_file(output / "final-rank0.safetensors")
    uninterrupted = load_file(tmp_path / "uninterrupted" / "final-rank0.safetensors")
    for name, tensor in uninterrupted.items():
        torch.testing.assert_close(resumed[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
