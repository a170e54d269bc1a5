"""Inception-style preprocessing, with augmentation that is a pure function of
(seed, epoch, sample index): resuming mid-epoch, or changing the number of worker
processes or ranks, draws exactly the same crops and flips.

Images leave as uint8 CHW tensors (4x less to copy between processes); ``normalize``
scales them to [-1, 1] on the device, as the reference weights expect (x / 127.5 - 1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from PIL import Image

from xception.config import normalize as normalize_fields
from xception.data.augment import NO_AUGMENTATION, Augmentation, auto_augment, erase
from xception.data.folder import to_rgb

INTERPOLATIONS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}


@dataclass(frozen=True)
class Preprocessing:
    """How images reach the model; travels inside weight files' metadata."""

    image_size: int = 299
    crop_pct: float = 0.875  # eval: resize to image_size / crop_pct, then center-crop
    interpolation: Literal["bilinear", "bicubic"] = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # (x/255 - 0.5)/0.5 = x/127.5 - 1
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    min_crop_area: float = 0.08  # train: random-resized-crop area range [min, 1]

    def __post_init__(self) -> None:
        normalize_fields(self)
        if (
            self.image_size < 1
            or not 0 < self.crop_pct <= 1
            or not 0 < self.min_crop_area <= 1
            or min(self.std) <= 0
        ):
            raise ValueError(
                f"invalid preprocessing {self}: need image_size >= 1, "
                "0 < crop_pct <= 1, 0 < min_crop_area <= 1, std > 0"
            )


def sample_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator owned by one sample of one epoch."""
    mixed = (seed * 0x9E3779B1 + epoch * 0x85EBCA77 + index * 0xC2B2AE3D) % (2**63 - 1)
    return torch.Generator().manual_seed(mixed)


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def random_crop_box(
    width: int, height: int, min_area: float, generator: torch.Generator
) -> tuple[int, int, int, int]:
    """Inception's crop: area in [min_area, 1] of the image, aspect in [3/4, 4/3]."""
    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * _uniform(generator, min_area, 1.0)
        aspect = math.exp(_uniform(generator, *log_ratio))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left = int(torch.randint(0, width - w + 1, (), generator=generator))
            top = int(torch.randint(0, height - h + 1, (), generator=generator))
            return left, top, left + w, top + h
    side = min(width, height)  # fall back to the central square
    left, top = (width - side) // 2, (height - side) // 2
    return left, top, left + side, top + side


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def train_transform(
    image: Image.Image,
    pre: Preprocessing,
    generator: torch.Generator,
    augmentation: Augmentation = NO_AUGMENTATION,
) -> torch.Tensor:
    """Inception's random-resized crop and flip, then the ``augmentation``; every draw
    from the sample's ``generator``."""
    box = random_crop_box(*image.size, pre.min_crop_area, generator)
    size = (pre.image_size, pre.image_size)
    image = image.resize(size, INTERPOLATIONS[pre.interpolation], box=box)
    if torch.rand((), generator=generator) < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    image = auto_augment(image, augmentation.auto_augment, generator)
    return erase(to_tensor(image), augmentation.random_erasing, generator)


def eval_transform(image: Image.Image, pre: Preprocessing) -> torch.Tensor:
    """Resize the shorter side to image_size / crop_pct, then take the central square."""
    width, height = image.size
    scale = pre.image_size / pre.crop_pct / min(width, height)
    crop = pre.image_size / scale  # the central crop, in source pixels
    left, top = (width - crop) / 2, (height - crop) / 2
    size = (pre.image_size, pre.image_size)
    return to_tensor(
        image.resize(
            size, INTERPOLATIONS[pre.interpolation], box=(left, top, left + crop, top + crop)
        )
    )


def normalize(images: torch.Tensor, pre: Preprocessing, dtype: torch.dtype) -> torch.Tensor:
    """uint8 NCHW -> float, (x / 255 - mean) / std on the tensor's device."""
    mean = torch.tensor(pre.mean, device=images.device, dtype=dtype).view(1, -1, 1, 1) * 255
    std = torch.tensor(pre.std, device=images.device, dtype=dtype).view(1, -1, 1, 1) * 255
    return (images.to(dtype) - mean) / std


@dataclass(frozen=True)
class EvalTransform:
    """A weights file's evaluation preprocessing as one callable, like torchvision's
    ``weights.transforms()``: an image (PIL in any mode, or a CHW tensor, uint8 or float in
    [0, 1]) -> the float CHW tensor the model takes (resized, centre-cropped, normalised)."""

    pre: Preprocessing

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        pixels = eval_transform(as_pil(image), self.pre)
        return normalize(pixels.unsqueeze(0), self.pre, torch.float32)[0]


def as_pil(image: Image.Image | torch.Tensor) -> Image.Image:
    """An in-memory image as an RGB PIL image (tensors: CHW, uint8 or float in [0, 1])."""
    if isinstance(image, torch.Tensor):
        from torchvision.transforms.functional import to_pil_image

        if image.ndim != 3 or image.shape[0] not in (1, 3, 4):
            raise ValueError(
                f"expected an image tensor of shape (C, H, W), got {tuple(image.shape)}"
            )
        image = to_pil_image(image.cpu())
    if not isinstance(image, Image.Image):
        raise ValueError(f"expected a PIL image or an image tensor, got {type(image).__name__}")
    return to_rgb(image)
