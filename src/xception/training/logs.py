"""What a run leaves for people to read: ``run.log``, ``metrics.csv``, TensorBoard events
and ``profile.png`` (accuracy and loss against steps, like the paper's Figs. 6-10)."""

from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Any

from xception.files import atomic_write
from xception.plots import pyplot, save_figure

METRICS_FILE = "metrics.csv"


def run_logger(run_dir: Path | None) -> logging.Logger:
    """A logger writing to ``run.log`` (appending across resumes); silent without a folder."""
    logger = logging.getLogger(f"xception.run.{run_dir}")
    logger.propagate = False
    logger.setLevel(logging.INFO)
    if run_dir is not None and not logger.handlers:
        handler = logging.FileHandler(run_dir / "run.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(handler)
    return logger


def close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def read_metrics(run_dir: Path) -> list[dict[str, float]]:
    path = run_dir / METRICS_FILE
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [{k: float(v) for k, v in row.items() if v != ""} for row in csv.DictReader(f)]


def write_metrics(run_dir: Path, rows: list[dict[str, Any]]) -> None:
    """Rewrite the whole CSV atomically (a resumed run drops rows past its checkpoint)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, columns)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(run_dir / METRICS_FILE, write)


def plot_profile(run_dir: Path, rows: list[dict[str, float]], title: str) -> None:
    """Top-1 (raw and averaged weights) and losses against steps."""
    plt = pyplot()
    steps = [row["step"] for row in rows]
    fig, (acc, loss) = plt.subplots(1, 2, figsize=(11, 4))
    for key, label in (
        ("val_top1", "val top-1 (averaged)"),
        ("val_raw_top1", "val top-1 (raw)"),
        ("val_map100", "val MAP@100 (averaged)"),
        ("train_top1", "train top-1"),
    ):
        if any(key in row for row in rows):
            acc.plot(steps, [row.get(key, float("nan")) for row in rows], marker="o", label=label)
    for key, label in (("train_loss", "train loss"), ("val_loss", "val loss (averaged)")):
        if any(key in row for row in rows):
            loss.plot(steps, [row.get(key, float("nan")) for row in rows], marker="o", label=label)
    acc.set(xlabel="step", ylabel="accuracy", title=title)
    loss.set(xlabel="step", ylabel="loss", title="loss")
    for axis in (acc, loss):
        axis.grid(alpha=0.3)
        axis.legend()
    fig.tight_layout()
    save_figure(fig, run_dir / "profile.png")


class TensorBoard:
    """TensorBoard scalars; created lazily so runs without a folder import nothing."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / "tensorboard"))

    def scalars(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class RunLogs:
    """Everything a run writes for people, in one object: ``run.log``, ``metrics.csv``,
    ``profile.png`` and TensorBoard scalars. Without a folder (ranks other than 0) it
    writes nothing. A resumed run drops the rows past its checkpoint's ``step``."""

    def __init__(self, run_dir: Path | None, title: str, step: int) -> None:
        self.run_dir, self.title = run_dir, title
        self.logger = run_logger(run_dir)
        self.board = TensorBoard(run_dir) if run_dir is not None else None
        rows = read_metrics(run_dir) if run_dir is not None else []
        self.rows = [row for row in rows if row["step"] <= step]

    def info(self, message: str, *args: Any) -> None:
        self.logger.info(message, *args)

    def scalars(self, values: dict[str, float], step: int) -> None:
        if self.board is not None:
            self.board.scalars(values, step)

    def epoch(self, metrics: dict[str, float]) -> None:
        """One evaluation: a row of ``metrics.csv``, the plot, TensorBoard and ``run.log``."""
        self.info(
            "epoch %.2f step %d: %s",
            metrics["epoch"],
            metrics["step"],
            ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if k not in ("epoch", "step")),
        )
        if self.run_dir is None:
            return
        self.rows.append(metrics)
        write_metrics(self.run_dir, self.rows)
        plot_profile(self.run_dir, self.rows, self.title)
        self.scalars({f"epoch/{k}": v for k, v in metrics.items()}, int(metrics["step"]))

    def close(self) -> None:
        if self.board is not None:
            self.board.close()
        close_logger(self.logger)
