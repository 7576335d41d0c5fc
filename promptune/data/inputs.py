"""`predict`'s inputs: image paths, folders, glob patterns, PIL images and image tensors as the images to classify,
in input order, and one sentence for each input that gave no image.
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torchvision import transforms

from promptune.data.folders import has_image_extension, is_hidden, images_under
from promptune.data.sampling import ImageItem
from promptune.errors import DataError
from promptune.fileio import is_marked


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
        subfolders[:] = [d for d in subfolders if not is_hidden(d) and not is_marked(os.path.join(directory, d))]
        count += sum(not is_hidden(name) and not has_image_extension(name) for name in files)
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
        elif candidate.is_file() and has_image_extension(candidate.name):
            matches.append(candidate)
    return matches


def _images_in_folder(folder: Path) -> list[Path]:
    try:
        return images_under(folder)
    except OSError:
        return []
