"""``torchdeq.solver.broyden``: ``broyden_solver`` on deq_fast's engine, and the low-rank products.

The inverse-Jacobian estimate is ``H = -I + U V^T`` with ``U`` ``(B, D, n)`` and ``V^T``
``(B, n, D)`` (TorchDEQ's layout).
"""
from __future__ import annotations

import torch

from deq_fast.compat.torchdeq import broyden_solver
from deq_fast.solvers.linesearch import armijo_search

# torchdeq's module namespace: these helpers are importable from here, as in torchdeq
from .utils import (
    batch_flatten as batch_flatten,
    init_solver_info as init_solver_info,
    solver_stat_from_info as solver_stat_from_info,
    update_state as update_state,
)

__all__ = ["broyden_solver"]


def scalar_search_armijo(phi, phi0, derphi0, c1=1e-4, alpha0=1, amin=0):
    """TorchDEQ's Armijo backtracking: ``(alpha, phi(alpha), iterations)``, ``alpha=None`` on
    failure (:func:`deq_fast.solvers.linesearch.armijo_search`)."""
    return armijo_search(phi, phi0, derphi0, c1=c1, alpha0=alpha0, amin=amin)


def line_search(update, x0, g0, g, nstep=0, on=True):
    """TorchDEQ's line search along ``update`` from ``x0`` (``g0 = g(x0)``), whole-batch norm.

    Returns:
        ``(x_est, g(x_est), x_est - x0, g(x_est) - g0, iterations)``.
    """
    last = {0.0: g0}

    def phi(s):
        if s not in last:
            last.clear()
            last[s] = g(x0 + s * update)
        value = float(torch.linalg.vector_norm(last[s]) ** 2)
        return value if value == value else float("inf")

    s, ite = None, 0
    if on:
        s, _, ite = armijo_search(phi, phi(0.0), -phi(0.0), amin=1e-2)
    s = 1.0 if s is None else s
    x_est = x0 + s * update
    g_new = last[s] if s in last else g(x_est)
    return x_est, g_new, x_est - x0, g_new - g0, ite


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
