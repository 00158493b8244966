"""The native solver API: :func:`solve` returning a :class:`SolveResult` with everything the
engine knows (per-sample residuals and convergence, evaluations used, device-side traces, the
Broyden factors, the backend that ran).

Defaults differ from the drop-in APIs where the references are known to be weak: per-sample
stopping (a sample's result never depends on the rest of the batch) and an Anderson ridge scaled to
the Gram matrix (an absolute ridge swamps the Gram matrix once residuals are small,
docs/contracts.md#torchdeq-solvers).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch

from deq_fast.solvers import engine
from deq_fast.solvers.boundary import check_int, prepare, validate_common
from deq_fast.solvers.packing import State
from deq_fast.solvers.registry import METHODS

__all__ = ["solve", "SolveResult", "METHODS"]

@dataclasses.dataclass
class SolveResult:
    """Result of :func:`solve`. Tensors stay on the solver's device; nothing here synced.

    Attributes:
        z: the per-sample lowest-residual estimate, with ``x0``'s structure.
        abs_lowest, rel_lowest: ``[B]`` lowest ``||f(z) - z||`` and ``... / ||f(z)||``.
        nstep: ``[B]`` evaluation count at which the lowest (stop-mode) residual was reached.
        converged: ``[B]`` bool, lowest stop-mode residual under ``tol``.
        nonfinite: ``[B]`` bool, ``f`` produced a non-finite value for this sample (it was stopped
            and keeps its best finite estimate, ``x0`` at worst).
        abs_trace, rel_trace: ``[B, T]`` residual per tracked evaluation (stopped samples repeat
            their lowest value).
        nfe: evaluations of ``f`` made.
        factors: Broyden's inverse-Jacobian factors ``(U, V)``, each ``[B, L, D]`` on the flattened
            state: ``H = -I + sum_l U[:, l] V[:, l]^T ≈ (J_f - I)^{-1}``; ``None`` for other methods.
        method: what ran; backend: what ran its per-iteration passes: ``'reference'`` (pure
            torch), ``'cpp'`` (C++ CPU kernels) or ``'triton'`` (see :mod:`deq_fast.ops.backends`).
    """
    z: State
    abs_lowest: torch.Tensor
    rel_lowest: torch.Tensor
    nstep: torch.Tensor
    converged: torch.Tensor
    nonfinite: torch.Tensor
    abs_trace: torch.Tensor
    rel_trace: torch.Tensor
    nfe: int
    factors: Optional[tuple]
    method: str
    backend: str


def solve(f: Callable[[State], State], x0: State, method: str = "anderson", max_iter: int = 50,
          tol: float = 1e-4, stop_mode: str = "rel", *, m: int = 6, lam: float = 1e-4,
          tau: float = 1.0, memory: Optional[int] = None, check_every: int = 1,
          stop_together: bool = False, backend: Optional[str] = None) -> SolveResult:
    """Find ``z = f(z)`` per sample.

    Args:
        f: the fixed-point map; same structure, shapes and dtype out as in.
        x0: initial estimate: a tensor ``[B, ...]`` (1-D: a batch of scalars) or a tuple/list of
            tensors with batch size ``B`` (multi-resolution states); any floating dtype.
        method: ``'anderson'``, ``'broyden'`` or ``'fixed_point'``.
        max_iter: evaluation budget (Broyden: steps after ``f(x0)``).
        tol, stop_mode: a sample stops once its ``'abs'`` or ``'rel'`` residual is under ``tol``.
        m, lam: Anderson history size and ridge (relative to the mean diagonal of the Gram matrix).
        tau: damping: Anderson's ``beta``, the fixed-point step ``tau·f + (1 - tau)·z``.
        memory: Broyden's number of stored rank-1 updates ``L`` (default ``max_iter``).
        check_every: the host looks at the stop flags after every ``k`` evaluations, without a host
            sync (CPU: a direct read; CUDA: a non-blocking copy read one evaluation later, see
            :mod:`deq_fast.solvers.polling`); ``0`` never looks: exactly ``max_iter`` iterations.
        stop_together: no sample stops before all are under ``tol`` (TorchDEQ's rule). Pass it
            when ``f`` couples the rows of the batch (a graph layer whose rows are nodes, a map
            with batch statistics): freezing a converged row would then change the others.
        backend: ``'auto'``, ``'reference'``, ``'cpp'`` or ``'triton'`` (default:
            ``$DEQ_FAST_BACKEND`` or auto; :mod:`deq_fast.ops.backends`).

    Returns:
        :class:`SolveResult`. The solve builds no autograd graph and ``z`` is detached, whatever
        the grad mode; for gradients through the equilibrium use :func:`deq_fast.get_deq`.

    Example:
        >>> W = 0.5 * torch.eye(8)
        >>> res = solve(lambda z: z @ W + 1.0, torch.zeros(3, 8), tol=1e-6)
        >>> bool(res.converged.all()), res.z.shape
        (True, torch.Size([3, 8]))
    """
    _validate_native(method, max_iter, tol, stop_mode, m, lam, tau, memory, check_every)
    packer, flat_f, x0_flat, resolved = prepare(f, x0, backend)
    opt = engine.Options(method=method, max_iter=max_iter, tol=tol, stop_mode=stop_mode,
                         check_every=check_every, backend=resolved, m=m, lam=lam,
                         scaled_ridge=True, tau=tau, memory=memory, stop_together=stop_together,
                         step_offset=1 if method != "broyden" else 0)
    st = engine.run(flat_f, x0_flat, opt)
    stop_idx = 0 if stop_mode == "abs" else 1
    trace = st.trace[: max(st.trace.shape[0], 1)]
    return SolveResult(
        z=packer.unpack(st.best), abs_lowest=st.lowest[:, 0], rel_lowest=st.lowest[:, 1],
        nstep=st.best_step[:, stop_idx], converged=st.lowest[:, stop_idx] < tol,
        nonfinite=~torch.isfinite(trace).all(2).all(0),
        abs_trace=trace[..., 0].t(), rel_trace=trace[..., 1].t(), nfe=st.nfe,
        factors=st.factors, method=method, backend=st.backend)


def _validate_native(method, max_iter, tol, stop_mode, m, lam, tau, memory, check_every) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    validate_common(max_iter=max_iter, tol=tol, stop_mode=stop_mode)
    check_int(m, "m", 1)
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    if not (isinstance(tau, (int, float)) and 0 < tau <= 1):
        raise ValueError(f"tau must be in (0, 1], got {tau!r}")
    if memory is not None:
        check_int(memory, "memory", 1)
    check_int(check_every, "check_every", 0)
