"""Shared test setup: Keras (a test-only reference) runs on its torch backend, and a small
image folder (3 classes told apart by colour, so a few steps learn something)."""

import os

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("KERAS_BACKEND", "torch")
# Tests of eval and predict run PyTorch unless they ask for onnxruntime: exporting every
# weights file a test trains would cost seconds each (tests/test_inference.py covers auto).
os.environ.setdefault("XCEPTION_BACKEND", "torch")


def write_folder(root, per_class=(16, 6), size=(80, 76)):
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class, strict=True):
        for c, name in enumerate(("red", "green", "blue")):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 120, (*size[::-1], 3), np.uint8)
                pixels[..., c] += 120
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp("images"))
