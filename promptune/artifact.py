"""The prompt file: one .safetensors holding only learned tensors plus string metadata (JSON where structured).

Saving is atomic (temp file in the same folder, fsync, rename), so an interrupted run leaves either the previous file
or a complete new one. Loading validates the container before any method sees it; methods then check tensor names
and shapes against the model they rebuild (`PromptMethod.load_learned_state`).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from promptune.errors import PromptFileError
from promptune.fileio import atomic_write

FORMAT_NAME = "promptune.prompts"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 16 * 1024 * 1024  # safetensors' own limit is 100 MB; a prompt file's header is a few KB
_REQUIRED_KEYS = ("format", "format_version", "method", "backbone", "class_names", "hparams", "preprocess")
_JSON_KEYS = ("backbone", "class_names", "hparams", "preprocess", "training")


@dataclass
class PromptFile:
    tensors: dict[str, torch.Tensor]  # learned tensors only, fp32, on CPU
    method: str  # registry name, e.g. "sep"
    backbone: dict[str, Any]  # family, name, weights, weights_sha256, and shape facts (width, layers, ...)
    class_names: list[str]  # trained class folder names, label order
    hparams: dict[str, Any]  # the method's configuration
    preprocess: dict[str, Any]  # size, mean, std, interpolation, crop_pct
    training: dict[str, Any] = field(default_factory=dict)  # epochs, shots, seed, final metrics, ...
    promptune_version: str = ""

    def metadata(self) -> dict[str, str]:
        meta = {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "method": self.method,
            "promptune_version": self.promptune_version,
        }
        for key in _JSON_KEYS:
            meta[key] = json.dumps(getattr(self, key), sort_keys=True)
        return meta


def save_prompt_file(path: str | Path, prompt_file: PromptFile) -> Path:
    """Write atomically: a reader sees the old file or the complete new one, never a partial write."""
    path = Path(path)
    if path.exists() and path.is_dir():
        raise PromptFileError(f"Cannot write the prompt file to '{path}': it is a folder.")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise PromptFileError(f"Cannot write the prompt file: folder '{folder}' does not exist.")
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in prompt_file.tensors.items()}
    try:
        atomic_write(path, lambda tmp_name: save_file(tensors, tmp_name, metadata=prompt_file.metadata()))
    except OSError as error:
        raise PromptFileError(f"Cannot write the prompt file '{path}': {error.strerror or error}.") from error
    return path


def _check_container(path: Path) -> None:
    """Reject what is plainly not a safetensors file before the parser allocates anything."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) < 9:
        raise PromptFileError(f"'{path}' is not a promptune prompt file (too short to be safetensors).")
    (header_len,) = struct.unpack("<Q", head[:8])
    if header_len > MAX_HEADER_BYTES or header_len + 8 > size or head[8:9] != b"{":
        raise PromptFileError(f"'{path}' is not a promptune prompt file (not a valid safetensors file).")


def is_prompt_file(path: str | Path) -> bool:
    """Whether `path` is a promptune prompt file, from its safetensors header alone (no tensor is read)."""
    try:
        _check_container(Path(path))
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            meta = handle.metadata()
    except (PromptFileError, SafetensorError, OSError, ValueError, RuntimeError, struct.error):
        return False
    return bool(meta) and meta.get("format") == FORMAT_NAME


def _decode_metadata(path: Path, meta: dict[str, str] | None) -> dict[str, Any]:
    if not meta or meta.get("format") != FORMAT_NAME:
        raise PromptFileError(f"'{path}' is a safetensors file but not a promptune prompt file.")
    missing = [key for key in _REQUIRED_KEYS if key not in meta]
    if missing:
        raise PromptFileError(f"Prompt file '{path}' is missing metadata: {', '.join(missing)}.")
    try:
        version = int(meta["format_version"])
    except ValueError:
        raise PromptFileError(f"Prompt file '{path}' has an unreadable format version.") from None
    if version > FORMAT_VERSION:
        raise PromptFileError(
            f"Prompt file '{path}' has format version {version}, newer than this promptune understands "
            f"({FORMAT_VERSION}); upgrade promptune."
        )
    if version < 1:
        raise PromptFileError(f"Prompt file '{path}' has an unknown format version {version}.")
    decoded: dict[str, Any] = {"method": meta["method"], "promptune_version": meta.get("promptune_version", "")}
    for key in _JSON_KEYS:
        try:
            decoded[key] = json.loads(meta.get(key, "{}"))
        except (json.JSONDecodeError, RecursionError):
            raise PromptFileError(f"Prompt file '{path}' has corrupt '{key}' metadata.") from None
    _check_types(path, decoded)
    return decoded


def _check_types(path: Path, decoded: dict[str, Any]) -> None:
    names = decoded["class_names"]
    if not isinstance(names, list) or len(names) < 1 or not all(isinstance(n, str) and n for n in names):
        raise PromptFileError(f"Prompt file '{path}' has corrupt class names.")
    if len(set(names)) != len(names):
        raise PromptFileError(f"Prompt file '{path}' has duplicate class names.")
    for key in ("backbone", "hparams", "preprocess", "training"):
        if not isinstance(decoded[key], dict):
            raise PromptFileError(f"Prompt file '{path}' has corrupt '{key}' metadata.")
    if not isinstance(decoded["method"], str):
        raise PromptFileError(f"Prompt file '{path}' has a corrupt method name.")


def load_prompt_file(path: str | Path) -> PromptFile:
    """Read and validate the container and its metadata; never unpickles anything."""
    path = Path(path)
    if not path.exists():
        raise PromptFileError(f"Prompt file '{path}' does not exist.")
    if not path.is_file():
        raise PromptFileError(f"Prompt file '{path}' is not a file.")
    try:
        _check_container(path)
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            decoded = _decode_metadata(path, handle.metadata())
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except PermissionError:
        raise PromptFileError(f"Prompt file '{path}' cannot be read (permission denied).") from None
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError, OverflowError, struct.error):
        raise PromptFileError(f"'{path}' is not a promptune prompt file (corrupt or truncated safetensors).") from None
    for name, tensor in tensors.items():
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise PromptFileError(f"Prompt file '{path}' holds a corrupt tensor '{name}'.")
    return PromptFile(tensors=tensors, **decoded)
