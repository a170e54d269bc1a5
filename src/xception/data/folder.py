"""Image folders and CSV manifests: finding samples, checking the layout, reading images.

Layouts:

- single-label (torchvision ImageFolder): ``ROOT/train/<class>/*``, ``ROOT/val/<class>/*``;
- CSV manifests ``ROOT/train.csv`` and ``ROOT/val.csv`` (UTF-8, with or without the BOM
  that Excel writes). The header decides the task: ``path,label`` is single-label (one
  class a row); ``path,labels`` is multi-label (the paper's JFT setting), labels separated
  by ``;``. Relative paths resolve against ROOT; absolute paths and paths that leave ROOT
  are allowed and counted in the run's log; a path listed twice is used twice and named.

Layout problems (a missing file among them) fail before training; an unreadable image
fails only itself: it is skipped and named in the run's log, so one bad file never kills
a long run. Only regular files are read: a folder named ``x.jpg``, a FIFO or a broken link
is skipped and named like a corrupt image, never opened (a FIFO would block forever).
"""

from __future__ import annotations

import csv
import os
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch
from PIL import ExifTags, Image, ImageFile, ImageOps

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
)
SPLITS = ("train", "val")


@dataclass(frozen=True)
class Split:
    """The samples of one split: paths and label indices (one per image, or several)."""

    root: Path
    paths: tuple[str, ...]
    labels: tuple[tuple[int, ...], ...]
    classes: tuple[str, ...]
    multi_label: bool
    notes: tuple[str, ...] = ()  # what the run's log should say about the listing

    def __len__(self) -> int:
        return len(self.paths)

    def class_counts(self) -> tuple[int, ...]:
        """Images of each class."""
        counts = Counter(label for labels in self.labels for label in labels)
        return tuple(counts[c] for c in range(len(self.classes)))

    def label_matrix(self) -> torch.Tensor:
        """(images, classes) 0/1 matrix of the labels."""
        matrix = torch.zeros(len(self.paths), len(self.classes))
        for row, labels in enumerate(self.labels):
            matrix[row, list(labels)] = 1.0
        return matrix


def image_files(folder: Path) -> list[Path]:
    """Every entry under ``folder`` named as an image, sorted, regular file or not:
    reading names the others."""
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)


def _folder_split(root: Path, split: str) -> tuple[list[str], list[str], list[int]]:
    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{root} has no '{split}' folder (expected "
            f"{root}/{split}/<class>/<image> or {root}/{split}.csv)"
        )
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise ValueError(f"{folder} has no class folders")
    paths, labels = [], []
    for index, name in enumerate(classes):
        images = image_files(folder / name)
        if not images:
            raise ValueError(f"class folder {folder / name} holds no images")
        paths += [str(p.relative_to(root)) for p in images]
        labels += [index] * len(images)
    return classes, paths, labels


def _manifest_split(root: Path, split: str) -> tuple[list[str], list[list[str]], bool, list[str]]:
    """Paths, label names a row, whether the manifest is multi-label (its header), and notes
    on the paths for the run's log."""
    manifest = root / f"{split}.csv"
    if not manifest.is_file():
        raise FileNotFoundError(f"{root} has no {split}.csv manifest")
    paths, names, missing = [], [], []
    with manifest.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        columns = {name.strip() for name in reader.fieldnames or ()}
        if "path" not in columns or len(columns & {"label", "labels"}) != 1:
            raise ValueError(
                f"{manifest} must have a header 'path,label' (single-label) or "
                "'path,labels' (multi-label, labels separated by ';')"
            )
        multi_label = "labels" in columns
        for line, raw in enumerate(reader, 2):
            row = {(key or "").strip(): value for key, value in raw.items()}
            text = row["labels" if multi_label else "label"] or ""
            labels = [label.strip() for label in (text.split(";") if multi_label else [text])]
            labels = [label for label in labels if label]
            if not row["path"] or not labels:
                raise ValueError(f"{manifest}:{line}: needs a path and a label")
            if not (root / row["path"]).exists():
                missing.append(f"{line}: {row['path']}")
            paths.append(row["path"])
            names.append(labels)
    if missing:
        raise FileNotFoundError(
            f"{manifest} lists {len(missing)} missing image(s), e.g. line "
            + "; line ".join(missing[:3])
        )
    if not paths:
        raise ValueError(f"{manifest} lists no images")
    return paths, names, multi_label, _path_notes(manifest, root, paths)


def _path_notes(manifest: Path, root: Path, paths: list[str]) -> list[str]:
    notes = []
    # by the text alone: resolving every path would cost a system call per component
    outside = [
        p for p in paths if Path(p).is_absolute() or Path(os.path.normpath(p)).parts[:1] == ("..",)
    ]
    if outside:
        notes.append(f"{manifest.name}: {len(outside)} path(s) outside {root}, e.g. {outside[0]}")
    repeated = [path for path, count in Counter(paths).items() if count > 1]
    if repeated:
        notes.append(
            f"{manifest.name}: {len(repeated)} path(s) listed more than once (each use "
            f"counts), e.g. {repeated[0]}"
        )
    return notes


def discover(root: str | Path) -> dict[str, Split]:
    """Both splits of a data set, checked: same classes, no empty class, nothing missing."""
    root = Path(root).expanduser()
    if root.exists() and not root.is_dir():
        raise NotADirectoryError(f"--data must be a folder, and {root} is a file")
    if not root.is_dir():
        raise FileNotFoundError(f"data folder not found: {root}")
    if (root / "train.csv").is_file():
        return _discover_manifest(root)
    found = {split: _folder_split(root, split) for split in SPLITS}
    classes = found["train"][0]
    if found["val"][0] != classes:
        extra = sorted(set(found["val"][0]) ^ set(classes))
        raise ValueError(
            f"train and val have different classes (e.g. {extra[0]!r}): "
            "every class needs a folder in both splits"
        )
    return {
        split: Split(root, tuple(paths), tuple((label,) for label in labels), tuple(classes), False)
        for split, (_, paths, labels) in found.items()
    }


def _discover_manifest(root: Path) -> dict[str, Split]:
    found = {split: _manifest_split(root, split) for split in SPLITS}
    if found["train"][2] != found["val"][2]:
        raise ValueError(f"{root}: train.csv and val.csv must have the same header")
    classes = sorted({name for names in found["train"][1] for name in names})
    index = {name: i for i, name in enumerate(classes)}
    for line, names in enumerate(found["val"][1], 2):
        unknown = [name for name in names if name not in index]
        if unknown:
            raise ValueError(
                f"{root / 'val.csv'}:{line}: label {unknown[0]!r}, which no training image has"
            )
    return {
        split: Split(
            root,
            tuple(paths),
            tuple(tuple(sorted({index[n] for n in names})) for names in labels),
            tuple(classes),
            multi_label,
            tuple(notes),
        )
        for split, (paths, labels, multi_label, notes) in found.items()
    }


def read_rgb(path: Path) -> Image.Image:
    """Decode a file fully (``decode_rgb``), refusing anything but a regular file."""
    if not path.is_file():  # a FIFO would block open() forever
        raise ValueError("not a regular file (a folder, FIFO, socket or broken link)")
    return decode_rgb(path)


def decode_rgb(source: Path | BinaryIO) -> Image.Image:
    """Decode fully (so truncation shows here) and convert to RGB (``to_rgb``).

    Raises ``OSError``/``ValueError`` for unreadable images.
    """
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL's palette-transparency warnings are not ours
        try:
            with Image.open(source) as image:
                image.load()
                return to_rgb(image)
        except (OSError, ValueError, SyntaxError):
            raise
        except Exception as error:  # decoders raise all sorts (bombs, struct, zlib, EOF...)
            raise ValueError(f"{type(error).__name__}: {error}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode as RGB, upright. The EXIF orientation is applied (phone photos are stored
    sideways with a tag saying so); transparent images are composited on white rather than
    losing alpha to black; 16-bit and float greyscale are scaled to 8 bits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
            image = ImageOps.exif_transpose(image)  # a copy: only where there is a turn
        if image.mode == "P" and "transparency" in image.info:
            image = image.convert("RGBA")
        if image.mode in ("RGBA", "LA"):
            background = Image.new("RGBA", image.size, (255, 255, 255, 255))
            return Image.alpha_composite(background, image.convert("RGBA")).convert("RGB")
        if image.mode in ("I", "I;16", "I;16B", "F"):
            image = image.point(lambda v: v / 256).convert("L")
        return image.convert("RGB")
