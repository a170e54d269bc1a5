"""The ``xception`` command: parses, calls the library (``xception.api``), prints. User
errors end with one line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch

import xception
from xception import api
from xception.class_report import LEGIBLE_CLASSES, format_table
from xception.config import choices
from xception.devices import AMP_CHOICES, DEVICE_HELP, check_device_name
from xception.files import NoSpaceError
from xception.inference import BACKENDS
from xception.precision import PRECISIONS
from xception.registry import create_model, get_entry, list_models
from xception.runtime import keep_freed_memory
from xception.summary import count_macs, format_summary, summarize
from xception.training.config import GROUPS, TrainConfig
from xception.training.recipes import RECIPES
from xception.training.trainer import TrainingError

DESCRIPTION = """\
Xception (F. Chollet, "Xception: Deep Learning with Depthwise Separable Convolutions",
CVPR 2017) in PyTorch: the paper's model and its design space, Inception V3 and MobileNet
V1. Train with the paper's recipes, evaluate, predict, convert Keras and timm weights,
export to ONNX and torch.export, benchmark, and rerun the paper's experiments."""
EPILOG = """examples:
  xception train                               # xception_tiny on the built-in data set
  xception train --data ~/flowers --model xception --recipe paper-imagenet
  xception predict --weights runs/.../best.safetensors photo.jpg
  xception summary xception

`xception COMMAND --help` lists a command's options."""
DEFAULT_RECIPE = "quick"

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


class Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line, as every other error of the tool."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def device_name(text: str) -> str:
    try:
        return check_device_name(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an integer no smaller than ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is less than {minimum}")
        return value

    return parse


def parse_override(text: str) -> tuple[str, str]:
    """``key=value``; the config the key belongs to reads the value as its field's type
    (``8``, ``False``, ``None``, ``4096,4096``, ``relu``)."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise ValueError(f"override {text!r} is not of the form key=value")
    return key, value


def key_value_dict(groups: list[list[str]] | None) -> dict[str, str]:
    """The values of a repeatable ``KEY=VALUE ...`` option as one mapping."""
    return dict(parse_override(item) for group in groups or [] for item in group)


def key_values(parser: Any, flag: str, help: str) -> None:
    """A repeatable ``--flag KEY=VALUE ...`` option (see ``parse_override``)."""
    parser.add_argument(flag, nargs="+", action="append", metavar="KEY=VALUE", help=help)


def add_precision(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="fp32",
        help="fp32 (default); bf16 (autocast: fast on CPUs with AVX-512 BF16 or AMX, and "
        "on GPUs); int8 (CPU, onnxruntime, quantized on --calibrate's images)",
    )
    parser.add_argument(
        "--calibrate", metavar="DIR", help="int8: a folder of a few hundred typical images"
    )
    parser.add_argument(
        "--backend",
        choices=BACKENDS,
        default="auto",
        help="what runs the model: auto (default: onnxruntime for fp32 on a CPU when the "
        "export extra is installed, exported once and cached; else torch), torch, onnxruntime",
    )


def add_hardware(parser: argparse.ArgumentParser, amp: bool = True) -> None:
    """``--device``, ``--amp`` and ``--channels-last``, with the same defaults everywhere."""
    parser.add_argument("--device", type=device_name, default="auto", help=DEVICE_HELP)
    if amp:
        parser.add_argument("--amp", choices=AMP_CHOICES, default="none", help="mixed precision")
    parser.add_argument(
        "--channels-last",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="NHWC activations (default; oneDNN and tensor cores run them fastest)",
    )


# ------------------------------------------------------------------------ train's flags


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return "none" if value is None else str(value)


def _flag_help(field: dataclasses.Field) -> str:
    default = field.default
    text = f"{field.metadata['help']} (default: {_shown(default)}"
    recipe = RECIPES[DEFAULT_RECIPE]
    if field.name in recipe and recipe[field.name] != default:
        text += f"; {DEFAULT_RECIPE}: {_shown(recipe[field.name])}"
    return text.replace("%", "%%") + ")"


def _metavar(hint: Any) -> str | None:
    if typing.get_origin(hint) is tuple:
        return ",".join(_metavar(item) or "TEXT" for item in typing.get_args(hint))
    options = typing.get_args(hint) or (hint,)
    for kind, name in ((int, "N"), (float, "X")):
        if kind in options:
            return name
    return None  # argparse's: the option's name in capitals


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``TrainConfig`` field, in its group, with its help and default.
    Values stay text until the config reads them as their field's type."""
    groups = {name: parser.add_argument_group(f"{name} options") for name in GROUPS}
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        group, hint, flag = groups[field.metadata["group"]], hints[field.name], field.name
        if field.name == "model_overrides":
            recipe = RECIPES[DEFAULT_RECIPE].get(field.name, {})
            merged = " ".join(f"{key}={value}" for key, value in recipe.items())
            help = (
                f"{field.metadata['help']}, merged over the recipe's ({DEFAULT_RECIPE}: {merged})"
            )
            key_values(group, "--override", help)
            continue
        names = ["--" + flag.replace("_", "-")]
        if hint is bool:
            group.add_argument(
                *names, action=argparse.BooleanOptionalAction, help=_flag_help(field)
            )
            continue
        literal = choices(hint)
        group.add_argument(
            *names,
            choices=[str(choice) for choice in literal] if literal else None,
            metavar=None if literal else _metavar(hint),
            help=_flag_help(field),
        )


def train_options(args: argparse.Namespace) -> dict[str, Any]:
    """The training options given on the command line (a flag not given leaves the
    recipe's or YAML's value standing)."""
    values = {
        field.name: getattr(args, field.name)
        for field in dataclasses.fields(TrainConfig)
        if getattr(args, field.name, None) is not None
    }
    values.update(key_value_dict(args.set))
    if args.override:
        if "model_overrides" in values:
            raise ValueError("give model fields with --override or --set model_overrides, not both")
        values["model_overrides"] = key_value_dict(args.override)
    return values


# ---------------------------------------------------------------------------- commands


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


def cmd_train(args: argparse.Namespace) -> None:
    keep_freed_memory()
    result = api.train(
        args.recipe,
        config=args.config,
        out=args.out,
        overwrite=args.overwrite,
        resume=args.resume,
        progress=not args.quiet,
        **train_options(args),
    )
    if result.run_dir is None:  # a torchrun rank that does not write
        return
    metrics, first = result.metrics, result.primary_metric
    keys = [first, *(k for k in ("val_top5", "val_raw_top1", "val_loss") if k != first)]
    score = ", ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics)
    if result.per_class and len(result.per_class) <= LEGIBLE_CLASSES:
        print(format_table(result.per_class))
    print(f"done in {result.wall_time:.0f} s ({result.images_per_second:.0f} images/s): {score}")
    print(f"run folder: {result.run_dir}")
    print(
        f"weights:    {result.run_dir / 'best.safetensors'} (best), "
        f"{result.run_dir / 'last.safetensors'} (last)"
    )
    print(f"profile:    {result.run_dir / 'profile.png'}")


def cmd_eval(args: argparse.Namespace) -> None:
    keep_freed_memory()
    metrics = api.evaluate(
        args.weights,
        args.data,
        raw=args.raw,
        batch_size=args.batch_size,
        device=args.device,
        workers=args.workers,
        amp=args.amp,
        channels_last=args.channels_last,
        json_path=args.json,
        report_dir=args.report,
        overwrite=args.overwrite,
        allow_nonfinite=args.allow_nonfinite,
        precision=args.precision,
        calibrate=args.calibrate,
        backend=args.backend,
    )
    rows = metrics.pop("per_class", None)
    for key, value in metrics.items():
        print(f"{key:>20}: {value:.4f}" if isinstance(value, float) else f"{key:>20}: {value}")
    if rows and len(rows) <= LEGIBLE_CLASSES:
        print(format_table(rows))
    for path, what in ((args.json, "metrics"), (args.report, "per-class results")):
        if path:
            print(f"{what} written to {path}")


def cmd_predict(args: argparse.Namespace) -> int:
    from xception.inference import CamRequest, format_predictions

    keep_freed_memory()
    predictor = api.Predictor.load(
        args.weights,
        args.raw,
        args.device,
        args.amp,
        args.channels_last,
        args.allow_nonfinite,
        args.precision,
        args.calibrate,
        args.backend,
    )
    cam = CamRequest(Path(args.cam), args.cam_class, args.cam_layer) if args.cam else None
    if cam is None and (args.cam_class or args.cam_layer):
        raise ValueError("--cam-class and --cam-layer go with --cam DIR")
    rows = predictor.predict(args.images, top_k=args.top_k, cam=cam)
    print(format_predictions(rows, args.format))
    return 1 if any("error" in row for row in rows) else 0


def cmd_shard(args: argparse.Namespace) -> None:
    result = api.shard(
        args.data,
        args.out,
        shard_size=args.shard_size,
        splits=[name.strip() for name in args.split.split(",") if name.strip()],
        seed=args.seed,
        progress=not args.quiet,
    )
    for name, split in result.info["splits"].items():
        print(f"{name}: {split['samples']} images in {len(split['shards'])} shards")
    print(f"wrote {result.written} shards, kept {result.kept} complete ones, into {args.out}")
    for entry in result.skipped:
        print(f"skipped unreadable file {entry}")


def cmd_convert(args: argparse.Namespace) -> None:
    out = api.convert(
        args.source,
        args.out,
        model=args.model,
        source_format=args.source_format,
        include_top=not args.notop,
        overwrite=args.overwrite,
    )
    print(f"wrote {out}")


def cmd_export(args: argparse.Namespace) -> None:
    out = api.export(
        args.weights,
        args.out,
        format=args.format,
        dynamic_size=args.dynamic_size,
        raw=args.raw,
        overwrite=args.overwrite,
        quantize=args.quantize,
        calibrate=args.calibrate,
    )
    print(f"wrote {out}")


def cmd_bench(args: argparse.Namespace) -> None:
    import json

    from xception.benchmarking import BenchConfig, format_table, run, to_json
    from xception.devices import resolve_device
    from xception.files import write_text

    if args.json and Path(args.json).exists():
        raise FileExistsError(f"{args.json} exists; choose another --json path")
    keep_freed_memory()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    config = BenchConfig(
        mode=args.mode,
        batch_size=args.batch_size,
        image_size=args.image_size,
        device=str(device),
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
        f"{device}, amp {args.amp}, channels_last {args.channels_last}, "
        f"compile {args.compile}, {torch.get_num_threads()} threads, torch {torch.__version__}"
    )
    print(format_table(results, config, args.baseline))
    if args.json:
        payload = to_json(results, config, args.model, args.baseline)
        write_text(args.json, json.dumps(payload, indent=2))


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
    keep_freed_memory()
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


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="xception",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version",
        action="version",
        version=f"xception {xception.__version__} (torch {torch.__version__})",
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=Parser
    )

    summary = commands.add_parser("summary", help="layer table, parameters, multiply-adds")
    summary.add_argument("model", metavar="MODEL", help=f"one of: {', '.join(list_models())}")
    summary.add_argument("--image-size", type=at_least(1), help="input side (default: the model's)")
    summary.add_argument(
        "--depth", type=at_least(0), default=2, help="module nesting shown (default 2)"
    )
    key_values(summary, "--override", "config fields, e.g. residual=False spatial_groups=8")
    summary.set_defaults(run=cmd_summary)

    models = commands.add_parser("models", help="list the registered models")
    models.set_defaults(run=cmd_models)

    train = commands.add_parser(
        "train",
        help="train a model (default: xception_tiny on the built-in data set)",
        description="Train on an image folder (ROOT/train/<class>, ROOT/val/<class>), on "
        "train.csv/val.csv manifests (header path,label: single-label; path,labels: "
        "multi-label), on WebDataset shards (`xception shard`; a folder or fsspec URL) "
        "or, without --data, on the built-in procedurally rendered data set; "
        "from scratch or, with --init-weights, from a weights file. Under torchrun it "
        "trains with DDP. "
        "Options layer as: defaults < --recipe < --config < flags; each option shows "
        f"its default and, where it differs, the value of the {DEFAULT_RECIPE} recipe "
        "(the default recipe).",
    )
    run_group = train.add_argument_group("run options")
    run_group.add_argument(
        "--recipe",
        choices=list(RECIPES),
        help=f"preset of options: {', '.join(RECIPES)} (default: {DEFAULT_RECIPE}; "
        "finetune with --init-weights)",
    )
    run_group.add_argument("--config", metavar="YAML", help="YAML file of training options")
    key_values(run_group, "--set", "any training option by its name, e.g. weight_decay=4e-5")
    run_group.add_argument("--out", help="run folder (default: runs/<model>-<timestamp>)")
    run_group.add_argument("--resume", metavar="PATH", help="continue the run in this folder")
    run_group.add_argument("--overwrite", action="store_true", help="replace a run in --out")
    run_group.add_argument(
        "--quiet", action="store_true", help="no progress (a bar on a terminal, lines elsewhere)"
    )
    add_config_flags(train)
    train.set_defaults(run=cmd_train)

    evaluate = commands.add_parser("eval", help="top-1/top-5 (or MAP@100) of a weights file")
    evaluate.add_argument("--weights", required=True)
    evaluate.add_argument(
        "--data", help="image folder, manifest root or shards (default: the built-in data set)"
    )
    evaluate.add_argument("--raw", action="store_true", help="raw instead of averaged weights")
    evaluate.add_argument(
        "--allow-nonfinite", action="store_true", help="load NaN/inf weights (for debugging)"
    )
    evaluate.add_argument("--batch-size", type=at_least(1), default=128)
    evaluate.add_argument("--workers", type=at_least(0), default=2, help="data loading processes")
    add_hardware(evaluate)
    add_precision(evaluate)
    evaluate.add_argument("--json", metavar="PATH", help="also write the metrics here")
    evaluate.add_argument(
        "--report",
        metavar="DIR",
        help="write per_class.csv, confusion.csv and confusion.png here (single-label data)",
    )
    evaluate.add_argument("--overwrite", action="store_true", help="replace an existing --json")
    evaluate.set_defaults(run=cmd_eval)

    predict = commands.add_parser("predict", help="top-k classes of images")
    predict.add_argument("images", nargs="+", metavar="IMAGE|DIR")
    predict.add_argument("--weights", required=True, help="weights file or ONNX export")
    predict.add_argument("--top-k", type=at_least(1), default=5)
    predict.add_argument("--format", choices=("table", "json", "csv"), default="table")
    predict.add_argument("--raw", action="store_true", help="raw instead of averaged weights")
    predict.add_argument(
        "--allow-nonfinite", action="store_true", help="load NaN/inf weights (for debugging)"
    )
    predict.add_argument(
        "--cam", metavar="DIR", help="write a Grad-CAM overlay PNG of each image here"
    )
    predict.add_argument(
        "--cam-class", metavar="NAME", help="the class the heatmap explains (default: the top one)"
    )
    predict.add_argument(
        "--cam-layer",
        metavar="MODULE",
        help="the layer whose maps are weighed (default: the model's last feature maps, "
        "e.g. Xception's last separable unit)",
    )
    add_hardware(predict)
    add_precision(predict)
    predict.set_defaults(run=cmd_predict)

    shard = commands.add_parser(
        "shard",
        help="WebDataset tar shards of an image folder or manifest (for train --data)",
        description="Write DATA (an image folder or a CSV manifest root) as tar shards in "
        "the WebDataset layout (KEY.jpg or the image's own encoding, KEY.cls or "
        "KEY.labels, KEY.path) with OUT/info.json (classes, counts, shard checksums), in a "
        "seeded random order. A rerun keeps complete shards. See docs/scale.md.",
    )
    shard.add_argument("data", metavar="DATA", help="image folder or CSV manifest root")
    shard.add_argument("out", metavar="OUT", help="folder for the shards and info.json")
    shard.add_argument(
        "--shard-size", type=at_least(1), default=1000, help="images a shard (default 1000)"
    )
    shard.add_argument("--split", default="train,val", help="splits to write (default train,val)")
    shard.add_argument("--seed", type=at_least(0), default=0, help="seed of the sample order")
    shard.add_argument("--quiet", action="store_true", help="no progress bar")
    shard.set_defaults(run=cmd_shard)

    convert = commands.add_parser("convert", help="Keras or timm/Cadene weights -> ours")
    convert.add_argument("source", metavar="SRC", help=".h5 / .weights.h5 / .pth / .safetensors")
    convert.add_argument(
        "--from",
        dest="source_format",
        choices=("keras", "timm"),
        help="the source's library (default: keras for .h5 files, timm otherwise)",
    )
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
    export.add_argument(
        "--quantize", choices=("int8",), help="ONNX quantized to int8 (QDQ), for onnxruntime"
    )
    export.add_argument(
        "--calibrate", metavar="DIR", help="with --quantize: a folder of a few hundred images"
    )
    export.add_argument("--overwrite", action="store_true")
    export.set_defaults(run=cmd_export)

    bench = commands.add_parser(
        "bench",
        help="interleaved speed comparison (medians, spread, ratios)",
        description="Contenders: ours (eager), ours-fast (inference: BN folded, channels_last; "
        "training: channels_last, as `train` runs), ours-compiled (the same compiled), "
        "ours-fused (inference: separable units as one Triton kernel on GPUs), "
        "ours-bf16 (--precision bf16), ours-int8 (--precision int8: our export quantized, in "
        "onnxruntime), "
        "timm:NAME (needs timm), onnxruntime (our ONNX export), ours-default (what eval and "
        "predict run in fp32 here: --backend auto). The first is the baseline.",
    )
    bench.add_argument("model", nargs="?", default="xception")
    bench.add_argument("--mode", choices=("inference", "train"), default="inference")
    bench.add_argument(
        "--contender",
        action="append",
        metavar="SPEC",
        help="ours, ours-fast, ours-compiled, ours-fused, ours-bf16, ours-int8, ours-default, "
        "timm:NAME, onnxruntime (repeatable)",
    )
    bench.add_argument(
        "--reference",
        action="append",
        metavar="SPEC",
        help="added after the contenders, e.g. timm:legacy_xception",
    )
    bench.add_argument("--baseline", help="contender the ratios refer to (default: first)")
    bench.add_argument("--batch-size", type=at_least(1), default=8)
    bench.add_argument("--image-size", type=at_least(1), default=299)
    add_hardware(bench)
    bench.add_argument("--compile", action="store_true", help="torch.compile ours and timm:")
    bench.add_argument("--threads", type=at_least(1), help="torch CPU threads")
    bench.add_argument("--rounds", type=at_least(1), default=7)
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
    reproduce.add_argument(
        "--seeds",
        type=at_least(1),
        help="runs of each arm (default: the experiment's, 3; more to decide a small effect)",
    )
    reproduce.add_argument(
        "--data", help="image folder, manifest root or shards (default: the built-in data set)"
    )
    reproduce.add_argument("--out", help="folder (default: reproductions/EXPERIMENT-SCALE)")
    reproduce.add_argument("--device", type=device_name, default="auto", help=DEVICE_HELP)
    key_values(reproduce, "--set", "training option for every arm, e.g. epochs=4 workers=0")
    reproduce.add_argument("--quiet", action="store_true", help="no progress")
    reproduce.set_defaults(run=cmd_reproduce)
    return parser


def one_line(error: object) -> str:
    """An error's message; for one raised in a DataLoader worker (which PyTorch re-raises
    with the worker's traceback in the message), the original message alone."""
    text = str(error)
    if "\nOriginal Traceback" not in text:
        return text
    last = text.rstrip().splitlines()[-1]
    return last.split(": ", 1)[1] if ": " in last else last


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command in ``argv`` (default: the process's); the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version and usage errors: argparse has printed
        return stop.code if isinstance(stop.code, int) else 2
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for reports that quote it
    run: Callable[[argparse.Namespace], int | None] = args.run
    try:
        return run(args) or 0
    except USER_ERRORS as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"xception {args.command}: error: {one_line(message)}", file=sys.stderr)
        return 2
    except (TrainingError, NoSpaceError) as error:
        print(f"xception {args.command}: error: {one_line(error)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"xception {args.command}: interrupted", file=sys.stderr)
        return 130
