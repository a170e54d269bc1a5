"""``xception train``: data -> model -> loss -> optimiser -> checkpoints and logs.

Exactness over cleverness: everything that decides the next weights (data order,
augmentation, dropout masks, learning rate, averaging) is a function of the seed and the
position in training, and all of it is in the checkpoint. On a CPU, N steps in one go
and k steps + resume + N-k steps give bitwise identical weights.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from xception.data.folder import Split, discover
from xception.data.loaders import (
    Batch,
    EvalBatchSampler,
    ImageDataset,
    TrainBatchSampler,
    make_loader,
)
from xception.data.synthetic import SyntheticSpec, materialize
from xception.data.transforms import Preprocessing, normalize
from xception.evaluation import class_frequency_weights, evaluate
from xception.precision import autocast
from xception.registry import create_model
from xception.runtime import compile_for_training
from xception.training import checkpoint as ckpt
from xception.training.distributed import (
    World,
    barrier,
    close_world,
    convert_sync_batchnorm,
    init_world,
)
from xception.training.ema import ModelEma
from xception.training.logs import (
    TensorBoard,
    close_logger,
    plot_profile,
    read_metrics,
    run_logger,
    write_metrics,
)
from xception.training.optim import LRSchedule, RMSpropTF, param_groups, scale_lr, set_lr
from xception.training.recipes import TrainConfig, from_yaml_file, to_yaml
from xception.weights import atomic_write, load_weights, write_weights

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
)


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss diverged); the last checkpoint is intact."""


@dataclass(frozen=True)
class RunResult:
    run_dir: Path | None  # None on the ranks that do not write
    metrics: dict[str, float]
    wall_time: float
    images_per_second: float  # training throughput (evaluation excluded)


def resolve_device(requested: str) -> torch.device:
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for, but no CUDA device is available")
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(requested)


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


def clear_run_folder(run_dir: Path, existing: list[Path]) -> None:
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)


def builtin_spec(config: TrainConfig) -> SyntheticSpec | None:
    """The built-in data set a config trains on (None when it names a folder)."""
    if config.data is not None:
        return None
    return SyntheticSpec(
        train_per_class=config.builtin_train_per_class,
        val_per_class=config.builtin_val_per_class,
        image_size=config.image_size,
        multi_label=config.multi_label,
        seed=config.seed,
    )


def load_data(config: TrainConfig, world: World, progress: bool) -> dict[str, Split]:
    spec = builtin_spec(config)
    if spec is None:
        return discover(config.data)
    if world.is_main:
        root = materialize(spec, workers=config.workers, progress=progress)
    barrier(world)
    if not world.is_main:
        root = materialize(spec, progress=False)
    return discover(root)


def build_model(config: TrainConfig, classes: int) -> nn.Module:
    overrides = dict(config.model_overrides)
    if config.dropout is not None:
        overrides["dropout"] = config.dropout
    model = create_model(config.model, num_classes=classes, **overrides)
    if config.image_size < model.min_input_size:
        raise ValueError(
            f"image_size={config.image_size} is below {config.model}'s minimum "
            f"input size {model.min_input_size}"
        )
    return model


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    groups = param_groups(model, config.weight_decay, config.spatial_lr_fan_in)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov
        )
    if config.optimizer == "rmsprop_tf":
        return RMSpropTF(
            groups,
            lr=config.lr,
            alpha=config.rmsprop_decay,
            eps=config.rmsprop_eps,
            momentum=config.momentum,
        )
    return torch.optim.AdamW(groups, lr=config.lr)


def build_schedule(config: TrainConfig) -> LRSchedule:
    lr = config.lr
    if config.lr_reference_batch:
        lr = scale_lr(lr, config.batch_size, config.lr_reference_batch)
    return LRSchedule(
        lr, config.lr_decay, config.lr_decay_every, config.lr_decay_unit, config.warmup_steps
    )


def preprocessing(config: TrainConfig) -> Preprocessing:
    return Preprocessing(
        image_size=config.image_size,
        crop_pct=config.crop_pct,
        interpolation=config.interpolation,
        min_crop_area=config.min_crop_area,
    )


def loss_fn(config: TrainConfig, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    if config.loss == "sigmoid":
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float())
    return F.cross_entropy(logits.float(), targets, label_smoothing=config.label_smoothing)


class Trainer:
    """One training run. Construct (from scratch or from a checkpoint), then ``run()``."""

    def __init__(
        self,
        config: TrainConfig,
        recipe: str | None,
        run_dir: Path | None,
        world: World,
        progress: bool = True,
    ) -> None:
        self.config, self.recipe, self.world, self.progress = config, recipe, world, progress
        self.run_dir = run_dir if world.is_main else None
        self.device = resolve_device(config.device)
        if world.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", world.local_rank)
            torch.cuda.set_device(self.device)
        self.splits = load_data(config, world, progress and world.is_main)
        self.classes = self.splits["train"].classes
        if config.loss == "sigmoid" and not self.splits["train"].multi_label:
            raise ValueError("loss=sigmoid needs a multi-label data set (a CSV manifest)")
        if self.splits["train"].multi_label and config.loss != "sigmoid":
            self.config = config = replace(config, loss="sigmoid")

        torch.manual_seed(config.seed)
        self.model = build_model(config, len(self.classes)).to(self.device)
        if world.distributed and config.sync_bn:
            self.model = convert_sync_batchnorm(self.model, self.device.type)
        if config.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = (
            ModelEma(self.model, config.ema_decay, config.ema_warmup)
            if config.ema_decay > 0
            else None
        )
        self.optimizer = build_optimizer(config, self.model)
        self.schedule = build_schedule(config)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.position = ckpt.Position()
        self.best: float | None = None
        self.pre = preprocessing(config)
        self.steps_per_epoch = len(self.splits["train"]) // config.batch_size
        self.class_weights = (
            class_frequency_weights(self.splits["train"].label_matrix())
            if config.loss == "sigmoid"
            else None
        )
        self.skipped: set[str] = set()

    # -- checkpoints ------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        spec = builtin_spec(self.config)
        return {
            "classes": list(self.classes),
            "preprocessing": asdict(self.pre),
            "multi_label": self.config.loss == "sigmoid",
            "step": self.position.step,
            "epoch": self.position.epoch,
            "averaged": self.ema is not None,
            "recipe": self.recipe,
            "builtin_data": asdict(spec) if spec else None,
        }

    def save(self, metrics: dict[str, float] | None = None, best: bool = False) -> None:
        """Save ``last`` (and first ``best``, so a crash in between cannot leave a stale
        best file behind a state that already records the new best)."""
        if self.run_dir is None:
            return
        averaged = self.ema.averaged if self.ema is not None else self.model
        raw = self.model if self.ema is not None else None
        meta = {**self.metadata(), "metrics": metrics or {}}

        def write(tmp: str) -> None:
            write_weights(tmp, averaged, self.config.model, meta, raw=raw)

        if best:
            atomic_write(self.run_dir / "best.safetensors", write)

        state = {
            "position": asdict(self.position),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "ema_updates": self.ema.num_updates if self.ema is not None else 0,
            "best": self.best,
            "rng": ckpt.rng_state(),
        }
        ckpt.save_checkpoint(self.run_dir / "last.safetensors", write, state)

    def restore(self, weights_path: Path) -> None:
        """Continue from a checkpoint of this run: weights, optimiser, RNG, position."""
        state = ckpt.load_state(weights_path)
        load_weights(self.model, weights_path, raw=self.ema is not None)
        if self.ema is not None:
            load_weights(self.ema.averaged, weights_path)
            self.ema.num_updates = state["ema_updates"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.position = ckpt.Position(**state["position"])
        self.best = state["best"]
        ckpt.set_rng_state(state["rng"])

    # -- the loop ---------------------------------------------------------------------
    def run(self) -> RunResult:
        config, world = self.config, self.world
        log = run_logger(self.run_dir)
        board = TensorBoard(self.run_dir) if self.run_dir is not None else None
        rows = (
            [row for row in read_metrics(self.run_dir) if row["step"] <= self.position.step]
            if self.run_dir is not None
            else []
        )
        micro_batch = config.batch_size // config.grad_accum
        sampler = TrainBatchSampler(
            len(self.splits["train"]), micro_batch, config.seed, world.rank, world.size
        )
        pin = self.device.type == "cuda"
        train_loader = make_loader(
            ImageDataset(self.splits["train"], self.pre, True, config.seed),
            sampler,
            config.workers,
            pin,
        )
        val_loader = make_loader(
            ImageDataset(self.splits["val"], self.pre, False),
            EvalBatchSampler(
                len(self.splits["val"]), config.eval_batch_size, world.rank, world.size
            ),
            config.workers,
            pin,
        )
        model = self._wrap(self.model)
        steps_per_epoch = self.steps_per_epoch
        total_steps = steps_per_epoch * config.epochs
        if config.max_steps is not None:
            total_steps = min(total_steps, config.max_steps)
        log.info(
            "training %s on %d images (%d classes), %d steps of %d images, from step %d",
            config.model,
            len(self.splits["train"]),
            len(self.classes),
            total_steps,
            config.batch_size,
            self.position.step,
        )
        start, metrics = time.perf_counter(), rows[-1] if rows else {}
        images_seen, train_seconds = 0, 0.0
        bar = tqdm(
            total=total_steps,
            initial=self.position.step,
            unit="step",
            disable=not (self.progress and world.is_main),
            dynamic_ncols=True,
        )
        try:
            while self.position.step < total_steps:
                epoch = self.position.epoch
                sampler.set_position(epoch, self.position.batch_in_epoch * config.grad_accum)
                train = self._train_epoch(model, train_loader, total_steps, bar, board, log)
                images_seen += train.pop("images")
                train_seconds += train.pop("seconds")
                finished_epoch = self.position.batch_in_epoch == 0
                if finished_epoch or self.position.step >= total_steps:
                    metrics = {
                        "epoch": epoch
                        + (1 if finished_epoch else self.position.batch_in_epoch / steps_per_epoch),
                        "step": self.position.step,
                        "lr": self._lr(),
                        **train,
                        **self._evaluate(val_loader),
                    }
                    self._end_of_epoch(metrics, rows, board, log)
        finally:
            bar.close()
            if board is not None:
                board.close()
        wall = time.perf_counter() - start
        result = RunResult(
            self.run_dir or Path("."), metrics, wall, images_seen / max(train_seconds, 1e-9)
        )
        if self.run_dir is not None:
            summary = {
                "metrics": metrics,
                "wall_time_s": wall,
                "images_per_second": result.images_per_second,
                "skipped_files": sorted(self.skipped),
                "model": config.model,
                "steps": self.position.step,
            }
            text = json.dumps(summary, indent=2)
            atomic_write(self.run_dir / "summary.json", lambda tmp: Path(tmp).write_text(text))
        close_logger(log)
        return result

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.world.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(model, device_ids=ids)
        if self.config.compile:
            model = compile_for_training(model, self.device)
        return model

    def _train_epoch(
        self,
        model: nn.Module,
        loader: Any,
        total_steps: int,
        bar: tqdm,
        board: TensorBoard | None,
        log: Any,
    ) -> dict[str, float]:
        config, world = self.config, self.world
        model.train()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        counted, images, micro = 0, 0, 0
        tick = time.perf_counter()
        for batch in loader:
            self._note_skipped(batch.skipped, log)
            # A batch whose files were all unreadable still counts as a micro-step (with zero
            # weight), so the position advances and every rank joins the gradient all-reduce.
            empty = batch.images.shape[0] == 0
            images_in = self._placeholder(batch) if empty else batch
            x = normalize(
                images_in.images.to(self.device, non_blocking=True), self.pre, torch.float32
            )
            if config.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = images_in.targets.to(self.device, non_blocking=True)
            micro += 1
            sync = micro == config.grad_accum
            no_sync = getattr(model, "no_sync", None)
            context = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
            with context, autocast(self.device, config.amp):
                loss = loss_fn(config, model(x), y) * (0.0 if empty else 1.0)
            self.scaler.scale(loss / config.grad_accum).backward()
            if not empty:
                loss_sum += loss.detach().double() * x.shape[0]
                counted += x.shape[0]
            if not sync:
                continue
            micro = 0
            self._step(loss)
            images += config.batch_size
            bar.update(1)
            if self.position.step % config.log_every == 0 or self.position.step >= total_steps:
                self._check_finite(loss)
                rate = images / max(time.perf_counter() - tick, 1e-9)
                bar.set_postfix(loss=f"{loss.item():.3f}", img_s=f"{rate:.0f}")
                if board is not None:
                    board.scalars(
                        {
                            "train/loss": loss.item(),
                            "train/lr": self._lr(),
                            "train/images_per_s": rate,
                        },
                        self.position.step,
                    )
            if config.save_every and self.position.step % config.save_every == 0:
                self._check_finite(loss)
                self.save()
            if self.position.step >= total_steps or self.position.batch_in_epoch == 0:
                break
        total = torch.stack(
            [loss_sum, torch.tensor(float(counted), dtype=torch.float64, device=self.device)]
        )
        if world.distributed:
            torch.distributed.all_reduce(total)
        return {
            "train_loss": (total[0] / total[1].clamp(min=1)).item(),
            "images": images,
            "seconds": time.perf_counter() - tick,
        }

    def _lr(self) -> float:
        group = self.optimizer.param_groups[0]
        return group["lr"] / group.get("lr_scale", 1.0)

    def _placeholder(self, batch: Batch) -> Batch:
        """One blank image standing in for a batch of unreadable files."""
        size = self.config.image_size
        multi = self.config.loss == "sigmoid"
        target = torch.zeros(1, len(self.classes)) if multi else torch.zeros(1, dtype=torch.long)
        return Batch(torch.zeros(1, 3, size, size, dtype=torch.uint8), target, batch.skipped)

    def _step(self, loss: torch.Tensor) -> None:
        config = self.config
        steps_per_epoch = self.steps_per_epoch
        position = self.position
        epoch_float = position.epoch + position.batch_in_epoch / steps_per_epoch
        set_lr(
            self.optimizer,
            self.schedule.lr_at(position.step, epoch_float, position.step * config.batch_size),
        )
        if self.device.type == "cpu":
            self._check_finite(loss)  # cheap on a CPU; on GPUs it waits for the log interval
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        batch = position.batch_in_epoch + 1
        epoch = position.epoch
        if batch == steps_per_epoch:
            batch, epoch = 0, epoch + 1
        self.position = ckpt.Position(position.step + 1, epoch, batch)

    def _check_finite(self, loss: torch.Tensor) -> None:
        """Raise on a non-finite loss; under DDP all ranks decide together (sum the losses:
        one rank's NaN makes every rank's sum NaN), so none is left waiting in a collective."""
        loss = loss.detach().float().reshape(()).clone()  # never reduce the loss in place
        if self.world.distributed:
            loss = loss.to(self.device)
            torch.distributed.all_reduce(loss)
        value = loss.item()
        if not math.isfinite(value):
            raise TrainingError(
                f"the loss became {value} at step {self.position.step}; "
                "stopped without saving (the last checkpoint is intact). "
                "Try a lower learning rate or --amp none"
            )

    def _note_skipped(self, skipped: list[str], log: Any) -> None:
        for entry in skipped:
            if entry not in self.skipped:
                self.skipped.add(entry)
                log.info("skipped unreadable file %s", entry)

    def _evaluate(self, loader: Any) -> dict[str, float]:
        models = {"val": self.ema.averaged if self.ema is not None else self.model}
        if self.ema is not None:
            models["val_raw"] = self.model
        metrics: dict[str, float] = {}
        for prefix, model in models.items():
            result, skipped = evaluate(
                model,
                loader,
                self.device,
                self.pre,
                self.world,
                self.config.loss == "sigmoid",
                self.class_weights,
                self.config.channels_last,
                self.config.amp,
            )
            self.skipped.update(skipped)
            metrics.update({f"{prefix}_{key}": value for key, value in result.items()})
        return metrics

    def _end_of_epoch(
        self,
        metrics: dict[str, float],
        rows: list[dict[str, float]],
        board: TensorBoard | None,
        log: Any,
    ) -> None:
        self._check_finite(torch.tensor(metrics["train_loss"]))
        key = "val_map100" if self.config.loss == "sigmoid" else "val_top1"
        improved = self.best is None or metrics[key] > self.best
        if improved:
            self.best = metrics[key]
        self.save(metrics, best=improved)
        if self.run_dir is None:
            return
        rows.append(metrics)
        write_metrics(self.run_dir, rows)
        plot_profile(self.run_dir, rows, f"{self.config.model} ({self.recipe or 'custom'})")
        if board is not None:
            board.scalars({f"epoch/{k}": v for k, v in metrics.items()}, self.position.step)
        log.info(
            "epoch %.2f step %d: %s",
            metrics["epoch"],
            metrics["step"],
            ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k not in ("epoch", "step")),
        )


# What may change when a run is resumed: how long it runs and how it is driven, never
# what decides the weights.
RESUME_OPTIONS = ("epochs", "max_steps", "workers", "save_every", "log_every", "device")


def train(
    config: TrainConfig,
    recipe: str | None = None,
    out: Path | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> RunResult:
    """Train from scratch into ``out`` (default ``runs/<model>-<timestamp>``)."""
    run_dir, existing = run_folder(config, out, overwrite)

    def start(world: World) -> Trainer:
        trainer = Trainer(config, recipe, None, world, progress)  # checks data and model first
        if world.is_main:
            clear_run_folder(run_dir, existing)
            (run_dir / "config.yaml").write_text(to_yaml(trainer.config, recipe))
            trainer.run_dir = run_dir
        return trainer

    return run_in_world(config, start)


def resume(path: Path, overrides: dict[str, Any] | None = None, progress: bool = True) -> RunResult:
    """Continue the run at ``path`` (its folder or a checkpoint in it) exactly."""
    overrides = overrides or {}
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

    def start(world: World) -> Trainer:
        trainer = Trainer(config, recipe, weights.parent, world, progress)
        trainer.restore(weights)
        return trainer

    return run_in_world(config, start)


def run_in_world(config: TrainConfig, start: Callable[[World], Trainer]) -> RunResult:
    """Run a trainer inside the torchrun group (if any). The trainer, and with it the DDP
    model holding the process group, is gone before the group is closed: a gloo group that
    outlives the interpreter aborts the process at exit."""
    world = init_world(resolve_device(config.device).type)
    try:
        result = start(world).run()
        barrier(world)  # no rank closes its connections while a peer is in a collective
        return result
    finally:
        close_world(world)
