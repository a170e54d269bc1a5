"""The training loop: exact resume, divergence, multi-label data, precision and layout,
unreadable files, and the compiled step's gradients."""

import math

import pytest
import torch
from small_runs import assert_identical, config, weights

from xception.training.run import resume, train
from xception.training.trainer import TrainingError
from xception.weights import read_metadata

EVERY_AUGMENTATION = {
    "auto_augment": "randaugment",
    "random_erasing": 0.5,
    "mixup": 0.2,
    "cutmix": 1.0,
    "label_smoothing": 0.1,
    "balance": True,
    "lr_schedule": "cosine",
    "freeze_epochs": 1,
    "head_lr_scale": 5.0,
}


@pytest.mark.parametrize("options", [{}, EVERY_AUGMENTATION], ids=["plain", "augmented"])
def test_resume_mid_epoch_is_bitwise_identical(image_folder, tmp_path, options):
    # 48 images / 8 = 6 steps per epoch: stop at step 4 (mid-epoch 0), resume to step 9.
    whole = train(
        config(image_folder, max_steps=9, workers=1, **options),
        out=tmp_path / "whole",
        progress=False,
    )
    train(config(image_folder, max_steps=4, **options), out=tmp_path / "split", progress=False)
    resumed = resume(tmp_path / "split", {"max_steps": 9}, progress=False)
    assert whole.metrics["step"] == resumed.metrics["step"] == 9
    assert_identical(
        weights(tmp_path / "whole" / "last.safetensors"),
        weights(tmp_path / "split" / "last.safetensors"),
    )  # raw and averaged
    rows = (tmp_path / "split" / "metrics.csv").read_text().splitlines()
    assert rows == (tmp_path / "whole" / "metrics.csv").read_text().splitlines()[:1] + rows[1:]
    # Retraining from step 0 with the same seed would end equal too: the resume must have
    # started at the checkpoint (a no-op restore fails here).
    starts = [
        line
        for line in (tmp_path / "split" / "run.log").read_text().splitlines()
        if "from step" in line
    ]
    assert [line.rsplit(" ", 1)[1] for line in starts] == ["0", "4"]


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


def test_bf16_channels_last_and_gradient_accumulation_run(image_folder, tmp_path):
    result = train(
        config(image_folder, max_steps=2, amp="bf16", channels_last=True, grad_accum=2),
        out=tmp_path / "run",
        progress=False,
    )
    assert result.metrics["step"] == 2 and result.images_per_second > 0
    state = torch.load(tmp_path / "run" / "last.state.pt", weights_only=True)
    assert state["position"]["step"] == 2


def test_a_batch_of_unreadable_files_neither_hangs_nor_repeats(tmp_path):
    from conftest import write_folder

    root = write_folder(tmp_path / "data", per_class=(3, 2))
    (root / "train" / "red" / "zz_bad.png").write_bytes(b"not an image")
    result = train(
        config(root, batch_size=1, epochs=2, warmup_steps=0), out=tmp_path / "run", progress=False
    )
    assert result.metrics["step"] == 2 * 10  # 10 files a epoch, the unreadable one included
    assert "zz_bad.png" in (tmp_path / "run" / "run.log").read_text()


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


def test_a_single_label_manifest_trains_with_softmax_and_balance(image_folder, tmp_path):
    """A `path,label` header is single-label (absolute paths work too)."""
    manifest = tmp_path / "manifest"
    manifest.mkdir()
    for split in ("train", "val"):
        images = sorted((image_folder / split).rglob("*.png"))
        rows = ["path,label", *(f"{path},{path.parent.name}" for path in images)]
        (manifest / f"{split}.csv").write_text("\n".join(rows) + "\n")
    result = train(config(manifest, epochs=1, balance=True), out=tmp_path / "run", progress=False)
    assert result.primary_metric == "val_top1" and "val_top5" in result.metrics
    assert not read_metadata(tmp_path / "run" / "last.safetensors")["multi_label"]


def test_training_learns(image_folder, tmp_path):
    # Three classes told apart by colour: chance is 1/3; four epochs of 6 steps learn them
    # (after two the training loss is low, but BatchNorm's running statistics lag behind).
    result = train(
        config(image_folder, epochs=4, dropout=0.0), out=tmp_path / "run", progress=False
    )
    assert result.metrics["val_raw_top1"] >= 0.9, result.metrics
    assert result.metrics["val_raw_loss"] < 0.5 * math.log(3), result.metrics


def test_resume_from_shards_is_bitwise_and_a_url_trains_as_the_folder(image_folder, tmp_path):
    """The folder test above, on WebDataset shards: 9 steps over `memory://` with two
    worker processes equal 4 steps from the local copy, a resume and 5 more, with two
    lanes in one process (as two torchrun processes would read them)."""
    import fsspec

    from xception.data.shards import write_shards

    shards = tmp_path / "shards"
    write_shards(image_folder, shards, shard_size=10, progress=False)
    memory = fsspec.filesystem("memory")
    for path in shards.iterdir():
        memory.pipe(f"/resume-shards/{path.name}", path.read_bytes())
    options = {"lanes": 2, "shuffle_buffer": 6, "mixup": 0.2}
    whole = train(
        config("memory://resume-shards", max_steps=9, workers=2, **options),
        out=tmp_path / "whole",
        progress=False,
    )
    train(config(shards, max_steps=4, **options), out=tmp_path / "split", progress=False)
    state = torch.load(tmp_path / "split" / "last.state.pt", weights_only=True)
    assert [lane["offset"] >= 0 for lane in state["data_cursor"]["lanes"]] == [True, True]
    resumed = resume(tmp_path / "split", {"max_steps": 9}, progress=False)
    assert whole.metrics["step"] == resumed.metrics["step"] == 9
    assert_identical(
        weights(tmp_path / "whole" / "last.safetensors"),
        weights(tmp_path / "split" / "last.safetensors"),
    )
    write_shards(image_folder, shards, shard_size=10, seed=1, progress=False)  # new order
    with pytest.raises(ValueError, match=r"the training data is not what last\.safetensors was"):
        resume(tmp_path / "split", {"max_steps": 10}, progress=False)
    with pytest.raises(ValueError, match="lanes=3 must divide the batch of a step"):
        config(shards, lanes=3, batch_size=8)
