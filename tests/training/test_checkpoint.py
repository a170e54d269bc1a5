"""Checkpoints: a run killed at any moment leaves the last complete checkpoint loadable."""

import pytest
import torch
from small_runs import assert_identical, config, weights

from xception.training import checkpoint as ckpt
from xception.training.run import resume, train


def test_a_crash_during_save_leaves_the_last_checkpoint_loadable(
    image_folder, tmp_path, monkeypatch
):
    run = tmp_path / "run"
    train(config(image_folder, max_steps=2), out=run, progress=False)
    before = weights(run / "last.safetensors")

    def die(*args, **kwargs):
        raise KeyboardInterrupt  # killed while writing the state file

    monkeypatch.setattr(ckpt.torch, "save", die)
    with pytest.raises(KeyboardInterrupt):
        resume(run, {"max_steps": 3}, progress=False)
    monkeypatch.undo()
    assert_identical(before, weights(run / "last.safetensors"))
    assert ckpt.load_state(run / "last.safetensors")[0]["position"]["step"] == 2
    assert resume(run, {"max_steps": 3}, progress=False).metrics["step"] == 3


def test_a_save_cut_between_its_renames_is_finished_on_load(image_folder, tmp_path):
    run = tmp_path / "run"
    train(config(image_folder, max_steps=2), out=run, progress=False)
    state_file = ckpt.state_path(run / "last.safetensors")
    pending = state_file.with_name(f".{state_file.name}.pending")
    state = torch.load(state_file, weights_only=True)
    state_file.rename(pending)  # weights renamed, state not yet
    state_now, notes = ckpt.load_state(run / "last.safetensors")
    assert state_now["position"] == state["position"]
    assert notes == ["finished the step-2 checkpoint that a stop cut between renames"]
    assert state_file.is_file() and not pending.exists()


def test_pending_files_a_stopped_save_left_never_block_the_resume(image_folder, tmp_path):
    run = tmp_path / "run"
    train(config(image_folder, max_steps=2), out=run, progress=False)
    state_file = ckpt.state_path(run / "last.safetensors")
    pending_state = state_file.with_name(f".{state_file.name}.pending")
    pending_weights = run / ".last.safetensors.pending"
    whole = state_file.read_bytes()
    stale = torch.load(state_file, weights_only=True)
    stale["position"]["step"] = 99
    for leftover in (whole[: len(whole) // 2], None):  # cut short by a kill; from another step
        if leftover is None:
            torch.save(stale, pending_state)
        else:
            pending_state.write_bytes(leftover)
        pending_weights.write_bytes(b"half a safetensors file")
        state, notes = ckpt.load_state(run / "last.safetensors")
        assert state["position"]["step"] == 2
        assert notes == [
            "deleted .last.safetensors.pending, left by a save that was cut short",
            "deleted .last.state.pt.pending, left by a save that was cut short",
        ]
        assert not pending_state.exists() and not pending_weights.exists()
    pending_state.write_bytes(whole[:100])
    assert resume(run, {"max_steps": 3}, progress=False).metrics["step"] == 3
    assert "resume: deleted .last.state.pt.pending" in (run / "run.log").read_text()
    assert not pending_state.exists()


def test_a_full_disk_says_so_and_leaves_the_last_checkpoint(image_folder, tmp_path, monkeypatch):
    import errno

    from xception.cli import main

    run = tmp_path / "run"
    train(config(image_folder, max_steps=2), out=run, progress=False)
    before = weights(run / "last.safetensors")
    save = torch.save

    def fill_the_disk(state, path):
        save(state, path)  # a partial file, as a real full disk leaves
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos")

    monkeypatch.setattr(ckpt.torch, "save", fill_the_disk)
    monkeypatch.setattr("xception.files.shutil.disk_usage", lambda path: type("U", (), {"free": 0}))
    with pytest.raises(OSError, match=r"^no space left on .*run while writing last.safetensors$"):
        resume(run, {"max_steps": 3}, progress=False)
    assert not [p.name for p in run.iterdir() if p.name.endswith(".pending")]
    assert_identical(before, weights(run / "last.safetensors"))

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt.torch, "save", no_space)
    assert main(["train", "--resume", str(run), "--max-steps", "3", "--quiet"]) == 1
    monkeypatch.undo()
    assert resume(run, {"max_steps": 3}, progress=False).metrics["step"] == 3


def test_weights_that_became_non_finite_are_never_saved(image_folder, tmp_path, monkeypatch):
    from xception.training.trainer import Trainer, TrainingError

    run = tmp_path / "run"
    train(config(image_folder, max_steps=2), out=run, progress=False)
    before = weights(run / "last.safetensors")
    save = Trainer.save

    def diverged(self, *args, **kwargs):  # the update after a finite loss blew up BatchNorm
        buffer = next(b for n, b in self.model.named_buffers() if "running_var" in n)
        buffer.fill_(float("inf"))
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "save", diverged)
    with pytest.raises(TrainingError, match=r"non-finite at step 3 \(\d+ tensors, first "):
        resume(run, {"max_steps": 3}, progress=False)
    monkeypatch.undo()
    assert_identical(before, weights(run / "last.safetensors"))
    assert "stopped: the weights became non-finite at step 3" in (run / "run.log").read_text()
    assert resume(run, {"max_steps": 3}, progress=False).metrics["step"] == 3
