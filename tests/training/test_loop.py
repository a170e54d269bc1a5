"""Training runs: exact resume, crash-safe checkpoints, DDP equal to one process, errors."""

import json
import os
import socket
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

from xception.training import checkpoint as ckpt
from xception.training.loop import TrainingError, resume, train
from xception.training.recipes import resolve
from xception.weights import read_metadata


def config(folder, **overrides):
    values = dict(
        data=str(folder),
        model="xception_tiny",
        image_size=72,
        batch_size=8,
        epochs=2,
        workers=0,
        log_every=1,
        dropout=0.2,
        ema_decay=0.9,
        warmup_steps=2,
        eval_batch_size=16,
    )
    values.update(overrides)
    return resolve("quick", overrides=values)


def weights(path):
    return load_file(path)


def assert_identical(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_resume_mid_epoch_is_bitwise_identical(image_folder, tmp_path):
    # 48 images / 8 = 6 steps per epoch: stop at step 4 (mid-epoch 0), resume to step 9.
    whole = train(
        config(image_folder, max_steps=9, workers=1), out=tmp_path / "whole", progress=False
    )
    train(config(image_folder, max_steps=4), out=tmp_path / "split", progress=False)
    resumed = resume(tmp_path / "split", {"max_steps": 9}, progress=False)
    assert whole.metrics["step"] == resumed.metrics["step"] == 9
    assert_identical(
        weights(tmp_path / "whole" / "last.safetensors"),
        weights(tmp_path / "split" / "last.safetensors"),
    )  # raw and averaged
    rows = (tmp_path / "split" / "metrics.csv").read_text().splitlines()
    assert rows == (tmp_path / "whole" / "metrics.csv").read_text().splitlines()[:1] + rows[1:]


def test_run_folder_holds_every_artifact(image_folder, tmp_path):
    result = train(config(image_folder, epochs=1), out=tmp_path / "run", progress=False)
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {
        "config.yaml",
        "metrics.csv",
        "profile.png",
        "tensorboard",
        "last.safetensors",
        "last.state.pt",
        "best.safetensors",
        "run.log",
        "summary.json",
    } <= names
    meta = read_metadata(tmp_path / "run" / "best.safetensors")
    assert meta["classes"] == ["blue", "green", "red"] and meta["model"] == "xception_tiny"
    assert meta["preprocessing"]["image_size"] == 72 and meta["averaged"]
    assert any(k.startswith("raw/") for k in weights(tmp_path / "run" / "best.safetensors"))
    state = torch.load(tmp_path / "run" / "last.state.pt", weights_only=True)
    assert state["position"] == {"step": 6, "epoch": 1, "batch_in_epoch": 0}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metrics"]["val_top1"] == result.metrics["val_top1"]
    assert {"val_top1", "val_top5", "val_raw_top1", "val_loss"} <= result.metrics.keys()


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


def test_a_diverging_loss_stops_naming_the_step(image_folder, tmp_path):
    run = tmp_path / "run"
    train(config(image_folder, max_steps=2), out=run, progress=False)
    saved = weights(run / "last.safetensors")
    with pytest.raises(TrainingError, match=r"the loss became (nan|inf) at step \d+"):
        train(
            config(image_folder, lr=1e30, warmup_steps=0, ema_decay=0.0),
            out=tmp_path / "b",
            progress=False,
        )
    assert_identical(saved, weights(run / "last.safetensors"))


def test_existing_runs_are_not_overwritten(image_folder, tmp_path):
    run = tmp_path / "run"
    train(config(image_folder, max_steps=1), out=run, progress=False)
    before = (run / "last.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="--resume"):
        train(config(image_folder, max_steps=1), out=run, progress=False)
    assert (run / "last.safetensors").read_bytes() == before
    (run / "notes.txt").write_text("mine")
    train(config(image_folder, max_steps=1, seed=1), out=run, overwrite=True, progress=False)
    assert (run / "notes.txt").read_text() == "mine"  # only our own files are replaced
    assert (run / "last.safetensors").read_bytes() != before


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"data": "/nonexistent"}, FileNotFoundError, "data folder not found"),
        ({"device": "cuda"}, ValueError, "no CUDA device"),
        ({"image_size": 64}, ValueError, "minimum input size 71"),
        ({"batch_size": 1000}, ValueError, "fewer than one batch"),
        ({"loss": "sigmoid"}, ValueError, "multi-label"),
    ],
)
def test_bad_options_fail_clearly(image_folder, tmp_path, overrides, error, message):
    if overrides.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(error, match=message):
        train(config(image_folder, **overrides), out=tmp_path / "run", progress=False)


def test_resume_refuses_to_change_what_decides_the_weights(image_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        resume(tmp_path / "none")
    run = tmp_path / "run"
    train(config(image_folder, max_steps=1), out=run, progress=False)
    with pytest.raises(ValueError, match="'lr' cannot change"):
        resume(run, {"lr": 0.5})
    ckpt.state_path(run / "last.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a readable training state"):
        resume(run, {"max_steps": 2})


def test_multi_label_manifest_trains_with_map_at_100(image_folder, tmp_path):
    lines = ["path,labels"]
    for path in sorted(image_folder.rglob("*.png")):
        colour = path.parent.name
        lines.append(
            f"{path.relative_to(image_folder)},{colour};{'warm' if colour == 'red' else 'cool'}"
        )
    train_rows = [line for line in lines[1:] if line.startswith("train")]
    val_rows = [line for line in lines[1:] if line.startswith("val")]
    (image_folder / "train.csv").write_text("\n".join([lines[0], *train_rows]) + "\n")
    (image_folder / "val.csv").write_text("\n".join([lines[0], *val_rows]) + "\n")
    try:
        result = train(config(image_folder, epochs=1), out=tmp_path / "run", progress=False)
    finally:
        (image_folder / "train.csv").unlink()
        (image_folder / "val.csv").unlink()
    assert 0 < result.metrics["val_map100"] <= 1 and 0 < result.metrics["val_map"] <= 1
    assert read_metadata(tmp_path / "run" / "last.safetensors")["multi_label"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_gloo_processes_equal_one_process(image_folder, tmp_path):
    """The real command: DDP with SyncBN on 2 CPU processes vs one process on the same
    global batch. Two float32 steps agree within 1e-4 (1.3e-5 measured; rounding that
    small-batch BatchNorm amplifies, see test_distributed for the exact float64 check)."""
    args = [
        "--data",
        str(image_folder),
        "--model",
        "xception_tiny",
        "--image-size",
        "72",
        "--batch-size",
        "8",
        "--max-steps",
        "2",
        "--workers",
        "0",
        "--quiet",
        "--lr",
        "0.001",
        "--set",
        "optimizer=sgd",
        "dropout=0.0",
        "ema_decay=0.5",
        "warmup_steps=0",
    ]
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        "-m",
        "xception",
        "train",
        "--out",
        str(tmp_path / "ddp"),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        command, capture_output=True, text=True, env=env, check=False, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    single = subprocess.run(
        [sys.executable, "-m", "xception", "train", "--out", str(tmp_path / "one"), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=600,
    )
    assert single.returncode == 0, single.stderr[-2000:]
    ddp, one = (
        weights(tmp_path / "ddp" / "last.safetensors"),
        weights(tmp_path / "one" / "last.safetensors"),
    )
    assert ddp.keys() == one.keys()
    for key in one:
        if one[key].is_floating_point():
            torch.testing.assert_close(
                ddp[key], one[key], rtol=0, atol=1e-4, msg=lambda m, k=key: f"{k}: {m}"
            )
    assert not (tmp_path / "ddp" / "run.log").read_text().count("rank 1")


def test_bf16_channels_last_and_gradient_accumulation_run(image_folder, tmp_path):
    result = train(
        config(image_folder, max_steps=2, amp="bf16", channels_last=True, grad_accum=2),
        out=tmp_path / "run",
        progress=False,
    )
    assert result.metrics["step"] == 2 and result.images_per_second > 0
    state = torch.load(tmp_path / "run" / "last.state.pt", weights_only=True)
    assert state["position"]["step"] == 2


def test_the_default_job_trains_on_the_built_in_data_set(tmp_path, monkeypatch):
    monkeypatch.setenv("XCEPTION_CACHE", str(tmp_path / "cache"))
    defaults = resolve("quick")
    assert defaults.data is None and defaults.model == "xception_tiny"
    small = replace(
        defaults,
        builtin_train_per_class=7,
        builtin_val_per_class=2,
        batch_size=16,
        max_steps=2,
        workers=0,
    )
    result = train(small, "quick", out=tmp_path / "run", progress=False)
    assert result.metrics["step"] == 2
    meta = read_metadata(tmp_path / "run" / "last.safetensors")
    assert meta["builtin_data"]["train_per_class"] == 7 and len(meta["classes"]) == 10


def test_a_batch_of_unreadable_files_neither_hangs_nor_repeats(tmp_path):
    from conftest import write_folder

    root = write_folder(tmp_path / "data", per_class=(3, 2))
    (root / "train" / "red" / "zz_bad.png").write_bytes(b"not an image")
    result = train(
        config(root, batch_size=1, epochs=2, warmup_steps=0), out=tmp_path / "run", progress=False
    )
    assert result.metrics["step"] == 2 * 10  # 10 files a epoch, the unreadable one included
    assert "zz_bad.png" in (tmp_path / "run" / "run.log").read_text()


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(image_folder, tmp_path):
    run = tmp_path / "run"
    train(config(image_folder, max_steps=1), out=run, progress=False)
    before = (run / "last.safetensors").read_bytes()
    with pytest.raises(FileNotFoundError):
        train(config(tmp_path / "typo", max_steps=1), out=run, overwrite=True, progress=False)
    assert (run / "last.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"batch_size": 6, "grad_accum": 4}, "multiple of grad_accum"),
        ({"epochs": "ten"}, "epochs='ten'"),
        ({"model_overrides": 5}, "model_overrides=5"),
    ],
)
def test_invalid_training_options_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=message):
        resolve("quick", overrides=overrides)


def test_the_compiled_channels_last_training_step_computes_the_eager_gradients():
    """`train --compile --channels-last` (and bench's ours-compiled in training) compute
    what eager does: loss and every gradient, BatchNorm in training mode, with inductor's
    layout optimisation forced as on CPUs. In float64:
    in float32 a max-pool whose two largest inputs differ by rounding may route its
    gradient to the other one in either path (both are right), which no tolerance fits."""
    import copy

    import torch.nn.functional as F

    from xception import create_model
    from xception.runtime import compile_for_training

    torch.manual_seed(0)
    eager = create_model("xception_tiny", num_classes=3, middle_blocks=1).double()
    fast = copy.deepcopy(eager).to(memory_format=torch.channels_last)
    x, y = torch.randn(4, 3, 72, 72, dtype=torch.float64), torch.tensor([0, 1, 2, 0])
    torch._dynamo.reset()  # the models share ImageClassifier.forward's frame
    compiled = compile_for_training(fast, torch.device("cpu"))
    loss = F.cross_entropy(eager(x), y)
    loss.backward()
    fast_loss = F.cross_entropy(compiled(x.contiguous(memory_format=torch.channels_last)), y)
    fast_loss.backward()
    torch.testing.assert_close(fast_loss, loss, rtol=1e-10, atol=1e-12)
    for (name, p), q in zip(eager.named_parameters(), fast.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-8, atol=1e-12, msg=name)
