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

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from xception.data.augment import NO_AUGMENTATION, Augmentation
from xception.data.folder import Split, read_rgb
from xception.data.transforms import (
    Preprocessing,
    eval_transform,
    sample_generator,
    train_transform,
)


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

    def __len__(self) -> int:
        return len(self.split)

    def target(self, index: int) -> torch.Tensor:
        labels = self.split.labels[index]
        if not self.split.multi_label:
            return torch.tensor(labels[0])
        target = torch.zeros(len(self.split.classes))
        target[list(labels)] = 1.0
        return target

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor] | str:
        epoch, index = key
        path = self.split.root / self.split.paths[index]
        try:
            image = read_rgb(path)
        except (OSError, ValueError, SyntaxError) as error:
            return f"{path}: {type(error).__name__}: {error}"
        if self.train:
            generator = sample_generator(self.seed, epoch, index)
            tensor = train_transform(image, self.pre, generator, self.augmentation)
        else:
            tensor = eval_transform(image, self.pre)
        return tensor, self.target(index)


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


class TrainBatchSampler(Sampler[list[tuple[int, int]]]):
    """Seeded permutation per epoch, full global batches only, split across ranks.

    ``start_batch`` skips the first batches of the current epoch (mid-epoch resume).
    """

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
        self.epoch, self.start_batch = 0, 0

    def __len__(self) -> int:
        return self.size // self.global_batch - self.start_batch

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = torch.randperm(
            self.size, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        ).tolist()
        local = self.global_batch // self.world
        for b in range(self.start_batch, self.size // self.global_batch):
            first = b * self.global_batch + self.rank * local
            yield [(self.epoch, i) for i in order[first : first + local]]


class EvalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Every sample exactly once across ranks (no padding to skew the metrics)."""

    def __init__(self, size: int, batch: int, rank: int = 0, world: int = 1) -> None:
        if batch < 1:
            raise ValueError(f"batch size {batch} must be positive")
        self.indices = list(range(rank, size, world))
        self.batch = batch

    def __len__(self) -> int:
        return -(len(self.indices) // -self.batch)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for start in range(0, len(self.indices), self.batch):
            yield [(0, i) for i in self.indices[start : start + self.batch]]


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
