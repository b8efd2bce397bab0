"""model.explain: exact (contributions add up to the logit), stateless, batched, and its pictures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, pipeline

from bcos_hf import BcosConv2d, BcosLinear
from bcos_hf.cli import main
from bcos_hf.convert import convert
from bcos_hf.modeling.explainable import ExplainableMixin

from .conftest import run_without_bcos_hf
from .families import FAMILIES, save_family

LABELS = {0: "cat", 1: "dog", 2: "car"}


def calibrate(model: torch.nn.Module, images: torch.Tensor) -> torch.nn.Module:
    """Rescale every B-cos layer's raw weights so its output has unit RMS on ``images``.

    Randomly initialised B = 2 networks shrink their activations quadratically layer after layer (down to
    exact zeros in deep CNNs), which would make a completeness check vacuous. For B = 2 the output scales
    with the square of the weights, so one forward with these hooks fixes every layer in turn.
    """

    def rescale(module, args, output):
        rms = output.detach().float().square().mean().sqrt().clamp_min(1e-30)
        module.weight.mul_(rms.rsqrt().to(module.weight.dtype))
        return output / rms

    layers = [m for m in model.modules() if isinstance(m, (BcosConv2d, BcosLinear))]
    handles = [layer.register_forward_hook(rescale) for layer in layers]
    with torch.no_grad():
        model(pixel_values=images)
    for handle in handles:
        handle.remove()
    return model


def image_size(source) -> int:
    config = getattr(source.config, "vision_config", source.config)
    return getattr(config, "image_size", 32)


def converted(name: str, **overrides):
    """The family's tiny model converted to B = 2 without biases, and a batch of two images for it."""
    source, processor = FAMILIES[name](**overrides)
    model = convert(source, image_processor=getattr(processor, "image_processor", processor)).model
    size = image_size(source)
    return model, torch.rand(2, 3, size, size, generator=torch.Generator().manual_seed(0))


ZERO_SHOT = ["clip", "siglip"]
"""Image-text families: they explain similarities to text prompts (test below), not class logits."""
CLASSIFIERS_AND_BACKBONES = [name for name in FAMILIES if name not in ZERO_SHOT]


@pytest.mark.parametrize("name", CLASSIFIERS_AND_BACKBONES)
def test_contributions_add_up_to_the_logit_for_every_family(name):
    """Completeness: target logit - logit bias = sum of contributions, constants (position embeddings, class
    and distillation tokens) folded in; backbones explain a pooled feature."""
    model, images = converted(name)
    calibrate(model, images)
    target = None
    if model.task == "base":  # the strongest pooled feature of each image
        with torch.no_grad():
            target = model(pixel_values=images).pooler_output.flatten(1).argmax(dim=1)
    explanation = model.explain(images, target=target)
    mass = explanation.contributions.abs().sum(dim=(1, 2))
    assert (mass > 1e-2).all(), "degenerate model: nothing to check"
    assert (explanation.residual.abs() <= 1e-4 * mass).all(), (explanation.residual, mass)
    assert explanation.contributions.shape == (2, *images.shape[2:])
    assert explanation.dynamic_weights.shape == (2, 6, *images.shape[2:])


def test_constant_folding_changes_no_value_and_is_what_makes_vit_complete():
    model, images = converted("vit")
    calibrate(model, images)
    embeddings = model.network.vit.embeddings
    with torch.no_grad(), model.explanation_mode():
        folded = model(pixel_values=images).logits
        hooks = dict(embeddings._forward_hooks)
        embeddings._forward_hooks.clear()
        unfolded = model(pixel_values=images).logits
    assert torch.equal(folded, unfolded)
    incomplete = model.explain(images).residual
    embeddings._forward_hooks.update(hooks)
    complete = model.explain(images).residual
    assert incomplete.abs().min() > 1e3 * complete.abs().max()


def test_explain_leaves_no_state_behind():
    model, images = converted("vit")
    model.train()
    model.network.classifier.weight.requires_grad_(False)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    images.requires_grad_(True)
    first = model.explain(images, target="dog")
    second = model.explain(images, target="dog")
    assert model.training
    assert {name: p.requires_grad for name, p in model.named_parameters()} == requires_grad
    assert all(p.grad is None for p in model.parameters()) and images.grad is None
    assert not any(m.explaining for m in model.modules() if isinstance(m, ExplainableMixin))
    assert torch.equal(first.contributions, second.contributions)
    assert torch.equal(first.dynamic_weights, second.dynamic_weights)
    with torch.inference_mode():  # a caller's inference mode (or no_grad) does not get in the way
        assert torch.equal(model.explain(images.detach().clone(), target="dog").contributions, first.contributions)
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(pixel_values=images).logits, first.logits)  # explain ran in eval mode


def test_batched_explanation_equals_per_image_explanations():
    model, _ = converted("convnext")
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    targets = [0, "dog", 2]
    batched = model.explain(images, target=targets)
    assert batched.target.tolist() == [0, 1, 2] and batched.labels == ["cat", "dog", "car"]
    for index, target in enumerate(targets):
        single = model.explain(images[index : index + 1], target=target)
        torch.testing.assert_close(batched.contributions[index], single.contributions[0], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(batched.dynamic_weights[index], single.dynamic_weights[0], rtol=1e-4, atol=1e-7)


def test_default_target_is_the_prediction_and_tensor_targets_work():
    model, images = converted("vit")
    explanation = model.explain(images)
    assert torch.equal(explanation.target, explanation.logits.argmax(dim=1))
    by_tensor = model.explain(images, target=torch.tensor([2, 0]))
    assert by_tensor.target.tolist() == [2, 0] and by_tensor.labels == ["car", "cat"]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("zebra", r"Unknown label 'zebra'; the model's labels are: 'cat', 'dog', 'car'"),
        (3, r"target 3 is out of range: the model has 3 outputs \(0 to 2\)"),
        (-1, r"target -1 is out of range"),
        ([0, 1, 2], r"target has 3 entries but the batch has 2 images"),
        (1.5, r"A target must be a class index or a label name; got 1.5"),
    ],
)
def test_bad_targets_raise_clear_errors(target, message):
    model, images = converted("vit")
    with pytest.raises(ValueError, match=message):
        model.explain(images, target=target)


def test_backbones_explain_a_feature_or_a_callable_and_refuse_no_target():
    model, images = converted("vit-backbone")
    with pytest.raises(ValueError, match="A B-cos backbone has no classes"):
        model.explain(images)
    feature = model.explain(images, target=[3, 4])
    assert feature.target.tolist() == [3, 4] and feature.labels is None
    calibrate(model, images)
    token = model.explain(images, target=lambda outputs: outputs.last_hidden_state[:, 0, 7])
    assert token.target.tolist() == [0, 0] and token.logits.shape == (2, 1)
    assert (token.residual.abs() <= 1e-4 * token.contributions.abs().sum(dim=(1, 2))).all()


def test_pictures_are_rendered_and_saved(tmp_path):
    model, images = converted("vit")
    calibrate(model, images)
    explanation = model.explain(images)
    rgba = explanation.rgba()
    assert rgba.shape == (2, 32, 32, 4) and rgba.min() >= 0 and rgba.max() <= 1
    assert (rgba[..., 3] == 1).any()  # the 99.5th percentile maps to full opacity
    no_smoothing = explanation.rgba(smoothing=1)
    negative = (explanation.contributions < 0).numpy()
    assert (no_smoothing[..., 3][negative] == 0).all()  # only positive evidence is shown
    heat = explanation.heatmap()
    strongest = np.unravel_index(explanation.contributions[0].argmax(), (32, 32))
    assert heat[0][strongest].tolist() == pytest.approx([1.0, 0.0, 0.0])  # positive: red

    written = explanation.save(tmp_path, names=["a", "b"], with_image=True)
    assert [paths["explanation"].name for paths in written] == ["a_explanation.png", "b_explanation.png"]
    with Image.open(written[0]["explanation"]) as picture:
        assert picture.mode == "RGBA" and picture.size == (64, 32)  # image, then explanation
    with Image.open(written[1]["heatmap"]) as picture:
        assert picture.mode == "RGB" and picture.size == (64, 32)
    with pytest.raises(ValueError, match="save got 1 names for 2 explanations"):
        explanation.save(tmp_path, names=["a"])


@pytest.fixture
def bcos_vit_dir(tmp_path):
    folder = save_family("vit", tmp_path / "source")[1]
    convert(folder, tmp_path / "bcos")
    return tmp_path / "bcos"


def test_pipeline_explains_paths_and_pil_images(bcos_vit_dir, tmp_path):
    photo = Image.fromarray((np.random.default_rng(0).random((40, 50, 3)) * 255).astype("uint8"))
    photo.save(tmp_path / "photo.png")
    explainer = pipeline("image-explanation", model=str(bcos_vit_dir))
    results = explainer([photo, str(tmp_path / "photo.png")], target="car")
    assert [result["target"] for result in results] == ["car", "car"]
    for result in results:
        assert result["label"] in LABELS.values() and 0 < result["score"] <= 1
        assert result["explanation"].mode == "RGBA" and result["explanation"].size == (32, 32)
        assert result["heatmap"].mode == "RGB" and abs(result["residual"]) < 1e-4
    assert results[0]["logit"] == pytest.approx(results[1]["logit"], abs=1e-5)  # same pixels, same answer


def test_cli_explain_writes_pictures_and_summary(bcos_vit_dir, tmp_path, capsys):
    for name in ("one", "two"):
        Image.fromarray(np.full((32, 32, 3), 90 if name == "one" else 200, dtype=np.uint8)).save(
            tmp_path / f"{name}.png"
        )
    out = tmp_path / "explained"
    images = [str(tmp_path / "one.png"), str(tmp_path / "two.png")]
    assert main(["explain", str(bcos_vit_dir), *images, "--out", str(out), "--target", "dog", "--with-image"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert [entry["target"] for entry in summary] == ["dog", "dog"]
    assert {entry["explanation"] for entry in summary} == {"one_explanation.png", "two_explanation.png"}
    with Image.open(out / "two_explanation.png") as picture:
        assert picture.size == (64, 32)
    assert "explained dog" in capsys.readouterr().out
    assert main(["explain", str(bcos_vit_dir), images[0], "--out", str(out), "--target", "zebra"]) == 2
    assert "Unknown label 'zebra'" in capsys.readouterr().err


PROMPTS = ["a red square", "a dog", "noise"]


@pytest.mark.parametrize("name", [name for name in ZERO_SHOT if name in FAMILIES])
def test_clip_explains_image_text_similarity_per_prompt(tmp_path, name):
    """Zero-shot CLIP / SigLIP: the contributions add up to logit_scale * cos(image, text) for the chosen prompt."""
    folder = save_family(name, tmp_path / "source")[1]
    convert(folder, tmp_path / "bcos")
    model = AutoModel.from_pretrained(tmp_path / "bcos")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    calibrate(model.network.vision_model, model.encode_pixels(images))
    processor = AutoProcessor.from_pretrained(tmp_path / "bcos")
    siglip_padding = {"padding": "max_length", "max_length": 64}  # what the zero-shot pipeline uses for SigLIP
    assert model.text_padding == (siglip_padding if "siglip" in name else {"padding": True})
    tokens = processor.tokenizer(PROMPTS, return_tensors="pt", **model.text_padding)
    with torch.no_grad():
        logits_per_image = model(**tokens, pixel_values=images).logits_per_image

    best = model.explain(images, text=PROMPTS)  # tokenised with the tokenizer saved with the model
    torch.testing.assert_close(best.logits, logits_per_image, rtol=1e-4, atol=1e-5)
    assert torch.equal(best.target, logits_per_image.argmax(dim=1))
    chosen = model.explain(images, target=["a dog", 2], text=PROMPTS)
    assert chosen.labels == ["a dog", "noise"]
    mass = chosen.contributions.abs().sum(dim=(1, 2))
    assert (mass > 1e-2).all() and (chosen.residual.abs() <= 1e-4 * mass).all()
    by_ids = model.explain(
        images, target=[1, 2], input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]
    )
    torch.testing.assert_close(by_ids.contributions, chosen.contributions)
    with pytest.raises(ValueError, match="Pass the prompts to explain as a list"):
        model.explain(images, text="a dog")
    with pytest.raises(ValueError, match="Unknown label 'a cat'"):
        model.explain(images, target="a cat", text=PROMPTS)
    in_memory = convert(FAMILIES[name]()[0], image_processor=processor.image_processor).model
    with pytest.raises(ValueError, match="No tokenizer saved with this model"):
        in_memory.explain(images, text=PROMPTS)
    assert in_memory.explain(images, text=PROMPTS, tokenizer=processor.tokenizer).logits.shape == (2, 3)


def test_explain_works_under_remote_code_without_bcos_hf(tmp_path):
    """The explanation code travels with the saved model: same contributions, constants folded, in a Python
    where bcos_hf cannot be imported."""
    model, images = converted("vit")
    calibrate(model, images)
    model.save_pretrained(tmp_path / "bcos")
    expected = model.explain(images, target="car")
    torch.save({"images": images, "contributions": expected.contributions}, tmp_path / "expected.pt")
    run_without_bcos_hf(
        f"""
        import torch
        from transformers import AutoModelForImageClassification
        model = AutoModelForImageClassification.from_pretrained({str(tmp_path / "bcos")!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        saved = torch.load({str(tmp_path / "expected.pt")!r})
        explanation = model.explain(saved["images"], target="car")
        torch.testing.assert_close(explanation.contributions, saved["contributions"])
        mass = explanation.contributions.abs().sum(dim=(1, 2))
        assert (explanation.residual.abs() <= 1e-4 * mass).all(), explanation.residual
        assert explanation.explanation_images()[0].mode == "RGBA"
        """,
        tmp_path / "hf_home",
    )
