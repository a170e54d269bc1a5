"""The fast inference path: BatchNorm folded into the convolution before it.

In eval mode ``BN(conv(x)) = conv'(x)`` with ``w' = w * g / sqrt(v + eps)`` per output
channel and ``b' = (b - m) * g / sqrt(v + eps) + beta``, so a folded model computes the same
function with one pass over each feature map fewer. Only Conv -> BN pairs that sit next to
each other in a Sequential are folded (every unit in this package's models); Keras 1.x's
conv -> ReLU -> BN order is left alone, since the ReLU sits between them.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn

from xception.layers import SeparableConv2d


@torch.no_grad()
def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Fold ``bn`` into ``conv`` in place (``conv`` gains a bias)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    conv.weight.mul_(scale.view(-1, 1, 1, 1))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    folded = (bias - bn.running_mean) * scale + bn.bias
    conv.bias = nn.Parameter(folded)


def _conv_of(module: nn.Module) -> nn.Conv2d | None:
    """The convolution whose output a module ends with (its pointwise stage for separables)."""
    if isinstance(module, nn.Conv2d):
        return module
    if isinstance(module, SeparableConv2d):
        return module.pointwise
    return None


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` (eval mode) with every Conv -> BN pair folded."""
    model = copy.deepcopy(model).eval()
    for parent in model.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        names = list(parent._modules)
        for before, after in itertools.pairwise(names):
            conv, bn = _conv_of(parent._modules[before]), parent._modules[after]
            if conv is not None and type(bn) is nn.BatchNorm2d:
                fold_conv_bn(conv, bn)
                parent._modules[after] = nn.Identity()
    return model


def inference_model(
    model: nn.Module, channels_last: bool = True, compile: bool = False
) -> nn.Module:
    """The fastest safe form of ``model`` for inference: folded, channels_last, compiled.

    Compilation uses inductor's freezing (weights become constants, prepacked for oneDNN
    on CPUs): the returned module must not be trained or have its weights changed.
    """
    fast = fold_batchnorm(model).requires_grad_(False)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    if not compile:
        return fast
    return torch.compile(fast, dynamic=False, options={"freezing": True})
