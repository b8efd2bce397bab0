"""Multi-process training on 2 CPU processes over gloo: ``torchrun`` (DDP) and ``accelerate launch`` with the packaged
FSDP2 config run BcosTrainer unchanged."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bcos_hf.losses import adaptive_clip_grad_, bce_loss

from .train_tiny import TinyImages, load, main, save_tiny_bcos

SCRIPT = Path(__file__).with_name("train_tiny.py")


def run_script(*args: str, launcher: list[str] | None = None, timeout: int = 240) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    command = [*(launcher or [sys.executable]), str(SCRIPT), *args]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    assert result.returncode == 0, f"{' '.join(command)}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr[-4000:]}"


def train_in_process(*args: str) -> None:
    """The reference run, in this process (saves an interpreter start-up)."""
    threads = torch.get_num_threads()
    try:
        main(list(args))
    finally:
        torch.set_num_threads(threads)


def assert_ranks_agree_with_one_process(run: Path, single_run: Path, model_dir: Path, label: str) -> dict:
    """Both ranks end with identical weights, equal to one process with the same global batch, and different from
    the start (it trained); returns rank 0's weights."""
    rank0 = load_file(run / "final-rank0.safetensors")
    rank1 = load_file(run / "final-rank1.safetensors")
    single = load_file(single_run / "final-rank0.safetensors")
    start = load(model_dir).state_dict()
    assert rank0.keys() == rank1.keys() == single.keys() == start.keys()
    for name in rank0:
        torch.testing.assert_close(rank1[name], rank0[name], rtol=0, atol=0, msg=f"ranks differ: {name}")
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-4, atol=1e-6, msg=f"{label} != 1 process: {name}")
    assert any(not torch.equal(rank0[name], start[name]) for name in rank0)
    return rank0


@pytest.mark.slow
@pytest.mark.parametrize("aligned", [False, True], ids=["labels", "aligned-with-teacher"])
def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path, aligned):
    """Label training, and alignment with the original (one teacher-forced step, then chained)."""
    model_dir = save_tiny_bcos(tmp_path / "model")
    extra = ["--teacher", str(tmp_path / "model-source")] if aligned else []
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29517"]
    run_script(
        str(model_dir), str(tmp_path / "ddp"), "--max_steps", "3", "--batch_size", "4", *extra, launcher=torchrun
    )
    train_in_process(str(model_dir), str(tmp_path / "single"), "--max_steps", "3", "--batch_size", "8", *extra)

    assert_ranks_agree_with_one_process(tmp_path / "ddp", tmp_path / "single", model_dir, "DDP")


def test_saving_under_fsdp2_keeps_the_bcos_model_code(tmp_path, monkeypatch):
    """FSDP2 swaps the model's class for a subclass defined in torch; saved folders must still carry the B-cos
    code and auto_map (checked on a GPU with accelerate's FSDP2; here the class swap alone is reproduced)."""
    import json
    import types

    from transformers import AutoModelForImageClassification

    from bcos_hf.training import BcosTrainer, BcosTrainingArguments

    model = load(save_tiny_bcos(tmp_path / "model"))
    args = BcosTrainingArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none")
    trainer = BcosTrainer(model, args)
    fsdp_file = Path(torch.__file__).parent / "distributed" / "fsdp" / "_fully_shard" / "_fully_shard.py"
    module = types.ModuleType("torch.distributed.fsdp._fully_shard._fully_shard_test")
    module.__file__ = str(fsdp_file)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    wrapped = type(f"FSDP{type(model).__name__}", (type(model),), {"__module__": module.__name__})
    model.__class__ = wrapped

    trainer._save(str(tmp_path / "saved"))
    saved = tmp_path / "saved"
    assert (saved / "modeling_bcos.py").is_file() and not list(saved.glob("_fsdp*.py"))
    auto_map = json.loads((saved / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModelForImageClassification"] == "modeling_bcos.BcosForImageClassification"
    assert type(AutoModelForImageClassification.from_pretrained(saved)).__name__ == "BcosForImageClassification"


FSDP_CONFIG = Path(__file__).parents[1] / "examples" / "accelerate_configs" / "fsdp.yaml"


@pytest.mark.slow
def test_two_process_fsdp2_trains_saves_reloads_and_resumes(tmp_path):
    """BcosTrainer under the packaged FSDP2 accelerate config, 2 CPU processes over gloo (``train_tiny.fsdp_on_cpu``
    lets accelerate shard on the CPU): the parameters are DTensor shards, both ranks gather the same weights, and
    they match one process with the same global batch, so adaptive clipping, which works per row of each shard,
    clipped as on the full weights (and it does clip here: see the end). A checkpoint saved mid-run loads with
    ``from_pretrained``, and resuming from it ends at the same weights as the uninterrupted run."""
    model_dir = save_tiny_bcos(tmp_path / "model")
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(FSDP_CONFIG)]
    launch += ["--mixed_precision", "no", "--main_process_port", "29519"]
    steps = ["--max_steps", "4", "--batch_size", "4", "--save_steps", "2"]
    run_script(str(model_dir), str(tmp_path / "fsdp"), *steps, launcher=launch)
    train_in_process(str(model_dir), str(tmp_path / "single"), "--max_steps", "4", "--batch_size", "8")

    rank0 = assert_ranks_agree_with_one_process(tmp_path / "fsdp", tmp_path / "single", model_dir, "FSDP")

    reloaded = load(tmp_path / "fsdp" / "checkpoint-4").state_dict()
    for name in rank0:
        torch.testing.assert_close(reloaded[name], rank0[name], rtol=0, atol=0, msg=f"checkpoint differs: {name}")

    resumed_dir = tmp_path / "resumed"
    shutil.copytree(tmp_path / "fsdp" / "checkpoint-2", resumed_dir / "checkpoint-2")
    run_script(str(model_dir), str(resumed_dir), *steps, "--resume", launcher=launch)
    resumed = load_file(resumed_dir / "final-rank0.safetensors")
    for name in rank0:
        torch.testing.assert_close(resumed[name], rank0[name], rtol=1e-6, atol=1e-7, msg=f"resume differs: {name}")

    model = load(model_dir).train()
    batch = next(iter(torch.utils.data.DataLoader(TinyImages(), batch_size=8)))
    bce_loss(model(pixel_values=batch["pixel_values"]).logits, batch["labels"]).backward()
    grads = [parameter.grad.clone() for parameter in model.parameters()]
    adaptive_clip_grad_(model.parameters())
    assert any(not torch.equal(parameter.grad, grad) for parameter, grad in zip(model.parameters(), grads, strict=True))
