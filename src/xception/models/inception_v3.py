"""Inception V3, the paper's baseline, in two topologies.

- ``inception_v3``: today's common topology, module for module torchvision's
  ``inception_v3(aux_logits=False)`` (conv without bias -> BN -> ReLU), so its weights load
  through ``torchvision_key_map``. 23,834,568 parameters.
- ``inception_v3_paper``: the Keras 1.x (2016) model the paper benchmarked (Table 3,
  23,626,728 parameters): conv with bias -> ReLU -> BN, 32-channel pool projections in all
  three 35x35 modules, a 160-channel 1x1 opening the second 7x7 tower of the last 17x17
  module, and an average pool in the 17x17 -> 8x8 reduction.

Both use torchvision's module names; Keras' ``mixed0`` ... ``mixed10`` are ``Mixed_5b`` ...
``Mixed_7c`` in order. Every 'same' layer of Inception V3 has stride 1 and an odd kernel,
where TensorFlow's SAME and symmetric padding coincide, so ``padding`` only records the
convention; all stride-2 layers are 'valid'.

``width_multiplier`` scales every convolution's output channels with Xception's rule
(``scaled_channels``); each unit's input is the actual width of what feeds it and each
module's ``out_channels`` the actual sum of its towers, so any width stays consistent.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import nn

from xception.layers import ClassifierHead, ConvNormAct, scaled_channels
from xception.models.base import FeatureInfo, ImageClassifier, check_model_config
from xception.registry import register_model

MIN_INPUT_SIZE = 75
# The auxiliary tower's 5x5/3 pool and 5x5 'valid' conv need the 17x17 map at full size.
AUX_MIN_INPUT_SIZE = 299
AUX_TAP = "Mixed_6e"
FEATURE_TAPS = {
    "Conv2d_2b_3x3": 2,
    "Conv2d_4a_3x3": 4,
    "Mixed_5d": 8,
    "Mixed_6e": 16,
    "Mixed_7c": 32,
}

Kernel = int | tuple[int, int]


@dataclass(frozen=True)
class InceptionV3Config:
    """``paper_topology`` selects the Keras 1.x model. ``avg_pool_count_include_pad``:
    torchvision's 3x3/1 branch pools count the zero padding (True), Keras/TF SAME average
    pooling does not (False), so Keras weights need False. ``dropout`` stays 0: the paper's
    0.5 belongs to the training recipe. ``width_multiplier`` scales every convolution's
    channels (stem, modules, aux tower); ``fc_layers`` are hidden fully-connected layers
    before the logistic regression (not in the aux tower's head)."""

    num_classes: int = 1000
    in_chans: int = 3
    image_size: int = 299
    width_multiplier: float = 1.0
    fc_layers: tuple[int, ...] = ()  # (4096, 4096) is the JFT "with FC layers" head
    dropout: float = 0.0
    global_pool: Literal["avg", "max"] = "avg"
    aux_logits: bool = False
    bn_eps: float = 1e-3
    bn_momentum: float = 0.01
    padding: Literal["tf", "symmetric"] = "symmetric"
    paper_topology: bool = False
    avg_pool_count_include_pad: bool = True

    def __post_init__(self) -> None:
        check_model_config(self, MIN_INPUT_SIZE)


def conv2d_bn(
    config: InceptionV3Config,
    in_ch: int,
    out_ch: int,
    kernel: Kernel,
    stride: int = 1,
    *,
    valid: bool = False,
) -> ConvNormAct:
    """Keras' ``conv2d_bn``: Keras 1.x put a biased conv's ReLU before the BatchNorm.

    ``out_ch`` is the width-1.0 channel count, scaled here by ``config.width_multiplier``;
    ``in_ch`` is the actual width of the input.
    """
    return ConvNormAct(
        in_ch,
        scaled_channels(out_ch, config.width_multiplier),
        kernel,
        stride,
        "valid" if valid else config.padding,
        bias=config.paper_topology,
        norm_after_act=config.paper_topology,
        bn_eps=config.bn_eps,
        bn_momentum=config.bn_momentum,
    )


def channels(*units: ConvNormAct) -> int:
    """The units' output channels together: the width of their concatenation."""
    return sum(unit.conv.out_channels for unit in units)


def branch_avg_pool(config: InceptionV3Config) -> nn.AvgPool2d:
    return nn.AvgPool2d(3, 1, 1, count_include_pad=config.avg_pool_count_include_pad)


def chain(x: torch.Tensor, *layers: nn.Module) -> torch.Tensor:
    """One tower; the layers stay flat attributes of the module to keep torchvision's names."""
    for layer in layers:
        x = layer(x)
    return x


class Mixed(nn.Module):
    """An Inception module: parallel towers concatenated along channels."""

    out_channels: int


class InceptionA(Mixed):
    """35x35 module (mixed0-2): 1x1, 5x5, double 3x3 and pool-projection towers."""

    def __init__(self, config: InceptionV3Config, in_ch: int, pool_features: int) -> None:
        super().__init__()
        conv = partial(conv2d_bn, config)
        self.branch1x1 = conv(in_ch, 64, 1)
        self.branch5x5_1 = conv(in_ch, 48, 1)
        self.branch5x5_2 = conv(channels(self.branch5x5_1), 64, 5)
        self.branch3x3dbl_1 = conv(in_ch, 64, 1)
        self.branch3x3dbl_2 = conv(channels(self.branch3x3dbl_1), 96, 3)
        self.branch3x3dbl_3 = conv(channels(self.branch3x3dbl_2), 96, 3)
        self.pool = branch_avg_pool(config)
        self.branch_pool = conv(in_ch, pool_features, 1)
        self.out_channels = channels(
            self.branch1x1, self.branch5x5_2, self.branch3x3dbl_3, self.branch_pool
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                chain(x, self.branch5x5_1, self.branch5x5_2),
                chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                chain(x, self.pool, self.branch_pool),
            ],
            1,
        )


class InceptionB(Mixed):
    """35x35 -> 17x17 reduction (mixed3): strided towers beside a max pool."""

    def __init__(self, config: InceptionV3Config, in_ch: int) -> None:
        super().__init__()
        conv = partial(conv2d_bn, config)
        self.branch3x3 = conv(in_ch, 384, 3, 2, valid=True)
        self.branch3x3dbl_1 = conv(in_ch, 64, 1)
        self.branch3x3dbl_2 = conv(channels(self.branch3x3dbl_1), 96, 3)
        self.branch3x3dbl_3 = conv(channels(self.branch3x3dbl_2), 96, 3, 2, valid=True)
        self.pool = nn.MaxPool2d(3, 2)
        self.out_channels = channels(self.branch3x3, self.branch3x3dbl_3) + in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch3x3(x),
                chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2, self.branch3x3dbl_3),
                self.pool(x),
            ],
            1,
        )


class InceptionC(Mixed):
    """17x17 module (mixed4-7): 7x7 convolutions factorised into 1x7 and 7x1.

    ``c7`` is the towers' inner width; ``c7dbl_in`` (default ``c7``) the 1x1 that opens the
    second tower, which Keras 1.x left at 160 in mixed7.
    """

    def __init__(
        self, config: InceptionV3Config, in_ch: int, c7: int, c7dbl_in: int | None = None
    ) -> None:
        super().__init__()
        conv = partial(conv2d_bn, config)
        c7dbl_in = c7 if c7dbl_in is None else c7dbl_in
        self.branch1x1 = conv(in_ch, 192, 1)
        self.branch7x7_1 = conv(in_ch, c7, 1)
        self.branch7x7_2 = conv(channels(self.branch7x7_1), c7, (1, 7))
        self.branch7x7_3 = conv(channels(self.branch7x7_2), 192, (7, 1))
        self.branch7x7dbl_1 = conv(in_ch, c7dbl_in, 1)
        self.branch7x7dbl_2 = conv(channels(self.branch7x7dbl_1), c7, (7, 1))
        self.branch7x7dbl_3 = conv(channels(self.branch7x7dbl_2), c7, (1, 7))
        self.branch7x7dbl_4 = conv(channels(self.branch7x7dbl_3), c7, (7, 1))
        self.branch7x7dbl_5 = conv(channels(self.branch7x7dbl_4), 192, (1, 7))
        self.pool = branch_avg_pool(config)
        self.branch_pool = conv(in_ch, 192, 1)
        self.out_channels = channels(
            self.branch1x1, self.branch7x7_3, self.branch7x7dbl_5, self.branch_pool
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                self.branch1x1(x),
                chain(x, self.branch7x7_1, self.branch7x7_2, self.branch7x7_3),
                chain(
                    x,
                    self.branch7x7dbl_1,
                    self.branch7x7dbl_2,
                    self.branch7x7dbl_3,
                    self.branch7x7dbl_4,
                    self.branch7x7dbl_5,
                ),
                chain(x, self.pool, self.branch_pool),
            ],
            1,
        )


class InceptionD(Mixed):
    """17x17 -> 8x8 reduction (mixed8); Keras 1.x pooled its third branch by averaging."""

    def __init__(self, config: InceptionV3Config, in_ch: int, avg_pool: bool = False) -> None:
        super().__init__()
        conv = partial(conv2d_bn, config)
        self.branch3x3_1 = conv(in_ch, 192, 1)
        self.branch3x3_2 = conv(channels(self.branch3x3_1), 320, 3, 2, valid=True)
        self.branch7x7x3_1 = conv(in_ch, 192, 1)
        self.branch7x7x3_2 = conv(channels(self.branch7x7x3_1), 192, (1, 7))
        self.branch7x7x3_3 = conv(channels(self.branch7x7x3_2), 192, (7, 1))
        self.branch7x7x3_4 = conv(channels(self.branch7x7x3_3), 192, 3, 2, valid=True)
        self.pool = nn.AvgPool2d(3, 2) if avg_pool else nn.MaxPool2d(3, 2)
        self.out_channels = channels(self.branch3x3_2, self.branch7x7x3_4) + in_ch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(
            [
                chain(x, self.branch3x3_1, self.branch3x3_2),
                chain(
                    x,
                    self.branch7x7x3_1,
                    self.branch7x7x3_2,
                    self.branch7x7x3_3,
                    self.branch7x7x3_4,
                ),
                self.pool(x),
            ],
            1,
        )


class InceptionE(Mixed):
    """8x8 module (mixed9-10): 3x3 towers that fan out into parallel 1x3 and 3x1 convs."""

    def __init__(self, config: InceptionV3Config, in_ch: int) -> None:
        super().__init__()
        conv = partial(conv2d_bn, config)
        self.branch1x1 = conv(in_ch, 320, 1)
        self.branch3x3_1 = conv(in_ch, 384, 1)
        self.branch3x3_2a = conv(channels(self.branch3x3_1), 384, (1, 3))
        self.branch3x3_2b = conv(channels(self.branch3x3_1), 384, (3, 1))
        self.branch3x3dbl_1 = conv(in_ch, 448, 1)
        self.branch3x3dbl_2 = conv(channels(self.branch3x3dbl_1), 384, 3)
        self.branch3x3dbl_3a = conv(channels(self.branch3x3dbl_2), 384, (1, 3))
        self.branch3x3dbl_3b = conv(channels(self.branch3x3dbl_2), 384, (3, 1))
        self.pool = branch_avg_pool(config)
        self.branch_pool = conv(in_ch, 192, 1)
        self.out_channels = channels(
            self.branch1x1,
            self.branch3x3_2a,
            self.branch3x3_2b,
            self.branch3x3dbl_3a,
            self.branch3x3dbl_3b,
            self.branch_pool,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tower = self.branch3x3_1(x)
        dbl = chain(x, self.branch3x3dbl_1, self.branch3x3dbl_2)
        return torch.cat(
            [
                self.branch1x1(x),
                self.branch3x3_2a(tower),
                self.branch3x3_2b(tower),
                self.branch3x3dbl_3a(dbl),
                self.branch3x3dbl_3b(dbl),
                chain(x, self.pool, self.branch_pool),
            ],
            1,
        )


def mixed_table(paper: bool) -> list[tuple[str, Callable[[InceptionV3Config, int], Mixed]]]:
    """The eleven modules; the two topologies differ only where ``paper`` appears."""
    pool_features = 32 if paper else 64
    return [
        ("Mixed_5b", partial(InceptionA, pool_features=32)),
        ("Mixed_5c", partial(InceptionA, pool_features=pool_features)),
        ("Mixed_5d", partial(InceptionA, pool_features=pool_features)),
        ("Mixed_6a", InceptionB),
        ("Mixed_6b", partial(InceptionC, c7=128)),
        ("Mixed_6c", partial(InceptionC, c7=160)),
        ("Mixed_6d", partial(InceptionC, c7=160)),
        ("Mixed_6e", partial(InceptionC, c7=192, c7dbl_in=160 if paper else 192)),
        ("Mixed_7a", partial(InceptionD, avg_pool=paper)),
        ("Mixed_7b", InceptionE),
        ("Mixed_7c", InceptionE),
    ]


def backbone(config: InceptionV3Config) -> list[tuple[str, nn.Module, int]]:
    """(name, module, output channels) in forward order: the stem, then the mixed modules."""
    conv = partial(conv2d_bn, config)
    stem: list[tuple[str, Callable[[int], nn.Module]]] = [
        ("Conv2d_1a_3x3", partial(conv, out_ch=32, kernel=3, stride=2, valid=True)),
        ("Conv2d_2a_3x3", partial(conv, out_ch=32, kernel=3, valid=True)),
        ("Conv2d_2b_3x3", partial(conv, out_ch=64, kernel=3)),
        ("maxpool1", lambda _: nn.MaxPool2d(3, 2)),
        ("Conv2d_3b_1x1", partial(conv, out_ch=80, kernel=1, valid=True)),
        ("Conv2d_4a_3x3", partial(conv, out_ch=192, kernel=3, valid=True)),
        ("maxpool2", lambda _: nn.MaxPool2d(3, 2)),
    ]
    mixed = [(name, partial(block, config)) for name, block in mixed_table(config.paper_topology)]
    stages: list[tuple[str, nn.Module, int]] = []
    width = config.in_chans
    for name, make in stem + mixed:
        module = make(width)
        if isinstance(module, ConvNormAct):
            width = channels(module)
        elif isinstance(module, Mixed):
            width = module.out_channels
        stages.append((name, module, width))  # pools keep their input's width
    return stages


def aux_tower(config: InceptionV3Config, in_ch: int) -> nn.Sequential:
    """torchvision's auxiliary classifier on the 17x17 map (the paper trains without it)."""
    conv = partial(conv2d_bn, config)
    conv0 = conv(in_ch, 128, 1)
    conv1 = conv(channels(conv0), 768, 5, valid=True)
    return nn.Sequential(
        OrderedDict(
            pool=nn.AvgPool2d(5, 3),
            conv0=conv0,
            conv1=conv1,
            head=ClassifierHead(channels(conv1), config.num_classes),
        )
    )


class InceptionV3(ImageClassifier):
    """Inception V3 without (by default) the auxiliary tower, as the paper compares it."""

    def __init__(self, config: InceptionV3Config = InceptionV3Config()) -> None:
        super().__init__()
        self.config = config
        self.in_chans = config.in_chans
        self.min_input_size = MIN_INPUT_SIZE
        stages = backbone(config)
        self.AuxLogits: nn.Sequential | None = None
        for name, module, channels in stages:
            self.add_module(name, module)
            if name == AUX_TAP and config.aux_logits:
                self.AuxLogits = aux_tower(config, channels)  # registered here: torchvision order
        self.stage_names = tuple(name for name, _, _ in stages)
        self.cam_layer = "Mixed_7c"  # the last 8x8 module
        self.feature_info = [
            FeatureInfo(name, channels, FEATURE_TAPS[name])
            for name, _, channels in stages
            if name in FEATURE_TAPS
        ]
        self.head = ClassifierHead(
            self.num_features,
            config.num_classes,
            config.global_pool,
            config.fc_layers,
            config.dropout,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits; ``(logits, aux_logits)`` while training with the auxiliary tower."""
        if self.AuxLogits is None or not self.training:
            return super().forward(x)
        self.check_input(x)
        if min(x.shape[-2:]) < AUX_MIN_INPUT_SIZE:
            raise ValueError(
                f"training with aux_logits needs H, W >= {AUX_MIN_INPUT_SIZE}, got {tuple(x.shape)}"
            )
        for name in self.stage_names:
            x = self.get_submodule(name)(x)
            if name == AUX_TAP:
                aux = self.AuxLogits(x)
        return self.forward_head(x), aux


def torchvision_key_map(model: InceptionV3) -> dict[str, str]:
    """Our state-dict keys -> torchvision ``inception_v3``'s, in order, same shapes.

    Only the classifiers are named differently: ``head.classifier`` is torchvision's ``fc``
    (``AuxLogits.head.classifier`` its ``AuxLogits.fc``).
    """
    return {key: key.replace("head.classifier.", "fc.") for key in model.state_dict()}


register_model(
    "inception_v3",
    InceptionV3,
    InceptionV3Config(),
    "Inception V3, common modern topology (torchvision/timm), no aux tower",
)
register_model(
    "inception_v3_paper",
    InceptionV3,
    InceptionV3Config(padding="tf", paper_topology=True, avg_pool_count_include_pad=False),
    "Inception V3 as benchmarked in the paper (Keras 1.x, 23,626,728 parameters)",
)
