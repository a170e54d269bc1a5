"""Weights from other implementations (Keras, timm/Cadene) into this package's format.

Every converter ends in ``save_converted``: the output is one of our self-describing
safetensors files (architecture and config, class names, preprocessing, source, checksum).
"""

from __future__ import annotations

import json
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

from torch import nn

from xception.data.transforms import Preprocessing
from xception.files import sha256
from xception.weights import save_weights

# The preprocessing every supported pretrained file expects: Inception-style, [-1, 1].
PRETRAINED_CROP_PCT = 0.875


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet-1k class names in the standard (synset-sorted) order."""
    text = resources.files("xception").joinpath("imagenet_classes.json").read_text()
    return json.loads(text)


def save_converted(
    model: nn.Module,
    model_name: str,
    out: str | Path,
    source_format: str,
    source_path: Path,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a converted model with the metadata that makes it usable on its own."""
    config = model.config
    classes = (
        imagenet_classes()
        if config.num_classes == 1000
        else [str(i) for i in range(config.num_classes)]
    )
    pre = Preprocessing(image_size=config.image_size, crop_pct=PRETRAINED_CROP_PCT)
    metadata = {
        "classes": classes,
        "preprocessing": asdict(pre),
        "multi_label": False,
        "averaged": False,
        "source": {
            "format": source_format,
            "file": source_path.name,
            "sha256": sha256(source_path),
        },
        **(extra or {}),
    }
    save_weights(model, out, model_name, metadata)
