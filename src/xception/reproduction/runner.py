"""Run an experiment into a folder: each arm and seed is an ordinary training run (so an
interrupted experiment resumes arm by arm, mid-arm from the last checkpoint), then the
arms' costs are measured side by side and the report is written.

Folder layout::

    OUT/plan.json                  what was asked (a rerun must ask the same)
    OUT/runs/<arm>-seed<k>/        one `xception train` run folder per arm and seed
    OUT/speed.json                 interleaved timings (arms' training steps / table3)
    OUT/results.json, report.md, *.png
"""

from __future__ import annotations

import json
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from xception.benchmarking import (
    BenchConfig,
    Mode,
    Result,
    prepare_model,
    time_steps,
    torch_step,
)
from xception.config import coerce_values, normalize
from xception.data.loaders import open_data
from xception.data.synthetic import materialize
from xception.devices import check_device_name, resolve_device
from xception.evaluation import class_frequencies, class_prior_score
from xception.files import write_json
from xception.registry import create_model, load_model
from xception.reproduction.experiments import (
    PAPER_PARAMETERS,
    TABLE3_MODELS,
    Arm,
    Experiment,
    Scale,
    arms,
    get_experiment,
    get_scale,
)
from xception.reproduction.report import runs_by_arm, write_report
from xception.summary import count_macs
from xception.training.config import TrainConfig, resolve
from xception.training.logs import read_metrics
from xception.training.run import resume, train

Progress = Callable[[str], None]

# Training options each arm sets itself: --set may not touch them.
EXPERIMENT_OWNED = ("model", "model_overrides", "multi_label", "seed", "data", "image_size")


@dataclass(frozen=True)
class Plan:
    """What one ``xception reproduce`` invocation asks for."""

    experiment: str
    scale: str = "tiny"
    seeds: int | None = None  # None: the experiment's default
    data: str | None = None
    device: str = "auto"
    train_overrides: dict[str, Any] = field(default_factory=dict)  # --set, on every arm

    def __post_init__(self) -> None:
        normalize(self)
        check_device_name(self.device)
        experiment, _ = get_experiment(self.experiment), get_scale(self.scale)
        if self.seeds is None:
            object.__setattr__(self, "seeds", experiment.seeds)
        if self.seeds < 1:
            raise ValueError(f"seeds={self.seeds} must be positive")
        fixed = sorted(set(self.train_overrides) & set(EXPERIMENT_OWNED))
        if fixed:
            raise ValueError(
                f"--set {fixed[0]}=... would change what the experiment varies or fixes per "
                f"arm ({', '.join(EXPERIMENT_OWNED)}); use --data, --seeds or --scale"
            )
        typed = coerce_values(TrainConfig, self.train_overrides, "training option")
        object.__setattr__(self, "train_overrides", typed)  # so `4` and `04` are one plan

    @property
    def identity(self) -> dict[str, Any]:
        """What a resumed experiment must share with the one it continues (seeds may grow)."""
        values = asdict(self)
        values.pop("seeds")
        return json.loads(json.dumps(values))


def default_out(plan: Plan) -> Path:
    return Path("reproductions") / f"{plan.experiment}-{plan.scale}"


def cached_json(path: Path, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``measure()`` once: its result is kept in ``path`` and read back on a rerun."""
    if path.is_file():
        return json.loads(path.read_text())
    value = measure()
    write_json(path, value)
    return value


def claim_folder(out: Path, plan: Plan) -> None:
    """Start ``out`` or check that it holds this same experiment (then it resumes)."""
    marker = out / "plan.json"
    if marker.is_file():
        try:
            saved = json.loads(marker.read_text())
        except json.JSONDecodeError:
            raise ValueError(f"{marker} is corrupt; move {out} away and start again") from None
        if saved != plan.identity:
            changed = sorted(k for k in plan.identity if saved.get(k) != plan.identity[k])
            raise ValueError(
                f"{out} holds a different reproduction ({', '.join(changed)} differ); "
                "choose another --out"
            )
    elif out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and holds no reproduction; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(marker, plan.identity)


def arm_recipe(scale: Scale, experiment: Experiment, arm: Arm) -> str:
    if experiment.recipe is not None:
        return experiment.recipe
    return scale.multi_recipe if arm.multi_label else scale.recipe


def arm_config(
    plan: Plan, scale: Scale, experiment: Experiment, arm: Arm, seed: int
) -> TrainConfig:
    values: dict[str, Any] = {
        **scale.train,
        **experiment.train,
        **scale.experiment_train.get(experiment.name, {}),
        "model": arm.model,
        "model_overrides": arm.overrides,
        "image_size": scale.family_image_size if experiment.families else scale.image_size,
        "multi_label": arm.multi_label,
        "data": plan.data,
        "seed": seed,
        "device": plan.device,
        **plan.train_overrides,
    }
    return resolve(arm_recipe(scale, experiment, arm), None, values)


def run_arm(folder: Path, config: TrainConfig, recipe: str, progress: bool) -> dict[str, Any]:
    """Train (or finish, or just read) one arm; its summary and evaluation rows."""
    if not (folder / "summary.json").is_file():
        if (folder / "last.safetensors").is_file():
            resume(folder, progress=progress)
        else:
            train(config, recipe, out=folder, overwrite=True, progress=progress)
    summary = json.loads((folder / "summary.json").read_text())
    return {"summary": summary, "rows": read_metrics(folder)}


def data_facts(config: TrainConfig) -> dict[str, Any]:
    """Which data an arm trained on (the set, its splits, images per class), and its
    ``prior``: the score if it learned nothing (see ``class_prior_score``)."""
    spec = config.builtin_data()
    root = materialize(spec, progress=False) if spec else config.data or ""
    splits = open_data(root)
    train_split, val = splits["train"], splits["val"]
    frequency = class_frequencies(train_split.class_counts(), len(train_split))
    return {
        "source": f"built-in '{spec.name}' ({root})" if spec else str(root),
        "multi_label": train_split.multi_label,
        "splits": {
            name: {
                "images": len(split),
                "per_class": dict(zip(split.classes, split.class_counts(), strict=True)),
            }
            for name, split in (("train", train_split), ("val", val))
        },
        "prior": class_prior_score(frequency, val.label_matrix(), train_split.multi_label),
    }


def model_cost(weights: Path, image_size: int) -> dict[str, int]:
    model, _ = load_model(weights)
    params = sum(p.numel() for p in model.parameters())
    return {"parameters": params, "macs": count_macs(model, image_size)}


def bench_config(
    scale: Scale, device: torch.device, mode: Mode, batch: int, size: int
) -> BenchConfig:
    cuda = device.type == "cuda"
    return BenchConfig(
        mode=mode,
        batch_size=batch,
        image_size=size,
        device=str(device),
        amp="bf16" if cuda else "none",
        channels_last=cuda,
        rounds=scale.bench_rounds,
        iterations=1,
    )


def time_models(
    models: dict[str, Callable[[], torch.nn.Module]], config: BenchConfig, say: Progress
) -> list[Result]:
    device = torch.device(config.device)
    prepared = {name: prepare_model(make(), config, device) for name, make in models.items()}
    steps = {
        name: torch_step(model, config, device, config.channels_last)
        for name, model in prepared.items()
    }
    return time_steps(steps, config, say)


def processor_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict[str, Any]:
    import torchvision

    import xception

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else processor_name()
    return {
        "device": f"{device.type}: {name}",
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "xception": xception.__version__,
        "platform": platform.platform(),
    }


def run_table3(scale: Scale, device: torch.device, say: Progress) -> dict[str, Any]:
    """Parameters at 1000 classes, multiply-adds and interleaved speeds at 299x299."""
    makers = {name: (lambda name=name: create_model(name)) for name in TABLE3_MODELS}
    rows: dict[str, dict[str, Any]] = {}
    for name, make in makers.items():
        model = make()
        rows[name] = {
            "parameters": sum(p.numel() for p in model.parameters()),
            "paper_parameters": PAPER_PARAMETERS.get(name),
            "macs": count_macs(model, 299),
        }
    modes: tuple[Mode, ...] = ("train", "inference")
    for mode in modes:
        config = bench_config(scale, device, mode, scale.bench_batch, 299)
        say(f"timing {mode} steps of {', '.join(makers)} (batch {config.batch_size}, 299 px)")
        for result in time_models(makers, config, say):
            rows[result.name][f"{mode}_seconds"] = result.seconds
            rows[result.name][f"{mode}_median_s"] = result.median
    return {  # batch, precision and layout are the same in both modes
        "models": rows,
        "batch_size": config.batch_size,
        "amp": config.amp,
        "channels_last": config.channels_last,
    }


def arm_speeds(
    scale: Scale, done: list[dict[str, Any]], device: torch.device, say: Progress
) -> dict[str, Any]:
    """Training steps of every arm's model, interleaved, at the arms' batch and size."""
    first = {arm: runs[0] for arm, runs in runs_by_arm(done).items()}  # seeds share a model
    makers = {
        arm: (lambda path=Path(r["folder"]) / "last.safetensors": load_model(path)[0])
        for arm, r in first.items()
    }
    some = next(iter(first.values()))
    config = bench_config(scale, device, "train", some["batch_size"], some["image_size"])
    say(f"timing training steps of {', '.join(makers)} (batch {config.batch_size})")
    results = time_models(makers, config, say)
    return {
        "batch_size": config.batch_size,
        "image_size": config.image_size,
        "amp": config.amp,
        "arms": {r.name: {"train_seconds": r.seconds, "train_median_s": r.median} for r in results},
    }


def run_experiment(
    plan: Plan,
    out: Path | None = None,
    command: str = "",
    progress: bool = True,
    say: Progress | None = None,
) -> Path:
    """Everything ``xception reproduce`` does; returns the folder holding the report."""
    say = say or (lambda message: print(message, file=sys.stderr))
    experiment, scale = get_experiment(plan.experiment), get_scale(plan.scale)
    out = out or default_out(plan)
    claim_folder(out, plan)
    device = resolve_device(plan.device)
    start = time.perf_counter()
    results: dict[str, Any] = {
        "experiment": experiment.name,
        "title": experiment.title,
        "paper": experiment.paper,
        "scale": asdict(scale),
        "plan": asdict(plan),
        "command": command,
        "environment": environment(device),
    }
    speed = out / "speed.json"
    if experiment.trains:
        runs, results["data"] = train_arms(out, plan, experiment, scale, progress, say)
        results["runs"] = runs
        results["speed"] = cached_json(speed, lambda: arm_speeds(scale, runs, device, say))
    else:
        results["table3"] = cached_json(speed, lambda: run_table3(scale, device, say))
    results["wall_time_s"] = time.perf_counter() - start  # this invocation
    write_report(out, results)
    return out


def train_arms(
    out: Path, plan: Plan, experiment: Experiment, scale: Scale, progress: bool, say: Progress
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """Every arm and seed trained (or read back): one record per run, and ``data_facts``
    of each data set they trained on, by its source."""
    records = []
    costs: dict[str, dict[str, int]] = {}  # per arm: seeds share the architecture
    data: dict[str, dict[str, Any]] = {}  # per data set: arms of a seed share it
    for seed in range(plan.seeds):
        for arm in arms(experiment, scale):
            folder = out / "runs" / f"{arm.name}-seed{seed}"
            config = arm_config(plan, scale, experiment, arm, seed)
            say(f"arm {arm.name}, seed {seed}: {folder}")
            trained = run_arm(folder, config, arm_recipe(scale, experiment, arm), progress)
            if arm.name not in costs:
                costs[arm.name] = model_cost(folder / "last.safetensors", config.image_size)
            source = str(config.builtin_data() or config.data)
            if source not in data:
                data[source] = data_facts(config)
            records.append(
                {
                    "arm": arm.name,
                    "label": arm.label,
                    "seed": seed,
                    "folder": str(folder),
                    "model": arm.model,
                    "overrides": arm.overrides,
                    "batch_size": config.batch_size,
                    "image_size": config.image_size,
                    **costs[arm.name],
                    "prior": data[source]["prior"],
                    "data": data[source]["source"],
                    **trained,
                }
            )
    return records, {facts["source"]: facts for facts in data.values()}
