"""Checkpoints: weights in safetensors, the rest of the training state in a file that loads
with ``torch.load(weights_only=True)``; neither can run code when read.

A checkpoint is a pair (``NAME.safetensors``, ``NAME.state.pt``) stamped with the same
step. Both are written to pending files and fsynced before either is renamed into place.
A load settles whatever a stopped save left: a complete pending state that matches the
weights finishes a save that died between its two renames; any other pending file (cut
short by a kill or a full disk, or from an older step) is deleted, and the load says so.
So a run killed at any moment leaves the last complete checkpoint loadable, and nothing
a save left half-done can block a resume.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from xception.files import removed_on_failure, seal
from xception.weights import load_torch_file, read_metadata

STATE_SUFFIX = ".state.pt"


@dataclass(frozen=True)
class Position:
    """Where training stands: optimizer steps taken, epoch, batches done in that epoch."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
        "numpy_rest": [
            int(v) if i < 2 else float(v) for i, v in enumerate(np.random.get_state()[2:])
        ],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuple(state["python"]))
    keys = state["numpy"].numpy().astype(np.uint32)
    position, has_gauss, cached = state["numpy_rest"]
    np.random.set_state(("MT19937", keys, int(position), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(value: Any) -> Any:
    return tuple(_as_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def state_path(weights_path: Path) -> Path:
    return weights_path.with_name(weights_path.name.removesuffix(".safetensors") + STATE_SUFFIX)


def save_checkpoint(weights_path: Path, write_weights: Any, state: dict[str, Any]) -> None:
    """``write_weights(tmp_path)`` writes the safetensors file (its metadata must carry
    ``step``); ``state`` (with ``position``) goes to the companion state file. A failed
    write removes its pending files (a full disk: ``NoSpaceError``)."""
    pending, state_tmp = pending_files(weights_path)
    with removed_on_failure(weights_path, pending, state_tmp):
        write_weights(str(pending))
        seal(pending)
        torch.save(state, state_tmp)
        seal(state_tmp)
    os.replace(pending, weights_path)
    os.replace(state_tmp, state_path(weights_path))


def pending_files(weights_path: Path) -> tuple[Path, Path]:
    """Where a save of this checkpoint writes before its renames."""
    return _pending(weights_path), _pending(state_path(weights_path))


def _pending(path: Path) -> Path:
    return path.with_name(f".{path.name}.pending")


def load_state(weights_path: Path) -> tuple[dict[str, Any], list[str]]:
    """The state of the checkpoint whose weights are at ``weights_path``, checked to match,
    and a line for each pending file that a stopped save left and this load settled."""
    if not weights_path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {weights_path}")
    step = read_metadata(weights_path).get("step")
    path = state_path(weights_path)
    notes: list[str] = []

    def discard(pending: Path) -> None:
        pending.unlink()
        notes.append(f"deleted {pending.name}, left by a save that was cut short")

    pending_weights, pending = pending_files(weights_path)
    if pending_weights.exists():  # its save died before its first rename
        discard(pending_weights)
    if pending.exists():
        try:
            complete = _read_state(pending)["position"]["step"] == step
        except (ValueError, KeyError, TypeError):
            complete = False
        if complete:
            os.replace(pending, path)
            notes.append(f"finished the step-{step} checkpoint that a stop cut between renames")
        else:
            discard(pending)
    if not path.is_file():
        raise FileNotFoundError(f"training state not found next to the checkpoint: {path}")
    state = _read_state(path)
    if state["position"]["step"] != step:
        raise ValueError(
            f"{path} (step {state['position']['step']}) does not belong to "
            f"{weights_path} (step {step})"
        )
    return state, notes


def _read_state(path: Path) -> dict[str, Any]:
    state = load_torch_file(path, "training state")
    if not isinstance(state, dict) or not isinstance(state.get("position"), dict):
        raise ValueError(f"{path} is not a readable training state (no position)")
    return state
