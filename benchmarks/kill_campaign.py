"""Kill a training run at random moments, over and over, and check that it always resumes
and ends bitwise equal to a run that was never interrupted (issue 17's attack, rerun).

    python benchmarks/prepare_fashion_mnist.py data/fashion-mnist --per-class 600 100
    python benchmarks/kill_campaign.py OUT --data data/fashion-mnist [--kills 25] [--steps 60]

Each round starts `xception train` (or `--resume` once a checkpoint exists) as its own
process, with a save at every step, and SIGKILLs it after a random delay; the next round
resumes. When a run completes, its weights are compared with the uninterrupted run's and
the next run starts, until all the kills are spent. Prints one line per kill and a
summary; exits 1 if any resume was refused or any run ends with other weights.
"""

from __future__ import annotations

import argparse
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file


def train_argv(data: Path, run: Path, steps: int) -> list[str]:
    return [
        *(sys.executable, "-m", "xception", "train", "--data", str(data), "--out", str(run)),
        *("--model", "xception_tiny", "--image-size", "72", "--batch-size", "8"),
        *("--workers", "0", "--max-steps", str(steps), "--save-every", "1", "--quiet"),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--data", type=Path, required=True, help="an image folder to train on")
    parser.add_argument("--kills", type=int, default=25)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.out.exists():
        parser.error(f"{args.out} exists")
    data = args.data.resolve()
    reference = args.out / "reference"
    subprocess.run(train_argv(data, reference, args.steps), check=True)
    expected = load_file(reference / "last.safetensors")

    rng = random.Random(args.seed)
    kills, refused, cut, runs, differ = 0, 0, 0, 0, 0
    start = time.perf_counter()
    while kills < args.kills:  # a run killed until it completes; then the next one
        run = args.out / f"run{runs}"
        runs += 1
        while True:
            argv = (
                [sys.executable, "-m", "xception", "train", "--resume", str(run), "--quiet"]
                if (run / "last.safetensors").exists()
                else [*train_argv(data, run, args.steps), "--overwrite"]
            )
            process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if kills < args.kills:
                try:  # Python and torch take ~3-5 s to start
                    process.wait(timeout=rng.uniform(3.0, 12.0))
                except subprocess.TimeoutExpired:
                    process.kill()
            error = process.communicate()[1].decode()
            if process.returncode == -signal.SIGKILL:
                kills += 1
                pending = sorted(p.name for p in run.glob(".*.pending")) if run.exists() else []
                cut += bool(pending)
                print(f"kill {kills} ({run.name}): left {', '.join(pending) or 'no pending file'}")
            elif process.returncode != 0:
                refused += 1
                print(f"exit {process.returncode}: {error.strip()}")
                if refused > 3:
                    return 1
            else:
                break
        got = load_file(run / "last.safetensors")
        equal = got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
        differ += not equal
        print(f"{run.name} completed: weights {'bitwise equal' if equal else 'DIFFERENT'}")
    print(
        f"{kills} kills ({cut} leaving a checkpoint write cut short) over {runs} runs, "
        f"{refused} refused resumes, {differ} runs ending with other weights than the "
        f"uninterrupted run, {time.perf_counter() - start:.0f} s"
    )
    return 0 if not differ and not refused else 1


if __name__ == "__main__":
    sys.exit(main())
