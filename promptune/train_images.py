"""The training images: decoded once into a shared cache when they fit, augmented per sample on uint8 tensors.

Few-shot training sets are small, and decoding every JPEG in every epoch is what starved the GPU (issue 14). So
`training_loader` decodes the training images once, before the loader's workers start, into one flat uint8 buffer
that the workers inherit (forked: shared copy-on-write; spawned: moved into shared memory once by torch's pickler),
each image bounded by `TrainAugment.bound` (shorter side at most `cache_side(size)`, which the random crop needs).
When the bounded images need more than `cache_bytes` (`DEFAULT_CACHE_BYTES`, 2 GiB per machine, split between its
training processes), nothing is cached and each access decodes and bounds the file instead: the same pixels, so the
same results, only slower. Either way `TrainAugment.crop` makes the sample from the pixels and its own seed, and the
batch leaves the workers as uint8 pixels, normalised on the training device (`Batch.inputs`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from promptune.data import (
    EpochLoader,
    ImageItem,
    Preprocess,
    Sample,
    TrainAugment,
    UnreadableImageError,
    bounded_size,
    decode_image,
    make_loader,
    to_rgb,
    worker_init,
)

DEFAULT_CACHE_BYTES = 2 * 2**30  # decoded training images kept in memory, per machine
_FILL_BATCH = 16  # images per task of the processes that fill the cache


@dataclass
class ImageCache:
    """Bounded uint8 pixels of many images in one flat buffer (one storage: cheap to share with worker processes)."""

    buffer: torch.Tensor  # (total bytes,) uint8
    table: torch.Tensor  # (N, 3) int64: offset, height, width of each image; offset -1 when it is not cached

    def get(self, index: int) -> torch.Tensor | None:
        """Image `index` as pixels (H, W, 3), a view into the buffer, or None."""
        offset, height, width = self.table[index].tolist()
        if offset < 0:
            return None
        return self.buffer[offset:offset + height * width * 3].view(height, width, 3)


class TrainingImages(Dataset):
    """Training samples keyed by (index, augmentation seed) from `SeededBatches`; the pixels come from the cache once
    `fill_cache` has filled it, else from the file (decoded and bounded on each access)."""

    def __init__(self, items: Sequence[ImageItem], pre: Preprocess, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.items = list(items)
        self.augment = TrainAugment(pre)
        self.cache_bytes = cache_bytes
        self.cache: ImageCache | None = None

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: tuple[int, int]) -> Sample:
        index, seed = key
        item = self.items[index]
        try:
            pixels = self.pixels(index)
        except UnreadableImageError as error:
            return Sample(None, item.label, index, error.reason)
        return Sample(self.augment.crop(pixels, seed), item.label, index, None)  # uint8: normalised on the device

    def pixels(self, index: int) -> torch.Tensor:
        """Image `index` as bounded uint8 pixels (H, W, 3): from the cache if it holds them, else from the file."""
        cached = self.cache.get(index) if self.cache is not None else None
        if cached is not None:
            return cached
        item = self.items[index]
        image = decode_image(item.path) if item.image is None else to_rgb(item.image)
        with image:
            return self.augment.bound(image)

    def _cache_lengths(self) -> list[int]:
        """Each image's bytes in the cache, from the file headers alone (0 for a file that cannot be opened)."""
        needed = []
        for item in self.items:
            try:
                if item.image is not None:
                    size = item.image.size
                else:
                    with Image.open(item.path) as image:
                        size = image.size
            except Exception:  # noqa: BLE001 - unreadable: decoded (and reported) on access instead
                size = (0, 0)
            needed.append(3 * math.prod(bounded_size(*size, self.augment.side)) if min(size) > 0 else 0)
        return needed

    def fill_cache(self, workers: int = 0) -> bool:
        """Decode every image once into the cache, with `workers` processes, unless that needs more than
        `cache_bytes`; whether the images are cached. Call it before the training loader's workers start."""
        if self.cache is not None:
            return True
        lengths = self._cache_lengths()
        if sum(lengths) > self.cache_bytes:
            return False
        offsets = [0]
        for length in lengths:
            offsets.append(offsets[-1] + length)
        buffer = torch.empty(offsets[-1], dtype=torch.uint8)
        table = torch.full((len(self.items), 3), -1, dtype=torch.long)
        decoder = DataLoader(_BoundedPixels(self), batch_size=_FILL_BATCH, num_workers=workers, collate_fn=list,
                             worker_init_fn=worker_init(workers))
        for chunk in decoder:
            for index, pixels in chunk:
                if pixels is not None and pixels.numel() == lengths[index]:  # else: decoded on access, as without cache
                    buffer[offsets[index]:offsets[index + 1]] = pixels.view(-1)
                    table[index] = torch.tensor([offsets[index], pixels.shape[0], pixels.shape[1]])
        self.cache = ImageCache(buffer, table)
        return True


class _BoundedPixels(Dataset):
    """(index, bounded pixels, or None when unreadable) of each training image: what the cache is filled from."""

    def __init__(self, images: TrainingImages) -> None:
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor | None]:
        try:
            return index, self.images.pixels(index)
        except UnreadableImageError:
            return index, None


def training_loader(items: Sequence[ImageItem], pre: Preprocess, batch_size: int, seed: int, workers: int,
                    pin_memory: bool = False, rank: int = 0, world: int = 1,
                    cache_bytes: int = DEFAULT_CACHE_BYTES) -> EpochLoader:
    """The training loader: `make_loader` with shuffling over `TrainingImages`, whose cache is filled first (with the
    same `workers`) when the images fit in `cache_bytes`."""
    images = TrainingImages(items, pre, cache_bytes)
    images.fill_cache(workers)
    return make_loader(images, batch_size, shuffle=True, seed=seed, workers=workers, pin_memory=pin_memory, rank=rank,
                       world=world, normalize=images.augment.normalize)
