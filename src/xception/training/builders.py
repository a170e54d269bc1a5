"""What a training run is made of, built from its config: the data splits, the model,
the optimiser, the learning-rate schedule and the loss."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from xception.data.folder import Split, discover
from xception.data.loaders import open_data
from xception.data.shards import ShardSplit
from xception.data.synthetic import materialize
from xception.distributed import World, barrier
from xception.registry import HEAD_PREFIX, get_entry, weights_config
from xception.training.config import TrainConfig
from xception.training.optim import LRSchedule, RMSpropTF, param_groups, scale_lr
from xception.weights import load_weights, read_metadata


def build_splits(
    config: TrainConfig, world: World, progress: bool
) -> dict[str, Split | ShardSplit]:
    """The train and val splits, checked against the config. The built-in data set is
    rendered once, by rank 0, while the other ranks wait."""
    spec = config.builtin_data()
    if spec is None:
        splits = open_data(config.data)
    else:
        if world.is_main:
            materialize(spec, progress=progress)
        barrier(world)
        splits = discover(materialize(spec, progress=False))
    if config.multi_label and not splits["train"].multi_label:
        raise ValueError(
            f"multi_label=true needs multi-label data: {config.data} is single-label "
            "(class folders, a path,label manifest or shards made of them)"
        )
    return splits


def build_model(
    config: TrainConfig, classes: tuple[str, ...], checkpoint: Path | None = None
) -> tuple[nn.Module, str | None]:
    """The model to train (of the architecture ``checkpoint`` records when resuming), and
    what happened to the head of ``init_weights`` (None without it): kept when the file
    was trained on these classes, else new."""
    model = get_entry(config.model).model_class(config.model_config(len(classes), checkpoint))
    if config.init_weights is None:
        return model, None
    path = Path(config.init_weights).expanduser()
    metadata = read_metadata(path)
    new_head = list(classes) != metadata.get("classes")
    load_weights(model, path, skip=HEAD_PREFIX if new_head else None)
    if not new_head:
        return model, f"{path}: every layer loaded, head.classifier included"
    if not metadata.get("format"):
        had = "the file names no classes"
    elif weights_config(path)[1].num_classes == 0:
        had = "the file's had no classifier"
    else:
        had = f"the file's had {weights_config(path)[1].num_classes} other classes"
    return model, f"{path}: backbone loaded; new head.classifier for {len(classes)} classes ({had})"


def freeze(model: nn.Module, backbone: bool, batch_norm: bool) -> None:
    """Which parameters train: with ``backbone``, only the head's (the classifier and any
    FC layers); with ``batch_norm``, no BatchNorm's scale and shift. Frozen BatchNorms run
    in inference mode, so their statistics stay as loaded (Keras' behaviour for a frozen
    base). Called at construction and at each epoch's start, after ``model.train()``."""
    head = {id(p) for p in model.head.parameters()}
    for module in model.modules():
        is_norm = isinstance(module, nn.modules.batchnorm._BatchNorm)
        own = list(module.parameters(recurse=False))
        frozen_backbone = backbone and not any(id(p) in head for p in own)
        if is_norm and (batch_norm or frozen_backbone):
            module.eval()
        for param in own:
            param.requires_grad_(
                not ((backbone and id(param) not in head) or (batch_norm and is_norm))
            )
    if not any(param.requires_grad for param in model.parameters()):
        raise ValueError("nothing is left to train: every parameter is frozen")


def build_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Over the parameters that train at some point (``freeze_epochs`` ones included)."""
    groups = param_groups(
        model, config.weight_decay, config.spatial_lr_fan_in, config.head_lr_scale
    )
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


def build_schedule(config: TrainConfig, total_steps: int) -> LRSchedule:
    lr = config.lr
    if config.lr_reference_batch:
        lr = scale_lr(lr, config.batch_size, config.lr_reference_batch)
    return LRSchedule(
        lr,
        config.lr_decay,
        config.lr_decay_every,
        config.lr_decay_unit,
        config.warmup_steps,
        config.lr_schedule,
        total_steps,
    )


def class_balance(split: Split | ShardSplit) -> torch.Tensor:
    """Loss weights ``N / (C * n_c)``: every class weighs as much as a balanced data set's
    (every class has training images: the split's classes come from them)."""
    counts = torch.tensor(split.class_counts(), dtype=torch.float32)
    return counts.sum() / (len(counts) * counts)


def loss(
    logits: torch.Tensor,
    targets: torch.Tensor,
    multi_label: bool,
    label_smoothing: float,
    class_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sigmoid cross-entropy for multi-label data (the paper's JFT), softmax otherwise.
    ``targets`` are class indices or, after mixup or cutmix, probabilities."""
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float())
    return F.cross_entropy(
        logits.float(), targets, weight=class_weights, label_smoothing=label_smoothing
    )
