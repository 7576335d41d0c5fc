"""Atomic file replacement, sha256 of a file, whether a folder can be written (and why not), and the marker file of the
folders promptune creates (so that it never reads its own outputs as class folders)."""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable

MARKER_NAME = ".promptune"  # in every folder promptune creates (checkpoint, report); such folders are never data
_CAUSES = {
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EISDIR: "is a directory",
    errno.ENOTDIR: "not a directory",
    errno.ENOSPC: "no space left on device",
    errno.ENOENT: "does not exist",
}


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Call `write(temp_name)` on a hidden temp file beside `path`, fsync it, then rename it over `path`.

    Raises OSError from any step; the temp file never outlives a failure (a SIGKILL can leave one behind, hidden and
    named after `path`, but never a partial `path`).
    """
    folder = path.parent if str(path.parent) else Path(".")
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        write(tmp_name)
        os.chmod(tmp_name, 0o666 & ~_current_umask())  # mkstemp creates 0600; these are ordinary user files
        with open(tmp_name, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (weights files can be GBs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def content_id(path: Path, digits: int = 12) -> str | None:
    """The first `digits` hex digits of the file's sha256 (None if it cannot be read): enough to recognise the same
    image later. With 48 bits, a chance match between 100,000 training and 100,000 other images is about 1 in 30,000."""
    try:
        return file_sha256(path)[:digits]
    except OSError:
        return None


def write_problem(folder: Path) -> str | None:
    """Why a new file cannot be created in `folder` ("read-only file system", "permission denied", ...), or None.

    It creates and removes a hidden temp file there, so the answer is the file system's own (root ignores permission
    bits, and a read-only mount or a full disk only shows when writing). A folder that does not exist yet is checked
    at its nearest existing parent, where it would be created.
    """
    target = Path(folder).absolute()
    while not target.exists() and target != target.parent:
        target = target.parent
    if not target.is_dir():
        return _CAUSES[errno.ENOTDIR]
    try:
        fd, name = tempfile.mkstemp(prefix=".promptune-write-check-", dir=target)
    except OSError as error:
        return _CAUSES.get(error.errno, error.strerror or type(error).__name__)
    os.close(fd)
    os.unlink(name)
    return None


def mark_folder(folder: Path, what: str) -> None:
    """Mark `folder` (which promptune created, or writes into) as promptune's `what` folder, never a class folder."""
    marker = Path(folder) / MARKER_NAME
    if not marker.is_file():
        marker.write_text(f"promptune {what}: promptune never reads this folder as images of a class.\n", encoding="utf-8")


def is_marked(folder: Path) -> bool:
    """Whether promptune made `folder` (a checkpoint or report folder): such a folder is never data."""
    return os.path.isfile(os.path.join(folder, MARKER_NAME))
