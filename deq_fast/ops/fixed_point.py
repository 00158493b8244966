"""One fused pass per fixed-point iteration: ``deq_fast::fixed_point_step``.

The damped map ``y = tau·fx + (1 - tau)·x`` (TorchDEQ's formula; ``y = fx`` exactly when
``tau == 1``) is formed inside the pass, so damping costs no extra launch and ``f``'s output
is never modified.

``fixed_point_step(x, fx, best, sq, improved, active, tau=1)``, per sample, in this order::

    best = x  where improved                            # the deferred copy (see below)
    sq[:, 0] = ||y - x||^2;  sq[:, 1] = ||y||^2        (accumulated in sq's dtype)
    x = y     where active                              # a stopped sample stays put
    bytes: read x, fx, write x (active), best (improved)  ->  3·B·D·size (+1 row per improved sample)

The best-iterate copy is deferred by one iteration: ``track_status`` decides ``improved`` from
``sq`` after this pass, and the sample's ``y`` is by then already in ``x`` (``improved`` implies
the sample was active in the pass, so ``x = y`` was written). The next pass, which reads that
``x`` anyway, copies it into ``best``; after the solver's last pass :func:`take_improved` does
the last deferred copy (and before an indexed copy of ``best`` is taken). ``f(x)`` is thus read
once per iteration.
"""
from __future__ import annotations

from typing import Optional

import torch

from deq_fast.ops._views import view

__all__ = ["fixed_point_step_reference", "take_improved"]


def _damped(x: torch.Tensor, fx: torch.Tensor, tau: float) -> torch.Tensor:
    return fx if tau == 1.0 else tau * fx + (1.0 - tau) * x


def take_improved(x: torch.Tensor, best: torch.Tensor, improved: torch.Tensor,
                  cache: Optional[dict] = None) -> None:
    """``best = x`` where ``improved`` (per sample, in place): the deferred best-iterate copy (also
    Broyden's copy at its first and last step, which have no update pass)."""
    torch.where(view(cache, improved, "col", lambda: improved[:, None]), x, best, out=best)


def fixed_point_step_reference(x: torch.Tensor, fx: torch.Tensor, best: torch.Tensor,
                               sq: torch.Tensor, improved: torch.Tensor, active: torch.Tensor,
                               tau: float = 1.0, cache: Optional[dict] = None) -> None:
    """Pure-torch fixed-point step (in place; see the module docstring). ``cache``: see
    ``_views``."""
    take_improved(x, best, improved, cache)
    acc = sq.dtype
    y = _damped(x, fx, tau)
    g = torch.sub(y, x) if y.dtype == acc else torch.sub(y, x).to(acc)
    torch.linalg.vector_norm(g, dim=1, dtype=acc, out=view(cache, sq, 0, lambda: sq[:, 0]))
    torch.linalg.vector_norm(y, dim=1, dtype=acc, out=view(cache, sq, 1, lambda: sq[:, 1]))
    sq.square_()
    torch.where(view(cache, active, "col", lambda: active[:, None]), y, x, out=x)
