"""The built-in synthetic data set: deterministic pixels, the layouts the image-folder pipeline
reads, atomic caching, and a class signal that lies in shape rather than colour."""

from __future__ import annotations

import csv
import dataclasses
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from torchvision.datasets import ImageFolder

from xception.data import synthetic
from xception.data.synthetic import (
    CLASS_NAMES,
    SPLITS,
    SyntheticSpec,
    default_cache_dir,
    is_complete,
    materialize,
    render,
)

TINY = SyntheticSpec(classes=3, train_per_class=4, val_per_class=2, image_size=32)
TINY_MULTI = dataclasses.replace(TINY, classes=6, train_per_class=20, multi_label=True)


def pixels(spec: SyntheticSpec, split: str, index: int) -> np.ndarray:
    return np.asarray(render(spec, split, index)[0])


def files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


@pytest.mark.parametrize("spec", [TINY, TINY_MULTI], ids=["single", "multi"])
def test_render_is_a_pure_function_of_spec_split_and_index(spec):
    for split in SPLITS:
        for index in range(3):
            first, labels = render(spec, split, index)
            second, labels_again = render(spec, split, index)
            assert np.array_equal(np.asarray(first), np.asarray(second))
            assert labels == labels_again


def test_seed_split_and_index_all_change_the_image():
    image = pixels(TINY, "train", 0)
    assert not np.array_equal(image, pixels(dataclasses.replace(TINY, seed=1), "train", 0))
    assert not np.array_equal(image, pixels(TINY, "val", 0))
    assert not np.array_equal(image, pixels(TINY, "train", TINY.classes))  # same class


@pytest.mark.parametrize("size", [16, 33, 48])
@pytest.mark.parametrize("multi_label", [False, True])
def test_images_are_rgb_at_the_requested_size(size, multi_label):
    spec = dataclasses.replace(TINY, image_size=size, multi_label=multi_label)
    image, labels = render(spec, "train", 1)
    assert image.mode == "RGB"
    assert image.size == (size, size)
    assert labels and all(0 <= k < spec.classes for k in labels)


@pytest.mark.parametrize("spec", [TINY, TINY_MULTI], ids=["single", "multi"])
def test_worker_count_does_not_change_the_files(tmp_path, spec):
    serial = materialize(spec, tmp_path / "serial", workers=0, progress=False)
    pooled = materialize(spec, tmp_path / "pooled", workers=2, progress=False)
    assert files(serial) == files(pooled)


def test_single_label_layout_is_an_image_folder(tmp_path):
    root = materialize(TINY, tmp_path, progress=False)
    assert root == tmp_path / TINY.name
    assert sorted(p.name for p in root.iterdir()) == ["spec.json", "train", "val"]
    for split, per_class in (("train", TINY.train_per_class), ("val", TINY.val_per_class)):
        dataset = ImageFolder(str(root / split))
        assert dataset.classes == list(CLASS_NAMES[: TINY.classes])
        assert Counter(dataset.targets) == {k: per_class for k in range(TINY.classes)}
        for path, target in dataset.samples:  # ImageFolder's index is render's label
            assert Path(path).name.endswith(".png")
            assert render(TINY, split, int(Path(path).stem))[1] == [target]


def test_multi_label_layout_and_manifests(tmp_path):
    spec = TINY_MULTI
    root = materialize(spec, tmp_path, progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["images", "spec.json", "train.csv", "val.csv"]
    counts: dict[str, Counter] = {}
    for split in SPLITS:
        with open(root / f"{split}.csv", newline="") as f:
            reader = csv.reader(f)
            assert next(reader) == ["path", "labels"]
            rows = list(reader)
        assert len(rows) == spec.split_size(split)
        assert sorted(p.name for p in (root / "images" / split).iterdir()) == sorted(
            Path(path).name for path, _ in rows
        )
        counts[split] = Counter()
        for path, labels in rows:
            assert path.startswith(f"images/{split}/") and (root / path).is_file()
            names = labels.split(";")
            assert 1 <= len(names) <= 4 and len(set(names)) == len(names)
            assert set(names) <= set(CLASS_NAMES[: spec.classes])
            assert render(spec, split, int(Path(path).stem))[1] == sorted(
                CLASS_NAMES.index(n) for n in names
            )
            counts[split].update(names)
        assert set(counts[split]) == set(CLASS_NAMES[: spec.classes])  # no class is missing
    train = counts["train"]
    assert max(train.values()) >= 2 * min(train.values())  # deliberately unequal frequencies
    assert len({len(labels.split(";")) for _, labels in rows}) > 1


def test_second_call_renders_nothing(tmp_path, monkeypatch):
    root = materialize(TINY, tmp_path, progress=False)
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("*")}

    def fail(*args, **kwargs):
        raise AssertionError("a complete data set was rendered again")

    monkeypatch.setattr(synthetic, "render", fail)
    assert materialize(TINY, tmp_path, progress=False) == root
    assert {p: p.stat().st_mtime_ns for p in root.rglob("*")} == stamps


def test_leftovers_of_a_killed_run_are_not_taken_as_complete(tmp_path):
    foreign = tmp_path / f".{TINY.name}.partial-otherhost-1-0000"
    (foreign / "train" / CLASS_NAMES[0]).mkdir(parents=True)
    unmarked = tmp_path / TINY.name  # a folder at the final name but without its marker
    (unmarked / "train" / CLASS_NAMES[0]).mkdir(parents=True)
    assert not is_complete(unmarked, TINY)
    root = materialize(TINY, tmp_path, progress=False)
    assert is_complete(root, TINY)
    assert len(ImageFolder(str(root / "train"))) == TINY.split_size("train")
    assert foreign.is_dir()  # another host's run may still be alive: left alone


def test_partial_folder_of_a_dead_process_is_cleaned_up(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], check=True,
                          capture_output=True, text=True)  # fmt: skip
    stale = tmp_path / f"{synthetic._partial_prefix(TINY.name)}{int(dead.stdout)}-0000"
    stale.mkdir()
    materialize(TINY, tmp_path, progress=False)
    assert not stale.exists()


def test_interrupted_run_leaves_nothing_behind(tmp_path, monkeypatch):
    calls = []
    real_render = synthetic.render

    def render_then_die(*args):
        calls.append(args)
        if len(calls) > 3:
            raise KeyboardInterrupt
        return real_render(*args)

    monkeypatch.setattr(synthetic, "render", render_then_die)
    with pytest.raises(KeyboardInterrupt):
        materialize(TINY, tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_default_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("XCEPTION_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "datasets"
    assert materialize(TINY, progress=False).parent == tmp_path / "datasets"
    monkeypatch.delenv("XCEPTION_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "xception" / "datasets"


def test_every_spec_field_is_part_of_the_folder_name():
    changed = {"classes": 4, "train_per_class": 5, "val_per_class": 3, "image_size": 40}
    changed |= {"multi_label": True, "seed": 7}
    assert set(changed) == {f.name for f in dataclasses.fields(SyntheticSpec)}
    names = {dataclasses.replace(TINY, **{k: v}).name for k, v in changed.items()}
    assert len(names | {TINY.name}) == len(changed) + 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("classes", 1),
        ("classes", len(CLASS_NAMES) + 1),
        ("train_per_class", 0),
        ("val_per_class", 0),
        ("image_size", 15),
        ("seed", -1),
    ],
)
def test_spec_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SyntheticSpec(**{field: value})


def test_render_rejects_unknown_splits_and_negative_indices():
    with pytest.raises(ValueError, match="split"):
        render(TINY, "test", 0)
    with pytest.raises(ValueError, match="index"):
        render(TINY, "train", -1)


def test_class_names_are_sorted_and_distinct():
    assert tuple(sorted(set(CLASS_NAMES))) == CLASS_NAMES
    assert len(CLASS_NAMES) >= SyntheticSpec().classes


def test_raw_pixels_and_colour_do_not_solve_it():
    """A linear classifier on raw pixels (which sees colour and position) stays far from
    perfect: the label is in the geometry, which a linear model cannot read."""
    spec = SyntheticSpec(classes=3, train_per_class=80, val_per_class=40, image_size=32, seed=3)

    def features(split: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = zip(
            *(render(spec, split, i) for i in range(spec.split_size(split))), strict=True
        )
        x = np.stack([np.asarray(im, np.float64).ravel() / 255 for im in images])
        return np.hstack([x, np.ones((len(x), 1))]), np.array([label[0] for label in labels])

    (x_train, y_train), (x_val, y_val) = features("train"), features("val")
    targets = np.eye(spec.classes)[y_train]
    ridge = x_train.T @ x_train + 10.0 * np.eye(x_train.shape[1])
    weights = np.linalg.solve(ridge, x_train.T @ targets)
    accuracy = float(np.mean((x_val @ weights).argmax(1) == y_val))
    assert accuracy < 0.6  # chance is 1/3
