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
        (
            "path,label\nimg/0.png,cat\n",
            "path,label\nimg/9.png,cat\n",
            "val.csv lists 1 missing image.*line 2: img/9.png",
        ),
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


def test_a_manifest_saved_by_excel_reads_like_any_other(tmp_path):
    write_image(tmp_path / "img" / "0.png")
    for split in ("train", "val"):  # "CSV UTF-8": a byte-order mark and CRLF line ends
        (tmp_path / f"{split}.csv").write_bytes(
            "path,label\r\nimg/0.png,cat\r\n".encode("utf-8-sig")
        )
    splits = discover(tmp_path)
    assert splits["train"].paths == ("img/0.png",) and splits["train"].classes == ("cat",)


def test_missing_images_are_counted_and_the_first_named_before_training(tmp_path):
    write_image(tmp_path / "img" / "0.png")
    rows = "".join(f"img/{i}.png,cat\n" for i in range(6))
    (tmp_path / "train.csv").write_text("path,label\n" + rows)
    (tmp_path / "val.csv").write_text("path,label\nimg/0.png,cat\n")
    with pytest.raises(
        FileNotFoundError,
        match=r"train.csv lists 5 missing image\(s\), e\.g\. "
        r"line 3: img/1.png; line 4: img/2.png; line 5: img/3.png$",
    ):
        discover(tmp_path)


def test_paths_outside_the_root_and_repeated_rows_are_used_and_noted(tmp_path):
    root = tmp_path / "data"
    write_image(root / "img" / "0.png")
    write_image(tmp_path / "elsewhere" / "1.png")
    absolute = tmp_path / "elsewhere" / "1.png"
    (root / "train.csv").write_text(
        f"path,label\nimg/0.png,cat\nimg/0.png,cat\n../elsewhere/1.png,dog\n{absolute},dog\n"
    )
    (root / "val.csv").write_text("path,label\nimg/0.png,cat\n")
    train = discover(root)["train"]
    assert len(train) == 4 and (root / train.paths[3]).is_file()
    assert train.notes == (
        f"train.csv: 2 path(s) outside {root}, e.g. ../elsewhere/1.png",
        "train.csv: 1 path(s) listed more than once (each use counts), e.g. img/0.png",
    )
    assert discover(root)["val"].notes == ()


def test_only_regular_files_are_opened_and_the_rest_named(tmp_path):
    import os

    folder = tmp_path / "train" / "cat"
    write_image(folder / "0.png")
    (folder / "dir.jpg").mkdir()
    (folder / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(folder / "fifo.png")  # opening it would block forever
    make_folder(tmp_path, classes=("cat",), per_class=1)
    paths = discover(tmp_path)["train"].paths
    assert paths == tuple(
        f"train/cat/{n}" for n in ("0.png", "dangling.png", "dir.jpg", "fifo.png")
    )
    for name in paths[1:]:
        with pytest.raises(ValueError, match="not a regular file"):
            read_rgb(tmp_path / name)


def _png_declaring(width, height):
    """A PNG whose header declares width x height (its pixel data is one pixel's)."""
    import struct
    import zlib

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0\0"))
        + chunk(b"IEND", b"")
    )


def test_a_decompression_bomb_is_an_unreadable_image_not_a_crash(tmp_path):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_declaring(30000, 30000))
    with pytest.raises(ValueError, match="could be decompression bomb"):
        read_rgb(bomb)


def test_the_exif_orientation_turns_phone_photos_upright(tmp_path):
    image = Image.new("RGB", (80, 40), (200, 0, 0))
    image.paste((0, 0, 200), (0, 0, 10, 40))  # blue at the stored image's left edge
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    image.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = read_rgb(tmp_path / "phone.jpg")
    assert upright.size == (40, 80)
    top = np.asarray(upright)[:5].reshape(-1, 3).mean(axis=0)  # the left edge is now on top
    assert top[2] > 150 and top[0] < 60
