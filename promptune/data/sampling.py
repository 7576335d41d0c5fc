"""Sampling: which images train, validate and evaluate (k shots per class, seeded per class; held-out validation
images; the test/, val/ or whole folder to evaluate on). Unreadable images never stop a run: while choosing the
training images they are decoded, skipped and reported.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from promptune.data.decode import UnreadableImageError, decode_image
from promptune.data.folders import (
    check_is_folder, class_folders, class_images, layout_name, find_layout, scan_classes,
)
from promptune.data.transforms import is_number
from promptune.errors import DataError

_MAX_SHOT_VAL_IMAGES = 4  # validation images per class when sampling k shots without a val/ folder


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
    if not is_number(val_fraction) or not 0 <= val_fraction < 1:
        raise DataError(f"the validation fraction must be in [0, 1), not {val_fraction!r}.")
    data_dir = Path(data_dir)
    check_is_folder(data_dir, "data folder")
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
    return TrainingData(class_names, train, val, skipped, layout_name(layout), _short_class_notes(short, shots))


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
    if isinstance(base_classes, bool) or not is_number(base_classes):
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
    folders = class_folders(val_root)
    unknown = [folder.name for folder in folders if folder.name not in train_classes]
    if unknown:
        names = ", ".join(f"'{name}'" for name in unknown)
        raise DataError(f"{val_root} has class folder(s) {names} that the train folder does not have.")
    by_name = {folder.name: folder for folder in folders}
    return {name: class_images(by_name[name]) if name in by_name else [] for name in kept}


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
    check_is_folder(data_dir, "data folder")
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
    return EvalData(list(classes), items, layout_name(layout), root, split)
