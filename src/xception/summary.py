"""Layer tables, parameter counts and multiply-adds, measured by running the model once.

Multiply-adds count convolutions and fully-connected layers (each output element costs
``in_channels / groups * kh * kw`` of them), the convention of the paper and of most
published figures; BatchNorm, activations and pooling are left out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LayerRow:
    name: str
    kind: str
    output_shape: tuple[int, ...]
    params: int
    macs: int


@dataclass(frozen=True)
class ModelSummary:
    rows: list[LayerRow]
    image_size: int
    trainable_params: int
    frozen_params: int
    buffers: int
    macs: int


def layer_macs(module: nn.Module, output: torch.Tensor) -> int:
    """Multiply-adds of one convolution or linear layer for one image."""
    per_image = output[0].numel()
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return per_image * module.in_channels // module.groups * kh * kw
    if isinstance(module, nn.Linear):
        return per_image * module.in_features
    return 0


def summarize(model: nn.Module, image_size: int, depth: int = 2) -> ModelSummary:
    """Run one image through ``model`` and tabulate modules down to ``depth`` levels."""
    in_chans = getattr(model, "in_chans", 3)
    shown = {
        name: module for name, module in model.named_modules() if name and name.count(".") < depth
    }
    shapes: dict[str, tuple[int, ...]] = {}
    macs: dict[str, int] = {}

    def record(name: str):
        def hook(module: nn.Module, _inputs: object, output: object) -> None:
            if isinstance(output, torch.Tensor):
                if name in shown:
                    shapes[name] = tuple(output.shape[1:])
                macs[name] = macs.get(name, 0) + layer_macs(module, output)

        return hook

    handles = [
        module.register_forward_hook(record(name)) for name, module in model.named_modules() if name
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(torch.zeros(1, in_chans, image_size, image_size))
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()

    leaf_macs = {name: count for name, count in macs.items() if count}
    rows = [
        LayerRow(
            name,
            type(module).__name__,
            shapes.get(name, ()),
            sum(p.numel() for p in module.parameters()),
            sum(c for leaf, c in leaf_macs.items() if leaf == name or leaf.startswith(name + ".")),
        )
        for name, module in shown.items()
    ]
    params = list(model.parameters())
    return ModelSummary(
        rows=rows,
        image_size=image_size,
        trainable_params=sum(p.numel() for p in params if p.requires_grad),
        frozen_params=sum(p.numel() for p in params if not p.requires_grad),
        buffers=sum(b.numel() for b in model.buffers() if b.is_floating_point()),
        macs=sum(leaf_macs.values()),
    )


def count_macs(model: nn.Module, image_size: int) -> int:
    return summarize(model, image_size, depth=0).macs


def format_summary(summary: ModelSummary, title: str) -> str:
    header = ("layer", "type", "output", "params", "mult-adds")
    body = [
        (
            ("  " * row.name.count(".")) + row.name.rsplit(".", 1)[-1],
            row.kind,
            "x".join(map(str, row.output_shape)),
            f"{row.params:,}",
            f"{row.macs:,}",
        )
        for row in summary.rows
    ]
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        return "  ".join(
            c.ljust(w) if i < 3 else c.rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    rule = "-" * len(line(header))
    totals = [
        f"trainable parameters: {summary.trainable_params:,}",
        f"frozen parameters:    {summary.frozen_params:,}",
        f"buffers (BN stats):   {summary.buffers:,}",
        f"multiply-adds:        {summary.macs:,} ({summary.macs / 1e9:.2f} G) "
        f"at {summary.image_size}x{summary.image_size}",
    ]
    return "\n".join([title, rule, line(header), rule, *map(line, body), rule, *totals])
