"""``xception bench``: side-by-side speed of models and implementations, in one process.

Machines are noisy, so contenders are interleaved: each round times every contender once
(a fixed number of iterations), after a warm-up; we report the median over rounds, the
spread (min-max of the rounds) and each median's ratio to the baseline (the first
contender unless named). References from other libraries (``timm:NAME``) are imported only
when asked for, and ``onnxruntime`` runs our own ONNX export of the model.
"""

from __future__ import annotations

import multiprocessing
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from xception.devices import Amp, autocast, synchronize
from xception.fusion import inference_model
from xception.inference import resolve_backend
from xception.precision import cpu_features
from xception.registry import create_model
from xception.runtime import compile_for_training, keep_freed_memory

MEMORY_SAMPLES = 3  # fresh processes per contender for --memory on a CPU

Mode = Literal["inference", "train"]


@dataclass(frozen=True)
class BenchConfig:
    mode: Mode = "inference"
    batch_size: int = 8
    image_size: int = 299
    device: str = "cpu"
    amp: Amp = "none"
    channels_last: bool = False
    compile: bool = False
    warmup: int = 2
    rounds: int = 7
    iterations: int = 3  # per contender per round
    memory: bool = False  # on a CPU: peak memory of each contender, in a fresh process

    def __post_init__(self) -> None:
        for name in ("batch_size", "image_size", "rounds", "iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"BenchConfig.{name}={getattr(self, name)} must be at least 1")
        if self.warmup < 0:
            raise ValueError(f"BenchConfig.warmup={self.warmup} must not be negative")


@dataclass
class Result:
    name: str
    seconds: list[float] = field(default_factory=list)  # per iteration, one entry per round
    peak_memory_mb: float | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    def images_per_second(self, batch: int) -> float:
        return batch / self.median


def _input(config: BenchConfig, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = torch.randn(config.batch_size, 3, config.image_size, config.image_size, device=device)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def prepare_model(model: nn.Module, config: BenchConfig, device: torch.device) -> nn.Module:
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if not config.compile:
        return model
    if config.mode == "train":
        return compile_for_training(model, device)
    return torch.compile(model, dynamic=False)


def torch_step(
    model: nn.Module, config: BenchConfig, device: torch.device, channels_last: bool
) -> Callable[[], None]:
    """One inference batch, or one full training step (forward, backward, SGD update)."""
    x = _input(config, device, channels_last)
    if config.mode == "inference":
        model.eval()

        def infer() -> None:
            with torch.inference_mode(), autocast(device, config.amp):
                model(x)

        return infer
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    target = torch.zeros(config.batch_size, dtype=torch.long, device=device)

    def train() -> None:
        with autocast(device, config.amp):
            loss = nn.functional.cross_entropy(model(x).float(), target)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return train


def contender(
    spec: str, model_name: str, config: BenchConfig, device: torch.device
) -> Callable[[], None]:
    """A step function for ``spec``.

    ``ours`` and ``timm:NAME`` follow ``--channels-last`` / ``--compile``; ``ours-fast`` is
    the inference path (BN folded, channels_last), ``ours-compiled`` the same compiled and
    ``ours-fused`` the same with each separable unit as one Triton kernel on GPUs. In
    training, whatever the flags, ``ours-fast`` is ours in channels_last (what ``xception
    train`` runs by default) and ``ours-compiled`` the same under ``torch.compile``;
    ``onnxruntime`` runs our ONNX export; ``ours-default`` is whichever of ``onnxruntime``
    and ``ours-fast`` eval and predict run by default (``inference.resolve_backend``).
    """
    inference_only = ("ours-fused", "ours-bf16", "ours-int8", "ours-default", "onnxruntime")
    if spec in inference_only and config.mode != "inference":
        raise ValueError(f"{spec} is an inference contender")
    if spec == "ours-default":  # what eval and predict run in fp32 on this device
        backend = resolve_backend("auto", device, "fp32", config.amp)
        spec = "onnxruntime" if backend == "onnxruntime" else "ours-fast"
    if spec == "ours":
        model = prepare_model(create_model(model_name), config, device)
        return torch_step(model, config, device, config.channels_last)
    if spec in ("ours-fast", "ours-compiled") and config.mode == "train":
        fastest = replace(config, channels_last=True, compile=spec == "ours-compiled")
        model = prepare_model(create_model(model_name), fastest, device)
        return torch_step(model, fastest, device, channels_last=True)
    if spec == "ours-bf16":  # --precision bf16: the fast path under autocast
        fast = inference_model(create_model(model_name).to(device), channels_last=True)
        return torch_step(fast, replace(config, amp="bf16"), device, channels_last=True)
    if spec in ("ours-fast", "ours-compiled", "ours-fused"):
        fast = inference_model(
            create_model(model_name).to(device),
            channels_last=True,
            compile=spec == "ours-compiled",
            fused=spec == "ours-fused",
        )
        return torch_step(fast, config, device, channels_last=True)
    if spec.startswith("timm:"):
        try:
            import timm
        except ImportError:
            raise ValueError("the timm reference needs timm installed (pip install timm)") from None
        model = timm.create_model(spec.removeprefix("timm:"), pretrained=False)
        model = prepare_model(model, config, device)
        return torch_step(model, config, device, config.channels_last)
    if spec in ("onnxruntime", "ours-int8"):
        return _onnxruntime_step(model_name, config, int8=spec == "ours-int8")
    raise ValueError(
        f"unknown contender {spec!r}: ours, ours-fast, ours-compiled, ours-fused, ours-bf16, "
        "ours-int8, ours-default, timm:NAME or onnxruntime"
    )


def _onnxruntime_step(model_name: str, config: BenchConfig, int8: bool) -> Callable[[], None]:
    """Our ONNX export in onnxruntime; ``int8``: quantized as ``--precision int8`` does
    (calibrated on random images: ranges matter for accuracy, not for speed)."""
    from xception.exporting import export_onnx, load_onnx_session
    from xception.weights import save_weights

    folder = Path(tempfile.mkdtemp(prefix="xception-bench-"))
    model = create_model(model_name, image_size=config.image_size)
    metadata = {
        "classes": [str(i) for i in range(model.num_classes)],
        "preprocessing": {"image_size": config.image_size},
    }
    save_weights(model, folder / "w.safetensors", model_name, metadata)
    size = (8, 3, config.image_size, config.image_size)
    batches = (
        [torch.randn(size, generator=torch.Generator().manual_seed(i)).numpy() for i in range(4)]
        if int8
        else None
    )
    path = export_onnx(folder / "w.safetensors", folder / "m.onnx", calibrate=batches)
    session, _ = load_onnx_session(path)
    x = torch.randn(config.batch_size, 3, config.image_size, config.image_size).numpy()
    name = session.get_inputs()[0].name
    return lambda: session.run(None, {name: x})


def run(
    specs: list[str],
    model_name: str,
    config: BenchConfig,
    progress: Callable[[str], None] | None = None,
) -> list[Result]:
    """Interleaved timing of every contender; results in the order given."""
    device = torch.device(config.device)
    steps = {spec: contender(spec, model_name, config, device) for spec in specs}
    results = time_steps(steps, config, progress)
    if config.memory and device.type == "cpu":
        # Fresh processes vary by tens of MB: interleave a few per contender, take medians.
        samples: dict[str, list[float | None]] = {result.name: [] for result in results}
        for _ in range(MEMORY_SAMPLES):
            for result in results:
                samples[result.name].append(cpu_peak_memory_mb(result.name, model_name, config))
        for result in results:
            peaks = samples[result.name]
            result.peak_memory_mb = None if None in peaks else statistics.median(peaks)
    return results


def cpu_peak_memory_mb(spec: str, model_name: str, config: BenchConfig) -> float | None:
    """Peak resident memory of ``spec``'s training or inference steps above its built model,
    in a fresh process (None where Linux's ``/proc`` is missing).

    CPU tensors have no allocator statistics like CUDA's, so this resets the kernel's
    high-water mark of the process (``/proc/self/clear_refs``) once the model is built,
    runs ``warmup`` steps (at least two, so gradients and optimiser state exist) and reads
    the mark. A fresh process per contender keeps pages another one freed out of the count.
    """
    if not Path("/proc/self/clear_refs").exists():
        return None
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_peak_growth_mb, (spec, model_name, config))


def _status_mb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"/proc/self/status has no {key}")


def _peak_growth_mb(spec: str, model_name: str, config: BenchConfig) -> float:
    keep_freed_memory()  # as in the timing process (the CLI sets it at start)
    step = contender(spec, model_name, config, torch.device("cpu"))
    Path("/proc/self/clear_refs").write_text("5")  # high-water mark := current size
    before = _status_mb("VmRSS")
    for _ in range(max(config.warmup, 2)):
        step()
    return _status_mb("VmHWM") - before


def time_steps(
    steps: dict[str, Callable[[], None]],
    config: BenchConfig,
    progress: Callable[[str], None] | None = None,
) -> list[Result]:
    """Warm every step up, then time them in interleaved rounds; results in the order given."""
    device = torch.device(config.device)
    results = {spec: Result(spec) for spec in steps}
    for spec, step in steps.items():  # warm-up (and compilation) before any timing
        for _ in range(config.warmup):
            step()
        synchronize(device)
        if progress:
            progress(f"warmed up {spec}")
    for _ in range(config.rounds):
        for spec, step in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            synchronize(device)
            start = time.perf_counter()
            for _ in range(config.iterations):
                step()
            synchronize(device)
            results[spec].seconds.append((time.perf_counter() - start) / config.iterations)
            if device.type == "cuda":
                results[spec].peak_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
    return list(results.values())


def format_table(results: list[Result], config: BenchConfig, baseline: str | None = None) -> str:
    base = next(r for r in results if r.name == (baseline or results[0].name))
    rows = [("contender", "median ms", "min-max ms", "images/s", f"x {base.name}", "peak MB")]
    for r in results:
        rows.append(
            (
                r.name,
                f"{r.median * 1e3:.1f}",
                f"{min(r.seconds) * 1e3:.1f}-{max(r.seconds) * 1e3:.1f}",
                f"{r.images_per_second(config.batch_size):.1f}",
                f"{base.median / r.median:.2f}",
                f"{r.peak_memory_mb:.0f}" if r.peak_memory_mb is not None else "-",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    )


def to_json(
    results: list[Result], config: BenchConfig, model_name: str, baseline: str | None = None
) -> dict:
    base = next(r for r in results if r.name == (baseline or results[0].name))
    return {
        "model": model_name,
        "config": config.__dict__,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        **cpu_features(),
        "results": [
            {
                "name": r.name,
                "median_s": r.median,
                "rounds_s": r.seconds,
                "images_per_s": r.images_per_second(config.batch_size),
                "ratio_to_baseline": base.median / r.median,
                "peak_memory_mb": r.peak_memory_mb,
            }
            for r in results
        ],
    }
