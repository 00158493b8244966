"""Processes: the ranks of a ``torchrun`` launch (one process without it), collective helpers
that are no-ops in a single process, device choice and the DistributedDataParallel wrapper.

Multi-process runs use gloo on CPU and NCCL on GPU; ``--batch_size`` is the global batch.
"""
from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist

from deq_fast.train.config import TrainingError

__all__ = ["Ranks", "pick_device", "wrap_ddp", "shutdown"]


class Ranks:
    """Process-group facts read from ``torchrun``'s environment; world size 1 without it."""

    def __init__(self, single: bool = False) -> None:
        """Args:
            single: ignore the environment and describe one process (evaluation).
        """
        env = {} if single else os.environ
        self.world = int(env.get("WORLD_SIZE", "1"))
        self.rank = int(env.get("RANK", "0"))
        self.local_rank = int(env.get("LOCAL_RANK", "0"))
        self.local_world = int(env.get("LOCAL_WORLD_SIZE", str(self.world)))
        self.enabled = self.world > 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that writes files and logs."""
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        """Join the process group (once; only with more than one process)."""
        if self.enabled and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    def sum(self, values: list[float], device: torch.device) -> list[float]:
        """Element-wise sum over ranks (float64)."""
        if not self.enabled:
            return values
        t = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return t.tolist()

    def all_true(self, flag: bool, device: torch.device) -> bool:
        """True iff ``flag`` is true on every rank."""
        if not self.enabled:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=device)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item() > 0)

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order."""
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.enabled:
            dist.barrier()


def pick_device(name: str, ranks: Ranks) -> torch.device:
    """The device of ``--device`` (``auto``: CUDA if available); with several processes on CUDA,
    each rank's local GPU.

    Args:
        name: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        ranks: the processes of the run.

    Returns:
        the torch device.

    Raises:
        TrainingError: not a device, CUDA not available, or neither CPU nor CUDA.
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise TrainingError(f"--device {name!r} is not a device (expected auto, cpu, cuda, "
                            "cuda:N)") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainingError(f"--device {name}: CUDA is not available on this machine")
        if ranks.enabled:
            device = torch.device("cuda", ranks.local_rank)
    elif device.type != "cpu":
        raise TrainingError(f"--device {name!r}: only cpu and cuda are supported")
    return device


def wrap_ddp(model: torch.nn.Module, device: torch.device, ranks: Ranks) -> torch.nn.Module:
    """``model`` in DistributedDataParallel with more than one process, else ``model`` itself."""
    if not ranks.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model,
                                   device_ids=[device.index] if device.type == "cuda" else None)


def shutdown() -> None:
    """Leave the process group if this process joined one."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
