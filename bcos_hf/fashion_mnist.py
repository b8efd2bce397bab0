"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist``, offline, as a ``datasets.Dataset``.

A loader for this project's experiments and tests, outside the core import path (``import bcos_hf`` does not
load it): it reads the IDX files from a folder (``root``, by default where the Debian package puts them) and
says how to install them when they are missing.
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
from PIL import Image

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where the Debian package ``dataset-fashion-mnist`` puts the IDX files."""

FASHION_MNIST_LABELS = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]


def _read_idx(path: Path, header: int) -> np.ndarray:
    with gzip.open(path, "rb") as handle:
        return np.frombuffer(handle.read(), dtype=np.uint8, offset=header)


def fashion_mnist_available(root: str | Path = FASHION_MNIST_DIR) -> bool:
    return (Path(root) / "t10k-labels-idx1-ubyte.gz").is_file()


def load_fashion_mnist(split: str = "train", limit: int | None = None, root: str | Path = FASHION_MNIST_DIR):
    """Fashion-MNIST (28 x 28 grey, 10 classes) as a ``datasets.Dataset`` with ``image`` and ``label`` columns.

    Reads the IDX files of the Debian package ``dataset-fashion-mnist`` (``apt-get install
    dataset-fashion-mnist``). ``split`` is ``"train"`` (60k) or ``"test"`` (10k); ``limit`` keeps the first
    images, a class-balanced subset in practice (the files are shuffled).
    """
    import datasets

    root = Path(root)
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}.")
    if not fashion_mnist_available(root):
        raise FileNotFoundError(
            f"Fashion-MNIST is not in {root}. On Debian/Ubuntu: apt-get install dataset-fashion-mnist "
            "(or pass root=<folder with the IDX .gz files>)."
        )
    images = _read_idx(root / f"{prefix}-images-idx3-ubyte.gz", 16).reshape(-1, 28, 28)
    labels = _read_idx(root / f"{prefix}-labels-idx1-ubyte.gz", 8)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=FASHION_MNIST_LABELS)})
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(image, mode="L") for image in images], "label": labels.tolist()},
        features=features,
    )
