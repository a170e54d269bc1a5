"""Training configuration: one frozen dataclass, named recipes as presets of its fields.

Precedence: dataclass defaults < recipe < YAML file (``--config``) < command-line flags.
The resolved config is saved as ``config.yaml`` in the run folder and is what ``--resume``
continues with.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from xception.layers import check_choice
from xception.models.base import check_types


@dataclass(frozen=True)
class TrainConfig:
    # what to train, on what
    model: str = "xception_tiny"
    model_overrides: dict[str, Any] = field(default_factory=dict)
    data: str | None = None  # image folder / manifest root; None = the built-in data set
    multi_label: bool = False  # built-in data set only: the JFT-like multi-label mode
    builtin_train_per_class: int = 600
    builtin_val_per_class: int = 100
    image_size: int = 96
    crop_pct: float = 0.875
    min_crop_area: float = 0.08
    interpolation: str = "bicubic"
    # optimisation
    epochs: int = 10
    batch_size: int = 64  # global: split across processes under torchrun
    eval_batch_size: int = 128
    optimizer: Literal["sgd", "rmsprop_tf", "adamw"] = "sgd"
    lr: float = 0.045
    lr_reference_batch: int | None = None  # lr is for this batch size; scaled linearly
    momentum: float = 0.9
    nesterov: bool = False
    rmsprop_decay: float = 0.9
    rmsprop_eps: float = 1.0
    weight_decay: float = 1e-5
    spatial_lr_fan_in: bool = False  # separable convs' spatial lr x groups/in (optim.py)
    lr_decay: float = 0.94
    lr_decay_every: float = 2.0
    lr_decay_unit: Literal["epoch", "samples", "step"] = "epoch"
    warmup_steps: int = 0
    dropout: float | None = None  # None keeps the model's
    loss: Literal["softmax", "sigmoid"] = "softmax"
    label_smoothing: float = 0.0
    grad_accum: int = 1
    ema_decay: float = 0.9999  # Polyak averaging; 0 turns it off
    ema_warmup: bool = True
    max_steps: int | None = None  # stop early (smoke tests, partial runs)
    # machinery
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["none", "bf16", "fp16"] = "none"
    channels_last: bool = True  # NHWC: oneDNN's fast convolutions (benchmarks/RESULTS.md)
    compile: bool = False
    sync_bn: bool = True  # under DDP only
    seed: int = 0
    workers: int = 2
    save_every: int = 0  # steps between checkpoints (0: at epoch ends only)
    log_every: int = 10

    def __post_init__(self) -> None:
        check_types(self)
        check_choice("optimizer", self.optimizer, ("sgd", "rmsprop_tf", "adamw"))
        check_choice("lr_decay_unit", self.lr_decay_unit, ("epoch", "samples", "step"))
        check_choice("loss", self.loss, ("softmax", "sigmoid"))
        check_choice("device", self.device, ("auto", "cpu", "cuda"))
        check_choice("amp", self.amp, ("none", "bf16", "fp16"))
        positive = (
            "epochs",
            "batch_size",
            "eval_batch_size",
            "image_size",
            "grad_accum",
            "lr",
            "lr_decay_every",
            "log_every",
            "builtin_train_per_class",
            "builtin_val_per_class",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        for name in ("workers", "save_every", "warmup_steps", "weight_decay", "momentum"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must not be negative")
        for name in ("ema_decay", "label_smoothing", "lr_decay"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size={self.batch_size} must be a multiple of grad_accum={self.grad_accum}"
            )
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps={self.max_steps} must be positive")


# The paper's recipes (section 4.3-4.4) and one for the built-in data set on a CPU.
RECIPES: dict[str, dict[str, Any]] = {
    "paper-imagenet": dict(
        model="xception",
        image_size=299,
        optimizer="sgd",
        lr=0.045,
        momentum=0.9,
        lr_decay=0.94,
        lr_decay_every=2,
        lr_decay_unit="epoch",
        weight_decay=1e-5,
        dropout=0.5,
        loss="softmax",
        ema_decay=0.9999,
        batch_size=32,
        epochs=100,
    ),
    "paper-jft": dict(
        model="xception",
        image_size=299,
        optimizer="rmsprop_tf",
        lr=0.001,
        momentum=0.9,
        rmsprop_decay=0.9,
        rmsprop_eps=1.0,
        lr_decay=0.9,
        lr_decay_every=3_000_000,
        lr_decay_unit="samples",
        weight_decay=1e-5,
        dropout=0.0,
        loss="sigmoid",
        multi_label=True,
        ema_decay=0.9999,
        batch_size=32,
    ),
    "quick": dict(
        model="xception_tiny",
        model_overrides={"bn_momentum": 0.1},
        image_size=72,
        optimizer="adamw",
        lr=3e-3,
        weight_decay=0.05,
        warmup_steps=30,
        lr_decay=0.85,
        lr_decay_every=1,
        lr_decay_unit="epoch",
        dropout=0.0,
        batch_size=64,
        epochs=18,
        crop_pct=1.0,
        min_crop_area=0.35,
        ema_decay=0.998,
    ),
}


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise ValueError(f"{path} is not valid YAML ({error})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of option: value")
    return values


def resolve(
    recipe: str | None,
    yaml_values: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> TrainConfig:
    """Defaults < recipe < YAML < overrides, with unknown keys named."""
    if recipe is not None and recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; recipes: {', '.join(RECIPES)}")
    values: dict[str, Any] = dict(RECIPES[recipe]) if recipe else {}
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for source in (yaml_values or {}, overrides or {}):
        unknown = sorted(set(source) - known)
        if unknown:
            raise ValueError(f"unknown training option {unknown[0]!r}")
        values.update(source)
    return TrainConfig(**values)


def to_yaml(config: TrainConfig, recipe: str | None) -> str:
    values = {"recipe": recipe, **dataclasses.asdict(config)}
    return yaml.safe_dump(values, sort_keys=False)


def from_yaml_file(path: Path) -> tuple[TrainConfig, str | None]:
    """A run folder's ``config.yaml`` back into the config it was trained with."""
    values = load_yaml(path)
    recipe = values.pop("recipe", None)
    return TrainConfig(**values), recipe
