"""BcosTrainer: the recipe's loss and clipping, schedules, distillation, accumulation, mixed precision, bad input."""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import HfArgumentParser, TrainerCallback, TrainingArguments, ViTForImageClassification

from bcos_hf import BcosConv2d, BcosLinear
from bcos_hf.data import ImageClassificationCollator, compute_accuracy, load_image_dataset
from bcos_hf.fashion_mnist import FASHION_MNIST_LABELS, load_fashion_mnist
from bcos_hf.losses import adaptive_clip_grad_, bce_loss, distillation_kl, siglip_distillation_loss
from bcos_hf.training import BcosTrainer, BcosTrainingArguments

from .assets import needs_fashion_mnist
from .families import save_family, vit_processor
from .train_tiny import TINY_VIT, TinyImages, load, save_tiny_bcos


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_bcos(tmp_path_factory.mktemp("tiny") / "bcos")


def make_args(tmp_path, **overrides) -> BcosTrainingArguments:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    settings.update(overrides)
    return BcosTrainingArguments(**settings)


def image_dataset(n: int = 12, names=("cat", "dog", "car"), mode: str = "L") -> datasets.Dataset:
    rng = np.random.default_rng(0)
    channels = {"L": (), "RGB": (3,), "RGBA": (4,)}[mode]
    images = [Image.fromarray(rng.integers(0, 256, (20, 24, *channels), dtype=np.uint8), mode) for _ in range(n)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=list(names))})
    return datasets.Dataset.from_dict({"image": images, "label": [i % len(names) for i in range(n)]}, features=features)


# --- arguments, loss, clipping -------------------------------------------------------------------------


def test_arguments_give_a_cli_with_the_recipe_defaults():
    (args,) = HfArgumentParser(BcosTrainingArguments).parse_args_into_dataclasses(
        ["--output_dir", "out", "--b_warmup_steps", "100", "--loss", "cross_entropy"]
    )
    assert args.lr_scheduler_type == "cosine" and args.learning_rate == 1e-4 and args.weight_decay == 0
    assert (
        str(args.optim.value).startswith("adamw")
        and args.adaptive_clipping
        and args.clip_factor == 0.01
        and args.clip_eps == 1e-3
    )
    assert args.remove_unused_columns is False
    assert args.b_warmup_steps == 100 and args.loss == "cross_entropy"
    help_text = HfArgumentParser(BcosTrainingArguments).format_help()
    assert "--bias_decay" in help_text and "Adaptive gradient clipping" in help_text
    with pytest.raises(ValueError, match="loss must be one of"):
        BcosTrainingArguments(output_dir="out", loss="hinge")


def test_bce_targets_are_one_and_one_over_c():
    logits = torch.randn(4, 5)
    labels = torch.tensor([0, 3, 4, 1])
    targets = torch.full((4, 5), 1 / 5)
    targets[torch.arange(4), labels] = 1.0
    expected = -(targets * F.logsigmoid(logits) + (1 - targets) * F.logsigmoid(-logits)).mean()
    torch.testing.assert_close(bce_loss(logits, labels), expected)


def test_converted_model_starts_at_probability_one_over_c_through_its_logit_bias(tiny_dir):
    model = load(tiny_dir)
    assert model.config.logit_bias == pytest.approx(-math.log(2))  # 3 classes: sigmoid(-log 2) = 1/3
    images = torch.rand(2, 3, 16, 16)
    network_logits = model.network(pixel_values=torch.cat([images, 1 - images], dim=1)).logits
    logits = model(pixel_values=images).logits
    torch.testing.assert_close(logits - network_logits, torch.full_like(logits, -math.log(2)))


def test_adaptive_clipping_caps_each_unit_relative_to_its_weight_norm():
    layer = torch.nn.Linear(4, 3, bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 1e-5, 0]]))
    layer.weight.grad = torch.tensor([[1.0, 0, 0, 0], [0, 0.01, 0, 0], [0, 0, 0, 5.0]])
    layer.bias.grad = torch.zeros(3)
    before = adaptive_clip_grad_(layer.parameters(), clip_factor=0.01, eps=1e-3)
    torch.testing.assert_close(before, torch.tensor(26.0001).sqrt())
    rows = layer.weight.grad.norm(dim=1)
    torch.testing.assert_close(rows, torch.tensor([0.01, 0.01, 0.01 * 1e-3]))  # capped; at the cap; eps floor
    assert layer.weight.grad[1, 1] == 0.01  # under its cap (0.02): untouched


# --- training ------------------------------------------------------------------------------------------


def test_training_lowers_the_loss_and_reports_accuracy(tiny_dir, tmp_path):
    trainer = BcosTrainer(
        load(tiny_dir),
        make_args(tmp_path, max_steps=30, eval_strategy="no"),
        train_dataset=TinyImages(),
        eval_dataset=TinyImages(32, seed=1),
        compute_metrics=compute_accuracy,
    )
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    assert after["eval_loss"] < before["eval_loss"]
    assert 0 <= after["eval_accuracy"] <= 1


def test_gradient_accumulation_matches_one_large_batch(tiny_dir, tmp_path):
    """Accumulation 4 x batch 2 and 1 x batch 8 give the same weights (the losses are per-batch means)."""
    results = []
    for accumulation, batch in ((1, 8), (4, 2)):
        trainer = BcosTrainer(
            load(tiny_dir),
            make_args(
                tmp_path / f"ga{accumulation}",
                max_steps=3,
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accumulation,
            ),
            train_dataset=TinyImages(),
            teacher=load(tiny_dir),  # the distillation term is scaled the same way
        )
        trainer.train()
        results.append(trainer.model.state_dict())
    for name, tensor in results[0].items():
        torch.testing.assert_close(results[1][name], tensor, rtol=1e-4, atol=1e-6, msg=name)


class LayerB(TrainerCallback):
    def __init__(self):
        self.seen = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen.append({module.b for module in model.modules() if isinstance(module, (BcosLinear, BcosConv2d))})


def test_b_warmup_ramps_from_one_and_ends_in_sync_with_the_config(tiny_dir, tmp_path):
    recorder = LayerB()
    trainer = BcosTrainer(
        load(tiny_dir),
        make_args(tmp_path, max_steps=6, b_warmup_steps=4),
        train_dataset=TinyImages(),
        callbacks=[recorder],
    )
    trainer.train()
    assert [seen.pop() for seen in recorder.seen] == pytest.approx([1.0, 1.25, 1.5, 1.75, 2.0, 2.0])
    assert {module.b for module in trainer.model.modules() if isinstance(module, BcosLinear)} == {2.0}
    assert trainer.model.config.b == 2.0


class BiasScale(TrainerCallback):
    """Records the classifier bias's norm after every optimiser step."""

    def __init__(self):
        self.norms = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        bias = model.network.classifier.bias
        self.norms.append(float(bias.norm()) if bias is not None else None)


def test_bias_anneal_ends_in_a_bias_free_model_that_reloads_strictly(tmp_path):
    folder = save_tiny_bcos(tmp_path / "with-bias", keep_bias=True)
    model = load(folder)
    query_bias = model.network.vit.layers[0].attention.q_proj.bias.detach().clone()
    recorder = BiasScale()
    trainer = BcosTrainer(
        model,
        make_args(tmp_path, max_steps=5, bias_anneal_steps=3, learning_rate=0.0),
        train_dataset=TinyImages(),
        callbacks=[recorder],
    )
    trainer.train()
    start = recorder.norms[0]
    assert recorder.norms[1:] == pytest.approx([start * 2 / 3, start / 3, 0.0, 0.0], rel=1e-5)
    assert model.config.keep_bias is False and model.network.classifier.bias is None
    biases = {name for name, _ in model.named_parameters() if name.endswith("bias")}
    assert biases == {"network.vit.layers.0.attention.q_proj.bias", "network.vit.layers.0.attention.k_proj.bias"}
    torch.testing.assert_close(model.network.vit.layers[0].attention.q_proj.bias, query_bias)
    trainer.save_model(str(tmp_path / "annealed"))
    reloaded = load(tmp_path / "annealed")
    assert reloaded.config.keep_bias is False
    pixels = torch.rand(2, 3, 16, 16)
    torch.testing.assert_close(reloaded.eval()(pixel_values=pixels).logits, model.eval()(pixel_values=pixels).logits)


def test_bias_anneal_refuses_a_model_without_biases(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="keep_bias=True"):
        BcosTrainer(load(tiny_dir), make_args(tmp_path, bias_anneal_steps=2), train_dataset=TinyImages())


def test_bias_decay_decays_the_constant_terms_only(tmp_path):
    folder = save_tiny_bcos(tmp_path / "with-bias", keep_bias=True)
    trainer = BcosTrainer(load(folder), make_args(tmp_path, max_steps=2, bias_decay=0.5), train_dataset=TinyImages())
    trainer.train()
    model = trainer.model
    (bias_group,) = [group for group in trainer.optimizer.param_groups if group["weight_decay"] == 0.5]
    decayed = {id(p) for p in bias_group["params"]}
    names = {name for name, p in model.named_parameters() if id(p) in decayed}
    assert names and all(name.endswith("bias") for name in names)
    assert not any(".q_proj." in name or ".k_proj." in name for name in names)
    assert any("v_proj" in name for name in names) and any("classifier" in name for name in names)
    assert sum(len(group["params"]) for group in trainer.optimizer.param_groups) == len(list(model.parameters()))


# --- distillation --------------------------------------------------------------------------------------


def test_distillation_from_the_source_model(tmp_path):
    """An equivalent student (B = 1, biases kept) has zero KL to its source: the teacher sees normalised images."""
    _, source_dir = save_family("vit", tmp_path / "source", **TINY_VIT)
    from bcos_hf.convert import convert

    convert(str(source_dir), tmp_path / "equivalent", b=1, keep_bias=True)
    teacher = ViTForImageClassification.from_pretrained(source_dir)
    trainer = BcosTrainer(
        load(tmp_path / "equivalent"),
        make_args(tmp_path, max_steps=3, distillation_alpha=1.0, learning_rate=0.0),
        train_dataset=TinyImages(),
        teacher=teacher,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        assert float(trainer.compute_loss(trainer.model, batch)) == pytest.approx(0.0, abs=1e-6)

    student = load(save_tiny_bcos(tmp_path / "student"))
    teacher_weights = {k: v.clone() for k, v in teacher.state_dict().items()}
    trainer = BcosTrainer(student, make_args(tmp_path, max_steps=3), train_dataset=TinyImages(), teacher=teacher)
    trainer.train()
    assert not trainer.teacher.training and not any(p.requires_grad for p in trainer.teacher.parameters())
    optimised = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert not optimised & {id(p) for p in trainer.teacher.parameters()}
    for name, tensor in trainer.teacher.state_dict().items():
        torch.testing.assert_close(tensor, teacher_weights[name])


def test_distillation_kl_matches_its_definition():
    student, teacher = torch.randn(3, 4), torch.randn(3, 4)
    p = (teacher / 2).softmax(-1)
    expected = (p * (p.log() - (student / 2).log_softmax(-1))).sum(-1).mean() * 4
    torch.testing.assert_close(distillation_kl(student, teacher, 2.0), expected)


# --- mixed precision -----------------------------------------------------------------------------------


class FiniteGradients(TrainerCallback):
    def __init__(self):
        self.steps = 0
        self.bad_steps = []

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps += 1
        if not all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None):
            self.bad_steps.append(state.global_step)


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_without_nan_or_inf(tiny_dir, tmp_path, precision):
    check = FiniteGradients()
    trainer = BcosTrainer(
        load(tiny_dir),
        make_args(tmp_path, max_steps=200, per_device_train_batch_size=4, logging_steps=10, **{precision: True}),
        train_dataset=TinyImages(),
        callbacks=[check],
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert check.steps == 200 and check.bad_steps == []
    assert len(losses) == 20 and all(math.isfinite(loss) for loss in losses)
    assert np.mean(losses[-3:]) < losses[0]
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # fp32 master weights


# --- data ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["L", "RGBA"])
def test_collator_gives_rgb_in_unit_range_with_labels(mode):
    processor = vit_processor(16)  # normalises: the collator must switch that off
    batch = ImageClassificationCollator(processor)(list(image_dataset(4, mode=mode)))
    assert batch["pixel_values"].shape == (4, 3, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].min() >= 0 and batch["pixel_values"].max() <= 1
    assert batch["labels"].tolist() == [0, 1, 2, 0]


def test_datasets_from_imagefolder_arrow_and_memory_train(tiny_dir, tmp_path):
    in_memory = image_dataset(6, mode="RGB")
    folder = tmp_path / "imagefolder"
    for index, example in enumerate(in_memory):
        name = in_memory.features["label"].names[example["label"]]
        (folder / name).mkdir(parents=True, exist_ok=True)
        example["image"].save(folder / name / f"{index}.png")
    in_memory.save_to_disk(str(tmp_path / "saved"))
    arrow = tmp_path / "arrow"
    arrow.mkdir()
    for path in (tmp_path / "saved").glob("*.arrow"):
        (arrow / path.name).write_bytes(path.read_bytes())
    collator = ImageClassificationCollator(vit_processor(16))
    from_folder = load_image_dataset(folder)  # class folders sort alphabetically: car, cat, dog
    label2id = {name: i for i, name in load(tiny_dir).config.id2label.items()}
    for dataset in (
        in_memory,
        from_folder.align_labels_with_mapping(label2id, "label"),
        load_image_dataset(tmp_path / "saved"),
        load_image_dataset(arrow),
    ):
        assert sorted(dataset["label"]) == [0, 0, 1, 1, 2, 2]
        trainer = BcosTrainer(
            load(tiny_dir),
            make_args(tmp_path, max_steps=1, per_device_train_batch_size=3),
            train_dataset=dataset,
            data_collator=collator,
        )
        trainer.train()
    assert trainer.processing_class.do_normalize is False  # saved with checkpoints and pushes, as the model needs


def test_column_removal_is_explained(tiny_dir, tmp_path):
    trainer = BcosTrainer(
        load(tiny_dir),
        make_args(tmp_path, remove_unused_columns=True),
        train_dataset=image_dataset(),
        data_collator=ImageClassificationCollator(vit_processor(16)),
    )
    with pytest.raises(KeyError, match="remove_unused_columns=False"):
        trainer.train()


def test_accuracy_without_the_hub():
    prediction = type(
        "P", (), {"predictions": np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]]), "label_ids": np.array([1, 1, 1])}
    )
    assert compute_accuracy(prediction) == {"accuracy": pytest.approx(2 / 3)}


@needs_fashion_mnist
def test_fashion_mnist_loader():
    test = load_fashion_mnist("test", limit=50)
    assert len(test) == 50 and test.features["label"].names == FASHION_MNIST_LABELS
    assert test[0]["image"].size == (28, 28) and test[0]["image"].mode == "L"
    assert set(test["label"]) <= set(range(10)) and len(set(test["label"])) > 5
    batch = ImageClassificationCollator(vit_processor(16))([test[0], test[1]])
    assert batch["pixel_values"].shape == (2, 3, 16, 16)


# --- bad input -----------------------------------------------------------------------------------------


def test_a_non_bcos_model_is_refused_with_how_to_convert(tmp_path):
    model, _ = save_family("vit", tmp_path / "vit", **TINY_VIT)
    with pytest.raises(TypeError, match=r"bcos_hf.convert.convert"):
        BcosTrainer(model, make_args(tmp_path))


def test_plain_training_arguments_are_refused(tiny_dir, tmp_path):
    with pytest.raises(TypeError, match="BcosTrainingArguments"):
        BcosTrainer(load(tiny_dir), TrainingArguments(output_dir=str(tmp_path)))


def test_dataset_without_labels(tiny_dir, tmp_path):
    unlabelled = image_dataset().remove_columns("label")
    with pytest.raises(ValueError, match=r"no label column.*rename_column"):
        BcosTrainer(load(tiny_dir), make_args(tmp_path), train_dataset=unlabelled)


def test_label_set_not_matching_the_model(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match=r"10 classes.*3 labels.*num_labels=N"):
        BcosTrainer(load(tiny_dir), make_args(tmp_path), train_dataset=image_dataset(names=FASHION_MNIST_LABELS))
    with pytest.raises(ValueError, match=r"differ from the model's labels.*align_labels_with_mapping"):
        BcosTrainer(load(tiny_dir), make_args(tmp_path), eval_dataset=image_dataset(names=("dog", "cat", "car")))


def test_teacher_architecture_mismatch(tiny_dir, tmp_path):
    from transformers import ConvNextConfig, ConvNextForImageClassification

    other = ConvNextForImageClassification(
        ConvNextConfig(hidden_sizes=[8, 16, 32, 64], depths=[1, 1, 1, 1], num_labels=3)
    )
    with pytest.raises(
        ValueError, match=r"does not match the student's.*Pass the model the student was converted from"
    ):
        BcosTrainer(load(tiny_dir), make_args(tmp_path), teacher=other)
    wrong_head = ViTForImageClassification(
        save_family("vit", tmp_path / "v5", **TINY_VIT, num_labels=5, id2label=None)[0].config
    )
    with pytest.raises(ValueError, match="teacher has 5 labels but the student has 3"):
        BcosTrainer(load(tiny_dir), make_args(tmp_path), teacher=wrong_head)


# --- CLIP: image-embedding distillation ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A tiny CLIPModel saved with its processor, and its B-cos conversion (B = 2, no biases)."""
    from bcos_hf.convert import convert

    from .families import FAMILIES

    folder = tmp_path_factory.mktemp("clip")
    source, processor = FAMILIES["clip"]()
    source.save_pretrained(folder / "source")
    processor.save_pretrained(folder / "source")
    convert(str(folder / "source"), folder / "bcos")
    return folder / "source", folder / "bcos"


class RandomImages(torch.utils.data.Dataset):
    """Unlabelled images: CLIP distillation needs no captions and no labels."""

    def __len__(self) -> int:
        return 16

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(index))}


def test_siglip_distillation_loss_matches_its_definition():
    student, teacher = torch.randn(4, 8), torch.randn(4, 8)
    s, t = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
    logits = 10 * s @ t.T - 10
    expected = (
        -sum(F.logsigmoid(torch.tensor(1.0 if i == j else -1.0) * logits[i, j]) for i in range(4) for j in range(4)) / 4
    )
    torch.testing.assert_close(siglip_distillation_loss(student, teacher), expected)


def test_clip_student_starts_from_the_pretrained_weights(tiny_clip):
    from transformers import AutoModel, CLIPModel

    source_dir, bcos_dir = tiny_clip
    teacher, student = CLIPModel.from_pretrained(source_dir), AutoModel.from_pretrained(bcos_dir)
    source = teacher.state_dict()
    vision = {
        name.removeprefix("network."): tensor
        for name, tensor in student.state_dict().items()
        if name.startswith(("network.vision_model.", "network.visual_projection."))
    }
    first = "vision_model.embeddings.patch_embedding.weight"
    assert len(vision) > 10
    for name, tensor in vision.items():
        if name != first:
            torch.testing.assert_close(tensor, source[name], rtol=0, atol=0, msg=name)
    # The first layer holds the pretrained filters with the input normalisation folded in: W_x - W_(1-x) = W / std.
    std = torch.tensor(student.config.input_std).view(1, 3, 1, 1)
    torch.testing.assert_close((vision[first][:, :3] - vision[first][:, 3:]) * std, source[first])


def test_clip_distillation_trains_the_image_tower_only(tiny_clip, tmp_path):
    from transformers import AutoModel, CLIPModel

    source_dir, bcos_dir = tiny_clip
    student = AutoModel.from_pretrained(bcos_dir)
    start = {name: tensor.clone() for name, tensor in student.state_dict().items()}
    trainer = BcosTrainer(
        student,
        make_args(tmp_path, max_steps=8, logging_steps=1),
        train_dataset=RandomImages(),
        teacher=CLIPModel.from_pretrained(source_dir),
    )
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert all(math.isfinite(loss) for loss in losses) and np.mean(losses[-3:]) < np.mean(losses[:3])
    changed = {name for name, tensor in trainer.model.state_dict().items() if not torch.equal(tensor, start[name])}
    assert changed and all(name.startswith(("network.vision_model.", "network.visual_projection.")) for name in changed)
    assert "network.logit_scale" not in changed and not any("text_" in name for name in changed)


def test_clip_distillation_needs_the_original_clip_as_teacher(tiny_clip, tmp_path):
    from transformers import AutoModel

    student = AutoModel.from_pretrained(tiny_clip[1])
    with pytest.raises(ValueError, match=r"pass teacher=<the CLIPModel it was converted from"):
        BcosTrainer(student, make_args(tmp_path), train_dataset=RandomImages())
    vit, _ = save_family("vit", tmp_path / "vit", **TINY_VIT)
    with pytest.raises(ValueError, match=r"model_type 'vit'\) does not match the student's \(CLIPModel"):
        BcosTrainer(student, make_args(tmp_path), teacher=vit)
