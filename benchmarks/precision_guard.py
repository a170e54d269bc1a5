"""The accuracy guard of low-precision inference, measured on real images: a trained model's
validation top-1 in fp32, bf16 and int8, and how often each agrees with fp32's top-1.

    python benchmarks/prepare_fashion_mnist.py data/fashion-mnist          # once
    xception train --data data/fashion-mnist --epochs 6 --out runs/fmnist-guard
    python benchmarks/precision_guard.py runs/fmnist-guard/best.safetensors data/fashion-mnist

int8 is calibrated on 256 images of the training split (never the validation images).
Targets (issue 15): bf16 within 0.3 pp of fp32 and >= 99.5% agreement; int8 within 1 pp
and >= 98%.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from xception.inference import Predictor
from xception.precision import cpu_features


def answers(predictor: Predictor, folder: Path) -> dict[str, str]:
    rows = predictor.predict([folder], top_k=1, batch_size=64)
    return {row["path"]: row["predictions"][0]["class"] for row in rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", type=Path)
    parser.add_argument("data", type=Path, help="image folder with train/ and val/")
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16", "int8"])
    args = parser.parse_args()
    print(f"# {time.strftime('%Y-%m-%d')}, {cpu_features()['cpu']}")
    print("| precision | top-1 | vs fp32 (pp) | agreement with fp32 | seconds |")
    print("|---|---:|---:|---:|---:|")
    reference = None
    for precision in args.precisions:
        start = time.perf_counter()
        calibrate = args.data / "train" if precision == "int8" else None
        predictor = Predictor.load(
            args.weights, device="cpu", precision=precision, calibrate=calibrate
        )
        found = answers(predictor, args.data / "val")
        seconds = time.perf_counter() - start
        accuracy = sum(Path(p).parent.name == c for p, c in found.items()) / len(found)
        reference = reference or (found, accuracy)
        agreement = sum(found[p] == reference[0][p] for p in found) / len(found)
        print(
            f"| {precision} | {accuracy:.4f} | {100 * (accuracy - reference[1]):+.2f} | "
            f"{agreement:.4f} | {seconds:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
