"""Fashion-MNIST (70,000 real 28x28 product photos, 10 classes) as an image folder that
`xception train --data` reads: OUT/train/<class>/*.png (the 60,000 training images) and
OUT/val/<class>/*.png (the 10,000 test images, the split the data set's published
benchmarks report).

    apt-get install dataset-fashion-mnist
    python benchmarks/prepare_fashion_mnist.py data/fashion-mnist [--per-class 600 100]

Nothing downloads: the images come from the Debian package's IDX files.
"""

from __future__ import annotations

import argparse
import gzip
from pathlib import Path

import numpy as np
from PIL import Image

SOURCE = Path("/usr/share/datasets/fashion-mnist")
CLASSES = (
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
SPLITS = {"train": "train", "val": "t10k"}  # our split name: the IDX files' prefix


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (big-endian header: magic, dimension sizes; then uint8 data)."""
    data = gzip.decompress(path.read_bytes())
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    return np.frombuffer(data, np.uint8, offset=4 + 4 * dims).reshape(shape)


def write_split(
    source: Path,
    prefix: str,
    folder: Path,
    per_class: int | None,
    classes: tuple[str, ...] = CLASSES,
) -> int:
    """The images of ``classes`` in one IDX split as ``folder/<class>/<index>.png``."""
    images = read_idx(source / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz")
    written = 0
    for label, name in enumerate(CLASSES):
        if name not in classes:
            continue
        (folder / name).mkdir(parents=True, exist_ok=True)
        indices = np.flatnonzero(labels == label)[:per_class]  # the files' order: no choice
        for index in indices:
            Image.fromarray(images[index], mode="L").save(folder / name / f"{index:05d}.png")
        written += len(indices)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (train/ and val/)")
    parser.add_argument("--source", type=Path, default=SOURCE, help=f"default: {SOURCE}")
    parser.add_argument(
        "--per-class",
        type=int,
        nargs=2,
        metavar=("TRAIN", "VAL"),
        help="only the first TRAIN / VAL images of each class (default: all)",
    )
    args = parser.parse_args()
    if not (args.source / "train-images-idx3-ubyte.gz").is_file():
        parser.error(f"no Fashion-MNIST in {args.source}: apt-get install dataset-fashion-mnist")
    if (args.out / "train").exists() or (args.out / "val").exists():
        parser.error(f"{args.out} already holds a train or val folder")
    limits = args.per_class or (None, None)
    for (split, prefix), limit in zip(SPLITS.items(), limits, strict=True):
        count = write_split(args.source, prefix, args.out / split, limit)
        print(f"{split}: {count} images in {args.out / split}")


if __name__ == "__main__":
    main()
