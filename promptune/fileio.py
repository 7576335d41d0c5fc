"""Atomic file replacement: a reader (or a run killed at any moment) sees the old file or the complete new one."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable


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
