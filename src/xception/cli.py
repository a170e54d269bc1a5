"""The ``xception`` command: parses, calls the library, prints. User errors end with one
line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Callable, Sequence
from typing import Any

from xception.registry import create_model, get_entry, list_models
from xception.summary import format_summary, summarize

USER_ERRORS = (ValueError, FileNotFoundError, KeyError, NotADirectoryError, PermissionError)


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


def overrides_of(args: argparse.Namespace) -> dict[str, Any]:
    return dict(parse_override(item) for group in args.override or [] for item in group)


def cmd_summary(args: argparse.Namespace) -> None:
    model = create_model(args.model, **overrides_of(args))
    size = args.image_size or model.config.image_size
    summary = summarize(model, size, depth=args.depth)
    print(format_summary(summary, f"{args.model} ({get_entry(args.model).description})"))


def cmd_models(args: argparse.Namespace) -> None:
    rows = [("model", "input", "parameters", "mult-adds", "description")]
    for name in list_models():
        model = create_model(name)
        size = model.config.image_size
        macs = summarize(model, size, depth=0).macs
        params = sum(p.numel() for p in model.parameters())
        rows.append(
            (name, str(size), f"{params:,}", f"{macs / 1e9:.2f} G", get_entry(name).description)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row[:4], widths, strict=True)), row[4])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="xception", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    summary = commands.add_parser("summary", help="layer table, parameters, multiply-adds")
    summary.add_argument("model", metavar="MODEL", help=f"one of: {', '.join(list_models())}")
    summary.add_argument("--image-size", type=int, help="input side (default: the model's)")
    summary.add_argument("--depth", type=int, default=2, help="module nesting shown (default 2)")
    summary.add_argument(
        "--override",
        nargs="+",
        action="append",
        metavar="KEY=VALUE",
        help="config fields, e.g. residual=False spatial_groups=8",
    )
    summary.set_defaults(run=cmd_summary)

    models = commands.add_parser("models", help="list the registered models")
    models.set_defaults(run=cmd_models)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    run: Callable[[argparse.Namespace], None] = args.run
    try:
        run(args)
    except USER_ERRORS as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"xception {args.command}: error: {message}", file=sys.stderr)
        return 2
    return 0
