"""The step and epoch loop of one training run, and its checkpoints.

Exactness over cleverness: everything that decides the next weights (data order,
augmentation, dropout masks, learning rate, averaging) is a function of the seed and the
position in training, and all of it is in the checkpoint. On a CPU, N steps in one go
and k steps + resume + N-k steps give bitwise identical weights.

Constructing a ``Trainer`` checks everything (data, model, batch against data) and writes
nothing; only ``run`` writes, so a run that cannot start leaves no trace.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from xception.class_report import format_table, write_class_report
from xception.data.augment import Augmentation, mix_batch
from xception.data.loaders import (
    Batch,
    EvalBatchSampler,
    make_dataset,
    make_loader,
    train_sampler,
)
from xception.devices import accumulator_dtype, autocast, model_input, resolve_device
from xception.distributed import World, all_reduce_sum, convert_sync_batchnorm
from xception.evaluation import class_frequencies, evaluate, per_class, primary_metric
from xception.files import atomic_write
from xception.runtime import compile_for_training
from xception.training import checkpoint as ckpt
from xception.training.builders import (
    build_model,
    build_optimizer,
    build_schedule,
    build_splits,
    class_balance,
    freeze,
    loss,
)
from xception.training.config import TrainConfig
from xception.training.ema import ModelEma
from xception.training.logs import RunLogs
from xception.training.optim import set_lr
from xception.training.progress import Progress
from xception.weights import load_weights, write_weights


class TrainingError(RuntimeError):
    """Training cannot go on (e.g. the loss diverged); the last checkpoint is intact."""


@dataclass(frozen=True)
class EpochResult:
    metrics: dict[str, float]
    images: int
    seconds: float


class Trainer:
    """One training run: construct (checks, builds, writes nothing), optionally
    ``restore`` a checkpoint, then ``run``."""

    def __init__(
        self,
        config: TrainConfig,
        recipe: str | None,
        world: World,
        progress: bool = True,
        checkpoint: Path | None = None,
    ) -> None:
        """``checkpoint``: the run's own, to be ``restore``-d (it records the architecture)."""
        self.config, self.recipe, self.world = config, recipe, world
        self.progress = progress and world.is_main
        self.run_dir: Path | None = None
        self.device = resolve_device(config.device)
        if world.distributed and self.device.type == "cuda":
            self.device = torch.device("cuda", world.local_rank)
            torch.cuda.set_device(self.device)
        self.splits = build_splits(config, world, self.progress)
        train_split, val_split = self.splits["train"], self.splits["val"]
        self.classes = train_split.classes
        self.multi_label = train_split.multi_label
        self.score_key = "val_" + primary_metric(self.multi_label)

        if len(train_split) < config.batch_size:
            raise ValueError(
                f"the training split has {len(train_split)} images, fewer than one batch "
                f"of {config.batch_size}"
            )
        if config.balance and self.multi_label:
            raise ValueError("balance weighs single-label classes; this data is multi-label")
        self.steps_per_epoch = len(train_split) // config.batch_size
        self.total_steps = self.steps_per_epoch * config.epochs
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)

        torch.manual_seed(config.seed)
        model, self.init_note = build_model(config, self.classes, checkpoint)
        self.resume_notes: list[str] = []
        self.model = model.to(self.device)
        freeze(self.model, backbone=config.freeze_backbone, batch_norm=config.freeze_bn)
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
        self.wrapped = self._wrap(self.model)  # DDP, compile: may fail, so before any write
        # the cosine spans the epochs asked for: max_steps stops a run early, it does not
        # reshape the schedule (so a partial run resumes onto the same curve)
        self.schedule = build_schedule(config, self.steps_per_epoch * config.epochs)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16")
        self.position = ckpt.Position()
        self.best: float | None = None
        self.pre = config.preprocessing()
        self.map_weights = (
            class_frequencies(train_split.class_counts(), len(train_split))
            if self.multi_label
            else None
        )
        self.loss_weights = class_balance(train_split).to(self.device) if config.balance else None
        self.confusion: torch.Tensor | None = None  # of the last evaluation (averaged weights)
        pin = self.device.type == "cuda"
        lanes = config.lanes or world.size
        self.sampler = train_sampler(
            train_split,
            config.batch_size // config.grad_accum,
            config.seed,
            world.rank,
            world.size,
            lanes=lanes,
            buffer=config.shuffle_buffer,
        )
        augmentation = Augmentation(config.auto_augment, config.random_erasing)
        self.train_loader = make_loader(
            make_dataset(
                train_split,
                self.pre,
                True,
                config.seed,
                augmentation,
                lanes // world.size,
                config.shuffle_buffer,
            ),
            self.sampler,
            config.workers,
            pin,
        )
        self.val_loader = make_loader(
            make_dataset(val_split, self.pre, False),
            EvalBatchSampler(len(val_split), config.eval_batch_size, world.rank, world.size),
            config.workers,
            pin,
        )
        self.skipped: set[str] = set()

    # -- checkpoints ------------------------------------------------------------------
    def metadata(self) -> dict[str, Any]:
        spec = self.config.builtin_data()
        return {
            "classes": list(self.classes),
            "preprocessing": asdict(self.pre),
            "multi_label": self.multi_label,
            "step": self.position.step,
            "epoch": self.position.epoch,
            "averaged": self.ema is not None,
            "recipe": self.recipe,
            "builtin_data": asdict(spec) if spec else None,
        }

    def save(self, metrics: dict[str, float] | None = None, best: bool = False) -> None:
        """Save ``last`` (and first ``best``, so a crash in between cannot leave a stale
        best file behind a state that already records the new best)."""
        averaged = self.ema.averaged if self.ema is not None else self.model
        raw = self.model if self.ema is not None else None
        self._check_weights_finite(averaged, raw)
        if self.run_dir is None:
            return
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
            "data_cursor": self._cursor(self.position),
        }
        ckpt.save_checkpoint(self.run_dir / "last.safetensors", write, state)

    def _check_weights_finite(self, *models: nn.Module | None) -> None:
        """A loss computed before an update can be finite while the update made the weights
        (or BatchNorm statistics) infinite: such weights must never become a checkpoint.
        Under DDP every rank decides together (per-rank BatchNorm statistics can differ)."""
        named = [
            (name, tensor)
            for model in models
            if model is not None
            for name, tensor in (*model.named_parameters(), *model.named_buffers())
            if tensor.is_floating_point()
        ]
        finite = torch.stack([tensor.isfinite().all() for _, tensor in named]).tolist()  # 1 sync
        bad = [name for (name, _), ok in zip(named, finite, strict=True) if not ok]
        count = torch.tensor(float(len(bad)), device=self.device)
        if all_reduce_sum(count, self.world).item():
            where = f"{len(bad)} tensors, first {bad[0]}" if bad else "on another rank"
            raise TrainingError(
                f"the weights became non-finite at step {self.position.step} ({where}); "
                "stopped without saving (the last checkpoint is intact). "
                "Try a lower learning rate or --amp none"
            )

    def restore(self, weights_path: Path) -> None:
        """Continue from a checkpoint of this run: weights, optimiser, RNG, position."""
        state, self.resume_notes = ckpt.load_state(weights_path)
        load_weights(self.model, weights_path, raw=self.ema is not None)
        if self.ema is not None:
            load_weights(self.ema.averaged, weights_path)
            self.ema.num_updates = state["ema_updates"]
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.position = ckpt.Position(**state["position"])
        self.best = state["best"]
        ckpt.set_rng_state(state["rng"])
        recorded, now = state.get("data_cursor"), self._cursor(self.position)
        if recorded is not None and recorded != now:
            raise ValueError(
                f"the training data is not what {weights_path.name} was trained on: it reads "
                f"{recorded}, the data now gives {now} (shards rewritten, or a lanes or "
                "shuffle_buffer change?)"
            )

    def _cursor(self, position: ckpt.Position) -> dict[str, object]:
        return self.sampler.cursor(position.epoch, position.batch_in_epoch * self.config.grad_accum)

    # -- the loop ---------------------------------------------------------------------
    def run(self, run_dir: Path | None) -> tuple[dict[str, float], int, float]:
        """Train to the end; the last metrics, images trained on and seconds spent on them.
        Only rank 0 writes into ``run_dir``."""
        config = self.config
        self.run_dir = run_dir if self.world.is_main else None
        logs = RunLogs(
            self.run_dir, f"{config.model} ({self.recipe or 'custom'})", self.position.step
        )
        bar = Progress(self.total_steps, self.position.step, self.progress)
        logs.info(
            "training %s on %d images (%d classes), %d steps of %d images, from step %d",
            config.model,
            len(self.splits["train"]),
            len(self.classes),
            self.total_steps,
            config.batch_size,
            self.position.step,
        )
        if self.init_note is not None:
            logs.info("init weights: %s", self.init_note)
            bar.line(f"init weights: {self.init_note}")
        for note in self.resume_notes:
            logs.info("resume: %s", note)
            bar.line(f"resume: {note}")
        for split in self.splits.values():
            for note in split.notes:
                logs.info("data: %s", note)
                bar.line(f"data: {note}")
        metrics = logs.rows[-1] if logs.rows else {}
        images, seconds = 0, 0.0
        try:
            while self.position.step < self.total_steps:
                epoch = self.position.epoch
                self.sampler.set_position(epoch, self.position.batch_in_epoch * config.grad_accum)
                trained = self._train_epoch(self.wrapped, bar, logs)
                images, seconds = images + trained.images, seconds + trained.seconds
                finished_epoch = self.position.batch_in_epoch == 0
                if finished_epoch or self.position.step >= self.total_steps:
                    done = self.position.batch_in_epoch / self.steps_per_epoch
                    metrics = {
                        "epoch": epoch + (1 if finished_epoch else done),
                        "step": self.position.step,
                        "lr": self._lr(),
                        **trained.metrics,
                        **self._evaluate(logs),
                    }
                    self._end_of_epoch(metrics, logs, bar)
            if self.run_dir is not None and self.confusion is not None:
                write_class_report(self.run_dir, self.confusion, self.classes)
                table = format_table(per_class(self.confusion, self.classes))
                logs.info("per class, averaged weights, last evaluation:\n%s", table)
        except TrainingError as error:  # not a full disk: run.log could not take the line
            logs.info("stopped: %s", error)
            raise
        finally:
            bar.close()
            logs.close()
        return metrics, images, seconds

    def _wrap(self, model: nn.Module) -> nn.Module:
        if self.world.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            model = nn.parallel.DistributedDataParallel(
                model,
                device_ids=ids,
                # the backbone sits out the first freeze_epochs: its parameters get no grads
                find_unused_parameters=self.config.freeze_epochs > 0,
            )
        if self.config.compile:
            model = compile_for_training(model, self.device)
        return model

    def _train_epoch(self, model: nn.Module, bar: Progress, logs: RunLogs) -> EpochResult:
        config = self.config
        model.train()
        head_only = self.position.epoch < config.freeze_epochs
        freeze(
            self.model, backbone=config.freeze_backbone or head_only, batch_norm=config.freeze_bn
        )
        dtype = accumulator_dtype(self.device)
        loss_sum = torch.zeros((), dtype=dtype, device=self.device)
        counted, images, micro = 0, 0, 0
        tick = time.perf_counter()
        for batch in self.train_loader:
            self._note_skipped(batch.skipped, logs)
            # A batch whose files were all unreadable still counts as a micro-step (with zero
            # weight), so the position advances and every rank joins the gradient all-reduce.
            empty = batch.images.shape[0] == 0
            images_in = self._placeholder(batch) if empty else batch
            x = model_input(images_in.images, self.pre, self.device, config.channels_last)
            y = images_in.targets.to(self.device, non_blocking=True)
            if (config.mixup or config.cutmix) and not empty:
                x, y = mix_batch(
                    x, y, len(self.classes), config.mixup, config.cutmix, self._rng(micro)
                )
            micro += 1
            sync = micro == config.grad_accum
            no_sync = getattr(model, "no_sync", None)
            context = no_sync() if (no_sync is not None and not sync) else contextlib.nullcontext()
            with context, autocast(self.device, config.amp):
                value = loss(
                    model(x), y, self.multi_label, config.label_smoothing, self.loss_weights
                )
                value = value * (0.0 if empty else 1.0)
            self.scaler.scale(value / config.grad_accum).backward()
            if not empty:
                loss_sum += value.detach().to(dtype) * x.shape[0]
                counted += x.shape[0]
            if not sync:
                continue
            micro = 0
            self._step(value)
            images += config.batch_size
            step = self.position.step
            if step % config.log_every == 0 or step >= self.total_steps:
                self._check_finite(value)
                rate = images / max(time.perf_counter() - tick, 1e-9)
                bar.update(step, value.item(), rate)
                logs.scalars(
                    {
                        "train/loss": value.item(),
                        "train/lr": self._lr(),
                        "train/images_per_s": rate,
                    },
                    step,
                )
            else:
                bar.update(step, None, None)
            if config.save_every and step % config.save_every == 0:
                self._check_finite(value)
                self.save()
            if step >= self.total_steps or self.position.batch_in_epoch == 0:
                break
        total = torch.stack(
            [loss_sum, torch.tensor(float(counted), dtype=dtype, device=self.device)]
        )
        if self.world.distributed:
            torch.distributed.all_reduce(total)
        return EpochResult(
            {"train_loss": (total[0] / total[1].clamp(min=1)).item()},
            images,
            time.perf_counter() - tick,
        )

    def _rng(self, micro: int) -> np.random.Generator:
        """The generator of one micro-batch's mixing: a function of the seed and the
        position, so a resumed run mixes as an uninterrupted one."""
        position = self.position
        key = [self.config.seed, position.epoch, position.batch_in_epoch, micro, self.world.rank]
        return np.random.default_rng(key)

    def _lr(self) -> float:
        group = self.optimizer.param_groups[0]
        return group["lr"] / group.get("lr_scale", 1.0)

    def _placeholder(self, batch: Batch) -> Batch:
        """One blank image standing in for a batch of unreadable files."""
        size = self.config.image_size
        target = (
            torch.zeros(1, len(self.classes))
            if self.multi_label
            else torch.zeros(1, dtype=torch.long)
        )
        return Batch(torch.zeros(1, 3, size, size, dtype=torch.uint8), target, batch.skipped)

    def _step(self, value: torch.Tensor) -> None:
        position = self.position
        epoch_float = position.epoch + position.batch_in_epoch / self.steps_per_epoch
        samples = position.step * self.config.batch_size
        set_lr(self.optimizer, self.schedule.lr_at(position.step, epoch_float, samples))
        if self.device.type == "cpu":
            self._check_finite(value)  # cheap on a CPU; on GPUs it waits for the log interval
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        batch, epoch = position.batch_in_epoch + 1, position.epoch
        if batch == self.steps_per_epoch:
            batch, epoch = 0, epoch + 1
        self.position = ckpt.Position(position.step + 1, epoch, batch)

    def _check_finite(self, value: torch.Tensor) -> None:
        """Raise on a non-finite loss; under DDP all ranks decide together (sum the losses:
        one rank's NaN makes every rank's sum NaN), so none is left waiting in a collective."""
        value = value.detach().float().reshape(()).clone()  # never reduce the loss in place
        if self.world.distributed:
            value = value.to(self.device)
            torch.distributed.all_reduce(value)
        number = value.item()
        if not math.isfinite(number):
            raise TrainingError(
                f"the loss became {number} at step {self.position.step}; "
                "stopped without saving (the last checkpoint is intact). "
                "Try a lower learning rate or --amp none"
            )

    def _note_skipped(self, skipped: list[str], logs: RunLogs) -> None:
        for entry in skipped:
            if entry not in self.skipped:
                self.skipped.add(entry)
                logs.info("skipped unreadable file %s", entry)

    def _evaluate(self, logs: RunLogs) -> dict[str, float]:
        models = {"val": self.ema.averaged if self.ema is not None else self.model}
        if self.ema is not None:
            models["val_raw"] = self.model
        metrics: dict[str, float] = {}
        for prefix, model in models.items():
            result = evaluate(
                model,
                self.val_loader,
                self.device,
                self.pre,
                self.world,
                self.multi_label,
                self.map_weights,
                self.config.channels_last,
                self.config.amp,
                len(self.classes),
            )
            self._note_skipped(result.skipped, logs)  # named in run.log, as training's are
            metrics.update({f"{prefix}_{key}": value for key, value in result.metrics.items()})
            if prefix == "val":
                self.confusion = result.confusion
        return metrics

    def _end_of_epoch(self, metrics: dict[str, float], logs: RunLogs, bar: Progress) -> None:
        self._check_finite(torch.tensor(metrics["train_loss"]))
        improved = self.best is None or metrics[self.score_key] > self.best
        if improved:
            self.best = metrics[self.score_key]
        self.save(metrics, best=improved)
        logs.epoch(metrics)
        shown = ("train_loss", "val_loss", self.score_key, "val_raw_" + self.score_key[4:])
        bar.line(
            f"epoch {metrics['epoch']:.2f} step {metrics['step']}: "
            + ", ".join(f"{key} {metrics[key]:.4f}" for key in shown if key in metrics)
        )
