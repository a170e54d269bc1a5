"""SIGKILL at any moment of a training run, the middle of a checkpoint write included, and
the run still resumes and ends bitwise equal to a run that was never interrupted."""

import os
import random
import subprocess
import sys

import pytest
from small_runs import assert_identical, weights

from xception.cli import main

STEPS = 6

# Runs `xception train ARGS...` in a process that SIGKILLs itself at a chosen point:
#   mid-state N      inside the N-th state write, after half its bytes are on disk;
#   after-weights N  once the N-th save's weights are written, before its state;
#   between-renames N  between the N-th save's two renames;
#   after SECONDS    at that time, wherever the run is.
DRIVER = """
import io, os, signal, sys, threading, types
from xception.training import checkpoint as ckpt
from xception.cli import main

point, when, argv = sys.argv[1], float(sys.argv[2]), sys.argv[3:]
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
calls = {"save": 0, "seal": 0, "replace": 0}

def counted(name):
    calls[name] += 1
    return calls[name] == when

if point == "mid-state":
    real_save = ckpt.torch.save
    def save(state, path):
        if counted("save"):
            buffer = io.BytesIO()
            real_save(state, buffer)
            with open(path, "wb") as f:
                f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                f.flush()
                os.fsync(f.fileno())
            die()
        real_save(state, path)
    ckpt.torch.save = save
elif point == "after-weights":
    real_seal = ckpt.seal
    def seal(path):
        real_seal(path)
        if str(path).endswith(".safetensors.pending") and counted("seal"):
            die()
    ckpt.seal = seal
elif point == "between-renames":
    real_replace = os.replace
    def replace(src, dst):
        real_replace(src, dst)
        if str(dst).endswith(".safetensors") and counted("replace"):
            die()
    ckpt.os = types.SimpleNamespace(replace=replace)
elif point == "after":
    threading.Timer(when, die).start()
sys.exit(main(argv))
"""


def _argv(data, run):
    return [
        "train",
        *("--data", str(data), "--out", str(run), "--model", "xception_tiny"),
        *("--image-size", "72", "--batch-size", "8", "--workers", "0", "--epochs", "2"),
        *("--max-steps", str(STEPS), "--save-every", "1", "--quiet", "--log-every", "1"),
        *("--set", "dropout=0.2"),
    ]


def _killed(point, when, data, run):
    result = subprocess.run(
        [sys.executable, "-c", DRIVER, point, str(when), *_argv(data, run)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result.returncode


@pytest.fixture(scope="module")
def reference(image_folder, tmp_path_factory):
    run = tmp_path_factory.mktemp("reference") / "run"
    assert main(_argv(image_folder, run)) == 0
    return weights(run / "last.safetensors")


def _finish(data, run):
    """Resume the killed run, or start it again where it died before its first checkpoint
    (what the error messages tell a user to do); the step the resume started from."""
    if (run / "last.safetensors").exists():
        assert main(["train", "--resume", str(run), "--quiet"]) == 0
        starts = [
            line for line in (run / "run.log").read_text().splitlines() if "from step" in line
        ]
        return int(starts[-1].rsplit(" ", 1)[1])
    assert not (run / "last.state.pt").exists()
    assert main([*_argv(data, run), "--overwrite"]) == 0
    return 0


@pytest.mark.parametrize(
    ("point", "when"),
    [("mid-state", 3), ("after-weights", 4), ("between-renames", 2), ("mid-state", 1)],
)
def test_a_kill_inside_a_checkpoint_write_resumes_bitwise(
    image_folder, tmp_path, reference, point, when
):
    run = tmp_path / "run"
    assert _killed(point, when, image_folder, run) == -9
    leftovers = [p.name for p in run.iterdir() if p.name.endswith(".pending")]
    assert leftovers, "the kill should have cut a save short"
    started = _finish(image_folder, run)
    # the N-th save is step N's: the last complete one was step N-1 (or N, finished on load)
    assert started in (when - 1, when)
    assert not [p.name for p in run.iterdir() if p.name.endswith(".pending")]
    assert_identical(reference, weights(run / "last.safetensors"))


def test_a_kill_at_a_random_moment_resumes_bitwise(image_folder, tmp_path, reference):
    # benchmarks/kill_campaign.py runs many more such rounds (25 in docs/reliability.md)
    rng = random.Random(int(os.environ.get("XCEPTION_KILL_SEED", "0")))
    run = tmp_path / "run"
    _killed("after", rng.uniform(4.0, 9.0), image_folder, run)  # import takes ~3-5 s
    _finish(image_folder, run)
    assert_identical(reference, weights(run / "last.safetensors"))
