"""Xception, as drawn in the paper's Fig. 5 (entry flow, middle flow x8, exit flow).

Layer names follow Keras' reference implementation (``block4_sepconv2`` is
``entry_flow.block4.convs.sepconv2``), so a weight file, a stack trace and the paper line up.
Every paper knob is a field of ``XceptionConfig``; the defaults are the paper's model.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from torch import Tensor, nn

from xception.layers import (
    Activation,
    ClassifierHead,
    ConvNormAct,
    MaxPool2d,
    Padding,
    SeparableConv2d,
    activation,
    batch_norm,
    scaled_channels,
)
from xception.models.base import FeatureInfo, ImageClassifier, check_model_config
from xception.registry import register_model


@dataclass(frozen=True)
class XceptionConfig:
    """The paper's model by default; each field is one of its knobs or ablations."""

    num_classes: int = 1000
    in_chans: int = 3
    image_size: int = 299  # default input size (summary, preprocessing); any >= 71 runs
    middle_blocks: int = 8
    width_multiplier: float = 1.0
    residual: bool = True  # Fig. 9 ablation
    mid_activation: Activation = "none"  # between depthwise and pointwise: Fig. 10 ablation
    mid_norm: bool = False  # BatchNorm between depthwise and pointwise (DeepLab's aligned style)
    spatial_groups: int | None = None  # None = depthwise; 1 = regular conv (the spectrum)
    depth_multiplier: int = 1
    fc_layers: tuple[int, ...] = ()  # (4096, 4096) is the JFT "with FC layers" head
    dropout: float = 0.0  # before the logistic regression layer (0.5 in the ImageNet recipe)
    global_pool: Literal["avg", "max"] = "avg"
    output_stride: Literal[8, 16, 32] = 32  # < 32 dilates the last flows (dense prediction)
    padding: Padding = "tf"  # "symmetric" matches timm's port
    bn_eps: float = 1e-3
    bn_momentum: float = 0.01  # Keras' 0.99

    def __post_init__(self) -> None:
        check_model_config(self, MIN_INPUT_SIZE, ("num_classes", "dropout", "middle_blocks"))
        groups = self.spatial_groups
        if groups is None:
            return
        for channels in SEPARABLE_INPUTS:
            if scaled_channels(channels, self.width_multiplier) % groups:
                raise ValueError(
                    f"XceptionConfig.spatial_groups={groups} does not divide the "
                    f"{scaled_channels(channels, self.width_multiplier)} input channels of a "
                    "separable convolution"
                )


MIN_INPUT_SIZE = 71
# Input channels of Fig. 5's separable convolutions at width 1 (the spectrum's group
# counts must divide each of them).
SEPARABLE_INPUTS = (64, 128, 256, 728, 1024, 1536)


class XceptionBlock(nn.Module):
    """A module of Fig. 5: [ReLU, SeparableConv, BN] x n, a 3x3/2 max-pool when it reduces,
    and a linear residual connection (a strided 1x1 conv + BN when the shape changes)."""

    def __init__(
        self,
        in_channels: int,
        channels: tuple[int, ...],
        stride: int,
        dilation: int,
        relu_first: bool,
        config: XceptionConfig,
    ) -> None:
        super().__init__()
        c = config
        out_channels = channels[-1]
        self.shortcut: nn.Module | None = None
        if c.residual:
            # Registered first, as in Keras and timm, so the parameter order lines up.
            self.shortcut = (
                nn.Identity()
                if stride == 1 and in_channels == out_channels
                else ConvNormAct(
                    in_channels,
                    out_channels,
                    1,
                    stride,
                    c.padding,
                    act="none",
                    bn_eps=c.bn_eps,
                    bn_momentum=c.bn_momentum,
                )
            )
        layers: list[nn.Module] = []
        for i, out in enumerate(channels, 1):
            # The first ReLU reads the block's input, which the shortcut reads too.
            unit = separable_unit(
                in_channels, out, dilation, c, relu_before=relu_first or i > 1, shared_input=i == 1
            )
            layers.append(unit)
            in_channels = out
        self.convs = nn.Sequential(
            OrderedDict((f"sepconv{i}", layer) for i, layer in enumerate(layers, 1))
        )
        self.pool = MaxPool2d(3, stride, c.padding) if stride > 1 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        y = self.pool(self.convs(x))
        return y if self.shortcut is None else y + self.shortcut(x)


def separable_unit(
    in_channels: int,
    out_channels: int,
    dilation: int,
    c: XceptionConfig,
    *,
    relu_before: bool = False,
    relu_after: bool = False,
    shared_input: bool = False,
) -> nn.Sequential:
    """[ReLU], SeparableConv 3x3, BN, [ReLU]: every separable layer of Fig. 5.

    ReLUs work in place (less training memory) except on an input another layer also reads.
    """
    conv = SeparableConv2d(
        in_channels,
        out_channels,
        3,
        dilation=dilation,
        groups=c.spatial_groups,
        depth_multiplier=c.depth_multiplier,
        padding=c.padding,
        mid_activation=c.mid_activation,
        mid_norm=c.mid_norm,
        bn_eps=c.bn_eps,
        bn_momentum=c.bn_momentum,
    )
    layers = [("act", activation("relu", inplace=not shared_input))] if relu_before else []
    layers += [("conv", conv), ("bn", batch_norm(out_channels, c.bn_eps, c.bn_momentum))]
    if relu_after:
        layers.append(("act", activation("relu", inplace=True)))
    return nn.Sequential(OrderedDict(layers))


class _Builder:
    """Builds Fig. 5 top to bottom, tracking channels, stride and dilation.

    Once the network stride reaches ``output_stride``, a reducing module keeps its
    resolution (no pool, stride-1 shortcut) and everything after it dilates instead.
    """

    def __init__(self, config: XceptionConfig) -> None:
        self.c = config
        self.channels, self.stride, self.dilation = config.in_chans, 1, 1
        self.outputs: list[tuple[int, int]] = []  # (channels, stride) after each module

    def _advance(self, stride: int) -> tuple[int, int]:
        dilation = self.dilation
        if self.stride * stride > self.c.output_stride:
            self.dilation *= stride
            stride = 1
        self.stride *= stride
        return stride, dilation

    def _done(self, module: nn.Module, channels: int) -> nn.Module:
        self.channels = channels
        self.outputs.append((channels, self.stride))
        return module

    def stem(self, conv1: int, conv2: int) -> nn.Module:
        c = self.c
        conv1, conv2 = (scaled_channels(ch, c.width_multiplier) for ch in (conv1, conv2))
        norm = {"bn_eps": c.bn_eps, "bn_momentum": c.bn_momentum}
        stride, _ = self._advance(2)
        return self._done(
            nn.Sequential(
                OrderedDict(
                    conv1=ConvNormAct(self.channels, conv1, 3, stride, "valid", **norm),
                    conv2=ConvNormAct(conv1, conv2, 3, 1, "valid", **norm),
                )
            ),
            conv2,
        )

    def block(
        self, channels: tuple[int, ...], stride: int = 1, relu_first: bool = True
    ) -> nn.Module:
        channels = tuple(scaled_channels(ch, self.c.width_multiplier) for ch in channels)
        stride, dilation = self._advance(stride)
        return self._done(
            XceptionBlock(self.channels, channels, stride, dilation, relu_first, self.c),
            channels[-1],
        )

    def separable_convs(self, channels: tuple[int, ...]) -> nn.Module:
        layers = OrderedDict()
        for i, out in enumerate(channels, 1):
            out = scaled_channels(out, self.c.width_multiplier)
            layers[f"sepconv{i}"] = separable_unit(
                self.channels, out, self.dilation, self.c, relu_after=True
            )
            self.channels = out
        return self._done(nn.Sequential(layers), self.channels)


class Xception(ImageClassifier):
    """Xception (Chollet, CVPR 2017): 36 convolutions in 14 modules, 22,855,952 parameters."""

    def __init__(self, config: XceptionConfig = XceptionConfig()) -> None:
        super().__init__()
        self.config, self.in_chans, self.min_input_size = config, config.in_chans, MIN_INPUT_SIZE
        fig5 = _Builder(config)
        self.entry_flow = nn.Sequential(
            OrderedDict(
                block1=fig5.stem(32, 64),
                block2=fig5.block((128, 128), stride=2, relu_first=False),
                block3=fig5.block((256, 256), stride=2),
                block4=fig5.block((728, 728), stride=2),
            )
        )
        self.middle_flow = nn.Sequential(
            OrderedDict(
                (f"block{5 + i}", fig5.block((728, 728, 728))) for i in range(config.middle_blocks)
            )
        )
        last = 5 + config.middle_blocks
        self.exit_flow = nn.Sequential(
            OrderedDict(
                [
                    (f"block{last}", fig5.block((728, 1024), stride=2)),
                    (f"block{last + 1}", fig5.separable_convs((1536, 2048))),
                ]
            )
        )
        self.head = ClassifierHead(
            fig5.channels, config.num_classes, config.global_pool, config.fc_layers, config.dropout
        )

        self.stage_names = ("entry_flow", "middle_flow", "exit_flow")
        self.cam_layer = f"exit_flow.block{last + 1}.sepconv2"  # Keras' block14_sepconv2_act
        outputs = fig5.outputs  # stem, block2, block3, block4, middle..., exit block, convs
        self.feature_info = [
            FeatureInfo(name, *outputs[i])
            for name, i in (
                ("entry_flow.block1", 0),
                ("entry_flow.block2", 1),
                ("entry_flow.block3", 2),
                ("middle_flow", -3),
                ("exit_flow", -1),
            )
        ]


_PAPER = XceptionConfig()
register_model("xception", Xception, _PAPER, "Xception as in the paper (Fig. 5), 299x299")
register_model(
    "xception_small",
    Xception,
    XceptionConfig(width_multiplier=0.5, middle_blocks=4, image_size=128),
    "Xception at half width and half middle flow, for single-GPU/CPU experiments",
)
register_model(
    "xception_tiny",
    Xception,
    XceptionConfig(width_multiplier=0.25, middle_blocks=2, image_size=96),
    "Xception at quarter width, 2 middle blocks: trains on a laptop CPU",
)
