"""Class discovery: the class folders and image files of a data folder, and its layout.

A data folder holds one sub-folder per class (``DATA_DIR/<class>/**/*.jpg``), optionally split into
``DATA_DIR/train|val|test/<class>/...``. Hidden entries and promptune's own (marked) folders are skipped.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from promptune.data.transforms import prompt_name
from promptune.errors import DataError, PromptuneError
from promptune.fileio import is_marked

IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
_SPLIT_NAMES = ("train", "val", "test")


def has_image_extension(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def is_hidden(name: str) -> bool:
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
            if is_hidden(entry.name):
                continue
            try:
                if entry.is_dir():
                    if not is_marked(entry.path):  # e.g. an eval --report folder inside a class folder
                        pending.append(Path(entry.path))
                elif entry.is_file() and has_image_extension(entry.name):
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


def check_is_folder(root: Path, what: str) -> None:
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


def class_folders(root: Path) -> list[Path]:
    """Non-hidden sub-folders of ``root`` that promptune did not make (checkpoint, report), sorted by name."""
    try:
        entries = list(os.scandir(root))
    except OSError as error:
        raise DataError(f"cannot read folder {root} ({error.strerror or type(error).__name__}).") from error
    folders = []
    for entry in entries:
        try:
            if not is_hidden(entry.name) and entry.is_dir() and not is_marked(entry.path):
                folders.append(Path(entry.path))
        except OSError:
            continue
    return sorted(folders, key=lambda folder: folder.name)


def class_images(folder: Path) -> list[Path]:
    try:
        return images_under(folder)
    except OSError as error:
        raise DataError(f"cannot read class folder {folder} ({error.strerror or type(error).__name__}).") from error


def scan_classes(root: Path) -> dict[str, list[Path]]:
    """Map each class folder name (sorted) to its image files (sorted), checking the folder is usable."""
    root = Path(root)
    check_is_folder(root, "data folder")
    folders = class_folders(root)
    if len(folders) < 2:
        raise DataError(
            f"found {len(folders)} class folder(s) in {root}; need at least 2 (one sub-folder of images per class)."
        )
    _check_distinct_prompt_names([folder.name for folder in folders])
    classes: dict[str, list[Path]] = {}
    for folder in folders:
        images = class_images(folder)
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
            folders.extend(class_folders(root))
        except DataError:
            continue
    return folders


def layout_name(layout: dict[str, Path]) -> str:
    return "split" if "train" in layout else "flat"
