"""``torchdeq.solver.stat``: ``SolverStat``, the solver statistics dict."""
from __future__ import annotations

import torch

from deq_fast.compat.torchdeq import SolverStat as _EngineStat

_KEYS = ("abs_lowest", "rel_lowest", "abs_trace", "rel_trace", "nstep", "sradius")


class SolverStat(_EngineStat):
    """``abs_lowest``, ``rel_lowest`` ``(B,)``, ``abs_trace``, ``rel_trace`` ``(B, N)``, ``nstep``
    ``(B,)``, ``sradius``; missing keys default to ``-1`` tensors as in TorchDEQ.

    Example:
        >>> SolverStat()["nstep"]
        tensor([-1.])
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for key in _KEYS:
            if key not in self:
                self[key] = torch.tensor([[-1.0]] if key.endswith("trace") else [-1.0])

    @classmethod
    def from_solver_info(cls, stop_mode: str, lowest_dict: dict, trace_dict: dict,
                         lowest_step_dict: dict) -> "SolverStat":
        """Statistics from the per-mode lowest residuals, traces and steps."""
        return cls(abs_lowest=lowest_dict["abs"], rel_lowest=lowest_dict["rel"],
                   abs_trace=torch.stack(trace_dict["abs"], dim=1),
                   rel_trace=torch.stack(trace_dict["rel"], dim=1),
                   nstep=lowest_step_dict[stop_mode])

    @classmethod
    def from_final_step(cls, z, fz, nstep: float = 0) -> "SolverStat":
        """Statistics of one step ``z -> fz`` (tensors or lists of ``(B, ...)`` tensors):
        ``abs = ||fz - z||``, ``rel = abs / (||fz|| + 1e-8)`` per sample, ``nstep`` repeated."""
        if not torch.is_tensor(z):
            z = torch.cat([t.flatten(start_dim=1) for t in z], dim=1)
            fz = torch.cat([t.flatten(start_dim=1) for t in fz], dim=1)
        diff = (fz - z).flatten(start_dim=1) if z.dim() > 0 else (fz - z).reshape(1, 1)
        absn = diff.norm(dim=1)
        fzn = fz.flatten(start_dim=1) if fz.dim() > 0 else fz.reshape(1, 1)
        reln = absn / (fzn.norm(dim=1) + 1e-8)
        return cls(abs_lowest=absn, rel_lowest=reln, abs_trace=absn[:, None],
                   rel_trace=reln[:, None], nstep=torch.full_like(absn, float(nstep)))
