"""Start-up time and peak memory of a training run's data bookkeeping, against the size of
the data set: a CSV manifest (the folder path) against WebDataset shards.

    python benchmarks/data_scale.py [--sizes 1000000 10000000] [--work /tmp/data-scale]

No image is needed to measure what happens before the first sample is read, so the data
sets are synthetic: a manifest of N rows naming 1,000 classes, and an info.json of N/1,000
shards with sparse files of the recorded sizes. Each measurement runs in a fresh process
(peak RSS is the process's ``ru_maxrss``) and does what ``Trainer`` does at start: list the
split, count classes (MAP@100 weights, balance) and draw the first epoch's first batch.
The manifest's per-row existence check is skipped (no files exist); it would only add a
stat per row.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

CLASSES = 1000
PER_SHARD = 1000
BATCH = 256

CHILD = """
import json, resource, sys, time, pathlib
kind, root = sys.argv[1], sys.argv[2]
start = time.perf_counter()
from xception.data.loaders import open_data, train_sampler
from xception.evaluation import class_frequencies
imported = time.perf_counter()
if kind == "manifest":
    pathlib.Path.exists = lambda self: True  # no image files: skip the per-row stat
splits = open_data(root)
train = splits["train"]
weights = class_frequencies(train.class_counts(), len(train))
sampler = train_sampler(train, 256, 0, 0, 1, lanes=1, buffer=1000)
first = next(iter(sampler))
done = time.perf_counter()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"seconds": done - imported, "peak_mb": peak, "images": len(train)}))
"""


def write_manifest(root: Path, size: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for split, rows in (("train", size), ("val", CLASSES)):
        with open(root / f"{split}.csv", "w") as f:
            f.write("path,label\n")
            for start in range(0, rows, 100_000):
                f.writelines(
                    f"images/{i:09d}.jpg,class{i % CLASSES:04d}\n"
                    for i in range(start, min(rows, start + 100_000))
                )


def write_shard_info(root: Path, size: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, rows in (("train", size), ("val", CLASSES)):
        shards = []
        for number, start in enumerate(range(0, rows, PER_SHARD)):
            name = f"{split}-{number:06d}.tar"
            samples = min(PER_SHARD, rows - start)
            with open(root / name, "wb") as f:
                f.truncate(samples * 10_240)  # sparse: takes no disk
            shards.append({"name": name, "samples": samples, "bytes": samples * 10_240})
            shards[-1]["sha256"] = "0" * 64
        counts = [rows // CLASSES] * CLASSES
        splits[split] = {"samples": rows, "class_counts": counts, "shards": shards}
    info = {
        "format": "webdataset",
        "classes": [f"class{c:04d}" for c in range(CLASSES)],
        "multi_label": False,
        "splits": splits,
    }
    (root / "info.json").write_text(json.dumps(info))


def measure(kind: str, root: Path) -> dict:
    result = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(root)], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/data-scale"))
    args = parser.parse_args()
    print(
        f"# {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, python {platform.python_version()}"
    )
    print("| images | path | start-up s | peak memory MB |")
    print("|---:|---|---:|---:|")
    for size in args.sizes:
        manifest, shards = args.work / f"manifest-{size}", args.work / f"shards-{size}"
        if not manifest.exists():
            write_manifest(manifest, size)
        if not shards.exists():
            write_shard_info(shards, size)
        for kind, root in (("manifest", manifest), ("shards", shards)):
            found = measure(kind, root)
            assert found["images"] == size, found
            print(
                f"| {size:,} | {kind} | {found['seconds']:.2f} | {found['peak_mb']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
