"""Tar shards in the WebDataset layout: ``xception shard`` writes them, training and
evaluation read them by sample index, locally or through any fsspec protocol.

The layout is WebDataset's, so its library, timm and OpenCLIP read our shards, and we read
theirs: ``OUT/train-000000.tar ...`` and ``OUT/val-000000.tar ...``, whose members are
``KEY.EXT`` with the members of a sample adjacent and sharing KEY: the image in its original
encoding (``KEY.jpg``, ``KEY.png``, ...), ``KEY.cls`` (the class index as decimal text) or
``KEY.labels`` (class indices separated by ``;``, multi-label), and ``KEY.path`` (where the
image came from). ``OUT/info.json`` holds the classes, and per split the per-class counts
and every shard's name, samples, bytes and SHA-256. It is all a reader needs to start: no
listing of samples exists anywhere, so start-up does not grow with the data set.

Why a reader of our own rather than the webdataset library: exact resume and a data order
that does not depend on the number of processes need samples addressed by index (see
``StreamBatchSampler``); the library's pipeline is a stream whose shuffle buffer cannot be
checkpointed. A worker reads a whole shard in one sequential request (the fast way on
object stores), checks its size and checksum, and keeps the few shards it is using.
"""

from __future__ import annotations

import bisect
import hashlib
import io
import json
import re
import tarfile
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from xception.data.folder import IMAGE_EXTENSIONS, SPLITS, Split, decode_rgb, discover
from xception.files import atomic_write, write_json

INFO = "info.json"
FORMAT = "webdataset"
# WebDataset's rule: the key is the path up to the first dot of the file name.
MEMBER_NAME = re.compile(r"^((?:.*/)?[^./]+)\.([^/]+)$")
KEY_DIGITS = 10
BLOCK = 512
ZERO_BLOCK = bytes(BLOCK)


class ShardError(ValueError):
    """A shard that cannot be trusted: missing, truncated, changed, or not as info.json says."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class ShardSplit:
    """One split of a shard folder: what info.json says of it, checked against the shards."""

    root: str  # a local folder or an fsspec URL
    shards: tuple[ShardInfo, ...]
    classes: tuple[str, ...]
    multi_label: bool
    counts: tuple[int, ...]  # images of each class
    notes: tuple[str, ...] = ()

    def __len__(self) -> int:
        return sum(shard.samples for shard in self.shards)

    def class_counts(self) -> tuple[int, ...]:
        return self.counts

    def starts(self) -> list[int]:
        """The index of each shard's first sample, and the split's size last."""
        return np.cumsum([0] + [shard.samples for shard in self.shards]).tolist()

    def label_matrix(self) -> torch.Tensor:
        """(images, classes) 0/1 matrix of the labels. It reads every shard of the split:
        for a validation split, never for training's bookkeeping."""
        matrix = torch.zeros(len(self), len(self.classes))
        reader = ShardReader(self, capacity=1)
        for row in range(len(self)):
            matrix[row, list(reader.sample(row).labels or ())] = 1.0
        return matrix


# -- where the shards are ---------------------------------------------------------------


def filesystem(url: str) -> tuple[Any, str]:
    """The fsspec file system and path of a folder or URL; a protocol without an installed
    backend is named with the package to install."""
    import fsspec
    from fsspec.registry import known_implementations

    protocol = url.split("://", 1)[0] if "://" in url else "file"
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:
        known = known_implementations.get(protocol, {}).get("err")
        hint = known or f"no fsspec backend is installed for '{protocol}://' ({error})"
        raise ImportError(f"cannot open {url}: {hint}") from None


def is_shard_folder(data: str | Path) -> bool:
    """Whether ``data`` is a URL (always read as shards) or a folder holding info.json."""
    text = str(data)
    return "://" in text or (Path(text).expanduser() / INFO).is_file()


def open_shards(data: str | Path) -> dict[str, ShardSplit]:
    """Both splits of a shard folder, checked before anything starts: info.json consistent
    with itself, every shard present with the size it records. One listing of the folder
    and one small file: nothing here reads a sample."""
    text = str(data)
    url = text if "://" in text else str(Path(text).expanduser().resolve())
    fs, path = filesystem(url)
    try:
        with fs.open(f"{path}/{INFO}", "rb") as f:
            info = json.loads(f.read())
        listing = {Path(entry["name"]).name: entry["size"] for entry in fs.ls(path, detail=True)}
    except FileNotFoundError:
        message = f"{url} holds no {INFO}: make shards with `xception shard`"
        raise FileNotFoundError(message) from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ShardError(f"{url}/{INFO} cannot be read: {error}") from None
    return {name: _split(url, info, name, listing) for name in SPLITS}


def _split(url: str, info: dict, name: str, listing: dict[str, int]) -> ShardSplit:
    where = f"{url}/{INFO}"
    try:
        classes = tuple(info["classes"])
        entry = info["splits"][name]
        shards = tuple(ShardInfo(**shard) for shard in entry["shards"])
        counts = tuple(int(n) for n in entry["class_counts"])
        multi_label = bool(info["multi_label"])
        total = int(entry["samples"])
    except (KeyError, TypeError) as error:
        raise ShardError(f"{where} is not an info file of `xception shard` ({error!r})") from None
    if len(counts) != len(classes) or sum(s.samples for s in shards) != total:
        raise ShardError(f"{where}: the {name} split's counts disagree with its shard list")
    if total == 0:
        raise ShardError(f"{where}: the {name} split has no samples")
    for shard in shards:
        size = listing.get(shard.name)
        if size is None:
            raise ShardError(f"{url}/{shard.name} is missing ({INFO} lists it)")
        if size != shard.bytes:
            raise ShardError(
                f"{url}/{shard.name} has {size} bytes and {INFO} says {shard.bytes}: "
                "truncated or replaced; rerun `xception shard`"
            )
    return ShardSplit(url, shards, classes, multi_label, counts)


# -- reading samples --------------------------------------------------------------------


@dataclass(frozen=True)
class Sample:
    name: str  # shard:key, for messages
    image: bytes | None
    labels: tuple[int, ...] | None
    origin: str | None  # the image's source path, as sharded (KEY.path)


class ShardReader:
    """Samples by index (the position in the split's shards, in order). Keeps the last
    ``capacity`` shards it read, checked and parsed; each DataLoader worker has its own."""

    def __init__(self, split: ShardSplit, capacity: int = 2) -> None:
        self.split, self.capacity = split, capacity
        self.starts = split.starts()
        self.cache: OrderedDict[int, list[dict[str, bytes]]] = OrderedDict()
        self.fs: Any = None  # opened on first use: in the worker process, not before the fork
        self.path = ""

    def sample(self, index: int) -> Sample:
        shard = bisect.bisect_right(self.starts, index) - 1
        members = self._parsed(shard)[index - self.starts[shard]]
        name = f"{self.split.shards[shard].name}:{members.get('__key__', b'').decode()}"
        image = next((members[ext] for ext in members if "." + ext in IMAGE_EXTENSIONS), None)
        origin = members["path"].decode(errors="replace") if "path" in members else None
        return Sample(name, image, _labels(members, len(self.split.classes)), origin)

    def _parsed(self, shard: int) -> list[dict[str, bytes]]:
        if shard in self.cache:
            self.cache.move_to_end(shard)
            return self.cache[shard]
        info = self.split.shards[shard]
        if self.fs is None:
            self.fs, self.path = filesystem(self.split.root)
        where = f"{self.split.root}/{info.name}"
        try:
            with self.fs.open(f"{self.path}/{info.name}", "rb") as f:
                data = f.read()
        except FileNotFoundError:
            raise ShardError(f"{where} is missing ({INFO} lists it)") from None
        if len(data) != info.bytes or hashlib.sha256(data).hexdigest() != info.sha256:
            raise ShardError(
                f"{where} does not match its checksum in {INFO} ({len(data)} bytes, "
                f"{info.bytes} recorded): truncated or changed; rerun `xception shard`"
            )
        samples = read_samples(data, where)
        if len(samples) != info.samples:
            raise ShardError(f"{where} holds {len(samples)} samples and {INFO} says {info.samples}")
        self.cache[shard] = samples
        while len(self.cache) > self.capacity:
            self.cache.popitem(last=False)
        return samples


def read_samples(data: bytes, where: str) -> list[dict[str, bytes]]:
    """A tar's samples as WebDataset groups them: adjacent members sharing a key, each a
    mapping of extension (lower case) to bytes, plus ``__key__``."""
    members = _plain_members(data, where)
    if members is None:  # pax or GNU extended headers: the standard library reads those
        members = _tarfile_members(data, where)
    samples: list[dict[str, bytes]] = []
    for name, start, size in members:
        match = MEMBER_NAME.match(name)
        if match is None:
            continue
        key, ext = match.group(1).encode(), match.group(2).lower()
        if not samples or samples[-1]["__key__"] != key:
            samples.append({"__key__": key})
        samples[-1][ext] = data[start : start + size]
    return samples


def _plain_members(data: bytes, where: str) -> list[tuple[str, int, int]] | None:
    """(name, data offset, size) of each regular file of a tar of plain ustar/v7 headers,
    read directly: ``tarfile`` spends ~70 us a member, a third of decoding a small image.
    None when the tar has extended headers (pax, GNU long names)."""
    members, position = [], 0
    while position + BLOCK <= len(data):
        header = data[position : position + BLOCK]
        if header == ZERO_BLOCK:
            return members
        kind = header[156:157]
        stored = header[148:156].strip(b"\0 ")
        if kind in b"xgLK" or header[124] & 0x80 or not stored.isdigit():
            return None
        if int(stored, 8) != sum(header[:148]) + 256 + sum(header[156:]):
            raise ShardError(f"{where}: a tar header at byte {position} fails its checksum")
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        name = header[:100].split(b"\0", 1)[0]
        if header[257:262] == b"ustar" and header[345] != 0:
            name = header[345:500].split(b"\0", 1)[0] + b"/" + name
        if position + BLOCK + size > len(data):
            raise ShardError(f"{where} is truncated (a member runs past its end)")
        if kind in (b"0", b"\0"):
            members.append((name.decode("utf-8", "replace"), position + BLOCK, size))
        position += BLOCK + -(-size // BLOCK) * BLOCK
    raise ShardError(f"{where} is truncated (no end-of-archive blocks)")


def _tarfile_members(data: bytes, where: str) -> list[tuple[str, int, int]]:
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            return [(m.name, m.offset_data, m.size) for m in tar if m.isfile()]
    except tarfile.TarError as error:
        raise ShardError(f"{where} is not a readable tar file ({error})") from None


def _labels(members: dict[str, bytes], classes: int) -> tuple[int, ...] | None:
    """The sample's class indices (None when it has no valid label)."""
    text = members.get("cls", members.get("labels"))
    try:
        labels = tuple(sorted({int(v) for v in text.decode().replace(";", " ").split()}))
    except (AttributeError, ValueError, UnicodeDecodeError):
        return None
    return labels if labels and all(0 <= v < classes for v in labels) else None


def decode_sample(sample: Sample):
    """The sample's image, decoded and upright (``decode_rgb``); ValueError names the sample."""
    if sample.labels is None:
        raise ValueError("no valid label (.cls or .labels)")
    if sample.image is None:
        raise ValueError("no image member")
    return decode_rgb(io.BytesIO(sample.image))


# -- writing shards ---------------------------------------------------------------------


@dataclass(frozen=True)
class ShardingResult:
    info: dict[str, Any]
    written: int  # shards written now
    kept: int  # complete shards of an earlier run, kept
    skipped: list[str]  # "path: error" of each unreadable image left out


def write_shards(
    data: str | Path,
    out: str | Path,
    shard_size: int = 1000,
    splits: Sequence[str] = SPLITS,
    seed: int = 0,
    progress: bool = True,
) -> ShardingResult:
    """Shard an image folder or CSV manifest into ``out``: samples in a seeded random order
    (so every shard is a sample of the whole set), ``shard_size`` a shard. Shards appear
    atomically; a rerun keeps each complete shard that holds what it should."""
    if shard_size < 1:
        raise ValueError(f"--shard-size {shard_size} must be at least 1")
    unknown = sorted(set(splits) - set(SPLITS))
    if unknown or not splits:
        raise ValueError(f"--split takes {' and/or '.join(SPLITS)}, not {unknown or 'nothing'}")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} is a file; give a folder for the shards")
    found = discover(data)  # every layout check happens before anything is written
    first = found["train"]
    info: dict[str, Any] = {
        "format": FORMAT,
        "version": 1,
        "classes": list(first.classes),
        "multi_label": first.multi_label,
        "source": str(Path(data).expanduser().resolve()),
        "seed": seed,
        "shard_size": shard_size,
        "splits": {},
    }
    written = kept = 0
    skipped: list[str] = []
    bar = tqdm(total=sum(len(found[s]) for s in splits), disable=not progress, unit="img")
    for name in splits:
        split = found[name]
        order = np.random.default_rng([seed, SPLITS.index(name)]).permutation(len(split))
        shards, counts = [], [0] * len(split.classes)
        for number, start in enumerate(range(0, len(split), shard_size)):
            chunk = [int(i) for i in order[start : start + shard_size]]
            shard = out / f"{name}-{number:06d}.tar"
            rows = _planned_rows(split, chunk, start)
            done = _complete(shard, split, rows, skipped)
            if done is None:
                done = _write_shard(shard, split, rows, skipped)
                written += 1
            else:
                kept += 1
            shards.append(done[0])
            for labels in done[1]:
                for label in labels:
                    counts[label] += 1
            bar.update(len(chunk))
        _remove_stale(out, name, len(shards))
        info["splits"][name] = {
            "samples": sum(s["samples"] for s in shards),
            "class_counts": counts,
            "shards": shards,
        }
    bar.close()
    info["skipped"] = skipped
    write_json(out / INFO, info)
    return ShardingResult(info, written, kept, skipped)


def _planned_rows(split: Split, chunk: list[int], start: int) -> list[tuple[str, str, tuple]]:
    """(key, source path, labels) of each sample planned for a shard."""
    return [
        (f"{start + j:0{KEY_DIGITS}d}", split.paths[i], split.labels[i])
        for j, i in enumerate(chunk)
    ]


def _complete(
    shard: Path, split: Split, rows: list[tuple[str, str, tuple]], skipped: list[str]
) -> tuple[dict, list] | None:
    """An earlier run's shard if it holds the planned samples in order, less images that
    are still unreadable (named again), as (its info entry, its samples' labels); else None."""
    if not shard.is_file():
        return None
    data = shard.read_bytes()
    try:
        samples = read_samples(data, str(shard))
    except ShardError:
        return None
    held = [
        (s["__key__"].decode(), s.get("path", b"").decode(), s.get("labels", s.get("cls", b"")))
        for s in samples
    ]
    planned = [(key, path, _label_text(labels).encode()) for key, path, labels in rows]
    present = set(held)
    if [row for row in planned if row in present] != held:
        return None
    errors = []
    for _, path, _ in (row for row in planned if row not in present):
        image = _image_bytes(split.root / path)
        if isinstance(image, bytes):
            return None  # readable now: the shard must take it
        errors.append(image)
    skipped += errors
    kept = [row in present for row in planned]
    labels = [row[2] for row, keep in zip(rows, kept, strict=True) if keep]
    return _entry(shard.name, len(samples), data), labels


def _image_bytes(source: Path) -> bytes | str:
    """The file's bytes if they decode as an image, else why not ("path: error")."""
    try:
        if not source.is_file():
            raise ValueError("not a regular file")
        image = source.read_bytes()
        decode_rgb(io.BytesIO(image))
    except (OSError, ValueError, SyntaxError) as error:
        return f"{source}: {type(error).__name__}: {error}"
    return image


def _write_shard(
    shard: Path, split: Split, rows: list[tuple[str, str, tuple]], skipped: list[str]
) -> tuple[dict, list]:
    members, labels = [], []
    for key, path, sample_labels in rows:
        source = split.root / path
        image = _image_bytes(source)
        if isinstance(image, str):
            skipped.append(image)
            continue
        ext = source.suffix.lower().lstrip(".")
        members += [
            (f"{key}.{ext}", image),
            (
                f"{key}.{'labels' if split.multi_label else 'cls'}",
                _label_text(sample_labels).encode(),
            ),
            (f"{key}.path", path.encode()),
        ]
        labels.append(sample_labels)
    data = tar_bytes(members)
    atomic_write(shard, lambda tmp: Path(tmp).write_bytes(data))
    return _entry(shard.name, len(labels), data), labels


def _label_text(labels: tuple[int, ...]) -> str:
    return ";".join(map(str, labels))


def tar_bytes(members: Sequence[tuple[str, bytes]]) -> bytes:
    """A tar of the members, with fixed owners, modes and times: the same samples always
    make the same bytes (and checksum)."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, payload in members:
            member = tarfile.TarInfo(name)
            member.size, member.mode, member.mtime = len(payload), 0o644, 0
            tar.addfile(member, io.BytesIO(payload))
    return buffer.getvalue()


def _entry(name: str, samples: int, data: bytes) -> dict[str, Any]:
    return {
        "name": name,
        "samples": samples,
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
    }


def _remove_stale(out: Path, split: str, shards: int) -> None:
    """Shards numbered past this run's last, left by an earlier run of more shards."""
    for path in out.glob(f"{split}-*.tar"):
        number = path.stem.rsplit("-", 1)[-1]
        if number.isdigit() and int(number) >= shards:
            path.unlink()
