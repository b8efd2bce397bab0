"""ConvNeXt, ResNet and MobileNetV2: the converter's guarantees on tiny configs built in code."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch import nn
from transformers import AutoModel, AutoModelForImageClassification, SwinConfig, SwinModel, pipeline

from bcos_hf import BcosForImageClassification, BcosModel, UncentredBatchNorm2d, UnsupportedModelError
from bcos_hf.convert import convert

from .conftest import run_without_bcos_hf
from .families import (
    FAMILIES,
    assert_same_outputs,
    normalised,
    random_images,
    randomise,
    randomise_running_statistics,
    save_family,
)

CNN_FAMILIES = ("convnext", "resnet", "mobilenet_v2")


def cnn_images(batch: int) -> torch.Tensor:
    """Non-square images, so that padding (including MobileNetV2's TF 'SAME' padding) is exercised."""
    return random_images(batch, height=40, width=48)


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("convnext", dict()),
        ("convnext", dict(drop_path_rate=0.2, layer_scale_init_value=0.0, hidden_act="relu")),
        (
            "convnext",
            dict(patch_size=2, hidden_sizes=[8, 12, 16, 24], depths=[2, 1, 1, 1], num_labels=5, id2label=None),
        ),
        ("convnext-backbone", dict()),
        ("resnet", dict()),
        ("resnet", dict(layer_type="bottleneck", downsample_in_bottleneck=True, downsample_in_first_stage=True)),
        ("resnet", dict(hidden_act="gelu", embedding_size=12, num_labels=7, id2label=None)),
        ("resnet-backbone", dict(layer_type="bottleneck")),
        ("mobilenet_v2", dict()),  # tf_padding=True, the config default
        ("mobilenet_v2", dict(tf_padding=False, layer_norm_eps=1e-5)),  # the torchvision weights' setting
        ("mobilenet_v2", dict(output_stride=8, first_layer_is_expansion=False, depth_multiplier=0.35)),  # dilation
        ("mobilenet_v2-backbone", dict()),
    ],
)
def test_equivalence_mode_reproduces_the_source(tmp_path, family, overrides):
    source, folder = save_family(family, tmp_path / "source", **overrides)
    conversion = convert(folder, b=1, keep_bias=True)
    assert conversion.report.equivalence_max_abs_diff < 1e-5

    images = cnn_images(1)
    with torch.no_grad():
        expected = source(pixel_values=normalised(images))
        actual = conversion.model(pixel_values=images)
    backbone = family.endswith("-backbone")
    assert isinstance(conversion.model, BcosModel if backbone else BcosForImageClassification)
    assert_same_outputs(actual, expected, backbone)


@pytest.mark.parametrize("family", CNN_FAMILIES)
def test_bcos_mode_saves_reloads_identically_and_runs_in_pipelines(tmp_path, family):
    save_family(family, tmp_path / "source")
    save_family(f"{family}-backbone", tmp_path / "source-backbone")
    conversion = convert(tmp_path / "source", tmp_path / "bcos")
    backbone = convert(tmp_path / "source-backbone", tmp_path / "bcos-backbone")
    assert not any(getattr(module, "bias", None) is not None for module in conversion.model.modules())

    images = cnn_images(2)
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "bcos")
    reloaded_backbone = AutoModel.from_pretrained(tmp_path / "bcos-backbone")
    assert type(reloaded) is BcosForImageClassification and type(reloaded_backbone) is BcosModel
    assert reloaded.config.b == 2 and reloaded.config.source_config.model_type == family
    with torch.no_grad():
        assert torch.equal(reloaded(pixel_values=images).logits, conversion.model(pixel_values=images).logits)
        assert torch.equal(
            reloaded_backbone(pixel_values=images).last_hidden_state,
            backbone.model(pixel_values=images).last_hidden_state,
        )

    classifier = pipeline("image-classification", model=str(tmp_path / "bcos"))
    predictions = classifier([Image.new("RGB", (50, 40), (200, 30, 30)), Image.new("L", (30, 30), 128)], top_k=3)
    for prediction in predictions:
        assert {p["label"] for p in prediction} == {"cat", "dog", "car"}
        assert sum(p["score"] for p in prediction) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("family", CNN_FAMILIES)
def test_bcos_mode_is_exactly_dynamic_linear(family):
    """Without biases, a logit is the sum of its contributions ``x * dlogit/dx`` in explanation mode.

    BatchNorm runs on batch statistics, as in fine-tuning: with the source's running variances, a B = 2
    BatchNorm network's activations shrink layer by layer until they vanish (see the adapters' notes).
    """
    model, processor = FAMILIES[family]()
    bcos = convert(model, image_processor=processor).model
    for module in bcos.modules():
        if isinstance(module, UncentredBatchNorm2d):
            module.train()
    images = cnn_images(2)
    encoded = torch.cat([images, 1 - images], dim=1).requires_grad_(True)
    with bcos.explanation_mode():
        logits = bcos(pixel_values=encoded).logits[:, 1] - bcos.config.logit_bias
        (gradient,) = torch.autograd.grad(logits.sum(), encoded)
    contributions = (gradient * encoded).flatten(1).sum(dim=1)
    assert logits.abs().min() > 1e-5  # not vanished
    torch.testing.assert_close(contributions, logits.detach(), rtol=1e-4, atol=1e-6)


def test_remote_code_loads_every_cnn_family_without_bcos_hf(tmp_path):
    images = cnn_images(2)
    torch.save(images, tmp_path / "images.pt")
    for family in CNN_FAMILIES:
        save_family(family, tmp_path / f"{family}-source")
        conversion = convert(tmp_path / f"{family}-source", tmp_path / family)
        with torch.no_grad():
            torch.save(conversion.model(pixel_values=images).logits, tmp_path / f"{family}-expected.pt")
    result = run_without_bcos_hf(
        f"""
        import torch
        from PIL import Image
        from transformers import AutoModelForImageClassification, pipeline
        images = torch.load({str(tmp_path / "images.pt")!r})
        for family in {CNN_FAMILIES!r}:
            folder = {str(tmp_path)!r} + "/" + family
            model = AutoModelForImageClassification.from_pretrained(folder, trust_remote_code=True)
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            with torch.no_grad():
                logits = model(pixel_values=images).logits
            assert torch.equal(logits, torch.load(folder + "-expected.pt")), family
            classifier = pipeline("image-classification", model=folder, trust_remote_code=True)
            print(family, classifier(Image.new("RGB", (40, 40), (10, 200, 10)))[0]["label"])
        """,
        hf_home=tmp_path / "hf_home",
    )
    lines = result.stdout.strip().splitlines()[-3:]
    assert [line.split()[0] for line in lines] == list(CNN_FAMILIES)
    assert all(line.split()[1] in {"cat", "dog", "car"} for line in lines)


@pytest.mark.parametrize(
    ("family", "path", "unknown"),
    [
        ("convnext", "convnext.encoder.stages.1.layers.0.act", nn.Softplus()),
        ("resnet", "resnet.embedder.pooler", nn.LPPool2d(2, 3)),
        ("mobilenet_v2", "mobilenet_v2.layer.3.conv_3x3.activation", nn.Hardswish()),
    ],
)
def test_unknown_submodules_are_refused_by_name_and_nothing_is_converted(family, path, unknown):
    model, processor = FAMILIES[family]()
    parent, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent), name, unknown)
    before = {name: type(module) for name, module in model.named_modules()}
    with pytest.raises(UnsupportedModelError, match="no rule for these module types") as error:
        convert(model, image_processor=processor)
    assert f"torch.nn.modules.{type(unknown).__module__.rsplit('.', 1)[-1]}.{type(unknown).__name__}" in str(
        error.value
    )
    assert f"'{path}'" in str(error.value)
    assert {name: type(module) for name, module in model.named_modules()} == before


def test_unsupported_family_lists_the_supported_ones(tmp_path):
    config = SwinConfig(image_size=32, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[1, 1], window_size=2)
    SwinModel(config).save_pretrained(tmp_path / "swin")
    with pytest.raises(UnsupportedModelError, match="model_type 'swin'") as error:
        convert(tmp_path / "swin")
    assert all(family in str(error.value) for family in (*CNN_FAMILIES, "vit"))


@pytest.mark.parametrize("family", ["mobilenet_v2", "resnet"])
def test_inexact_conversions_re_estimate_batchnorm_statistics_and_exact_ones_never(family):
    source, processor = FAMILIES[family]()
    source = randomise_running_statistics(randomise(source)).eval()
    source_variances = [m.running_var.clone() for m in source.modules() if isinstance(m, torch.nn.BatchNorm2d)]

    def variances(conversion):
        return [m.running_var for m in conversion.model.modules() if getattr(m, "running_var", None) is not None]

    default = convert(source, image_processor=processor)
    assert "uniform-noise images" in default.report.batchnorm_calibration
    assert all(not torch.equal(a, b) for a, b in zip(variances(default), source_variances, strict=True))
    again = convert(source, image_processor=processor)
    assert all(torch.equal(a, b) for a, b in zip(variances(again), variances(default), strict=True))  # seeded
    for kept in (
        convert(source, image_processor=processor, batchnorm_calibration=False),
        convert(source, image_processor=processor, b=1, keep_bias=True),
    ):
        assert kept.report.batchnorm_calibration is None
        assert all(torch.equal(a, b) for a, b in zip(variances(kept), source_variances, strict=True))


def test_conversions_without_batchnorm_report_no_calibration():
    source, processor = FAMILIES["convnext"]()
    assert convert(randomise(source), image_processor=processor).report.batchnorm_calibration is None
