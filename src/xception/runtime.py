"""Settings that make models run faster without changing any result: malloc's for the whole
process, and inductor's for compiled training."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import torch
from torch import nn

# mallopt parameters, from glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# glibc's ceiling for the mmap threshold on 64-bit systems (4 MiB * sizeof(long)).
_MMAP_THRESHOLD = 32 * 1024 * 1024
_TRIM_THRESHOLD = 1024 * 1024 * 1024


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep freed blocks of up to 32 MiB for reuse (and up to 1 GiB of
    free heap) instead of handing them back to the kernel.

    A network allocates and frees feature maps of several MiB in every step. By default
    glibc maps many of them afresh and returns them, so the kernel zero-fills every page on
    first touch: a ReLU over an 11 MiB map took 2.9 ms instead of 0.15 ms, and the default
    training step at 128 px, batch 16, ran 6-7% slower (``benchmarks/RESULTS.md``). The
    price is that a process keeps its peak heap. ``XCEPTION_KEEP_FREED_MEMORY=0`` leaves
    malloc's defaults alone. Returns whether the settings took: False when turned off or
    where the C library is not glibc.
    """
    if os.environ.get("XCEPTION_KEEP_FREED_MEMORY", "1") == "0":
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(
        mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)
    )


def compile_for_training(model: nn.Module, device: torch.device) -> nn.Module:
    """``torch.compile`` for training at one image size (static shapes).

    On CPUs inductor otherwise keeps each convolution in the layout it was traced in and, in
    the backward pass, copies every depthwise convolution's input and gradient into another
    layout and back. Forcing its channels_last layout optimisation removes those copies:
    Xception at 128 px, batch 16, 524 -> 484 ms a step (``benchmarks/RESULTS.md``). GPUs keep
    inductor's own layout heuristics. ``xception bench`` compiles every contender's training
    step with it, timm's included, so compiled contenders stay comparable.
    """
    options = {"force_layout_optimization": True} if device.type == "cpu" else None
    return torch.compile(model, dynamic=False, options=options)
