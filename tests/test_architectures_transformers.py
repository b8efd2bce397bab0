"""DeiT, DINOv2, and CLIP's and SigLIP's vision towers: the converter's guarantees on tiny configs.

CLIPModel and SiglipModel themselves (zero-shot, with their text towers) are covered in test_clip.py.
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoModel, AutoModelForImageClassification, pipeline

from bcos_hf import BcosForImageClassification, BcosLinear, BcosModel, DetachableLinear, UnsupportedModelError
from bcos_hf.convert import convert

from .conftest import run_without_bcos_hf
from .families import FAMILIES, assert_same_outputs, normalised, random_images, save_family

CLASSIFIERS = ("deit", "deit-distilled", "dinov2", "clip-classifier", "siglip-classifier")
BACKBONES = ("deit-backbone", "dinov2-backbone", "clip_vision_model-backbone")


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("deit", dict()),
        ("deit", dict(qkv_bias=False, hidden_act="gelu_new", num_labels=5, id2label=None)),
        ("deit", dict(image_size=24, patch_size=6, num_hidden_layers=3)),
        ("deit-distilled", dict()),
        ("deit-distilled", dict(image_size=16, patch_size=4, num_labels=4, id2label=None)),
        ("deit-backbone", dict()),
        ("deit-backbone", dict(pooler_act="relu", hidden_act="gelu_new")),
        ("dinov2", dict()),
        ("dinov2", dict(use_swiglu_ffn=True, layerscale_value=0.1)),
        ("dinov2", dict(qkv_bias=False, drop_path_rate=0.1, image_size=48, patch_size=16, num_labels=2, id2label=None)),
        ("dinov2-backbone", dict()),
        ("dinov2-backbone", dict(use_swiglu_ffn=True, hidden_act="silu")),
        ("clip-classifier", dict()),
        ("clip-classifier", dict(vision=dict(hidden_act="gelu", image_size=24, patch_size=6))),
        ("siglip-classifier", dict(vision=dict(image_size=24, patch_size=6))),
        ("clip_vision_model-backbone", dict()),
        ("clip_vision_model-backbone", dict(hidden_act="gelu_new", num_hidden_layers=3)),
    ],
)
def test_equivalence_mode_reproduces_the_source(tmp_path, family, overrides):
    source, folder = save_family(family, tmp_path / "source", **overrides)
    conversion = convert(folder, b=1, keep_bias=True)
    assert conversion.report.equivalence_max_abs_diff < 1e-5

    vision = getattr(source.config, "vision_config", source.config)
    images = random_images(1, vision.image_size)
    mean, std = conversion.model.config.input_mean, conversion.model.config.input_std
    with torch.no_grad():
        expected = source(pixel_values=normalised(images, mean, std))
        actual = conversion.model(pixel_values=images)
    backbone = family.endswith("-backbone")
    assert isinstance(conversion.model, BcosModel if backbone else BcosForImageClassification)
    assert_same_outputs(actual, expected, backbone)


@pytest.mark.parametrize("family", [*CLASSIFIERS, *BACKBONES])
def test_bcos_mode_saves_and_reloads_identically_through_the_auto_classes(tmp_path, family):
    source, _ = save_family(family, tmp_path / "source")
    conversion = convert(tmp_path / "source", tmp_path / "bcos")
    auto_class = AutoModel if family in BACKBONES else AutoModelForImageClassification
    reloaded = auto_class.from_pretrained(tmp_path / "bcos")
    assert (
        type(reloaded) is type(conversion.model) is (BcosModel if family in BACKBONES else BcosForImageClassification)
    )
    assert type(reloaded.network) is type(source)  # the distilled DeiT is rebuilt with its two heads
    assert reloaded.config.b == 2 and not reloaded.config.keep_bias
    assert any(isinstance(module, BcosLinear) for module in reloaded.modules())

    images = random_images(2, getattr(source.config, "vision_config", source.config).image_size)
    output = "last_hidden_state" if family in BACKBONES else "logits"
    with torch.no_grad():
        expected = getattr(conversion.model(pixel_values=images), output)
        assert torch.equal(getattr(reloaded(pixel_values=images), output), expected)


def test_distilled_deit_averages_its_two_bcos_heads(tmp_path):
    save_family("deit-distilled", tmp_path / "source")
    model = convert(tmp_path / "source").model
    heads = (model.network.cls_classifier, model.network.distillation_classifier)
    assert all(type(head) is BcosLinear and head.bias is None for head in heads)
    images = random_images(2)
    with torch.no_grad():
        outputs = model.network(pixel_values=torch.cat([images, 1 - images], dim=1))
        logits = model(pixel_values=images).logits
    torch.testing.assert_close(logits, (outputs.cls_logits + outputs.distillation_logits) / 2 + model.config.logit_bias)


def test_dinov2_layer_scale_is_kept_and_swiglu_is_dynamic_linear(tmp_path):
    """SwiGLU's gate branch stays plain and is detached in explanation mode, so the block is ``W(x) x``."""
    model, processor = FAMILIES["dinov2"](use_swiglu_ffn=True)
    lambdas = [layer.layer_scale1.lambda1.detach().clone() for layer in model.dinov2.encoder.layer]
    bcos = convert(model, image_processor=processor).model
    layers = bcos.network.dinov2.encoder.layer
    assert all(torch.equal(layer.layer_scale1.lambda1, scale) for layer, scale in zip(layers, lambdas, strict=True))
    mlp = layers[0].mlp
    assert type(mlp.gate_proj) is DetachableLinear and type(mlp.up_proj) is BcosLinear

    tokens = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with bcos.explanation_mode():
        output = mlp(tokens)
        (gradient,) = torch.autograd.grad(output[:, 2, 7].sum(), tokens)
    torch.testing.assert_close((gradient * tokens).sum(dim=(1, 2)), output[:, 2, 7].detach(), rtol=1e-4, atol=1e-6)


def test_pipeline_classifies_images(tmp_path):
    images = [Image.new("RGB", (50, 40), (200, 30, 30)), Image.new("L", (30, 30), 128)]
    for family in ("deit-distilled", "dinov2"):
        save_family(family, tmp_path / f"{family}-source")
        convert(tmp_path / f"{family}-source", tmp_path / family)
        classifier = pipeline("image-classification", model=str(tmp_path / family))
        for prediction in classifier(images, top_k=3):
            assert {p["label"] for p in prediction} == {"cat", "dog", "car"}
            assert sum(p["score"] for p in prediction) == pytest.approx(1.0, abs=1e-4)


def test_remote_code_loads_deit_and_dinov2_without_bcos_hf(tmp_path):
    families = ("deit-distilled", "dinov2-backbone")
    images = random_images(2)
    torch.save(images, tmp_path / "images.pt")
    for family in families:
        save_family(family, tmp_path / f"{family}-source")
        model = convert(tmp_path / f"{family}-source", tmp_path / family, b=1.5).model
        with torch.no_grad():
            outputs = model(pixel_values=images)
        expected = outputs.last_hidden_state if family.endswith("backbone") else outputs.logits
        torch.save(expected, tmp_path / f"{family}-expected.pt")
    result = run_without_bcos_hf(
        f"""
        import torch
        from PIL import Image
        from transformers import AutoModel, AutoModelForImageClassification, pipeline
        images = torch.load({str(tmp_path / "images.pt")!r})
        for family in {families!r}:
            folder = {str(tmp_path)!r} + "/" + family
            backbone = family.endswith("backbone")
            auto_class = AutoModel if backbone else AutoModelForImageClassification
            model = auto_class.from_pretrained(folder, trust_remote_code=True)
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            with torch.no_grad():
                outputs = model(pixel_values=images)
            actual = outputs.last_hidden_state if backbone else outputs.logits
            assert torch.equal(actual, torch.load(folder + "-expected.pt")), family
            if not backbone:
                classifier = pipeline("image-classification", model=folder, trust_remote_code=True)
                print(family, classifier(Image.new("RGB", (40, 40), (10, 200, 10)))[0]["label"])
        """,
        hf_home=tmp_path / "hf_home",
    )
    family, label = result.stdout.strip().splitlines()[-1].split()
    assert family == "deit-distilled" and label in {"cat", "dog", "car"}


@pytest.mark.parametrize(
    ("family", "class_name"),
    [("deit", "DeiTForMaskedImageModeling"), ("dinov2", "Dinov2Backbone")],
)
def test_unsupported_classes_of_a_supported_family_are_refused_with_the_supported_ones(tmp_path, family, class_name):
    import transformers

    source, _ = FAMILIES[family]()
    getattr(transformers, class_name)(source.config).save_pretrained(tmp_path / "source")
    FAMILIES[family]()[1].save_pretrained(tmp_path / "source")
    with pytest.raises(UnsupportedModelError, match=f"is a {class_name}; bcos_hf converts these") as error:
        convert(tmp_path / "source")
    assert type(source).__name__ in str(error.value)
    if family == "deit":
        assert "DeiTForImageClassificationWithTeacher" in str(error.value)
