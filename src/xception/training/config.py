"""Training configuration: one frozen dataclass whose fields carry their own help and
group, so the command line, ``--help``, YAML files and the saved ``config.yaml`` all come
from it and cannot drift apart.

Precedence, key by key (``model_overrides`` too): dataclass defaults < recipe < YAML file
(``--config``) < command-line flags. The resolved config is saved as ``config.yaml`` in the
run folder and is what ``--resume`` continues with.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from xception.config import check_known, check_numbers, coerce, from_values, normalize
from xception.data.synthetic import SyntheticSpec
from xception.data.transforms import Preprocessing
from xception.devices import DEVICE_HELP, check_device_name
from xception.registry import model_config, weights_config
from xception.training.recipes import RECIPES
from xception.weights import read_metadata

GROUPS = (
    "data",
    "model",
    "fine-tuning",
    "optimisation",
    "schedule",
    "regularisation",
    "augmentation",
    "checkpointing and logging",
    "hardware",
)
# Numbers that may be 0 (every other one must be positive; none may be negative).
MAY_BE_ZERO = (
    "workers",
    "lanes",
    "save_every",
    "warmup_steps",
    "weight_decay",
    "momentum",
    "rmsprop_decay",
    "dropout",
    "label_smoothing",
    "ema_decay",
    "lr_decay",
    "seed",
    "freeze_epochs",
    "random_erasing",
    "mixup",
    "cutmix",
)
# Options of earlier versions that runs saved in config.yaml and that no longer exist.
# `loss` (softmax or sigmoid) now follows the data, as the old loop already enforced.
RETIRED_OPTIONS = ("loss",)
# Model config fields that a training run sets itself, and why.
TRAINING_OWNED = {
    "image_size": "the training option image_size sets it",
    "dropout": "the training option dropout sets it",
    "num_classes": "the data's classes set it",
}
# What may change when a run is resumed: how long it runs and how it is driven, never
# what decides the weights.
RESUME_OPTIONS = (
    "epochs",
    "max_steps",
    "workers",
    "save_every",
    "log_every",
    "device",
    "dist_timeout",
)


def describe(group: str, help: str) -> dict[str, str]:
    """A field's ``--help`` line and group, as its metadata."""
    assert group in GROUPS, group
    return {"group": group, "help": help}


def option(default: Any, group: str, help: str) -> Any:
    return field(default=default, metadata=describe(group, help))


@dataclass(frozen=True)
class TrainConfig:
    # data
    data: str | None = option(
        None,
        "data",
        "image folder (ROOT/train/<class>/*, ROOT/val/<class>/*), manifest root "
        "(ROOT/train.csv, ROOT/val.csv: path,labels), or shard folder or fsspec URL "
        "(`xception shard`); not given: the built-in data set",
    )
    multi_label: bool = option(
        False,
        "data",
        "a multi-label task: the built-in data set in its JFT-like mode; with --data, the "
        "data must be a CSV manifest (a manifest is always trained multi-label)",
    )
    builtin_train_per_class: int = option(600, "data", "built-in data set: training images a class")
    builtin_val_per_class: int = option(100, "data", "built-in data set: validation images a class")
    image_size: int = option(96, "data", "input side in pixels, for training and evaluation")
    crop_pct: float = option(
        0.875, "data", "evaluation: resize to image_size / crop_pct, then crop the centre"
    )
    min_crop_area: float = option(
        0.08, "data", "training: random-resized crops cover [min_crop_area, 1] of the image"
    )
    interpolation: Literal["bilinear", "bicubic"] = option("bicubic", "data", "image resizing")
    mean: tuple[float, float, float] = option(
        (0.5, 0.5, 0.5), "data", "per-channel mean of pixels in [0, 1], subtracted"
    )
    std: tuple[float, float, float] = option(
        (0.5, 0.5, 0.5), "data", "per-channel deviation, divided by (0.5, 0.5: x / 127.5 - 1)"
    )
    balance: bool = option(
        False, "data", "weigh the loss by inverse class frequency (single-label data)"
    )
    eval_batch_size: int = option(128, "data", "images an evaluation batch (global)")
    workers: int = option(2, "data", "data loading processes (0: in the training process)")
    lanes: int = option(
        0,
        "data",
        "shard data: parallel streams the batches are drawn from (0: one per process, fixed "
        "at the start); any process count dividing it trains on the same batches",
    )
    shuffle_buffer: int = option(1000, "data", "shard data: samples a lane shuffles at a time")
    # model
    model: str = option("xception_tiny", "model", "model name (`xception models` lists them)")
    model_overrides: dict[str, Any] = field(
        default_factory=dict,
        metadata=describe("model", "model config fields (`xception summary MODEL` shows them)"),
    )
    # fine-tuning
    init_weights: str | None = option(
        None,
        "fine-tuning",
        "weights file to start from (converted Keras or timm, a run's best.safetensors): "
        "its architecture and preprocessing are the defaults; the classifier is new where "
        "the data's classes differ from the file's",
    )
    freeze_backbone: bool = option(
        False, "fine-tuning", "train the head only (the backbone's BatchNorm as loaded)"
    )
    freeze_epochs: int = option(
        0, "fine-tuning", "train the head alone for this many epochs, then everything"
    )
    head_lr_scale: float = option(1.0, "fine-tuning", "the head's learning rate / the backbone's")
    freeze_bn: bool = option(
        False,
        "fine-tuning",
        "keep every BatchNorm's statistics, scale and shift as loaded (small batches spoil "
        "pretrained statistics)",
    )
    # optimisation
    optimizer: Literal["sgd", "rmsprop_tf", "adamw"] = option(
        "sgd", "optimisation", "rmsprop_tf: TensorFlow's RMSprop, as the paper's JFT runs"
    )
    lr: float = option(0.045, "optimisation", "learning rate")
    lr_reference_batch: int | None = option(
        None, "optimisation", "lr is meant for this batch size: scaled by batch_size / this"
    )
    momentum: float = option(0.9, "optimisation", "SGD and RMSprop momentum")
    nesterov: bool = option(False, "optimisation", "Nesterov momentum (SGD)")
    rmsprop_decay: float = option(0.9, "optimisation", "RMSprop: decay of the squared average")
    rmsprop_eps: float = option(1.0, "optimisation", "RMSprop: epsilon inside the square root")
    spatial_lr_fan_in: bool = option(
        False,
        "optimisation",
        "scale each separable convolution's spatial lr by groups / channels (spectrum runs)",
    )
    batch_size: int = option(64, "optimisation", "global batch, split across torchrun processes")
    grad_accum: int = option(1, "optimisation", "micro-batches a step (batch_size / this each)")
    seed: int = option(0, "optimisation", "seed of initial weights, data order and augmentation")
    # schedule
    epochs: int = option(10, "schedule", "passes over the training split")
    lr_schedule: Literal["staircase", "cosine"] = option(
        "staircase",
        "schedule",
        "staircase: the paper's decay by lr_decay every lr_decay_every; cosine: to zero "
        "at the end of the epochs (max_steps stops early on the same curve)",
    )
    max_steps: int | None = option(None, "schedule", "stop after this many optimiser steps")
    lr_decay: float = option(0.94, "schedule", "staircase: lr factor every lr_decay_every units")
    lr_decay_every: float = option(2.0, "schedule", "staircase period, in lr_decay_unit")
    lr_decay_unit: Literal["epoch", "samples", "step"] = option(
        "epoch", "schedule", "unit of lr_decay_every"
    )
    warmup_steps: int = option(0, "schedule", "steps of linear learning-rate warm-up")
    # regularisation
    weight_decay: float = option(
        1e-5, "regularisation", "L2 on convolution and linear weights (not BN, not biases)"
    )
    dropout: float | None = option(
        None, "regularisation", "dropout before the classifier (none: the model's own)"
    )
    label_smoothing: float = option(0.0, "regularisation", "single-label cross-entropy")
    ema_decay: float = option(0.9999, "regularisation", "Polyak averaging of the weights (0: off)")
    ema_warmup: bool = option(
        True, "regularisation", "average with decay min(ema_decay, (1 + n) / (10 + n))"
    )
    # augmentation (training images only; every draw is a function of seed and position)
    auto_augment: Literal["none", "randaugment", "trivialaugment"] = option(
        "none", "augmentation", "torchvision's RandAugment or TrivialAugmentWide"
    )
    random_erasing: float = option(
        0.0, "augmentation", "probability of filling a random rectangle with noise"
    )
    mixup: float = option(0.0, "augmentation", "mixup: alpha of Beta(alpha, alpha) (0: off)")
    cutmix: float = option(
        0.0,
        "augmentation",
        "cutmix: alpha of Beta(alpha, alpha) (0: off); with mixup, a "
        "batch takes one of the two at random",
    )
    # checkpointing and logging
    save_every: int = option(
        0, "checkpointing and logging", "steps between checkpoints (0: at epoch ends only)"
    )
    log_every: int = option(10, "checkpointing and logging", "steps between loss logs")
    # hardware
    device: str = option("auto", "hardware", DEVICE_HELP)
    amp: Literal["none", "bf16", "fp16"] = option("none", "hardware", "mixed precision")
    channels_last: bool = option(
        True, "hardware", "NHWC activations (oneDNN and tensor cores run them fastest)"
    )
    compile: bool = option(False, "hardware", "torch.compile the training step")
    sync_bn: bool = option(True, "hardware", "synchronise BatchNorm across torchrun processes")
    dist_timeout: int = option(
        900,
        "hardware",
        "seconds a torchrun process waits for the others in a collective before it stops",
    )

    def __post_init__(self) -> None:
        normalize(self)
        check_device_name(self.device)
        check_numbers(self, allow_zero=MAY_BE_ZERO)
        for name in ("ema_decay", "label_smoothing", "lr_decay", "rmsprop_decay", "random_erasing"):
            if getattr(self, name) > 1:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1]")
        if self.lanes and (self.batch_size // self.grad_accum) % self.lanes:
            raise ValueError(
                f"lanes={self.lanes} must divide the batch of a step "
                f"({self.batch_size // self.grad_accum} images)"
            )
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"batch_size={self.batch_size} must be a multiple of grad_accum={self.grad_accum}"
            )
        self.preprocessing()  # crop_pct, min_crop_area, mean, std
        if self.freeze_backbone and self.freeze_epochs:
            raise ValueError("freeze_backbone trains the head throughout; drop freeze_epochs")
        owned = sorted(set(self.model_overrides) & set(TRAINING_OWNED))
        if owned:
            raise ValueError(f"model_overrides may not set {owned[0]}: {TRAINING_OWNED[owned[0]]}")
        # The model's config is checked now, before any data is scanned or rendered; its
        # overrides are kept as the typed values the model config made of them.
        model = self.model_config()
        if getattr(model, "aux_logits", False):
            raise ValueError(
                "training with Inception V3's auxiliary tower (aux_logits) is not supported: "
                "the paper trains without it"
            )
        typed = {key: getattr(model, key) for key in self.model_overrides}
        object.__setattr__(self, "model_overrides", typed)

    def model_config(self, num_classes: int | None = None, checkpoint: Path | None = None) -> Any:
        """The model's config: the architecture a weights file records (``checkpoint``,
        else ``init_weights``) or the registered defaults, with ``model_overrides``, the
        training image size as its input size, ``dropout`` when set, and ``num_classes``."""
        values = {**self.model_overrides, "image_size": self.image_size}
        if self.dropout is not None:
            values["dropout"] = self.dropout
        if num_classes is not None:
            values["num_classes"] = num_classes
        source = checkpoint or self.init_weights
        if source is None:
            return model_config(self.model, **values)
        return weights_config(source, self.model, new_head=checkpoint is None, **values)[1]

    def preprocessing(self) -> Preprocessing:
        return Preprocessing(
            image_size=self.image_size,
            crop_pct=self.crop_pct,
            interpolation=self.interpolation,
            mean=self.mean,
            std=self.std,
            min_crop_area=self.min_crop_area,
        )

    def builtin_data(self) -> SyntheticSpec | None:
        """The built-in data set this config trains on (None when it names a folder)."""
        if self.data is not None:
            return None
        return SyntheticSpec(
            train_per_class=self.builtin_train_per_class,
            val_per_class=self.builtin_val_per_class,
            image_size=self.image_size,
            multi_label=self.multi_label,
            seed=self.seed,
        )


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


def check_recipe(recipe: str | None) -> None:
    if recipe is not None and recipe not in RECIPES:
        raise ValueError(f"unknown recipe {recipe!r}; recipes: {', '.join(RECIPES)}")


def resolve(
    recipe: str | None,
    yaml_values: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> TrainConfig:
    """Defaults < recipe < YAML < overrides, key by key (``model_overrides`` merged too),
    with unknown keys named. With ``init_weights``, the file's model and preprocessing
    stand in for the recipe's wherever the YAML and the overrides leave them unsaid."""
    check_recipe(recipe)
    layers = (RECIPES[recipe] if recipe else {}, yaml_values or {}, overrides or {})
    values: dict[str, Any] = {}
    for layer in layers:
        check_known(TrainConfig, layer, "training option")
        for key, value in layer.items():
            if key == "model_overrides":
                value = {**values.get(key, {}), **_mapping(value)}
            values[key] = value
    if values.get("init_weights") is not None:
        said = set(layers[1]) | set(layers[2])
        from_file = _init_weights_defaults(Path(values["init_weights"]).expanduser())
        values.update({key: value for key, value in from_file.items() if key not in said})
    return TrainConfig(**values)


def _init_weights_defaults(path: Path) -> dict[str, Any]:
    """The model name and preprocessing a weights file records, as training options."""
    metadata = read_metadata(path)
    values = {"model": metadata["model"]} if isinstance(metadata.get("model"), str) else {}
    pre = metadata.get("preprocessing")
    if isinstance(pre, dict):
        keys = ("image_size", "crop_pct", "interpolation", "mean", "std")
        values.update({key: pre[key] for key in keys if key in pre})
    return values


def _mapping(value: Any) -> Any:
    """``model_overrides`` as a mapping to merge (text from ``--set`` read as YAML);
    anything else is left for the type check to name."""
    value = coerce(dict[str, Any], value)
    if not isinstance(value, Mapping):
        raise ValueError(f"model_overrides={value!r} is not a mapping of option: value")
    return value


def to_yaml(config: TrainConfig, recipe: str | None) -> str:
    values = {"recipe": recipe, **dataclasses.asdict(config)}
    return yaml.safe_dump(values, sort_keys=False)


def from_yaml_file(path: Path) -> tuple[TrainConfig, str | None]:
    """A run folder's ``config.yaml`` back into the config it was trained with."""
    values = load_yaml(path)
    recipe = values.pop("recipe", None)
    for key in RETIRED_OPTIONS:
        values.pop(key, None)
    # A resumed run starts from its checkpoint, which records the architecture too: the
    # file it was first started from is no longer needed (it may have moved).
    values.pop("init_weights", None)
    try:
        return from_values(TrainConfig, values, "training option"), recipe
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None
