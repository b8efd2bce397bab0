"""Each attribution method against a case whose answer is known, on standard and on B-cos models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from bcos_hf.attribution import ATTRIBUTIONS, POST_HOC, get_attribution
from bcos_hf.convert import convert

from .families import FAMILIES, randomise

pytest.importorskip("captum")


class LinearClassifier(nn.Module):
    """logits = W · pixel_values (flattened) + b: every method has a closed form on it."""

    def __init__(self, classes: int = 3, side: int = 8, seed: int = 0) -> None:
        super().__init__()
        self.linear = nn.Linear(3 * side * side, classes)
        with torch.no_grad():
            self.linear.weight.copy_(
                torch.randn(classes, 3 * side * side, generator=torch.Generator().manual_seed(seed))
            )

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.linear(pixel_values.flatten(1)))


class PooledConvNet(nn.Module):
    """conv -> ReLU -> global average pool -> linear: Grad-CAM equals CAM here (Selvaraju et al., 2017, Sec. 3.1)."""

    def __init__(self, channels: int = 5, classes: int = 3) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, channels, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Linear(channels, classes)

    def forward(self, pixel_values: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.head(self.features(pixel_values).mean(dim=(2, 3))))


IMAGES = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))
TARGETS = torch.tensor([0, 2, 1, 2])


@pytest.fixture(scope="module")
def linear() -> LinearClassifier:
    return LinearClassifier().eval()


def weights_of(model: LinearClassifier, targets: torch.Tensor) -> torch.Tensor:
    return model.linear.weight[targets].detach().view(-1, 3, 8, 8)


@pytest.mark.parametrize("method", ["ixg", "ig", "deeplift"])
def test_on_a_linear_model_input_times_gradient_integrated_gradients_and_deeplift_are_w_times_x(linear, method):
    expected = (weights_of(linear, TARGETS) * IMAGES).sum(dim=1)
    torch.testing.assert_close(get_attribution(method)(linear, IMAGES, TARGETS), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["saliency", "smoothgrad"])
def test_on_a_linear_model_saliency_and_smoothgrad_are_the_absolute_weights(linear, method):
    expected = weights_of(linear, TARGETS).abs().sum(dim=1)
    torch.testing.assert_close(get_attribution(method)(linear, IMAGES, TARGETS), expected, rtol=1e-4, atol=1e-5)


def test_occlusion_of_a_model_that_reads_one_pixel_marks_only_the_windows_around_it():
    model = LinearClassifier()
    with torch.no_grad():
        model.linear.weight.zero_()
        model.linear.weight.view(3, 3, 8, 8)[:, :, 5, 2] = 1.0
    maps = get_attribution("occlusion")(model, IMAGES, TARGETS)  # 1 px windows on 8 px images
    expected = torch.zeros(4, 8, 8)
    expected[:, 5, 2] = IMAGES[:, :, 5, 2].sum(dim=1)  # the logit drop when that pixel is zeroed
    torch.testing.assert_close(maps, expected)
    larger = LinearClassifier(side=16)
    with torch.no_grad():
        larger.linear.weight.zero_()
        larger.linear.weight.view(3, 3, 16, 16)[:, :, 10, 4] = 1.0
        larger.linear.weight.view(3, 3, 16, 16)[:, :, 2, 13] = -1.0
    coarse = get_attribution("occlusion")(larger, torch.rand(4, 3, 16, 16), TARGETS)  # 2 px windows
    assert coarse[:, 10:12, 4:6].gt(0).all() and coarse[:, 2:4, 12:14].lt(0).all()
    assert coarse.ne(0).sum() == 4 * 8


def test_grad_cam_equals_class_activation_mapping_on_a_pooled_network():
    model = PooledConvNet().eval()
    activations = model.features(IMAGES).detach()  # (4, 5, 4, 4)
    weights = model.head.weight[TARGETS].detach()  # (4, 5)
    cam = torch.relu((weights[:, :, None, None] * activations).sum(dim=1, keepdim=True)) / 16
    expected = torch.nn.functional.interpolate(cam, size=(8, 8), mode="bilinear", align_corners=False)[:, 0]
    torch.testing.assert_close(get_attribution("gradcam")(model, IMAGES, TARGETS), expected)


@pytest.mark.parametrize("bcos", [False, True], ids=["source", "bcos"])
def test_integrated_gradients_are_complete_within_their_tolerance(bcos):
    """Sum of the maps = logit(input) - logit(zero input) (Sundararajan et al., 2017, Prop. 1), on a tiny ViT."""
    source, processor = FAMILIES["vit"]()
    model = convert(randomise(source), image_processor=processor, b=2.0).model.eval() if bcos else source.eval()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    targets = torch.tensor([0, 2, 1])
    maps = get_attribution("ig")(model, images, targets)
    inputs = model.encode_pixels(images) if bcos else images

    def logits(values: torch.Tensor) -> torch.Tensor:  # a B-cos model's network: the zero baseline is no encoding
        return (
            model.logit_layer(model.network(pixel_values=values).logits) if bcos else model(pixel_values=values).logits
        )

    with torch.no_grad():
        gap = logits(inputs) - logits(torch.zeros_like(inputs))
    gap = gap.gather(1, targets[:, None])[:, 0]
    assert gap.abs().max() > 5e-3
    torch.testing.assert_close(maps.sum(dim=(1, 2)), gap, rtol=1e-2, atol=1e-3 * gap.abs().max().item())


def test_input_x_gradient_equals_the_bcos_contributions_of_a_b1_piecewise_linear_model():
    """With B = 1 a B-cos ResNet is a plain piecewise-linear network: its dynamic linear map W(x) is the
    gradient, so input x gradient (w.r.t. the encoded image) and the B-cos contributions coincide."""
    source, processor = FAMILIES["resnet"]()
    model = convert(randomise(source), image_processor=processor, b=1.0, keep_bias=False).model.eval()
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    targets = torch.tensor([1, 0, 2])
    contributions = get_attribution("bcos")(model, images, targets)
    scale = contributions.abs().max().item()
    assert scale > 1e-4
    torch.testing.assert_close(
        get_attribution("ixg")(model, images, targets), contributions, rtol=1e-4, atol=1e-6 * scale
    )


@pytest.fixture(scope="module")
def vits():
    source, processor = FAMILIES["vit"]()
    return {"source": source, "bcos": convert(source, image_processor=processor).model}


@pytest.mark.parametrize("kind", ["source", "bcos"])
@pytest.mark.parametrize("method", [*POST_HOC, "bcos", "random"])
def test_every_method_is_batched_honours_per_image_targets_and_leaves_no_gradient(vits, kind, method):
    model = vits[kind].train()
    if method == "bcos" and kind == "source":
        with pytest.raises(ValueError, match="'bcos' explains B-cos models only"):
            get_attribution(method)(model, IMAGES, TARGETS)
        return
    images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    targets = torch.tensor([0, 2, 1])
    attribution = get_attribution(method)
    torch.manual_seed(0)
    maps = attribution(model, images, targets)
    assert maps.shape == (3, 32, 32) and torch.isfinite(maps).all()
    assert model.training and all(parameter.grad is None for parameter in model.parameters())
    if method not in ("random", "smoothgrad"):  # the two drawing random numbers
        one = attribution(model, images[1:2], targets[1:2])
        torch.testing.assert_close(maps[1:2], one, rtol=1e-4, atol=1e-6)
        if method != "gradcam":  # Grad-CAM of a tiny ViT may be all zero after its ReLU
            assert not torch.allclose(attribution(model, images[1:2], torch.tensor([0])), one)


def test_unknown_methods_are_refused_with_the_list():
    with pytest.raises(ValueError, match="Unknown attribution method 'shap'; known: bcos, ixg, gradcam, random"):
        get_attribution("shap")
    assert set(POST_HOC) < set(ATTRIBUTIONS)
