"""Deletion, insertion and the randomisation check where the answer is known by construction."""

from __future__ import annotations

import pytest
import torch

from bcos_hf.attribution import get_attribution
from bcos_hf.convert import convert
from bcos_hf.faithfulness import (
    area_under_curve,
    faithfulness,
    perturbation_curves,
    pixel_order,
    randomise_top_layers,
    rank_correlation,
)

from .families import FAMILIES, randomise
from .test_attribution import IMAGES, TARGETS, LinearClassifier

pytest.importorskip("captum")


@pytest.fixture(scope="module")
def linear() -> LinearClassifier:
    return LinearClassifier().eval()


def contributions(model: LinearClassifier, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-pixel share of the logit of a linear model (fill 0 deletes exactly it)."""
    return (model.linear.weight[targets].detach().view(-1, 3, 8, 8) * images).sum(dim=1)


def test_deletion_of_a_linear_model_removes_the_sorted_contributions_one_share_at_a_time(linear):
    share = contributions(linear, IMAGES, TARGETS)
    curves = perturbation_curves(linear, IMAGES, share, TARGETS, fill=0.0, score="logit", steps=16)
    with torch.no_grad():
        logits = linear(pixel_values=IMAGES).logits.gather(1, TARGETS[:, None])[:, 0]
    removed = share.flatten(1).sort(dim=1, descending=True).values.cumsum(dim=1)[:, 3::4]  # 64 px in 16 steps
    expected = torch.cat([logits[:, None], logits[:, None] - removed], dim=1)
    torch.testing.assert_close(curves, expected, rtol=1e-5, atol=1e-4)
    assert curves[:, -1].sub(linear.linear.bias[TARGETS]).abs().max() < 1e-5  # all deleted: the bias is left


def test_insertion_is_least_relevant_first_deletion_read_backwards(linear):
    maps = contributions(linear, IMAGES, TARGETS)
    options = dict(fill=0.3, score="probability", steps=8)
    insertion = perturbation_curves(linear, IMAGES, maps, TARGETS, mode="insertion", order="most", **options)
    deletion_least = perturbation_curves(linear, IMAGES, maps, TARGETS, mode="deletion", order="least", **options)
    torch.testing.assert_close(insertion, deletion_least.flip(1))
    torch.testing.assert_close(area_under_curve(insertion), area_under_curve(deletion_least))


def test_the_exact_contributions_are_the_best_deletion_order_and_random_lies_between(linear):
    """For a linear model and fill 0, deleting the largest contributions first lowers the logit fastest of all
    orders: the AUC ranks most < random < least relevant first."""
    maps = contributions(linear, IMAGES, TARGETS)
    auc = {
        order: area_under_curve(
            perturbation_curves(
                linear,
                IMAGES,
                maps,
                TARGETS,
                order=order,
                fill=0.0,
                score="logit",
                generator=torch.Generator().manual_seed(0),
            )
        )
        for order in ("most", "random", "least")
    }
    assert (auc["most"] < auc["random"]).all() and (auc["random"] < auc["least"]).all()
    shuffled = perturbation_curves(linear, IMAGES, torch.rand(4, 8, 8), TARGETS, fill=0.0, score="logit")
    assert (area_under_curve(shuffled) >= auc["most"] - 1e-6).all()


def test_curves_start_at_the_image_and_end_at_the_fill(linear):
    grey = torch.full_like(IMAGES, 0.5)
    with torch.no_grad():
        probabilities = linear(pixel_values=torch.cat([IMAGES, grey])).logits.softmax(dim=1)
    image_score = probabilities[:4].gather(1, TARGETS[:, None])[:, 0]
    grey_score = probabilities[4:].gather(1, TARGETS[:, None])[:, 0]
    maps = torch.rand(4, 8, 8)
    deletion = perturbation_curves(linear, IMAGES, maps, TARGETS, batch_size=5)
    insertion = perturbation_curves(linear, IMAGES, maps, TARGETS, mode="insertion", batch_size=7)
    torch.testing.assert_close(deletion[:, 0], image_score)
    torch.testing.assert_close(deletion[:, -1], grey_score)
    torch.testing.assert_close(insertion[:, 0], grey_score)
    torch.testing.assert_close(insertion[:, -1], image_score)


def test_area_under_curve_and_ranks():
    torch.testing.assert_close(area_under_curve([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([0.5, 1.0]).double())
    torch.testing.assert_close(area_under_curve([[0.0, 1.0, 0.0]]), torch.tensor([0.5]).double())
    ranks = pixel_order(torch.tensor([[[0.1, 0.9], [0.5, -1.0]]]), "most")
    assert ranks.tolist() == [[2, 0, 1, 3]]
    maps = torch.randn(3, 5, 5)
    torch.testing.assert_close(rank_correlation(maps, 2 * maps + 1), torch.ones(3).double())
    torch.testing.assert_close(rank_correlation(maps, -maps), -torch.ones(3).double())
    with pytest.raises(ValueError, match="order must be 'most', 'least' or 'random'"):
        pixel_order(maps, "largest")


def test_randomising_the_top_layers_changes_only_a_copy():
    source, _ = FAMILIES["resnet"]()
    before = {name: parameter.clone() for name, parameter in source.named_parameters()}
    randomised, names = randomise_top_layers(source, share=0.25)
    assert names[-1] == "classifier.1" and len(names) >= 2
    assert all(torch.equal(parameter, before[name]) for name, parameter in source.named_parameters())
    changed = {name for name, parameter in randomised.named_parameters() if not torch.equal(parameter, before[name])}
    assert changed and all(any(name.startswith(layer + ".") for layer in names) for name in changed)


@pytest.fixture(scope="module")
def bcos_resnet():
    source, processor = FAMILIES["resnet"]()
    return convert(randomise(source), image_processor=processor, b=2.0).model.eval()


def test_faithfulness_scores_every_method_and_the_randomisation_check_sees_the_change(bcos_resnet):
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    results = faithfulness(
        bcos_resnet,
        (images, torch.zeros(6, dtype=torch.long)),
        ("bcos", "ixg", "random"),
        steps=4,
        randomised_share=0.5,
        batch_size=4,
        progress=False,
    )
    assert set(results) == {"bcos", "ixg", "random"}
    for by_metric in results.values():
        assert set(by_metric) == {"deletion", "insertion", "randomisation"}
        assert all(summary.count == 6 for summary in by_metric.values())
        assert all(0 <= value <= 1 for value in by_metric["deletion"].values + by_metric["insertion"].values)
    assert results["bcos"]["randomisation"].mean < 0.9  # the explanation follows the model
    assert abs(results["random"]["randomisation"].mean) < 0.2  # two random maps: unrelated
    again = faithfulness(
        bcos_resnet,
        (images, torch.zeros(6, dtype=torch.long)),
        ("bcos",),
        metrics=("deletion",),
        steps=4,
        batch_size=4,
        progress=False,
    )
    assert again["bcos"]["deletion"].values == results["bcos"]["deletion"].values
    assert all(parameter.grad is None for parameter in bcos_resnet.parameters())
    with pytest.raises(ValueError, match="Unknown faithfulness metrics"):
        faithfulness(bcos_resnet, (images, torch.zeros(6, dtype=torch.long)), metrics=("road",))


def test_randomised_model_explanations_differ_from_the_trained_ones(bcos_resnet):
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    targets = torch.tensor([0, 1])
    randomised, _ = randomise_top_layers(bcos_resnet, 0.5)
    bcos = get_attribution("bcos")
    assert not torch.allclose(bcos(bcos_resnet, images, targets), bcos(randomised, images, targets))
