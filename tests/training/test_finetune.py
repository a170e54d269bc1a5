"""Fine-tuning: start from a weights file (its architecture and preprocessing, a new head
where the classes differ), freezing, a separate head rate, and the errors of bad starts."""

import shutil

import pytest
import torch
from small_runs import config, weights

import xception
from xception.training.builders import build_model, freeze
from xception.training.config import resolve
from xception.training.optim import param_groups
from xception.training.run import train
from xception.weights import save_weights

HEAD = "head.classifier."


@pytest.fixture(scope="module")
def pretrained(image_folder, tmp_path_factory):
    """A 3-class run's best weights (xception_tiny at 72 px)."""
    run = tmp_path_factory.mktemp("pretrained") / "run"
    train(config(image_folder, max_steps=2), out=run, progress=False)
    return run / "best.safetensors"


@pytest.fixture(scope="module")
def two_classes(image_folder, tmp_path_factory):
    """The same images, but only two of the classes (other names: a new task)."""
    root = tmp_path_factory.mktemp("two")
    for split in ("train", "val"):
        for old, new in (("red", "warm"), ("blue", "cold")):
            shutil.copytree(image_folder / split / old, root / split / new)
    return root


def test_the_file_sets_model_and_preprocessing_unless_said(pretrained, two_classes):
    tuned = resolve("finetune", None, {"init_weights": str(pretrained), "data": str(two_classes)})
    assert tuned.model == "xception_tiny" and tuned.image_size == 72  # not finetune's/default
    assert tuned.crop_pct == 1.0  # quick's, as the file records it
    sized = resolve("finetune", {"image_size": 80}, {"init_weights": str(pretrained)})
    assert sized.image_size == 80
    with pytest.raises(ValueError, match="holds xception_tiny with middle_blocks=2"):
        resolve("finetune", None, {"init_weights": str(pretrained), "model": "xception"})
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        resolve("finetune", None, {"init_weights": str(pretrained) + ".missing"})


def test_a_new_head_over_the_loaded_backbone_where_the_classes_differ(pretrained, two_classes):
    saved = weights(pretrained)
    tuned = resolve("finetune", None, {"init_weights": str(pretrained), "data": str(two_classes)})
    model, note = build_model(tuned, ("cold", "warm"))
    state = model.state_dict()
    backbone = [k for k in saved if not k.startswith((HEAD, "raw/"))]
    assert all(torch.equal(state[k], saved[k]) for k in backbone)
    assert state[HEAD + "weight"].shape == (2, saved[HEAD + "weight"].shape[1])
    assert "new head.classifier for 2 classes (the file's had 3 other classes)" in note
    same, note = build_model(tuned, ("blue", "green", "red"))  # the file's own classes
    assert torch.equal(same.state_dict()[HEAD + "weight"], saved[HEAD + "weight"])
    assert "head.classifier included" in note


def test_a_notop_file_gets_a_head(pretrained, tmp_path):
    model, metadata = xception.load_model(pretrained)
    model.reset_classifier(0)
    notop = tmp_path / "notop.safetensors"
    save_weights(model, notop, "xception_tiny", {**metadata, "classes": []})
    tuned = resolve("finetune", None, {"init_weights": str(notop)})
    built, note = build_model(tuned, ("a", "b"))
    assert built.num_classes == 2 and "the file's had no classifier" in note


def test_fine_tuning_trains_and_logs_the_new_head(pretrained, two_classes, tmp_path):
    run = xception.train(
        "finetune",
        init_weights=pretrained,
        data=two_classes,
        out=tmp_path / "run",
        max_steps=2,
        batch_size=8,
        workers=0,
        progress=False,
    )
    assert run.metrics["step"] == 2
    log = (tmp_path / "run" / "run.log").read_text()
    assert "init weights:" in log and "new head.classifier for 2 classes" in log
    assert {row["class"] for row in run.per_class} == {"cold", "warm"}
    for name in ("per_class.csv", "confusion.csv", "confusion.png"):
        assert (tmp_path / "run" / name).is_file()
    with pytest.raises(ValueError, match="drop --config, --recipe, --out"):
        xception.train("finetune", resume=tmp_path / "run", init_weights=pretrained)


def changed(before, after, keys):
    return {k for k in keys if not torch.equal(before[k], after[k])}


@pytest.mark.parametrize(
    ("options", "frozen", "trained"),
    [
        ({"freeze_backbone": True}, "backbone", "head"),
        ({"freeze_bn": True}, "batch_norm", "convolutions"),
    ],
)
def test_frozen_parameters_and_statistics_stay_as_loaded(
    pretrained, two_classes, tmp_path, options, frozen, trained
):
    train(
        resolve(
            "finetune",
            None,
            {
                "init_weights": str(pretrained),
                "data": str(two_classes),
                "max_steps": 3,
                "batch_size": 8,
                "workers": 0,
                "ema_decay": 0,
                **options,
            },
        ),
        "finetune",
        out=tmp_path / "run",
        progress=False,
    )
    before, after = weights(pretrained), weights(tmp_path / "run" / "last.safetensors")
    keys = [k for k in after if not k.startswith(HEAD) and not k.endswith("num_batches_tracked")]
    norms = [k for k in keys if ".bn." in k or k.split(".")[-2] == "bn"]
    groups = {
        "backbone": keys,
        "batch_norm": norms,
        "head": [HEAD + "weight"],
        "convolutions": [k for k in keys if k.endswith("conv.weight")],
    }
    assert not changed(before, after, groups[frozen]), frozen
    assert changed(before, after, groups[trained]), trained


def test_the_head_trains_alone_for_freeze_epochs_then_everything(pretrained, two_classes, tmp_path):
    options = {
        "init_weights": str(pretrained),
        "data": str(two_classes),
        "batch_size": 8,
        "workers": 0,
        "ema_decay": 0,
        "freeze_epochs": 1,
    }
    # 32 training images / 8 = 4 steps an epoch: step 4 ends the head-only epoch
    train(
        resolve("finetune", None, {**options, "max_steps": 4}), out=tmp_path / "a", progress=False
    )
    train(
        resolve("finetune", None, {**options, "max_steps": 6}), out=tmp_path / "b", progress=False
    )
    before = weights(pretrained)
    first, second = (weights(tmp_path / p / "last.safetensors") for p in ("a", "b"))
    backbone = [k for k in first if k.endswith("conv.weight")]
    assert not changed(before, first, backbone) and changed(before, second, backbone)


def test_freezing_leaves_something_to_train_and_the_head_its_own_rate():
    model = xception.create_model("xception_tiny", num_classes=0)
    with pytest.raises(ValueError, match="nothing is left to train"):
        freeze(model, backbone=True, batch_norm=False)
    model = xception.create_model("xception_tiny", num_classes=4)
    freeze(model, backbone=False, batch_norm=False)
    groups = param_groups(model, 0.05, head_lr_scale=10.0)
    head = {id(p) for p in model.head.parameters()}
    for group in groups:
        in_head = {id(p) in head for p in group["params"]}
        assert in_head == {group["lr_scale"] == 10.0}
    with pytest.raises(ValueError, match="drop freeze_epochs"):
        resolve("finetune", None, {"freeze_backbone": True, "freeze_epochs": 2})


def test_init_weights_of_another_family_or_a_corrupt_file_fail_before_any_write(
    pretrained, two_classes, tmp_path
):
    inception = tmp_path / "inception.safetensors"
    save_weights(xception.create_model("inception_v3", num_classes=2), inception, "inception_v3")
    with pytest.raises(ValueError, match="holds inception_v3 weights, which xception_tiny"):
        resolve("finetune", {"model": "xception_tiny"}, {"init_weights": str(inception)})
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        resolve("finetune", None, {"init_weights": str(corrupt), "data": str(two_classes)})
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "corrupt.safetensors",
        "inception.safetensors",
    ]


def test_a_fine_tuning_run_resumes_without_its_init_file(pretrained, two_classes, tmp_path):
    """The checkpoint records the architecture; the start file may have moved since."""
    start = tmp_path / "start.safetensors"
    shutil.copy(pretrained, start)
    options = {"data": str(two_classes), "batch_size": 8, "workers": 0}
    xception.train("finetune", init_weights=start, out=tmp_path / "run", max_steps=2, **options)
    start.unlink()
    resumed = xception.train(resume=tmp_path / "run", max_steps=3, progress=False)
    assert resumed.metrics["step"] == 3
