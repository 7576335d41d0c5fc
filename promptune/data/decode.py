"""Robust decoding: an image file fully decoded into an RGB image (EXIF orientation applied, alpha composited on white,
high-bit pixels mapped onto 8 bits), or an `UnreadableImageError` that says why in a few words. Images over Pillow's
`MAX_IMAGE_PIXELS` (--max-image-pixels) are refused as decompression bombs before they are decoded.
"""

from __future__ import annotations

import math
import re
import warnings
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from promptune.errors import DataError

_HIGH_BIT_MODES = frozenset({"I", "F", "I;16", "I;16L", "I;16B", "I;16N"})
_WHITE = (255, 255, 255)


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
