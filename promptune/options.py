"""The option checks the commands share, run before anything is loaded; each failure is one sentence naming the flag."""

from __future__ import annotations

import math
from typing import Sequence

from promptune.errors import PromptuneError

MAX_BATCH_SIZE = 65_536
MAX_WORKERS = 256
DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")  # here, not in runtime.py, so that --help shows them without torch
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")


def check_number(name: str, value: float | int | None, minimum: float = 1, maximum: float | None = None) -> None:
    """`value` of the flag `name` is finite and within [minimum, maximum] (None: not given, nothing to check)."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise PromptuneError(f"{name} must be a finite number, got {value}.")
    if value < minimum or (maximum is not None and value > maximum):
        low = _number(minimum)
        bound = f"between {low} and {_number(maximum)}" if maximum is not None else f"at least {low}"
        raise PromptuneError(f"{name} must be {bound}, got {_number(value)}.")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """`value` of the flag `name` is one of `choices`."""
    if value not in choices:
        raise PromptuneError(f"Unknown {name} '{value}'; choose one of: {', '.join(choices)}.")


def _number(value: float | int) -> str:
    """Whole numbers in full (a seed of 2**64 must not read as 1.84467e+19), others short."""
    if isinstance(value, int) and abs(value) < 10**24:
        return str(value)
    return f"{value:g}"


def check_loader_options(batch_size: int | None, workers: int | None) -> None:
    """The --batch-size and --workers every command shares; checked before anything is loaded."""
    check_number("--batch-size", batch_size, 1, MAX_BATCH_SIZE)
    check_number("--workers", workers, 0, MAX_WORKERS)


def check_predict_options(top_k: int, batch_size: int, workers: int | None) -> None:
    if top_k < 1:
        raise PromptuneError(f"--top-k must be at least 1, got {top_k}.")
    check_loader_options(batch_size, workers)
