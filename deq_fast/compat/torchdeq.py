"""TorchDEQ-style solvers: drop-in replacements for ``torchdeq.solver`` (torchdeq 0.1.0).

Same signatures, same ``(z, indexing_list, info)`` results with the same numbers (per-sample norms,
``rel = abs / (||f(z)|| + 1e-9)``, the batch stops when its largest residual is under ``tol``,
TorchDEQ's trace lengths and padding, absolute ridge ``lam``), computed by the fused engine: no host
sync per iteration, fixed rings, no per-iteration allocations of the history. Fixed along the way:
unknown keyword arguments are warned about once (TorchDEQ ignores misspelt options silently), half
precision states work, a NaN sample keeps its best finite estimate, ``max_iter <= 2`` is defined.

Extra keyword arguments of ours: ``check_every`` (look at the stop flags after every ``k``
evaluations, default 1, without a host sync; 0 never) and ``backend``.

The solve builds no autograd graph: ``func`` may close over parameters and ``x0`` may require
grad, inside or outside ``torch.no_grad()``; ``z`` comes back detached (TorchDEQ's own DEQ module
calls its solvers under ``no_grad``; gradients through the equilibrium come from
:func:`deq_fast.get_deq`). :func:`simple_fixed_point_iter` is plain iteration of ``func`` and,
like TorchDEQ's, returns a result attached to the graph when grad is enabled.
"""
from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch

from deq_fast.solvers import engine
from deq_fast.solvers.boundary import prepare, validate_common
from deq_fast.solvers.packing import Packer

__all__ = ["anderson_solver", "broyden_solver", "fixed_point_iter", "simple_fixed_point_iter",
           "get_solver", "register_solver", "SolverStat"]

_OURS = {"check_every", "backend"}
_warned: set = set()


class SolverStat(dict):
    """TorchDEQ's solver statistics dict (``abs_lowest``, ``rel_lowest``, ``abs_trace``,
    ``rel_trace``, ``nstep``, ``sradius``), plus ``nfe`` (int) and ``backend`` (str)."""


def _warn_unknown(solver: str, kwargs: dict) -> None:
    unknown = sorted(set(kwargs) - _OURS)
    key = (solver, tuple(unknown))
    if unknown and key not in _warned:
        _warned.add(key)
        warnings.warn(f"{solver}: ignoring unknown keyword argument(s) {unknown} (TorchDEQ ignores "
                      "them silently; check the spelling)", UserWarning, stacklevel=3)


def _solve(method: str, func, x0, max_iter, tol, stop_mode, indexing, return_final, kwargs,
           **opts):
    _warn_unknown(f"{method}_solver" if method != "fixed_point" else "fixed_point_iter", kwargs)
    validate_common(max_iter=max_iter, tol=tol, stop_mode=stop_mode)
    packer, f, x0_flat, backend = prepare(func, x0, kwargs.get("backend"))
    opt = engine.Options(method=method, max_iter=max_iter, tol=tol, stop_mode=stop_mode,
                         check_every=kwargs.get("check_every", 1), backend=backend,
                         stop_together=True, always_update=bool(return_final), rel_eps=1e-9,
                         trace_init_row=True, indexing=tuple(indexing or ()), **opts)
    st = engine.run(f, x0_flat, opt)
    scalar = isinstance(x0, torch.Tensor) and x0.dim() == 0
    unpack = (lambda t: t.reshape(1)) if scalar else packer.unpack   # TorchDEQ: 0-d -> (1,)
    z = unpack(st.best)
    index_list = [unpack(t) for t in st.index_list]
    if st.index_live:   # drop copies taken after the batch had stopped (TorchDEQ breaks there)
        live = torch.stack(st.index_live).tolist()
        index_list = [t for t, ok in zip(index_list, live) if ok]
    if indexing and not index_list:
        index_list.append(z)
    stop_idx = 0 if stop_mode == "abs" else 1
    info = SolverStat(abs_lowest=st.lowest[:, 0], rel_lowest=st.lowest[:, 1],
                      abs_trace=st.trace[..., 0].t(), rel_trace=st.trace[..., 1].t(),
                      nstep=st.best_step[:, stop_idx], sradius=torch.tensor([-1.0]),
                      nfe=st.nfe, backend=st.backend)
    return z, index_list, info


def anderson_solver(func: Callable, x0: torch.Tensor, max_iter: int = 50, tol: float = 1e-3,
                    stop_mode: str = "abs", indexing: Optional[list] = None, m: int = 6,
                    lam: float = 1e-4, tau: float = 1.0, return_final: bool = False, **kwargs):
    """Anderson acceleration, TorchDEQ contract.

    Args:
        func: fixed-point map, ``z -> f(z)`` of ``x0``'s shape.
        x0: initial estimate ``[B, ...]`` (a 1-D tensor is a batch of scalars).
        max_iter: function evaluations (traces hold ``max_iter - 1`` entries).
        tol, stop_mode: the batch stops when ``max_b residual_b < tol`` (``'abs'``/``'rel'``).
        indexing: evaluation counts at which to return the estimate so far.
        m, lam, tau: history size, absolute ridge, damping.
        return_final: return the last estimate instead of the lowest-residual one (no early stop).

    Returns:
        ``(z, indexing_list, info)``: ``z`` of ``x0``'s shape holds per sample the ``f(X_k)`` of
        lowest residual; ``info`` is a :class:`SolverStat`.

    Example:
        >>> z, _, info = anderson_solver(lambda z: 0.5 * torch.cos(z), torch.zeros(4, 10))
        >>> info['abs_trace'].shape
        torch.Size([4, 49])
    """
    if not isinstance(m, int) or m < 1:
        raise ValueError(f"m must be an int >= 1, got {m!r}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    return _solve("anderson", func, x0, max_iter, tol, stop_mode, indexing, return_final, kwargs,
                  m=m, lam=lam, scaled_ridge=False, tau=tau, keep_f=True, track_from=2,
                  trace_rows=max(max_iter - 1, 1), step_offset=1)


def _progress_stop(tol: float, stop_idx: int):
    """TorchDEQ Broyden's 'no progress in 30 steps' break, evaluated on the device."""
    def extra(st: engine.EngineState, t: int, step: int) -> None:
        if step <= 30:
            return
        window = st.trace[t - 29:t + 1, :, stop_idx]                   # [30, B]
        ratio = window.amax(0) / window.amin(0)
        now = st.trace[t, :, stop_idx]
        stall = (now.amax() < 3 * tol) & (ratio.amax() < 1.3)
        st.active &= ~stall
    return extra


def broyden_solver(func: Callable, x0: torch.Tensor, max_iter: int = 50, tol: float = 1e-3,
                   stop_mode: str = "abs", indexing: Optional[list] = None,
                   LBFGS_thres: Optional[int] = None, ls: bool = False, return_final: bool = False,
                   **kwargs):
    """Broyden's method, TorchDEQ contract (``H = -I + U V^T`` with a ring of ``LBFGS_thres``
    updates; traces hold ``max_iter + 1`` entries; ``z`` is the lowest-residual iterate).

    ``ls=True``: Armijo line search along each step with TorchDEQ's whole-batch norm
    (:mod:`deq_fast.solvers.linesearch`; host-driven, as in TorchDEQ).

    Example:
        >>> z, _, info = broyden_solver(lambda z: 0.5 * torch.cos(z), torch.zeros(4, 10), max_iter=20)
        >>> info['abs_trace'].shape
        torch.Size([4, 21])
    """
    if LBFGS_thres is not None and (not isinstance(LBFGS_thres, int) or LBFGS_thres < 1):
        raise ValueError(f"LBFGS_thres must be None or an int >= 1, got {LBFGS_thres!r}")
    stop_idx = 0 if stop_mode == "abs" else 1
    return _solve("broyden", func, x0, max_iter, tol, stop_mode, indexing, return_final, kwargs,
                  memory=LBFGS_thres, track_from=1, step_offset=0,
                  trace_rows=max_iter + 1, extra_stop=_progress_stop(tol, stop_idx),
                  line_search=bool(ls))


def fixed_point_iter(func: Callable, x0: torch.Tensor, max_iter: int = 50, tol: float = 1e-3,
                     stop_mode: str = "abs", indexing: Optional[list] = None, tau: float = 1.0,
                     return_final: bool = False, **kwargs):
    """Damped fixed-point iteration, TorchDEQ contract (``z`` is the damped ``f`` value of lowest
    residual; traces hold ``max_iter + 1`` entries).

    Example:
        >>> z, _, info = fixed_point_iter(lambda z: 0.5 * torch.cos(z), torch.zeros(4, 10))
        >>> info['abs_trace'].shape
        torch.Size([4, 51])
    """
    return _solve("fixed_point", func, x0, max_iter, tol, stop_mode, indexing, return_final, kwargs,
                  tau=tau, track_from=0, step_offset=1, trace_rows=max_iter + 1)


def simple_fixed_point_iter(func: Callable, x0: torch.Tensor, max_iter: int = 50, tau: float = 1.0,
                            indexing: Optional[list] = None, **kwargs):
    """TorchDEQ's statistics-free fixed-point iteration: ``max_iter`` steps of ``func(x, tau=tau)``.

    Like TorchDEQ, ``func`` receives ``tau=`` (its DEQ wraps ``f`` so); a ``func`` without a
    ``tau`` parameter is damped here instead. ``info`` holds the final step's statistics.
    """
    _warn_unknown("simple_fixed_point_iter", kwargs)
    validate_common(max_iter=max_iter, tol=0.0, stop_mode="abs")
    import inspect
    try:
        takes_tau = "tau" in inspect.signature(func).parameters
    except (TypeError, ValueError):
        takes_tau = False
    step = (lambda z: func(z, tau=tau)) if takes_tau else (lambda z: tau * func(z) + (1 - tau) * z)
    out, x, index_list = x0, x0, []
    for k in range(max_iter):
        x = out
        out = step(x)
        if indexing and (k + 1) in indexing:
            index_list.append(out)
    packer = Packer(x0, "x0")
    zf, ff = packer.pack(x), packer.pack(out)
    absn = torch.linalg.vector_norm(ff - zf, dim=1)
    reln = absn / (torch.linalg.vector_norm(ff, dim=1) + 1e-8)
    info = SolverStat(abs_lowest=absn, rel_lowest=reln, abs_trace=absn[:, None],
                      rel_trace=reln[:, None], nstep=torch.full_like(absn, float(max_iter)),
                      sradius=torch.tensor([-1.0]), nfe=max_iter, backend="reference")
    return out, index_list, info


_SOLVERS = {
    "anderson": anderson_solver,
    "broyden": broyden_solver,
    "fixed_point_iter": fixed_point_iter,
    "simple_fixed_point_iter": simple_fixed_point_iter,
}


def get_solver(key: str) -> Callable:
    """The solver registered under ``key`` (``'anderson'``, ``'broyden'``, ``'fixed_point_iter'``,
    ``'simple_fixed_point_iter'`` or a name given to :func:`register_solver`).

    Raises:
        ValueError: naming the unknown key and the known ones (TorchDEQ asserts).
    """
    if key not in _SOLVERS:
        raise ValueError(f"unknown solver {key!r}; known: {sorted(_SOLVERS)}")
    return _SOLVERS[key]


def register_solver(solver_type: str, solver: Callable) -> None:
    """Register ``solver`` (TorchDEQ signature) under the name ``solver_type``."""
    if not callable(solver):
        raise ValueError(f"solver must be callable, got {type(solver).__name__}")
    _SOLVERS[solver_type] = solver
