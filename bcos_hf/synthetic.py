"""A task whose answer is known by construction, to check attribution methods and the explanation metrics:
grey-noise images with one square of the class's colour at a random place.

Not imported by the library core: tests and ``examples/gridpg_synthetic.py`` use it.
"""

from __future__ import annotations

import torch

SQUARE_COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, 0.0, 0.0),
    "green": (0.0, 1.0, 0.0),
    "blue": (0.0, 0.0, 1.0),
    "yellow": (1.0, 1.0, 0.0),
    "cyan": (0.0, 1.0, 1.0),
    "magenta": (1.0, 0.0, 1.0),
    "white": (1.0, 1.0, 1.0),
    "black": (0.0, 0.0, 0.0),
    "orange": (1.0, 0.5, 0.0),
}


def coloured_squares(
    count: int, seed: int, num_classes: int = 4, size: int = 16, square: int = 5
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` grey-noise images with one square of the class's colour (``SQUARE_COLOURS``, first
    ``num_classes``) at a random place.

    Returns (images (count, 3, size, size) in [0, 1], labels (count,)).
    """
    generator = torch.Generator().manual_seed(seed)
    images = 0.3 + 0.4 * torch.rand(count, 3, size, size, generator=generator)
    labels = torch.randint(0, num_classes, (count,), generator=generator)
    corners = torch.randint(0, size - square + 1, (count, 2), generator=generator)
    colours = torch.tensor(list(SQUARE_COLOURS.values())[:num_classes])
    for image, label, (y, x) in zip(images, labels, corners.tolist(), strict=True):
        image[:, y : y + square, x : x + square] = colours[label][:, None, None]
    return images, labels
