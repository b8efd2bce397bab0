"""Hub pushes, offline: capture what would be uploaded, check the card, load it back without bcos_hf."""

from __future__ import annotations

import fnmatch
import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import CommitInfo, HfApi, ModelCard, RepoUrl
from PIL import Image

from bcos_hf.data import compute_accuracy
from bcos_hf.hub import EXPLANATION_PICTURE, push_to_hub
from bcos_hf.training import BcosTrainer, BcosTrainingArguments

from .conftest import run_without_bcos_hf
from .families import vit_processor
from .train_tiny import TinyImages, load, save_tiny_bcos

TOKEN = "hf_DoNotLeakThisToken0123456789"
REPO = "someone/tiny-bcos-vit"


class CapturingApi:
    """Stands in for HfApi: records each upload's files (honouring ignore_patterns) and the tokens passed."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.tokens = []

    def create_repo(self, repo_id, *, token=None, **kwargs):
        self.tokens.append(token)
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, *, repo_id, folder_path, token=None, ignore_patterns=None, **kwargs):
        self.tokens.append(token)
        ignored = [ignore_patterns] if isinstance(ignore_patterns, str) else list(ignore_patterns or [])
        for path in Path(folder_path).rglob("*"):
            relative = path.relative_to(folder_path).as_posix()
            if path.is_file() and not any(fnmatch.fnmatch(relative, pattern) for pattern in ignored):
                (self.folder / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, self.folder / relative)
        return CommitInfo(f"https://huggingface.co/{repo_id}/commit/0", "upload", "", "0" * 40)

    def create_commit(self, *, repo_id, operations, token=None, **kwargs):
        self.tokens.append(token)
        for operation in operations:
            target = self.folder / operation.path_in_repo
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(operation.path_or_fileobj, target)
        return CommitInfo(f"https://huggingface.co/{repo_id}/commit/0", "upload", "", "0" * 40)


@pytest.fixture
def capture(tmp_path, monkeypatch) -> CapturingApi:
    """Patch HfApi's upload methods (the Trainer and model.push_to_hub use a shared HfApi) with a capture."""
    api = CapturingApi(tmp_path / "uploaded")
    for name in ("create_repo", "upload_folder", "create_commit"):
        monkeypatch.setattr(HfApi, name, lambda self, *args, _name=name, **kwargs: getattr(api, _name)(*args, **kwargs))
    return api


def assert_no_token(folder: Path, *texts: str) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), f"the token leaked into {path.name}"
    for text in texts:
        assert TOKEN not in text


def load_without_bcos_hf(folder: Path, tmp_path: Path) -> np.ndarray:
    """Logits of the uploaded model on fixed images, computed in a Python where bcos_hf cannot be imported."""
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "images.npy", images.numpy())
    run_without_bcos_hf(
        f"""
        import numpy as np, torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained({str(folder)!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        processor = AutoImageProcessor.from_pretrained({str(folder)!r})
        assert processor.do_normalize is False
        with torch.no_grad():
            logits = model(pixel_values=torch.from_numpy(np.load("images.npy"))).logits
        np.save("logits.npy", logits.numpy())
        """,
        hf_home=tmp_path,
    )
    return np.load(tmp_path / "logits.npy"), images


def test_trainer_push_to_hub_publishes_a_loadable_model_with_a_bcos_card(tmp_path, capture, caplog, capsys):
    model_dir = save_tiny_bcos(tmp_path / "model")
    args = BcosTrainingArguments(
        output_dir=str(tmp_path / "run"),
        max_steps=3,
        per_device_train_batch_size=8,
        eval_strategy="steps",
        eval_steps=3,
        save_strategy="steps",
        save_steps=3,
        hub_model_id=REPO,
        hub_token=TOKEN,
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
        log_level="debug",
    )
    trainer = BcosTrainer(
        load(model_dir),
        args,
        train_dataset=TinyImages(),
        eval_dataset=TinyImages(16, seed=1),
        compute_metrics=compute_accuracy,
        processing_class=vit_processor(16),
    )
    caplog.set_level(logging.DEBUG)
    trainer.train()
    Image.new("RGB", (8, 8)).save(tmp_path / "run" / EXPLANATION_PICTURE)
    trainer.push_to_hub(dataset="tiny random images")

    uploaded = capture.folder
    names = {path.name for path in uploaded.rglob("*") if path.is_file()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} <= names
    assert {"modeling_bcos.py", "configuration_bcos.py", "bcos_layers.py", "conversion_report.json"} <= names
    assert EXPLANATION_PICTURE in names and not any(name.endswith(".bin") and "model" in name for name in names)
    assert not any(path.name.startswith("checkpoint-") for path in uploaded.iterdir())

    card = (uploaded / "README.md").read_text()
    for expected in (
        "base_model: ",
        "| B (alignment exponent) | 2 |",
        "| training data | tiny random images (64 training images) |",
        "| fine-tuning | 3 optimiser steps",
        "| accuracy | ",
        "## Conversion",
        '"equivalence_max_abs_diff"',
        "## Training",
        "| loss | bce |",
        "| gradient clipping | adaptive, clip factor 0.01, eps 0.001 |",
        "![B-cos explanations",
        "import bcos_hf",
        f'from_pretrained("{REPO}", trust_remote_code=True)',
        "@inproceedings{boehle2022bcos",
        "@inproceedings{arya2024bcosification",
    ):
        assert expected in card, expected
    assert "before fine-tuning" not in card
    assert "Keeping what the original knows" not in card  # trained with labels, not aligned
    assert ModelCard(card).data.library_name == "transformers"

    logs = caplog.text + "".join(capsys.readouterr())
    assert_no_token(tmp_path, logs)  # the output folder, its checkpoints and the upload
    assert capture.tokens == [TOKEN, TOKEN]  # ... yet the token did reach the Hub client

    logits, images = load_without_bcos_hf(uploaded, tmp_path)
    trainer.model.eval()
    with torch.no_grad():
        expected = trainer.model(pixel_values=images).logits.numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-6)


def test_push_to_hub_with_an_injected_client_and_model_push_publishes_card_and_processor(tmp_path, capture):
    model_dir = save_tiny_bcos(tmp_path / "model")
    model = load(model_dir)
    api = CapturingApi(tmp_path / "injected")
    push_to_hub(model, REPO, vit_processor(16), token=TOKEN, api=api, extra_rows={"accuracy": "0.5 (test)"})
    card = (api.folder / "README.md").read_text()
    assert "| accuracy | 0.5 (test) |" in card and "before fine-tuning" in card  # not trained: says so
    assert "[Keeping what the original knows](https://" in card  # ... and where alignment is measured
    assert {"preprocessor_config.json", "model.safetensors", "modeling_bcos.py"} <= {
        p.name for p in api.folder.iterdir()
    }
    assert api.tokens == [TOKEN, TOKEN]

    # model.push_to_hub publishes the same: weights, code, the processor saved next to the model, the B-cos card.
    model.push_to_hub(REPO, token=TOKEN)
    names = {path.name for path in capture.folder.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_bcos.py", "preprocessor_config.json", "README.md"} <= names
    pushed_card = (capture.folder / "README.md").read_text()
    assert "B-cos" in pushed_card and "trust_remote_code=True" in pushed_card and "arya2024bcosification" in pushed_card
    assert json.loads((capture.folder / "config.json").read_text())["auto_map"]["AutoModelForImageClassification"]
    assert capture.tokens[-1] == TOKEN
    assert_no_token(tmp_path)


def test_training_arguments_never_pickle_the_token():
    args = BcosTrainingArguments(output_dir="out", hub_token=TOKEN, use_cpu=True)
    buffer = io.BytesIO()
    torch.save(args, buffer)
    assert TOKEN.encode() not in buffer.getvalue() and TOKEN not in str(args) and args.hub_token == TOKEN
