"""Process-wide settings that make CPU work faster without changing any result."""

from __future__ import annotations

import ctypes
import ctypes.util
import os

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
