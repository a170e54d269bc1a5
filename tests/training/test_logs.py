"""What a run leaves for people: run.log, metrics.csv, profile.png, TensorBoard."""

from xception.training.logs import RunLogs, read_metrics


def rows(steps):
    return [{"epoch": s / 10, "step": s, "train_loss": 1 / s, "val_top1": s / 100} for s in steps]


def test_epochs_append_rows_and_a_resumed_run_drops_rows_past_its_checkpoint(tmp_path):
    logs = RunLogs(tmp_path, "tiny", step=0)
    for row in rows([10, 20, 30]):
        logs.epoch(row)
    logs.close()
    assert read_metrics(tmp_path) == rows([10, 20, 30])
    assert (tmp_path / "profile.png").stat().st_size > 0
    assert list((tmp_path / "tensorboard").iterdir())
    assert (
        "epoch 3.00 step 30: train_loss=0.0333, val_top1=0.3000"
        in (tmp_path / "run.log").read_text()
    )
    resumed = RunLogs(tmp_path, "tiny", step=20)  # the checkpoint was written at step 20
    assert resumed.rows == rows([10, 20])
    resumed.epoch(rows([30])[0])
    resumed.close()
    assert read_metrics(tmp_path) == rows([10, 20, 30])


def test_without_a_folder_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    logs = RunLogs(None, "tiny", step=0)
    logs.epoch(rows([10])[0])
    logs.scalars({"train/loss": 1.0}, 10)
    logs.close()
    assert not list(tmp_path.iterdir())
