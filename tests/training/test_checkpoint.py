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
    assert ckpt.load_state(run / "last.safetensors")["position"]["step"] == 2
    assert resume(run, {"max_steps": 3}, progress=False).metrics["step"] == 3


def test_a_save_cut_between_its_renames_is_finished_on_load(image_folder, tmp_path):
    run = tmp_path / "run"
    train(config(image_folder, max_steps=2), out=run, progress=False)
    state_file = ckpt.state_path(run / "last.safetensors")
    pending = state_file.with_name(f".{state_file.name}.pending")
    state = torch.load(state_file, weights_only=True)
    state_file.rename(pending)  # weights renamed, state not yet
    assert ckpt.load_state(run / "last.safetensors")["position"] == state["position"]
    assert state_file.is_file() and not pending.exists()
