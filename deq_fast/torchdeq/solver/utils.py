"""``torchdeq.solver.utils``: the bookkeeping helpers of TorchDEQ's solvers.

Fixed against TorchDEQ: :func:`batch_masked_mixing` selects with ``torch.where``, so a NaN in the
rejected candidate does not poison the kept one (TorchDEQ mixes arithmetically, COMPAT.md B).
"""
from __future__ import annotations

import torch

from .stat import SolverStat


def init_solver_info(bsz: int, device=None, init_loss: float = 1e8):
    """``(trace_dict, lowest_dict, lowest_step_dict)`` for modes ``'abs'``/``'rel'``: traces start
    with one ``init_loss`` row, lowests at ``init_loss``, steps at 0."""
    full = lambda v: torch.full((bsz,), float(v), device=device)  # noqa: E731
    return ({m: [full(init_loss)] for m in ("abs", "rel")},
            {m: full(init_loss) for m in ("abs", "rel")},
            {m: full(0.0) for m in ("abs", "rel")})


def batch_masked_mixing(mask: torch.Tensor, mask_var, orig_var):
    """Per sample: ``mask_var`` where ``mask`` (shape ``(B,)``) is true, else ``orig_var``."""
    ref = mask_var if torch.is_tensor(mask_var) else orig_var
    if not torch.is_tensor(ref):
        raise ValueError("batch_masked_mixing: mask_var or orig_var must be a tensor")
    mask = mask.bool().view(mask.shape[0], *([1] * (ref.dim() - 1)))
    return torch.where(mask, torch.as_tensor(mask_var, device=ref.device),
                       torch.as_tensor(orig_var, device=ref.device))


def batch_flatten(x: torch.Tensor) -> torch.Tensor:
    """``(B, ...) -> (B, D)``; a 1-D (or 0-d) tensor is a batch of scalars ``(N, 1)``."""
    return x.flatten(start_dim=1) if x.dim() >= 2 else x.reshape(x.numel(), 1)


def update_state(lowest_xest, x_est, nstep, stop_mode, abs_diff, rel_diff, trace_dict,
                 lowest_dict, lowest_step_dict, return_final: bool = False):
    """Append the residuals to the traces, keep each sample's lowest (per mode) with its step and,
    for ``stop_mode``, its estimate; returns the kept estimate (detached)."""
    diff = {"abs": abs_diff, "rel": rel_diff}
    trace_dict["abs"].append(abs_diff)
    trace_dict["rel"].append(rel_diff)
    for mode in ("rel", "abs"):
        better = (diff[mode] < lowest_dict[mode]) | bool(return_final)
        if mode == stop_mode:
            lowest_xest = batch_masked_mixing(better, x_est, lowest_xest).clone().detach()
        lowest_dict[mode] = batch_masked_mixing(better, diff[mode], lowest_dict[mode])
        lowest_step_dict[mode] = batch_masked_mixing(better, nstep, lowest_step_dict[mode])
    return lowest_xest


def solver_stat_from_info(stop_mode, lowest_dict, trace_dict, lowest_step_dict) -> SolverStat:
    """:class:`SolverStat` from the dicts of :func:`init_solver_info`."""
    return SolverStat.from_solver_info(stop_mode, lowest_dict, trace_dict, lowest_step_dict)


def solver_stat_from_final_step(z, fz, nstep: float = 0) -> SolverStat:
    """Statistics of one step ``z -> fz`` (see :meth:`SolverStat.from_final_step`).

    Example:
        >>> z = torch.ones(2, 4); f = lambda z: 0.5 * z
        >>> info = solver_stat_from_final_step(z, f(z), nstep=1)
        >>> info["abs_lowest"], info["nstep"]                  # ||f(z) - z|| per sample
        (tensor([1., 1.]), tensor([1., 1.]))
    """
    return SolverStat.from_final_step(z, fz, nstep=nstep)


def dummy_solver_stat() -> SolverStat:
    """A :class:`SolverStat` of ``-1`` placeholders."""
    return SolverStat()
