"""Weight files: safetensors (no pickled code can run on load) with JSON metadata that
says which architecture and config the tensors belong to."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from xception.files import atomic_write

FORMAT = "xception"
RAW_PREFIX = "raw/"  # raw (not averaged) weights stored beside the averaged ones


def save_weights(
    model: nn.Module,
    path: str | Path,
    model_name: str,
    metadata: dict[str, Any] | None = None,
    raw: nn.Module | None = None,
) -> None:
    """Save a model's state dict with its architecture name and config as metadata.

    ``raw``, when given, is stored beside it under ``raw/`` (training saves the Polyak
    averaged weights as the default and the raw ones next to them).
    """
    atomic_write(Path(path), lambda tmp: write_weights(tmp, model, model_name, metadata, raw))


def write_weights(
    path: str | Path,
    model: nn.Module,
    model_name: str,
    metadata: dict[str, Any] | None = None,
    raw: nn.Module | None = None,
) -> None:
    """The file itself: ``metadata`` (JSON values) beside the architecture, which always
    describes ``model`` (a caller's stale ``format``/``model``/``config`` never wins)."""
    config = getattr(model, "config", None)
    meta = {key: json.dumps(value) for key, value in (metadata or {}).items()}
    meta |= {
        "format": FORMAT,
        "model": model_name,
        "config": json.dumps(dataclasses.asdict(config) if config is not None else {}),
    }
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if raw is not None:
        tensors.update(
            {RAW_PREFIX + k: v.detach().contiguous() for k, v in raw.state_dict().items()}
        )
    save_file(tensors, str(path), metadata=meta)


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The JSON-decoded metadata of a weights file (empty for plain safetensors files)."""
    path = _existing(path)
    try:
        with safe_open(path, framework="pt") as f:
            raw = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from None
    return {key: _json_or_str(value) for key, value in raw.items()}


def _json_or_str(value: str) -> Any:
    try:
        return json.loads(value)
    except json.JSONDecodeError:
        return value


def _existing(path: str | Path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    return path


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = _existing(path)
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from None


def load_torch_file(path: Path, what: str) -> Any:
    """``torch.load`` that never runs pickled code, with a one-line error. A file that
    needs more than tensors and plain containers is refused as unsafe, never with advice
    to load it unsafely (which torch's own message gives)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if "unsupported global" in str(error).lower():  # a pickle that names a callable
            raise ValueError(
                f"{path} holds Python objects that cannot be loaded safely (loading them "
                f"could run code); it is not a usable {what}"
            ) from None
        raise ValueError(f"{path} is not a readable {what} ({_first_line(error)})") from None
    except Exception as error:  # corrupt archives, truncated files
        raise ValueError(f"{path} is not a readable {what} ({_first_line(error)})") from None


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Fail on the first missing, unexpected or mis-shaped tensor, naming it and both shapes,
    and on a tensor that is not floating point where the model's is."""
    _check_fits(_specs(model.state_dict()), _specs(state), source)


Spec = tuple[tuple[int, ...], str, bool]  # shape, dtype name, floating point


def _specs(tensors: dict[str, torch.Tensor]) -> dict[str, Spec]:
    return {
        k: (tuple(v.shape), str(v.dtype).removeprefix("torch."), v.is_floating_point())
        for k, v in tensors.items()
    }


def header_specs(path: Path) -> dict[str, Spec]:
    """Each tensor's shape and dtype as the file's header gives them; no data is read."""
    try:
        with safe_open(path, framework="pt") as f:
            slices = {key: f.get_slice(key) for key in f.keys()}  # noqa: SIM118 (not a dict)
            return {
                key: (tuple(s.get_shape()), s.get_dtype(), s.get_dtype().startswith(("F", "BF")))
                for key, s in slices.items()
            }
    except (SafetensorError, OSError, ValueError) as error:
        raise ValueError(f"{path} is not a readable safetensors file ({error})") from None


def _check_fits(expected: dict[str, Spec], found: dict[str, Spec], source: str) -> None:
    for key, (shape, _, floating) in expected.items():
        if key not in found:
            raise ValueError(f"{source} lacks {key} (expected shape {shape})")
        if found[key][0] != shape:
            raise ValueError(
                f"{source}: {key} has shape {found[key][0]}, the model expects {shape}"
            )
        if floating and not found[key][2]:
            raise ValueError(
                f"{source}: {key} holds {found[key][1]} values where the model has floating "
                "point ones"
            )
    unexpected = [key for key in found if key not in expected]
    if unexpected:
        raise ValueError(
            f"{source} has {len(unexpected)} tensor(s) the model lacks, "
            f"first {unexpected[0]} {found[unexpected[0]][0]}"
        )


def select(state: dict[str, torch.Tensor], raw: bool, source: str) -> dict[str, torch.Tensor]:
    """The averaged (default) or the raw weights of a file that may hold both."""
    if not raw:
        return {k: v for k, v in state.items() if not k.startswith(RAW_PREFIX)}
    chosen = {k.removeprefix(RAW_PREFIX): v for k, v in state.items() if k.startswith(RAW_PREFIX)}
    if not chosen:
        raise ValueError(f"{source} holds no raw weights (it was saved without averaging)")
    return chosen


def check_file_fits(
    model: nn.Module, path: str | Path, raw: bool = False, skip: str | None = None
) -> None:
    """That ``path``'s tensors fit ``model`` (shapes and kinds, from the header alone): run on
    a model built on the ``meta`` device, it checks a file before anything is allocated."""
    expected = _specs(model.state_dict())
    found = _skipping(select(header_specs(_existing(path)), raw, str(path)), expected, skip)
    _check_fits(expected, found, str(path))


def _skipping(state: dict[str, Any], own: dict[str, Any], skip: str | None) -> dict[str, Any]:
    """``state`` with the entries whose names start with ``skip`` taken from ``own``."""
    if skip is None:
        return state
    kept = {k: v for k, v in state.items() if not k.startswith(skip)}
    return kept | {k: v for k, v in own.items() if k.startswith(skip)}


def load_weights(
    model: nn.Module,
    path: str | Path,
    raw: bool = False,
    skip: str | None = None,
    allow_nonfinite: bool = False,
) -> None:
    """Load a safetensors file strictly; any mismatch fails before the model changes.
    Tensors whose names start with ``skip`` are left as the model has them, on both sides
    (a new classifier over a loaded backbone). Non-finite weights are refused unless
    ``allow_nonfinite`` (for debugging a diverged run)."""
    check_file_fits(model, path, raw, skip)
    state = _skipping(select(load_state_dict(path), raw, str(path)), model.state_dict(), skip)
    if not allow_nonfinite:
        bad = [k for k, v in state.items() if v.is_floating_point() and not v.isfinite().all()]
        if bad:
            raise ValueError(
                f"{path}: {len(bad)} tensor(s) hold non-finite values, first {bad[0]}; "
                "pass --allow-nonfinite to load them anyway (for debugging)"
            )
    model.load_state_dict(state)
