"""Images per second delivered by the training loader alone (decode + augmentation +
collate, no model): WebDataset shards against the image folder they were made from, at 1
and 2 worker processes, interleaved, medians of rounds and their ratio.

    python benchmarks/prepare_fashion_mnist.py data/fashion-mnist      # once
    python benchmarks/loader_throughput.py data/fashion-mnist [--image-size 96]

The shards are written next to the work folder with `xception shard` (timed too). The
loaders are built as `Trainer` builds them (``make_dataset``, ``train_sampler``,
``make_loader``), with the quick recipe's augmentation (random-resized crop and flip).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

from xception.data.loaders import make_dataset, make_loader, open_data, train_sampler
from xception.data.shards import write_shards
from xception.data.transforms import Preprocessing


def images_per_second(data: Path, workers: int, pre: Preprocessing, batch: int) -> float:
    split = open_data(data)["train"]
    sampler = train_sampler(split, batch, 0, 0, 1, lanes=1, buffer=1000)
    loader = make_loader(
        make_dataset(split, pre, True, 0, lanes=1, buffer=1000), sampler, workers, False
    )
    batches = iter(loader)
    next(batches)  # worker start-up is not throughput
    start, images = time.perf_counter(), 0
    for item in batches:
        images += item.images.shape[0]
    return images / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--shards", type=Path, default=Path("/tmp/loader-shards"))
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    start = time.perf_counter()
    result = write_shards(
        args.folder, args.shards, shard_size=1000, splits=["train", "val"], progress=False
    )
    print(
        f"# {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} CPUs; "
        f"xception shard: {result.written} shards written, {result.kept} kept, "
        f"{time.perf_counter() - start:.1f} s"
    )
    pre = Preprocessing(image_size=args.image_size)
    runs: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.rounds):
        for workers in (1, 2):
            for name, data in (("folder", args.folder), ("shards", args.shards)):
                rate = images_per_second(data, workers, pre, args.batch)
                runs.setdefault((name, workers), []).append(rate)
    print("| workers | folder img/s | shards img/s | shards / folder |")
    print("|---:|---:|---:|---:|")
    for workers in (1, 2):
        folder = statistics.median(runs[("folder", workers)])
        shards = statistics.median(runs[("shards", workers)])
        print(f"| {workers} | {folder:.0f} | {shards:.0f} | {shards / folder:.2f} |")


if __name__ == "__main__":
    main()
