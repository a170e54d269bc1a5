"""Where and how models run, in one place for training, evaluation, prediction and bench:
the device a ``--device`` name means, autocast for ``--amp``, and the batch a model eats
(moved to the device, scaled to the model's input range, in its memory layout)."""

from __future__ import annotations

import re
import typing
from typing import Literal

import torch

from xception.data.transforms import Preprocessing, normalize

DEVICE_HELP = "auto (a CUDA GPU if there is one, else the CPU), cpu, cuda, cuda:N or mps"
Amp = Literal["none", "bf16", "fp16"]
AMP_CHOICES: tuple[str, ...] = typing.get_args(Amp)
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_DEVICE_NAME = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device_name(name: str) -> str:
    """``name`` if it is a device this package can be asked for; checked at configuration
    time, before anything runs (whether the device exists is ``resolve_device``'s job)."""
    if not isinstance(name, str) or not _DEVICE_NAME.fullmatch(name):
        raise ValueError(f"device={name!r} is not {DEVICE_HELP}")
    return name


def resolve_device(name: str) -> torch.device:
    """The device ``name`` stands for, failing with one line when it is not there."""
    check_device_name(name)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name} was asked for, but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(
                f"--device {name} was asked for, but there are "
                f"{torch.cuda.device_count()} CUDA devices"
            )
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name} was asked for, but MPS is not available")
    return device


def accumulator_dtype(device: torch.device) -> torch.dtype:
    """float64 for sums of losses and counts (exact to 2**53), except on MPS, which has no
    float64 (float32 counts are exact to 2**24 samples). MPS has not been tested here."""
    return torch.float32 if device.type == "mps" else torch.float64


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for timings)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def autocast(device: torch.device, amp: str) -> torch.autocast:
    """Autocast for ``amp`` (none, bf16, fp16) on ``device``'s type; disabled for none."""
    dtype = AMP_DTYPES.get(amp)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def model_input(
    images: torch.Tensor, pre: Preprocessing, device: torch.device, channels_last: bool
) -> torch.Tensor:
    """A uint8 NCHW batch as the model's float32 input: on ``device``, normalised by
    ``pre`` there (4x fewer bytes cross to the device), channels_last if asked."""
    x = normalize(images.to(device, non_blocking=True), pre, torch.float32)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x
