"""Preprocessing: how images become tensors. `Preprocess` (stored in the prompt file), the evaluation transform, the
training augmentation (`TrainAugment`: bound, seeded random crop and flip, `PixelNormalize` on the device), and the
class name the text tower sees for a folder name.
"""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import transforms
from torchvision.transforms import v2 as transforms_v2

from promptune.errors import DataError

_INTERPOLATIONS: dict[str, transforms.InterpolationMode] = {
    "bicubic": transforms.InterpolationMode.BICUBIC,
    "bilinear": transforms.InterpolationMode.BILINEAR,
    "nearest": transforms.InterpolationMode.NEAREST,
}
TRAIN_CROP_SCALE = (0.5, 1.0)  # the random crop's share of the image area
TRAIN_CROP_RATIO = (3 / 4, 4 / 3)  # and its aspect ratio (width / height)
_CROP_TRIES = 10
_PIL_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR,
                 "nearest": Image.Resampling.NEAREST}


@dataclass(frozen=True)
class Preprocess:
    """How images become tensors; stored in the prompt file so eval/predict see exactly what training saw."""

    size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise DataError(f"preprocess size must be a positive integer, not {self.size!r}.")
        object.__setattr__(self, "mean", _three_floats("mean", self.mean))
        object.__setattr__(self, "std", _three_floats("std", self.std))
        if any(value <= 0 for value in self.std):
            raise DataError(f"preprocess std values must all be positive, not {list(self.std)}.")
        if self.interpolation not in _INTERPOLATIONS:
            raise DataError(
                f"preprocess interpolation must be one of {', '.join(_INTERPOLATIONS)}, not {self.interpolation!r}."
            )
        if not is_number(self.crop_pct) or not 0 < self.crop_pct <= 1:
            raise DataError(f"preprocess crop_pct must be in (0, 1], not {self.crop_pct!r}.")
        object.__setattr__(self, "crop_pct", float(self.crop_pct))

    def to_dict(self) -> dict[str, Any]:
        return {
            "size": self.size,
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
        }

    @classmethod
    def from_dict(cls, d: Any) -> Preprocess:
        if not isinstance(d, dict):
            raise DataError(f"preprocess settings must be a mapping, not {type(d).__name__}.")
        missing = [key for key in ("size", "mean", "std") if key not in d]
        if missing:
            raise DataError(f"preprocess settings lack {', '.join(missing)}.")
        # Keys added by later versions are ignored so that older readers still load newer files.
        return cls(
            size=d["size"],
            mean=d["mean"],
            std=d["std"],
            interpolation=d.get("interpolation", "bicubic"),
            crop_pct=d.get("crop_pct", 1.0),
        )


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _three_floats(name: str, values: Any) -> tuple[float, float, float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != 3:
        raise DataError(f"preprocess {name} must be three numbers, not {values!r}.")
    if not all(is_number(value) for value in values):
        raise DataError(f"preprocess {name} must be three numbers, not {values!r}.")
    return (float(values[0]), float(values[1]), float(values[2]))


def build_transform(pre: Preprocess, train: bool) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation transform (resize the shorter side to size / crop_pct, centre crop, normalise), or with `train`
    the training augmentation of one image (`TrainAugment`, its seed drawn from torch's global generator)."""
    if train:
        return TrainAugment(pre)
    return transforms.Compose(
        [
            transforms.Resize(int(pre.size / pre.crop_pct), interpolation=_INTERPOLATIONS[pre.interpolation]),
            transforms.CenterCrop(pre.size),
            transforms.ToTensor(),
            transforms.Normalize(mean=pre.mean, std=pre.std),
        ]
    )


def cache_side(size: int) -> int:
    """The shorter side training images are bounded to: the smallest random crop of such an image (half its area, at
    an aspect ratio of 3:4) still spans `size` pixels, so bounding never makes a crop upsampled more."""
    return math.ceil(size / math.sqrt(TRAIN_CROP_SCALE[0] * TRAIN_CROP_RATIO[0]))


def bounded_size(width: int, height: int, side: int) -> tuple[int, int]:
    """(width, height) scaled so the shorter side is at most `side`; symmetric, so a rotation keeps the pixel count."""
    shorter = min(width, height)
    if shorter <= side:
        return width, height
    scale = side / shorter
    return max(1, round(width * scale)), max(1, round(height * scale))


@dataclass(frozen=True)
class PixelNormalize:
    """uint8 pixels (..., 3, H, W) -> the model's input, (x / 255 - mean) / std, on the pixels' device.

    Training batches travel from the loader's workers as uint8 pixels and are normalised here on the device: a
    quarter of the bytes through shared memory, pinned memory and the host-to-device copy."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        scale, shift = _affine(self.mean, self.std, pixels.device)
        return torch.addcmul(shift, pixels.float(), scale)


@functools.lru_cache(maxsize=None)
def _affine(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (3, 1, 1) on `device`, made once per device: no host-to-device copy in a training step."""
    std_ = torch.tensor(std, dtype=torch.float64).view(3, 1, 1)
    scale = (1 / (255 * std_)).float().to(device)
    shift = (-torch.tensor(mean, dtype=torch.float64).view(3, 1, 1) / std_).float().to(device)
    return scale, shift


class TrainAugment:
    """The training augmentation, in three steps: `bound` an RGB image to uint8 pixels (H, W, 3) with the shorter
    side at most `cache_side(size)` (PIL, antialiased); `crop` them with one seed: a random resized crop to
    (size, size) (torch's antialiased uint8 resize) and a horizontal flip; `normalize` (`PixelNormalize`, on the
    training device).

    Every training path takes these steps, whether the bounded pixels come from the decoded-image cache
    (`promptune.train_images`) or from the file in every epoch, so results do not depend on whether the cache fit.
    The crop follows torchvision's `RandomResizedCrop` (scale 0.5-1 of the area, aspect ratio 3:4-4:3 log-uniform,
    ten tries, then the largest centred crop within those ratios); promptune 0.1.0 ran that and the flip in PIL on the
    full-size image, so its augmented pixels differ slightly from these.
    """

    def __init__(self, pre: Preprocess) -> None:
        self.size = pre.size
        self.side = cache_side(pre.size)
        self.resample = _PIL_RESAMPLE[pre.interpolation]
        self.interpolation = _INTERPOLATIONS[pre.interpolation]
        self.normalize = PixelNormalize(pre.mean, pre.std)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """One image's training view (3, size, size), normalised; its seed drawn from torch's global generator."""
        return self.normalize(self.crop(self.bound(image), int(torch.randint(0, 2**62, ()))))

    def bound(self, image: Image.Image) -> torch.Tensor:
        """`image` (RGB) as uint8 pixels (H, W, 3), downscaled so that its shorter side is at most `self.side`."""
        size = bounded_size(*image.size, self.side)
        if size != image.size:
            image = image.resize(size, resample=self.resample)
        return torch.from_numpy(np.array(image))  # (H, W, 3)

    def crop(self, pixels: torch.Tensor, seed: int) -> torch.Tensor:
        """Bounded uint8 pixels (H, W, 3) -> the uint8 training view (3, size, size); a pure function of both."""
        rng = random.Random(seed)
        top, left, height, width = crop_box(pixels.shape[0], pixels.shape[1], rng)
        channels_first = pixels.permute(2, 0, 1)  # (3, H, W), channels-last in memory: torch's fast uint8 resize
        crop = transforms_v2.functional.resized_crop(channels_first, top, left, height, width, [self.size, self.size],
                                                     interpolation=self.interpolation, antialias=True)  # (3, S, S)
        return crop.flip(-1) if rng.random() < 0.5 else crop


def crop_box(height: int, width: int, rng: random.Random) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop of 50-100% of the area at an aspect ratio of 3:4 to 4:3; after ten
    failed tries, the largest centred crop within those ratios."""
    area = height * width
    low, high = math.log(TRAIN_CROP_RATIO[0]), math.log(TRAIN_CROP_RATIO[1])
    for _ in range(_CROP_TRIES):
        target = area * rng.uniform(*TRAIN_CROP_SCALE)
        aspect = math.exp(rng.uniform(low, high))
        crop_width, crop_height = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < crop_width <= width and 0 < crop_height <= height:
            return rng.randint(0, height - crop_height), rng.randint(0, width - crop_width), crop_height, crop_width
    crop_width, crop_height = width, height
    if width / height < TRAIN_CROP_RATIO[0]:
        crop_height = round(width / TRAIN_CROP_RATIO[0])
    elif width / height > TRAIN_CROP_RATIO[1]:
        crop_width = round(height * TRAIN_CROP_RATIO[1])
    return (height - crop_height) // 2, (width - crop_width) // 2, crop_height, crop_width


def prompt_name(folder_name: str) -> str:
    """The class name the text tower sees: "golden_retriever" and "golden-retriever" both become "golden retriever"."""
    return " ".join(folder_name.replace("_", " ").replace("-", " ").split())
