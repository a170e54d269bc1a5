"""Atomic writes: whole files or none, with the permissions the umask asks for."""

import json
import os
import stat

import pytest

from xception.files import atomic_write, write_json, write_text


@pytest.fixture
def umask():
    def set_umask(mask):
        os.umask(mask)

    old = os.umask(0o022)
    yield set_umask
    os.umask(old)


def mode(path):
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_files_honour_the_umask_like_open(tmp_path, umask, mask):
    umask(mask)
    write_text(tmp_path / "a.txt", "x")
    (tmp_path / "plain.txt").write_text("x")
    assert mode(tmp_path / "a.txt") == mode(tmp_path / "plain.txt") == 0o666 & ~mask


def test_a_failed_write_keeps_the_old_file_and_leaves_nothing(tmp_path):
    path = tmp_path / "f.json"
    write_json(path, {"a": 1})

    def fail(tmp):
        with open(tmp, "w") as f:
            f.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["f.json"]


def test_folders_are_created(tmp_path):
    write_text(tmp_path / "a" / "b" / "c.txt", "deep")
    assert (tmp_path / "a" / "b" / "c.txt").read_text() == "deep"
