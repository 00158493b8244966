"""locuslab/deq-style solvers: drop-in replacements for ``lib/solvers.py``'s ``anderson`` and
``broyden``.

Same calls, the same result dict (``result``, ``lowest``, ``nstep``, ``prot_break``, ``abs_trace``,
``rel_trace``, ``eps``, ``threshold``) and the same numbers: one Frobenius norm over the whole batch,
the original stopping rules (including Broyden's "no progress in 30 steps" and protective breaks),
the original trace lengths, ``result`` the lowest-residual iterate, no more evaluations of ``f``
than the original. Computed by the fused engine: the host reads the stop flag without a host sync
(:mod:`deq_fast.solvers.polling`) instead of calling ``.item()`` twice per iteration; Broyden's
two extra breaks read the engine's trace through NumPy views on the CPU (:class:`_BroydenBreaks`),
so per iteration both solvers dispatch the same ops as :func:`deq_fast.solve`; traces become
Python lists once, at the end (one transfer).

Fixed while keeping the contract: any state shape (the original needs ``(B, d, L)``, deq #17); no
``torch.solve`` (removed from PyTorch) and no batched LU that raises on singular systems (deq #20);
a NaN first residual or ``threshold <= 2`` returns a defined result instead of ``UnboundLocalError``
(deq #26). Broyden keeps its ``2·B·D·threshold`` factors by default (the numbers depend on it); pass
``memory=L`` to bound them (deq #28).
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from deq_fast.solvers import engine
from deq_fast.solvers.boundary import prepare, validate_common

__all__ = ["anderson", "broyden"]


def _result(packer, st: engine.EngineState, stop_idx: int, eps: float, threshold: int,
            n_trace: int, prot: Union[bool, torch.Tensor] = False) -> dict:
    # one device->host transfer for every scalar and both traces (and a device prot_break flag)
    prot_flag = prot.to(st.lowest.dtype) if isinstance(prot, torch.Tensor) else st.lowest[:0, 0]
    packed = torch.cat((st.trace[:n_trace, 0, :].reshape(-1),
                        st.lowest[0, stop_idx:stop_idx + 1], st.best_step[0, stop_idx:stop_idx + 1],
                        prot_flag))
    vals = packed.tolist()
    if isinstance(prot, torch.Tensor):
        prot = bool(vals.pop())
    traces = vals[:2 * n_trace]
    return {"result": packer.unpack(st.best), "lowest": vals[-2], "nstep": int(vals[-1]),
            "prot_break": prot, "abs_trace": traces[0::2], "rel_trace": traces[1::2],
            "eps": eps, "threshold": threshold}


def _check_extra(kwargs: dict, allowed: set, fn: str) -> None:
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(f"{fn}() got unexpected keyword argument(s) {unknown}")


def anderson(f: Callable, x0, m: int = 6, lam: float = 1e-4, threshold: int = 50,
             eps: float = 1e-3, stop_mode: str = "rel", beta: float = 1.0, **kwargs) -> dict:
    """Anderson acceleration with the locuslab/deq contract.

    Args:
        f: fixed-point map ``z -> f(z)``, same shape out as in (any shape; or a tuple of tensors).
        x0: initial estimate.
        m, lam: history size and absolute ridge of the mixing least squares.
        threshold: evaluations of ``f``; the traces hold ``threshold - 2`` entries.
        eps, stop_mode: stop when the whole-batch ``'abs'`` or ``'rel'`` residual is under ``eps``
            (``rel = abs / (1e-5 + ||F||)``).
        beta: mixing ``beta·alpha·F + (1 - beta)·alpha·X``.
        **kwargs: accepted like the original (e.g. ``name=``) plus ours: ``check_every``,
            ``backend``.

    Returns:
        dict with ``result`` (lowest-residual iterate ``X_k``, ``x0``'s shape), ``lowest`` (float),
        ``nstep`` (int loop index k of the lowest), ``prot_break`` (False), ``abs_trace``,
        ``rel_trace`` (lists of floats), ``eps``, ``threshold``.

    Example:
        >>> out = anderson(lambda z: 0.5 * torch.cos(z), torch.zeros(2, 8, 5), threshold=30, eps=1e-6)
        >>> out['lowest'] < 1e-6, len(out['abs_trace'])
        (True, 28)
    """
    validate_common(max_iter=threshold, tol=eps, stop_mode=stop_mode)
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise ValueError(f"m must be an int >= 1, got {m!r}")
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    packer, flat_f, x0_flat, backend = prepare(f, x0, kwargs.get("backend"))
    n_evals = max(threshold, 1)
    track_from = min(2, n_evals - 1)    # threshold <= 2: track what was evaluated (original: crash)
    stop_idx = 0 if stop_mode == "abs" else 1
    opt = engine.Options(method="anderson", max_iter=n_evals, tol=eps, stop_mode=stop_mode,
                         check_every=kwargs.get("check_every", 1), backend=backend, m=m, lam=lam,
                         scaled_ridge=False, tau=beta, keep_f=False, whole_batch=True,
                         stop_together=True, rel_eps=1e-5, track_from=track_from, step_offset=0,
                         trace_rows=max(n_evals - track_from, 1))
    st = engine.run(flat_f, x0_flat, opt)
    return _result(packer, st, stop_idx, eps, threshold, max(threshold - 2, 0))


class _BroydenBreaks:
    """The original's two extra breaks (no progress in 30 steps; protective break), evaluated on
    the whole-batch values the engine records in its trace, in the original's order: converged
    (the engine's status), no progress, protective break.

    On the CPU the trace and the stop flags are host memory: the rules read them through NumPy
    views made once per solve and run in Python, dispatching no op per iteration (the locuslab
    API then costs what :func:`deq_fast.solve` costs). On other devices the host cannot read a
    value without a sync, so the rules run as small device ops (``prot`` a device flag).
    """

    def __init__(self, eps: float, stop_idx: int, protect: float, device: torch.device,
                 on_host: Optional[bool] = None) -> None:
        self.eps, self.stop_idx, self.protect = eps, stop_idx, protect
        self.on_host = device.type == "cpu" if on_host is None else on_host
        self.prot: Union[bool, torch.Tensor] = False
        self._trace = self._active = self._limit = None

    def __call__(self, st: engine.EngineState, t: int, step: int) -> None:
        if self.on_host and not torch.compiler.is_compiling():     # Dynamo cannot trace .numpy()
            self._host_rules(st, t, step)
        else:
            self._device_rules(st, t, step)

    def _host_rules(self, st: engine.EngineState, t: int, step: int) -> None:
        if self._trace is None:        # shares memory: the engine's in-place writes are visible
            self._trace, self._active = st.trace[:, 0, self.stop_idx].numpy(), st.active.numpy()
        if not self._active.any():     # converged at this step
            return
        now = self._trace[t]
        if step > 30 and now < 3 * self.eps:
            window = self._trace[t - 29:t + 1]
            if window.max() / window.min() < 1.3:      # NaN propagates, as np.max does
                self._active[:] = False
                return
        if now > self._trace[0] * self.protect:
            self.prot = True
            self._active[:] = False

    def _device_rules(self, st: engine.EngineState, t: int, step: int) -> None:
        if not isinstance(self.prot, torch.Tensor):                # a CPU solve being compiled
            self.prot = torch.tensor([self.prot], device=st.trace.device)
        trace = st.trace[:, 0, self.stop_idx]
        if self._limit is None:        # row 0 (the first objective) is written before any rule runs
            self._limit = trace[0] * self.protect
        now = trace[t]
        if step > 30:
            window = trace[t - 29:t + 1]
            st.active.masked_fill_((now < 3 * self.eps) & (window.amax() / window.amin() < 1.3), False)
        blowup = (now > self._limit) & st.active.any()
        self.prot.logical_or_(blowup)
        st.active.masked_fill_(blowup, False)


def broyden(f: Callable, x0, threshold: int, eps: float = 1e-3, stop_mode: str = "rel",
            ls: bool = False, name: str = "unknown", **kwargs) -> dict:
    """Broyden's method with the locuslab/deq contract (``threshold`` is required).

    Args:
        f: fixed-point map; x0: initial estimate (any shape).
        threshold: Broyden steps; traces hold ``threshold + 1`` entries.
        eps, stop_mode: stop when the whole-batch residual is under ``eps``; also after 30 steps
            without progress when under ``3·eps``; protective break (``prot_break=True``) when the
            residual exceeds the first one times ``(1e6 if abs else 1e3)·x0.shape[-1]``.
        ls: Armijo line search along each step (:mod:`deq_fast.solvers.linesearch`: the
            original's formulas; host-driven, one sync per trial, as in the original).
        name: accepted and unused, as in the original.
        **kwargs: ours: ``check_every``, ``backend``, ``memory`` (bound on stored updates).

    Returns:
        The result dict (see :func:`anderson`); ``nstep`` is the Broyden step of the lowest.
    """
    _check_extra(kwargs, {"check_every", "backend", "memory"}, "broyden")
    validate_common(max_iter=threshold, tol=eps, stop_mode=stop_mode)
    packer, flat_f, x0_flat, backend = prepare(f, x0, kwargs.get("backend"))
    stop_idx = 0 if stop_mode == "abs" else 1
    last_dim = (x0 if isinstance(x0, torch.Tensor) else x0[0]).shape[-1]
    protect = (1e6 if stop_mode == "abs" else 1e3) * last_dim
    breaks = _BroydenBreaks(eps, stop_idx, protect, x0_flat.device)
    opt = engine.Options(method="broyden", max_iter=threshold, tol=eps, stop_mode=stop_mode,
                         check_every=kwargs.get("check_every", 1), backend=backend,
                         memory=kwargs.get("memory"), whole_batch=True, stop_together=True,
                         rel_eps=1e-9, track_from=1, step_offset=0, trace_rows=threshold + 1,
                         extra_stop=breaks,
                         line_search=bool(ls))
    st = engine.run(flat_f, x0_flat, opt)
    return _result(packer, st, stop_idx, eps, threshold, threshold + 1, breaks.prot)
