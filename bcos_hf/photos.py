"""Natural photos offline: the Tux Paint stamps (Debian ``tuxpaint-stamps-default``) as labelled images.

The package installs about 800 PNG stamps with alpha in category folders (``animals/birds``,
``food/fruit``, ``vehicles/auto``, ...). Most stamps outside the ``cartoon``, ``symbols`` and
``alphabets`` folders are real photos of single objects, many of ImageNet classes, which makes them a real,
installable probe set for pretrained vision models where no dataset can be downloaded.

Which stamps are photos. A stamp is a *photo* when it lies outside those drawing folders and a measured
statistic agrees: on a copy downsized with nearest-neighbour sampling (no new colours) to at most
``STATISTIC_SIDE`` pixels, over the opaque pixels (alpha >= 128),

- fewer than ``PHOTO_MAX_FLAT`` (50 %) of the horizontally or vertically adjacent pixel pairs have exactly
  the same colour (drawings and clip art are made of flat regions; photos have sensor noise and texture,
  even the stamps saved with a 256-colour palette), and
- there are at least ``PHOTO_MIN_COLOURS`` (64) distinct colours (silhouettes, tinting masks and
  few-colour icons fall out), and at least ``PHOTO_MIN_PIXELS`` opaque pixels.

Chosen by looking at all 802 stamps against their statistic: photos mostly have under 10 % identical pairs,
photos saved with a palette (the flowers, a husky, a rhino) 10-45 %, flat drawings (t-shirts, flags, road
signs, dreidels, hats) 45-100 %, silhouettes one colour. The rule keeps 374 photos. It lets through some
shaded vector drawings (Easter chicks and bunnies, a few road signs, a mug): nearly all lie in folders that no
probe category uses. Tux Paint ships some stamps twice, flipped (``*_mirror.png``): the copy is dropped, so
one object cannot sit on both sides of a probe split.

Categories come from the folder path only (``category_of``, ``CATEGORY_RULES``): e.g. ``animals/mammals``
-> "mammal", ``animals/mammals/bovines`` -> "hoofed mammal", ``food/fruit`` -> "fruit", ``vehicles/*`` ->
"vehicle". ``PHOTO_CATEGORIES`` are twelve object categories with at least 11 photos each, 284 photos in
all (``photo_category_counts`` counts them).

Keep this module out of ``bcos_hf/__init__.py``: it is an optional loader for experiments and tests.
"""

from __future__ import annotations

import functools
import zlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image

TUXPAINT_STAMPS_DIR = Path("/usr/share/tuxpaint/stamps")
INSTALL_HINT = "install it with `apt-get install -y tuxpaint-stamps-default` (Debian package, about 160 MB)"

DRAWING_FOLDERS = frozenset({"cartoon", "symbols", "alphabets"})
"""Folder names whose stamps are drawings or clip art whatever the statistic says."""

STATISTIC_SIDE = 128
PHOTO_MAX_FLAT = 0.5
PHOTO_MIN_COLOURS = 64
PHOTO_MIN_PIXELS = 200

Kind = Literal["photo", "drawing"]

CATEGORY_RULES: tuple[tuple[str, str | None], ...] = (
    # Most specific prefix first; the first match wins. Drawing folders (``cartoon``) are skipped when
    # matching, so a drawing of a fruit is a "fruit" drawing. ``None`` keeps a folder out of every category.
    ("animals/mammals/bears/toys", None),  # a teddy bear is a toy, not a mammal
    ("animals/mammals/aquatic", "water animal"),
    ("animals/mammals/bovines", "hoofed mammal"),
    ("animals/mammals/camel", "hoofed mammal"),
    ("animals/mammals/deer", "hoofed mammal"),
    ("animals/mammals/equines", "hoofed mammal"),
    ("animals/mammals", "mammal"),
    ("animals/marsupials", "mammal"),
    ("animals/birds", "bird"),
    ("animals/fish", "water animal"),
    ("animals/shellfish", "water animal"),
    ("animals/insects", "small animal"),
    ("animals/amphibians", "small animal"),
    ("animals/lizards", "small animal"),
    ("food/fruit", "fruit"),
    ("food/nuts", "fruit"),
    ("food/vegetables", "vegetable"),
    ("food/spices", "vegetable"),
    ("plants/mushrooms", "vegetable"),
    ("plants/flowers", "flower"),
    ("plants", "plant"),
    ("military/vehicles", "vehicle"),
    ("vehicles", "vehicle"),
    ("household", "household object"),
    ("hobbies", "hobby or sport"),  # musical instruments, a camera, binoculars
    ("sports", "hobby or sport"),
    ("space", "space object"),
    ("seasonal", "holiday item"),
    ("clothes", "clothing"),
    ("town", "town"),
)

PHOTO_CATEGORIES: tuple[str, ...] = (
    "mammal",
    "hoofed mammal",
    "bird",
    "water animal",
    "small animal",
    "fruit",
    "vegetable",
    "flower",
    "plant",
    "vehicle",
    "household object",
    "hobby or sport",
)
"""The twelve probe classes (284 photos): object categories of ``CATEGORY_RULES`` with 11 to 35 photos each.

Counts: mammal 34, hoofed mammal 26, bird 35, water animal 18, small animal 11, fruit 30, vegetable 22,
flower 25, plant 11, vehicle 20, household object 30, hobby or sport 22 (musical instruments merged in, 11
alone). Left out: "holiday item" (``seasonal``, 43: graves, turkeys, candles, and shaded drawings the
statistic passes) and "town" (14, mostly road-sign drawings that pass), which are folders rather than kinds
of object; "space object" (14 planets, moons and spacecraft), the thirteenth, to keep twelve; "clothing" (5).
Pass any of them in ``categories`` to use them anyway.
"""


@dataclass(frozen=True)
class Stamp:
    """One stamp: its PNG, its category (``None`` outside the scheme) and whether it is a photo."""

    path: Path
    category: str | None
    kind: Kind


def tuxpaint_available(root: str | Path = TUXPAINT_STAMPS_DIR) -> bool:
    """Whether the Tux Paint stamps are installed under ``root``."""
    root = Path(root)
    return root.is_dir() and next(root.rglob("*.png"), None) is not None


def _require_stamps(root: Path) -> None:
    if not tuxpaint_available(root):
        raise FileNotFoundError(f"No Tux Paint stamps (PNG files) under {root}: {INSTALL_HINT}.")


def category_of(relative: str | Path) -> str | None:
    """The category of a stamp from its path relative to the stamps folder (``CATEGORY_RULES``), or None."""
    folders = [part for part in Path(relative).parts[:-1] if part != "cartoon"]
    for prefix, category in CATEGORY_RULES:
        prefix_parts = prefix.split("/")
        if folders[: len(prefix_parts)] == prefix_parts:
            return category
    return None


def photo_statistics(image: Image.Image) -> tuple[float, int, int]:
    """(share of adjacent opaque pixel pairs with identical colour, distinct colours, opaque pixels).

    Measured on a nearest-neighbour copy at most ``STATISTIC_SIDE`` pixels wide, so no resampling invents
    colours and large stamps cost no more than small ones.
    """
    rgba = image.convert("RGBA")
    scale = STATISTIC_SIDE / max(rgba.size)
    if scale < 1:
        rgba = rgba.resize(
            (max(1, round(rgba.width * scale)), max(1, round(rgba.height * scale))), Image.Resampling.NEAREST
        )
    pixels = np.asarray(rgba)
    opaque = pixels[..., 3] >= 128
    colours = pixels[..., :3].astype(np.int32)
    packed = (colours[..., 0] << 16) | (colours[..., 1] << 8) | colours[..., 2]
    pairs = same = 0
    for a, b, ok_a, ok_b in (
        (packed[:, 1:], packed[:, :-1], opaque[:, 1:], opaque[:, :-1]),
        (packed[1:], packed[:-1], opaque[1:], opaque[:-1]),
    ):
        both = ok_a & ok_b
        pairs += int(both.sum())
        same += int((both & (a == b)).sum())
    flat = same / pairs if pairs else 1.0
    return flat, len(np.unique(packed[opaque])), int(opaque.sum())


def looks_like_photo(image: Image.Image) -> bool:
    """The measured half of the photo rule (module docstring): textured, many colours, not tiny."""
    flat, distinct, opaque = photo_statistics(image)
    return flat < PHOTO_MAX_FLAT and distinct >= PHOTO_MIN_COLOURS and opaque >= PHOTO_MIN_PIXELS


@functools.lru_cache(maxsize=4)
def _all_stamps(root: Path) -> tuple[Stamp, ...]:
    _require_stamps(root)
    stamps = []
    for path in sorted(root.rglob("*.png")):
        if path.stem.endswith("_mirror") and path.with_name(path.name.replace("_mirror.png", ".png")).is_file():
            continue  # Tux Paint ships some stamps twice, flipped: a duplicate would leak across probe splits
        relative = path.relative_to(root)
        in_drawing_folder = any(part in DRAWING_FOLDERS for part in relative.parts[:-1])
        with Image.open(path) as image:
            photo = not in_drawing_folder and looks_like_photo(image)
        stamps.append(Stamp(path=path, category=category_of(relative), kind="photo" if photo else "drawing"))
    return tuple(stamps)


def list_stamps(
    root: str | Path = TUXPAINT_STAMPS_DIR, kind: Literal["photo", "drawing", "all"] = "photo"
) -> list[Stamp]:
    """The stamps of one kind, sorted by path; FileNotFoundError saying how to install them when absent."""
    if kind not in ("photo", "drawing", "all"):
        raise ValueError(f"kind must be 'photo', 'drawing' or 'all', got {kind!r}.")
    stamps = _all_stamps(Path(root).resolve())
    return [stamp for stamp in stamps if kind == "all" or stamp.kind == kind]


def photo_category_counts(root: str | Path = TUXPAINT_STAMPS_DIR) -> dict[str, int]:
    """Photos per category over the whole scheme (``CATEGORY_RULES``), largest first; unmapped under None."""
    counts = Counter(stamp.category for stamp in list_stamps(root, kind="photo"))
    return dict(counts.most_common())


Background = Literal["colour", "grey", "texture", "photo"] | tuple[int, int, int] | Image.Image
"""What ``composite`` puts behind a stamp: a random uniform colour or grey level, a random tinted crop of one
of scikit-image's bundled textures (brick, grass, gravel), a random crop of a natural photo (``scenery``), one
given colour, or a random crop of a given image."""

SCENERY_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "motorcycle_left", "immunohistochemistry")
SCENERY_FOLDERS = (Path("/usr/share/backgrounds"),)
"""Natural photos on the machine: scikit-image's bundled colour photos and, when the Debian package
``gnome-backgrounds`` is installed, its large landscape photos."""

TEXTURES = ("brick", "grass", "gravel")


@functools.lru_cache(maxsize=1)
def _textures() -> tuple[np.ndarray, ...]:
    try:
        from skimage import data
    except ImportError as missing:
        raise ImportError(
            'background="texture" crops scikit-image\'s bundled textures: install it with `pip install scikit-image`, '
            'or use background="colour".'
        ) from missing
    return tuple(np.asarray(getattr(data, name)(), dtype=np.float32) / 255.0 for name in TEXTURES)


@functools.lru_cache(maxsize=4)
def scenery(skip: tuple[str, ...] = ()) -> tuple[Image.Image, ...]:
    """The natural photos available offline (``SCENERY_PHOTOS``, ``SCENERY_FOLDERS``), at most 1024 px a side;
    ``skip`` names scikit-image photos to leave out (e.g. the ones a demo then predicts)."""
    photos = []
    try:
        from skimage import data
    except ImportError:
        data = None
    for name in SCENERY_PHOTOS if data is not None else ():
        if name in skip:
            continue
        try:
            pixels = np.asarray(getattr(data, name)())
        except Exception:  # some scikit-image photos need the network: skip them
            continue
        if pixels.ndim == 3:
            photos.append(Image.fromarray(pixels[..., :3]))
    for folder in SCENERY_FOLDERS:
        for path in sorted(folder.rglob("*")) if folder.is_dir() else ():
            if path.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp"}:
                with Image.open(path) as image:
                    image.draft("RGB", (1024, 1024))
                    photo = image.convert("RGB")
                photo.thumbnail((1024, 1024))
                photos.append(photo)
    if not photos:
        raise FileNotFoundError(
            'background="photo" crops natural photos: install scikit-image (`pip install scikit-image`) or the '
            'Debian package gnome-backgrounds, or use background="texture".'
        )
    return tuple(photos)


def _random_crop(image: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """A random square crop (half to all of the short side) of ``image``, resized to ``size``."""
    short = min(image.size)
    side = int(rng.integers(max(1, short // 2), short + 1))
    left = int(rng.integers(0, image.width - side + 1))
    top = int(rng.integers(0, image.height - side + 1))
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BILINEAR)


def make_background(background: Background, size: int, rng: np.random.Generator) -> Image.Image:
    """An RGB ``size`` x ``size`` background drawn with ``rng`` (``Background`` lists the choices)."""
    if isinstance(background, Image.Image):
        return _random_crop(background.convert("RGB"), size, rng)
    if isinstance(background, tuple):
        if len(background) != 3 or not all(isinstance(v, int) and 0 <= v <= 255 for v in background):
            raise ValueError(f"A colour background must be three integers in 0..255, got {background!r}.")
        return Image.new("RGB", (size, size), background)
    if background == "colour":
        return Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(0, 256, size=3)))
    if background == "grey":
        return Image.new("RGB", (size, size), (int(rng.integers(0, 256)),) * 3)
    if background == "texture":
        textures = _textures()
        texture = textures[int(rng.integers(len(textures)))]
        tint = rng.uniform(0.25, 1.0, size=3).astype(np.float32)
        pixels = np.clip(texture[..., None] * tint * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return _random_crop(Image.fromarray(pixels, "RGB"), size, rng)
    if background == "photo":
        photos = scenery()
        return _random_crop(photos[int(rng.integers(len(photos)))], size, rng)
    raise ValueError(
        'background must be "colour", "grey", "texture", "photo", an (r, g, b) tuple or a PIL image, '
        f"got {background!r}."
    )


def composite(
    image_rgba: Image.Image,
    background: Background = "colour",
    size: int = 112,
    rng: np.random.Generator | None = None,
    *,
    fill: float = 0.85,
    jitter: bool = False,
) -> Image.Image:
    """Paste a stamp on a background: an RGB ``size`` x ``size`` image whose longer object side is ``fill``.

    The stamp is cropped to its non-transparent pixels and resized keeping its aspect ratio (Pillow
    premultiplies alpha, so edges do not pick up the stamp's hidden colours). It is centred, or placed at a
    random position inside the square with ``jitter``. Everything random comes from ``rng``, so a seeded
    generator gives the same image every time.
    """
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}.")
    if not 0.0 < fill <= 1.0:
        raise ValueError(f"fill is the share of the square the object's longer side covers: in (0, 1], got {fill}.")
    rng = np.random.default_rng(0) if rng is None else rng
    stamp = image_rgba.convert("RGBA")
    box = stamp.getchannel("A").getbbox()
    if box is None:
        raise ValueError("The stamp is fully transparent: there is no object to composite.")
    stamp = stamp.crop(box)
    scale = fill * size / max(stamp.size)
    width, height = (min(size, max(1, round(side * scale))) for side in stamp.size)
    stamp = stamp.resize((width, height), Image.Resampling.LANCZOS)
    canvas = make_background(background, size, rng).convert("RGBA")
    if jitter:
        offset = (int(rng.integers(0, size - width + 1)), int(rng.integers(0, size - height + 1)))
    else:
        offset = ((size - width) // 2, (size - height) // 2)
    layer = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    layer.paste(stamp, offset)
    return Image.alpha_composite(canvas, layer).convert("RGB")


def _stamp_rng(seed: int, stamp: Stamp, variant: int = 0) -> np.random.Generator:
    """One generator per (seed, stamp, variant): an image does not change when other stamps are selected."""
    key = zlib.crc32("/".join(stamp.path.parts[-4:]).encode("utf-8"))
    return np.random.default_rng([seed, key, variant])


def _check_categories(categories: Iterable[str]) -> list[str]:
    names = list(categories)
    known = {category for _, category in CATEGORY_RULES if category is not None}
    unknown = [name for name in names if name not in known]
    if unknown or not names or len(set(names)) != len(names):
        raise ValueError(
            f"categories must be distinct names from CATEGORY_RULES ({', '.join(sorted(known))}); got {names!r}."
        )
    return names


def load_photo_dataset(
    size: int = 112,
    kind: Literal["photo", "drawing"] = "photo",
    categories: Sequence[str] = PHOTO_CATEGORIES,
    seed: int = 0,
    root: str | Path = TUXPAINT_STAMPS_DIR,
    background: Background = "colour",
):
    """One composited image per stamp of ``categories``: a ``datasets.Dataset`` with ``image`` and ``label``.

    ``label`` is a ``ClassLabel`` over ``categories`` in the order given. ``kind="drawing"`` gives the
    drawings of the same categories instead (e.g. ``food/fruit/cartoon``), for a photo-to-drawing shift.
    Deterministic given ``seed``.
    """
    import datasets

    if kind not in ("photo", "drawing"):
        raise ValueError(f"kind must be 'photo' or 'drawing', got {kind!r}.")
    names = _check_categories(categories)
    stamps = [stamp for stamp in list_stamps(root, kind=kind) if stamp.category in names]
    if not stamps:
        raise ValueError(f"No {kind} stamps in the categories {names!r} under {root}.")
    images = []
    for stamp in stamps:
        with Image.open(stamp.path) as image:
            images.append(composite(image, background, size, _stamp_rng(seed, stamp)))
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    labels = [names.index(stamp.category) for stamp in stamps]
    return datasets.Dataset.from_dict({"image": images, "label": labels}, features=features)


def unlabelled_stamps(
    root: str | Path = TUXPAINT_STAMPS_DIR,
    categories: Sequence[str] = PHOTO_CATEGORIES,
    exclude_photo_categories: bool = True,
) -> list[Stamp]:
    """The stamps ``load_unlabelled_images`` uses: never a probe photo (a photo of ``categories``).

    With ``exclude_photo_categories`` (the default) the drawings of those categories are left out too, so
    label-free training sees no object of a probe class; without it only the probe photos themselves are.
    """
    names = set(_check_categories(categories))
    return [
        stamp
        for stamp in list_stamps(root, kind="all")
        if stamp.category not in names or (stamp.kind == "drawing" and not exclude_photo_categories)
    ]


class UnlabelledImages:
    """An endless supply of label-free training images, made on demand: item ``i`` is variant ``i // n`` of
    stamp ``i % n`` (``unlabelled_stamps``), composited on a random ``background`` at a random size (55-95 %
    of the square) and position, flipped half the time.

    A map-style dataset (``len``, ``[i]`` -> ``{"image": PIL image}``) that the ``Trainer`` takes as it is;
    ``variants`` sets its length. Deterministic given ``seed``; stamps are decoded once and kept at most
    ``2 * size`` pixels a side.
    """

    def __init__(
        self,
        size: int = 112,
        seed: int = 0,
        variants: int = 1,
        exclude_photo_categories: bool = True,
        background: Background = "colour",
        root: str | Path = TUXPAINT_STAMPS_DIR,
        categories: Sequence[str] = PHOTO_CATEGORIES,
    ) -> None:
        if variants < 1:
            raise ValueError(f"variants is the number of composites per stamp: at least 1, got {variants}.")
        self.size, self.seed, self.variants, self.background = size, seed, variants, background
        self.stamps = unlabelled_stamps(root, categories, exclude_photo_categories)
        self._decoded: dict[int, Image.Image] = {}

    def __len__(self) -> int:
        return len(self.stamps) * self.variants

    def _stamp_image(self, index: int) -> Image.Image:
        if index not in self._decoded:
            with Image.open(self.stamps[index].path) as image:
                stamp = image.convert("RGBA")
            stamp.thumbnail((2 * self.size, 2 * self.size), Image.Resampling.LANCZOS)
            self._decoded[index] = stamp
        return self._decoded[index]

    def image(self, index: int) -> Image.Image:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} unlabelled images.")
        stamp_index, variant = index % len(self.stamps), index // len(self.stamps)
        rng = _stamp_rng(self.seed, self.stamps[stamp_index], variant + 1)  # variant 0: the probe composite's stream
        fill = float(rng.uniform(0.55, 0.95))
        picture = composite(self._stamp_image(stamp_index), self.background, self.size, rng, fill=fill, jitter=True)
        return picture.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else picture

    def __getitem__(self, index: int) -> dict[str, Image.Image]:
        return {"image": self.image(index)}


def load_unlabelled_images(
    size: int = 112,
    seed: int = 0,
    exclude_photo_categories: bool = True,
    variants: int = 1,
    root: str | Path = TUXPAINT_STAMPS_DIR,
    categories: Sequence[str] = PHOTO_CATEGORIES,
    background: Background = "colour",
) -> list[Image.Image]:
    """``variants`` random composites of every ``unlabelled_stamps`` stamp, for label-free training, as a list
    (``UnlabelledImages`` makes them; ordered variant by variant)."""
    images = UnlabelledImages(size, seed, variants, exclude_photo_categories, background, root, categories)
    return [images.image(index) for index in range(len(images))]
