"""Where `tune` writes, checked before it reads a single image: never over a file that is not a prompt file, never into
the class folders it trains on, a clear cause when the disk refuses, and one run at a time per prompt file.

The lock is a file beside --out (`.prompts.safetensors.lock`), created with O_EXCL and holding the owner's pid, host
and start time. A second run to the same --out is refused with one sentence naming the first. A lock left by a
process that no longer runs on this host (SIGKILL, a crash) is taken over with a note; a lock from another host is
never guessed at: the message names it, to delete by hand if that run is gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import TracebackType
from typing import Callable

from promptune.artifact import is_prompt_file
from promptune.data import class_folders_of
from promptune.errors import PromptuneError
from promptune.fileio import write_problem

_UNREADABLE_LOCK_GRACE_S = 10.0  # a lock file still empty after this long was left by a run that died creating it


def check_out_target(out: Path, data_dir: Path) -> None:
    """--out may replace a prompt file, never another file; never lies in a class folder; and its folder is writable."""
    if out.is_dir():
        raise PromptuneError(f"--out '{out}' is a folder; give a file name such as prompts.safetensors.")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise PromptuneError(f"--out folder '{parent}' does not exist.")
    resolved = out.resolve()
    for folder in class_folders_of(data_dir):
        if resolved.is_relative_to(folder.resolve()):
            raise PromptuneError(
                f"--out '{out}' is inside the class folder '{folder}' of the images to train on; write it elsewhere."
            )
    if out.exists() and not is_prompt_file(out):
        raise PromptuneError(
            f"--out '{out}' is an existing file that is not a promptune prompt file; promptune never overwrites it, "
            f"so give another --out."
        )
    problem = write_problem(parent)
    if problem is not None:
        raise PromptuneError(f"Cannot write --out '{out}' ({problem}); give an --out in a folder you can write.")


def lock_path(out: Path) -> Path:
    """`prompts.safetensors` -> `.prompts.safetensors.lock` beside it (hidden: never in a listing of class folders)."""
    return out.with_name(f".{out.name}.lock")


@dataclass(frozen=True)
class LockOwner:
    pid: int
    host: str
    started: str  # ISO time, UTC

    @classmethod
    def me(cls) -> LockOwner:
        return cls(os.getpid(), socket.gethostname(), datetime.now(timezone.utc).isoformat(timespec="seconds"))

    def is_gone(self) -> bool:
        """The owner's process no longer runs on this host (False when that cannot be known: another host, Windows)."""
        if self.host != socket.gethostname() or os.name == "nt":  # os.kill(pid, 0) would end the process on Windows
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # it runs, as another user
            return False
        return False

    def describe(self) -> str:
        return f"process {self.pid} on {self.host}, started {self.started}"


def _read_owner(path: Path) -> LockOwner | None:
    try:
        return LockOwner(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        return None


class RunLock:
    """Held while one `tune` writes `out` (its checkpoint and the prompt file); see the module docstring.

    Only the primary process of a torchrun job (RANK 0, or no RANK) takes it: that one process writes every file.
    """

    def __init__(self, out: Path, log: Callable[[str], None]) -> None:
        self.out = out
        self.path = lock_path(out)
        self.log = log
        self.owner = LockOwner.me()
        self.held = False

    def __enter__(self) -> RunLock:
        if int(os.environ.get("RANK", "0")) == 0:
            self.acquire()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None) -> None:
        self.release()

    def acquire(self) -> None:
        for _ in range(2):  # a stale lock is taken over once; losing that race to another run refuses like a live lock
            try:
                self._create()
                return
            except FileExistsError:
                other = _read_owner(self.path)
            if not self._is_stale(other):
                raise PromptuneError(self._busy_message(other))
            what = other.describe() if other else "an unreadable lock"
            self.log(f"note: taking over the lock '{self.path}' of a run that no longer runs ({what}).")
            self._remove_stale(other)
        raise PromptuneError(self._busy_message(_read_owner(self.path)))

    def release(self) -> None:
        if self.held and _read_owner(self.path) == self.owner:
            self.path.unlink(missing_ok=True)
        self.held = False

    def _create(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise
        except OSError as error:
            raise PromptuneError(
                f"Cannot create the lock file '{self.path}' beside --out ({error.strerror or error}).") from None
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(asdict(self.owner), handle)
        self.held = True

    def _is_stale(self, other: LockOwner | None) -> bool:
        if other is not None:
            return other.is_gone()
        try:  # unreadable: another run may be between creating the file and writing its owner into it
            return time.time() - self.path.stat().st_mtime > _UNREADABLE_LOCK_GRACE_S
        except FileNotFoundError:
            return True

    def _remove_stale(self, other: LockOwner | None) -> None:
        """Move the stale lock aside (atomic: of two runs taking it over, one moves it), then delete it; if a live run
        re-created the lock in between, put that one back."""
        aside = self.path.with_name(f"{self.path.name}.{os.getpid()}.stale")
        try:
            os.replace(self.path, aside)
        except FileNotFoundError:
            return
        if _read_owner(aside) != other:
            os.replace(aside, self.path)
            return
        aside.unlink(missing_ok=True)

    def _busy_message(self, other: LockOwner | None) -> str:
        who = f" ({other.describe()})" if other else ""
        return (f"Another promptune tune{who} is writing '{self.out}'; wait for it to finish or give another --out "
                f"(if no such run is going on, delete the lock file '{self.path}').")
