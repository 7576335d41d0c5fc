"""Where a run executes: one device, one autocast dtype, and this process's place among torchrun's processes.

A `Runtime` is made once per command from the user's --device / --precision and the torchrun environment (RANK,
LOCAL_RANK, WORLD_SIZE); the trainer, the model's forward passes and `TunedModel` take it. A plain run is one
process, rank 0 of 1: every collective below then returns its input at once and torch.distributed is never touched.
Under torchrun each process joins one process group (nccl on CUDA, gloo on CPU) and works on cuda:LOCAL_RANK.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from promptune.errors import DeviceError, PromptuneError
from promptune.launch import Place, place
from promptune.options import DEVICE_CHOICES, PRECISION_CHOICES

T = TypeVar("T")
# Rank 0 alone scans (and decodes) the training images while the others wait for the result: far longer than
# torch's default collective timeout on a large folder. A dead process still ends the run at once under torchrun.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


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
    local_world_size: int = 1  # processes on this machine (LOCAL_WORLD_SIZE)
    cpu_threads: int = 0  # CPU threads torch uses in this process (0: not configured)

    @classmethod
    def create(cls, device: str = "auto", precision: str = "auto") -> Runtime:
        """The runtime of this process: resolves --device / --precision, joins torchrun's process group when there is
        one, and configures the backend; once per command."""
        where = place()
        torch_device = resolve_device(device) if where.world_size == 1 else _rank_device(device, where)
        amp_dtype = resolve_precision(torch_device, precision)
        if where.world_size > 1:
            _join_process_group(torch_device)
        threads = configure_backend(torch_device, where.local_world_size)
        return cls(torch_device, amp_dtype, where.rank, where.local_rank, where.world_size, where.local_world_size,
                   threads)

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

    def cast_frozen(self, module: nn.Module) -> int:
        """On CUDA with bf16/fp16 autocast, `cast_frozen_weights(module, amp_dtype)`; elsewhere nothing (the CPU keeps
        fp32 weights). Returns how many tensors were cast."""
        if self.device.type != "cuda" or self.amp_dtype == torch.float32:
            return 0
        return cast_frozen_weights(module, self.amp_dtype)

    # ----- collectives (each returns at once in a plain run) ---------------------------------------------------------
    def wrap(self, module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        """`module` under DistributedDataParallel: its gradients are averaged over the processes in backward.

        Only the parameters that learn take part: frozen parameters and buffers are identical everywhere (loaded
        from the same weights), so DDP neither broadcasts them at the start nor each step. A plain run returns
        `module` itself.
        """
        if not self.distributed:
            return module
        fixed = [name for name, p in module.named_parameters() if not p.requires_grad]
        fixed += [name for name, _ in module.named_buffers()]
        nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, fixed)
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(module, device_ids=device_ids,
                                                   find_unused_parameters=find_unused_parameters)

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the processes, in place (every process gets the same sum); returns it."""
        if self.distributed:
            dist.all_reduce(tensor)
        return tensor

    def all_sum(self, values: list[float]) -> list[float]:
        """The sums of a few numbers over the processes (counts, flags, running totals)."""
        if not self.distributed:
            return values
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.all_reduce(total).tolist()

    def any(self, flag: bool) -> bool:
        """True on every process when it is true on any (a stop request, a diverged loss)."""
        return bool(self.all_sum([float(flag)])[0]) if self.distributed else flag

    def broadcast(self, value: T) -> T:
        """Rank 0's `value` (any picklable object), on every process."""
        if not self.distributed:
            return value
        box = [value if self.is_primary else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather(self, value: T) -> list[T]:
        """Every process's `value`, in rank order, on every process."""
        if not self.distributed:
            return [value]
        values: list[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        """Wait until every process gets here."""
        if not self.distributed:
            return
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()

    def on_primary(self, action: Callable[[], T]) -> T:
        """`action()` run by rank 0 alone, its result on every process; a user mistake it raises is raised on every
        process (so none waits for a result that never comes)."""
        if not self.distributed:
            return action()
        outcome: tuple[T | None, PromptuneError | None] = (None, None)
        if self.is_primary:
            try:
                outcome = (action(), None)
            except PromptuneError as error:
                outcome = (None, error)
        result, error = self.broadcast(outcome)
        if error is not None:
            raise error
        return result


# The modules whose weights autocast casts to its low-precision dtype in every forward (matmuls and convolutions).
_AUTOCAST_LOW_MODULES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.MultiheadAttention)


def cast_frozen_weights(module: nn.Module, dtype: torch.dtype) -> int:
    """Cast, once, the frozen fp32 weights that autocast would cast to `dtype` in every forward: the weights and biases
    of linear and convolution layers, and the projections of `nn.MultiheadAttention` (open_clip's blocks). Returns how
    many tensors were cast.

    Autocast keeps its casts of tensors that require grad for the whole forward, but re-casts frozen weights at every
    use: about 1,300 copies per SEP step on a ViT-B/16. Cast here, those ops receive the very tensors autocast would
    have made, so outputs and gradients are unchanged. Everything else keeps its dtype: learned parameters (fp32
    master weights), layer norms (autocast runs them, and softmax, in fp32), embeddings, positional and class
    embeddings, projections applied with `@`, buffers. Only for modules that run under CUDA autocast: a forward
    outside it would meet fp32 inputs and low-precision weights. (nn.MultiheadAttention takes its fused inference
    kernel only when its weights have the input's dtype, but never under CUDA autocast, so casting its projections
    changes no kernel there.)
    """
    cast = 0
    for layer in module.modules():
        if not isinstance(layer, _AUTOCAST_LOW_MODULES):
            continue
        for weight in _matmul_weights(layer):
            if weight is not None and not weight.requires_grad and weight.dtype == torch.float32:
                weight.data = weight.data.to(dtype)
                cast += 1
    return cast


def _matmul_weights(layer: nn.Module) -> list[torch.Tensor | None]:
    if isinstance(layer, nn.MultiheadAttention):  # its out_proj is an nn.Linear, reached on its own
        return [layer.in_proj_weight, layer.in_proj_bias, layer.q_proj_weight, layer.k_proj_weight, layer.v_proj_weight]
    return [layer.weight, layer.bias]


def check_processes(processes: int, device: str) -> None:
    """`tune --gpus N` before it starts N processes: N is sensible, and the machine has N GPUs unless --device cpu."""
    if isinstance(processes, bool) or not 1 <= processes <= 1024:
        raise PromptuneError(f"--gpus must be between 1 and 1024, got {processes}.")
    resolve_device(device)  # an unknown or missing device is refused as in one process
    base = device.split(":")[0]
    if base == "mps" or (base == "auto" and not torch.cuda.is_available() and _mps_available()):
        raise DeviceError("--gpus needs CUDA GPUs (or --device cpu); Apple MPS runs one process.")
    if ":" in device:
        raise DeviceError(f"--gpus gives each process a GPU of its own; pass --device cuda instead of --device {device}.")
    if base in ("auto", "cuda") and processes > 1:
        count = torch.cuda.device_count()
        if count < processes:
            have = f"has only {count}" if count else "has none"
            raise DeviceError(
                f"--gpus {processes} needs {processes} CUDA GPUs, but this machine {have}; add --device cpu to train in "
                f"{processes} CPU processes instead."
            )


def _rank_device(device: str, where: Place) -> torch.device:
    """cuda:LOCAL_RANK (or the CPU) for one of several processes."""
    if device.split(":")[0] == "mps":
        raise DeviceError("Several processes need CUDA GPUs (nccl) or the CPU (gloo); Apple MPS runs one process.")
    if ":" in device:
        raise DeviceError(
            f"--device {device} names one device, but each of the {where.world_size} processes takes the GPU of its "
            f"LOCAL_RANK; pass --device cuda (or cpu)."
        )
    base = resolve_device(device)
    if base.type != "cuda":
        return base
    count = torch.cuda.device_count()
    if where.local_rank >= count:
        raise DeviceError(
            f"Process {where.local_rank} on this machine has no GPU of its own: the machine has {count}; start at most "
            f"{count} processes per machine."
        )
    torch.cuda.set_device(where.local_rank)
    return torch.device("cuda", where.local_rank)


def _join_process_group(device: torch.device) -> None:
    """torchrun's process group (its environment says where to meet): nccl on CUDA, gloo on CPU; left at exit."""
    if dist.is_initialized():
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=COLLECTIVE_TIMEOUT)
    atexit.register(_leave_process_group)


def _leave_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def configure_backend(device: torch.device, processes_here: int = 1) -> int:
    """TF32 matmuls on CUDA; on CPU, the machine's cores shared by the processes on it. Returns the CPU threads."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if "OMP_NUM_THREADS" not in os.environ and device.type == "cpu":
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // processes_here))
    return torch.get_num_threads()
