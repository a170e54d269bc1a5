"""Per-layer roofline of a model on this machine: how close the fastest path is to the floor.

For every convolution and linear layer, the floor is max(multiply-adds / peak multiply-add
rate, bytes / memory bandwidth), with bytes = its input and output activations and its
weights, each moved once (the per-layer floor: no fusion across layers). Peak rate and
bandwidth are measured here (the faster of a large float32 matmul and a large 1x1
convolution; a large tensor copy), so the floor
is what this machine can do, not a datasheet figure; `--peak-tmacs` and `--bandwidth-gbs`
replace them to compute a floor for another device (e.g. an H100's datasheet).
The measured compiled path is then profiled: its time per kind of layer beside that kind's
floor shows where the gap to the floor is.

    python benchmarks/roofline.py --model xception --batch-size 8 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import ProfilerActivity, profile

from xception import create_model
from xception.fusion import inference_model


def median_seconds(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def peak_macs_per_second() -> float:
    """The best of a large matmul and a large channels_last 1x1 convolution: on AMD CPUs
    torch.mm's BLAS reaches less than half of what oneDNN's convolutions sustain."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    matmul = 2048**3 / median_seconds(lambda: torch.mm(a, b))
    x = torch.randn(32, 2048, 10, 10).contiguous(memory_format=torch.channels_last)
    w = torch.randn(2048, 2048, 1, 1).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        conv = x.numel() * 2048 / median_seconds(lambda: F.conv2d(x, w))
    return max(matmul, conv)


def bandwidth_bytes_per_second(megabytes: int = 512) -> float:
    x = torch.empty(megabytes * 2**20 // 4)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / median_seconds(lambda: y.copy_(x))


def layer_kind(weight: list[int], groups: int) -> str:
    """A convolution's kind, from its weight's shape: the same for a module and for a
    profiled oneDNN call."""
    if groups > 1:
        return "depthwise" if weight[1] == 1 else "grouped"
    return "pointwise" if weight[2:] == [1, 1] else "regular"


def layer_costs(
    model: nn.Module, batch: int, size: int, element_bytes: int = 4
) -> list[tuple[str, str, int, int]]:
    """(name, kind, multiply-adds, bytes) of every conv / linear layer in one forward of
    ``batch`` images, traced on one image: activations scale with the batch, weights not."""
    rows: list[tuple[str, str, int, int]] = []

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            weight = module.weight
            if isinstance(module, nn.Conv2d):
                per_output = weight.shape[1] * weight.shape[2] * weight.shape[3]
                kind = layer_kind(list(weight.shape), module.groups)
            else:
                per_output, kind = weight.shape[1], "linear"
            macs = batch * output.numel() * per_output
            activations = batch * (inputs[0].numel() + output.numel())
            moved = element_bytes * (activations + weight.numel())
            rows.append((name, kind, macs, moved))

        return record

    handles = [
        m.register_forward_hook(hook(n))
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d | nn.Linear)
    ]
    with torch.no_grad():
        model(torch.randn(1, 3, size, size))
    for handle in handles:
        handle.remove()
    return rows


REST = "the rest (inductor's code, dispatch)"


def time_by_kind(fast: nn.Module, x: torch.Tensor, repeats: int = 5) -> dict[str, float]:
    """Seconds per call of a compiled CPU model's oneDNN convolutions by kind, of its
    linear layers, and of the rest."""
    activities = [ProfilerActivity.CPU]
    with torch.inference_mode(), profile(activities=activities, record_shapes=True) as prof:
        for _ in range(repeats):
            fast(x)
    seconds: dict[str, float] = {REST: 0.0}
    for event in prof.events():
        name, kind = event.name, None
        if event.cpu_parent is None:
            seconds[REST] += event.cpu_time_total  # everything; the kinds come off below
        if name.startswith("mkldnn::_convolution_pointwise"):
            # With a residual add fused (13 arguments) the weight follows the input and the
            # other summand: (input, other, weight, ...), or (other, input, weight, ...).
            binary = len(event.input_shapes) > 10
            weight = event.input_shapes[2 if binary else 1]
            kind = layer_kind(weight, event.concrete_inputs[7 if binary else 6])
        elif "linear" in name:
            kind = "linear"
        if kind is not None:
            seconds[kind] = seconds.get(kind, 0.0) + event.cpu_time_total
            seconds[REST] -= event.cpu_time_total
    return {kind: total / 1e6 / repeats for kind, total in seconds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="xception")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=299)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--peak-tmacs", type=float, help="use this peak (T multiply-adds/s)")
    parser.add_argument("--bandwidth-gbs", type=float, help="use this bandwidth (GB/s)")
    parser.add_argument(
        "--element-bytes", type=int, default=4, help="bytes per value moved (2 for bf16)"
    )
    parser.add_argument("--no-measure", action="store_true", help="floor only, no timing")
    args = parser.parse_args()
    if args.element_bytes != 4 and not args.no_measure:
        parser.error(
            "--element-bytes other than 4 needs --no-measure: the measured path is float32"
        )
    if args.threads:
        torch.set_num_threads(args.threads)
    peak = args.peak_tmacs * 1e12 if args.peak_tmacs else peak_macs_per_second()
    bandwidth = args.bandwidth_gbs * 1e9 if args.bandwidth_gbs else bandwidth_bytes_per_second()
    model = create_model(args.model).eval()
    rows = layer_costs(model, args.batch_size, args.image_size, args.element_bytes)
    by_kind: dict[str, list[float]] = {}
    for _, kind, macs, moved in rows:
        floor = max(macs / peak, moved / bandwidth)
        bound = "compute" if macs / peak >= moved / bandwidth else "memory"
        entry = by_kind.setdefault(f"{kind} ({bound})", [0, 0, 0.0, 0])
        entry[0] += macs
        entry[1] += moved
        entry[2] += floor
        entry[3] += 1
    total_macs = sum(r[2] for r in rows)
    total_floor = sum(v[2] for v in by_kind.values())
    print(
        f"{args.model}, batch {args.batch_size}, {args.image_size}px, "
        f"{torch.get_num_threads()} threads; peak {peak / 1e9:.0f} G multiply-adds/s, "
        f"bandwidth {bandwidth / 1e9:.1f} GB/s"
    )
    print("| layers (bound) | count | multiply-adds | MB moved | floor ms |")
    print("|---|---:|---:|---:|---:|")
    for kind, (macs, moved, floor, count) in sorted(by_kind.items(), key=lambda kv: -kv[1][2]):
        print(f"| {kind} | {count} | {macs / 1e9:.2f} G | {moved / 1e6:.0f} | {floor * 1e3:.1f} |")
    print(
        f"| total | {len(rows)} | {total_macs / 1e9:.2f} G | "
        f"{sum(r[3] for r in rows) / 1e6:.0f} | {total_floor * 1e3:.1f} |"
    )
    print(f"floor: {args.batch_size / total_floor:.1f} images/s")
    if args.no_measure:
        return
    x = torch.randn(args.batch_size, 3, args.image_size, args.image_size)
    x = x.contiguous(memory_format=torch.channels_last)
    fast = inference_model(model, compile=True)
    with torch.inference_mode():
        for _ in range(2):
            fast(x)
        measured = median_seconds(lambda: fast(x))
    print(
        f"compiled fast path: {measured * 1e3:.1f} ms = {args.batch_size / measured:.1f} "
        f"images/s, {total_floor / measured:.0%} of the floor, "
        f"{total_macs / measured / 1e9:.0f} G multiply-adds/s"
    )
    floors: dict[str, float] = {}
    for _, kind, macs, moved in rows:
        floors[kind] = floors.get(kind, 0.0) + max(macs / peak, moved / bandwidth)
    print("| part of the compiled path (profiled) | floor ms | ms | share of the floor |")
    print("|---|---:|---:|---:|")
    for kind, spent in sorted(time_by_kind(fast, x).items(), key=lambda kv: -kv[1]):
        floor = floors.get(kind)
        share = f"{floor / spent:.0%}" if floor else "-"
        floor_ms = f"{floor * 1e3:.1f}" if floor else "-"
        print(f"| {kind} | {floor_ms} | {spent * 1e3:.1f} | {share} |")


if __name__ == "__main__":
    main()
