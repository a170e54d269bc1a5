"""Per-class results of a single-label evaluation, for people: a table to print, and
``per_class.csv``, ``confusion.csv`` and ``confusion.png`` (class names on both axes)."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from xception.evaluation import per_class
from xception.files import write_text
from xception.plots import pyplot, save_figure

# Above this many classes the printed table and the plot's cell labels are left out.
LEGIBLE_CLASSES = 40
REPORT_FILES = ("per_class.csv", "confusion.csv", "confusion.png")


def format_table(rows: list[dict[str, Any]]) -> str:
    width = max(len("class"), *(len(row["class"]) for row in rows))
    lines = [f"{'class':<{width}}  {'images':>6}  {'precision':>9}  {'recall':>6}  {'f1':>6}"]
    for row in rows:
        recall = "-" if row["recall"] is None else f"{row['recall']:.4f}"
        lines.append(
            f"{row['class']:<{width}}  {row['images']:>6}  {row['precision']:>9.4f}  "
            f"{recall:>6}  {row['f1']:>6.4f}"
        )
    return "\n".join(lines)


def _csv(rows: list[list[Any]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def write_class_report(folder: Path, confusion: torch.Tensor, classes: Sequence[str]) -> None:
    """``per_class.csv`` (precision, recall = the class's accuracy, F1, images),
    ``confusion.csv`` (rows: true class, columns: predicted) and ``confusion.png``."""
    rows = per_class(confusion, classes)
    columns = ["class", "images", "precision", "recall", "f1"]
    table = [columns, *([r[c] if r[c] is not None else "" for c in columns] for r in rows)]
    write_text(folder / "per_class.csv", _csv(table))
    counts = confusion.tolist()
    table = [[name, *row] for name, row in zip(classes, counts, strict=True)]
    table.insert(0, ["true \\ predicted", *classes])
    write_text(folder / "confusion.csv", _csv(table))
    plot_confusion(folder / "confusion.png", confusion, classes)


def plot_confusion(path: Path, confusion: torch.Tensor, classes: Sequence[str]) -> None:
    """Rows normalised to the share of each true class, counts written in the cells."""
    plt = pyplot()
    counts = confusion.to(torch.float64)
    shares = counts / counts.sum(1, keepdim=True).clamp(min=1)
    size = min(4 + 0.45 * len(classes), 24)
    fig, axis = plt.subplots(figsize=(size + 1.5, size))
    image = axis.imshow(shares.numpy(), cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=axis, fraction=0.046, pad=0.04, label="share of the true class")
    if len(classes) <= LEGIBLE_CLASSES:
        ticks = range(len(classes))
        axis.set_xticks(ticks, classes, rotation=60, ha="right")
        axis.set_yticks(ticks, classes)
        for i, row in enumerate(counts.tolist()):
            for j, value in enumerate(row):
                colour = "white" if shares[i, j] > 0.5 else "black"
                axis.text(j, i, f"{value:.0f}", ha="center", va="center", color=colour, fontsize=8)
    axis.set(xlabel="predicted class", ylabel="true class", title="confusion matrix")
    fig.tight_layout()
    save_figure(fig, path)
