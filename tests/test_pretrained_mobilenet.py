"""The real ImageNet MobileNetV2 (torchvision weights, offline package): exact conversion on real photos."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageClassification

from bcos_hf.convert import convert
from bcos_hf.pretrained import imagenet_labels, mobilenet_v2_weights_path, save_imagenet_mobilenet_v2

try:
    mobilenet_v2_weights_path()
except FileNotFoundError as missing:
    pytest.skip(str(missing), allow_module_level=True)

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the real photos (pip install .[dev])")

PHOTOS = {"chelsea": 285, "coffee": 967, "rocket": None}
"""Photo -> expected ImageNet class (285 Egyptian cat, 967 espresso); rocket's top-1 is only checked unchanged."""


@pytest.fixture(scope="module")
def mobilenet_dir(tmp_path_factory):
    return save_imagenet_mobilenet_v2(tmp_path_factory.mktemp("mobilenet_v2"))


def test_bundled_imagenet_labels():
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert (labels[0], labels[285], labels[967]) == ("tench, Tinca tinca", "Egyptian cat", "espresso")


def test_equivalence_mode_matches_the_real_model_on_real_photos(mobilenet_dir, tmp_path):
    source = AutoModelForImageClassification.from_pretrained(mobilenet_dir).eval()
    source_processor = AutoImageProcessor.from_pretrained(mobilenet_dir)
    conversion = convert(mobilenet_dir, tmp_path / "bcos", b=1, keep_bias=True)
    assert conversion.report.equivalence_max_abs_diff < 1e-4
    bcos = AutoModelForImageClassification.from_pretrained(tmp_path / "bcos").eval()
    bcos_processor = AutoImageProcessor.from_pretrained(tmp_path / "bcos")
    assert bcos_processor.do_normalize is False and bcos.config.id2label[285] == "Egyptian cat"

    photos = [Image.fromarray(getattr(skimage_data, name)()) for name in PHOTOS]
    with torch.no_grad():
        expected = source(**source_processor(photos, return_tensors="pt")).logits
        actual = bcos(**bcos_processor(photos, return_tensors="pt")).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)
    assert actual.argmax(-1).tolist() == expected.argmax(-1).tolist()
    for (name, label), predicted in zip(PHOTOS.items(), expected.argmax(-1).tolist(), strict=True):
        assert label is None or predicted == label, (name, predicted)


def test_default_conversion_keeps_the_features_alive(mobilenet_dir):
    """B = 2 without biases: with the source's BatchNorm statistics every pooled feature is exactly zero and the
    logits tie; the default conversion re-estimates them, so features and logits vary with the photo."""
    photos = [Image.fromarray(getattr(skimage_data, name)()) for name in PHOTOS]

    def pooled_and_logits(model, processor):
        pixels = processor(photos, return_tensors="pt")["pixel_values"]
        with torch.no_grad():
            pooled = model.network.base_model(pixel_values=model.encode_pixels(pixels)).pooler_output.flatten(1)
            return pooled, model(pixel_values=pixels).logits

    dead = convert(mobilenet_dir, batchnorm_calibration=False)
    pooled, logits = pooled_and_logits(dead.model.eval(), dead.image_processor)
    assert pooled.abs().max() == 0 and logits.std(dim=1).max() == 0

    alive = convert(mobilenet_dir)
    assert alive.report.batchnorm_calibration is not None
    pooled, logits = pooled_and_logits(alive.model.eval(), alive.image_processor)
    assert (pooled.abs().sum(dim=0) > 0).float().mean() > 0.9  # nearly every feature fires on some photo
    assert logits.std(dim=1).min() > 0 and not torch.equal(pooled[0], pooled[1])
