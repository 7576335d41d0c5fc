"""promptune's user cache folder, and what it keeps there: the sha256 of local backbone weights files.

A prompt file records the sha256 of the weights it was tuned on, so that `eval` and `predict` refuse different ones.
Hashing a 600 MB file costs ~0.4 s on every load, so the digest is kept in `weights-sha256.json`, keyed by the file's
resolved path, with the size, mtime_ns, ctime_ns and inode it had when hashed: a change to any of them (rewriting,
replacing or touching the file) hashes it again. The cache is a convenience only: a missing, corrupt or unwritable
cache file means hashing again, never a failed run.

The folder: $PROMPTUNE_CACHE_DIR, else the platform's user cache folder (~/.cache/promptune, or
$XDG_CACHE_HOME/promptune; ~/Library/Caches/promptune on macOS; %LOCALAPPDATA%/promptune/Cache on Windows).
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

from promptune.fileio import atomic_write, file_sha256

CACHE_DIR_ENV = "PROMPTUNE_CACHE_DIR"
WEIGHTS_HASHES = "weights-sha256.json"
MAX_HASHES = 64  # files remembered; the least recently hashed go first


def cache_dir() -> Path:
    """The folder promptune caches in (it may not exist yet)."""
    if os.environ.get(CACHE_DIR_ENV):
        return Path(os.environ[CACHE_DIR_ENV]).expanduser()
    if sys.platform == "win32":
        return Path(os.environ.get("LOCALAPPDATA") or Path.home() / "AppData" / "Local") / "promptune" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "promptune"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "promptune"


def _stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _read_hashes(cache: Path) -> dict[str, Any]:
    try:
        entries = json.loads(cache.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def _write_hashes(cache: Path, entries: dict[str, Any]) -> None:
    text = json.dumps(dict(list(entries.items())[-MAX_HASHES:]))
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda name: Path(name).write_text(text, encoding="utf-8"))
    except OSError:
        pass  # the next load hashes the file again


def weights_sha256(path: Path) -> str:
    """Hex sha256 of the weights file at `path`, from the cache when the file is unchanged since it was hashed."""
    key = str(path.resolve())
    stamp = _stamp(path)
    cache = cache_dir() / WEIGHTS_HASHES
    entries = _read_hashes(cache)
    entry = entries.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp and re.fullmatch(r"[0-9a-f]{64}", str(entry.get("sha256"))):
        return entry["sha256"]
    digest = file_sha256(path)
    if _stamp(path) == stamp:  # not written to while it was read
        entries.pop(key, None)
        entries[key] = {"stamp": stamp, "sha256": digest}
        _write_hashes(cache, entries)
    return digest
