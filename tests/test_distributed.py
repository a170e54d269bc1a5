"""DDP with our CPU SyncBatchNorm computes the single-process gradient of the global batch.

In float64 the agreement is exact to rounding (1e-10): what remains in float32 end-to-end
comparisons is rounding amplified by small-batch BatchNorm, not a difference in method.
"""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import xception
from xception.distributed import (
    CpuSyncBatchNorm,
    World,
    close_world,
    convert_sync_batchnorm,
    gather_cat,
)


def model_and_batch():
    torch.manual_seed(0)
    model = xception.create_model("xception_tiny", num_classes=3).double()
    x = torch.rand(8, 3, 72, 72, dtype=torch.float64) * 2 - 1
    return model, x, torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])


def compute(rank: int, world: int, out: dict) -> None:
    model, x, y = model_and_batch()
    model = convert_sync_batchnorm(model, "cpu")
    assert isinstance(model.entry_flow.block1.conv1.bn, CpuSyncBatchNorm)
    ddp = nn.parallel.DistributedDataParallel(model)
    part = slice(rank * 4, rank * 4 + 4)
    F.cross_entropy(ddp(x[part]), y[part]).backward()
    gathered = gather_cat(torch.full((rank + 1,), float(rank)), World(rank, world))
    assert (gathered is None) == (rank != 0)  # only rank 0 holds what it gathers
    if rank == 0:
        out["grads"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        out["running_var"] = model.entry_flow.block1.conv1.bn.running_var.clone()
        out["gathered"] = gathered


def worker(rank: int, world: int, port: int, out: dict) -> None:
    """DDP lives in ``compute`` so that it is gone before ``close_world`` frees gloo (as in
    the training loop): a group outliving the interpreter's shutdown aborts the process."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        compute(rank, world, out)
        dist.barrier()
    finally:
        close_world(World(rank, world))


def test_ddp_gradients_equal_the_single_process_gradients_in_float64():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(worker, args=(2, port, out), nprocs=2)
        result = dict(out)
    model, x, y = model_and_batch()
    F.cross_entropy(model(x), y).backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(
            result["grads"][name], param.grad, rtol=1e-10, atol=1e-12, msg=name
        )
    torch.testing.assert_close(result["running_var"], model.entry_flow.block1.conv1.bn.running_var)
    assert result["gathered"].tolist() == [0.0, 1.0, 1.0]  # rank order, no padding


def test_sync_batchnorm_conversion_keeps_the_parameter_objects():
    model = xception.create_model("xception_tiny")
    before = [id(p) for p in model.parameters()]
    convert_sync_batchnorm(model, "cpu")
    assert [id(p) for p in model.parameters()] == before
    assert sum(isinstance(m, CpuSyncBatchNorm) for m in model.modules()) > 0
