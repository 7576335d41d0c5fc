"""Where this process stands among torchrun's processes, and `tune --gpus N`: N local processes through PyTorch's own
elastic launcher (the engine torchrun runs), so nobody has to type torchrun on one machine.

This module does not import torch until `run_local` is called (the CLI reads the process's place before anything).
"""

from __future__ import annotations

import logging
import os
import sys
import uuid
from dataclasses import dataclass

LAUNCHED_BY = "PROMPTUNE_LAUNCHED_BY"  # set to "gpus" in the processes that `run_local` starts
SHUTDOWN_SECONDS = 120  # how long the launcher lets its processes finish a step and save a checkpoint on a signal


@dataclass(frozen=True)
class Place:
    """This process among all processes of the run (torchrun's RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE)."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    local_world_size: int = 1

    @property
    def is_primary(self) -> bool:
        return self.rank == 0


def place() -> Place:
    """From the environment torchrun (or `run_local`) gives each process; a plain run is rank 0 of 1."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Place()
    return Place(int(env.get("RANK", "0")), int(env.get("LOCAL_RANK", "0")), world,
                 int(env.get("LOCAL_WORLD_SIZE", str(world))))


def launched_by_gpus() -> bool:
    """Was this process started by `tune --gpus` (rather than by torchrun directly)?"""
    return os.environ.get(LAUNCHED_BY) == "gpus"


def run_local(processes: int, argv: list[str]) -> int:
    """Run `python -m promptune ARGV` in `processes` processes on this machine; returns the exit code to use.

    The launcher forwards SIGINT / SIGTERM to every process (each stops at the same step and rank 0 saves the
    checkpoint) and waits up to SHUTDOWN_SECONDS for them. A process that fails makes it stop the others.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # promptune's processes speak for it
    os.environ.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_SECONDS))  # read by LaunchConfig
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=f"promptune-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
    )
    os.environ[LAUNCHED_BY] = "gpus"
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "promptune", *argv)
    except SignalException as stopped:
        return 128 + int(stopped.sigval)
    except ChildFailedError as failed:
        codes = [failure.exitcode for _, failure in sorted(failed.failures.items())]
        return next((code for code in codes if code > 0), 1)
    finally:
        os.environ.pop(LAUNCHED_BY, None)
    return 0
