"""Where a CPU training step of Xception goes (128 px, batch 16, float32, channels_last).

1. The eager step by kind of operator (torch.profiler, median step of three).
2. Each 1x1 convolution shape of the network alone: forward, backward-data and
   backward-weights in G multiply-adds/s, against a plain GEMM (``torch.mm``) of the same size.
3. Inductor on this CPU: a kernel that stores a boolean mask against eager.
4. Training steps interleaved in one process: eager, compiled with inductor's defaults, and
   compiled as ``xception train --compile`` does (``runtime.compile_for_training``).

Run: ``OMP_NUM_THREADS=2 python benchmarks/cpu_training_anatomy.py``.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable

import torch
import torch.nn.functional as F
from roofline import median_seconds  # a sibling script: run this file from anywhere
from torch.profiler import ProfilerActivity, profile

from xception import create_model
from xception.benchmarking import BenchConfig, time_steps, torch_step
from xception.runtime import compile_for_training, keep_freed_memory

BATCH, SIZE = 16, 128
TRAIN = BenchConfig(
    mode="train", batch_size=BATCH, image_size=SIZE, warmup=3, rounds=9, iterations=1
)
# (in channels, out channels, spatial size) of Xception's stride-1 1x1s at 128 px, entry and
# middle flow (25 of the last kind).
POINTWISE = [
    (64, 128, 61),
    (128, 128, 61),
    (128, 256, 31),
    (256, 256, 31),
    (256, 728, 16),
    (728, 728, 16),
    (728, 728, 8),
]


def median_ms(fn: Callable[[], object]) -> float:
    return median_seconds(fn, repeats=15) * 1e3


def training_step(model: torch.nn.Module) -> Callable[[], None]:
    """Forward, backward and SGD step, as ``xception bench --mode train`` times them."""
    return torch_step(model, TRAIN, torch.device("cpu"), channels_last=True)


def operator_kind(event) -> str:
    if event.key in ("aten::mkldnn_convolution", "aten::convolution_backward"):
        weight = event.input_shapes[1 if event.key == "aten::mkldnn_convolution" else 2]
        kind = "depthwise" if weight[1] == 1 else "1x1" if weight[2] == 1 else "stem"
        direction = "forward" if event.key == "aten::mkldnn_convolution" else "backward"
        return f"conv {kind} {direction}"
    return event.key


def step_anatomy(model: torch.nn.Module) -> None:
    step = training_step(model)
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(3):
            step()
    per_kind: Counter[str] = Counter()
    for event in prof.key_averages(group_by_input_shape=True):
        per_kind[operator_kind(event)] += event.self_cpu_time_total / 3e3
    print(f"\n1. eager step by operator (ms per step, {sum(per_kind.values()):.0f} in all)")
    for kind, ms in per_kind.most_common(12):
        print(f"   {kind:40s} {ms:7.1f}")


def pointwise_rates(cin: int, cout: int, size: int) -> list[float]:
    """G multiply-adds/s of one 1x1 shape: forward, backward-data, backward-weights, GEMM."""
    x = torch.randn(BATCH, cin, size, size).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, 1, 1) * 0.05
    g = torch.randn(BATCH, cout, size, size).contiguous(memory_format=torch.channels_last)
    rows, matrix = x.permute(0, 2, 3, 1).reshape(-1, cin), w.view(cout, cin).t()
    conv_args = (g, x, w, None, (1, 1), (0, 0), (1, 1), False, (0, 0), 1)
    timings = [
        median_ms(lambda: F.conv2d(x, w)),
        median_ms(lambda: torch.ops.aten.convolution_backward(*conv_args, (True, False, False))),
        median_ms(lambda: torch.ops.aten.convolution_backward(*conv_args, (False, True, False))),
        median_ms(lambda: rows @ matrix),
    ]
    gmacs = BATCH * size * size * cin * cout / 1e9
    return [gmacs / ms * 1e3 for ms in timings]


def pointwise_efficiency() -> None:
    print("\n2. 1x1 convolutions alone, G multiply-adds/s (oneDNN via aten; torch.mm for a GEMM)")
    print("   shape (Cin, Cout, size)   forward  bwd-data  bwd-weights  torch.mm")
    for shape in POINTWISE:
        rates = "  ".join(f"{rate:8.0f}" for rate in pointwise_rates(*shape))
        print(f"   {shape!s:24s} {rates}")


def mask_store() -> None:
    x = torch.randn(BATCH, 728, 8, 8).contiguous(memory_format=torch.channels_last)

    def mask(t: torch.Tensor) -> torch.Tensor:
        return t > 0

    compiled = torch.compile(mask, dynamic=False)
    with torch.no_grad():
        eager_ms, compiled_ms = median_ms(lambda: mask(x)), median_ms(lambda: compiled(x))
    print(f"\n3. x > 0 on {tuple(x.shape)}: eager {eager_ms:.3f} ms, inductor {compiled_ms:.3f} ms")


def compiled_training() -> None:
    torch.manual_seed(0)
    eager = create_model("xception", num_classes=1000).to(memory_format=torch.channels_last)
    variants = {
        "eager": eager,
        "compiled, inductor defaults": torch.compile(copy.deepcopy(eager), dynamic=False),
        "compiled, compile_for_training": compile_for_training(
            copy.deepcopy(eager), torch.device("cpu")
        ),
    }
    steps = {name: training_step(model) for name, model in variants.items()}
    print("\n4. training step, interleaved (median ms of 9)")
    for result in time_steps(steps, TRAIN):
        print(f"   {result.name:32s} {result.median * 1e3:7.1f}")


if __name__ == "__main__":
    keep_freed_memory()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    torch.manual_seed(0)
    step_anatomy(create_model("xception", num_classes=1000).to(memory_format=torch.channels_last))
    pointwise_efficiency()
    mask_store()
    compiled_training()
