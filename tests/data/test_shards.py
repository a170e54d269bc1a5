"""WebDataset shards: what `xception shard` writes, what the reader accepts and refuses,
and interchange with the webdataset library itself (a test-only reference)."""

import dataclasses
import hashlib
import io
import json
import shutil

import pytest
import torch
from PIL import Image

import xception
from xception.cli import main
from xception.data.folder import discover
from xception.data.loaders import ImageDataset, ShardDataset, open_data
from xception.data.shards import (
    INFO,
    ShardError,
    ShardReader,
    _plain_members,
    _tarfile_members,
    open_shards,
    read_samples,
    tar_bytes,
    write_shards,
)
from xception.data.transforms import Preprocessing
from xception.weights import write_weights

PRE = Preprocessing(image_size=40)


@pytest.fixture(scope="module")
def shards(image_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    write_shards(image_folder, out, shard_size=10, progress=False)
    return out


def copy_of(shards, tmp_path):
    return shutil.copytree(shards, tmp_path / "copy")


def test_every_image_lands_once_with_its_label_in_a_shuffled_order(image_folder, shards):
    folder = discover(image_folder)
    info = json.loads((shards / INFO).read_text())
    assert info["classes"] == list(folder["train"].classes) and not info["multi_label"]
    for name, split in open_shards(shards).items():
        assert [s.samples for s in split.shards] == ([10] * 4 + [8] if name == "train" else [10, 8])
        assert split.class_counts() == folder[name].class_counts()
        reader = ShardReader(split)
        seen = {}
        for index in range(len(split)):
            sample = reader.sample(index)
            seen[sample.origin] = (sample.image, sample.labels)
        expected = {
            p: ((image_folder / p).read_bytes(), labels)
            for p, labels in zip(folder[name].paths, folder[name].labels, strict=True)
        }
        assert seen == expected  # the original bytes, once each, with their labels
        paths = list(seen)
        assert paths != sorted(paths)  # shuffled: shards mix the classes


def test_a_shard_sample_is_the_same_tensor_as_its_image_file(image_folder, shards):
    folder = discover(image_folder)["val"]
    by_path = {p: i for i, p in enumerate(folder.paths)}
    split = open_shards(shards)["val"]
    from_shards = ShardDataset(split, PRE, train=True, seed=3)
    from_files = ImageDataset(folder, PRE, train=False)
    reader = ShardReader(split)
    for index in range(0, len(split), 5):
        image, target = from_shards[(1, index)]
        file_image, file_target = from_files[(0, by_path[reader.sample(index).origin])]
        assert int(target) == int(file_target)
        assert image.shape == file_image.shape == (3, 40, 40)
    # eval transforms are deterministic: identical pixels
    evaluation = ShardDataset(split, PRE, train=False)
    image, _ = evaluation[(0, 0)]
    assert torch.equal(image, from_files[(0, by_path[reader.sample(0).origin])][0])


def test_a_rerun_keeps_complete_shards_and_rewrites_what_changed(image_folder, tmp_path):
    out = tmp_path / "out"
    first = write_shards(image_folder, out, shard_size=10, progress=False)
    assert (first.written, first.kept) == (7, 0)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("*.tar")}
    (out / "train-000002.tar").write_bytes(b"cut short")  # as a foreign or damaged file
    second = write_shards(image_folder, out, shard_size=10, progress=False)
    assert (second.written, second.kept) == (1, 6)
    assert second.info == first.info  # the same bytes again: the same checksums
    assert all(
        p.stat().st_mtime_ns == stamps[p.name] for p in out.glob("*.tar") if "000002" not in p.name
    )
    third = write_shards(image_folder, out, shard_size=20, progress=False)  # a new plan
    assert third.written == 4 and sorted(p.name for p in out.glob("train-*")) == [
        f"train-00000{i}.tar" for i in range(3)
    ]


def test_unreadable_images_are_skipped_and_named(image_folder, tmp_path):
    data = shutil.copytree(image_folder, tmp_path / "data")
    (data / "train" / "red" / "0.png").write_bytes(b"not a png")
    result = write_shards(data, tmp_path / "out", shard_size=100, progress=False)
    assert len(result.skipped) == 1 and "red/0.png" in result.skipped[0]
    assert result.info["splits"]["train"]["samples"] == 47
    assert result.info["splits"]["train"]["class_counts"] == [16, 16, 15]


def test_webdataset_reads_our_shards(shards):
    webdataset = pytest.importorskip("webdataset")
    split = open_shards(shards)["train"]
    urls = [str(shards / s.name) for s in split.shards]
    ours = ShardReader(split)
    theirs = list(webdataset.WebDataset(urls, shardshuffle=False).decode("pil"))
    assert len(theirs) == len(split)
    for index, sample in enumerate(theirs):
        mine = ours.sample(index)
        assert sample["cls"] == mine.labels[0]
        assert sample["png"].size == Image.open(io.BytesIO(mine.image)).size


def test_we_read_shards_that_webdataset_wrote(tmp_path):
    webdataset = pytest.importorskip("webdataset")
    colours = {"red": (255, 0, 0), "blue": (0, 0, 255)}
    shard = tmp_path / "train-000000.tar"
    with webdataset.TarWriter(str(shard)) as sink:
        for i in range(6):
            name = list(colours)[i % 2]
            buffer = io.BytesIO()
            Image.new("RGB", (20, 20), colours[name]).save(buffer, format="JPEG")
            sink.write({"__key__": f"img{i:03d}", "jpg": buffer.getvalue(), "cls": i % 2})
    data = shard.read_bytes()
    shutil.copy(shard, tmp_path / "val-000000.tar")
    entry = {"samples": 6, "class_counts": [3, 3]}
    entry["shards"] = [
        {
            "name": "NAME",
            "samples": 6,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    ]
    splits = {
        s: {**entry, "shards": [{**entry["shards"][0], "name": f"{s}-000000.tar"}]}
        for s in ("train", "val")
    }
    info = {
        "format": "webdataset",
        "classes": ["red", "blue"],
        "multi_label": False,
        "splits": splits,
    }
    (tmp_path / INFO).write_text(json.dumps(info))
    dataset = ShardDataset(open_data(tmp_path)["val"], PRE, train=False)
    for index in range(6):
        image, target = dataset[(0, index)]
        assert int(target) == index % 2
        red_over_blue = image[0].float().mean() - image[2].float().mean()
        assert (red_over_blue > 100) == (index % 2 == 0)


def test_tar_members_are_grouped_by_key_as_webdataset_does():
    data = tar_bytes([("a/x.1.jpg", b"1"), ("a/x.1.cls", b"0"), ("a/y.jpg", b"2"), ("z", b"3")])
    samples = read_samples(data, "t.tar")
    assert [s["__key__"] for s in samples] == [b"a/x", b"a/y"]
    assert samples[0]["1.jpg"] == b"1" and samples[0]["1.cls"] == b"0"


def test_the_direct_tar_reader_agrees_with_the_standard_librarys():
    long = "d" * 120 + "/" + "e" * 90  # a name that needs ustar's prefix field
    data = tar_bytes([(f"{long}.jpg", b"x" * 700), ("k.cls", b"7"), ("k.jpg", b"")])
    assert _plain_members(data, "t") == _tarfile_members(data, "t")
    assert _plain_members(data, "t")[0] == (f"{long}.jpg", 512, 700)
    with pytest.raises(ShardError, match="is truncated"):
        read_samples(data[:1500], "t.tar")
    damaged = bytearray(data)
    damaged[1] ^= 1  # a header's name byte: its checksum no longer holds
    with pytest.raises(ShardError, match="fails its checksum"):
        read_samples(bytes(damaged), "t.tar")


# -- bad input: one line, never a hang --------------------------------------------------


def cli(capsys, *args):
    """`xception ARGS` in this process: (exit status, stderr)."""
    status = main(list(args))
    return status, capsys.readouterr().err


def test_a_missing_or_truncated_shard_stops_before_training(shards, tmp_path):
    data = copy_of(shards, tmp_path)
    shard = data / "train-000001.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    with pytest.raises(ShardError, match=r"train-000001\.tar has 5000 bytes and info\.json says"):
        open_data(data)
    shard.unlink()
    with pytest.raises(ShardError, match=r"train-000001.tar is missing \(info.json lists it\)"):
        open_data(data)


def test_a_changed_shard_fails_its_checksum_in_one_line(shards, tmp_path, capsys):
    data = copy_of(shards, tmp_path)
    shard = data / "val-000001.tar"
    changed = bytearray(shard.read_bytes())
    changed[3000] ^= 0xFF
    shard.write_bytes(bytes(changed))
    dataset = ShardDataset(open_data(data)["val"], PRE, train=False)
    with pytest.raises(ShardError, match=r"val-000001.tar does not match its checksum"):
        dataset[(0, 15)]
    weights = tmp_path / "w.safetensors"
    write_weights(
        weights,
        xception.create_model("xception_tiny", num_classes=3),
        "xception_tiny",
        {"classes": ["blue", "green", "red"], "preprocessing": dataclasses.asdict(PRE)},
    )
    status, err = cli(
        capsys, "eval", "--weights", str(weights), "--data", str(data), "--workers", "1"
    )
    assert status == 2 and err.count("\n") == 1, err  # raised in a worker process, one line
    assert "val-000001.tar does not match its checksum" in err


def test_info_json_that_disagrees_with_a_shard_is_named(shards, tmp_path):
    data = copy_of(shards, tmp_path)
    info = json.loads((data / INFO).read_text())
    info["splits"]["val"]["shards"][0]["samples"] = 9
    info["splits"]["val"]["shards"][1]["samples"] = 9
    (data / INFO).write_text(json.dumps(info))
    dataset = ShardDataset(open_data(data)["val"], PRE, train=False)
    with pytest.raises(ShardError, match=r"val-000000.tar holds 10 samples and info.json says 9"):
        dataset[(0, 0)]
    info["splits"]["val"]["samples"] = 5
    (data / INFO).write_text(json.dumps(info))
    with pytest.raises(ShardError, match=r"the val split's counts disagree with its shard list"):
        open_data(data)
    (data / INFO).write_text("{")
    with pytest.raises(ShardError, match=r"info.json cannot be read"):
        open_data(data)


def test_a_sample_without_a_label_is_skipped_and_named(tmp_path):
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    members = [("k0.png", buffer.getvalue()), ("k0.cls", b"0"), ("k1.png", buffer.getvalue())]
    data = tar_bytes(members)
    entry = {"name": "val-000000.tar", "samples": 2, "bytes": len(data)}
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    for split in ("train", "val"):
        (tmp_path / f"{split}-000000.tar").write_bytes(data)
    splits = {
        s: {"samples": 2, "class_counts": [2], "shards": [{**entry, "name": f"{s}-000000.tar"}]}
        for s in ("train", "val")
    }
    info = {"format": "webdataset", "classes": ["a"], "multi_label": False, "splits": splits}
    (tmp_path / INFO).write_text(json.dumps(info))
    dataset = ShardDataset(open_data(tmp_path)["val"], PRE, train=False)
    assert dataset[(0, 0)][1] == 0
    assert (
        dataset[(0, 1)]
        == f"{tmp_path}/val-000000.tar:k1: ValueError: no valid label (.cls or .labels)"
    )


def test_a_protocol_without_a_backend_names_the_package(tmp_path, capsys):
    with pytest.raises(ImportError, match=r"s3fs"):
        open_data("s3://bucket/shards")
    status, err = cli(capsys, "train", "--data", "nosuchproto://x/y", "--out", str(tmp_path / "r"))
    assert status == 2 and err.count("\n") == 1 and "nosuchproto://" in err
    assert not (tmp_path / "r").exists()


def test_shards_in_memory_filesystem_train_like_local_ones(shards):
    """The fsspec path, with the one protocol a test may use besides files."""
    import fsspec

    memory = fsspec.filesystem("memory")
    for path in shards.iterdir():
        memory.pipe(f"/shards/{path.name}", path.read_bytes())
    local, remote = open_data(shards), open_data("memory://shards")
    assert [s.shards for s in remote.values()] == [s.shards for s in local.values()]
    a = ShardDataset(local["train"], PRE, train=True, seed=1)
    b = ShardDataset(remote["train"], PRE, train=True, seed=1)
    for index in (0, 17, 47):
        assert torch.equal(a[(2, index)][0], b[(2, index)][0])


@pytest.mark.parametrize("multi_label", [False, True], ids=["single-label", "multi-label"])
def test_eval_on_shards_scores_as_on_the_files(image_folder, tmp_path, multi_label):
    """The same images through shards and through files: the same metrics (multi-label:
    a manifest with a second, derived label, sharded into KEY.labels)."""
    data = image_folder
    classes = ["blue", "green", "red"]
    if multi_label:
        data = shutil.copytree(image_folder, tmp_path / "manifest")
        for split in ("train", "val"):
            tone = {"red": "warm", "green": "cool", "blue": "cool"}
            rows = ["path,labels"] + [
                f"{p.relative_to(data)},{p.parent.name};{tone[p.parent.name]}"
                for p in sorted((data / split).rglob("*.png"))
            ]
            (data / f"{split}.csv").write_text("\n".join(rows) + "\n")
        classes = ["blue", "cool", "green", "red", "warm"]
    result = write_shards(data, tmp_path / "shards", shard_size=7, progress=False)
    assert result.info["classes"] == classes and result.info["multi_label"] == multi_label
    if multi_label:
        assert result.info["splits"]["train"]["class_counts"] == [16, 32, 16, 16, 16]
        assert b"1;2" in (tmp_path / "shards" / "train-000000.tar").read_bytes()  # cool;green
    weights = tmp_path / "w.safetensors"
    torch.manual_seed(0)
    model = xception.create_model("xception_tiny", num_classes=len(classes))
    meta = {"classes": classes, "preprocessing": dataclasses.asdict(Preprocessing(72))}
    write_weights(weights, model, "xception_tiny", {**meta, "multi_label": multi_label})
    files = xception.evaluate(weights, data, workers=0, device="cpu")
    shards = xception.evaluate(weights, tmp_path / "shards", workers=0, device="cpu")
    assert files["images"] == shards["images"] == 18
    for key in ("top1", "top5", "map100", "map100_unweighted", "map", "loss"):
        if key in files:
            assert shards[key] == pytest.approx(files[key], rel=1e-6), key
