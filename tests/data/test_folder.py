"""Data layout checks fail before training; any image mode becomes RGB; bad files raise."""

import io

import numpy as np
import pytest
from PIL import Image

from xception.data.folder import discover, read_rgb


def write_image(path, mode="RGB", size=(20, 16), fmt="PNG"):
    path.parent.mkdir(parents=True, exist_ok=True)
    color = {
        "RGB": (10, 20, 30),
        "L": 128,
        "P": 3,
        "RGBA": (255, 0, 0, 0),
        "CMYK": (0, 255, 0, 0),
        "I;16": 40000,
        "LA": (50, 255),
    }[mode]
    Image.new(mode, size, color).save(path, fmt)


def make_folder(root, classes=("cat", "dog"), per_class=2):
    for split in ("train", "val"):
        for name in classes:
            for i in range(per_class):
                write_image(root / split / name / f"{i}.png")
    return root


def test_discover_reads_the_imagefolder_layout(tmp_path):
    splits = discover(make_folder(tmp_path))
    assert splits["train"].classes == ("cat", "dog")
    assert len(splits["train"]) == 4 and not splits["train"].multi_label
    assert splits["val"].labels == ((0,), (0,), (1,), (1,))


def test_discover_reads_multi_label_manifests(tmp_path):
    for i in range(3):
        write_image(tmp_path / "img" / f"{i}.png")
    (tmp_path / "train.csv").write_text("path,labels\nimg/0.png,sky;sea\nimg/1.png,sea\n")
    (tmp_path / "val.csv").write_text("path,labels\nimg/2.png,sky\n")
    splits = discover(tmp_path)
    assert splits["train"].classes == ("sea", "sky") and splits["train"].multi_label
    assert splits["train"].labels == ((0, 1), (0,)) and splits["val"].labels == ((1,),)


@pytest.mark.parametrize(
    ("breakage", "message"),
    [
        ("missing_split", "has no 'val' folder"),
        ("empty_class", "holds no images"),
        ("extra_class", "different classes"),
        ("missing_root", "data folder not found"),
    ],
)
def test_layout_problems_fail_before_training(tmp_path, breakage, message):
    root = make_folder(tmp_path / "data")
    if breakage == "missing_split":
        for f in (root / "val").rglob("*.png"):
            f.unlink()
        for d in sorted((root / "val").rglob("*"), reverse=True):
            d.rmdir()
        (root / "val").rmdir()
    elif breakage == "empty_class":
        (root / "train" / "bird").mkdir()
        (root / "val" / "bird").mkdir()
    elif breakage == "extra_class":
        write_image(root / "train" / "bird" / "0.png")
    else:
        root = tmp_path / "nope"
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        discover(root)


def test_a_path_label_header_is_a_single_label_manifest(tmp_path):
    for i in range(4):
        write_image(tmp_path / "img" / f"{i}.png")
    (tmp_path / "train.csv").write_text("path,label\nimg/0.png,cat\nimg/1.png,dog\n")
    (tmp_path / "val.csv").write_text("path,label\nimg/2.png,dog\nimg/3.png,cat\n")
    splits = discover(tmp_path)
    assert splits["train"].classes == ("cat", "dog") and not splits["train"].multi_label
    assert splits["val"].labels == ((1,), (0,))


@pytest.mark.parametrize(
    ("train", "val", "message"),
    [
        ("path,label\nimg/0.png,cat\n", "path,label\nimg/9.png,cat\n", "val.csv:2: no such image"),
        ("path,label\nimg/0.png,cat\n", "path,labels\nimg/0.png,cat\n", "the same header"),
        ("path,label\nimg/0.png,cat\n", "path,label\nimg/0.png,moon\n", "label 'moon'"),
        ("file,label\nimg/0.png,cat\n", "path,label\nimg/0.png,cat\n", "header 'path,label'"),
        ("path,label,labels\nimg/0.png,a,b\n", "path,label\nimg/0.png,a\n", "header"),
        ("path,label\nimg/0.png,\n", "path,label\nimg/0.png,a\n", "train.csv:2: needs"),
    ],
)
def test_manifest_problems_fail_naming_file_and_line(tmp_path, train, val, message):
    write_image(tmp_path / "img" / "0.png")
    (tmp_path / "train.csv").write_text(train)
    (tmp_path / "val.csv").write_text(val)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        discover(tmp_path)


def test_manifest_with_unknown_val_label_fails(tmp_path):
    write_image(tmp_path / "a.png")
    (tmp_path / "train.csv").write_text("path,labels\na.png,sky\n")
    (tmp_path / "val.csv").write_text("path,labels\na.png,moon\n")
    with pytest.raises(ValueError, match="'moon'"):
        discover(tmp_path)


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [("L", "PNG"), ("P", "PNG"), ("RGBA", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"), ("LA", "PNG")],
)
def test_every_mode_becomes_rgb(tmp_path, mode, fmt):
    path = tmp_path / f"x.{fmt.lower()}"
    write_image(path, mode, fmt=fmt)
    image = read_rgb(path)
    assert image.mode == "RGB" and image.size == (20, 16)
    if mode == "RGBA":  # fully transparent red composites onto white, not black
        assert image.getpixel((0, 0)) == (255, 255, 255)


def test_truncated_and_garbage_files_raise(tmp_path):
    good = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(
        good, "JPEG"
    )
    truncated = tmp_path / "t.jpg"
    truncated.write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    garbage = tmp_path / "g.png"
    garbage.write_bytes(b"definitely not a png")
    for path in (truncated, garbage):
        with pytest.raises((OSError, ValueError, SyntaxError)):
            read_rgb(path)
