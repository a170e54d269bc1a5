"""Figures written as PNG files: matplotlib on its file-only backend (no display is
ever needed), saved atomically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from xception.files import atomic_write


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only backend (no display is ever needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path, dpi: int = 100) -> None:
    """Write ``fig`` as a PNG atomically and free it."""
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))
    pyplot().close(fig)
