"""Small training runs shared by the training tests: xception_tiny at 72 px on the
3-colour image folder, a few steps of 8 images."""

import torch
from safetensors.torch import load_file

from xception.training.config import resolve


def config(folder, **overrides):
    values = dict(
        data=str(folder),
        model="xception_tiny",
        image_size=72,
        batch_size=8,
        epochs=2,
        workers=0,
        log_every=1,
        dropout=0.2,
        ema_decay=0.9,
        warmup_steps=2,
        eval_batch_size=16,
    )
    values.update(overrides)
    return resolve("quick", overrides=values)


def weights(path):
    return load_file(path)


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
