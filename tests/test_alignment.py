"""Label-free alignment with the original: block discovery, the three modes, calibration, BcosTrainer."""

from __future__ import annotations

import copy

import pytest
import torch

from bcos_hf.alignment import (
    FeatureAlignment,
    alignment_arguments,
    calibrate_batchnorm,
    default_alignment_blocks,
    frozen_batchnorm_statistics,
    relative_squared_error,
    resolve_blocks,
)
from bcos_hf.convert import convert
from bcos_hf.training import BcosTrainer

from .families import FAMILIES, IMAGE_MEAN, IMAGE_STD, normalised, random_images


def converted(name: str, **options):
    """A tiny source model of ``name`` and its conversion (default: B = 2, no biases)."""
    source, _ = FAMILIES[name]()
    source.eval()
    model = convert(source, image_mean=IMAGE_MEAN, image_std=IMAGE_STD, **options).model
    return source, model


def image_size(model) -> int:
    config = model.config.source_config
    size = getattr(getattr(config, "vision_config", config), "image_size", 32)
    return size if isinstance(size, int) and size <= 64 else 32


class Images(torch.utils.data.Dataset):
    """Seeded random images without labels: what label-free alignment trains on."""

    def __init__(self, count: int, size: int) -> None:
        self.images = random_images(count, size, seed=3)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[index]}


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_every_family_has_alignment_blocks_in_forward_order(name):
    source, model = converted(name)
    paths = resolve_blocks(source, default_alignment_blocks(model))
    assert len(paths) >= 3
    order = []
    hooks = [source.get_submodule(p).register_forward_hook(lambda m, a, o, p=p: order.append(p)) for p in paths]
    images = normalised(random_images(1, image_size(model)))
    with torch.no_grad():
        if hasattr(source, "get_image_features"):
            source.get_image_features(pixel_values=images)
        else:
            source(pixel_values=images)
    for hook in hooks:
        hook.remove()
    assert order == paths  # each block runs once, in the listed order
    for path in paths:  # the student has the same paths
        model.network.get_submodule(path)


def test_unknown_block_pattern_says_what_was_expected():
    source, _ = converted("vit")
    with pytest.raises(ValueError, match="relative to the base model"):
        resolve_blocks(source, ("encoder.nothing.*",))


@pytest.mark.parametrize("mode", ["teacher_forced", "chained", "end_to_end"])
def test_an_exact_conversion_is_already_aligned(mode):
    source, model = converted("vit", b=1, keep_bias=True)
    paths = resolve_blocks(source, default_alignment_blocks(model))
    images = random_images(2, 32)
    model.train()
    with FeatureAlignment(model.network, source, paths, mode) as alignment:
        with torch.no_grad():
            source(pixel_values=normalised(images))
        model(pixel_values=images)
        assert alignment.loss().item() < 1e-10


def test_teacher_forcing_isolates_every_block():
    """Teacher-forced: breaking the first block changes only the first block's loss; chained: every later one."""
    source, model = converted("mobilenet_v2", b=1, keep_bias=True)
    paths = resolve_blocks(source, default_alignment_blocks(model))
    images = random_images(2, 32)
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.network.get_submodule(paths[0]).parameters():
            parameter.add_(torch.randn_like(parameter))
    model.train()

    def block_losses(mode: str) -> list[float]:
        with FeatureAlignment(model.network, source, paths, mode) as alignment, frozen_batchnorm_statistics(model):
            with torch.no_grad():
                source(pixel_values=normalised(images))
            model(pixel_values=images)
            return alignment.block_losses()

    forced, chained = block_losses("teacher_forced"), block_losses("chained")
    assert forced[0] > 0.01 and max(forced[1:]) < 1e-8
    assert chained[0] == pytest.approx(forced[0]) and chained[1] > 1e-4  # the next block sees the broken output


def test_chained_mode_keeps_gradients_inside_each_block():
    source, model = converted("vit")
    paths = resolve_blocks(source, default_alignment_blocks(model))
    model.train()
    with FeatureAlignment(model.network, source, paths, "chained") as alignment:
        with torch.no_grad():
            source(pixel_values=normalised(random_images(2, 32)))
        model(pixel_values=random_images(2, 32))
        last = relative_squared_error(alignment.student_outputs[paths[-1]], alignment.teacher_outputs[paths[-1]])
    last.backward()
    embedding = model.network.get_submodule(paths[0]).patch_embeddings.projection.weight
    assert embedding.grad is None  # the last block's loss does not reach the first block


def test_hooks_are_removed_and_evaluation_is_untouched():
    source, model = converted("vit")
    paths = resolve_blocks(source, default_alignment_blocks(model))
    images = random_images(2, 32)
    model.eval()
    with torch.no_grad():
        expected = model(pixel_values=images).logits
    with FeatureAlignment(model.network, source, paths, "teacher_forced"), torch.no_grad():
        source(pixel_values=normalised(images))
        during = model(pixel_values=images).logits  # eval mode: the student runs on its own
    assert torch.equal(during, expected)
    hooked = [m for m in [*model.modules(), *source.modules()] if m._forward_hooks or m._forward_pre_hooks]
    assert not [m for m in hooked if type(m).__name__ not in {"ViTEmbeddings"}]  # only the converter's own hook


def test_teacher_forcing_without_the_teacher_says_so():
    source, model = converted("vit")
    paths = resolve_blocks(source, default_alignment_blocks(model))
    model.train()
    with FeatureAlignment(model.network, source, paths, "teacher_forced"), pytest.raises(RuntimeError, match="teacher"):
        model(pixel_values=random_images(1, 32))


def test_batchnorm_calibration_brings_back_the_dead_features():
    """B = 2 without biases, the BatchNorms still divide by the source's variances: calibrated, they do not."""
    _, model = converted("mobilenet_v2")
    images = random_images(8, 32)
    momentum = [m.momentum for m in model.modules() if hasattr(m, "running_var")]
    assert calibrate_batchnorm(model, [images[:4], images[4:]]) == 2
    assert [m.momentum for m in model.modules() if hasattr(m, "running_var")] == momentum
    model.eval()
    with torch.no_grad():
        features = model.network.base_model(pixel_values=model.encode_pixels(images)).pooler_output.flatten(1)
    assert features.std(0).mean() > 0.05  # alive, and different per image
    with pytest.raises(ValueError, match="at least one batch"):
        calibrate_batchnorm(model, [])


def free_running_error(model, source, images: torch.Tensor) -> float:
    """The alignment loss of the model as it runs on its own (evaluation mode: no block input is replaced)."""
    paths = resolve_blocks(source, default_alignment_blocks(model))
    model.eval()
    with FeatureAlignment(model.network, source, paths, "chained") as alignment, torch.no_grad():
        if hasattr(source, "get_image_features"):
            source.get_image_features(pixel_values=normalised(images))
            model.get_image_features(pixel_values=images)
        else:
            source(pixel_values=normalised(images))
            model(pixel_values=images)
        return alignment.loss().item()


@pytest.mark.parametrize("name", ["mobilenet_v2", "vit-backbone", "dinov2", "clip"])
def test_bcos_trainer_aligns_without_labels(name, tmp_path):
    source, model = converted(name)
    size = image_size(model)
    held_out = random_images(8, size, seed=11)
    args = alignment_arguments(
        model,
        output_dir=str(tmp_path),
        max_steps=24,
        per_device_train_batch_size=8,
        learning_rate=1e-2,
        logging_steps=1,
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    batchnorm = name == "mobilenet_v2"
    assert args.freeze_batchnorm_statistics == batchnorm and args.teacher_forced_steps == (12 if batchnorm else 0)
    if args.freeze_batchnorm_statistics:
        calibrate_batchnorm(model, [random_images(8, size, seed=5)])
    before = copy.deepcopy(model.state_dict())
    error_before = free_running_error(model, source, held_out)
    trainer = BcosTrainer(model, args, teacher=source, train_dataset=Images(64, size))
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 24 and all(torch.isfinite(torch.tensor(losses)))
    assert free_running_error(model, source, held_out) < 0.9 * error_before  # closer to the original, unseen images
    changed = [k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])]
    assert changed
    if name == "clip":  # only the image tower trains
        assert not [k for k in changed if "text_model" in k or "logit_scale" in k]
    if name == "dinov2":  # the model card records the alignment
        trainer.create_model_card()
        card = (tmp_path / "README.md").read_text()
        assert "| alignment with the original | weight 1, end_to_end |" in card
        assert "[Keeping what the original knows](https://" in card  # where alignment is measured


def test_alignment_needs_a_teacher(tmp_path):
    _, model = converted("vit")
    args = alignment_arguments(model, output_dir=str(tmp_path), max_steps=2, use_cpu=True)
    with pytest.raises(ValueError, match="teacher="):
        BcosTrainer(model, args, train_dataset=Images(4, 32))


def test_alignment_arguments_reject_bad_values(tmp_path):
    _, model = converted("vit")
    with pytest.raises(ValueError, match="max_steps"):
        alignment_arguments(model, output_dir=str(tmp_path), max_steps=0)
    with pytest.raises(ValueError, match="alignment_mode"):
        alignment_arguments(model, output_dir=str(tmp_path), max_steps=2, alignment_mode="sideways")


def test_frozen_batchnorm_statistics_keep_training_and_evaluation_equal():
    """The backbone's pooled features (the classifier's dropout is meant to differ between the modes)."""
    _, model = converted("mobilenet_v2")
    images = model.encode_pixels(random_images(4, 32))
    model.eval()
    with torch.no_grad():
        evaluation = model.network.base_model(pixel_values=images).pooler_output
    model.train()
    with torch.no_grad(), frozen_batchnorm_statistics(model):
        training = model.network.base_model(pixel_values=images).pooler_output
    assert all(m.training for m in model.modules() if "BatchNorm" in type(m).__name__)  # restored
    assert evaluation.abs().max() > 0  # live features: the comparison means something
    torch.testing.assert_close(training, evaluation)
