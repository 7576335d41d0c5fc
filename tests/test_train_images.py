"""The training images: the bounded uint8 pixels, the tensor augmentation, the decoded-image cache, the epoch stream."""

from __future__ import annotations

import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from promptune.data import (
    TRAIN_CROP_RATIO,
    TRAIN_CROP_SCALE,
    EpochLoader,
    ImageItem,
    Preprocess,
    SeededBatches,
    TrainAugment,
    build_transform,
    cache_side,
    crop_box,
    make_loader,
)
from promptune.train_images import TrainingImages, training_loader

PRE = Preprocess(size=24, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3), interpolation="bicubic")


def noise_file(path: Path, size: tuple[int, int], seed: int) -> Path:
    generator = torch.Generator().manual_seed(seed)
    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=generator)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels.numpy()).save(path)
    return path


@pytest.fixture
def items(tmp_path: Path) -> list[ImageItem]:
    """Six PNGs of several shapes: two smaller than the cache side, four larger (one very wide)."""
    sizes = [(30, 20), (20, 36), (90, 60), (60, 120), (400, 41), (77, 77)]
    return [ImageItem(noise_file(tmp_path / "images" / f"{i}.png", size, seed=i), i % 2) for i, size in enumerate(sizes)]


def samples(images: TrainingImages, keys: list[tuple[int, int]]) -> list[torch.Tensor]:
    return [images[key].image for key in keys]


# ------------------------------------------------------------------------------------------------ the augmentation


def test_cache_side_lets_the_smallest_crop_span_the_input_size() -> None:
    for size in (24, 224, 336, 384):
        side = cache_side(size)
        smallest = side * math.sqrt(TRAIN_CROP_SCALE[0] * TRAIN_CROP_RATIO[0])  # of a square image: the worst case
        assert size <= smallest < size + 1


@pytest.mark.parametrize("height, width", [(20, 30), (36, 20), (30, 32), (224, 224), (41, 400), (400, 41), (1, 1), (3, 200)])
def test_crop_boxes_lie_inside_the_image_with_the_documented_area_and_ratio(height: int, width: int) -> None:
    rng = random.Random(0)
    for _ in range(200):
        top, left, crop_height, crop_width = crop_box(height, width, rng)
        assert 0 <= top and top + crop_height <= height and 0 <= left and left + crop_width <= width
        assert crop_height >= 1 and crop_width >= 1
        if max(height, width) / min(height, width) < 1.2 and min(height, width) >= 20:  # crops fit: the sampled ones
            assert 0.45 <= crop_height * crop_width / (height * width) <= 1.0
            assert 0.7 <= crop_width / crop_height <= 1.4


def test_the_fallback_crop_is_centred_at_the_nearest_allowed_ratio() -> None:
    # A 41 x 400 strip: no crop of half its area fits at 3:4-4:3, so the largest centred 4:3 crop is taken.
    assert crop_box(41, 400, random.Random(0)) == (0, (400 - 55) // 2, 41, 55)
    assert crop_box(400, 41, random.Random(0)) == ((400 - 55) // 2, 0, 55, 41)


def test_bounding_scales_only_images_larger_than_the_cache_side() -> None:
    augment = TrainAugment(PRE)
    side = cache_side(PRE.size)
    small = Image.new("RGB", (side + 9, side), (10, 20, 30))
    assert augment.bound(small).shape == (side, side + 9, 3)
    large = Image.new("RGB", (4 * side, 2 * side), (10, 20, 30))
    pixels = augment.bound(large)
    assert pixels.shape == (side, 2 * side, 3) and pixels.dtype == torch.uint8
    assert pixels[0, 0].tolist() == [10, 20, 30]


def test_crop_is_a_pure_function_of_pixels_and_seed() -> None:
    augment = TrainAugment(PRE)
    pixels = torch.randint(0, 256, (40, 50, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    first = augment.crop(pixels, seed=7)
    assert first.shape == (3, PRE.size, PRE.size) and first.dtype == torch.uint8
    assert torch.equal(first, augment.crop(pixels, seed=7))
    assert not torch.equal(first, augment.crop(pixels, seed=8))
    torch.manual_seed(0)
    assert torch.equal(first, augment.crop(pixels, seed=7))  # torch's global generator plays no part


def test_a_crop_of_the_whole_image_at_its_size_keeps_the_pixels() -> None:
    augment = TrainAugment(PRE)
    pixels = torch.randint(0, 256, (PRE.size, PRE.size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    for seed in range(300):  # some seed draws the whole square image (scale 1, ratio 1) unflipped
        rng = random.Random(seed)
        if crop_box(PRE.size, PRE.size, rng) == (0, 0, PRE.size, PRE.size) and rng.random() >= 0.5:
            assert torch.equal(augment.crop(pixels, seed), pixels.permute(2, 0, 1))
            return
    pytest.skip("no seed drew the whole image")


def test_normalize_uses_the_preprocess_mean_and_std() -> None:
    pixels = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    out = TrainAugment(PRE).normalize(pixels)
    mean, std = torch.tensor(PRE.mean).view(3, 1, 1), torch.tensor(PRE.std).view(3, 1, 1)
    assert out.dtype == torch.float32 and torch.allclose(out, (pixels / 255 - mean) / std, atol=1e-5)


def test_flips_happen_about_half_the_time_and_mirror_the_crop() -> None:
    augment = TrainAugment(PRE)
    ramp = torch.arange(24, dtype=torch.uint8).mul(10).view(1, 24, 1).expand(24, 24, 3).contiguous()  # grows left to right
    rising = sum(bool(augment.crop(ramp, seed)[0, 0, -1] > augment.crop(ramp, seed)[0, 0, 0]) for seed in range(200))
    assert 60 < rising < 140


def test_the_pil_training_transform_gives_square_normalised_tensors() -> None:
    tensor = build_transform(PRE, train=True)(Image.new("RGB", (37, 23), (200, 10, 90)))
    assert tensor.shape == (3, PRE.size, PRE.size) and tensor.dtype == torch.float32


# ------------------------------------------------------------------------------------------------------- the cache


@pytest.mark.parametrize("workers", [0, 1])
def test_cached_and_uncached_samples_are_identical(items: list[ImageItem], workers: int) -> None:
    cached, uncached = TrainingImages(items, PRE), TrainingImages(items, PRE, cache_bytes=0)
    assert cached.fill_cache(workers) and not uncached.fill_cache(workers)
    assert cached.cache is not None and uncached.cache is None
    assert (cached.cache.table[:, 0] >= 0).all()
    keys = [(index, seed) for index in range(len(items)) for seed in (0, 1, 2**61 + 5)]
    for with_cache, without in zip(samples(cached, keys), samples(uncached, keys)):
        assert torch.equal(with_cache, without)


def test_the_cache_holds_bounded_pixels_and_falls_back_when_over_budget(items: list[ImageItem]) -> None:
    side = cache_side(PRE.size)
    images = TrainingImages(items, PRE)
    assert images.fill_cache()
    needed = images.cache.buffer.numel()
    for index, item in enumerate(items):
        with Image.open(item.path) as image:
            width, height = image.size
        pixels = images.cache.get(index)
        assert min(pixels.shape[:2]) == min(height, width, side)
        assert pixels.shape[0] / pixels.shape[1] == pytest.approx(height / width, rel=0.05)
    assert TrainingImages(items, PRE, cache_bytes=needed).fill_cache()
    assert not TrainingImages(items, PRE, cache_bytes=needed - 1).fill_cache()


def test_workers_read_the_cache_not_the_files(items: list[ImageItem], tmp_path: Path) -> None:
    images = TrainingImages(items, PRE)
    images.fill_cache(workers=1)
    shutil.rmtree(tmp_path / "images")  # from now on only the cache can give these pixels
    loader = make_loader(images, batch_size=4, shuffle=True, seed=0, workers=1)
    keys = [key for batch in SeededBatches(len(items), 4, seed=0) for key in batch]
    produced = [(batch.indices.tolist(), batch.images, batch.failed) for batch in loader]
    assert all(not failed for _, _, failed in produced)
    assert [index for indices, _, _ in produced for index in indices] == [index for index, _ in keys]
    worker_images = torch.cat([images_ for _, images_, _ in produced])
    assert torch.equal(worker_images, torch.stack(samples(images, keys)))  # the worker's samples are this process's
    assert TrainingImages(items, PRE)[(0, 5)].reason == "file not found"


def test_an_image_unreadable_when_caching_is_reported_by_the_loader(items: list[ImageItem]) -> None:
    items[2].path.write_bytes(b"no longer an image")
    images = TrainingImages(items, PRE)
    assert images.fill_cache()
    assert images.cache.table[2, 0] == -1 and (images.cache.table[[0, 1, 3, 4, 5], 0] >= 0).all()
    batches = list(make_loader(images, batch_size=6, shuffle=True, seed=0, workers=0))
    assert [index for batch in batches for index, _ in batch.failed] == [2]
    assert sum(batch.labels.numel() for batch in batches) == 5


# ---------------------------------------------------------------------------------------------- the epoch stream


def epoch_batches(loader: EpochLoader, epoch: int, start: int = 0, last: int | None = None) -> list[list[int]]:
    loader.batch_sampler.set_epoch(epoch, start, last)
    return [batch.indices.tolist() for batch in loader]


@pytest.mark.parametrize("workers", [0, 2])
def test_the_stream_through_epochs_gives_each_epochs_own_batches(items: list[ImageItem], workers: int) -> None:
    streamed = training_loader(items, PRE, batch_size=4, seed=3, workers=workers)
    fresh = TrainingImages(items, PRE)
    expected = {}
    for epoch in (1, 2, 3):
        sampler = SeededBatches(len(items), 4, seed=3)
        sampler.set_epoch(epoch)
        expected[epoch] = [[index for index, _ in batch] for batch in sampler]
    assert [epoch_batches(streamed, epoch, last=3) for epoch in (1, 2, 3)] == [expected[1], expected[2], expected[3]]
    # A resumed run asks for an epoch the stream has not reached: it restarts there.
    assert epoch_batches(streamed, 2, start=1, last=3) == expected[2][1:]
    assert epoch_batches(streamed, 3, last=3) == expected[3]
    images = [batch.images for batch in make_loader(fresh, batch_size=4, shuffle=True, seed=3, workers=0)]
    streamed.batch_sampler.set_epoch(0)
    assert all(torch.equal(a, b.images) for a, b in zip(images, streamed))


def test_a_sampler_snapshot_ignores_set_epoch_while_it_runs() -> None:
    sampler = SeededBatches(6, 2, seed=1)
    sampler.set_epoch(1, last=2)
    stream = iter(sampler)
    first = [next(stream) for _ in range(3)]
    sampler.set_epoch(2, last=2)  # what the trainer does at the next epoch, while workers are still ahead
    rest = list(stream)
    again = SeededBatches(6, 2, seed=1)
    again.set_epoch(2)
    assert rest == list(again) and first != rest


def test_training_batches_travel_as_uint8_and_are_normalised_on_the_device(items: list[ImageItem]) -> None:
    loader = training_loader(items, PRE, batch_size=3, seed=0, workers=0)
    batch = next(iter(loader))
    assert batch.images.dtype == torch.uint8 and batch.images.shape == (3, 3, PRE.size, PRE.size)
    inputs = batch.inputs(torch.device("cpu"))
    assert inputs.dtype == torch.float32 and torch.equal(inputs, TrainAugment(PRE).normalize(batch.images))
