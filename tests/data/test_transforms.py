"""Augmentation is a pure function of (seed, epoch, index); evaluation crops the centre."""

import numpy as np
import torch
from PIL import Image

from xception.data.transforms import (
    Preprocessing,
    eval_transform,
    normalize,
    random_crop_box,
    sample_generator,
    train_transform,
)


def image(w=120, h=90):
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), np.uint8))


def test_train_transform_depends_only_on_seed_epoch_and_index():
    pre = Preprocessing(image_size=32)
    first = train_transform(image(), pre, sample_generator(1, 2, 3))
    again = train_transform(image(), pre, sample_generator(1, 2, 3))
    other = train_transform(image(), pre, sample_generator(1, 3, 3))
    assert first.dtype == torch.uint8 and first.shape == (3, 32, 32)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_random_crop_box_respects_area_and_aspect():
    for i in range(200):
        left, top, right, bottom = random_crop_box(120, 90, 0.25, sample_generator(0, 0, i))
        w, h = right - left, bottom - top
        assert 0 <= left < right <= 120 and 0 <= top < bottom <= 90
        assert w * h >= 0.25 * 120 * 90 * 0.95
        assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1 or w == h  # (centre-square fallback)


def test_eval_transform_takes_the_central_crop():
    source = Image.new("RGB", (100, 100), (0, 0, 0))
    source.paste((255, 255, 255), (25, 25, 75, 75))  # white centre square, half the side
    pre = Preprocessing(image_size=50, crop_pct=0.5, interpolation="bilinear")
    out = eval_transform(source, pre)
    assert out.shape == (3, 50, 50) and out.float().mean() > 250  # only the centre is kept


def test_normalize_maps_pixels_to_minus_one_one():
    pixels = torch.tensor([0, 127.5, 255]).view(1, 3, 1, 1).expand(1, 3, 2, 2)
    out = normalize(pixels.to(torch.uint8), Preprocessing(), torch.float32)
    expected = pixels.to(torch.uint8).float() / 127.5 - 1
    torch.testing.assert_close(out, expected)
