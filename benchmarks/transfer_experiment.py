"""Does fine-tuning from pretrained weights beat training from scratch? A transfer
experiment on real photos (Fashion-MNIST) that reruns in about 15 minutes on 2 cores.

1. Pretrain xception_tiny (quick recipe) on five classes: t-shirt/top, trouser,
   pullover, dress, coat.
2. On the other five (sandal, shirt, sneaker, bag, ankle boot) with only --shots training
   images a class (50 by default), train the same network for the same number of
   steps (about --steps, in whole epochs), a run per arm and seed: from the pretrained
   weights (--init-weights, a new head, the finetune recipe), and from scratch, with the
   finetune recipe and with quick (the recipe tuned for training from scratch).
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
    """One training run (read from its folder if it finished before)."""
    if not (out / "summary.json").is_file():
        xception.train(out=out, overwrite=True, progress=False, workers=0, **options)
    summary = json.loads((out / "summary.json").read_text())
    return {
        "final": summary["metrics"]["val_top1"],
        "rows": read_metrics(out),
        "seconds": summary["wall_time_s"],
    }


def spread(values: list[float]) -> dict:
    return {
        "mean": statistics.mean(values),
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "min": min(values),
        "max": max(values),
        "values": values,
    }


def plot(path: Path, settings: dict[int, dict[str, list[dict]]]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.2), squeeze=False)
    colours = ("tab:blue", "tab:orange", "tab:green")
    for axis, (shots, arms) in zip(axes[0], settings.items(), strict=True):
        for (arm, runs), colour in zip(arms.items(), colours, strict=False):
            steps = [row["step"] for row in runs[0]["rows"]]
            curves = list(zip(*([row["val_top1"] for row in r["rows"]] for r in runs), strict=True))
            mean = [statistics.mean(values) for values in curves]
            axis.plot(steps, mean, marker="o", color=colour, label=f"{arm} (mean of {len(runs)})")
            axis.fill_between(
                steps, list(map(min, curves)), list(map(max, curves)), color=colour, alpha=0.2
            )
        axis.set(xlabel="step", ylabel="val top-1 (averaged weights)", ylim=(0, 1))
        axis.set_title(f"5 new classes, {shots} training images each")
        axis.grid(alpha=0.3)
        axis.legend(loc="lower right")
    fig.tight_layout()
    save_figure(fig, path)


def compare(args: argparse.Namespace, shots: int, pretrained: Path) -> dict[str, list[dict]]:
    """Every arm and seed on the new classes with ``shots`` training images each."""
    target = prepare(args.out / "data" / f"target-{shots}", TARGET, shots, args.val_images)
    per_epoch = len(TARGET) * shots // args.batch_size
    epochs = max(1, round(args.steps / per_epoch))  # every arm: the same steps, whole epochs
    steps = dict(data=str(target), epochs=epochs, batch_size=args.batch_size)
    # The same network and preprocessing as the pretrained file's, which fine-tuning keeps:
    # xception_tiny at 72 px with quick's BatchNorm momentum (0.1) and evaluation crop (1.0).
    scratch = dict(
        model="xception_tiny", image_size=72, crop_pct=1.0, model_overrides={"bn_momentum": 0.1}
    )
    plans = {
        "fine-tuned": dict(recipe="finetune", init_weights=str(pretrained)),
        "from scratch, finetune recipe": dict(recipe="finetune", **scratch),
        "from scratch, quick recipe": dict(recipe="quick", **scratch),
    }
    folders = dict(zip(plans, ("finetune", "scratch", "quick"), strict=True))
    arms: dict[str, list[dict]] = {arm: [] for arm in plans}
    for seed in range(args.seeds):
        for arm, plan in plans.items():
            path = args.out / "runs" / f"{shots}-shots" / f"{folders[arm]}-seed{seed}"
            arms[arm].append(run(path, seed=seed, **plan, **steps))
        shown = ", ".join(f"{arm} {runs[-1]['final']:.4f}" for arm, runs in arms.items())
        print(f"{shots} shots, seed {seed}: {shown}", flush=True)
    return arms


def summarise(arms: dict[str, list[dict]]) -> dict:
    """Each arm's final scores, and fine-tuned minus each other arm, paired by seed."""
    tuned = [r["final"] for r in arms["fine-tuned"]]
    return {
        "arms": {arm: spread([r["final"] for r in runs]) for arm, runs in arms.items()},
        "gaps": {
            arm: spread([a - r["final"] for a, r in zip(tuned, runs, strict=True)])
            for arm, runs in arms.items()
            if arm != "fine-tuned"
        },
        "steps": int(arms["fine-tuned"][0]["rows"][-1]["step"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/out/transfer"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--shots", type=int, nargs="+", default=[50], help="training images a new class"
    )
    parser.add_argument("--pretrain-images", type=int, default=1200, help="a class")
    parser.add_argument("--pretrain-epochs", type=int, default=6)
    parser.add_argument("--steps", type=int, default=70, help="of each run on the new classes")
    parser.add_argument("--batch-size", type=int, default=32, help="of the runs on them")
    parser.add_argument("--val-images", type=int, default=200, help="test images a class")
    args = parser.parse_args()
    source = prepare(
        args.out / "data" / "pretrain", PRETRAIN, args.pretrain_images, args.val_images
    )
    print(f"pretraining on {', '.join(PRETRAIN)}", flush=True)
    pretrained = args.out / "runs" / "pretrain"
    pre = run(pretrained, data=str(source), epochs=args.pretrain_epochs)
    print(f"  val top-1 {pre['final']:.4f}", flush=True)
    settings = {
        shots: compare(args, shots, pretrained / "best.safetensors") for shots in args.shots
    }
    results = {
        "pretrain_val_top1": pre["final"],
        "settings": {str(shots): summarise(arms) for shots, arms in settings.items()},
        "options": vars(args) | {"out": str(args.out)},
        "training_time_s": pre["seconds"]
        + sum(r["seconds"] for arms in settings.values() for runs in arms.values() for r in runs),
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(args.out / "transfer.png", settings)
    lines = [
        "| images a class | arm | val top-1, mean | std | min-max | seeds |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    notes = []
    for shots, summary in results["settings"].items():
        for arm, f in summary["arms"].items():
            lines.append(
                f"| {shots} | {arm} | {f['mean']:.4f} | {f['std'] or 0:.4f} | "
                f"{f['min']:.4f}-{f['max']:.4f} | {len(f['values'])} |"
            )
        for arm, gap in summary["gaps"].items():
            notes.append(
                f"{shots} images a class, {summary['steps']} steps: fine-tuned - {arm} = "
                f"{gap['mean']:+.4f} (paired by seed; std {gap['std'] or 0:.4f}, "
                f"min {gap['min']:+.4f}, max {gap['max']:+.4f})."
            )
    notes.append(
        f"Pretraining val top-1 {pre['final']:.4f}; "
        f"{results['training_time_s'] / 60:.1f} min of training, every run summed."
    )
    text = "\n".join(lines) + "\n\n" + "\n".join(f"- {note}" for note in notes) + "\n"
    (args.out / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
