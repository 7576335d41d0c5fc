"""Run checkpoints for `tune --resume`: a folder beside the prompt file with one safetensors file and one JSON index.

    prompts.checkpoint/
        .promptune                           # marks the folder as promptune's: never read as a class folder
        checkpoint.json                      # what run this is, where it stopped, optimiser/schedule scalars, sha256
        state-e0003-s0000-1a2b3c4d.safetensors  # learned + training-only parameters, best-so-far, optimiser, RNG

The tensors file is written first under a fresh name, then the index is atomically replaced to point at it, then
older tensor files are removed: a run killed at any moment leaves the previous checkpoint or the new one, whole.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from promptune.errors import PromptuneError
from promptune.fileio import MARKER_NAME, atomic_write, file_sha256, mark_folder, write_problem

FORMAT_NAME = "promptune.checkpoint"
FORMAT_VERSION = 1
INDEX_NAME = "checkpoint.json"
_STATE_GLOB = "state-*.safetensors"


class CheckpointError(PromptuneError):
    """A checkpoint is missing, damaged, or belongs to a different run."""


@dataclass
class Checkpoint:
    run: dict[str, Any]  # the run's identity: options and a fingerprint of its data (see `run_differences`)
    trainer: dict[str, Any]  # Trainer.state()'s JSON half
    tensors: dict[str, torch.Tensor]  # Trainer.state()'s tensor half
    stopped_by: str | None = None  # signal name when saved on an interrupt


def default_checkpoint_dir(out: Path) -> Path:
    """`prompts.safetensors` -> `prompts.checkpoint/` in the same folder."""
    return out.with_name(f"{out.stem or out.name}.checkpoint")


@dataclass(frozen=True)
class CheckpointPolicy:
    """Where a `tune` run keeps its checkpoint, whether it keeps one, and whether it continues one (--resume)."""

    folder: Path
    enabled: bool = True
    resume: bool = False

    @classmethod
    def for_run(cls, out: Path, folder: Path | None, enabled: bool, resume: bool) -> CheckpointPolicy:
        """--checkpoint-dir, or `default_checkpoint_dir(out)` when it is not given."""
        return cls(Path(folder) if folder is not None else default_checkpoint_dir(out), enabled, resume)

    def check(self) -> None:
        """Refuse early what cannot work, before any image is scanned or weights are loaded."""
        folder = self.folder
        if folder.exists() and not folder.is_dir():
            raise CheckpointError(f"--checkpoint-dir '{folder}' is a file; give a folder.")
        if self.resume and not self.enabled:
            raise CheckpointError("--resume needs the run's checkpoint; drop --no-checkpoint.")
        if self.resume and not has_checkpoint(folder):
            raise CheckpointError(f"Nothing to resume: there is no checkpoint in '{folder}'.")
        problem = write_problem(folder) if self.enabled else None
        if problem is not None:
            raise CheckpointError(
                f"Cannot write checkpoints in '{folder}' ({problem}); pass --checkpoint-dir DIR or --no-checkpoint."
            )
        if not self.resume and self.enabled and has_checkpoint(folder):
            raise CheckpointError(
                f"'{folder}' holds the checkpoint of an unfinished run; add --resume to continue it, or delete that "
                f"folder to start over."
            )

    def load_for(self, run: dict[str, Any], tensor_names: set[str]) -> Checkpoint:
        """The checkpoint to continue, after checking it belongs to `run` and holds the tensors `tensor_names`."""
        saved = load_checkpoint(self.folder)
        saved.run.setdefault("processes", 1)  # checkpoints of promptune 0.1.0 (one process) do not say
        differences = run_differences(saved.run, run)
        if differences:
            raise CheckpointError(
                f"Cannot resume from '{self.folder}': this run differs from the checkpoint's in {'; '.join(differences)}."
            )
        if not tensor_names <= saved.tensors.keys():
            raise CheckpointError(f"The checkpoint in '{self.folder}' is damaged (learned tensors are missing); delete it.")
        return saved

    def save(self, checkpoint: Checkpoint) -> None:
        if self.enabled:
            save_checkpoint(self.folder, checkpoint)

    def finish(self) -> None:
        """The run wrote its prompt file: its checkpoint is no longer needed."""
        if self.enabled:
            remove_checkpoint(self.folder)


def has_checkpoint(folder: Path) -> bool:
    return (folder / INDEX_NAME).is_file()


def save_checkpoint(folder: Path, checkpoint: Checkpoint) -> Path:
    """Write `checkpoint` into `folder` (created if needed) so that a crash at any point leaves a whole checkpoint."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        mark_folder(folder, "checkpoint")  # a checkpoint inside DATA_DIR is never read as a class folder
        position = checkpoint.trainer["epoch"], checkpoint.trainer["progress"]["step"]
        state_path = folder / f"state-e{position[0]:04d}-s{position[1]:06d}-{secrets.token_hex(4)}.safetensors"
        tensors = {name: t.detach().to("cpu").contiguous() for name, t in checkpoint.tensors.items()}
        atomic_write(state_path, lambda tmp: save_file(tensors, tmp))
        index = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "saved_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "stopped_by": checkpoint.stopped_by,
            "state_file": state_path.name,
            "state_sha256": file_sha256(state_path),
            "run": checkpoint.run,
            "trainer": checkpoint.trainer,
        }
        text = json.dumps(index, indent=1, sort_keys=True)
        atomic_write(folder / INDEX_NAME, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        for stale in folder.glob(_STATE_GLOB):
            if stale.name != state_path.name:
                stale.unlink(missing_ok=True)
    except OSError as error:
        raise CheckpointError(f"Cannot write the checkpoint in '{folder}': {error.strerror or error}.") from error
    return folder


def load_checkpoint(folder: Path) -> Checkpoint:
    """Read and verify the checkpoint in `folder`; any damage is one `CheckpointError` sentence."""
    damaged = f"The checkpoint in '{folder}' is damaged"
    try:
        index = json.loads((folder / INDEX_NAME).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"Nothing to resume: '{folder}' holds no checkpoint ({INDEX_NAME} is missing).") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{damaged} ({INDEX_NAME} cannot be read: {error}); delete it to start over.") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT_NAME:
        raise CheckpointError(f"'{folder / INDEX_NAME}' is not a promptune checkpoint.")
    version = index.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"The checkpoint in '{folder}' has format version {version!r}; this promptune reads up to "
            f"{FORMAT_VERSION} (upgrade promptune to resume it)."
        )
    try:
        state_path = folder / Path(str(index["state_file"])).name
        if file_sha256(state_path) != index["state_sha256"]:
            raise CheckpointError(f"{damaged} (its state file does not match its sha256); delete it to start over.")
        tensors = load_file(str(state_path))
        checkpoint = Checkpoint(run=index["run"], trainer=index["trainer"], tensors=tensors,
                                stopped_by=index.get("stopped_by"))
    except (KeyError, TypeError, OSError, SafetensorError) as error:
        raise CheckpointError(f"{damaged} ({type(error).__name__}: {error}); delete it to start over.") from None
    return checkpoint


def remove_checkpoint(folder: Path) -> None:
    """Delete promptune's files in `folder` (the index first), then the folder if that left it empty."""
    (folder / INDEX_NAME).unlink(missing_ok=True)
    for state in folder.glob(_STATE_GLOB):
        state.unlink(missing_ok=True)
    for leftover in folder.glob(".*.tmp"):  # temp files of a write that a SIGKILL interrupted
        leftover.unlink(missing_ok=True)
    (folder / MARKER_NAME).unlink(missing_ok=True)
    try:
        folder.rmdir()
    except OSError:
        pass  # the user keeps files of their own there


# ------------------------------------------------------------------------------------------------ run identity

# Where a key of the run identity came from, for the message that says why a resume is refused.
_LABELS = {
    "method": "--method",
    "backbone": "the backbone (--backbone / --weights)",
    "classes": "the class folders",
    "train_files": "the training images",
    "val_files": "the validation images",
    "shots": "--shots",
    "base_classes": "--base-classes",
    "processes": "the number of processes",
}


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix.rstrip("."): value}


def _label(key: str) -> str:
    group, _, leaf = key.partition(".")
    if group in ("train", "hparams"):
        return "--" + leaf.replace("_", "-")
    return _LABELS.get(group, key)


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else value
    return text if len(text) <= 40 else "(" + text[:16] + "...)"


def run_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Human descriptions of what differs between a checkpoint's run and this one (empty: same run)."""
    old, new = _flatten(saved), _flatten(current)
    differences: dict[str, str] = {}
    for key in sorted(old.keys() | new.keys()):
        if old.get(key) == new.get(key):
            continue
        label = _label(key)
        if key.endswith("_files.sha256") or key.startswith(("backbone.", "classes")):
            differences.setdefault(label, label)
        elif not key.endswith("_files.count"):
            differences.setdefault(label, f"{label} ({_shown(old.get(key))} in the checkpoint, {_shown(new.get(key))} now)")
    return list(differences.values())


def file_fingerprint(root: Path, paths: list[Path]) -> dict[str, Any]:
    """Count and sha256 of (path relative to `root`, size) pairs: renaming, adding or editing an image changes it."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        try:
            relative = path.relative_to(root).as_posix()
        except ValueError:
            relative = path.as_posix()
        try:
            size = path.stat().st_size
        except OSError:
            size = -1
        digest.update(f"{relative}\0{size}\n".encode("utf-8", "surrogateescape"))
    return {"count": len(paths), "sha256": digest.hexdigest()}
