"""Building blocks shared by every model: padded convolutions and pools, the separable
convolution of the paper, and small conv-norm-activation units.

Padding modes (``Padding``):

- ``"tf"``: TensorFlow's SAME. The output is ``ceil(size / stride)`` and the total padding
  ``max((out - 1) * stride + effective_kernel - size, 0)`` is split with the extra pixel
  *after*. Weights trained in TensorFlow/Keras only reproduce their outputs with this.
- ``"symmetric"``: PyTorch style, ``(effective_kernel - 1) // 2`` on both sides (timm's ports).
- ``"valid"``: no padding.
"""

from __future__ import annotations

import typing
from collections import OrderedDict
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from xception.config import check_choice

Padding = Literal["tf", "symmetric", "valid"]
Activation = Literal["none", "relu", "relu6", "elu"]
PADDINGS: tuple[str, ...] = typing.get_args(Padding)
ACTIVATIONS: tuple[str, ...] = typing.get_args(Activation)


def _static_padding(padding: str, kernel: int, stride: int, dilation: int) -> int | None:
    """The symmetric padding that realises ``padding``, or None when it depends on the input."""
    if padding == "valid":
        return 0
    effective = (kernel - 1) * dilation
    if padding == "symmetric":
        return effective // 2
    # TF SAME is input-independent and symmetric only at stride 1 with an even total.
    return effective // 2 if stride == 1 and effective % 2 == 0 else None


def _same_pads(
    x: torch.Tensor, kernel: tuple[int, int], stride: tuple[int, int], dilation: tuple[int, int]
) -> tuple[list, bool]:
    """TF SAME padding of ``x`` in ``F.pad`` order (W before/after, H before/after), and
    whether the sizes are concrete; branch-free arithmetic when they are symbolic, so that it
    stays correct in graphs exported with a dynamic height and width (ONNX, torch.export).

    With concrete sizes (eager, static compilation) this is TF's exact padding. With
    symbolic sizes each dimension is padded to ``(out - 1) * stride + max(kernel, stride)``
    with ``out = ceil(size / stride)``: TF's exact padding when ``kernel >= stride``; for
    smaller kernels TF's padding plus trailing rows the kernel never reads. Every branch's
    output is then the same ``ceil(size / stride)`` expression, which lets an exporter prove
    that residual adds and concatenations match at every size. Both give the same function.
    """
    concrete = all(isinstance(size, int) for size in x.shape[-2:])
    pads: list = []
    for dim, k, s, d in zip((-1, -2), kernel[::-1], stride[::-1], dilation[::-1], strict=True):
        size = x.shape[dim]
        effective = (k - 1) * d + 1
        out = (size + s - 1) // s
        tf_total = (out - 1) * s + effective - size
        if concrete:
            total = max(tf_total, 0)
            pads += [total // 2, total - total // 2]
            continue
        before = tf_total // 2 if effective >= s else torch.sym_max(tf_total, 0) // 2
        pads += [before, (out - 1) * s + max(effective, s) - size - before]
    return pads, concrete


def _pad_same(
    x: torch.Tensor,
    kernel: tuple[int, int],
    stride: tuple[int, int],
    dilation: tuple[int, int],
    value: float = 0.0,
) -> torch.Tensor:
    """``x`` padded TF SAME (``_same_pads``); not copied where the padding is zero (every
    1x1 stride-2 shortcut): padded copies are memory a training step keeps for backward."""
    pads, concrete = _same_pads(x, kernel, stride, dilation)
    if concrete and not any(pads):
        return x
    return F.pad(x, pads, value=value)


def scaled_channels(channels: int, width: float) -> int:
    """Channels times the width multiplier, kept a multiple of 8 (and at least 8)."""
    return channels if width == 1.0 else max(8, int(channels * width + 4) // 8 * 8)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` with a ``padding`` mode; TF SAME is computed per input when it must be.

    The state dict is that of ``nn.Conv2d`` (``weight``, ``bias``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: Padding = "tf",
        dilation: int = 1,
        groups: int = 1,
        bias: bool = False,
    ) -> None:
        check_choice("padding", padding, PADDINGS)
        kh, kw = (kernel_size, kernel_size) if isinstance(kernel_size, int) else kernel_size
        pads = [_static_padding(padding, k, stride, dilation) for k in (kh, kw)]
        self.dynamic_padding = None in pads
        super().__init__(
            in_channels,
            out_channels,
            (kh, kw),
            stride,
            0 if self.dynamic_padding else tuple(pads),
            dilation,
            groups,
            bias,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_padding:
            x = _pad_same(x, self.kernel_size, self.stride, self.dilation)
        return super().forward(x)


class MaxPool2d(nn.MaxPool2d):
    """Max pooling with a ``padding`` mode (TF SAME pads with -inf, i.e. ignores the border)."""

    def __init__(self, kernel_size: int, stride: int, padding: Padding = "tf") -> None:
        check_choice("padding", padding, PADDINGS)
        pad = _static_padding(padding, kernel_size, stride, 1)
        self.dynamic_padding = pad is None
        super().__init__(kernel_size, stride, pad or 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.dynamic_padding:
            return super().forward(x)
        k, s = self.kernel_size, self.stride
        pads, concrete = _same_pads(x, (k, k), (s, s), (1, 1))
        if concrete and k >= s:
            # TF pads `before` and `before` or `before + 1` after; max pooling's own padding
            # is -inf, and ceil mode adds the trailing window, so no padded copy is made
            # (max pooling keeps its input for the backward pass).
            return F.max_pool2d(x, k, s, (pads[2], pads[0]), ceil_mode=True)
        return super().forward(F.pad(x, pads, value=float("-inf")))


def batch_norm(channels: int, eps: float, momentum: float) -> nn.BatchNorm2d:
    """BatchNorm with explicit numerics: Keras uses eps 1e-3 and momentum 0.99 (0.01 here)."""
    return nn.BatchNorm2d(channels, eps=eps, momentum=momentum)


def activation(name: str, inplace: bool = False) -> nn.Module:
    """``inplace`` overwrites the input: only for a map no other layer reads (saves a map of
    training memory per activation)."""
    check_choice("activation", name, ACTIVATIONS)
    if name == "none":
        return nn.Identity()
    return {"relu": nn.ReLU, "relu6": nn.ReLU6, "elu": nn.ELU}[name](inplace=inplace)


class SeparableConv2d(nn.Module):
    """The paper's operator: a spatial convolution per channel group, then a 1x1 convolution.

    ``groups`` walks the paper's spectrum: ``in_channels`` (the default) is a depthwise
    separable convolution, 1 is a regular convolution followed by a 1x1, and values in
    between split the channels into Inception-like segments. ``mid_activation`` and
    ``mid_norm`` put a non-linearity / BatchNorm between the stages (Fig. 10 ablation,
    DeepLab's aligned style); the paper uses neither.

    Parameters, with depth multiplier ``m`` and ``k x k`` kernels::

        k*k*Cin*(m*Cin)/groups + m*Cin*Cout     (+ m*Cin + Cout with bias, + 2*m*Cin with mid_norm)
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        dilation: int = 1,
        groups: int | None = None,
        depth_multiplier: int = 1,
        padding: Padding = "tf",
        mid_activation: Activation = "none",
        mid_norm: bool = False,
        bias: bool = False,
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.01,
    ) -> None:
        super().__init__()
        groups = in_channels if groups is None else groups
        for field, value in (
            ("in_channels", in_channels),
            ("out_channels", out_channels),
            ("kernel_size", kernel_size),
            ("stride", stride),
            ("dilation", dilation),
            ("groups", groups),
            ("depth_multiplier", depth_multiplier),
        ):
            if value < 1:
                raise ValueError(f"{field}={value} must be a positive integer")
        if in_channels % groups:
            raise ValueError(f"groups={groups} must divide in_channels={in_channels}")
        mid = in_channels * depth_multiplier
        self.spatial = Conv2d(
            in_channels, mid, kernel_size, stride, padding, dilation, groups, bias
        )
        self.mid_norm = batch_norm(mid, bn_eps, bn_momentum) if mid_norm else nn.Identity()
        self.mid_act = activation(mid_activation)
        self.pointwise = Conv2d(mid, out_channels, 1, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise(self.mid_act(self.mid_norm(self.spatial(x))))


class ConvNormAct(nn.Sequential):
    """Convolution, BatchNorm, activation: the unit every stem and 1x1 projection uses.

    ``norm_after_act`` gives Keras 1.x's order (conv with bias -> ReLU -> BatchNorm).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int = 1,
        padding: Padding = "tf",
        *,
        act: Activation = "relu",
        bias: bool = False,
        norm_after_act: bool = False,
        groups: int = 1,
        dilation: int = 1,
        bn_eps: float = 1e-3,
        bn_momentum: float = 0.01,
    ) -> None:
        conv = Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias
        )
        layers = [("conv", conv), ("bn", batch_norm(out_channels, bn_eps, bn_momentum))]
        if act != "none":
            # In place: its input is the fresh output of the conv or BN before it.
            layers.insert(1 if norm_after_act else 2, ("act", activation(act, inplace=True)))
        super().__init__(OrderedDict(layers))


class ClassifierHead(nn.Module):
    """Global pooling, optional hidden fully-connected layers, dropout, logistic regression.

    ``num_classes=0`` leaves the pooled (or last hidden) features as the output.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        pool: Literal["avg", "max"] = "avg",
        fc_layers: tuple[int, ...] = (),
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_choice("global_pool", pool, ("avg", "max"))
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must be in [0, 1)")
        if num_classes < 0 or any(units < 1 for units in fc_layers):
            raise ValueError(
                f"num_classes={num_classes} and fc_layers={fc_layers} "
                "must be non-negative / positive"
            )
        self.pool = nn.AdaptiveAvgPool2d(1) if pool == "avg" else nn.AdaptiveMaxPool2d(1)
        hidden: list[nn.Module] = []
        for units in fc_layers:
            hidden += [nn.Linear(in_features, units), nn.ReLU()]
            in_features = units
        self.fc = nn.Sequential(*hidden)
        self.num_features = in_features
        self.dropout = nn.Dropout(dropout)
        self.classifier = self._classifier(num_classes)

    def _classifier(self, num_classes: int) -> nn.Module:
        return nn.Linear(self.num_features, num_classes) if num_classes else nn.Identity()

    def reset(self, num_classes: int) -> None:
        self.classifier = self._classifier(num_classes)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.fc(torch.flatten(self.pool(x), 1))
        return x if pre_logits else self.classifier(self.dropout(x))
