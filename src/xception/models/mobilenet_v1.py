"""MobileNet V1 (Howard et al., 2017), the topology of ``keras.applications.MobileNet``.

A 3x3/2 stem, then 13 depthwise separable blocks (depthwise 3x3 + BN + ReLU6, pointwise
1x1 + BN + ReLU6), downsampling in the depthwise layers, global average pooling, dropout
and a linear classifier. The paper draws ReLU; Keras (whose ImageNet weights this model
must reproduce) uses ReLU6, so that is the default and ``activation="relu"`` gives the paper.

Padding is TF SAME ("tf"), as in Keras' stem. Keras pads the stride-2 depthwise inputs
by ((0, 1), (0, 1)) explicitly, which is TF SAME when that input is even: the outputs are
equal whenever ceil(size / 2) is a multiple of 16 (every multiple of 32: 128, 160, 224 ...).
At other sizes Keras' windows sit one pixel off; TF SAME does not depend on parity.

Module order is Keras' weight order (``keras_layer_order`` pairs the names), so the
state dict minus ``num_batches_tracked`` lines up with ``keras_model.get_weights()``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

from torch import nn

from xception.layers import ClassifierHead, ConvNormAct
from xception.models.base import FeatureInfo, ImageClassifier, check_model_config
from xception.registry import register_model

MIN_INPUT_SIZE = 32
STEM_CHANNELS = 32
# (pointwise channels, depthwise stride) of Keras' conv_dw_1 ... conv_dw_13 blocks.
BLOCKS: tuple[tuple[int, int], ...] = (
    (64, 1),
    (128, 2),
    (128, 1),
    (256, 2),
    (256, 1),
    (512, 2),
    *((512, 1),) * 5,
    (1024, 2),
    (1024, 1),
)


@dataclass(frozen=True)
class MobileNetV1Config:
    """Keras' ``MobileNet`` defaults; ``alpha`` is the width multiplier."""

    num_classes: int = 1000
    in_chans: int = 3
    image_size: int = 224  # default input size (summary, preprocessing); any >= 32 runs
    alpha: float = 1.0
    dropout: float = 1e-3  # Keras' default, i.e. TF-slim's dropout_keep_prob=0.999
    global_pool: Literal["avg", "max"] = "avg"
    activation: Literal["relu6", "relu"] = "relu6"  # "relu" is the paper's drawing
    # "symmetric" is PyTorch-style padding; no "valid": Keras' padding is only SAME-like,
    # and "valid" would shrink 32x32 inputs to nothing.
    padding: Literal["tf", "symmetric"] = "tf"
    bn_eps: float = 1e-3
    bn_momentum: float = 0.01  # Keras' 0.99

    def __post_init__(self) -> None:
        check_model_config(self, MIN_INPUT_SIZE)
        if width(STEM_CHANNELS, self.alpha) < 1:
            raise ValueError(
                f"MobileNetV1Config.alpha={self.alpha} leaves the stem with no channels "
                f"(needs alpha >= 1/{STEM_CHANNELS})"
            )


def width(channels: int, alpha: float) -> int:
    """Channels under the width multiplier, truncated as Keras does (no rounding to 8)."""
    return int(channels * alpha)


def conv_unit(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int,
    c: MobileNetV1Config,
    groups: int = 1,
) -> ConvNormAct:
    """Conv (no bias), BN, activation, named ``conv``/``bn``/``act`` like every ConvNormAct."""
    return ConvNormAct(
        in_channels,
        out_channels,
        kernel_size,
        stride,
        c.padding,
        act=c.activation,
        groups=groups,
        bn_eps=c.bn_eps,
        bn_momentum=c.bn_momentum,
    )


def separable_block(
    in_channels: int, out_channels: int, stride: int, c: MobileNetV1Config
) -> nn.Sequential:
    """Depthwise 3x3 unit then pointwise 1x1 unit; unlike Xception, each has BN and ReLU6."""
    return nn.Sequential(
        OrderedDict(
            depthwise=conv_unit(in_channels, in_channels, 3, stride, c, groups=in_channels),
            pointwise=conv_unit(in_channels, out_channels, 1, 1, c),
        )
    )


def feature_taps(alpha: float) -> list[FeatureInfo]:
    """The last block at each reduction (2, 4, 8, 16, 32): the maps a decoder wants."""
    taps = []
    reduction = 2  # the stem's stride
    for i, (channels, stride) in enumerate(BLOCKS):
        reduction *= stride
        if i + 1 == len(BLOCKS) or BLOCKS[i + 1][1] > 1:
            taps.append(FeatureInfo(f"blocks.{i}", width(channels, alpha), reduction))
    return taps


def keras_layer_order() -> list[tuple[str, str]]:
    """(Keras layer name, module path) for every weighted layer, in Keras' weight order.

    Keras' ``DepthwiseConv2D`` kernel is (3, 3, C, 1) (ours (C, 1, 3, 3)), ``Conv2D`` is
    HWIO (ours OIHW), BN holds gamma, beta, moving mean, moving variance (ours weight,
    bias, running_mean, running_var) and ``conv_preds`` is a 1x1 conv (ours a Linear).
    """
    pairs = [("conv1", "conv1.conv"), ("conv1_bn", "conv1.bn")]
    for i in range(len(BLOCKS)):
        for kind, part in (("dw", "depthwise"), ("pw", "pointwise")):
            name, path = f"conv_{kind}_{i + 1}", f"blocks.{i}.{part}"
            pairs += [(name, f"{path}.conv"), (f"{name}_bn", f"{path}.bn")]
    return [*pairs, ("conv_preds", "head.classifier")]


class MobileNetV1(ImageClassifier):
    """``conv1`` (stem), ``blocks.0`` ... ``blocks.12`` (Keras' blocks 1-13), ``head``."""

    def __init__(self, config: MobileNetV1Config | None = None) -> None:
        super().__init__()
        c = config or MobileNetV1Config()
        self.config = c
        self.in_chans = c.in_chans
        self.min_input_size = MIN_INPUT_SIZE
        channels = width(STEM_CHANNELS, c.alpha)
        self.conv1 = conv_unit(c.in_chans, channels, 3, 2, c)
        blocks = []
        for out, stride in BLOCKS:
            out = width(out, c.alpha)
            blocks.append(separable_block(channels, out, stride, c))
            channels = out
        self.blocks = nn.Sequential(*blocks)
        self.head = ClassifierHead(channels, c.num_classes, c.global_pool, dropout=c.dropout)
        self.stage_names = ("conv1", *(f"blocks.{i}" for i in range(len(BLOCKS))))
        self.cam_layer = self.stage_names[-1]  # the last separable block
        self.feature_info = feature_taps(c.alpha)


_DESCRIPTION = "MobileNet V1 at width {} (Keras topology, ReLU6), 224x224"
register_model("mobilenet_v1", MobileNetV1, MobileNetV1Config(), _DESCRIPTION.format("1.0"))
for _alpha, _suffix in ((0.75, "075"), (0.5, "050"), (0.25, "025")):
    register_model(
        f"mobilenet_v1_{_suffix}",
        MobileNetV1,
        MobileNetV1Config(alpha=_alpha),
        _DESCRIPTION.format(_alpha),
    )
