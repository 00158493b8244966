"""Checks and packing at the boundary of every solver API (native and drop-in).

Errors are ``ValueError`` naming the argument and what was expected, raised before any work.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from deq_fast.ops import backends
from deq_fast.solvers.packing import Packer, State

__all__ = ["validate_common", "check_int", "prepare"]


def check_int(value, name: str, low: int) -> None:
    """``value`` must be an int (not a bool) ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def validate_common(*, max_iter, tol, stop_mode) -> None:
    """Boundary checks shared by every API (ValueError naming the argument)."""
    check_int(max_iter, "max_iter", 0)
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or math.isnan(tol) or tol < 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if stop_mode not in ("abs", "rel"):
        raise ValueError(f"stop_mode must be 'abs' or 'rel', got {stop_mode!r}")


def prepare(func: Callable, x0: State, backend: Optional[str]
            ) -> tuple[Packer, Callable[[torch.Tensor], torch.Tensor], torch.Tensor, str]:
    """Pack ``x0``, wrap ``func`` to ``(B, D) -> (B, D)`` and resolve the backend.

    Returns:
        ``(packer, flat_f, x0_flat, backend)``; ``x0_flat`` is a detached contiguous ``(B, D)``.
    """
    if not callable(func):
        raise ValueError(f"func must be callable, got {type(func).__name__}")
    packer = Packer(x0, "x0")
    x0_flat = packer.pack(x0).detach().contiguous()
    return packer, packer.wrap(func, "f"), x0_flat, _resolve(x0_flat.device.type, backend)


@torch.compiler.assume_constant_result
def _resolve(device_type: str, backend: Optional[str]) -> str:
    # under torch.compile, Dynamo calls this at trace time and keeps the name as a constant (the
    # environment and Triton's import are read then, not traced)
    return backends.resolve_backend(torch.device(device_type), backend)
