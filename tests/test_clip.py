"""B-cos CLIP and SigLIP for zero-shot classification: only the vision tower is converted.

The tiny models share a letter-level tokenizer whose ids lie inside their 54-token vocabulary (tests/families.py).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModel,
    AutoModelForZeroShotImageClassification,
    AutoProcessor,
    CLIPModel,
    CLIPProcessor,
    pipeline,
)

from bcos_hf import (
    BcosCLIPConfig,
    BcosCLIPModel,
    BcosLinear,
    BcosSiglipModel,
    UnsupportedModelError,
    explanation_mode,
)
from bcos_hf.convert import IMAGE_TEXT_NOTE, convert
from bcos_hf.modeling.adapter_siglip import BcosMultiheadAttention

from .conftest import run_without_bcos_hf
from .families import FAMILIES, random_images, save_family

LABELS = ["a photo of a cat", "a photo of a dog", "a car"]


def clip_inputs(processor: CLIPProcessor, images: torch.Tensor, **padding) -> dict:
    """Token ids for LABELS and the images, normalised the way the source model expects them."""
    inputs = processor.tokenizer(LABELS, padding=padding.pop("padding", True), return_tensors="pt", **padding)
    mean = torch.tensor(processor.image_processor.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(processor.image_processor.image_std).view(1, 3, 1, 1)
    return dict(inputs, pixel_values=(images - mean) / std)


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("clip", dict()),
        (
            "clip",
            dict(vision=dict(hidden_act="gelu", image_size=24, patch_size=6, num_hidden_layers=3), projection_dim=8),
        ),
        ("siglip", dict()),
        ("siglip", dict(vision=dict(hidden_act="gelu", image_size=24, patch_size=6, num_attention_heads=2))),
    ],
)
def test_equivalence_mode_reproduces_image_embeddings_and_zero_shot_logits(tmp_path, family, overrides):
    source, folder = save_family(family, tmp_path / "source", **overrides)
    conversion = convert(folder, tmp_path / "bcos", b=1, keep_bias=True)
    assert conversion.report.equivalence_max_abs_diff < 1e-5
    assert IMAGE_TEXT_NOTE in conversion.report.notes

    processor = AutoProcessor.from_pretrained(folder)
    images = random_images(2, source.config.vision_config.image_size)
    inputs = clip_inputs(processor, images)
    reloaded = AutoModelForZeroShotImageClassification.from_pretrained(tmp_path / "bcos")
    with torch.no_grad():
        expected = source(**inputs)
        actual = reloaded(**dict(inputs, pixel_values=images))
    torch.testing.assert_close(actual.image_embeds, expected.image_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(actual.logits_per_image, expected.logits_per_image, rtol=0, atol=1e-5)
    assert torch.equal(actual.text_embeds, expected.text_embeds)


def test_bcos_mode_converts_the_vision_tower_only_and_reloads_identically(tmp_path):
    source, folder = save_family("clip", tmp_path / "source")
    model = convert(folder, tmp_path / "bcos").model
    assert type(model) is BcosCLIPModel and type(model.config) is BcosCLIPConfig
    assert type(model.network.visual_projection) is BcosLinear
    assert any(isinstance(module, BcosLinear) for module in model.network.vision_model.modules())
    assert not any(isinstance(module, BcosLinear) for module in model.network.text_model.modules())
    text_parameters = [*model.network.text_model.parameters(), *model.network.text_projection.parameters()]
    assert not any(parameter.requires_grad for parameter in text_parameters)
    assert all(parameter.requires_grad for parameter in model.network.vision_model.parameters())

    processor = AutoProcessor.from_pretrained(tmp_path / "bcos")
    images = random_images(2)
    inputs = dict(processor.tokenizer(LABELS, padding=True, return_tensors="pt"), pixel_values=images)
    reloaded = AutoModelForZeroShotImageClassification.from_pretrained(tmp_path / "bcos")
    assert not any(parameter.requires_grad for parameter in reloaded.network.text_model.parameters())
    with torch.no_grad():
        outputs = model(**inputs)
        assert torch.equal(reloaded(**inputs).logits_per_image, outputs.logits_per_image)
        source_outputs = source(**clip_inputs(processor, images))
        features = model.get_image_features(pixel_values=images).pooler_output
    assert torch.equal(outputs.text_embeds, source_outputs.text_embeds)  # the text tower is the original
    assert not torch.allclose(outputs.image_embeds, source_outputs.image_embeds, atol=1e-3)  # B = 2, no biases
    torch.testing.assert_close(outputs.image_embeds, features / features.norm(dim=-1, keepdim=True))
    assert outputs.logits_per_image.shape == (2, len(LABELS))


def test_auto_classes_processor_and_zero_shot_pipeline(tmp_path):
    _, folder = save_family("clip", tmp_path / "source")
    convert(folder, tmp_path / "bcos")
    assert CONFIG_MAPPING["bcos_clip"] is BcosCLIPConfig
    assert type(AutoConfig.from_pretrained(tmp_path / "bcos")) is BcosCLIPConfig
    assert type(AutoModel.from_pretrained(tmp_path / "bcos")) is BcosCLIPModel
    processor = AutoProcessor.from_pretrained(tmp_path / "bcos")
    assert type(processor) is CLIPProcessor and processor.image_processor.do_normalize is False
    pixel_values = processor(images=Image.new("RGB", (40, 30), (250, 0, 0)), return_tensors="pt").pixel_values
    assert pixel_values.shape == (1, 3, 32, 32) and pixel_values.min() >= 0 and pixel_values.max() <= 1
    with pytest.raises(UnsupportedModelError, match="already a B-cos model"):
        convert(tmp_path / "bcos")

    classifier = pipeline("zero-shot-image-classification", model=str(tmp_path / "bcos"))
    predictions = classifier(
        [Image.new("RGB", (50, 40), (200, 30, 30)), Image.new("L", (20, 20), 128)], candidate_labels=["cat", "dog"]
    )
    for prediction in predictions:
        assert {p["label"] for p in prediction} == {"cat", "dog"}
        assert sum(p["score"] for p in prediction) == pytest.approx(1.0, abs=1e-4)


def test_remote_code_loads_model_processor_and_pipeline_without_bcos_hf(tmp_path):
    families = {"clip": "CLIPProcessor", "siglip": "SiglipProcessor"}
    for family in families:
        _, folder = save_family(family, tmp_path / f"{family}-source")
        model = convert(folder, tmp_path / family).model
        processor = AutoProcessor.from_pretrained(tmp_path / family)
        inputs = dict(processor.tokenizer(LABELS, padding=True, return_tensors="pt"), pixel_values=random_images(2))
        torch.save(inputs, tmp_path / f"{family}-inputs.pt")
        with torch.no_grad():
            torch.save(model(**inputs).logits_per_image, tmp_path / f"{family}-expected.pt")
    result = run_without_bcos_hf(
        f"""
        import torch
        from PIL import Image
        from transformers import AutoModelForZeroShotImageClassification, AutoProcessor, pipeline
        for family, processor_class in {families!r}.items():
            folder = {str(tmp_path)!r} + "/" + family
            model = AutoModelForZeroShotImageClassification.from_pretrained(folder, trust_remote_code=True)
            assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
            processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
            assert type(processor).__name__ == processor_class and not processor.image_processor.do_normalize
            with torch.no_grad():
                logits = model(**torch.load(folder + "-inputs.pt")).logits_per_image
            assert torch.equal(logits, torch.load(folder + "-expected.pt")), family
            classifier = pipeline("zero-shot-image-classification", model=folder, trust_remote_code=True)
            image = Image.new("RGB", (40, 40), (10, 200, 10))
            print(family, classifier(image, candidate_labels=["cat", "dog"])[0]["label"])
        """,
        hf_home=tmp_path / "hf_home",
    )
    lines = [line.split() for line in result.stdout.strip().splitlines()[-2:]]
    assert [family for family, _ in lines] == ["clip", "siglip"] and all(label in {"cat", "dog"} for _, label in lines)


def test_siglip_keeps_its_sigmoid_zero_shot_semantics_and_attention_pooling(tmp_path):
    _, folder = save_family("siglip", tmp_path / "source")
    model = convert(folder, tmp_path / "bcos").model
    assert type(model) is BcosSiglipModel and model.config.model_type == "bcos_siglip"
    assert type(model.network.vision_model.head.attention) is BcosMultiheadAttention
    assert not any(parameter.requires_grad for parameter in model.network.text_model.parameters())

    image = Image.new("RGB", (40, 30), (200, 30, 30))
    classifier = pipeline("zero-shot-image-classification", model=str(tmp_path / "bcos"))
    scores = {p["label"]: p["score"] for p in classifier(image, candidate_labels=["cat", "dog"])}
    processor = AutoProcessor.from_pretrained(tmp_path / "bcos")
    # SigLIP's pipeline pads prompts to 64 tokens and scores each with a sigmoid (no softmax over labels).
    texts = processor.tokenizer(
        ["This is a photo of cat.", "This is a photo of dog."], padding="max_length", max_length=64, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**texts, pixel_values=processor(images=image, return_tensors="pt").pixel_values).logits_per_image
    torch.testing.assert_close(torch.tensor([scores["cat"], scores["dog"]]), logits[0].sigmoid())


def test_siglip_attention_pooling_head_is_dynamic_linear_in_explanation_mode(tmp_path):
    """Without biases the pooling head is ``W(x) x``: the probe only sets (detached) attention weights."""
    source, processor = FAMILIES["siglip"]()
    head = convert(source, image_processor=processor.image_processor).model.network.vision_model.head
    tokens = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(0), requires_grad=True)
    with torch.no_grad():
        expected = source.vision_model.head(tokens)
    model = convert(source, image_processor=processor.image_processor, b=1, keep_bias=True).model
    with torch.no_grad():
        torch.testing.assert_close(model.network.vision_model.head(tokens), expected, rtol=0, atol=1e-6)
    with explanation_mode(head):
        output = head(tokens)[:, 5]
        (gradient,) = torch.autograd.grad(output.sum(), tokens)
    torch.testing.assert_close((gradient * tokens).sum(dim=(1, 2)), output.detach(), rtol=1e-4, atol=1e-6)


def test_in_memory_clip_converts_without_a_tokenizer_and_says_so(tmp_path):
    source, processor = FAMILIES["clip"]()
    conversion = convert(source, tmp_path / "bcos", image_processor=processor.image_processor)
    assert type(source.visual_projection) is torch.nn.Linear  # the source is left as it was
    assert conversion.processor is None
    assert any("no processor with a tokenizer" in note for note in conversion.report.notes)
    assert type(AutoModelForZeroShotImageClassification.from_pretrained(tmp_path / "bcos")) is BcosCLIPModel
    assert isinstance(source, CLIPModel)
