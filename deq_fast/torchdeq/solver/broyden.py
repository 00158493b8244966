"""``torchdeq.solver.broyden``: ``broyden_solver`` on deq_fast's engine, and the low-rank products.

The inverse-Jacobian estimate is ``H = -I + U V^T`` with ``U`` ``(B, D, n)`` and ``V^T``
``(B, n, D)`` (TorchDEQ's layout).
"""
from __future__ import annotations

import torch

from deq_fast.compat.torchdeq import broyden_solver

from .utils import batch_flatten, init_solver_info, solver_stat_from_info, update_state

__all__ = ["broyden_solver"]


def rmatvec(part_Us: torch.Tensor, part_VTs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``x^T H = -x^T + (x^T U) V^T`` for ``x`` ``(B, D)``; empty factors give ``-x``."""
    if part_Us is None or part_Us.numel() == 0:
        return -x
    return -x + torch.einsum("bd,bdn,bnk->bk", x, part_Us, part_VTs)


def matvec(part_Us: torch.Tensor, part_VTs: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``H x = -x + U (V^T x)`` for ``x`` ``(B, D)``; empty factors give ``-x``."""
    if part_Us is None or part_Us.numel() == 0:
        return -x
    return -x + torch.einsum("bdn,bnk,bk->bd", part_Us, part_VTs, x)
