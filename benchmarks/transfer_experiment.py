"""Does fine-tuning from pretrained weights beat training from scratch? A transfer
experiment on real photos (Fashion-MNIST) that reruns in about 15 minutes on 2 cores.

1. Pretrain xception_tiny (quick recipe) on five classes: t-shirt/top, trouser,
   pullover, dress, coat.
2. On the other five (sandal, shirt, sneaker, bag, ankle boot) with only --shots training
   images a class, train the same model twice a seed, with the same recipe (finetune)
   and number of steps: from the pretrained weights (--init-weights, a new head), and
   from scratch.
3. Report val top-1 (the data set's test images) per arm: mean and spread over seeds.

    apt-get install dataset-fashion-mnist
    python benchmarks/transfer_experiment.py --out benchmarks/out/transfer

Writes OUT/results.json, OUT/transfer.png and OUT/report.md; every run is an ordinary
run folder under OUT/runs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

# The script's folder is on the path when it runs as `python benchmarks/...`.
from prepare_fashion_mnist import CLASSES, SOURCE, write_split

import xception
from xception.plots import pyplot, save_figure
from xception.training.logs import read_metrics

PRETRAIN, TARGET = CLASSES[:5], CLASSES[5:]


def prepare(root: Path, classes: tuple[str, ...], train: int, val: int) -> Path:
    """An image folder of ``classes`` only, ``train``/``val`` images each (the files' order)."""
    if (root / "train").is_dir():
        return root
    for split, prefix, count in (("train", "train", train), ("val", "t10k", val)):
        write_split(SOURCE, prefix, root / split, count, classes)
    return root


def run(out: Path, **options) -> dict:
    """One training run (resumed from its folder's results if it finished before)."""
    if (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
    else:
        result = xception.train(out=out, overwrite=True, progress=False, workers=0, **options)
        summary = {"metrics": result.metrics}
    return {"final": summary["metrics"]["val_top1"], "rows": read_metrics(out)}


def spread(values: list[float]) -> dict:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def plot(path: Path, arms: dict[str, list[dict]]) -> None:
    plt = pyplot()
    fig, axis = plt.subplots(figsize=(7, 4.2))
    for (arm, runs), colour in zip(arms.items(), ("tab:blue", "tab:orange"), strict=False):
        steps = [row["step"] for row in runs[0]["rows"]]
        curves = [[row["val_top1"] for row in r["rows"]] for r in runs]
        mean = [statistics.mean(values) for values in zip(*curves, strict=True)]
        low = [min(values) for values in zip(*curves, strict=True)]
        high = [max(values) for values in zip(*curves, strict=True)]
        axis.plot(steps, mean, marker="o", color=colour, label=f"{arm} (mean of {len(runs)})")
        axis.fill_between(steps, low, high, color=colour, alpha=0.2)
    axis.set(xlabel="step", ylabel="val top-1 (averaged weights)", ylim=(0, 1))
    axis.set_title("Fashion-MNIST, 5 new classes, few images each: fine-tuned vs from scratch")
    axis.grid(alpha=0.3)
    axis.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/transfer"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--shots", type=int, default=50, help="training images a new class")
    parser.add_argument("--pretrain-images", type=int, default=1200, help="a class")
    parser.add_argument("--pretrain-epochs", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=10, help="of the fine-tuning runs")
    parser.add_argument("--val-images", type=int, default=200, help="test images a class")
    args = parser.parse_args()
    start = time.perf_counter()
    data = args.out / "data"
    source = prepare(data / "pretrain", PRETRAIN, args.pretrain_images, args.val_images)
    target = prepare(data / "target", TARGET, args.shots, args.val_images)
    print(f"pretraining on {', '.join(PRETRAIN)}", flush=True)
    pretrained = args.out / "runs" / "pretrain"
    pre = run(pretrained, data=str(source), epochs=args.pretrain_epochs)
    print(f"  val top-1 {pre['final']:.4f}", flush=True)
    common = dict(recipe="finetune", data=str(target), epochs=args.epochs)
    arms: dict[str, list[dict]] = {"fine-tuned": [], "from scratch": []}
    for seed in range(args.seeds):
        arms["fine-tuned"].append(
            run(
                args.out / "runs" / f"finetune-seed{seed}",
                init_weights=str(pretrained / "best.safetensors"),
                seed=seed,
                **common,
            )
        )
        arms["from scratch"].append(
            run(
                args.out / "runs" / f"scratch-seed{seed}",
                model="xception_tiny",
                image_size=72,
                seed=seed,
                **common,
            )
        )
        print(
            f"seed {seed}: fine-tuned {arms['fine-tuned'][-1]['final']:.4f}, "
            f"from scratch {arms['from scratch'][-1]['final']:.4f}",
            flush=True,
        )
    finals = {arm: spread([r["final"] for r in runs]) for arm, runs in arms.items()}
    gap = [a["final"] - b["final"] for a, b in zip(*arms.values(), strict=True)]
    results = {
        "pretrain_val_top1": pre["final"],
        "arms": finals,
        "gap": spread(gap),
        "steps": int(arms["fine-tuned"][0]["rows"][-1]["step"]),
        "options": vars(args) | {"out": str(args.out)},
        "wall_time_s": time.perf_counter() - start,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(args.out / "transfer.png", arms)
    lines = [
        "| arm | val top-1, mean | std | min-max | seeds |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {arm} | {f['mean']:.4f} | {f['std'] or 0:.4f} | {f['min']:.4f}-{f['max']:.4f} "
            f"| {len(f['values'])} |"
            for arm, f in finals.items()
        ),
        "",
        f"Gap (fine-tuned - from scratch, paired by seed): {results['gap']['mean']:+.4f} "
        f"(std {results['gap']['std'] or 0:.4f}, min {results['gap']['min']:+.4f}); "
        f"{results['steps']} steps each; pretraining val top-1 {pre['final']:.4f}; "
        f"{results['wall_time_s'] / 60:.1f} min.",
    ]
    (args.out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
