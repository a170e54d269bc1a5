"""Datasets, samplers and loaders that make training resumable and rank-independent.

The sampler, not the dataset, owns the epoch: it yields ``(epoch, index)`` pairs, so
persistent worker processes (which hold stale dataset copies) still augment each sample
with the generator of its own epoch. A training step's global batch is the same set of
samples whatever the number of ranks: rank r takes its slice of each global batch.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from xception.data.augment import NO_AUGMENTATION, Augmentation
from xception.data.folder import Split, discover, read_rgb
from xception.data.shards import (
    ShardReader,
    ShardSplit,
    decode_sample,
    is_shard_folder,
    open_shards,
)
from xception.data.transforms import (
    Preprocessing,
    eval_transform,
    sample_generator,
    train_transform,
)


class UnreadableSample(ValueError):
    """One sample that cannot be used (named in the message); it is skipped, not fatal."""


class ImageDataset(Dataset):
    """One split; ``__getitem__((epoch, index))`` -> (uint8 image, target) or the failure."""

    def __init__(
        self,
        split: Split,
        pre: Preprocessing,
        train: bool,
        seed: int = 0,
        augmentation: Augmentation = NO_AUGMENTATION,
    ) -> None:
        self.split, self.pre, self.train, self.seed = split, pre, train, seed
        self.augmentation = augmentation
        self.multi_label, self.num_classes = split.multi_label, len(split.classes)

    def __len__(self) -> int:
        return len(self.split)

    def load(self, index: int) -> tuple[Image.Image, tuple[int, ...]]:
        """The sample's image and labels; ``UnreadableSample`` names a bad one."""
        path = self.split.root / self.split.paths[index]
        try:
            return read_rgb(path), self.split.labels[index]
        except (OSError, ValueError, SyntaxError) as error:
            raise UnreadableSample(f"{path}: {type(error).__name__}: {error}") from None

    def target(self, labels: tuple[int, ...]) -> torch.Tensor:
        if not self.multi_label:
            return torch.tensor(labels[0])
        target = torch.zeros(self.num_classes)
        target[list(labels)] = 1.0
        return target

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | str:
        epoch, index = key
        try:
            image, labels = self.load(index)
        except UnreadableSample as error:
            return str(error)
        if self.train:
            generator = sample_generator(self.seed, epoch, index)
            tensor = train_transform(image, self.pre, generator, self.augmentation)
        else:
            tensor = eval_transform(image, self.pre)
        return tensor, self.target(labels)


class ShardDataset(ImageDataset):
    """A split of WebDataset shards, by sample index. A shard that cannot be trusted stops
    the run (``ShardError``); one bad image or label in a good shard is skipped and named."""

    def __init__(
        self,
        split: ShardSplit,
        pre: Preprocessing,
        train: bool,
        seed: int = 0,
        augmentation: Augmentation = NO_AUGMENTATION,
        capacity: int = 2,
    ) -> None:
        super().__init__(split, pre, train, seed, augmentation)  # type: ignore[arg-type]
        self.reader = ShardReader(split, capacity)

    def load(self, index: int) -> tuple[Image.Image, tuple[int, ...]]:
        sample = self.reader.sample(index)  # outside the try: a ShardError is fatal
        try:
            return decode_sample(sample), sample.labels or ()
        except (OSError, ValueError, SyntaxError) as error:
            where = f"{self.split.root}/{sample.name}"
            raise UnreadableSample(f"{where}: {type(error).__name__}: {error}") from None


def open_data(data: str | Path) -> dict[str, Split | ShardSplit]:
    """The train and val splits of ``--data``: a shard folder or URL (``xception shard``),
    an image folder or a CSV manifest root."""
    return open_shards(data) if is_shard_folder(data) else discover(data)


def make_dataset(
    split: Split | ShardSplit,
    pre: Preprocessing,
    train: bool,
    seed: int = 0,
    augmentation: Augmentation = NO_AUGMENTATION,
    lanes: int = 1,
    buffer: int = 0,
) -> ImageDataset:
    """The dataset of a split; a shard reader keeps the shards that ``lanes`` lanes of
    ``buffer``-sample blocks read at once (each block spans a shard or a few)."""
    if not isinstance(split, ShardSplit):
        return ImageDataset(split, pre, train, seed, augmentation)
    typical = max(1, sorted(s.samples for s in split.shards)[len(split.shards) // 2])
    capacity = lanes * (2 + buffer // typical)
    return ShardDataset(split, pre, train, seed, augmentation, capacity)


@dataclass
class Batch:
    images: torch.Tensor  # uint8 NCHW
    targets: torch.Tensor
    skipped: list[str]  # "path: error" for each unreadable file left out of this batch

    def pin_memory(self) -> Batch:
        return Batch(self.images.pin_memory(), self.targets.pin_memory(), self.skipped)


def collate(items: Sequence[tuple[torch.Tensor, torch.Tensor] | str]) -> Batch:
    good = [item for item in items if not isinstance(item, str)]
    skipped = [item for item in items if isinstance(item, str)]
    if not good:
        return Batch(torch.empty(0, 3, 1, 1, dtype=torch.uint8), torch.empty(0), skipped)
    return Batch(torch.stack([g[0] for g in good]), torch.stack([g[1] for g in good]), skipped)


class EpochSampler(Sampler[list[tuple[int, int]]]):
    """A training order of ``steps`` batches an epoch that can start mid-epoch:
    ``set_position`` skips the first batches of the epoch (mid-epoch resume)."""

    steps: int
    epoch: int = 0
    start_batch: int = 0

    def __len__(self) -> int:
        return self.steps - self.start_batch

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def cursor(self, epoch: int, batch: int) -> dict[str, object]:
        """Where the order stands before ``batch`` of ``epoch``: saved with checkpoints and
        checked on resume."""
        return {"epoch": epoch, "batch": batch}


class TrainBatchSampler(EpochSampler):
    """Seeded permutation per epoch, full global batches only, split across ranks."""

    def __init__(
        self, size: int, global_batch: int, seed: int, rank: int = 0, world: int = 1
    ) -> None:
        if global_batch % world:
            raise ValueError(f"batch size {global_batch} is not divisible by {world} processes")
        if size < global_batch:
            raise ValueError(
                f"the training split has {size} images, fewer than one batch of {global_batch}"
            )
        self.size, self.global_batch, self.seed = size, global_batch, seed
        self.rank, self.world = rank, world
        self.steps = size // global_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = torch.randperm(
            self.size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        ).tolist()
        local = self.global_batch // self.world
        for b in range(self.start_batch, self.steps):
            first = b * self.global_batch + self.rank * local
            yield [(self.epoch, i) for i in order[first : first + local]]


class StreamBatchSampler(EpochSampler):
    """The training order of a shard split: streamed shard by shard, shuffled as
    WebDataset's shard shuffle + buffer shuffle does, and still a pure function of
    (seed, epoch, lanes, position), so a resume mid-epoch is exact.

    Each epoch, the shards are put in a seeded random order and read as one stream. The
    stream is cut into ``lanes`` contiguous ranges of equal length: lane j reads its range
    sequentially, a block of ``buffer`` samples at a time, each block in a seeded random
    order. A global batch takes ``global_batch / lanes`` samples from each lane; rank r
    serves lanes ``r * lanes / world ...``, so it reads about 1/world of the shards, and a
    run on one process with the same lanes trains on the same batches. Like
    DistributedSampler with ``drop_last=True``, the last ``N % global_batch`` samples of
    each epoch's stream (fewer than one global batch, from the shard that comes last that
    epoch) sit the epoch out; every other sample is used once. Memory is a few numbers a
    shard and a block's permutation a lane: nothing grows with the number of samples.
    """

    def __init__(
        self,
        shards: ShardSplit,
        global_batch: int,
        seed: int,
        rank: int = 0,
        world: int = 1,
        lanes: int = 1,
        buffer: int = 1000,
    ) -> None:
        size = len(shards)
        if lanes % world:
            raise ValueError(
                f"the shard stream has {lanes} lanes, which {world} processes cannot share "
                "(lanes must be a multiple of the process count; see docs/scale.md)"
            )
        if global_batch % lanes:
            raise ValueError(f"batch size {global_batch} is not divisible by {lanes} lanes")
        if size < global_batch:
            raise ValueError(
                f"the training split has {size} images, fewer than one batch of {global_batch}"
            )
        self.shards = shards.shards
        self.counts = np.array([shard.samples for shard in shards.shards], dtype=np.int64)
        self.starts = np.array(shards.starts()[:-1], dtype=np.int64)
        self.seed, self.lanes, self.buffer = seed, lanes, buffer
        self.steps = size // global_batch
        self.per_lane = global_batch // lanes
        self.lane_length = self.steps * self.per_lane
        self.mine = range(rank * lanes // world, (rank + 1) * lanes // world)

    def _locate(self, epoch: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For positions of the epoch's stream: the shard each is in and the offset in it.
        Each epoch, the shards come in a seeded random order."""
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.counts))
        bounds = np.concatenate([[0], np.cumsum(self.counts[order])])
        k = np.searchsorted(bounds, positions, side="right") - 1
        return order[k], positions - bounds[k]

    def _lane_positions(self, epoch: int, lane: int, q: np.ndarray) -> np.ndarray:
        """Stream positions of a lane's samples ``q`` after its block shuffle: block
        ``q // buffer`` is permuted by a generator of (seed, epoch, lane, block)."""
        shuffled = q.copy()
        for block in np.unique(q // self.buffer):
            length = min(self.buffer, self.lane_length - block * self.buffer)
            rng = np.random.default_rng([self.seed, epoch, lane, int(block), 1])
            inside = q // self.buffer == block
            shuffled[inside] = (
                block * self.buffer + rng.permutation(length)[q[inside] % self.buffer]
            )
        return lane * self.lane_length + shuffled

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        for b in range(self.start_batch, self.steps):
            q = np.arange(b * self.per_lane, (b + 1) * self.per_lane)
            positions = np.concatenate([self._lane_positions(epoch, j, q) for j in self.mine])
            shard, offset = self._locate(epoch, positions)
            yield [(epoch, int(i)) for i in self.starts[shard] + offset]

    def cursor(self, epoch: int, batch: int) -> dict[str, object]:
        """Also where each lane reads: the shard (name and checksum: a rewritten shard is
        another data set), and the offset in it, of its block."""
        block_start = batch * self.per_lane // self.buffer * self.buffer
        positions = np.arange(self.lanes) * self.lane_length + block_start
        shards, offsets = self._locate(epoch, positions)
        lanes = [
            {
                "shard": self.shards[k].name,
                "sha256": self.shards[k].sha256,
                "offset": int(offset),
            }
            for k, offset in zip(shards, offsets, strict=True)
        ]
        return {**super().cursor(epoch, batch), "buffer": self.buffer, "lanes": lanes}


class EvalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Every sample exactly once across ranks (no padding to skew the metrics): rank r
    takes the r-th of ``world`` contiguous ranges (a shard split reads its shards in order)."""

    def __init__(self, size: int, batch: int, rank: int = 0, world: int = 1) -> None:
        if batch < 1:
            raise ValueError(f"batch size {batch} must be positive")
        self.indices = range(rank * size // world, (rank + 1) * size // world)
        self.batch = batch

    def __len__(self) -> int:
        return -(len(self.indices) // -self.batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for start in range(0, len(self.indices), self.batch):
            yield [(0, i) for i in self.indices[start : start + self.batch]]


def train_sampler(
    split: Split | ShardSplit, global_batch: int, seed: int, rank: int, world: int, **stream: int
) -> EpochSampler:
    """The training order of a split; ``stream`` (lanes, buffer) shapes a shard split's."""
    if isinstance(split, ShardSplit):
        return StreamBatchSampler(split, global_batch, seed, rank, world, **stream)
    return TrainBatchSampler(len(split), global_batch, seed, rank, world)


def make_loader(
    dataset: ImageDataset, sampler: Sampler, workers: int, pin_memory: bool
) -> DataLoader:
    """A loader whose own generator keeps it from drawing on the global RNG (which would
    shift dropout masks whenever an epoch's iterator is created, e.g. after a resume)."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator().manual_seed(0),
    )


def single_images(paths: Sequence[Path], pre: Preprocessing) -> Iterator[tuple[Path, object]]:
    """(path, image tensor or error message) for prediction on loose files."""
    for path in paths:
        try:
            yield path, eval_transform(read_rgb(path), pre)
        except (OSError, ValueError, SyntaxError) as error:
            yield path, f"{type(error).__name__}: {error}"
