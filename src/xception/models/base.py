"""What every model shares: input validation, the features/head split, feature taps."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from xception.config import check_numbers, normalize
from xception.layers import ClassifierHead


@dataclass(frozen=True)
class FeatureInfo:
    """One feature map a model exposes: where it is taken, its channels and its stride."""

    module: str
    channels: int
    reduction: int


def check_model_config(
    config: object, min_input_size: int, allow_zero: tuple[str, ...] = ("num_classes", "dropout")
) -> None:
    """What every model config checks in ``__post_init__``: field types and choices, no
    negative numbers (nor zeros outside ``allow_zero``), dropout in [0, 1), BatchNorm
    momentum in (0, 1], a default input size the network accepts."""
    normalize(config)
    check_numbers(config, allow_zero)
    name = type(config).__name__
    if not 0 <= config.dropout < 1:
        raise ValueError(f"{name}.dropout={config.dropout} must be in [0, 1)")
    if config.bn_momentum > 1:
        raise ValueError(f"{name}.bn_momentum={config.bn_momentum} must be in (0, 1]")
    if any(units < 1 for units in getattr(config, "fc_layers", ())):
        raise ValueError(f"{name}.fc_layers={config.fc_layers} must hold positive widths")
    if config.image_size < min_input_size:
        raise ValueError(
            f"{name}.image_size={config.image_size} is below the minimum input size "
            f"{min_input_size}"
        )


class ImageClassifier(nn.Module):
    """Base of all models: ``forward = forward_head(forward_features(x))``.

    A subclass builds ``self.head`` (a ``ClassifierHead``), names its backbone pieces in
    forward order in ``stage_names`` (the backbone is exactly their composition), lists
    the feature taps in ``feature_info`` (each a stage or a module nested in stages that
    are ``nn.Sequential``), and sets ``in_chans``, ``min_input_size`` and ``cam_layer``
    (the module whose maps Grad-CAM weighs by default).
    """

    head: ClassifierHead
    stage_names: tuple[str, ...]
    cam_layer: str
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
        """Swap the logistic regression layer, e.g. to fine-tune on another label set. The
        config follows, so a weights file saved afterwards describes the new head."""
        self.head.reset(num_classes)
        self.config = dataclasses.replace(self.config, num_classes=num_classes)


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
