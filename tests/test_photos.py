"""The offline photo loader (bcos_hf.photos) on Tux Paint's real stamps: categories, splits, determinism."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from bcos_hf import photos
from bcos_hf.photos import PHOTO_CATEGORIES

from .assets import needs_stamps

CATEGORY_FLOOR = 10
"""Every probe category has at least this many photos (the smallest have 11: small animal, plant)."""


def _stamp(width: int = 40, height: int = 20, margin: int = 10) -> Image.Image:
    """A red rectangle on a transparent canvas with ``margin`` pixels of nothing around it."""
    image = Image.new("RGBA", (width + 2 * margin, height + 2 * margin), (0, 0, 0, 0))
    image.paste((255, 0, 0, 255), (margin, margin, margin + width, margin + height))
    return image


def test_missing_package_says_how_to_install_it(tmp_path):
    assert not photos.tuxpaint_available(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=r"apt-get install -y tuxpaint-stamps-default"):
        photos.list_stamps(root=tmp_path / "absent")


def test_category_mapping_follows_the_folders():
    assert photos.category_of("animals/mammals/cats/tiger.png") == "mammal"
    assert photos.category_of("animals/mammals/bovines/cow.png") == "hoofed mammal"
    assert photos.category_of("animals/mammals/aquatic/otter.png") == "water animal"
    assert photos.category_of("food/fruit/cartoon/apple.png") == "fruit"  # drawings keep their category
    assert photos.category_of("animals/mammals/bears/toys/edward_bear.png") is None
    assert photos.category_of("symbols/chess/king.png") is None
    assert set(PHOTO_CATEGORIES) <= {category for _, category in photos.CATEGORY_RULES}


def test_composite_fills_the_square_keeping_the_aspect_ratio():
    rng = np.random.default_rng(0)
    image = photos.composite(_stamp(), (0, 0, 255), size=64, rng=rng, fill=0.75)
    assert image.mode == "RGB" and image.size == (64, 64)
    pixels = np.asarray(image)
    red = (pixels[..., 0] > 200) & (pixels[..., 2] < 50)
    rows, columns = np.nonzero(red)
    assert abs((columns.max() - columns.min() + 1) - 48) <= 1  # the longer side is 75 % of 64
    assert abs((rows.max() - rows.min() + 1) - 24) <= 1  # aspect 2:1 kept
    assert tuple(pixels[0, 0]) == (0, 0, 255)  # the background shows around the object
    with pytest.raises(ValueError, match="transparent"):
        photos.composite(Image.new("RGBA", (8, 8)), "colour", 32, rng)
    with pytest.raises(ValueError, match="background must be"):
        photos.composite(_stamp(), "plaid", 32, rng)


def test_composite_is_deterministic_given_the_generator():
    for background in ("colour", "grey", "texture"):
        if background == "texture":
            pytest.importorskip("skimage", reason="textures are scikit-image's bundled images (pip install .[dev])")
        first = photos.composite(_stamp(), background, 32, np.random.default_rng(3), jitter=True)
        again = photos.composite(_stamp(), background, 32, np.random.default_rng(3), jitter=True)
        assert np.array_equal(np.asarray(first), np.asarray(again)), background


@needs_stamps
def test_every_probe_category_has_enough_photos():
    counts = photos.photo_category_counts()
    probe = {category: counts.get(category, 0) for category in PHOTO_CATEGORIES}
    assert len(probe) == 12
    assert min(probe.values()) >= CATEGORY_FLOOR, probe
    assert sum(probe.values()) >= 250, probe


@needs_stamps
def test_photos_and_drawings_split_the_stamps():
    everything = photos.list_stamps(kind="all")
    photo_stamps = photos.list_stamps(kind="photo")
    drawings = photos.list_stamps(kind="drawing")
    assert [stamp.path for stamp in everything] == sorted(stamp.path for stamp in everything)
    assert {s.path for s in photo_stamps}.isdisjoint(s.path for s in drawings)
    assert len(photo_stamps) + len(drawings) == len(everything)
    assert all(not photos.DRAWING_FOLDERS & set(stamp.path.parts) for stamp in photo_stamps)
    paths = {stamp.path for stamp in everything}
    assert not any(path.with_name(path.name.replace("_mirror.png", ".png")) in paths - {path} for path in paths)
    # The statistic also drops drawings that sit among photos, e.g. the silhouettes and tinting masks.
    by_name = {stamp.path.relative_to(photos.TUXPAINT_STAMPS_DIR).as_posix(): stamp.kind for stamp in everything}
    assert by_name["animals/mammals/echidna.png"] == "drawing"
    assert by_name["animals/mammals/cats/tiger.png"] == "photo"


@needs_stamps
def test_photo_dataset_is_labelled_rgb_and_deterministic():
    dataset = photos.load_photo_dataset(size=48, seed=0)
    assert dataset.column_names == ["image", "label"]
    assert dataset.features["label"].names == list(PHOTO_CATEGORIES)
    counts = photos.photo_category_counts()
    assert np.bincount(dataset["label"], minlength=12).tolist() == [counts[c] for c in PHOTO_CATEGORIES]
    first = dataset[0]["image"]
    assert first.mode == "RGB" and first.size == (48, 48)

    # Rows follow the sorted stamps; a stamp gets the same image whatever else is selected.
    stamps = [stamp for stamp in photos.list_stamps(kind="photo") if stamp.category in PHOTO_CATEGORIES]
    subset = [stamp for stamp in stamps if stamp.category in PHOTO_CATEGORIES[:3]]
    again = photos.load_photo_dataset(size=48, seed=0, categories=PHOTO_CATEGORIES[:3])
    assert len(again) == len(subset) and again.features["label"].names == list(PHOTO_CATEGORIES[:3])
    for row, stamp in zip(again, subset, strict=True):
        assert np.array_equal(np.asarray(row["image"]), np.asarray(dataset[stamps.index(stamp)]["image"]))
    other = photos.load_photo_dataset(size=48, seed=1, categories=PHOTO_CATEGORIES[:1])
    assert not np.array_equal(np.asarray(other[0]["image"]), np.asarray(first))
    with pytest.raises(ValueError, match="categories must be"):
        photos.load_photo_dataset(categories=["unicorn"])


@needs_stamps
def test_unlabelled_images_never_show_a_probe_photo():
    probe = {s.path for s in photos.list_stamps(kind="photo") if s.category in PHOTO_CATEGORIES}
    strict = photos.unlabelled_stamps()
    loose = photos.unlabelled_stamps(exclude_photo_categories=False)
    assert probe.isdisjoint(s.path for s in loose)
    assert all(stamp.category not in PHOTO_CATEGORIES for stamp in strict)
    assert {s.path for s in strict} < {s.path for s in loose}  # fruit drawings etc. only in the loose pool
    assert len(strict) >= 300

    images = photos.load_unlabelled_images(size=32, seed=0, variants=2)
    assert len(images) == 2 * len(strict)
    assert all(image.mode == "RGB" and image.size == (32, 32) for image in images)
    first, second = np.asarray(images[0]), np.asarray(images[len(strict)])  # two variants of one stamp
    assert not np.array_equal(first, second)
    again = photos.load_unlabelled_images(size=32, seed=0, variants=1)
    assert np.array_equal(np.asarray(again[5]), np.asarray(images[5]))
    lazy = photos.UnlabelledImages(size=32, seed=0, variants=2)
    assert len(lazy) == len(images) and np.array_equal(
        np.asarray(lazy[len(strict) + 3]["image"]), np.asarray(images[len(strict) + 3])
    )
