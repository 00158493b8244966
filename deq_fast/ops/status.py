"""``deq_fast::track_status``: per-iteration residual bookkeeping, kept on the device.

One call per solver iteration, once the iterate's squared norms are known. It never syncs with the
host; the solver loop reads ``active`` without a host sync (:mod:`deq_fast.solvers.polling`).

Math (``s = sq`` per sample, or ``sq`` summed over the batch when ``whole_batch``)::

    abs  = sqrt(s[:, 0])                       # ||f(x) - x||
    rel  = abs / (sqrt(s[:, 1]) + rel_eps)     # ||f(x) - x|| / ||f(x)||
    vals = [abs, rel]                          # [B, 2]
    imp  = active & (vals < lowest)            # per mode; (active & vals < inf) if always_update
    lowest    = where(imp, vals, lowest)
    best_step = where(imp, step, best_step)
    trace[t]  = where(active, vals, lowest)    # a stopped sample repeats its lowest (TorchDEQ pads so)
    improved  = imp[:, stop_idx]               # -> copy this iterate into the best-so-far buffer
    v = vals[:, stop_idx];  keep = v >= tol    # False when converged or NaN
    active &= keep                             (stop_together=False: per sample)
    active &= any(active & keep)               (stop_together=True: TorchDEQ's batch rule)

NaN never enters ``lowest`` (comparisons with NaN are false), so a sample whose ``f`` went
non-finite keeps its best finite iterate; per sample it stops at once, and under the batch rule it
no longer holds the batch back (TorchDEQ iterates to ``max_iter`` then). Shapes: ``sq [B, 2]``,
``lowest``/``best_step [B, 2]``, ``trace [T, B, 2]`` in the accumulation dtype (float32, or float64
for float64 states);
``active``/``improved [B]`` bool. Bytes moved: O(B), negligible next to the O(B·D) passes.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from deq_fast.ops._views import view

__all__ = ["track_status_reference"]


def track_status_reference(sq: torch.Tensor, lowest: torch.Tensor, best_step: torch.Tensor,
                           trace: torch.Tensor, active: torch.Tensor, improved: torch.Tensor,
                           t: int, step: float, tol: float, stop_idx: int, whole_batch: bool,
                           stop_together: bool, always_update: bool, rel_eps: float,
                           cache: Optional[dict] = None) -> None:
    """Pure-torch ``track_status`` (in place; see the module docstring for the math).

    Written for few dispatched ops: it runs every iteration of the torch path, with the views
    and scratch buffers cached per solve (``cache``).
    """
    B = sq.shape[0]
    vals = view(cache, sq, "vals", lambda: torch.empty(1 if whole_batch else B, 2, dtype=sq.dtype,
                                                       device=sq.device))
    imp = view(cache, sq, "imp", lambda: torch.empty(B, 2, dtype=torch.bool, device=sq.device))
    keep = view(cache, sq, "keep", lambda: torch.empty(B, dtype=torch.bool, device=sq.device))
    torch.sqrt(sq.sum(0, keepdim=True) if whole_batch else sq, out=vals)
    v_abs = view(cache, vals, "abs", lambda: vals[:, 0])
    v_rel = view(cache, vals, "rel", lambda: vals[:, 1])
    v_rel.add_(rel_eps)
    torch.div(v_abs, v_rel, out=v_rel)
    vb = view(cache, vals, "expanded", lambda: vals.expand(B, 2))
    act = view(cache, active, "col", lambda: active[:, None])
    if always_update:
        torch.lt(vb, math.inf, out=imp)
    else:
        torch.lt(vb, lowest, out=imp)
    imp.logical_and_(act)
    torch.where(imp, vb, lowest, out=lowest)
    best_step.masked_fill_(imp, step)
    torch.where(act, vb, lowest, out=view(cache, trace, t, lambda: trace[t]))
    improved.copy_(view(cache, imp, stop_idx, lambda: imp[:, stop_idx]))
    v = view(cache, vb, stop_idx, lambda: vb[:, stop_idx])
    torch.ge(v, tol, out=keep)
    if stop_together:
        active.logical_and_(keep.logical_and_(active).any())
    else:
        active.logical_and_(keep)
