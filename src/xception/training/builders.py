"""What a training run is made of, built from its config: the data splits, the model,
the optimiser, the learning-rate schedule and the loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from xception.data.folder import Split, discover
from xception.data.synthetic import materialize
from xception.distributed import World, barrier
from xception.registry import get_entry
from xception.training.config import TrainConfig
from xception.training.optim import LRSchedule, RMSpropTF, param_groups, scale_lr


def build_splits(config: TrainConfig, world: World, progress: bool) -> dict[str, Split]:
    """The train and val splits, checked against the config. The built-in data set is
    rendered once, by rank 0, while the other ranks wait."""
    spec = config.builtin_data()
    if spec is None:
        splits = discover(config.data)
    else:
        if world.is_main:
            materialize(spec, progress=progress)
        barrier(world)
        splits = discover(materialize(spec, progress=False))
    if config.multi_label and not splits["train"].multi_label:
        raise ValueError(
            f"multi_label=true needs multi-label data: {config.data} holds class folders, "
            "not train.csv/val.csv manifests"
        )
    return splits


def build_model(config: TrainConfig, num_classes: int) -> nn.Module:
    model_config = config.model_config(num_classes)
    return get_entry(config.model).model_class(model_config)


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


def loss(
    logits: torch.Tensor, targets: torch.Tensor, multi_label: bool, label_smoothing: float
) -> torch.Tensor:
    """Sigmoid cross-entropy for multi-label data (the paper's JFT), softmax otherwise."""
    if multi_label:
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float())
    return F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
