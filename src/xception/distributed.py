"""Process groups under ``torchrun`` (NCCL on GPUs, gloo on CPUs) and what DDP needs
around it: rank-aware helpers, metric reduction, and synchronised BatchNorm on CPUs
(PyTorch's ``SyncBatchNorm`` refuses CPU tensors)."""

from __future__ import annotations

import gc
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def init_world(device_type: str, timeout_s: float = 900) -> World:
    """Join the torchrun group if launched by torchrun (``WORLD_SIZE`` set), else one process.
    A collective that waits ``timeout_s`` for a peer (one that failed, on another node
    too) raises instead of waiting forever."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


# What gloo and NCCL say when a peer died or a collective waited past the timeout (gloo
# raises plain RuntimeErrors, newer code paths DistError).
PEER_FAILURES = ("gloo", "nccl", "connection closed", "timed out", "timeout")


def peer_failed(error: BaseException, world: World) -> bool:
    """Whether ``error`` is a collective failing because another process stopped or hung."""
    if not world.distributed or not isinstance(error, RuntimeError):
        return False
    text = str(error).lower()
    return isinstance(error, dist.DistError) or any(marker in text for marker in PEER_FAILURES)


def close_world(world: World) -> None:
    """Free the group while the interpreter is alive.

    The collection frees groups that reference cycles (DDP's hooks) keep alive, so that
    gloo's worker threads are joined now rather than during interpreter shutdown, where
    one still releasing a tensor aborts the process (SIGABRT).
    """
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    if world.distributed:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
    return tensor


def gather_cat(tensor: torch.Tensor, world: World) -> torch.Tensor | None:
    """Concatenate a tensor of per-rank length along dim 0 on rank 0, in rank order (None
    on the other ranks: only the rank that computes with it holds it)."""
    if not world.distributed:
        return tensor
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(world.size)]
    dist.all_gather(sizes, torch.tensor([tensor.shape[0]], device=tensor.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros((longest, *tensor.shape[1:]), dtype=tensor.dtype, device=tensor.device)
    padded[: tensor.shape[0]] = tensor
    chunks = [torch.empty_like(padded) for _ in range(world.size)] if world.is_main else None
    dist.gather(padded, chunks, dst=0)
    if chunks is None:
        return None
    return torch.cat([c[: int(s.item())] for c, s in zip(chunks, sizes, strict=True)])


class _AllReduceSum(torch.autograd.Function):
    """Sum across ranks; the gradient of a sum is the sum of the gradients."""

    @staticmethod
    def forward(ctx: object, tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad)


class CpuSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm whose training statistics cover the global batch, over any backend.

    Mean first, then the centred second moment (two all-reduces, numerically as stable as
    the single-process computation); gradients flow through the reductions.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        local = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        moments = _AllReduceSum.apply(torch.cat([x.sum((0, 2, 3)), local]))
        count = moments[-1]
        mean = moments[:-1] / count
        centred = x - mean.view(1, -1, 1, 1)
        var = _AllReduceSum.apply(centred.pow(2).sum((0, 2, 3))) / count
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean.detach(), self.momentum)
            unbiased = var.detach() * count / (count - 1).clamp(min=1)
            self.running_var.lerp_(unbiased, self.momentum)
        scale = self.weight / torch.sqrt(var + self.eps)
        return centred * scale.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def convert_sync_batchnorm(model: nn.Module, device_type: str) -> nn.Module:
    """PyTorch's SyncBatchNorm on GPUs; ours where it cannot run. Parameters and buffers
    are the same objects as before, so an optimizer built earlier still holds them."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            sync = CpuSyncBatchNorm(child.num_features, child.eps, child.momentum)
            sync._parameters, sync._buffers = child._parameters, child._buffers
            setattr(model, name, sync)
        else:
            convert_sync_batchnorm(child, device_type)
    return model
