"""A training run and its folder: start one from scratch or resume one exactly, inside the
torchrun group if there is one, and leave ``config.yaml`` and ``summary.json`` behind.

Every check runs before anything is written: a run that cannot start leaves the folder as
it found it (an earlier run in it included, even with ``--overwrite``).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from xception.class_report import REPORT_FILES
from xception.devices import resolve_device
from xception.distributed import World, barrier, close_world, init_world
from xception.evaluation import per_class
from xception.files import write_json, write_text
from xception.training.config import RESUME_OPTIONS, TrainConfig, from_yaml_file, to_yaml
from xception.training.trainer import Trainer

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


def run_folder(config: TrainConfig, out: Path | None, overwrite: bool) -> tuple[Path, list[Path]]:
    """The run folder and the files of an earlier run in it that --overwrite will replace.

    Checked on every rank before anything starts (so no rank waits for one that failed),
    and before anything is deleted (so a mistake elsewhere never costs the old run)."""
    run_dir = out or Path("runs") / f"{config.model}-{datetime.now():%Y%m%d-%H%M%S}"
    existing = [run_dir / name for name in RUN_ARTIFACTS if (run_dir / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{run_dir} already holds a run ({existing[0].name}); pass --resume "
            f"{run_dir} to continue it or --overwrite to start over"
        )
    return run_dir, existing


def _clear(run_dir: Path, existing: list[Path]) -> None:
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def train(
    config: TrainConfig,
    recipe: str | None = None,
    out: Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> RunResult:
    """Train from scratch into ``out`` (default ``runs/<model>-<timestamp>``)."""
    run_dir, existing = run_folder(config, out, overwrite)

    def start(world: World) -> tuple[Trainer, Path | None]:
        trainer = Trainer(config, recipe, world, progress)  # checks everything first
        if not world.is_main:
            return trainer, None
        _clear(run_dir, existing)
        write_text(run_dir / "config.yaml", to_yaml(config, recipe))
        return trainer, run_dir

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
    weights = path / "last.safetensors" if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(f"nothing to resume: {weights} does not exist")
    saved, recipe = from_yaml_file(weights.parent / "config.yaml")
    config = replace(saved, **overrides)

    def start(world: World) -> tuple[Trainer, Path | None]:
        trainer = Trainer(config, recipe, world, progress, checkpoint=weights)
        trainer.restore(weights)
        return trainer, weights.parent if world.is_main else None

    return run_in_world(config, start)


def run_in_world(
    config: TrainConfig, start: Callable[[World], tuple[Trainer, Path | None]]
) -> RunResult:
    """Run a trainer inside the torchrun group (if any). The trainer, and with it the DDP
    model holding the process group, is gone before the group is closed: a gloo group that
    outlives the interpreter aborts the process at exit."""
    world = init_world(resolve_device(config.device).type)
    try:
        result = _run(*start(world))
        barrier(world)  # no rank closes its connections while a peer is in a collective
        return result
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
