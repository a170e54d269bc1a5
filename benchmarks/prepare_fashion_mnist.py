"""Fashion-MNIST (70,000 real 28x28 product photos, 10 classes) as an image folder that
`xception train --data` reads: OUT/train/<class>/*.png (the 60,000 training images) and
OUT/val/<class>/*.png (the 10,000 test images, the split the data set's published
benchmarks report).

    apt-get install dataset-fashion-mnist
    python benchmarks/prepare_fashion_mnist.py data/fashion-mnist [--per-class 600 100]
    python benchmarks/prepare_fashion_mnist.py data/fashion-multi --multi-label 6000 1000

``--multi-label TRAIN VAL`` writes a multi-label set instead (the paper's JFT setting,
Table 2): each image is a 2x2 grid of 56x56 px holding 1 to 3 real photos of the split in
random cells (the rest black), and its labels are exactly the classes of the photos it
holds, in manifests ``OUT/train.csv`` / ``OUT/val.csv`` (``path,labels``). Training
composites draw only training photos and validation composites only test photos.

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


def write_composites(
    source: Path, prefix: str, out: Path, split: str, count: int, seed: int
) -> None:
    """``count`` 2x2 composites of 1-3 photos of one IDX split, and their manifest."""
    images = read_idx(source / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(source / f"{prefix}-labels-idx1-ubyte.gz")
    rng = np.random.default_rng(seed)
    (out / split).mkdir(parents=True, exist_ok=True)
    rows = ["path,labels"]
    for n in range(count):
        canvas = np.zeros((56, 56), np.uint8)
        photos = rng.choice(len(images), size=rng.integers(1, 4), replace=False)
        for cell, photo in zip(rng.permutation(4), photos, strict=False):
            row, col = divmod(int(cell), 2)
            canvas[28 * row : 28 * row + 28, 28 * col : 28 * col + 28] = images[photo]
        name = f"{split}/{n:06d}.png"
        Image.fromarray(canvas, mode="L").save(out / name)
        rows.append(f"{name},{';'.join(sorted({CLASSES[labels[p]] for p in photos}))}")
    (out / f"{split}.csv").write_text("\n".join(rows) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder to write (train/ and val/)")
    parser.add_argument("--source", type=Path, default=SOURCE, help=f"default: {SOURCE}")
    for flag, text in (
        ("--per-class", "only the first TRAIN / VAL images of each class (default: all)"),
        ("--multi-label", "write TRAIN / VAL multi-label composites of 1-3 photos instead"),
    ):
        parser.add_argument(flag, type=int, nargs=2, metavar=("TRAIN", "VAL"), help=text)
    parser.add_argument("--seed", type=int, default=0, help="composites: which photos, where")
    args = parser.parse_args()
    if not (args.source / "train-images-idx3-ubyte.gz").is_file():
        parser.error(f"no Fashion-MNIST in {args.source}: apt-get install dataset-fashion-mnist")
    if (args.out / "train").exists() or (args.out / "val").exists():
        parser.error(f"{args.out} already holds a train or val folder")
    if args.multi_label:
        pairs = zip(SPLITS.items(), args.multi_label, strict=True)
        for index, ((split, prefix), count) in enumerate(pairs):
            write_composites(args.source, prefix, args.out, split, count, 2 * args.seed + index)
            print(f"{split}: {count} composites in {args.out / split}, {args.out / split}.csv")
        return
    limits = args.per_class or (None, None)
    for (split, prefix), limit in zip(SPLITS.items(), limits, strict=True):
        count = write_split(args.source, prefix, args.out / split, limit)
        print(f"{split}: {count} images in {args.out / split}")


if __name__ == "__main__":
    main()
