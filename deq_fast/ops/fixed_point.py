"""Per-sample residual norms and the fixed-point advance: ``deq_fast::residual_norms`` and
``deq_fast::fixed_point_advance``.

The damped map ``y = tau·fx + (1 - tau)·x`` (TorchDEQ's formula; ``y = fx`` exactly when
``tau == 1``) is formed inside both passes, so damping costs no extra launch and ``f``'s output
is never modified.

``residual_norms(x, fx, sq, tau=1)``::

    sq[:, 0] = ||y - x||^2;  sq[:, 1] = ||y||^2        (accumulated in sq's dtype)
    bytes: read x, fx  ->  2·B·D·size

``fixed_point_advance(x, fx, best, improved, active, tau=1)``::

    best = y where improved;  x = y where active       (a stopped sample stays put)
    bytes: read fx (and x when damped), write x, best (masked)  ->  up to 4·B·D·size
"""
from __future__ import annotations

from typing import Optional

import torch

from deq_fast.ops._views import view

__all__ = ["residual_norms_reference", "fixed_point_advance_reference"]


def _damped(x: torch.Tensor, fx: torch.Tensor, tau: float) -> torch.Tensor:
    return fx if tau == 1.0 else tau * fx + (1.0 - tau) * x


def residual_norms_reference(x: torch.Tensor, fx: torch.Tensor, sq: torch.Tensor, tau: float = 1.0,
                             cache: Optional[dict] = None) -> None:
    """Pure-torch residual norms (in place into ``sq [B, 2]``). ``cache``: see ``_views``."""
    acc = sq.dtype
    fx = _damped(x, fx, tau)
    g = torch.sub(fx, x) if fx.dtype == acc else torch.sub(fx, x).to(acc)
    torch.linalg.vector_norm(g, dim=1, dtype=acc, out=view(cache, sq, 0, lambda: sq[:, 0]))
    torch.linalg.vector_norm(fx, dim=1, dtype=acc, out=view(cache, sq, 1, lambda: sq[:, 1]))
    sq.square_()


def fixed_point_advance_reference(x: torch.Tensor, fx: torch.Tensor, best: torch.Tensor,
                                  improved: torch.Tensor, active: torch.Tensor, tau: float = 1.0,
                                  cache: Optional[dict] = None) -> None:
    """Pure-torch advance (in place; see the module docstring). ``cache``: see ``_views``."""
    fx = _damped(x, fx, tau)
    torch.where(view(cache, improved, "col", lambda: improved[:, None]), fx, best, out=best)
    torch.where(view(cache, active, "col", lambda: active[:, None]), fx, x, out=x)
