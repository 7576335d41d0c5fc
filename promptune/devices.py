"""Device and precision choice: cuda, else mps, else cpu; autocast on CUDA only."""

from __future__ import annotations

import contextlib
import os
from typing import Literal

import torch

from promptune.errors import DeviceError

DeviceName = Literal["auto", "cuda", "mps", "cpu"]
Precision = Literal["auto", "fp32", "bf16", "fp16"]
DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")


def _mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def resolve_device(name: str = "auto") -> torch.device:
    """Turn a --device value into a torch.device, failing clearly when it is not on this machine."""
    base = name.split(":")[0]
    if base not in DEVICE_CHOICES:
        raise DeviceError(f"Unknown device '{name}'; choose one of: {', '.join(DEVICE_CHOICES)}.")
    if base == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    if base == "cuda" and not torch.cuda.is_available():
        raise DeviceError("--device cuda was asked for but no CUDA GPU is available on this machine (try --device auto).")
    if base == "mps" and not _mps_available():
        raise DeviceError("--device mps was asked for but Apple MPS is not available on this machine (try --device auto).")
    try:
        return torch.device(name)
    except (RuntimeError, ValueError):  # e.g. "cpu:abc" or "cuda:x:y": the base is known, the index is not
        choices = ", ".join(DEVICE_CHOICES)
        raise DeviceError(f"Unknown device '{name}'; choose one of: {choices} (cuda:N for one GPU).") from None


def resolve_precision(device: torch.device, precision: str = "auto") -> torch.dtype:
    """The autocast dtype: bf16 (or fp16) on CUDA by default, fp32 elsewhere unless asked."""
    if precision not in ("auto", "fp32", "bf16", "fp16"):
        raise DeviceError(f"Unknown precision '{precision}'; choose one of: auto, fp32, bf16, fp16.")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return torch.float32
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def configure_backend(device: torch.device) -> int:
    """TF32 matmuls on CUDA; a sensible CPU thread count. Returns the CPU threads in use."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if "OMP_NUM_THREADS" not in os.environ and device.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    return torch.get_num_threads()
