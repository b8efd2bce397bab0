"""The ViT converter and the B-cos model family on the Auto classes."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    ViTForImageClassification,
    ViTModel,
    pipeline,
)

from bcos_hf import BcosConfig, BcosForImageClassification, BcosModel, UnsupportedModelError
from bcos_hf.convert import convert

from .conftest import run_without_bcos_hf
from .families import IMAGE_MEAN, IMAGE_STD, assert_same_outputs, normalised, save_family


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(qkv_bias=False),
        dict(patch_size=4, image_size=16, num_labels=5, id2label=None),
        dict(image_size=48, patch_size=16, num_labels=2, id2label=None, hidden_act="gelu_new"),
        dict(image_size=24, patch_size=6, num_labels=7, id2label=None, num_hidden_layers=3),
    ],
)
def test_equivalence_mode_reproduces_source_logits(tmp_path, overrides):
    source, folder = save_family("vit", tmp_path / "source", **overrides)
    conversion = convert(folder, tmp_path / "bcos", b=1, keep_bias=True)
    assert conversion.report.equivalence_max_abs_diff < 1e-5

    size = source.config.image_size
    images = torch.rand(4, 3, size, size, generator=torch.Generator().manual_seed(1))
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "bcos")
    with torch.no_grad():
        expected = source(pixel_values=normalised(images)).logits
        actual = reloaded(pixel_values=images).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)


def test_bcos_mode_reloads_bit_exactly(tiny_vit_dir, tmp_path):
    conversion = convert(tiny_vit_dir, tmp_path / "bcos")
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        expected = conversion.model(pixel_values=images).logits
        reloaded = BcosForImageClassification.from_pretrained(tmp_path / "bcos")
        assert torch.equal(reloaded(pixel_values=images).logits, expected)
    assert reloaded.config.b == 2 and not reloaded.config.keep_bias
    assert all(
        module.bias is None
        for name, module in reloaded.named_modules()
        if hasattr(module, "bias") and not name.endswith(("q_proj", "k_proj"))
    )


def test_default_mode_drops_biases_sets_logit_bias_and_differs_from_source(tiny_vit_dir, tmp_path):
    conversion = convert(tiny_vit_dir, tmp_path / "bcos")
    config = conversion.model.config
    assert config.b == 2 and config.keep_bias is False
    assert config.logit_bias == pytest.approx(-torch.log(torch.tensor(2.0)).item())
    assert config.source_config.num_channels == 6
    assert config.input_mean == pytest.approx(IMAGE_MEAN) and config.input_std == pytest.approx(IMAGE_STD)
    assert config.id2label == {0: "cat", 1: "dog", 2: "car"}
    assert config.source_checkpoint == str(tiny_vit_dir)
    assert config.source_architecture == "ViTForImageClassification"
    assert config.bcos_hf_version


def test_auto_classes_return_bcos_classes(tiny_vit_dir, tiny_vit_model_dir, tmp_path):
    assert CONFIG_MAPPING["bcos"] is BcosConfig
    convert(tiny_vit_dir, tmp_path / "classifier")
    convert(tiny_vit_model_dir, tmp_path / "backbone")
    assert type(AutoConfig.from_pretrained(tmp_path / "classifier")) is BcosConfig
    assert type(AutoModelForImageClassification.from_pretrained(tmp_path / "classifier")) is BcosForImageClassification
    assert type(AutoModel.from_pretrained(tmp_path / "classifier")) is BcosModel
    assert type(AutoModel.from_pretrained(tmp_path / "backbone")) is BcosModel


def test_backbone_becomes_bcos_model_with_equivalent_outputs(tiny_vit_model_dir, tmp_path):
    source = ViTModel.from_pretrained(tiny_vit_model_dir).eval()
    conversion = convert(tiny_vit_model_dir, tmp_path / "backbone", b=1, keep_bias=True)
    assert isinstance(conversion.model, BcosModel)
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        expected = source(pixel_values=normalised(images))
        actual = conversion.model(pixel_values=images)
    assert_same_outputs(actual, expected, backbone=True)


def test_saved_folder_has_everything_and_processor_does_not_normalise(tiny_vit_dir, tmp_path):
    convert(tiny_vit_dir, tmp_path / "bcos")
    files = {path.name for path in (tmp_path / "bcos").iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "preprocessor_config.json",
        "README.md",
        "conversion_report.json",
        "configuration_bcos.py",
        "modeling_bcos.py",
        "bcos_layers.py",
        "bcos_kernels.py",
        "bcos_norms.py",
        "bcos_activations.py",
        "explainable.py",
        "tasks.py",
        "rewriting.py",
        "adapters.py",
    } <= files
    processor = AutoImageProcessor.from_pretrained(tmp_path / "bcos")
    assert processor.do_normalize is False
    report = json.loads((tmp_path / "bcos" / "conversion_report.json").read_text())
    assert {"equivalence_max_abs_diff", "source", "b", "parameters", "seconds"} <= set(report)
    assert report["equivalence_max_abs_diff"] < 1e-5 and report["b"] == 2 and report["parameters"] > 0
    card = (tmp_path / "bcos" / "README.md").read_text()
    assert "base_model:" in card and "trust_remote_code=True" in card and "arya2024bcosification" in card


def test_pipeline_gives_labelled_predictions_from_images(tiny_vit_dir, tmp_path):
    convert(tiny_vit_dir, tmp_path / "bcos")
    classifier = pipeline("image-classification", model=str(tmp_path / "bcos"))
    images = [Image.new("RGB", (50, 40), (200, 30, 30)), Image.new("L", (20, 20), 128)]
    predictions = classifier(images, top_k=3)
    assert len(predictions) == 2
    for prediction in predictions:
        assert {p["label"] for p in prediction} == {"cat", "dog", "car"}
        assert sum(p["score"] for p in prediction) == pytest.approx(1.0, abs=1e-4)


def test_remote_code_loads_without_bcos_hf(tiny_vit_dir, tmp_path):
    conversion = convert(tiny_vit_dir, tmp_path / "bcos")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    torch.save(images, tmp_path / "images.pt")
    with torch.no_grad():
        torch.save(conversion.model(pixel_values=images).logits, tmp_path / "expected.pt")
    result = run_without_bcos_hf(
        f"""
        import torch
        from transformers import AutoModelForImageClassification, pipeline
        from PIL import Image
        model = AutoModelForImageClassification.from_pretrained({str(tmp_path / "bcos")!r}, trust_remote_code=True)
        assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
        images = torch.load({str(tmp_path / "images.pt")!r})
        with torch.no_grad():
            logits = model(pixel_values=images).logits
        assert torch.equal(logits, torch.load({str(tmp_path / "expected.pt")!r}))
        classifier = pipeline("image-classification", model={str(tmp_path / "bcos")!r}, trust_remote_code=True)
        print(classifier(Image.new("RGB", (40, 40), (10, 200, 10)))[0]["label"])
        """,
        hf_home=tmp_path / "hf_home",
    )
    assert result.stdout.strip().splitlines()[-1] in {"cat", "dog", "car"}


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda: torch.rand(2, 4, 32, 32), "3 channels"),
        (lambda: torch.rand(2, 1, 32, 32), "grey or RGBA"),
        (lambda: torch.rand(2, 32, 32, 3), "channels-last"),
        (lambda: torch.randn(2, 3, 32, 32) * 2, r"must lie in \[0, 1\]"),
        (lambda: torch.full((1, 3, 32, 32), float("nan")), "NaN or Inf"),
        (lambda: torch.full((1, 3, 32, 32), float("inf")), "NaN or Inf"),
        (lambda: torch.rand(3, 32, 32), "add a batch dimension"),
        (lambda: torch.rand(1, 2, 3, 32, 32), "4 dimensions"),
        (lambda: torch.randint(0, 255, (1, 3, 32, 32), dtype=torch.uint8), "floating-point"),
        (lambda: None, "pixel_values is required"),
    ],
)
def test_bad_inputs_raise_value_errors_that_say_how_to_fix_them(tiny_vit_dir, tmp_path, make_input, message):
    model = convert(tiny_vit_dir).model
    with pytest.raises(ValueError, match=message):
        model(pixel_values=make_input())


def test_six_channel_input_is_taken_as_encoded(tiny_vit_dir):
    model = convert(tiny_vit_dir).model
    images = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            model(pixel_values=images).logits, model(pixel_values=torch.cat([images, 1 - images], 1)).logits
        )


class Swish(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x)


def test_converter_refuses_unknown_module_types_by_name_and_changes_nothing(tiny_vit_dir):
    model = ViTForImageClassification.from_pretrained(tiny_vit_dir)
    model.vit.layers[1].mlp.activation_fn = Swish()
    model.vit.layers[0].extra_scale = nn.Parameter(torch.ones(1))  # a container with an unexpected parameter
    before = {name: type(module) for name, module in model.named_modules()}
    with pytest.raises(UnsupportedModelError) as error:
        convert(model, image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
    assert "Swish" in str(error.value) and "vit.layers.1.mlp.activation_fn" in str(error.value)
    assert "ViTLayer" in str(error.value) and "extra_scale" in str(error.value)
    assert {name: type(module) for name, module in model.named_modules()} == before


def test_in_memory_source_model_is_not_modified(tiny_vit_dir):
    model = ViTForImageClassification.from_pretrained(tiny_vit_dir)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    convert(model, image_mean=IMAGE_MEAN, image_std=IMAGE_STD)
    assert type(model.classifier) is nn.Linear
    assert all(torch.equal(before[name], tensor) for name, tensor in model.state_dict().items())


def test_unsupported_family_lists_supported_ones(tmp_path):
    from transformers import BertConfig, BertModel

    BertModel(
        BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)
    ).save_pretrained(tmp_path / "bert")
    with pytest.raises(UnsupportedModelError, match=r"cannot convert model_type 'bert'. Supported: .*vit"):
        convert(tmp_path / "bert")


def test_missing_normalisation_is_an_error_with_a_fix(tmp_path):
    model, _ = save_family("vit", tmp_path / "with-processor")
    model.save_pretrained(tmp_path / "no-processor")
    with pytest.raises(ValueError, match="image_mean"):
        convert(tmp_path / "no-processor")
    assert (
        convert(tmp_path / "no-processor", image_mean=IMAGE_MEAN, image_std=IMAGE_STD).report.equivalence_max_abs_diff
        < 1e-5
    )


def test_already_bcos_and_invalid_b_are_refused(tiny_vit_dir, tmp_path):
    convert(tiny_vit_dir, tmp_path / "bcos")
    with pytest.raises(UnsupportedModelError, match="already a B-cos model"):
        convert(tmp_path / "bcos")
    with pytest.raises(ValueError, match="B must be a number >= 1"):
        convert(tiny_vit_dir, b=0.5)


def test_forward_with_labels_and_hidden_states(tiny_vit_dir):
    model = convert(tiny_vit_dir).model
    outputs = model(pixel_values=torch.rand(2, 3, 32, 32), labels=torch.tensor([0, 2]), output_hidden_states=True)
    assert outputs.loss is not None and outputs.loss.ndim == 0
    assert len(outputs.hidden_states) == 3
    assert model(pixel_values=torch.rand(1, 3, 32, 32), return_dict=False)[0].shape == (1, 3)


def test_backbone_works_in_the_feature_extraction_pipeline(tiny_vit_model_dir, tmp_path):
    """The model card of a backbone advertises pipeline("image-feature-extraction")."""
    convert(tiny_vit_model_dir, tmp_path / "backbone")
    extractor = pipeline("image-feature-extraction", model=str(tmp_path / "backbone"))
    features = torch.tensor(extractor(Image.new("RGB", (40, 40), (20, 100, 200))))
    assert features.shape == (1, 17, 32)  # class token + 16 patches, hidden size 32
    card = (tmp_path / "backbone" / "README.md").read_text()
    assert "pipeline_tag: image-feature-extraction" in card
