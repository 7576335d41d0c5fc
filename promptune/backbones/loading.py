"""What every family's loader shares: telling a local weights file from a hub tag, and keeping libraries quiet."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

from promptune.errors import BackboneError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pth.tar", ".ckpt", ".npz")


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """open_clip and timm log to the root logger; keep the user's terminal to promptune's own messages."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR + 10)
    try:
        yield
    finally:
        root.setLevel(level)


def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or "/" in weights or weights.lower().endswith(WEIGHT_SUFFIXES)


def local_weights(weights: str | None) -> Path | None:
    """The resolved local file `weights` names, None for a hub tag; a missing file that looks like one is an error."""
    if weights is None:
        return None
    path = Path(weights).expanduser()
    if path.is_file():
        return path.resolve()
    if _looks_like_path(weights):
        raise BackboneError(f"Weights file '{weights}' does not exist.")
    return None


def offline_hint(name: str, tag: str) -> str:
    return (
        f"Could not download the '{tag}' weights for {name} (no network, or the hub is unreachable); "
        f"download them on a machine with internet or pass a local file with --weights PATH."
    )
