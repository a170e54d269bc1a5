"""The paper's optimisation recipes: parameter groups, TF-style RMSprop and step-wise LR decay.

Xception was trained with the configuration tuned for Inception V3 in TensorFlow 1.x:
ImageNet with SGD (momentum 0.9, lr 0.045, x0.94 every 2 epochs), JFT with RMSprop
(momentum 0.9, lr 0.001, x0.9 every 3,000,000 samples), L2 1e-5 on the weights for both.
Schedules here are pure functions of training progress, so resuming needs only the step,
epoch and sample counters, never a scheduler's internal state.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn
from torch.optim.optimizer import ParamsT

from xception.layers import SeparableConv2d

__all__ = [
    "LRSchedule",
    "RMSpropTF",
    "cosine_decay",
    "param_groups",
    "scale_lr",
    "set_lr",
    "staircase_decay",
]

_DECAYED_MODULES = (nn.modules.conv._ConvNd, nn.Linear)


def param_groups(
    model: nn.Module,
    weight_decay: float,
    spatial_lr_fan_in: bool = False,
    head_lr_scale: float = 1.0,
) -> list[dict]:
    """Split trainable parameters into groups by weight decay and learning-rate scale.

    Only convolution (depthwise and pointwise included, as in the paper's TF-slim
    regularisers) and linear *weights* get weight decay; biases and BatchNorm scales and
    shifts do not: they add no capacity worth penalising, and shrinking BatchNorm's scale
    only fights the normalisation. ``weight_decay`` is the coefficient on the gradient
    (``g + wd * w``), i.e. TF-slim's ``l2_regularizer(wd)`` (loss ``wd * sum(w**2) / 2``),
    the convention assumed for the paper's 1e-5 (Keras's ``l2(wd)`` would be ``2 * wd``
    here). Shared parameters are listed once; empty groups are dropped.

    ``spatial_lr_fan_in`` gives the spatial stage of every ``SeparableConv2d`` the
    ``lr_scale`` ``groups / in_channels``: its fan-in relative to a depthwise kernel's.
    An Adam-like step moves a layer's output by about ``lr * fan_in``, so a regular
    (``groups=1``) spatial convolution at a depthwise network's rate changes its output
    ``C`` times faster and does not train; with the scale every point of the spectrum
    moves at the depthwise rate (the depthwise end is unchanged). ``set_lr`` applies it.

    ``head_lr_scale`` is the ``lr_scale`` of the model's ``head`` (its classifier and FC
    layers): fine-tuning often trains a new head faster than a pretrained backbone.
    """
    scales: dict[int, float] = {}
    head = getattr(model, "head", None)
    if head_lr_scale != 1.0 and head is not None:
        scales.update({id(p): head_lr_scale for p in head.parameters()})
    if spatial_lr_fan_in:
        for module in model.modules():
            if isinstance(module, SeparableConv2d):
                conv = module.spatial
                scales[id(conv.weight)] = conv.groups / conv.in_channels
    grouped: dict[tuple[bool, float], list[nn.Parameter]] = {}
    seen: set[int] = set()
    for module in model.modules():
        for name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or id(param) in seen:
                continue
            seen.add(id(param))
            is_weight = name == "weight" and isinstance(module, _DECAYED_MODULES)
            grouped.setdefault((is_weight, scales.get(id(param), 1.0)), []).append(param)
    order = sorted(grouped, key=lambda key: (-key[1], not key[0]))  # larger rates, decayed first
    return [
        {
            "params": grouped[key],
            "weight_decay": weight_decay if key[0] else 0.0,
            "lr_scale": key[1],
        }
        for key in order
    ]


class RMSpropTF(torch.optim.Optimizer):
    """RMSprop with TensorFlow 1.x ``tf.compat.v1.train.RMSPropOptimizer`` semantics.

    Per parameter, with gradient ``g`` (plus ``weight_decay * p``, coupled L2)::

        ms  = alpha * ms + (1 - alpha) * g**2      # ms starts at ONES, not zeros
        mom = momentum * mom + lr * g / sqrt(ms + eps)
        p   = p - mom

    The three differences from ``torch.optim.RMSprop`` all change training: ``ms`` starts
    at 1 (TF's ``rms`` slot uses ``ones_initializer``), so early steps are not blown up
    by a near-zero denominator; ``eps`` sits inside the square root; and the learning rate
    is folded into the momentum buffer, so a learning-rate decay only affects new
    contributions instead of rescaling the accumulated velocity. ``ms`` is updated in TF's
    kernel form ``ms += (1 - alpha) * (g**2 - ms)`` (a lerp). ``alpha`` is TF's ``decay``
    (``rho`` in its raw ops), named as in ``torch.optim.RMSprop`` and timm. As in TF, the
    momentum buffer exists even at ``momentum=0``. Defaults are the paper's JFT recipe with
    TF's default epsilon 1e-10; the Inception V3 recipe the paper reuses had ``eps=1.0``.

    Equivalent to ``timm.optim.RMSpropTF(lr_in_momentum=True, decoupled_decay=False,
    centered=False)`` with the same ``alpha``, ``eps`` and ``momentum > 0``.
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1e-3,
        alpha: float = 0.9,
        momentum: float = 0.9,
        eps: float = 1e-10,
        weight_decay: float = 0.0,
    ) -> None:
        for label, value in [("lr", lr), ("eps", eps), ("weight_decay", weight_decay)]:
            if value < 0:
                raise ValueError(f"{label} must be non-negative, got {value}")
        if not 0.0 <= alpha < 1.0 or not 0.0 <= momentum < 1.0:
            raise ValueError(f"alpha and momentum must be in [0, 1), got {alpha}, {momentum}")
        defaults = {
            "lr": lr,
            "alpha": alpha,
            "momentum": momentum,
            "eps": eps,
            "weight_decay": weight_decay,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, mean_squares, moments = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("RMSpropTF does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["square_avg"] = torch.ones_like(p, memory_format=torch.preserve_format)
                    state["momentum_buffer"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
                params.append(p)
                grads.append(p.grad)
                mean_squares.append(state["square_avg"])
                moments.append(state["momentum_buffer"])
            if params:
                _rmsprop_tf_step(params, grads, mean_squares, moments, group)
        return loss


def _rmsprop_tf_step(
    params: list[Tensor],
    grads: list[Tensor],
    mean_squares: list[Tensor],
    moments: list[Tensor],
    group: dict,
) -> None:
    """One multi-tensor update; two temporaries (g**2, then the denominator) per step."""
    if group["weight_decay"]:
        grads = torch._foreach_add(grads, params, alpha=group["weight_decay"])
    squared = torch._foreach_mul(grads, grads)
    torch._foreach_lerp_(mean_squares, squared, 1.0 - group["alpha"])
    denominator = torch._foreach_add(mean_squares, group["eps"])
    torch._foreach_sqrt_(denominator)
    torch._foreach_mul_(moments, group["momentum"])
    torch._foreach_addcdiv_(moments, grads, denominator, value=group["lr"])
    torch._foreach_sub_(params, moments)


def staircase_decay(base_lr: float, progress: float, every: float, factor: float) -> float:
    """``base_lr * factor ** floor(progress / every)``: a step change exactly at each boundary.

    ``progress`` is in any unit (epochs, samples, steps) as long as ``every`` uses the same
    one: the paper's ImageNet recipe is ``every=2`` epochs, ``factor=0.94``; JFT is
    ``every=3_000_000`` samples, ``factor=0.9``. Floor division is exact for integer
    counters however large, so the change never lands a sample early through rounding.
    """
    if every <= 0:
        raise ValueError(f"every must be positive, got {every}")
    return base_lr * factor ** (progress // every)


def scale_lr(base_lr: float, global_batch: int, reference_batch: int) -> float:
    """Linear scaling rule: ``lr = base_lr * global_batch / reference_batch``.

    Keeps the per-sample update size when the global batch (summed over all data-parallel
    workers) differs from the batch the base rate was tuned for (Goyal et al., 2017). Pair
    large factors with warm-up.
    """
    if global_batch <= 0 or reference_batch <= 0:
        raise ValueError(f"batch sizes must be positive, got {global_batch}, {reference_batch}")
    return base_lr * global_batch / reference_batch


def cosine_decay(base_lr: float, step: int, warmup_steps: int, total_steps: int) -> float:
    """Half a cosine from ``base_lr`` after warm-up to 0 at ``total_steps`` (SGDR without
    restarts, Loshchilov & Hutter 2017): slow at both ends, the common fine-tuning decay."""
    span = max(total_steps - warmup_steps, 1)
    done = min(max(step - warmup_steps, 0), span)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * done / span))


@dataclass(frozen=True)
class LRSchedule:
    """Staircase decay in epochs, samples or steps, or a cosine over ``total_steps``, with
    an optional linear warm-up.

    ``lr_at`` depends only on the progress counters, so resuming from a checkpoint is
    exact (the cosine spans the run's epochs, so a resume that changes ``epochs``
    reshapes what is left of it; ``max_steps`` does not). Warm-up multiplies the rate by
    ``(step + 1) / warmup_steps`` for the first ``warmup_steps`` steps: the first step
    already moves (no wasted zero-lr step) and step ``warmup_steps - 1`` meets the schedule.
    """

    base_lr: float
    decay_factor: float
    decay_every: float
    decay_unit: Literal["epoch", "samples", "step"]
    warmup_steps: int = 0
    kind: Literal["staircase", "cosine"] = "staircase"
    total_steps: int = 0  # the cosine's length

    def __post_init__(self) -> None:
        if self.decay_unit not in ("epoch", "samples", "step"):
            raise ValueError(f"decay_unit must be epoch, samples or step, got {self.decay_unit}")
        if self.decay_every <= 0 or self.decay_factor <= 0 or self.warmup_steps < 0:
            raise ValueError("decay_every and decay_factor must be positive, warmup_steps >= 0")
        if self.kind not in ("staircase", "cosine"):
            raise ValueError(f"kind must be staircase or cosine, got {self.kind}")
        if self.kind == "cosine" and self.total_steps < 1:
            raise ValueError(f"a cosine schedule needs total_steps >= 1, got {self.total_steps}")

    def lr_at(self, step: int, epoch_float: float, samples_seen: int) -> float:
        """Learning rate for optimizer step ``step`` (0-based), given the matching progress."""
        if self.kind == "cosine":
            lr = cosine_decay(self.base_lr, step, self.warmup_steps, self.total_steps)
        else:
            progress = {"epoch": epoch_float, "samples": samples_seen, "step": step}
            unit = progress[self.decay_unit]
            lr = staircase_decay(self.base_lr, unit, self.decay_every, self.decay_factor)
        if step < self.warmup_steps:
            lr *= (step + 1) / self.warmup_steps
        return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Write a schedule's value (times each group's ``lr_scale``) before ``optimizer.step()``."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
