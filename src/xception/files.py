"""Writing files so that a reader never sees half of one: write a temporary file beside the
target, give it the permissions any new file gets, fsync it, rename it into place. Every
file this package writes goes through here."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def new_file_mode() -> int:
    """The mode ``open()`` gives a new file: 0666 less the process's umask. Temporary files
    (``mkstemp``) and safetensors' writer make 0600 files instead, which teammates on a
    shared cluster cannot read. Linux reports the umask; elsewhere it is read by setting it,
    which is not thread-safe, once per call."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def seal(path: str | Path) -> None:
    """Give a freshly written file the mode any new file gets, and fsync it."""
    os.chmod(path, new_file_mode())
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> None:
    """``write(tmp_path)`` then seal and rename: readers see the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        seal(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")
