"""Model names -> (model class, default config), and the one path that builds a model:
from a name and overrides, or from a weights file, whose recorded architecture is
authoritative (a file never loads into a network that computes another function)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xception.config import check_known, from_values
from xception.models.base import FeatureExtractor
from xception.weights import FORMAT, check_file_fits, load_weights, read_metadata

# The classifier: what a new head replaces (ClassifierHead.classifier in every model).
HEAD_PREFIX = "head.classifier."

# Fields a weights file does not pin down: settings of training (dropout, BatchNorm's
# momentum), the default input size, and output_stride, which trades the last strides for
# dilation as DeepLab does with ImageNet weights (the tensors are the same; features_only).
FREE_FIELDS = frozenset({"dropout", "bn_momentum", "image_size", "output_stride"})


@dataclass(frozen=True)
class ModelEntry:
    name: str
    model_class: type[nn.Module]
    config: Any
    description: str


_MODELS: dict[str, ModelEntry] = {}


def register_model(name: str, model_class: type[nn.Module], config: Any, description: str) -> None:
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = ModelEntry(name, model_class, config, description)


def list_models() -> list[str]:
    return sorted(_MODELS)


def get_entry(name: str) -> ModelEntry:
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(
            f"unknown model {name!r}; known models: {', '.join(list_models())}"
        ) from None


def model_config(name: str, **overrides: Any) -> Any:
    """The registered default config of ``name`` with ``overrides`` applied and validated."""
    config = get_entry(name).config
    if overrides:
        check_known(type(config), overrides, f"{name} option")
    return dataclasses.replace(config, **overrides)


def create_model(
    name: str | None = None,
    num_classes: int | None = None,
    weights: str | Path | None = None,
    features_only: bool = False,
    raw: bool = False,
    new_head: bool = False,
    allow_nonfinite: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model, optionally with the weights of a file.

    ``overrides`` are config fields (``residual=False``, ``spatial_groups=8`` ...).
    ``weights`` is a safetensors file: one of this package's files builds the architecture
    it records (``name`` may be omitted), and a name or override that would make the
    network compute another function fails naming the field and both values; a plain
    safetensors file loads strictly into ``name``. ``new_head`` loads everything but the
    classifier, which is initialised afresh (for ``num_classes`` of the caller's, which
    may differ from the file's): the start of fine-tuning. ``raw`` takes a trained file's
    raw (not averaged) weights. ``features_only`` returns a ``FeatureExtractor`` giving
    the maps at strides 2, 4, 8, 16 and 32. A file is checked against the network built on
    the ``meta`` device first, so metadata that describes a huge or different network fails
    before anything is allocated; non-finite weights fail unless ``allow_nonfinite``.
    """
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    if weights is None:
        if name is None:
            raise ValueError("create_model needs a model name or a weights file")
        model = get_entry(name).model_class(model_config(name, **overrides))
    else:
        path = Path(weights).expanduser()
        name, config = weights_config(path, name, new_head, **overrides)
        skip = HEAD_PREFIX if new_head else None
        with torch.device("meta"):
            skeleton = get_entry(name).model_class(config)
        check_file_fits(skeleton, path, raw, skip)
        model = get_entry(name).model_class(config)
        load_weights(model, path, raw, skip, allow_nonfinite)
    return FeatureExtractor(model) if features_only else model


def load_model(
    path: str | Path, raw: bool = False, allow_nonfinite: bool = False
) -> tuple[nn.Module, dict[str, Any]]:
    """The network a weights file records, with its weights, and the file's metadata (its
    class names checked to name the head's outputs)."""
    path = Path(path).expanduser()
    model = create_model(weights=path, raw=raw, allow_nonfinite=allow_nonfinite)
    metadata = read_metadata(path)
    classes = metadata.get("classes")
    if classes is not None:
        if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
            raise ValueError(f"{path} records class names that are not a list of strings")
        if model.num_classes and len(classes) != model.num_classes:
            raise ValueError(
                f"{path} records {len(classes)} class names for a head of "
                f"{model.num_classes} classes"
            )
    return model, metadata


def weights_config(
    path: str | Path, name: str | None = None, new_head: bool = False, **overrides: Any
) -> tuple[str, Any]:
    """The registered name and the config to build for the weights in ``path``: the
    architecture the file records (or, for a plain safetensors file, ``name``'s) with
    ``overrides``, checked to leave the function of the weights alone (``new_head``
    allows another ``num_classes``)."""
    path = Path(path).expanduser()
    metadata = read_metadata(path)
    if metadata.get("format") != FORMAT or "model" not in metadata:
        if name is None:
            raise ValueError(
                f"{path} is not an xception weights file (its metadata names no model); "
                "pass the model name to load its tensors into"
            )
        return name, model_config(name, **overrides)
    recorded, saved = _recorded(metadata, path)
    if name is not None and name != recorded:
        _check_same_network(path, name, model_config(name, **overrides), recorded, saved)
    return recorded, _with_overrides(path, recorded, saved, overrides, new_head)


def _recorded(metadata: dict[str, Any], path: Path) -> tuple[str, Any]:
    """The model name and config a file records, as this version's config."""
    name, values = metadata["model"], metadata.get("config", {})
    if not isinstance(name, str) or name not in _MODELS:
        raise ValueError(f"{path} records model {name!r}, which this version does not know")
    if not isinstance(values, dict):
        raise ValueError(f"{path} records a config that is not a mapping of option: value")
    config_class = type(get_entry(name).config)
    try:
        return name, from_values(config_class, values, f"{name} option")
    except ValueError as error:
        raise ValueError(f"{path} records an invalid config: {error}") from None


def _differences(a: Any, b: Any) -> list[str]:
    """Fields that change the function a network computes and differ between two configs."""
    return [
        field.name
        for field in dataclasses.fields(a)
        if field.name not in FREE_FIELDS and getattr(a, field.name) != getattr(b, field.name)
    ]


def _check_same_network(path: Path, name: str, named: Any, recorded: str, saved: Any) -> None:
    if type(named) is not type(saved):
        raise ValueError(f"{path} holds {recorded} weights, which {name} cannot take")
    differences = [key for key in _differences(named, saved) if key != "num_classes"]
    if differences:
        key = differences[0]
        raise ValueError(
            f"{path} holds {recorded} with {key}={getattr(saved, key)!r}; "
            f"{name} has {key}={getattr(named, key)!r} (omit the name to build the file's model)"
        )


def _with_overrides(
    path: Path, recorded: str, saved: Any, overrides: dict[str, Any], new_head: bool
) -> Any:
    """The file's config with the overrides that leave its function alone."""
    if not overrides:
        return saved
    check_known(type(saved), overrides, f"{recorded} option")
    wanted = dataclasses.replace(saved, **overrides)
    for key in _differences(saved, wanted):
        if key == "num_classes" and new_head:
            continue
        if key == "num_classes":
            raise ValueError(
                f"{path} has {saved.num_classes} classes, not num_classes={wanted.num_classes}; "
                "pass new_head=True (train --init-weights does) for a new classifier"
            )
        raise ValueError(
            f"{path} was saved with {key}={getattr(saved, key)!r}; {key}="
            f"{getattr(wanted, key)!r} would change the function its weights compute"
        )
    return wanted
