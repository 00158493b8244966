"""The solver engine: one loop per method on the flattened ``(B, D)`` state.

Everything per sample and on the device: norms, lowest-residual tracking, convergence flags,
freezing of stopped samples. The host looks at the ``active`` flags only every ``check_every``
iterations (or never, with ``check_every=0``: a fixed iteration count). Histories are
fixed-capacity rings. The per-iteration work is the fused ops of :mod:`deq_fast.ops` (at most
three launches besides ``f``), taken from :func:`deq_fast.ops.dispatch.get_ops` for the backend.

The three public APIs (:mod:`deq_fast.solvers.api`, :mod:`deq_fast.compat.torchdeq`,
:mod:`deq_fast.compat.locuslab`) are thin layers that choose the options of :class:`Options`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch

from deq_fast.ops.dispatch import get_ops

__all__ = ["Options", "EngineState", "run"]

INIT_LOSS = 1e8  # TorchDEQ's and locuslab's initial "lowest" residual


@dataclasses.dataclass
class Options:
    """How a solve runs. Defaults are the native API's; the compat layers override some."""
    method: str                      # 'anderson' | 'broyden' | 'fixed_point'
    max_iter: int                    # Anderson/fixed point: f evaluations; Broyden: steps after x0
    tol: float = 1e-3
    stop_mode: str = "rel"           # 'abs' | 'rel'
    check_every: int = 4             # host looks at the stop flags every k iterations; 0 = never
    backend: str = "torch"           # resolved backend ('torch' | 'triton')
    m: int = 6                       # Anderson history
    lam: float = 1e-4                # Anderson ridge
    scaled_ridge: bool = True        # ridge relative to the Gram matrix (False: TorchDEQ/locuslab)
    tau: float = 1.0                 # damping (Anderson beta, fixed-point tau)
    memory: Optional[int] = None     # Broyden ring size L (None: max_iter)
    keep_f: bool = False             # Anderson: best estimate is f(x) (TorchDEQ) instead of x
    whole_batch: bool = False        # one Frobenius norm over the batch (locuslab)
    stop_together: bool = False      # stop when every sample is under tol (TorchDEQ) vs per sample
    always_update: bool = False      # TorchDEQ return_final: keep the last iterate, no early stop
    rel_eps: float = 1e-9            # rel = abs / (||f|| + rel_eps)
    track_from: int = 0              # first evaluation whose residual is tracked
    trace_init_row: bool = False     # TorchDEQ starts its traces with a 1e8 row
    trace_rows: Optional[int] = None  # total trace rows (padded with the lowest values)
    indexing: tuple = ()             # evaluation counts at which to keep a copy of the estimate
    step_offset: int = 1             # reported step of evaluation e is e + step_offset
    extra_stop: Optional[Callable] = None  # compat stop rules: fn(state, t, step) -> None


@dataclasses.dataclass
class EngineState:
    """What the loop leaves behind (all device tensors; nothing converted to Python)."""
    best: torch.Tensor               # [B, D] lowest-residual (or final) estimate
    lowest: torch.Tensor             # [B, 2] lowest abs / rel residual
    best_step: torch.Tensor          # [B, 2] step of the lowest, per mode
    trace: torch.Tensor              # [T, B, 2]
    active: torch.Tensor             # [B] bool: still iterating when the loop ended
    nfe: int = 0
    rows: int = 0                    # trace rows written by iterations
    factors: Optional[tuple] = None  # Broyden (U, V), each [B, n, D]
    n_updates: int = 0               # Broyden rank-1 updates made
    index_list: list = dataclasses.field(default_factory=list)
    index_live: list = dataclasses.field(default_factory=list)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype of norms, dots and small solves for a state dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _n_evals(opt: Options) -> int:
    return opt.max_iter + 1 if opt.method == "broyden" else opt.max_iter


def run(f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, opt: Options) -> EngineState:
    """Run ``opt.method`` on ``f: (B, D) -> (B, D)`` from ``x0`` (``(B, D)``, contiguous)."""
    B, D = x0.shape
    dev, acc = x0.device, acc_dtype(x0.dtype)
    ops = get_ops(opt.backend, dev, x0.dtype)
    n_evals = _n_evals(opt)
    tracked = max(n_evals - opt.track_from, 0)
    rows = opt.trace_rows if opt.trace_rows is not None else tracked + int(opt.trace_init_row)
    st = EngineState(
        best=x0.clone(),
        lowest=torch.full((B, 2), INIT_LOSS, dtype=acc, device=dev),
        best_step=torch.zeros(B, 2, dtype=acc, device=dev),
        trace=torch.full((max(rows, 1), B, 2), INIT_LOSS, dtype=acc, device=dev),
        active=torch.ones(B, dtype=torch.bool, device=dev),
    )
    st.rows = int(opt.trace_init_row)
    improved = torch.zeros(B, dtype=torch.bool, device=dev)
    stop_idx = 0 if opt.stop_mode == "abs" else 1
    tol = -math.inf if opt.always_update else opt.tol
    indexing = set(opt.indexing)

    def status(sq: torch.Tensor, e: int) -> None:
        if e < opt.track_from:
            improved.zero_()
            return
        if indexing:
            st.index_live.append(st.active.any())
        step = e + opt.step_offset
        ops.track_status(sq, st.lowest, st.best_step, st.trace, st.active, improved, st.rows,
                         float(step), tol, stop_idx, opt.whole_batch, opt.stop_together,
                         opt.always_update, opt.rel_eps)
        if opt.extra_stop is not None:
            opt.extra_stop(st, st.rows, step)
        st.rows += 1

    def checkpoint(e: int) -> bool:
        """After evaluation ``e``: keep indexed copies; True when the host check says stop."""
        if e + 1 in indexing:
            st.index_list.append(st.best.clone())
        if e >= opt.track_from and opt.check_every > 0 and (e - opt.track_from + 1) % opt.check_every == 0:
            return not bool(st.active.any())
        return False

    x = x0.clone()
    if opt.method == "anderson":
        m = opt.m
        F = torch.zeros(B, m, D, dtype=x0.dtype, device=dev)
        G = torch.zeros(B, m, D, dtype=x0.dtype, device=dev)
        gram = torch.zeros(B, m, m, dtype=acc, device=dev)
        sq = torch.empty(B, 2, dtype=acc, device=dev)
        for e in range(n_evals):
            fx = f(x)
            st.nfe += 1
            slot = e % m
            ops.anderson_residual(x, fx, F, G, gram, sq, slot)
            status(sq, e)
            last = e == n_evals - 1
            # the first step is a plain f step (as in both references); the last only keeps the best
            ops.anderson_mix(F, G, gram, x, st.best, improved, 0 if last else min(e + 1, m), slot,
                             opt.lam, opt.scaled_ridge, 1.0 if e == 0 else opt.tau, opt.keep_f)
            if checkpoint(e):
                break
    elif opt.method == "broyden":
        L = opt.memory or max(opt.max_iter, 1)
        U = torch.zeros(B, L, D, dtype=x0.dtype, device=dev)
        V = torch.zeros(B, L, D, dtype=x0.dtype, device=dev)
        g = torch.empty_like(x)
        dx = torch.zeros_like(x)
        ab = torch.zeros(B, 2, L, dtype=acc, device=dev)
        scal = torch.empty(B, 4, dtype=acc, device=dev)
        sq = scal[:, 2:]
        for e in range(n_evals):
            fx = f(x)
            st.nfe += 1
            n_valid = min(st.n_updates, L)
            ops.broyden_dots(x, fx, g, dx, U, V, ab, scal, n_valid)
            status(sq, e)
            if e == 0 or e == n_evals - 1:
                # first step: H = -I, a plain fixed-point step; last: only keep the best
                torch.where(improved[:, None], x, st.best, out=st.best)
                if e == 0:
                    dx.copy_(g).masked_fill_(~st.active[:, None], 0.0)
                    x += dx
            else:
                ops.broyden_update(x, g, dx, U, V, ab, scal, st.best, improved, st.active,
                                   st.n_updates % L, n_valid)
                st.n_updates += 1
            if checkpoint(e):
                break
        n = min(st.n_updates, L)
        st.factors = (U[:, :n], V[:, :n])
    elif opt.method == "fixed_point":
        sq = torch.empty(B, 2, dtype=acc, device=dev)
        for e in range(n_evals):
            fx = f(x)
            st.nfe += 1
            ops.residual_norms(x, fx, sq, opt.tau)          # of the damped map, formed in-pass
            status(sq, e)
            ops.fixed_point_advance(x, fx, st.best, improved, st.active, opt.tau)
            if checkpoint(e):
                break
    else:
        raise ValueError(f"method must be 'anderson', 'broyden' or 'fixed_point', got {opt.method!r}")
    # rows never reached (early stop) repeat the lowest values, as both references pad them
    if st.rows < st.trace.shape[0]:
        st.trace[st.rows:] = st.lowest
    return st
