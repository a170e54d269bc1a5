"""Why Inception V3 did not train at the tiny scale: each block's output size, activation
spread and gradient norm over the first training steps, for the `families` arms at two
input sizes, on real images.

    python benchmarks/family_diagnostics.py data/fashion-mnist --sizes 80 139 --steps 20

For every (model, size): the loss after ``--steps`` AdamW steps at the `quick` recipe's
rate (against ln(classes), the loss of a uniform guess), and per block the output's
spatial size, the standard deviation of its output and the norm of its parameters'
gradient at the first and the last step. Blocks whose output is 1x1, or whose gradient
vanishes against the others', are the evidence.
"""

from __future__ import annotations

import argparse
import math
import random
from pathlib import Path

import torch
from torch import nn

from xception.data.folder import image_files, read_rgb
from xception.data.transforms import Preprocessing, eval_transform, normalize
from xception.registry import create_model
from xception.reproduction.experiments import arms, get_experiment, get_scale


def blocks(model: nn.Module) -> dict[str, nn.Module]:
    """The top-level stages of either family (Xception's flows are opened one level)."""
    found = {}
    for name, child in model.named_children():
        if name == "head":
            continue
        inner = dict(child.named_children()) if name.endswith("_flow") else {}
        found |= {f"{name}.{k}": v for k, v in inner.items()} if inner else {name: child}
    return found


def images(root: str, size: int, count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    paths = image_files(Path(root) / "train")
    classes = sorted({p.parent.name for p in paths})
    chosen = random.Random(seed).sample(paths, count)
    pre = Preprocessing(image_size=size, crop_pct=1.0)
    x = torch.stack([eval_transform(read_rgb(p), pre) for p in chosen])
    y = torch.tensor([classes.index(p.parent.name) for p in chosen])
    return normalize(x, pre, torch.float32), y


def diagnose(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int, batch: int) -> dict:
    named = blocks(model)
    outputs: dict[str, torch.Tensor] = {}
    for name, module in named.items():
        module.register_forward_hook(lambda _m, _i, out, n=name: outputs.__setitem__(n, out))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    model.train()
    first: dict[str, tuple] = {}
    loss = torch.tensor(math.nan)
    for step in range(steps):
        start = (step * batch) % len(x)
        xb, yb = x[start : start + batch], y[start : start + batch]
        loss = nn.functional.cross_entropy(model(xb), yb)
        optimizer.zero_grad()
        loss.backward()
        rows = {}
        for name, module in named.items():
            grads = [p.grad.norm() for p in module.parameters() if p.grad is not None]
            out = outputs[name]
            rows[name] = (
                tuple(out.shape[-2:]),
                out.detach().std().item(),
                torch.stack(grads).norm().item() if grads else 0.0,
            )
        if step == 0:
            first = rows
        optimizer.step()
    return {"loss": loss.item(), "first": first, "last": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data", help="an image folder with train/ (e.g. data/fashion-mnist)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[80, 139])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(2)
    scale = get_scale("tiny")
    for size in args.sizes:
        x, y = images(args.data, size, args.steps * args.batch, seed=0)
        for arm in arms(get_experiment("families"), scale):
            torch.manual_seed(0)
            model = create_model(arm.model, num_classes=10, **arm.overrides)
            found = diagnose(model, x, y, args.steps, args.batch)
            print(
                f"\n## {arm.label}, {size} px: loss {found['loss']:.3f} after {args.steps} "
                f"steps (uniform guess {math.log(10):.3f})"
            )
            print(
                "| block | output | act. sd (step 1) | grad norm (step 1) | act. sd (last) "
                "| grad norm (last) |\n|---|---|---:|---:|---:|---:|"
            )
            for name, (shape, sd, grad) in found["first"].items():
                _, sd_last, grad_last = found["last"][name]
                print(
                    f"| {name} | {shape[0]}x{shape[1]} | {sd:.3f} | {grad:.2e} | "
                    f"{sd_last:.3f} | {grad_last:.2e} |"
                )


if __name__ == "__main__":
    main()
