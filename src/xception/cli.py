"""The ``xception`` command: parses, calls the library, prints. User errors end with one
line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import ast
import shlex
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from xception.registry import create_model, get_entry, list_models
from xception.runtime import keep_freed_memory
from xception.summary import count_macs, format_summary, summarize
from xception.training.loop import TrainingError, resolve_device
from xception.weights import atomic_write

# ImportError: an optional extra (onnx, h5py) is missing; its message says what to install.
USER_ERRORS = (
    ImportError,
    ValueError,
    FileNotFoundError,
    FileExistsError,
    KeyError,
    NotADirectoryError,
    PermissionError,
    IsADirectoryError,
)


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` with a Python literal value (``8``, ``False``, ``(4096, 4096)``,
    ``None``); anything else is taken as a string (``mid_activation=relu``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"override {text!r} is not of the form key=value")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def key_value_dict(groups: list[list[str]] | None) -> dict[str, Any]:
    """The values of a repeatable ``KEY=VALUE ...`` option as one mapping."""
    return dict(parse_override(item) for group in groups or [] for item in group)


def cmd_summary(args: argparse.Namespace) -> None:
    model = create_model(args.model, **key_value_dict(args.override))
    size = args.image_size or model.config.image_size
    summary = summarize(model, size, depth=args.depth)
    print(format_summary(summary, f"{args.model} ({get_entry(args.model).description})"))


def human_count(value: float) -> str:
    return f"{value / 1e9:.2f} G" if value >= 1e9 else f"{value / 1e6:.1f} M"


def cmd_models(args: argparse.Namespace) -> None:
    rows = [("model", "input", "parameters", "mult-adds", "description")]
    for name in list_models():
        model = create_model(name)
        size = model.config.image_size
        macs = count_macs(model, size)
        params = sum(p.numel() for p in model.parameters())
        rows.append(
            (name, str(size), f"{params:,}", human_count(macs), get_entry(name).description)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)), row[4])


# train flags -> TrainConfig fields (None: not given, so the recipe/YAML value stands)
TRAIN_FLAGS = {
    "data": str,
    "model": str,
    "epochs": int,
    "batch_size": int,
    "image_size": int,
    "lr": float,
    "device": str,
    "amp": str,
    "seed": int,
    "workers": int,
    "save_every": int,
    "max_steps": int,
    "channels_last": bool,
}


def train_overrides(args: argparse.Namespace) -> dict[str, Any]:
    values = {name: getattr(args, name) for name in TRAIN_FLAGS if getattr(args, name) is not None}
    for flag in ("compile", "multi_label"):
        if getattr(args, flag):
            values[flag] = True
    values.update(key_value_dict(args.set))
    if args.override:
        values["model_overrides"] = key_value_dict(args.override)
    return values


def cmd_train(args: argparse.Namespace) -> None:
    from xception.training.loop import resume, train
    from xception.training.recipes import load_yaml, resolve

    if args.resume is not None:
        if args.config or args.recipe or args.out or args.overwrite:
            raise ValueError(
                "--resume continues a run as configured; drop --config, "
                "--recipe, --out and --overwrite"
            )
        result = resume(Path(args.resume), train_overrides(args), progress=not args.quiet)
    else:
        yaml_values = load_yaml(args.config) if args.config else {}
        recipe = args.recipe or yaml_values.pop("recipe", None) or "quick"
        config = resolve(recipe, yaml_values, train_overrides(args))
        result = train(
            config,
            recipe,
            Path(args.out) if args.out else None,
            args.overwrite,
            progress=not args.quiet,
        )
    if result.run_dir is None:
        return
    metrics = result.metrics
    score = ", ".join(
        f"{k} {metrics[k]:.4f}"
        for k in ("val_top1", "val_top5", "val_map100", "val_raw_top1")
        if k in metrics
    )
    print(f"done in {result.wall_time:.0f} s ({result.images_per_second:.0f} images/s): {score}")
    print(f"run folder: {result.run_dir}")
    print(
        f"weights:    {result.run_dir / 'best.safetensors'} (best), "
        f"{result.run_dir / 'last.safetensors'} (last)"
    )
    print(f"profile:    {result.run_dir / 'profile.png'}")


def cmd_eval(args: argparse.Namespace) -> None:
    from xception.inference import evaluate_weights

    metrics, path = evaluate_weights(
        Path(args.weights),
        args.data,
        raw=args.raw,
        batch_size=args.batch_size,
        device=args.device,
        workers=args.workers,
        output=args.json,
        overwrite=args.overwrite,
    )
    for key, value in metrics.items():
        print(f"{key:>20}: {value:.4f}" if isinstance(value, float) else f"{key:>20}: {value}")
    print(f"written to {path}")


def cmd_predict(args: argparse.Namespace) -> int:
    from xception.inference import format_predictions, predict_paths

    rows, failures = predict_paths(
        Path(args.weights),
        [Path(p) for p in args.images],
        top_k=args.top_k,
        raw=args.raw,
        device=args.device,
    )
    print(format_predictions(rows, args.format))
    return 1 if failures else 0


def cmd_convert(args: argparse.Namespace) -> None:
    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if args.source_format == "keras":
        from xception.interop.keras import convert_keras as convert
    else:
        from xception.interop.timm import convert_timm as convert
    convert(Path(args.source), args.model, out, include_top=not args.notop)
    print(f"wrote {out}")


def cmd_export(args: argparse.Namespace) -> None:
    from xception.export import export_onnx, export_program

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
    if args.format == "onnx":
        export_onnx(Path(args.weights), out, dynamic_size=args.dynamic_size, raw=args.raw)
    else:
        export_program(Path(args.weights), out, raw=args.raw)
    print(f"wrote {out}")


def cmd_bench(args: argparse.Namespace) -> None:
    import json

    import torch

    from xception.benchmarking import BenchConfig, format_table, run, to_json

    if args.json and Path(args.json).exists():
        raise FileExistsError(f"{args.json} exists; choose another --json path")
    if args.threads:
        torch.set_num_threads(args.threads)
    resolve_device(args.device)  # fails clearly when CUDA is asked for and absent
    config = BenchConfig(
        mode=args.mode,
        batch_size=args.batch_size,
        image_size=args.image_size,
        device=args.device,
        amp=args.amp,
        channels_last=args.channels_last,
        compile=args.compile,
        rounds=args.rounds,
        memory=args.memory,
    )
    specs = args.contender or ["ours", "ours-fast"]
    specs = [*specs, *(args.reference or [])]
    results = run(specs, args.model, config, progress=lambda m: print(m, file=sys.stderr))
    print(
        f"{args.model}, {args.mode}, batch {args.batch_size}, {args.image_size}px, "
        f"{args.device}, amp {args.amp}, channels_last {args.channels_last}, "
        f"compile {args.compile}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(format_table(results, config, args.baseline))
    if args.json:
        text = json.dumps(to_json(results, config, args.model, args.baseline), indent=2)
        atomic_write(Path(args.json), lambda tmp: Path(tmp).write_text(text))


def list_experiments() -> None:
    from xception.reproduction import EXPERIMENTS, SCALES

    width = max(map(len, EXPERIMENTS))
    print("experiments:")
    for name, experiment in EXPERIMENTS.items():
        print(f"  {name.ljust(width)}  {experiment.title}")
    print("scales:")
    for name, scale in SCALES.items():
        print(f"  {name.ljust(width)}  {scale.description}")


def cmd_reproduce(args: argparse.Namespace) -> None:
    from xception.reproduction import Plan, run_experiment

    if args.list or args.experiment is None:
        list_experiments()
        return
    plan = Plan(
        args.experiment,
        args.scale,
        args.seeds,
        args.data,
        args.device,
        key_value_dict(args.set),
    )
    command = shlex.join(["xception", *args.argv])
    out = run_experiment(plan, Path(args.out) if args.out else None, command, not args.quiet)
    print(f"report:  {out / 'report.md'}")
    print(f"results: {out / 'results.json'}")


def key_values(parser: argparse.ArgumentParser, flag: str, help: str) -> None:
    """A repeatable ``--flag KEY=VALUE ...`` option (see ``parse_override``)."""
    parser.add_argument(flag, nargs="+", action="append", metavar="KEY=VALUE", help=help)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xception", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    summary = commands.add_parser("summary", help="layer table, parameters, multiply-adds")
    summary.add_argument("model", metavar="MODEL", help=f"one of: {', '.join(list_models())}")
    summary.add_argument("--image-size", type=int, help="input side (default: the model's)")
    summary.add_argument("--depth", type=int, default=2, help="module nesting shown (default 2)")
    key_values(summary, "--override", "config fields, e.g. residual=False spatial_groups=8")
    summary.set_defaults(run=cmd_summary)

    models = commands.add_parser("models", help="list the registered models")
    models.set_defaults(run=cmd_models)

    train = commands.add_parser(
        "train",
        help="train a model (default: xception_tiny on the built-in data set)",
        description="Train on an image folder (ROOT/train/<class>, ROOT/val/<class>; or "
        "train.csv/val.csv manifests for multi-label data) or, without --data, on the "
        "built-in procedurally rendered data set. Under torchrun it trains with DDP.",
    )
    train.add_argument("--data", help="data folder (default: the built-in data set)")
    train.add_argument("--model", help="model name (see `xception models`)")
    train.add_argument("--recipe", help="quick (default), paper-imagenet or paper-jft")
    train.add_argument("--config", help="YAML file of training options")
    train.add_argument("--epochs", type=int)
    train.add_argument("--max-steps", type=int, help="stop after this many optimizer steps")
    train.add_argument("--batch-size", type=int, help="global batch (split across processes)")
    train.add_argument("--image-size", type=int)
    train.add_argument("--lr", type=float, help="learning rate")
    train.add_argument("--out", help="run folder (default: runs/<model>-<timestamp>)")
    train.add_argument("--resume", metavar="PATH", help="continue the run in this folder")
    train.add_argument("--overwrite", action="store_true", help="replace a run in --out")
    train.add_argument("--device", choices=("auto", "cpu", "cuda"))
    train.add_argument("--amp", choices=("none", "bf16", "fp16"))
    train.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        help="NHWC activations (the default: 1.4-1.7x faster training on a CPU)",
    )
    train.add_argument("--compile", action="store_true", help="torch.compile the model")
    train.add_argument(
        "--multi-label",
        action="store_true",
        help="built-in data set in its multi-label (JFT-like) mode",
    )
    train.add_argument("--seed", type=int)
    train.add_argument("--workers", type=int, help="data loading processes")
    train.add_argument("--save-every", type=int, metavar="STEPS")
    key_values(train, "--set", "any training option, e.g. weight_decay=4e-5 ema_decay=0")
    key_values(train, "--override", "model config fields, e.g. residual=False")
    train.add_argument("--quiet", action="store_true", help="no progress bar")
    train.set_defaults(run=cmd_train)

    evaluate = commands.add_parser("eval", help="top-1/top-5 (or MAP@100) of a weights file")
    evaluate.add_argument("--weights", required=True)
    evaluate.add_argument("--data", help="data folder (default: the built-in data set)")
    evaluate.add_argument("--raw", action="store_true", help="raw instead of averaged weights")
    evaluate.add_argument("--batch-size", type=int, default=128)
    evaluate.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    evaluate.add_argument("--workers", type=int, default=2)
    evaluate.add_argument("--json", help="where to write the metrics (default: beside weights)")
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing --json")
    evaluate.set_defaults(run=cmd_eval)

    predict = commands.add_parser("predict", help="top-k classes of images")
    predict.add_argument("images", nargs="+", metavar="IMAGE|DIR")
    predict.add_argument("--weights", required=True)
    predict.add_argument("--top-k", type=int, default=5)
    predict.add_argument("--format", choices=("table", "json", "csv"), default="table")
    predict.add_argument("--raw", action="store_true", help="raw instead of averaged weights")
    predict.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    predict.set_defaults(run=cmd_predict)

    convert = commands.add_parser("convert", help="Keras or timm/Cadene weights -> ours")
    convert.add_argument("source", metavar="SRC", help=".h5 / .weights.h5 / .pth / .safetensors")
    convert.add_argument("--from", dest="source_format", required=True, choices=("keras", "timm"))
    convert.add_argument("--model", required=True, help="xception, inception_v3, mobilenet_v1...")
    convert.add_argument("--out", required=True, help="output .safetensors file")
    convert.add_argument("--notop", action="store_true", help="the file has no classifier")
    convert.add_argument("--overwrite", action="store_true")
    convert.set_defaults(run=cmd_convert)

    export = commands.add_parser("export", help="ONNX or torch.export program of a weights file")
    export.add_argument("--weights", required=True)
    export.add_argument("--format", choices=("onnx", "torch-export"), default="onnx")
    export.add_argument("--out", required=True)
    export.add_argument(
        "--dynamic-size",
        action="store_true",
        help="ONNX: dynamic height and width too (batch is always dynamic)",
    )
    export.add_argument("--raw", action="store_true", help="raw instead of averaged weights")
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(run=cmd_export)

    bench = commands.add_parser(
        "bench",
        help="interleaved speed comparison (medians, spread, ratios)",
        description="Contenders: ours (eager), ours-fast (inference: BN folded, channels_last; "
        "training: channels_last, as `train` runs), ours-compiled (the same compiled), "
        "ours-fused (inference: separable units as one Triton kernel on GPUs), "
        "timm:NAME (needs timm), onnxruntime (our ONNX export). The first is the baseline.",
    )
    bench.add_argument("model", nargs="?", default="xception")
    bench.add_argument("--mode", choices=("inference", "train"), default="inference")
    bench.add_argument(
        "--contender",
        action="append",
        metavar="SPEC",
        help="ours, ours-fast, ours-compiled, ours-fused, timm:NAME, onnxruntime (repeatable)",
    )
    bench.add_argument(
        "--reference",
        action="append",
        metavar="SPEC",
        help="added after the contenders, e.g. timm:legacy_xception",
    )
    bench.add_argument("--baseline", help="contender the ratios refer to (default: first)")
    bench.add_argument("--batch-size", type=int, default=8)
    bench.add_argument("--image-size", type=int, default=299)
    bench.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    bench.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none")
    bench.add_argument("--channels-last", action="store_true")
    bench.add_argument("--compile", action="store_true")
    bench.add_argument("--threads", type=int, help="torch CPU threads")
    bench.add_argument("--rounds", type=int, default=7)
    bench.add_argument(
        "--memory",
        action="store_true",
        help="on a CPU, also measure each contender's peak memory (median of 3 fresh "
        "processes each; on CUDA it is always measured)",
    )
    bench.add_argument("--json", help="write the results here too")
    bench.set_defaults(run=cmd_bench)

    reproduce = commands.add_parser(
        "reproduce",
        help="the paper's tables and ablations (report.md, plots, results.json)",
        description="Run one of the paper's experiments. Every arm is a training run in "
        "OUT/runs; rerunning the same command resumes an interrupted experiment.",
    )
    reproduce.add_argument("experiment", nargs="?", metavar="EXPERIMENT", help="see --list")
    reproduce.add_argument("--list", action="store_true", help="name the experiments and scales")
    reproduce.add_argument("--scale", default="tiny", help="tiny (default), small or full")
    reproduce.add_argument("--seeds", type=int, default=1, help="runs of each arm (default 1)")
    reproduce.add_argument("--data", help="image folder (default: the built-in data set)")
    reproduce.add_argument("--out", help="folder (default: reproductions/EXPERIMENT-SCALE)")
    reproduce.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    key_values(reproduce, "--set", "training option for every arm, e.g. epochs=4 workers=0")
    reproduce.add_argument("--quiet", action="store_true", help="no progress bars")
    reproduce.set_defaults(run=cmd_reproduce)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for reports that quote it
    keep_freed_memory()
    run: Callable[[argparse.Namespace], int | None] = args.run
    try:
        return run(args) or 0
    except USER_ERRORS as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"xception {args.command}: error: {message}", file=sys.stderr)
        return 2
    except TrainingError as error:
        print(f"xception {args.command}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"xception {args.command}: interrupted", file=sys.stderr)
        return 130
