"""A disk that fills up while a checkpoint is written: one line, exit status 1, no pending
file left, and the run resumes once there is room. On a real (small) tmpfs, mounted in a
user namespace of its own where the machine allows one."""

import shutil
import subprocess
import sys

import pytest
from small_runs import config

from xception.training.run import train

SCRIPT = """
set -u
mount -t tmpfs -o size={size} tmpfs {mount} || exit 97
cp -a {run} {mount}/run
{python} -m xception train --resume {mount}/run --max-steps 3 --save-every 1 --quiet
echo "rc=$?"
ls -a {mount}/run | grep -c pending
mount -o remount,size=256m {mount}
{python} -m xception train --resume {mount}/run --max-steps 3 --quiet > /dev/null
echo "rc=$?"
grep "from step" {mount}/run/run.log
"""


def _namespaces_allowed() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _namespaces_allowed(), reason="needs unshare and user namespaces")
def test_a_full_disk_is_one_line_and_the_run_resumes_once_there_is_room(image_folder, tmp_path):
    run = tmp_path / "run"
    train(config(image_folder, max_steps=2, save_every=1), out=run, progress=False)
    used = sum(path.stat().st_size for path in run.rglob("*") if path.is_file())
    mount = tmp_path / "small"
    mount.mkdir()
    # room for the checkpoint's weights (6 MB) but not for its state after them
    script = SCRIPT.format(size=used + 8 * 2**20, mount=mount, run=run, python=sys.executable)
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True, timeout=300
    )
    if result.returncode == 97:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    assert result.stderr.strip().splitlines() == [
        f"xception train: error: no space left on {mount}/run while writing last.safetensors"
    ]
    lines = result.stdout.split()
    assert lines[:3] == ["rc=1", "0", "rc=0"], result.stdout  # no pending file left
    assert result.stdout.count("from step 2") == 2  # the failed save's run, then the resume
