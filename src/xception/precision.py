"""Inference precision: float32, bfloat16 and int8, and what the CPU offers for each.

- ``fp32``: the fast path (``fusion.inference_model``).
- ``bf16``: the same path under autocast (on CPUs, oneDNN's bf16 kernels: fast where the
  CPU has AVX-512 BF16 or AMX, emulated and slower elsewhere, which is said once).
- ``int8``: post-training static quantization of our ONNX export with onnxruntime (QDQ,
  per-channel weights, activations calibrated on a few hundred images), run by
  onnxruntime. PyTorch's own PT2E quantization flow left torch for torchao, which is not
  a dependency of this project; onnxruntime is already the export extra's, and a QDQ
  file is what deployment targets take.
"""

from __future__ import annotations

import dataclasses
import platform
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xception.data.folder import image_files, read_rgb
from xception.data.transforms import Preprocessing, eval_transform, normalize
from xception.devices import autocast

PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "int8")
CPU_FLAGS = ("amx_bf16", "amx_int8", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512f", "avx2")
CALIBRATION_IMAGES = 256  # onnxruntime's MinMax calibration settles within a few hundred


@cache
def cpu_features() -> dict[str, Any]:
    """The CPU's model name and the instruction-set flags that decide bf16 and int8 speed."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
    return {"cpu": model, **{flag: flag in flags for flag in CPU_FLAGS}}


def native_bf16() -> bool:
    features = cpu_features()
    return bool(features["avx512_bf16"] or features["amx_bf16"])


def check_precision(precision: str, device: torch.device, calibrate: str | Path | None) -> None:
    """One line for a precision that cannot run as asked; a warning for one that runs slow."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision!r}: choose one of {', '.join(PRECISIONS)}")
    if precision == "int8":
        if device.type != "cpu":
            raise ValueError("--precision int8 runs on CPUs (onnxruntime); use bf16 on GPUs")
        if calibrate is None:
            raise ValueError(
                "--precision int8 needs --calibrate DIR: a folder of a few hundred images "
                "like those the model will see"
            )
    elif calibrate is not None:
        raise ValueError("--calibrate is for --precision int8")
    if precision == "bf16" and device.type == "cpu" and not native_bf16():
        warnings.warn(
            f"this CPU ({cpu_features()['cpu']}) has no AVX-512 BF16 or AMX: bf16 runs "
            "emulated, slower than fp32",
            stacklevel=2,
        )


def calibration_batches(
    folder: str | Path, pre: Preprocessing, limit: int = CALIBRATION_IMAGES, batch: int = 16
) -> Iterator[np.ndarray]:
    """Normalised float32 NCHW batches of up to ``limit`` images of ``folder`` (recursively,
    sorted, spread evenly over the folder), preprocessed as evaluation does."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"--calibrate: no such folder: {folder}")
    paths = image_files(folder)
    if not paths:
        raise ValueError(f"--calibrate: {folder} holds no images")
    chosen = [paths[i] for i in np.linspace(0, len(paths) - 1, min(limit, len(paths))).astype(int)]
    images = []
    for path in dict.fromkeys(chosen):
        try:
            images.append(eval_transform(read_rgb(path), pre))
        except (OSError, ValueError, SyntaxError):
            continue  # an unreadable file calibrates nothing
    if not images:
        raise ValueError(f"--calibrate: no image of {folder} could be read")
    for start in range(0, len(images), batch):
        yield normalize(torch.stack(images[start : start + batch]), pre, torch.float32).numpy()


def int8_session(
    weights: Path, calibrate: str | Path, raw: bool = False
) -> tuple[Any, dict[str, Any]]:
    """An onnxruntime session of ``weights`` quantized to int8 on ``calibrate``'s images."""
    from xception.exporting import export_onnx, load_onnx_session

    with tempfile.TemporaryDirectory(prefix="xception-int8-") as work:
        out = Path(work) / "int8.onnx"
        return load_onnx_session(export_onnx(weights, out, raw=raw, calibrate=calibrate))


def int8_module(
    model: nn.Module, calibrate: str | Path | Iterable[Any], pre: Preprocessing
) -> nn.Module:
    """``model`` (on the CPU) quantized to int8 on ``calibrate`` (a folder of images, or
    normalised float32 NCHW batches) and run by onnxruntime, as a module."""
    from xception.exporting import OnnxModel, load_onnx_session, write_onnx

    metadata = {"model": type(model).__name__, "preprocessing": dataclasses.asdict(pre)}
    eager = model.float().eval()
    with tempfile.TemporaryDirectory(prefix="xception-int8-") as work:
        path = write_onnx(
            eager, metadata, pre.image_size, Path(work) / "int8.onnx", calibrate=calibrate
        )
        session, _ = load_onnx_session(path)
    return OnnxModel(session).eval()


class Autocast(nn.Module):
    """``module`` run under autocast at ``amp`` (bf16 or fp16) on its input's device, with
    float32 outputs: ``--precision bf16`` as a module."""

    def __init__(self, module: nn.Module, amp: str) -> None:
        super().__init__()
        self.module, self.amp = module, amp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, self.amp):
            return self.module(x).float()
