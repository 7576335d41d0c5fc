"""Ctrl-C and SIGTERM during `tune`: stop at the next step boundary, save a checkpoint, exit 130 / 143.

While training runs, a signal only raises a flag that the trainer checks after every step; before training starts
(scanning images, loading the backbone, the prototype pass) there is nothing to save, so it stops at once. A second
signal always stops at once: a user pressing Ctrl-C twice means it.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Iterator

from promptune.errors import PromptuneError

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name))


def signal_name(signum: int | None) -> str | None:
    return None if signum is None else signal.Signals(signum).name


class RunInterrupted(PromptuneError):
    """`tune` stopped on a signal; `checkpoint_dir` holds the state to resume from (None when nothing was saved)."""

    def __init__(self, signum: int, checkpoint_dir: Path | None = None, where: str = "", forced: bool = False) -> None:
        self.signum = signum
        self.checkpoint_dir = checkpoint_dir
        name = signal_name(signum)
        if forced:
            message = f"Interrupted by a second {name}; stopped at once (any earlier epoch checkpoint is kept)."
        elif checkpoint_dir is None:
            message = f"Interrupted by {name}; nothing was saved."
        else:
            message = f"Interrupted by {name}; saved a checkpoint {where} in '{checkpoint_dir}'."
        super().__init__(message)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopSignals:
    """Context manager that turns SIGINT/SIGTERM into a polite stop request (main thread only; elsewhere a no-op)."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled and threading.current_thread() is threading.main_thread()
        self.received: int | None = None
        self._deferring = False
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.received is not None

    def __enter__(self) -> StopSignals:
        if self.enabled:
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """Inside this block a first signal only sets `received`; the code polls `requested` at safe points."""
        self._deferring = True
        try:
            yield
        finally:
            self._deferring = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.received is None
        self.received = signum
        if not first:
            raise RunInterrupted(signum, forced=True)
        if not self._deferring:
            raise RunInterrupted(signum)
