"""Training runs and their folders: artifacts, permissions, failed starts that write
nothing, resume, torchrun, and progress in logs."""

import json
import os
import socket
import stat
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from small_runs import config, weights

import xception
from xception.training import checkpoint as ckpt
from xception.training.config import resolve
from xception.training.run import resume, train
from xception.weights import read_metadata


def test_run_folder_holds_every_artifact_readable_as_the_umask_allows(image_folder, tmp_path):
    old = os.umask(0o022)
    try:
        result = train(config(image_folder, epochs=1), out=tmp_path / "run", progress=False)
    finally:
        os.umask(old)
    for path in (tmp_path / "run").iterdir():
        if path.is_file():  # teammates on a shared cluster can read every file
            assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name
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
        ({"batch_size": 64, "grad_accum": 2}, ValueError, "fewer than one batch of 64"),
        ({"multi_label": True}, ValueError, "needs multi-label data"),
    ],
)
def test_bad_options_fail_clearly(image_folder, tmp_path, overrides, error, message):
    if overrides.get("device") == "cuda" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(error, match=message):
        train(config(image_folder, **overrides), out=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()  # a run that cannot start writes nothing


def test_a_failed_start_leaves_no_stub_that_blocks_the_rerun(image_folder, tmp_path, capsys):
    from xception.cli import main

    argv = ["train", "--data", str(image_folder), "--out", str(tmp_path / "run")]
    argv += ["--image-size", "72", "--workers", "0", "--quiet"]
    for _ in range(2):  # the same error both times, not "already holds a run"
        assert main([*argv, "--batch-size", "1000"]) == 2
        assert "fewer than one batch" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert main([*argv, "--batch-size", "8", "--max-steps", "1"]) == 0


def test_resume_of_a_run_with_fc_layers(image_folder, tmp_path, capsys):
    from xception.cli import main

    run = tmp_path / "run"
    argv = ["train", "--data", str(image_folder), "--out", str(run), "--image-size", "72"]
    argv += ["--batch-size", "8", "--workers", "0", "--quiet", "--max-steps", "1"]
    assert main([*argv, "--override", "fc_layers=16,16"]) == 0
    assert main(["train", "--resume", str(run), "--max-steps", "2", "--quiet"]) == 0
    assert "run folder" in capsys.readouterr().out
    model_config = read_metadata(run / "last.safetensors")["config"]
    assert model_config["fc_layers"] == [16, 16] and model_config["bn_momentum"] == 0.1


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


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(image_folder, tmp_path):
    run = tmp_path / "run"
    train(config(image_folder, max_steps=1), out=run, progress=False)
    before = (run / "last.safetensors").read_bytes()
    with pytest.raises(FileNotFoundError):
        train(config(tmp_path / "typo", max_steps=1), out=run, overwrite=True, progress=False)
    assert (run / "last.safetensors").read_bytes() == before


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args):
    """`xception train ARGS` as two gloo processes under torchrun."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"]
    command += ["--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*command, "-m", "xception", "train", *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=600,
    )


def test_torchrun_trains_the_head_alone_then_everything(image_folder, tmp_path):
    """freeze_epochs under DDP (unused parameters in epoch 0): 48 images / 8 make epoch 0
    steps 1-6, where only the head trains; step 7 trains the backbone too."""
    args = ["--data", str(image_folder), "--image-size", "72", "--batch-size", "8"]
    args += ["--workers", "0", "--quiet", "--freeze-epochs", "1", "--ema-decay", "0"]
    result = torchrun(["--out", str(tmp_path / "run"), "--max-steps", "7", *args])
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.count("run folder:") == 1  # only rank 0 reports (and has) a folder
    assert "run folder: ." not in result.stdout
    trained = weights(tmp_path / "run" / "last.safetensors")
    torch.manual_seed(0)  # the run's seed: its initial weights
    initial = xception.create_model("xception_tiny", num_classes=3).state_dict()
    conv = "entry_flow.block1.conv1.conv.weight"
    assert not torch.equal(trained[conv], initial[conv])


# Two float32 steps of DDP with SyncBN on 2 CPU processes agree with one process on the same
# global batch within 1e-4 (1.3e-5 measured; rounding that small-batch BatchNorm amplifies,
# see test_distributed for the exact float64 check).
DDP_ARGS = [
    *("--model", "xception_tiny", "--image-size", "72", "--batch-size", "8"),
    *("--max-steps", "2", "--workers", "0", "--quiet", "--lr", "0.001"),
    *("--set", "optimizer=sgd", "dropout=0.0", "ema_decay=0.5", "warmup_steps=0"),
]
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


def one_process(args):
    command = [sys.executable, "-m", "xception", "train", *args]
    return subprocess.run(
        command, capture_output=True, text=True, env=ONE_THREAD, check=False, timeout=600
    )


def assert_close_weights(a, b):
    assert a.keys() == b.keys()
    for key in b:
        if b[key].is_floating_point():
            torch.testing.assert_close(
                a[key], b[key], rtol=0, atol=1e-4, msg=lambda m, k=key: f"{k}: {m}"
            )


def two_nodes(args):
    """`xception train ARGS` as two torchrun agents of one process each, meeting at a c10d
    rendezvous on 127.0.0.1, as two nodes would: (exit status, stdout, stderr) of each."""
    port = free_port()
    agents = [
        subprocess.Popen(
            [
                *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "2"),
                *("--nproc-per-node", "1", "--node-rank", str(node), "--rdzv-backend", "c10d"),
                *("--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"test{port}"),
                *("-m", "xception", "train", *args),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ONE_THREAD,
        )
        for node in range(2)
    ]
    return [(agent.wait(timeout=600), *agent.communicate()) for agent in agents]


def test_two_torchrun_nodes_on_shards_equal_one_process_with_two_lanes(image_folder, tmp_path):
    """The real command on two nodes against one process on the same global batches."""
    from xception.data.shards import write_shards

    write_shards(image_folder, tmp_path / "shards", shard_size=10, progress=False)
    args = ["--data", str(tmp_path / "shards"), *DDP_ARGS]
    nodes = two_nodes(["--out", str(tmp_path / "nodes"), *args])
    assert [code for code, _, _ in nodes] == [0, 0], nodes[0][2][-2000:] + nodes[1][2][-2000:]
    single = one_process(["--out", str(tmp_path / "one"), *args, "lanes=2"])
    assert single.returncode == 0, single.stderr[-2000:]
    assert_close_weights(
        weights(tmp_path / "nodes" / "last.safetensors"),
        weights(tmp_path / "one" / "last.safetensors"),
    )
    assert "lanes: 2" in (tmp_path / "nodes" / "config.yaml").read_text()
    assert not (tmp_path / "nodes" / "run.log").read_text().count("rank 1")
    assert "".join(out for _, out, _ in nodes).count("run folder:") == 1  # rank 0 alone


def test_a_rank_that_fails_ends_the_other_node_with_a_message(image_folder, tmp_path):
    """Two lanes of one shard each: only the rank whose shard is damaged fails; the other,
    waiting in the gradient all-reduce, stops too (within dist_timeout) and says why."""
    from xception.data.shards import write_shards

    shards = tmp_path / "shards"
    write_shards(image_folder, shards, shard_size=24, progress=False)
    damaged = bytearray((shards / "train-000001.tar").read_bytes())
    damaged[700] ^= 0xFF  # inside the first image: same size, another checksum
    (shards / "train-000001.tar").write_bytes(bytes(damaged))
    args = ["--data", str(shards), *DDP_ARGS, "dist_timeout=60"]
    nodes = two_nodes(["--out", str(tmp_path / "nodes"), *args])
    assert all(code != 0 for code, _, _ in nodes)
    errors = "".join(stderr for _, _, stderr in nodes)
    assert "train-000001.tar does not match its checksum" in errors
    assert "another torchrun process stopped" in errors, errors[-3000:]
    assert not (tmp_path / "nodes" / "last.safetensors").exists()


def test_progress_in_a_log_is_lines_not_carriage_returns(image_folder, tmp_path):
    """Written to a file (not a terminal), the default job printed ~1,700 bar redraws."""
    command = [sys.executable, "-m", "xception", "train", "--data", str(image_folder)]
    command += ["--out", str(tmp_path / "run"), "--image-size", "72", "--batch-size", "8"]
    command += ["--epochs", "2", "--workers", "0", "--log-every", "1"]
    result = subprocess.run(command, capture_output=True, text=True, check=False, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "\r" not in result.stderr
    lines = result.stderr.splitlines()
    assert [line.split(":")[0] for line in lines] == ["epoch 1.00 step 6", "epoch 2.00 step 12"]
    assert "val_top1" in lines[-1]


def test_one_process_at_a_time_writes_a_run_folder(image_folder, tmp_path):
    from xception.training.run import holding

    run = tmp_path / "run"
    train(config(image_folder, max_steps=1), out=run, progress=False)
    in_use = rf"^{run} is in use by process {os.getpid()}, which is training or resuming it"
    with holding(run):  # another writer (flock: another open file, even in this process)
        with pytest.raises(FileExistsError, match=in_use):
            train(config(image_folder, max_steps=1), out=run, overwrite=True, progress=False)
        with pytest.raises(FileExistsError, match=in_use):
            resume(run, {"max_steps": 2}, progress=False)
    (run / ".lock").write_text("999999999\n")  # left by a killed run: the kernel freed its lock
    assert resume(run, {"max_steps": 2}, progress=False).metrics["step"] == 2
    assert not (run / ".lock").exists()


def test_train_and_resume_agree_on_a_run_stopped_before_its_first_checkpoint(
    image_folder, tmp_path
):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("model: xception_tiny\n")  # killed before its first save
    (run / "run.log").write_text("")
    message = rf"^{run} holds a run that stopped before its first checkpoint, so nothing in it"
    with pytest.raises(FileExistsError, match=message):
        train(config(image_folder, max_steps=1), out=run, progress=False)
    with pytest.raises(FileNotFoundError, match=message):
        resume(run, progress=False)
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "run.log"]
    assert train(config(image_folder, max_steps=1), out=run, overwrite=True, progress=False)
    missing = tmp_path / "new" / "deeper" / "run"
    with pytest.raises(ValueError):
        train(config(image_folder, max_steps=1, batch_size=1000), out=missing, progress=False)
    assert not (tmp_path / "new").exists()  # a failed start leaves no folder it made


def test_unreadable_files_of_either_split_are_named_in_the_run_log(tmp_path):
    from conftest import write_folder

    data = write_folder(tmp_path / "data", per_class=(4, 2))
    (data / "train" / "red" / "broken.png").write_bytes(b"not a png")
    os.mkfifo(data / "val" / "blue" / "fifo.png")  # never opened: it would block
    result = train(config(data, epochs=1, batch_size=4), out=tmp_path / "run", progress=False)
    log = (result.run_dir / "run.log").read_text()
    assert f"skipped unreadable file {data}/train/red/broken.png: " in log
    assert f"skipped unreadable file {data}/val/blue/fifo.png: ValueError: not a regular" in log
    summary = json.loads((result.run_dir / "summary.json").read_text())
    assert len(summary["skipped_files"]) == 2
