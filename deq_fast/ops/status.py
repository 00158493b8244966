"""``deq_fast::track_status``: per-iteration residual bookkeeping, kept on the device.

One call per solver iteration, once the iterate's squared norms are known. It never syncs with the
host; the solver loop reads ``active`` only every ``check_every`` iterations.

Math (``s = sq`` per sample, or ``sq`` summed over the batch when ``whole_batch``)::

    abs  = sqrt(s[:, 0])                       # ||f(x) - x||
    rel  = abs / (sqrt(s[:, 1]) + rel_eps)     # ||f(x) - x|| / ||f(x)||
    vals = [abs, rel]                          # [B, 2]
    imp  = active & (vals < lowest)            # per mode; (active & finite) if always_update
    lowest    = where(imp, vals, lowest)
    best_step = where(imp, step, best_step)
    trace[t]  = where(active, vals, lowest)    # a stopped sample repeats its lowest (TorchDEQ pads so)
    improved  = imp[:, stop_idx]               # -> copy this iterate into the best-so-far buffer
    keep      = vals[:, stop_idx] >= tol       # False when converged or not finite
    active   &= keep                                     (stop_together=False: per sample)
    active   &= isfinite(vals[:, stop_idx]) & any(active & keep)   (stop_together=True)

NaN never enters ``lowest`` (comparisons with NaN are false) and a non-finite sample stops at once,
keeping its best finite iterate. Shapes: ``sq [B, 2]``, ``lowest``/``best_step [B, 2]``,
``trace [T, B, 2]`` in the accumulation dtype (float32, or float64 for float64 states);
``active``/``improved [B]`` bool. Bytes moved: O(B), negligible next to the O(B·D) passes.
"""
from __future__ import annotations

import torch

__all__ = ["track_status_reference"]


def track_status_reference(sq: torch.Tensor, lowest: torch.Tensor, best_step: torch.Tensor,
                           trace: torch.Tensor, active: torch.Tensor, improved: torch.Tensor,
                           t: int, step: float, tol: float, stop_idx: int, whole_batch: bool,
                           stop_together: bool, always_update: bool, rel_eps: float) -> None:
    """Pure-torch ``track_status`` (in place; see the module docstring for the math).

    Written for few ATen ops per call: this runs every iteration of the torch path.
    """
    vals = (sq.sum(0, keepdim=True) if whole_batch else sq).sqrt()      # [B or 1, 2]
    vals[:, 1:].add_(rel_eps).reciprocal_().mul_(vals[:, :1])
    if whole_batch:
        vals = vals.expand_as(lowest)
    act = active[:, None]
    if always_update:
        imp = act & torch.isfinite(vals)
    else:
        imp = torch.lt(vals, lowest).logical_and_(act)
    torch.where(imp, vals, lowest, out=lowest)
    best_step.masked_fill_(imp, step)
    torch.where(act, vals, lowest, out=trace[t])
    improved.copy_(imp[:, stop_idx])
    v = vals[:, stop_idx]
    keep = v >= tol
    if stop_together:
        active &= torch.isfinite(v).logical_and_((keep & active).any())
    else:
        active &= keep
