"""Datasets and loaders: images decoded and transformed on access, the seeded (and rank-split) batch order, batches
and the DataLoaders over them. At evaluation time the loader drops unreadable images and reports their indices.
"""

from __future__ import annotations

import functools
import hashlib
import math
import os
import signal
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from promptune.data.decode import UnreadableImageError, decode_image, to_rgb
from promptune.data.sampling import ImageItem
from promptune.data.transforms import PixelNormalize


class Sample(NamedTuple):
    image: torch.Tensor | None  # None when the file could not be decoded
    label: int
    index: int  # in the dataset
    reason: str | None  # why the file could not be decoded (None when it was)


class ImageDataset(Dataset):
    """Decodes and transforms images on access; an unreadable image yields a sample without image, with its reason."""

    def __init__(self, items: Sequence[ImageItem], transform: Callable[[Image.Image], torch.Tensor]) -> None:
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | tuple[int, int]) -> Sample:
        """`key` is an index, or (index, seed) from `SeededBatches`: the random augmentation then depends on that seed
        alone, not on which worker process decodes the image or what it decoded before."""
        index, sample_seed = key if isinstance(key, tuple) else (key, None)
        item = self.items[index]
        try:
            image = decode_image(item.path) if item.image is None else to_rgb(item.image)
        except UnreadableImageError as error:
            return Sample(None, item.label, index, error.reason)
        with image:
            if sample_seed is None:
                return Sample(self.transform(image), item.label, index, None)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(sample_seed)
                return Sample(self.transform(image), item.label, index, None)


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that is a pure function of `parts` (stable across processes and Python runs, unlike hash())."""
    digest = hashlib.sha256(":".join(str(part) for part in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class SeededBatches(Sampler[list[tuple[int, int]]]):
    """One epoch's batches of (index, augmentation seed) pairs: a pure function of (seed, epoch), and with several
    processes of (seed, epoch, rank, world).

    Each (seed, epoch) gives one shuffled order of the dataset and one augmentation seed per position. Step k covers
    the positions [k·B·W, (k+1)·B·W) of that order (B = batch_size per process, W = world), and rank r takes the
    positions r, r + W, r + 2W, ... of them. So every rank runs the same number of steps (a last batch may be smaller,
    even empty), the ranks' batches of a step together are exactly the batch of one process with batch size B·W, and
    nothing lives in a random stream: a run can stop after any step and resume there (`set_epoch(epoch, step)`)
    whatever the number of loader workers. With `set_epoch(..., last=L)` the iteration runs on through the epochs up
    to L, so that loader workers can prepare the next epoch's first batches while this one ends (`EpochLoader`).
    """

    def __init__(self, size: int, batch_size: int, seed: int, rank: int = 0, world: int = 1) -> None:
        self.size = size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world = world
        self.epoch = 0
        self.start = 0  # the step to start from
        self.last = 0  # the last epoch to iterate through (at most `epoch`: that epoch alone)

    @property
    def steps(self) -> int:
        """Steps in a whole epoch."""
        return math.ceil(self.size / (self.batch_size * self.world))

    def set_epoch(self, epoch: int, start: int = 0, last: int | None = None) -> None:
        self.epoch = epoch
        self.start = start
        self.last = epoch if last is None else last

    def __len__(self) -> int:
        """Steps left in the epoch `set_epoch` named."""
        return max(0, self.steps - self.start)

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        return self._through(self.epoch, self.start, self.last)  # fixed now: set_epoch may run while it is consumed

    def _through(self, first: int, start: int, last: int) -> Iterator[list[tuple[int, int]]]:
        yield from self._epoch(first, start)
        for epoch in range(first + 1, last + 1):
            yield from self._epoch(epoch, 0)

    def _epoch(self, epoch: int, start: int) -> Iterator[list[tuple[int, int]]]:
        generator = torch.Generator().manual_seed(derive_seed("order", self.seed, epoch))
        order = torch.randperm(self.size, generator=generator).tolist()
        seeds = torch.randint(0, 2**62, (self.size,), generator=generator).tolist()
        span = self.batch_size * self.world
        for step in range(start, self.steps):
            positions = range(step * span + self.rank, min((step + 1) * span, self.size), self.world)
            yield [(order[position], seeds[position]) for position in positions]


class EpochLoader:
    """A shuffling `DataLoader` over `SeededBatches` that yields one epoch per iteration, while its workers run on
    into the next epochs.

    A DataLoader restarted for every epoch leaves the training step waiting at each epoch's start until a worker has
    made a whole first batch, which with a few-shot set's short epochs is a large share of the time on a GPU. Here one
    stream of batches runs through the epochs (`set_epoch(epoch, start, last)`), and each iteration takes the epoch's
    batches from it; the stream restarts only when the epoch asked for is not the one it has reached (a resumed run).
    The batches are the same either way: `SeededBatches` makes them a pure function of (seed, epoch, step).
    """

    def __init__(self, loader: DataLoader) -> None:
        self.loader = loader
        self.batch_sampler: SeededBatches = loader.batch_sampler
        self._stream: Iterator[Batch] | None = None
        self._reached: tuple[int, int, int] | None = None  # (epoch, step, last) the stream is at

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[Batch]:
        batches = self.batch_sampler
        wanted = (batches.epoch, batches.start, batches.last)
        if self._stream is None or self._reached != wanted:
            self._stream = iter(self.loader)
        self._reached = None  # until the whole epoch has been taken
        for _ in range(len(batches)):
            yield next(self._stream)
        if batches.epoch < batches.last:
            self._reached = (batches.epoch + 1, 0, batches.last)


class ShardedBatches(Sampler[list[int]]):
    """Batches of B consecutive indices, every W-th of them for rank r (batches r, r + W, ...): each rank sees exactly
    the batches one process would, so its outputs are the same, and gathering them in index order gives one
    process's result. Ranks may get one batch more or less than others (nothing is padded or counted twice)."""

    def __init__(self, size: int, batch_size: int, rank: int, world: int) -> None:
        self.size = size
        self.batch_size = batch_size
        self.rank = rank
        self.world = world

    def __len__(self) -> int:
        return len(range(self.rank, math.ceil(self.size / self.batch_size), self.world))

    def __iter__(self) -> Iterator[list[int]]:
        for batch in range(self.rank, math.ceil(self.size / self.batch_size), self.world):
            yield list(range(batch * self.batch_size, min((batch + 1) * self.batch_size, self.size)))


@dataclass
class Batch:
    images: torch.Tensor  # (B, 3, S, S): the model's input, or uint8 pixels that `normalize` turns into it
    labels: torch.Tensor
    indices: torch.Tensor
    failed: list[tuple[int, str]]  # (dataset index, why it could not be decoded) of the samples left out
    normalize: PixelNormalize | None = None  # set when `images` are uint8 pixels

    def pin_memory(self) -> Batch:
        """Called by DataLoader(pin_memory=True) for custom batch types."""
        return Batch(self.images.pin_memory(), self.labels.pin_memory(), self.indices.pin_memory(), self.failed,
                     self.normalize)

    def inputs(self, device: torch.device, non_blocking: bool = False) -> torch.Tensor:
        """The images as the model's input on `device` (uint8 pixels travel as such and are normalised there)."""
        images = self.images.to(device, non_blocking=non_blocking)
        return self.normalize(images) if self.normalize is not None and images.numel() else images


def collate_skipping(samples: Sequence[Sample], normalize: PixelNormalize | None = None) -> Batch:
    """Stack the decoded samples; failed ones are dropped, their dataset indices and reasons kept in ``failed``.
    `normalize`: the samples are uint8 pixels, normalised by `Batch.inputs`."""
    decoded = [sample for sample in samples if sample.image is not None]
    failed = [(sample.index, sample.reason) for sample in samples if sample.image is None]
    if not decoded:
        empty = torch.empty(0, dtype=torch.long)
        return Batch(images=torch.empty(0), labels=empty, indices=empty.clone(), failed=failed)
    return Batch(
        images=torch.stack([sample.image for sample in decoded]),
        labels=torch.tensor([sample.label for sample in decoded], dtype=torch.long),
        indices=torch.tensor([sample.index for sample in decoded], dtype=torch.long),
        failed=failed,
        normalize=normalize,
    )


def default_workers(processes: int = 1) -> int:
    """Loader processes: this process's share of the available CPU cores (shared by `processes` on the machine) minus
    itself, at most 8."""
    if hasattr(os, "sched_getaffinity"):
        cores = len(os.sched_getaffinity(0))  # respects CPU pinning / container limits, unlike os.cpu_count()
    else:
        cores = os.cpu_count() or 1
    return max(0, min(8, cores // processes - 1))


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool,
    seed: int = 0,
    workers: int | None = None,
    pin_memory: bool = False,
    rank: int = 0,
    world: int = 1,
    normalize: PixelNormalize | None = None,
) -> DataLoader | EpochLoader:
    """Batches of `Batch`, `batch_size` images each (per process); `normalize` when the dataset gives uint8 pixels.

    With `shuffle`, an `EpochLoader`: the order and augmentation come from `SeededBatches` (see `set_epoch`), split
    over the `world` processes step by step. Without, a DataLoader of the images in order; with several processes,
    split by whole batches (`ShardedBatches`).
    """
    workers = default_workers() if workers is None else workers
    if shuffle:
        batches: Sampler | None = SeededBatches(len(dataset), batch_size, seed, rank, world)
    else:
        batches = ShardedBatches(len(dataset), batch_size, rank, world) if world > 1 else None
    loader = DataLoader(
        dataset,
        batch_size=batch_size if batches is None else 1,
        batch_sampler=batches,
        num_workers=workers,
        persistent_workers=workers > 0,
        pin_memory=pin_memory,
        collate_fn=collate_skipping if normalize is None else functools.partial(collate_skipping, normalize=normalize),
        worker_init_fn=worker_init(workers),
    )
    return EpochLoader(loader) if shuffle else loader


def set_max_image_pixels(limit: int | None) -> None:
    """--max-image-pixels: larger images are skipped as decompression bombs (None: Pillow's default, 89,478,485).

    It sets Pillow's own `PIL.Image.MAX_IMAGE_PIXELS` for this process, which Python users may set directly; loaders
    made afterwards carry it into their worker processes."""
    if limit is not None:
        Image.MAX_IMAGE_PIXELS = limit


def worker_init(workers: int) -> Callable[[int], None] | None:
    """The `worker_init_fn` of a loader with `workers` processes (None without)."""
    return functools.partial(_init_worker, Image.MAX_IMAGE_PIXELS) if workers > 0 else None


def _init_worker(max_image_pixels: int | None, _: int) -> None:
    """A loader worker decodes with the main process's pixel limit (a spawned worker would start from Pillow's
    default) and leaves Ctrl-C / SIGTERM to the main process, which stops the run cleanly and shuts it down."""
    Image.MAX_IMAGE_PIXELS = max_image_pixels
    for name in ("SIGINT", "SIGTERM"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
