"""Whole-model ``torch.compile(fullgraph=True)``: compiled and eager agree (forward, gradients, contributions),
and the number of compilations stays what it should over a training run's sequence of calls: batches of one
shape, a B ramp, explanation-mode toggles and a change of batch size.

The backend is ``aot_eager``: dynamo captures the whole model and AOTAutograd traces the forward and the
backward (the closed-form B-cos autograd functions included) as inductor would, without inductor's code
generation, which ``test_performance`` covers for the kernels. A compile counter wraps it: ``fullgraph=True``
raises at any graph break, and the counter counts every compilation of a frame.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch._dynamo.testing import CompileCounterWithBackend
from transformers import AutoModelForImageClassification, pipeline

from bcos_hf import BcosConv2d, BcosLinear, explanation_mode
from bcos_hf.convert import convert
from bcos_hf.training_args import BcosTrainingArguments, compiles_by_default
from bcos_hf.training_callbacks import set_b

from .families import FAMILIES, random_images, save_family


def _converted(family: str, **overrides):
    source, processor = FAMILIES[family](**overrides)
    return convert(source, image_processor=processor).model


def _counter() -> CompileCounterWithBackend:
    torch._dynamo.reset()
    return CompileCounterWithBackend("aot_eager")


def _training_step(model, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Logits, parameter gradients and input gradient of one training forward and backward."""
    images = images.clone().requires_grad_(True)
    model.zero_grad(set_to_none=True)
    logits = model(pixel_values=images).logits
    (logits.square().mean() + logits[:, 0].sum()).backward()
    return logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None], images.grad


@pytest.mark.slow
@pytest.mark.parametrize("family", ["vit", "convnext"])
def test_compiled_training_step_agrees_with_eager_and_compiles_once(family):
    """Forward, every parameter gradient and the input gradient; three batches of one shape, one compilation."""
    model = _converted(family).train()
    counter = _counter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    images = random_images(2)
    expected = _training_step(model, images)
    for seed in (1, 2, 3):
        actual = _training_step(compiled, random_images(2, seed=seed))
    actual, expected = _training_step(compiled, images), _training_step(model, images)
    torch.testing.assert_close(actual[0], expected[0], rtol=1e-5, atol=1e-5)
    assert len(actual[1]) == len(expected[1]) > 0
    for got, want in zip(actual[1], expected[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(actual[2], expected[2], rtol=1e-4, atol=1e-6)
    assert counter.frame_count == 1


@pytest.mark.slow
def test_recompilations_over_a_b_ramp_explanation_toggles_and_batch_sizes():
    """B is read from a tensor, so a B ramp compiles three graphs (B = 1 plain, B between 1 and 2, B = 2) and not
    one per step; explanation mode and eval mode compile once each, however often they toggle; a new batch size
    compiles once more, with a dynamic batch, and further sizes reuse it."""
    model = _converted("vit", num_hidden_layers=1).train()
    counter = _counter()
    compiled = torch.compile(model, fullgraph=True, backend=counter)
    images = random_images(2)

    compiled(pixel_values=images).logits.sum().backward()
    assert counter.frame_count == 1  # B = 2
    for b in (1.0, 1.25, 1.5, 1.75, 2.0, 2.0):
        set_b(model, b)
        compiled(pixel_values=images).logits.sum().backward()
        if b == 1.5:  # the general-B graph computes what eager computes at this B
            torch.testing.assert_close(compiled(pixel_values=images).logits, model(pixel_values=images).logits)
    assert counter.frame_count == 3  # + B = 1, + one graph for every B strictly between 1 and 2

    model.eval()
    with torch.no_grad():
        for explaining in (False, True, False, True):
            with explanation_mode(model, explaining):
                compiled(pixel_values=images)
    assert counter.frame_count == 5  # + eval, + eval in explanation mode

    for batch in (3, 4, 5):
        with torch.no_grad():
            compiled(pixel_values=random_images(batch))
    assert counter.frame_count == 6  # + one graph with a dynamic batch


@pytest.mark.slow
def test_compiled_explanation_agrees_with_eager_and_reuses_its_graph():
    """``model.explain(compile=...)``: logits, dynamic weights and contributions as in eager mode; a second batch of
    the same size compiles nothing; the model is left as it was (eval flag, not explaining)."""
    model = _converted("vit", num_hidden_layers=1).train()
    counter = _counter()
    images = random_images(3)
    expected = model.explain(images)
    actual = model.explain(images, compile=counter)
    for name in ("logits", "dynamic_weights", "contributions", "residual"):
        torch.testing.assert_close(getattr(actual, name), getattr(expected, name), rtol=1e-4, atol=1e-5)
    assert torch.equal(actual.target, expected.target)
    model.explain(random_images(3, seed=5), compile=counter)
    assert counter.frame_count == 1
    assert model.training and not any(getattr(module, "explaining", False) for module in model.modules())


@pytest.mark.slow
def test_explanation_pipeline_takes_compile(tmp_path):
    """``pipeline("image-explanation", compile=...)`` explains with the compiled model, as the eager one does."""
    _, source_dir = save_family("vit", tmp_path / "source", num_hidden_layers=1)
    convert(str(source_dir), tmp_path / "bcos")
    images = [random_images(1, seed=seed)[0].permute(1, 2, 0).mul(255).byte().numpy() for seed in (1, 2)]
    pictures = [Image.fromarray(image) for image in images]
    counter = _counter()
    eager = pipeline("image-explanation", model=str(tmp_path / "bcos"))(pictures)
    compiled_pipe = pipeline("image-explanation", model=str(tmp_path / "bcos"), compile=counter)
    compiled = compiled_pipe(pictures)
    assert counter.frame_count == 1
    for got, want in zip(compiled, eager, strict=True):
        assert got["label"] == want["label"] and got["target"] == want["target"]
        torch.testing.assert_close(got["contributions"], want["contributions"], rtol=1e-4, atol=1e-5)


def test_trainer_compiles_by_default_on_cuda_only(tmp_path, monkeypatch):
    """``torch_compile`` unset: on with CUDA (not with feature alignment, whose hooks change every step, nor with
    ``use_cpu``), off on the CPU; an explicit value always holds."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert BcosTrainingArguments(output_dir=str(tmp_path), report_to="none").torch_compile is False
    assert BcosTrainingArguments(output_dir=str(tmp_path), report_to="none", torch_compile=True).torch_compile
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert compiles_by_default(SimpleNamespace(use_cpu=False, alignment_weight=0.0))
    assert not compiles_by_default(SimpleNamespace(use_cpu=False, alignment_weight=1.0))
    assert not compiles_by_default(SimpleNamespace(use_cpu=True, alignment_weight=0.0))


def test_b_is_a_float_for_people_and_a_float32_tensor_for_graphs(tmp_path):
    """Setting ``b`` keeps the kind of path and the exponent tensor in step; the tensor is not a buffer (not saved,
    not cast with the model's dtype) and a loaded model's layers carry the config's B."""
    layer = BcosLinear(4, 3, b=1.5)
    assert (layer.b, layer.b_kind, layer.b_exponent.item()) == (1.5, "general", 1.5)
    layer.double()
    assert layer.b_exponent.dtype == torch.float32 and "b_exponent" not in layer.state_dict()
    layer.b = 2
    assert (layer.b, layer.b_kind) == (2.0, "two")
    layer.b = 1
    assert layer.b_kind == "plain"
    with pytest.raises(ValueError, match="B must be a number >= 1"):
        layer.b = 0.5
    assert layer.b == 1.0

    _, source_dir = save_family("convnext", tmp_path / "source")
    convert(str(source_dir), tmp_path / "bcos", b=2.5)
    loaded = AutoModelForImageClassification.from_pretrained(tmp_path / "bcos")
    layers = [module for module in loaded.modules() if isinstance(module, (BcosLinear, BcosConv2d))]
    assert layers and all(layer.b_kind == "general" and layer.b_exponent.item() == 2.5 for layer in layers)
    assert all(layer.b_exponent.device == layer.weight.device for layer in layers)
