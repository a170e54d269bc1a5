"""Augmentation beyond Inception's crops and flips, drawn as a pure function of the
seed and the position in training, so that a resumed run augments exactly as an
uninterrupted one:

- per image: torchvision's RandAugment or TrivialAugmentWide (run under a forked RNG
  seeded from the sample's own generator) and random erasing;
- per batch: mixup and cutmix, from a generator of (seed, epoch, batch, micro-batch, rank).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

AutoAugment = Literal["none", "randaugment", "trivialaugment"]
ERASE_AREA = (0.02, 1 / 3)  # share of the image an erased rectangle covers (Zhong et al.)
ERASE_ASPECT = (0.3, 1 / 0.3)


@dataclass(frozen=True)
class Augmentation:
    """The per-image augmentation of a training split."""

    auto_augment: AutoAugment = "none"
    random_erasing: float = 0.0  # probability


NO_AUGMENTATION = Augmentation()


def _policy(kind: AutoAugment):
    from torchvision.transforms import v2

    return v2.RandAugment() if kind == "randaugment" else v2.TrivialAugmentWide()


def auto_augment(image: Image.Image, kind: AutoAugment, generator: torch.Generator) -> Image.Image:
    """torchvision's policy, its draws taken from a global RNG forked and seeded from
    ``generator`` (the policies accept no generator of their own)."""
    if kind == "none":
        return image
    seed = int(torch.randint(0, 2**62, (), generator=generator))
    with torch.random.fork_rng(devices=[]):  # restores the CPU generator; GPUs untouched
        torch.default_generator.manual_seed(seed)
        return _policy(kind)(image)


def erase(image: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Random erasing (Zhong et al., 2020): with ``probability``, a rectangle covering 2-33%
    of the uint8 CHW image, of aspect 0.3-3.3, filled with uniform noise."""
    if probability == 0 or float(torch.rand((), generator=generator)) >= probability:
        return image
    _, height, width = image.shape
    for _ in range(10):
        area = height * width * _between(generator, *ERASE_AREA)
        aspect = math.exp(_between(generator, *map(math.log, ERASE_ASPECT)))
        h, w = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
        if 0 < h < height and 0 < w < width:
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            image = image.clone()
            noise = torch.randint(0, 256, (image.shape[0], h, w), generator=generator)
            image[:, top : top + h, left : left + w] = noise.to(image.dtype)
            return image
    return image


def _between(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def mix_batch(
    x: torch.Tensor,
    targets: torch.Tensor,
    num_classes: int,
    mixup: float,
    cutmix: float,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup (Zhang et al., 2018) or cutmix (Yun et al., 2019) of a normalised batch with
    a permutation of itself; targets become the same mixture of (one-hot) labels. With both
    on, each batch takes one of them with even odds (timm's convention)."""
    use_cutmix = cutmix > 0 and (mixup == 0 or rng.random() < 0.5)
    lam = float(rng.beta(cutmix, cutmix) if use_cutmix else rng.beta(mixup, mixup))
    order = torch.from_numpy(rng.permutation(x.shape[0])).to(x.device)
    soft = targets if targets.is_floating_point() else F.one_hot(targets, num_classes)
    soft = soft.float()
    if use_cutmix:
        height, width = x.shape[-2:]
        h, w = round(height * math.sqrt(1 - lam)), round(width * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(height)), int(rng.integers(width))
        top, bottom = max(cy - h // 2, 0), min(cy + (h - h // 2), height)
        left, right = max(cx - w // 2, 0), min(cx + (w - w // 2), width)
        x = x.clone()
        x[..., top:bottom, left:right] = x[order][..., top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (height * width)  # the pasted share
    else:
        x = lam * x + (1 - lam) * x[order]
    return x, lam * soft + (1 - lam) * soft[order]
