"""What every model shares: input validation, the features/head split, feature taps."""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass, fields

import torch
from torch import nn

from xception.layers import ClassifierHead


@dataclass(frozen=True)
class FeatureInfo:
    """One feature map a model exposes: where it is taken, its channels and its stride."""

    module: str
    channels: int
    reduction: int


def _accepts(hint: object, value: object) -> bool:
    """Whether ``value`` fits a simple annotation (classes, unions, tuples, dicts; Literal
    values are left to ``check_choice``, which names the choices)."""
    origin = typing.get_origin(hint)
    if hint is typing.Any or origin is typing.Literal:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_accepts(arg, value) for arg in typing.get_args(hint))
    if origin is tuple:
        return isinstance(value, tuple) and all(
            _accepts(typing.get_args(hint)[0], v) for v in value
        )
    if origin is dict:
        return isinstance(value, dict)
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint) if isinstance(hint, type) else True


def check_types(config: object) -> None:
    """Reject a field of the wrong type (``fc_layers=4096``, ``epochs="ten"``), naming it."""
    hints = typing.get_type_hints(type(config))
    for field in fields(config):  # type: ignore[arg-type]
        value = getattr(config, field.name)
        if not _accepts(hints[field.name], value):
            raise ValueError(f"{field.name}={value!r} is not a valid {field.type}")


def check_config(config: object, allow_zero: tuple[str, ...] = ("num_classes", "dropout")) -> None:
    """Reject wrong types and negative (or, outside ``allow_zero``, zero) numbers early,
    naming the field."""
    check_types(config)
    for field in fields(config):  # type: ignore[arg-type]
        value = getattr(config, field.name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if value < 0 or (value == 0 and field.name not in allow_zero):
            raise ValueError(f"{type(config).__name__}.{field.name}={value} must be positive")


class ImageClassifier(nn.Module):
    """Base of all models: ``forward = forward_head(forward_features(x))``.

    A subclass builds ``self.head`` (a ``ClassifierHead``), names its backbone pieces in
    forward order in ``stage_names`` (the backbone is exactly their composition), lists
    the feature taps in ``feature_info`` (each a stage or a module nested in stages that
    are ``nn.Sequential``), and sets ``in_chans`` and ``min_input_size``.
    """

    head: ClassifierHead
    stage_names: tuple[str, ...]
    feature_info: list[FeatureInfo]
    in_chans: int
    min_input_size: int

    def check_input(self, x: torch.Tensor) -> None:
        """Fail with the expected shape rather than deep inside a convolution."""
        if (
            x.ndim != 4
            or x.shape[1] != self.in_chans
            or x.shape[-2] < self.min_input_size
            or x.shape[-1] < self.min_input_size
        ):
            raise ValueError(
                f"expected input of shape (N, {self.in_chans}, H, W) with H, W >= "
                f"{self.min_input_size}, got {tuple(x.shape)}"
            )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        for name in self.stage_names:
            x = self.get_submodule(name)(x)
        return x

    def forward_intermediates(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature maps listed in ``feature_info``, shallowest first."""
        self.check_input(x)
        taps = tuple(info.module for info in self.feature_info)
        maps: list[torch.Tensor] = []
        for name in self.stage_names:
            x = self._run_tapped(name, x, taps, maps)
        return maps

    def _run_tapped(
        self, name: str, x: torch.Tensor, taps: tuple[str, ...], maps: list[torch.Tensor]
    ) -> torch.Tensor:
        """Run module ``name``, descending into a Sequential when a tap lies inside it."""
        module = self.get_submodule(name)
        if isinstance(module, nn.Sequential) and any(t.startswith(f"{name}.") for t in taps):
            for child in module._modules:
                x = self._run_tapped(f"{name}.{child}", x, taps, maps)
        else:
            x = module(x)
            if name in taps:
                maps.append(x)
        return x

    @property
    def num_features(self) -> int:
        """Width of the head's input (the last feature map's channels)."""
        return self.feature_info[-1].channels

    @property
    def num_classes(self) -> int:
        classifier = self.head.classifier
        return classifier.out_features if isinstance(classifier, nn.Linear) else 0

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Swap the logistic regression layer, e.g. to fine-tune on another label set."""
        self.head.reset(num_classes)


class FeatureExtractor(nn.Module):
    """A backbone that returns its feature pyramid instead of logits (dense prediction)."""

    def __init__(self, model: ImageClassifier) -> None:
        super().__init__()
        model.reset_classifier(0)
        self.model = model
        self.feature_info = list(model.feature_info)

    @property
    def channels(self) -> list[int]:
        return [info.channels for info in self.feature_info]

    @property
    def reductions(self) -> list[int]:
        return [info.reduction for info in self.feature_info]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.model.forward_intermediates(x)
