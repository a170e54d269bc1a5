"""Model names -> (model class, default config). Configs are frozen dataclasses, so a
variant is a name plus a handful of field values, and any field can be overridden."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn


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
    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"{name} has no option {unknown[0]!r}; options: {', '.join(sorted(known))}"
        )
    return dataclasses.replace(config, **overrides)


def create_model(
    name: str,
    num_classes: int | None = None,
    weights: str | Path | None = None,
    features_only: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Build a registered model.

    ``overrides`` are config fields (``residual=False``, ``spatial_groups=8`` ...).
    ``weights`` is a safetensors file saved by this package. ``features_only`` returns a
    ``FeatureExtractor`` giving the maps at strides 2, 4, 8, 16 and 32.
    """
    from xception.models.base import FeatureExtractor

    if num_classes is not None:
        overrides["num_classes"] = num_classes
    config = model_config(name, **overrides)
    model = get_entry(name).model_class(config)
    if weights is not None:
        from xception.weights import load_weights

        load_weights(model, weights)
    return FeatureExtractor(model) if features_only else model
