"""A training run and its folder: start one from scratch or resume one exactly, inside the
torchrun group if there is one, and leave ``config.yaml`` and ``summary.json`` behind.

Every check runs before anything is written: a run that cannot start leaves the folder as
it found it (an earlier run in it included, even with ``--overwrite``). One process writes
into a run folder at a time: a run or a resume holds an exclusive lock on ``.lock`` in it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from xception.class_report import REPORT_FILES
from xception.devices import resolve_device
from xception.distributed import World, barrier, close_world, init_world, peer_failed
from xception.evaluation import per_class
from xception.files import new_file_mode, write_json, write_text
from xception.training.checkpoint import pending_files
from xception.training.config import RESUME_OPTIONS, TrainConfig, from_yaml_file, to_yaml
from xception.training.trainer import Trainer, TrainingError

RUN_ARTIFACTS = (
    "config.yaml",
    "metrics.csv",
    "profile.png",
    "tensorboard",
    "last.safetensors",
    "last.state.pt",
    "best.safetensors",
    "run.log",
    "summary.json",
    *REPORT_FILES,
)


@dataclass(frozen=True)
class RunResult:
    run_dir: Path | None  # None on the ranks that do not write
    metrics: dict[str, float]
    wall_time: float
    images_per_second: float  # training throughput (evaluation excluded)
    primary_metric: str  # the key of metrics that ranks runs (val_top1 or val_map100)
    per_class: list[dict[str, Any]] | None = None  # single-label: the last evaluation's


def run_folder(config: TrainConfig, out: Path | None) -> Path:
    return out or Path("runs") / f"{config.model}-{datetime.now():%Y%m%d-%H%M%S}"


def earlier_run(run_dir: Path, overwrite: bool) -> list[Path]:
    """The files of an earlier run in ``run_dir``, which --overwrite will replace.

    Checked on every rank before anything starts (so no rank waits for one that failed),
    and before anything is deleted (so a mistake elsewhere never costs the old run)."""
    existing = [run_dir / name for name in RUN_ARTIFACTS if (run_dir / name).exists()]
    if existing and not overwrite:
        if not (run_dir / "last.safetensors").exists():
            raise FileExistsError(never_checkpointed(run_dir))
        raise FileExistsError(
            f"{run_dir} already holds a run ({existing[0].name}); pass --resume "
            f"{run_dir} to continue it or --overwrite to start over"
        )
    return existing


def never_checkpointed(run_dir: Path) -> str:
    """What ``train`` and ``--resume`` both say of a run stopped before its first save."""
    return (
        f"{run_dir} holds a run that stopped before its first checkpoint, so nothing in it "
        "can be resumed; pass --overwrite to start it again"
    )


@contextmanager
def holding(run_dir: Path) -> Iterator[None]:
    """Hold ``run_dir/.lock`` exclusively while the block runs; a second process gets one
    line naming the holder's PID. The kernel drops the lock of a process that dies, so a lock
    file left by a killed run never blocks. Under torchrun only rank 0, the writer, holds it.
    A folder made here is removed again if the block leaves nothing in it."""
    if int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    made = [folder for folder in (run_dir, *run_dir.parents) if not folder.exists()]
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / ".lock"
    fd = _lock(path, run_dir)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)
        if made and not any(item.is_file() for item in made[-1].rglob("*")):
            shutil.rmtree(made[-1])


def _lock(path: Path, run_dir: Path) -> int:
    """A descriptor holding the lock of the file now at ``path`` (a holder that removed its
    file while this process opened it leaves a lock on a file nobody else sees: retry)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, new_file_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            raise FileExistsError(
                f"{run_dir} is in use by process {holder or '(unknown)'}, which is training or "
                "resuming it; wait for it to finish or choose another --out"
            ) from None
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _clear(run_dir: Path, existing: list[Path]) -> None:
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    for path in pending_files(run_dir / "last.safetensors"):  # what a save cut short left
        path.unlink(missing_ok=True)
    run_dir.mkdir(parents=True, exist_ok=True)


def train(
    config: TrainConfig,
    recipe: str | None = None,
    out: Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> RunResult:
    """Train from scratch into ``out`` (default ``runs/<model>-<timestamp>``)."""
    run_dir = run_folder(config, out)

    def start(world: World) -> tuple[Trainer, Path | None]:
        # the lanes of a shard stream are fixed now, so that a resume on another number
        # of processes reads the same batches
        resolved = replace(config, lanes=config.lanes or world.size)
        trainer = Trainer(resolved, recipe, world, progress)  # checks everything first
        if not world.is_main:
            return trainer, None
        _clear(run_dir, existing)
        write_text(run_dir / "config.yaml", to_yaml(resolved, recipe))
        return trainer, run_dir

    with holding(run_dir):
        existing = earlier_run(run_dir, overwrite)
        return run_in_world(config, start)


def resume(path: Path, overrides: dict[str, Any] | None = None, progress: bool = True) -> RunResult:
    """Continue the run at ``path`` (its folder or a checkpoint in it) exactly."""
    overrides = overrides or {}
    if "init_weights" in overrides:
        raise ValueError("--init-weights starts a new run and --resume continues one: give one")
    changed = sorted(set(overrides) - set(RESUME_OPTIONS))
    if changed:
        raise ValueError(
            f"--resume continues a run as it was configured; {changed[0]!r} "
            f"cannot change (only {', '.join(RESUME_OPTIONS)} can)"
        )
    if path.is_file() and path.suffix != ".safetensors":
        raise ValueError(f"--resume takes a run folder or its last.safetensors; {path} is neither")
    weights = path / "last.safetensors" if path.is_dir() else path
    if not weights.parent.is_dir():
        raise FileNotFoundError(f"nothing to resume: {weights.parent} does not exist")

    def start(world: World) -> tuple[Trainer, Path | None]:
        trainer = Trainer(config, recipe, world, progress, checkpoint=weights)
        trainer.restore(weights)
        return trainer, weights.parent if world.is_main else None

    with holding(weights.parent):  # before the checks: a live run may be mid-save
        if not weights.is_file():
            if path.is_dir() and earlier_run(path, overwrite=True):
                raise FileNotFoundError(never_checkpointed(path))
            raise FileNotFoundError(f"nothing to resume: {weights} does not exist")
        saved, recipe = from_yaml_file(weights.parent / "config.yaml")
        config = replace(saved, **overrides)
        return run_in_world(config, start)


def run_in_world(
    config: TrainConfig, start: Callable[[World], tuple[Trainer, Path | None]]
) -> RunResult:
    """Run a trainer inside the torchrun group (if any). The trainer, and with it the DDP
    model holding the process group, is gone before the group is closed: a gloo group that
    outlives the interpreter aborts the process at exit."""
    world = init_world(resolve_device(config.device).type, config.dist_timeout)
    try:
        result = _run(*start(world))
        barrier(world)  # no rank closes its connections while a peer is in a collective
        return result
    except RuntimeError as error:
        if isinstance(error, TrainingError) or not peer_failed(error, world):
            raise
        raise TrainingError(
            f"rank {world.rank}: another torchrun process stopped, or did not answer within "
            f"dist_timeout={config.dist_timeout} s, so this one stops too "
            f"({str(error).splitlines()[0][:200]})"
        ) from None
    finally:
        close_world(world)


def _run(trainer: Trainer, run_dir: Path | None) -> RunResult:
    begin = time.perf_counter()
    metrics, images, seconds = trainer.run(run_dir)
    confusion = trainer.confusion
    result = RunResult(
        run_dir,
        metrics,
        time.perf_counter() - begin,
        images / max(seconds, 1e-9),
        trainer.score_key,
        per_class(confusion, trainer.classes) if confusion is not None else None,
    )
    if run_dir is not None:
        summary = {
            "metrics": metrics,
            "primary_metric": result.primary_metric,
            "multi_label": trainer.multi_label,
            "wall_time_s": result.wall_time,
            "images_per_second": result.images_per_second,
            "skipped_files": sorted(trainer.skipped),
            "per_class": result.per_class,
            "model": trainer.config.model,
            "steps": trainer.position.step,
        }
        write_json(run_dir / "summary.json", summary)
    return result
