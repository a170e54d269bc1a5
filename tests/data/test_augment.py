"""Augmentation: RandAugment/TrivialAugment, random erasing, mixup and cutmix, each a pure
function of its generator (so resumed runs draw the same)."""

import numpy as np
import pytest
import torch
from PIL import Image

from xception.data.augment import Augmentation, auto_augment, erase, mix_batch
from xception.data.transforms import Preprocessing, sample_generator, train_transform


def photo(seed=0, size=(64, 48)):
    pixels = np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3), np.uint8)
    return Image.fromarray(pixels)


@pytest.mark.parametrize("kind", ["randaugment", "trivialaugment"])
def test_policies_repeat_for_a_generator_and_vary_across_samples(kind):
    outputs = [
        np.asarray(auto_augment(photo(), kind, sample_generator(3, epoch, index)))
        for epoch, index in ((0, 0), (0, 0), (0, 1), (1, 0))
    ]
    assert np.array_equal(outputs[0], outputs[1])
    assert not np.array_equal(outputs[0], outputs[2]) or not np.array_equal(outputs[0], outputs[3])
    state = torch.get_rng_state()
    auto_augment(photo(), kind, sample_generator(3, 0, 0))
    assert torch.equal(state, torch.get_rng_state())  # the global RNG (dropout's) untouched


def test_random_erasing_fills_one_rectangle_with_noise():
    image = torch.full((3, 40, 50), 7, dtype=torch.uint8)
    erased = [erase(image, 1.0, sample_generator(0, 0, i)) for i in range(20)]
    assert torch.equal(image, erase(image, 0.0, sample_generator(0, 0, 0)))
    for out in erased:
        changed = (out != image).any(0)
        rows, cols = changed.any(1).nonzero(), changed.any(0).nonzero()
        if rows.numel():  # a bounding box covering 2-33% of the image, all of it noise
            area = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            assert 0.015 * 2000 <= area <= 0.36 * 2000  # 2-33%, rounded to pixels
    assert sum(bool((out != image).any()) for out in erased) >= 18


def test_the_train_transform_applies_the_augmentation_and_repeats():
    pre = Preprocessing(image_size=32)
    augmentation = Augmentation("randaugment", 1.0)
    a = train_transform(photo(), pre, sample_generator(1, 2, 3), augmentation)
    b = train_transform(photo(), pre, sample_generator(1, 2, 3), augmentation)
    plain = train_transform(photo(), pre, sample_generator(1, 2, 3))
    assert a.shape == (3, 32, 32) and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, plain)


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.2, 0.0), (0.0, 1.0), (0.4, 1.0)])
def test_mixing_keeps_targets_a_distribution_matching_the_pixels(mixup, cutmix):
    x = torch.arange(4, dtype=torch.float32).view(4, 1, 1, 1).expand(4, 3, 8, 8).contiguous()
    y = torch.tensor([0, 1, 2, 3])
    for seed in range(5):
        mixed, soft = mix_batch(x, y, 5, mixup, cutmix, np.random.default_rng(seed))
        assert mixed.shape == x.shape and soft.shape == (4, 5)
        torch.testing.assert_close(soft.sum(1), torch.ones(4))
        # each image's pixels are its targets' mixture of the (constant) source images
        expected = soft @ torch.arange(5, dtype=torch.float32)
        torch.testing.assert_close(mixed.mean((1, 2, 3)), expected)
    again = mix_batch(x, y, 5, mixup, cutmix, np.random.default_rng(0))
    first = mix_batch(x, y, 5, mixup, cutmix, np.random.default_rng(0))
    assert all(torch.equal(a, b) for a, b in zip(again, first, strict=True))
