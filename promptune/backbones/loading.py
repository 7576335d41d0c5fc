"""What every family's loader shares: telling a local weights file from a hub tag (or a prompt file passed by mistake),
keeping libraries quiet, and one sentence for weights that cannot be downloaded or do not fit the model."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import warnings
from pathlib import Path
from typing import Iterator

from promptune.artifact import is_prompt_file
from promptune.backbones.hub import HubWeights
from promptune.errors import BackboneError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".pth.tar", ".ckpt", ".npz")


_LIBRARY_LOGGERS = ("", "huggingface_hub", "timm", "open_clip")  # "": the root logger, where open_clip logs


@contextlib.contextmanager
def quiet_libraries() -> Iterator[None]:
    """Keep the user's terminal to promptune's own messages: no log lines or warnings from open_clip, timm or the hub
    while a backbone loads (what goes wrong there ends in promptune's one sentence instead)."""
    loggers = [logging.getLogger(name) for name in _LIBRARY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.CRITICAL + 10)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or "/" in weights or weights.lower().endswith(WEIGHT_SUFFIXES)


def local_weights(weights: str | None) -> Path | None:
    """The resolved local file `weights` names, None for a hub tag; a missing file that looks like one is an error."""
    if weights is None:
        return None
    path = Path(weights).expanduser()
    if path.is_file():
        if is_prompt_file(path):
            raise BackboneError(
                f"'{weights}' is a promptune prompt file, not backbone weights; pass it with --prompts (to eval or "
                f"predict) and give --weights the backbone's own weights."
            )
        return path.resolve()
    if _looks_like_path(weights):
        raise BackboneError(f"Weights file '{weights}' does not exist.")
    return None


def download_failed(hub: HubWeights, error: BaseException) -> str:
    """The hub answered the probe, yet the download failed (a dropped connection, a full disk, a moved file)."""
    return (f"Could not download the {hub.label} weights ({hub.source}): {_first_line(error)}; pass a downloaded copy "
            f"with --weights FILE, or try again.")


def weights_mismatch(weights: str, name: str, error: BaseException) -> str:
    """One sentence for torch's "Error(s) in loading state_dict for CLIP:" (whose details follow on further lines):
    how many keys are missing, unexpected or of another shape, with a few examples of each."""
    text = str(error)
    found = {
        "missing": _quoted_keys(re.search(r"Missing key\(s\) in state_dict: (.*)", text)),
        "unexpected": _quoted_keys(re.search(r"Unexpected key\(s\) in state_dict: (.*)", text)),
        "of another shape": re.findall(r"size mismatch for ([^:]+):", text),
    }
    parts = [f"{len(keys)} key{'s' if len(keys) != 1 else ''} {what} (e.g. {', '.join(keys[:3])})"
             for what, keys in found.items() if keys]
    if not parts:
        return f"Could not load weights '{weights}' into {name}: {_first_line(error)}."
    return (f"Weights '{weights}' do not fit {name}: {'; '.join(parts)}; check that --backbone names the model "
            f"these weights are for.")


def _quoted_keys(match: re.Match[str] | None) -> list[str]:
    return re.findall(r'"([^"]+)"', match.group(1)) if match else []


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0].rstrip(":.!") if lines else type(error).__name__
