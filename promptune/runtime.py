"""Where a run executes: one device, one autocast dtype, and this process's place among torchrun's processes.

A `Runtime` is made once per command from the user's --device / --precision; the trainer, the model's forward
passes and `TunedModel` take it instead of a (device, dtype) pair.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from promptune.errors import DeviceError
from promptune.options import DEVICE_CHOICES, PRECISION_CHOICES


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
    if precision not in PRECISION_CHOICES:
        raise DeviceError(f"Unknown precision '{precision}'; choose one of: {', '.join(PRECISION_CHOICES)}.")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return torch.float32
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if precision == "bf16" else torch.float16


@dataclass(frozen=True)
class Runtime:
    """The device and autocast dtype of this process, and its rank among `world_size` processes (1: a plain run)."""

    device: torch.device
    amp_dtype: torch.dtype = torch.float32  # fp32 = no autocast
    rank: int = 0  # this process among all processes (torchrun's RANK)
    local_rank: int = 0  # this process among those on its machine (LOCAL_RANK)
    world_size: int = 1  # processes in the run (WORLD_SIZE)
    cpu_threads: int = 0  # CPU threads torch uses in this process (0: not configured)

    @classmethod
    def create(cls, device: str = "auto", precision: str = "auto") -> Runtime:
        """The runtime of this process: resolves --device / --precision and configures the backend, once."""
        torch_device = resolve_device(device)
        amp_dtype = resolve_precision(torch_device, precision)
        return cls(torch_device, amp_dtype, cpu_threads=configure_backend(torch_device))

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_primary(self) -> bool:
        """Rank 0: the one process that writes files and talks to the user."""
        return self.rank == 0

    @property
    def precision(self) -> str:
        return str(self.amp_dtype).replace("torch.", "")

    def autocast(self) -> contextlib.AbstractContextManager:
        """Mixed precision for the forward passes; a no-op in fp32."""
        if self.amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)


def configure_backend(device: torch.device) -> int:
    """TF32 matmuls on CUDA; a sensible CPU thread count. Returns the CPU threads in use."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if "OMP_NUM_THREADS" not in os.environ and device.type == "cpu":
        torch.set_num_threads(max(1, os.cpu_count() or 1))
    return torch.get_num_threads()
