"""Writing files so that a reader never sees half of one: write a temporary file beside the
target, give it the permissions any new file gets, fsync it, rename it into place. Every
file this package writes goes through here. A write that fails leaves no temporary file
behind, and a full disk says so in one line, whichever writer (safetensors, torch.save,
Python) hit it."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Less free space than this after a failed write means the write failed for want of it:
# torch.save reports a full disk only as "unexpected pos".
NEARLY_FULL_BYTES = 1 << 20


class NoSpaceError(OSError):
    """The disk filled up during a write; what was there before is intact."""


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


def sha256(path: str | Path) -> str:
    """The file's SHA-256, read a megabyte at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_folder(kind: str) -> Path:
    """Where derived files of one ``kind`` (rendered data sets, exports) are kept:
    ``$XCEPTION_CACHE/KIND`` if the variable is set, else ``~/.cache/xception/KIND``."""
    env = os.environ.get("XCEPTION_CACHE")
    return (Path(env).expanduser() if env else Path.home() / ".cache" / "xception") / kind


def seal(path: str | Path) -> None:
    """Give a freshly written file the mode any new file gets, and fsync it."""
    os.chmod(path, new_file_mode())
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextmanager
def removed_on_failure(target: Path, *temporary: str | Path) -> Iterator[None]:
    """Delete the ``temporary`` files if the block fails; a full disk becomes one
    ``NoSpaceError`` naming the folder and ``target``."""
    try:
        yield
    except BaseException as error:
        full = _disk_full(error, target.parent)
        for path in temporary:
            Path(path).unlink(missing_ok=True)
        if full:
            raise NoSpaceError(
                f"no space left on {target.parent} while writing {target.name}"
            ) from None
        raise


def _disk_full(error: BaseException, folder: Path) -> bool:
    if not isinstance(error, Exception):
        return False  # KeyboardInterrupt and the like: a stop, not a write error
    cause: BaseException | None = error
    while cause is not None:
        if getattr(cause, "errno", None) == errno.ENOSPC or "No space left" in str(cause):
            return True
        cause = cause.__cause__ or cause.__context__
    try:
        return shutil.disk_usage(folder).free < NEARLY_FULL_BYTES
    except OSError:
        return False


def refuse_folder(path: Path) -> None:
    """A file is to be written at ``path``: say so in one line if a folder is there."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give the path of a file to write")


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> None:
    """``write(tmp_path)`` then seal and rename: readers see the old file or the new one."""
    path = Path(path)
    refuse_folder(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    with removed_on_failure(path, tmp):
        write(tmp)
        seal(tmp)
        os.replace(tmp, path)


def write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_json(path: str | Path, value: Any) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")
