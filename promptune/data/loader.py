"""Image folders in, tensors out: class discovery, k-shot sampling, splits, robust decoding, transforms, loaders.

A data folder holds one sub-folder per class (``DATA_DIR/<class>/**/*.jpg``), optionally split into
``DATA_DIR/train|val|test/<class>/...``. Unreadable images never stop a run: while choosing the training images
they are decoded, skipped and reported; at evaluation time the loader drops them and reports their indices.
"""

from __future__ import annotations

import errno
import functools
import glob
import hashlib
import math
import os
import random
import re
import signal
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import transforms
from torchvision.transforms import v2 as transforms_v2

from promptune.errors import DataError, PromptuneError
from promptune.fileio import is_marked

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})

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
_MAX_SHOT_VAL_IMAGES = 4  # validation images per class when sampling k shots without a val/ folder
_SPLIT_NAMES = ("train", "val", "test")
_HIGH_BIT_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_WHITE = (255, 255, 255)


# --------------------------------------------------------------------------------------------------- preprocessing


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
        if not _is_number(self.crop_pct) or not 0 < self.crop_pct <= 1:
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


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _three_floats(name: str, values: Any) -> tuple[float, float, float]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or len(values) != 3:
        raise DataError(f"preprocess {name} must be three numbers, not {values!r}.")
    if not all(_is_number(value) for value in values):
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


# -------------------------------------------------------------------------------------------------------- decoding


class UnreadableImageError(DataError):
    """An image file cannot be decoded; ``reason`` says why in a few words."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"cannot read image {path}: {reason}.")
        self.path = Path(path)
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.path, self.reason))


def decode_image(path: Path) -> Image.Image:
    """Fully decode ``path`` into an RGB image with EXIF orientation applied, or raise UnreadableImageError."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise UnreadableImageError(path, "empty file (0 bytes)")
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; an oversized image must never be decoded.
        # (Changing warning filters is process-wide: fine here, decoding runs in one thread per process.)
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as opened:
                _refuse_oversized(path, opened)
                opened.load()
                image = _apply_exif_orientation(opened)
                return to_rgb(image)
    except UnreadableImageError:
        raise
    except Exception as error:  # noqa: BLE001 - any decoder failure means "skip this file", never a crash
        raise UnreadableImageError(path, _reason(error)) from error


def _refuse_oversized(path: Path, image: Image.Image) -> None:
    limit = Image.MAX_IMAGE_PIXELS
    width, height = image.size
    if limit is not None and width * height > limit:
        raise UnreadableImageError(path, _bomb_reason(width, height, limit))


def _bomb_reason(width: int, height: int, limit: int) -> str:
    return f"{width}x{height} pixels is over the decompression-bomb limit of {limit} pixels; --max-image-pixels raises it"


def _reason(error: Exception) -> str:
    if isinstance(error, (Image.DecompressionBombError, Image.DecompressionBombWarning)):
        # Pillow refuses on open, from the header alone: "Image size (N pixels) exceeds limit of ... pixels, ..."
        found = re.search(r"\((\d+) pixels\)", str(error))
        size = f"{found.group(1)} pixels" if found else "the image size"
        return (f"{size} is over the decompression-bomb limit of {Image.MAX_IMAGE_PIXELS} pixels; "
                f"--max-image-pixels raises it")
    if isinstance(error, FileNotFoundError):
        return "file not found"
    if isinstance(error, PermissionError):
        return "permission denied"
    if isinstance(error, IsADirectoryError):
        return "it is a folder, not a file"
    if isinstance(error, UnidentifiedImageError):
        return "not a recognised image format"
    if isinstance(error, MemoryError):
        return "not enough memory to decode it"
    message = str(error).strip().splitlines()[0].rstrip(".") if str(error).strip() else ""
    if "truncated" in message.lower():
        return "truncated image data"
    detail = f"{type(error).__name__}: {message}" if message else type(error).__name__
    return f"corrupt image data ({detail})"


def _apply_exif_orientation(image: Image.Image) -> Image.Image:
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block should not make an otherwise fine image unreadable
        return image


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _HIGH_BIT_MODES:
        return _high_bit_to_8bit(image).convert("RGB")
    if "A" in image.getbands() or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _WHITE + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _high_bit_to_8bit(image: Image.Image) -> Image.Image:
    """Map 16/32-bit integer or float pixels onto 0..255 (Pillow's own conversion clips everything above 255)."""
    as_float = image.convert("F")
    low, high = as_float.getextrema()
    if not (math.isfinite(low) and math.isfinite(high)):
        raise ValueError("float image holds non-finite values")
    # Prefer the value range the data was most likely stored in, so a dark 16-bit image stays dark; only data
    # outside every standard range is stretched to its own minimum and maximum.
    if low >= 0 and high <= 1 and image.mode == "F":
        offset, span = 0.0, 1.0
    elif low >= 0 and high <= 255 and not image.mode.startswith("I;16"):
        offset, span = 0.0, 255.0
    elif low >= 0 and high <= 65535:
        offset, span = 0.0, 65535.0
    else:
        offset, span = low, max(high - low, 1e-12)
    scale = 255.0 / span
    # +0.5 because the F -> L conversion truncates.
    return as_float.point(lambda value: value * scale + (0.5 - offset * scale)).convert("L")


# ------------------------------------------------------------------------------------------------------- discovery


def _has_image_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _is_hidden(name: str) -> bool:
    return name.startswith(".")


def images_under(folder: Path) -> list[Path]:
    """Image files anywhere below ``folder`` (hidden entries and promptune's own folders skipped), sorted; symlinked
    folders are followed once."""
    found: list[Path] = []
    visited: set[tuple[int, int]] = set()
    pending = [folder]
    while pending:
        directory = pending.pop()
        try:
            identity = directory.stat()
        except OSError:
            continue
        key = (identity.st_dev, identity.st_ino)
        if key in visited:  # a symlink cycle, or the same folder reached twice
            continue
        visited.add(key)
        try:
            entries = list(os.scandir(directory))
        except OSError:
            if directory == folder:
                raise
            continue
        for entry in entries:
            if _is_hidden(entry.name):
                continue
            try:
                if entry.is_dir():
                    if not is_marked(entry.path):  # e.g. an eval --report folder inside a class folder
                        pending.append(Path(entry.path))
                elif entry.is_file() and _has_image_extension(entry.name):
                    found.append(Path(entry.path))
            except OSError:  # e.g. a symlink into a folder we may not read
                continue
    return sorted(found)


UPSCALE_WARNING = 8  # training images upscaled more than this many times (1x1 px, say) are worth a warning


def small_image_note(paths: Sequence[Path], size: int) -> str | None:
    """One warning when images are much smaller than the backbone's input `size` (their shorter side under
    size / UPSCALE_WARNING pixels), or None. Reads the image headers only."""
    limit = size / UPSCALE_WARNING
    small = 0
    for path in paths:
        try:
            with Image.open(path) as image:
                small += min(image.size) < limit
        except Exception:  # noqa: BLE001 - unreadable files were skipped (and reported) when the images were chosen
            continue
    if not small:
        return None
    return (f"{small} of the {len(paths)} training images are under {limit:g} px on their shorter side, while the "
            f"backbone sees {size} px: they are upscaled more than {UPSCALE_WARNING}x, which leaves little to learn from.")


def _check_is_folder(root: Path, what: str) -> None:
    if not root.exists():
        if root.is_symlink():
            try:
                os.stat(root)
            except OSError as error:
                if error.errno == errno.ELOOP:
                    raise DataError(f"{what} {root} is a symbolic link that loops back on itself.") from None
            raise DataError(f"{what} {root} is a symbolic link to something that does not exist.")
        raise DataError(f"{what} {root} does not exist.")
    if not root.is_dir():
        raise DataError(f"{what} {root} is a file, not a folder of class sub-folders.")


def _class_folders(root: Path) -> list[Path]:
    """Non-hidden sub-folders of ``root`` that promptune did not make (checkpoint, report), sorted by name."""
    try:
        entries = list(os.scandir(root))
    except OSError as error:
        raise DataError(f"cannot read folder {root} ({error.strerror or type(error).__name__}).") from error
    folders = []
    for entry in entries:
        try:
            if not _is_hidden(entry.name) and entry.is_dir() and not is_marked(entry.path):
                folders.append(Path(entry.path))
        except OSError:
            continue
    return sorted(folders, key=lambda folder: folder.name)


def _class_images(folder: Path) -> list[Path]:
    try:
        return images_under(folder)
    except OSError as error:
        raise DataError(f"cannot read class folder {folder} ({error.strerror or type(error).__name__}).") from error


def scan_classes(root: Path) -> dict[str, list[Path]]:
    """Map each class folder name (sorted) to its image files (sorted), checking the folder is usable."""
    root = Path(root)
    _check_is_folder(root, "data folder")
    folders = _class_folders(root)
    if len(folders) < 2:
        raise DataError(
            f"found {len(folders)} class folder(s) in {root}; need at least 2 (one sub-folder of images per class)."
        )
    _check_distinct_prompt_names([folder.name for folder in folders])
    classes: dict[str, list[Path]] = {}
    for folder in folders:
        images = _class_images(folder)
        if not images:
            extensions = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise DataError(f"class folder {folder} has no image files ({extensions}).")
        classes[folder.name] = images
    return classes


def _check_distinct_prompt_names(folder_names: Sequence[str]) -> None:
    for name in folder_names:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes in the folder name arrive as lone surrogates
            shown = os.fsencode(name).decode("utf-8", "backslashreplace")
            raise DataError(f"class folder '{shown}' has a name that is not valid UTF-8; rename it.") from None
        if not prompt_name(name):
            raise DataError(f"class folder '{name}' has no usable class name; rename it to include letters or digits.")
    check_distinct_class_names(folder_names)


def check_distinct_class_names(names: Sequence[str], what: str = "class folders", fix: str = "rename one",
                               error: type[PromptuneError] = DataError) -> None:
    """Refuse two names that become one class name for the text tower: `golden_retriever` / `golden retriever`, or
    `Cat` / `cat` (compared without case, as CLIP's tokenizer lowercases its input)."""
    owner_of: dict[str, str] = {}
    for name in names:
        key = prompt_name(name).casefold()
        if key in owner_of:
            raise error(f"{what} '{owner_of[key]}' and '{name}' both become the class name '{key}'; {fix}.")
        owner_of[key] = name


def find_layout(data_dir: Path) -> dict[str, Path]:
    """{"train", "val"?, "test"?} for a split folder (one with a train/ sub-folder), else {"all": data_dir}."""
    data_dir = Path(data_dir)
    if not (data_dir / "train").is_dir():
        return {"all": data_dir}
    return {name: data_dir / name for name in _SPLIT_NAMES if (data_dir / name).is_dir()}


def class_folders_of(data_dir: Path) -> list[Path]:
    """The class folders `tune` and `eval` would read in `data_dir` (of every split), without reading any image."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        return []
    folders: list[Path] = []
    for root in find_layout(data_dir).values():
        try:
            folders.extend(_class_folders(root))
        except DataError:
            continue
    return folders


def _layout_name(layout: dict[str, Path]) -> str:
    return "split" if "train" in layout else "flat"


# -------------------------------------------------------------------------------------------------------- sampling


@dataclass(frozen=True)
class ImageItem:
    path: Path  # the image file; for an in-memory image (`image` set), a label such as "<image 0>"
    label: int
    image: Image.Image | None = field(default=None, compare=False)  # a PIL image to use instead of reading `path`


@dataclass
class SkippedFile:
    path: Path
    reason: str


@dataclass
class TrainingData:
    class_names: list[str]
    train: list[ImageItem]
    val: list[ImageItem]
    skipped: list[SkippedFile]
    layout: str
    warnings: list[str] = field(default_factory=list)  # e.g. classes with fewer readable images than --shots


@dataclass
class EvalData:
    class_names: list[str]
    items: list[ImageItem]
    layout: str
    root: Path  # the folder whose class sub-folders were read
    split: str  # which images these are: "test" (test/), "val" (val/, no test/) or "all" (the whole folder)


@dataclass
class _ClassPick:
    train: list[Path] = field(default_factory=list)
    val: list[Path] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)


def load_training_data(
    data_dir: Path,
    shots: int | None = None,
    seed: int = 0,
    val_fraction: float = 0.2,
    base_classes: int | float | None = None,
) -> TrainingData:
    """Choose the training (and validation) images, decoding each candidate so unreadable files are skipped early."""
    if shots is not None and (isinstance(shots, bool) or not isinstance(shots, int) or shots < 1):
        raise DataError("--shots must be at least 1.")
    if not _is_number(val_fraction) or not 0 <= val_fraction < 1:
        raise DataError(f"the validation fraction must be in [0, 1), not {val_fraction!r}.")
    data_dir = Path(data_dir)
    _check_is_folder(data_dir, "data folder")
    layout = find_layout(data_dir)
    train_root = layout.get("train", layout.get("all", data_dir))
    all_classes = scan_classes(train_root)
    class_names = _keep_base_classes(sorted(all_classes), base_classes, train_root)
    val_images = _val_folder_images(layout["val"], all_classes, class_names) if "val" in layout else None

    train: list[ImageItem] = []
    val: list[ImageItem] = []
    skipped: list[SkippedFile] = []
    short: dict[str, int] = {}  # classes with fewer readable images than --shots
    for label, name in enumerate(class_names):
        rng = random.Random(f"{seed}:{name}")  # per-class seed: adding a class leaves the others' picks alone
        pick = _pick_class(all_classes[name], rng, shots, val_fraction, with_val=val_images is None)
        if not pick.train:
            raise DataError(f"class '{name}' has no readable images ({len(pick.skipped)} skipped).")
        if shots is not None and len(pick.train) < shots:
            short[name] = len(pick.train)
        if val_images is not None:
            readable, unreadable = _readable(val_images[name])
            pick.val, pick.skipped = readable, pick.skipped + unreadable
        skipped.extend(pick.skipped)
        train.extend(ImageItem(path, label) for path in sorted(pick.train))
        val.extend(ImageItem(path, label) for path in sorted(pick.val))
    return TrainingData(class_names, train, val, skipped, _layout_name(layout), _short_class_notes(short, shots))


def _short_class_notes(short: dict[str, int], shots: int | None) -> list[str]:
    """One warning, however many classes are short (a folder of 10-image classes with the default 16 shots)."""
    if not short:
        return []
    if len(short) == 1:
        (name, count), = short.items()
        return [f"class '{name}' has {count} readable images, fewer than --shots {shots}; training on all {count}."]
    smallest = min(short, key=short.get)
    return [
        f"{len(short)} classes have fewer readable images than --shots {shots} (fewest: '{smallest}' with "
        f"{short[smallest]}); training on all of their images."
    ]


def _keep_base_classes(names: list[str], base_classes: int | float | None, root: Path) -> list[str]:
    if base_classes is None:
        return names
    if isinstance(base_classes, bool) or not _is_number(base_classes):
        raise DataError(f"base classes must be a whole number or a fraction, not {base_classes!r}.")
    if isinstance(base_classes, int):
        if not 2 <= base_classes <= len(names):
            raise DataError(
                f"base classes must be between 2 and the {len(names)} classes in {root}, not {base_classes}."
            )
        return names[:base_classes]
    if not 0 < base_classes < 1:
        raise DataError(f"a base-class fraction must be between 0 and 1 (exclusive), not {base_classes}.")
    return names[: max(2, math.ceil(base_classes * len(names)))]


def _val_folder_images(
    val_root: Path, train_classes: dict[str, list[Path]], kept: list[str]
) -> dict[str, list[Path]]:
    folders = _class_folders(val_root)
    unknown = [folder.name for folder in folders if folder.name not in train_classes]
    if unknown:
        names = ", ".join(f"'{name}'" for name in unknown)
        raise DataError(f"{val_root} has class folder(s) {names} that the train folder does not have.")
    by_name = {folder.name: folder for folder in folders}
    return {name: _class_images(by_name[name]) if name in by_name else [] for name in kept}


def _readable(paths: Sequence[Path]) -> tuple[list[Path], list[SkippedFile]]:
    readable: list[Path] = []
    unreadable: list[SkippedFile] = []
    for path in paths:
        skip = _verify(path)
        if skip is None:
            readable.append(path)
        else:
            unreadable.append(skip)
    return readable, unreadable


def _verify(path: Path) -> SkippedFile | None:
    try:
        decode_image(path).close()
    except UnreadableImageError as error:
        return SkippedFile(path, error.reason)
    return None


def _pick_class(
    paths: Sequence[Path], rng: random.Random, shots: int | None, val_fraction: float, with_val: bool = True
) -> _ClassPick:
    order = list(paths)
    rng.shuffle(order)
    if shots is None:
        # Every image is a candidate, so decode all of them first: the held-out count depends on how many are valid.
        readable, unreadable = _readable(order)
        held_out = _held_out_count(len(readable), val_fraction) if with_val else 0
        return _ClassPick(train=readable[held_out:], val=readable[:held_out], skipped=unreadable)
    wanted_val = min(shots, _MAX_SHOT_VAL_IMAGES) if with_val else 0
    pick = _ClassPick()
    for path in order:
        if len(pick.train) == shots and len(pick.val) == wanted_val:
            break
        skip = _verify(path)
        if skip is not None:
            pick.skipped.append(skip)
        elif len(pick.train) < shots:
            pick.train.append(path)
        else:
            pick.val.append(path)
    return pick


def _held_out_count(n_valid: int, val_fraction: float) -> int:
    if n_valid < 2 or val_fraction == 0:
        return 0
    return min(max(1, round(val_fraction * n_valid)), n_valid - 1)


SPLIT_LABELS = {"test": "test/", "val": "val/ (no test/)", "all": "the whole folder"}  # EvalData.split, for people


def load_eval_data(data_dir: Path) -> EvalData:
    """The images to evaluate on: test/ of a split folder, else val/, else the whole folder (decoded lazily)."""
    data_dir = Path(data_dir)
    _check_is_folder(data_dir, "data folder")
    layout = find_layout(data_dir)
    if "train" in layout:
        split = "test" if "test" in layout else "val"
        if split not in layout:
            raise DataError(
                f"{data_dir} has a train folder but no test or val folder to evaluate on; "
                "pass the train folder itself to evaluate on the training images."
            )
    else:
        split = "all"
    root = layout.get(split, data_dir)
    classes = scan_classes(root)
    items = [ImageItem(path, label) for label, name in enumerate(classes) for path in classes[name]]
    return EvalData(list(classes), items, _layout_name(layout), root, split)


# ------------------------------------------------------------------------------------------------ dataset, loader


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


# --------------------------------------------------------------------------------------------------------- predict


def prediction_items(inputs: Any) -> tuple[list[ImageItem], list[str]]:
    """`predict`'s inputs as images to classify, in input order, and one sentence per input that gave no image.

    `inputs` is one input or a list or tuple of them: a path (str or os.PathLike) of an image file, a folder (its
    images, recursively) or a glob pattern; a PIL image; or an image tensor (see `tensor_images`). A file found twice
    is classified once. Anything else is a `DataError` naming its type.
    """
    items: list[ImageItem] = []
    problems: list[str] = []
    seen: set[Path] = set()
    for source in _each_input(inputs):
        if isinstance(source, Image.Image):
            items.append(ImageItem(Path(f"<image {sum(item.image is not None for item in items)}>"), 0, source))
            continue
        matches = _expand_argument(source)
        if not matches:
            problems.append(f"{source}: {_why_no_image(source)}.")
        for path in matches:
            if path not in seen:
                seen.add(path)
                items.append(ImageItem(path, 0))
    return items, problems


def _each_input(inputs: Any) -> Iterator[str | Image.Image]:
    """Path strings and PIL images, one per image or path argument (a batch tensor gives one image per row)."""
    for source in inputs if isinstance(inputs, (list, tuple)) else [inputs]:
        if isinstance(source, (str, os.PathLike)):
            yield os.fspath(source)
        elif isinstance(source, Image.Image):
            yield source
        elif isinstance(source, torch.Tensor):
            yield from tensor_images(source)
        else:
            kind = type(source)
            name = kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"
            raise DataError(
                f"predict takes image paths (str or Path), PIL images or image tensors, or a list of them, not {name}."
            )


def tensor_images(tensor: torch.Tensor) -> list[Image.Image]:
    """RGB (or 1-channel) image tensors, (C, H, W) or (B, C, H, W), as PIL images.

    Tensors hold pixels as they come from a decoder, *not* normalised: uint8 in [0, 255], or float in [0, 1] (rounded
    to 8 bits here, as saving a PNG would). They then get the same resize, crop and normalisation as image files, so a
    tensor is classified exactly like the PNG file of the same pixels.
    """
    batch = tensor.detach().cpu()
    batch = batch.unsqueeze(0) if batch.ndim == 3 else batch
    if batch.ndim != 4 or batch.shape[1] not in (1, 3) or batch.shape[2] < 1 or batch.shape[3] < 1:
        raise DataError(f"An image tensor must be (C, H, W) or (B, C, H, W) with 1 or 3 channels, not {tuple(tensor.shape)}.")
    if batch.is_floating_point():
        low, high = (float(batch.min()), float(batch.max())) if batch.numel() else (0.0, 0.0)
        if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or high > 1:
            raise DataError(
                f"A float image tensor must hold un-normalised pixels in [0, 1], not values from {low:.3g} to {high:.3g}; "
                f"promptune resizes and normalises images itself."
            )
        batch = (batch.float() * 255).round().to(torch.uint8)
    elif batch.dtype != torch.uint8:
        raise DataError(f"An image tensor must be uint8 (0-255) or float (0-1), not {str(batch.dtype).replace('torch.', '')}.")
    return [transforms.functional.to_pil_image(image).convert("RGB") for image in batch]


def _why_no_image(argument: str) -> str:
    path = Path(argument).expanduser()
    if path.is_dir():
        others = _count_other_files(path)
        skipped = f" ({others} file{'s' if others != 1 else ''} of other types skipped)" if others else ""
        return f"a folder with no images{skipped}"
    if any(char in argument for char in "*?["):
        return "matches no image"
    return "no such file or folder"


def _count_other_files(folder: Path) -> int:
    """Files below `folder` that are not images (hidden entries and promptune's folders left out)."""
    count = 0
    for directory, subfolders, files in os.walk(folder):
        subfolders[:] = [d for d in subfolders if not _is_hidden(d) and not is_marked(os.path.join(directory, d))]
        count += sum(not _is_hidden(name) and not _has_image_extension(name) for name in files)
    return count


def _expand_argument(argument: str) -> list[Path]:
    path = Path(argument).expanduser()
    if path.is_file():
        return [path]  # named explicitly: kept whatever its extension, decoding will say if it is not an image
    if path.is_dir():
        return _images_in_folder(path)
    if not any(char in argument for char in "*?["):
        return []
    matches: list[Path] = []
    for match in sorted(glob.glob(os.path.expanduser(argument), recursive=True)):
        candidate = Path(match)
        if candidate.is_dir():
            matches.extend(_images_in_folder(candidate))
        elif candidate.is_file() and _has_image_extension(candidate.name):
            matches.append(candidate)
    return matches


def _images_in_folder(folder: Path) -> list[Path]:
    try:
        return images_under(folder)
    except OSError:
        return []
