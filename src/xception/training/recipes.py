"""Named recipes: presets of ``TrainConfig`` fields (``training.config``): the paper's two
(section 4.3-4.4), one for the built-in data set on a CPU, and one for fine-tuning
pretrained weights on a small labelled set.

A recipe sets only what it means to; everything else keeps the dataclass default, and
any field can still be changed with a flag, ``--set`` or a YAML file.
"""

from __future__ import annotations

from typing import Any

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
    # With --init-weights, which sets the model and preprocessing. Why each value:
    # - AdamW adapts each parameter's step, so one rate suits a pretrained backbone and a
    #   new head; decoupled weight decay 0.05, as timm's and DeiT's fine-tuning recipes.
    # - lr 1e-3 at batch 32, a third of `quick`'s from-scratch rate: pretrained features
    #   need nudging, not rebuilding; the new head, which starts from nothing, moves 10x
    #   faster (head_lr_scale).
    # - Cosine decay after a 50-step warm-up: the first steps of a random head send large
    #   gradients into the backbone, the warm-up keeps them small; the cosine ends the run
    #   at a small rate, without the staircase's tuning of steps.
    # - Label smoothing 0.1: few images a class make a model over-confident.
    # - Polyak averaging at 0.998 (a window of ~500 steps, as `quick`): short runs.
    # - 10 epochs of batch 32: small sets need more, smaller steps than big ones.
    "finetune": dict(
        optimizer="adamw",
        lr=1e-3,
        head_lr_scale=10.0,
        weight_decay=0.05,
        lr_schedule="cosine",
        warmup_steps=50,
        label_smoothing=0.1,
        ema_decay=0.998,
        batch_size=32,
        epochs=10,
    ),
}
