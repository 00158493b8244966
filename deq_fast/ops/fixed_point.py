"""Per-sample residual norms and the fixed-point advance: ``deq_fast::residual_norms`` and
``deq_fast::fixed_point_advance``.

``residual_norms(x, fx, sq)``::

    sq[:, 0] = ||fx - x||^2;  sq[:, 1] = ||fx||^2      (accumulated in sq's dtype)
    bytes: read x, fx  ->  2·B·D·size

``fixed_point_advance(x, fx, best, improved, active)``::

    best = fx where improved;  x = fx where active     (a stopped sample stays put)
    bytes: read fx, x, best; write x, best (masked)  ->  up to 5·B·D·size
"""
from __future__ import annotations

import torch

__all__ = ["residual_norms_reference", "fixed_point_advance_reference"]


def residual_norms_reference(x: torch.Tensor, fx: torch.Tensor, sq: torch.Tensor) -> None:
    """Pure-torch residual norms (in place into ``sq [B, 2]``)."""
    acc = sq.dtype
    g = fx - x
    if g.dtype != acc:
        g, fx = g.to(acc), fx.to(acc)
    torch.stack((torch.linalg.vecdot(g, g), torch.linalg.vecdot(fx, fx)), dim=1, out=sq)


def fixed_point_advance_reference(x: torch.Tensor, fx: torch.Tensor, best: torch.Tensor,
                                  improved: torch.Tensor, active: torch.Tensor) -> None:
    """Pure-torch advance (in place; see the module docstring)."""
    torch.where(improved[:, None], fx, best, out=best)
    torch.where(active[:, None], fx, x, out=x)
