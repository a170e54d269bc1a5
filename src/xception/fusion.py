"""The fast inference path: BatchNorm folded, channels_last, cache-sized micro-batches.

In eval mode ``BN(conv(x)) = conv'(x)`` with ``w' = w * g / sqrt(v + eps)`` per output
channel and ``b' = (b - m) * g / sqrt(v + eps) + beta``, so a folded model computes the same
function with one pass over each feature map fewer. Only Conv -> BN pairs that sit next to
each other in a Sequential are folded (every unit in this package's models); Keras 1.x's
conv -> ReLU -> BN order is left alone, since the ReLU sits between them.

A folded model in eval mode treats every image on its own, so on a CPU its early stages run
a few images at a time (``MicroBatched``): the large early feature maps then stay in the caches
between layers instead of streaming through memory.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from xception.data.transforms import Preprocessing
from xception.fused_separable import fuse_separables
from xception.layers import SeparableConv2d
from xception.models.base import ImageClassifier
from xception.precision import Autocast, check_precision, int8_module

# Stages whose input is at a stride below 16 run a few images at a time; coarser stages run
# on the whole batch, where their large 1x1 weights are reused across images.
MICRO_BATCH_UNTIL_STRIDE = 16
# Bytes of the largest feature map (in these networks an early one) per micro-batch, tuned
# on the project's CPU (32 MB of L3). With malloc keeping freed blocks (``runtime``), 9-26 MB
# per micro-batch was best; with glibc's defaults, maps over ~12 MB are mapped afresh and
# faulted in on every call (Xception at batch 8: 368 ms with two images per micro-batch,
# 330 with one). 12 MB is within 5% of the best micro-batch in both settings for every
# model here, while whole batches of 8-32 were 17-61% slower for Xception and MobileNet and
# one image at a time was 3x slower for xception_tiny (its per-image work cannot pay for
# the Python loop).
CACHE_BUDGET = 12 * 1024 * 1024


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


class MicroBatched(nn.Module):
    """``model`` with its fine-resolution stages run a few images at a time, as many as keep
    their largest feature map within ``cache_budget`` bytes (or ``micro_batch`` images).

    Only valid where images do not interact: eval mode, BatchNorm folded or frozen.
    """

    def __init__(
        self,
        model: ImageClassifier,
        micro_batch: int | None = None,
        cache_budget: int = CACHE_BUDGET,
    ) -> None:
        super().__init__()
        if micro_batch is not None and micro_batch < 1:
            raise ValueError(f"micro_batch={micro_batch} must be positive")
        self.model, self.fixed, self.cache_budget = model, micro_batch, cache_budget
        self.map_bytes_per_pixel = 0.0
        if micro_batch is None:
            config = getattr(model, "config", None)
            size = getattr(config, "image_size", None) or max(model.min_input_size, 224)
            self.map_bytes_per_pixel = largest_map_bytes(model, size) / size**2

    def micro_batch(self, x: torch.Tensor) -> int:
        if self.fixed is not None:
            return self.fixed
        per_image = self.map_bytes_per_pixel * x.shape[-2] * x.shape[-1]
        return max(1, int(self.cache_budget // per_image))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.model.check_input(x)
        coarse = -(-x.shape[-2] // MICRO_BATCH_UNTIL_STRIDE)  # map height at stride 16
        parts = list(x.split(self.micro_batch(x)))
        for name in self.model.stage_names:
            if len(parts) > 1 and parts[0].shape[-2] <= coarse:
                parts = [torch.cat(parts)]
            parts = [self.model.get_submodule(name)(part) for part in parts]
        return self.model.forward_head(parts[0] if len(parts) == 1 else torch.cat(parts))


@torch.no_grad()
def largest_map_bytes(model: ImageClassifier, size: int) -> int:
    """Bytes of the largest output of any layer of ``model`` for one ``size`` x ``size`` image
    (an eval-mode pass: BatchNorm statistics are left alone)."""
    largest = 0

    def record(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal largest
        if isinstance(output, torch.Tensor):
            largest = max(largest, output[0].numel() * output.element_size())

    parameter = next(model.parameters())
    image = torch.zeros(
        1, model.in_chans, size, size, dtype=parameter.dtype, device=parameter.device
    )
    handles = [m.register_forward_hook(record) for m in model.modules()]
    training = model.training
    try:
        model.eval()(image)
    finally:
        model.train(training)
        for handle in handles:
            handle.remove()
    return largest


class FrozenCompiled(nn.Module):
    """``torch.compile`` with inductor's freezing: weights become constants, prepacked for
    oneDNN, with ReLU and residual adds fused into the convolutions on CPUs.

    Freezing is read from inductor's global configuration when a graph compiles (passing it
    in ``torch.compile``'s options leaves the weights as graph inputs), so every call runs
    under a patched configuration rather than changing it for the whole process.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.compiled = torch.compile(module, dynamic=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from torch._inductor import config

        with config.patch(freezing=True), torch.no_grad():
            return self.compiled(x)


def inference_model(
    model: nn.Module,
    channels_last: bool = True,
    compile: bool = False,
    fused: bool = False,
    precision: str = "fp32",
    calibrate: str | Path | Iterable[Any] | None = None,
    preprocessing: Preprocessing | None = None,
) -> nn.Module:
    """The fastest safe form of ``model`` for inference: folded, channels_last, micro-batched
    on CPUs, compiled if asked. ``fused`` runs each separable unit as one Triton kernel on
    GPUs (``fused_separable``; on CPUs PyTorch's convolutions compute the same units).

    ``precision`` (``xception.precision``): ``bf16`` runs the same under autocast;
    ``int8`` quantizes ``model`` (on the CPU) on ``calibrate`` (a folder of images read
    through ``preprocessing``, default: the model's image size and [-1, 1] scaling, or
    normalised float32 batches) and runs it in onnxruntime, returning a module.

    A compiled model is frozen (it must not be trained or have its weights changed) and
    specialised to its first input's shape, batch size included: the loop over micro-batches
    is unrolled into the graph, so compile it for a fixed serving batch.
    """
    device = next(model.parameters()).device
    check_precision(precision, device, calibrate)
    if precision == "int8":
        if compile or fused:
            raise ValueError("precision='int8' runs in onnxruntime: it takes no compile or fused")
        size = (
            getattr(getattr(model, "config", None), "image_size", None) or Preprocessing.image_size
        )
        return int8_module(model, calibrate or "", preprocessing or Preprocessing(image_size=size))
    fast = fold_batchnorm(model).requires_grad_(False)
    if fused:
        fast = fuse_separables(fast)
    if channels_last:
        fast = fast.to(memory_format=torch.channels_last)
    if device.type == "cpu" and isinstance(fast, ImageClassifier):
        fast = MicroBatched(fast)
    if precision == "bf16":
        fast = Autocast(fast, "bf16")
    # Eval mode on the wrappers too: callers that save and restore ``.training`` (evaluate,
    # summary) would otherwise switch the model inside to training mode.
    return (FrozenCompiled(fast) if compile else fast).eval()
