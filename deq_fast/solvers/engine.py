"""The solver engine: one loop per method on the flattened ``(B, D)`` state.

Everything per sample and on the device: norms, lowest-residual tracking, convergence flags,
freezing of stopped samples. The host looks at the ``active`` flags after every ``check_every``
evaluations without a host sync (:mod:`deq_fast.solvers.polling`), or never with ``check_every=0``
(a fixed iteration count). Histories are fixed-capacity rings. The per-iteration work is the fused
ops of :mod:`deq_fast.ops` (at most three launches besides ``f``; two for fixed point), taken from
:func:`deq_fast.ops.dispatch.get_ops` for the backend.

The three public APIs (:mod:`deq_fast.solvers.api`, :mod:`deq_fast.compat.torchdeq`,
:mod:`deq_fast.compat.locuslab`) are thin layers that choose the options of :class:`Options`.
Each method is one loop function (:func:`_anderson_loop`, :func:`_broyden_loop`,
:func:`_fixed_point_loop`); what they share (residual bookkeeping, indexed copies, stop polling)
is the :class:`_Tracker`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional

import torch

from deq_fast.ops.dispatch import get_ops
from deq_fast.ops.dtypes import acc_dtype
from deq_fast.ops.fixed_point import take_improved
from deq_fast.solvers.linesearch import search_step
from deq_fast.solvers.polling import make_poll

__all__ = ["Options", "EngineState", "run"]

INIT_LOSS = 1e8  # TorchDEQ's and locuslab's initial "lowest" residual


@dataclasses.dataclass
class Options:
    """How a solve runs. Defaults are the native API's; the compat layers override some."""
    method: str                      # 'anderson' | 'broyden' | 'fixed_point'
    max_iter: int                    # Anderson/fixed point: f evaluations; Broyden: steps after x0
    tol: float = 1e-3
    stop_mode: str = "rel"           # 'abs' | 'rel'
    check_every: int = 1             # host looks at the stop flags every k evaluations; 0 = never
    backend: str = "reference"       # resolved implementation ('reference' | 'cpp' | 'triton')
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
    line_search: bool = False        # Broyden: Armijo line search along each step (host-driven)


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
    backend: str = ""                # what ran the method's main pass ('reference' | 'cpp' | 'triton')


def _n_evals(opt: Options) -> int:
    return opt.max_iter + 1 if opt.method == "broyden" else opt.max_iter


def _new_state(x0: torch.Tensor, opt: Options) -> EngineState:
    B, dev, acc = x0.shape[0], x0.device, acc_dtype(x0.dtype)
    tracked = max(_n_evals(opt) - opt.track_from, 0)
    rows = opt.trace_rows if opt.trace_rows is not None else tracked + int(opt.trace_init_row)
    st = EngineState(
        best=x0.clone(),
        lowest=torch.full((B, 2), INIT_LOSS, dtype=acc, device=dev),
        best_step=torch.zeros(B, 2, dtype=acc, device=dev),
        trace=torch.full((max(rows, 1), B, 2), INIT_LOSS, dtype=acc, device=dev),
        active=torch.ones(B, dtype=torch.bool, device=dev),
    )
    st.rows = int(opt.trace_init_row)
    return st


class _Tracker:
    """What every loop does after an evaluation: residual bookkeeping on the device
    (``track_status``), the compat layers' extra stop rules, indexed copies of the estimate, and
    the host's look at the stop flags."""

    def __init__(self, st: EngineState, opt: Options, ops) -> None:
        self.st, self.opt, self.ops = st, opt, ops
        self.improved = torch.zeros_like(st.active)
        self.stop_idx = 0 if opt.stop_mode == "abs" else 1
        self.tol = -math.inf if opt.always_update else opt.tol
        self.indexing = set(opt.indexing)
        self.poll = make_poll(st.active, opt.check_every)

    def status(self, sq: torch.Tensor, e: int) -> None:
        """Record the squared norms ``sq`` ``[B, 2]`` of evaluation ``e`` (0-based)."""
        st, opt = self.st, self.opt
        if e < opt.track_from:
            self.improved.zero_()
            return
        if self.indexing and not torch.compiler.is_compiling():
            # lets the caller drop copies taken after the batch stopped, with a host read; under
            # torch.compile they are kept: a stopped batch is frozen, so they equal the final best
            st.index_live.append(st.active.any())
        step = e + opt.step_offset
        self.ops.track_status(sq, st.lowest, st.best_step, st.trace, st.active, self.improved,
                              st.rows, float(step), self.tol, self.stop_idx, opt.whole_batch,
                              opt.stop_together, opt.always_update, opt.rel_eps)
        if opt.extra_stop is not None:
            opt.extra_stop(st, st.rows, step)
        st.rows += 1

    def done(self, e: int) -> bool:
        """After evaluation ``e``: keep an indexed copy; True when the loop may stop."""
        if e + 1 in self.indexing:
            self.st.index_list.append(self.st.best.clone())
        return e >= self.opt.track_from and self.poll.should_stop(e - self.opt.track_from + 1)

    def evaluate(self, f: Callable, x: torch.Tensor) -> torch.Tensor:
        self.st.nfe += 1
        return f(x)


def _anderson_loop(f: Callable, x: torch.Tensor, tr: _Tracker, n_evals: int) -> None:
    """Anderson mixing on ring histories ``F``, ``G`` ``[B, m, D]`` with an incremental Gram matrix.

    The first step is a plain ``f`` step (as in both references); the last only keeps the best.
    """
    opt, ops, st = tr.opt, tr.ops, tr.st
    B, D, m = x.shape[0], x.shape[1], opt.m
    F = torch.zeros(B, m, D, dtype=x.dtype, device=x.device)
    G = torch.zeros_like(F)
    gram = torch.zeros(B, m, m, dtype=acc_dtype(x.dtype), device=x.device)
    sq = torch.empty(B, 2, dtype=gram.dtype, device=x.device)
    for e in range(n_evals):
        fx = tr.evaluate(f, x)
        slot = e % m
        ops.anderson_residual(x, fx, F, G, gram, sq, slot)
        tr.status(sq, e)
        n = 0 if e == n_evals - 1 else min(e + 1, m)
        ops.anderson_mix(F, G, gram, x, st.best, tr.improved, n, slot, opt.lam, opt.scaled_ridge,
                         1.0 if e == 0 else opt.tau, opt.keep_f)
        if tr.done(e):
            break


def _broyden_loop(f: Callable, x: torch.Tensor, tr: _Tracker, n_evals: int) -> None:
    """Broyden's method with ``H = -I + U^T V`` on rings ``U``, ``V`` ``[B, L, D]``.

    The first step is a plain fixed-point step (``H = -I``); the last only keeps the best. The
    update is the original's (``deq_fast/ops/broyden.py``) with ``dx`` the step actually taken
    (``x_new - x_old`` as rounded, after any line search) and ``dg = g - g_old``: ``g`` and
    ``g_old`` are two buffers that swap roles every iteration (pass 2 reads both).
    """
    opt, ops, st = tr.opt, tr.ops, tr.st
    B, D = x.shape
    L = opt.memory or max(opt.max_iter, 1)
    U = torch.zeros(B, L, D, dtype=x.dtype, device=x.device)
    V = torch.zeros_like(U)
    g, g_old, dx = torch.zeros_like(x), torch.zeros_like(x), torch.zeros_like(x)
    abc = torch.zeros(B, 3, L, dtype=acc_dtype(x.dtype), device=x.device)
    scal = torch.empty(B, 4, dtype=abc.dtype, device=x.device)
    sq = scal[:, 2:]
    for e in range(n_evals):
        fx = tr.evaluate(f, x)
        if opt.line_search and e > 0:
            x_prev = x - dx                                  # as search_step forms it
            fx = search_step(lambda y: tr.evaluate(f, y), x, fx, dx, float(sq[:, 0].sum()))
            torch.sub(x, x_prev, out=dx)                     # the step as taken (rounded)
        n_valid = min(st.n_updates, L)
        ops.broyden_dots(x, fx, g_old, g, dx, U, V, abc, scal, n_valid)
        tr.status(sq, e)
        if e == 0 or e == n_evals - 1:
            take_improved(x, st.best, tr.improved)
            if e == 0:
                dx.copy_(g).masked_fill_(~st.active[:, None], 0.0)
                x_new = x + dx
                torch.sub(x_new, x, out=dx)                  # the step as taken (rounded)
                x.copy_(x_new)
        else:
            ops.broyden_update(x, g, g_old, dx, U, V, abc, scal, st.best, tr.improved, st.active,
                               st.n_updates % L, n_valid)
            st.n_updates += 1
        g, g_old = g_old, g
        if tr.done(e):
            break
    n = min(st.n_updates, L)
    st.factors = (U[:, :n], V[:, :n])


def _fixed_point_loop(f: Callable, x: torch.Tensor, tr: _Tracker, n_evals: int) -> None:
    """Damped fixed-point iteration ``x <- tau·f(x) + (1 - tau)·x``: one fused pass per iteration.

    ``fixed_point_step`` reads ``x`` and ``f(x)`` once: it forms the damped ``y`` and its norms
    and writes ``x = y`` for active samples. The best-iterate copy is deferred (see
    ``deq_fast/ops/fixed_point.py``): ``track_status`` decides ``improved`` after the pass, when
    the sample's ``y`` is already in ``x``, and the next pass copies it into ``best``;
    :func:`take_improved` does it before an indexed copy of ``best`` and after the last pass.
    """
    tau, st = tr.opt.tau, tr.st
    sq = torch.empty(x.shape[0], 2, dtype=acc_dtype(x.dtype), device=x.device)
    for e in range(n_evals):
        fx = tr.evaluate(f, x)
        tr.ops.fixed_point_step(x, fx, st.best, sq, tr.improved, st.active, tau)
        tr.status(sq, e)
        if e + 1 in tr.indexing:
            take_improved(x, st.best, tr.improved)
        if tr.done(e):
            break
    take_improved(x, st.best, tr.improved)


LOOPS = {"anderson": _anderson_loop, "broyden": _broyden_loop, "fixed_point": _fixed_point_loop}
#: the pass that carries each method's O(history · D) work: its implementation is reported
MAIN_PASS = {"anderson": "anderson_residual", "broyden": "broyden_dots",
             "fixed_point": "fixed_point_step"}


def run(f: Callable[[torch.Tensor], torch.Tensor], x0: torch.Tensor, opt: Options) -> EngineState:
    """Run ``opt.method`` on ``f: (B, D) -> (B, D)`` from ``x0`` (``(B, D)``, contiguous).

    Runs without building an autograd graph, whatever the caller's grad mode.
    """
    loop = LOOPS.get(opt.method)
    if loop is None:
        raise ValueError(f"method must be one of {tuple(LOOPS)}, got {opt.method!r}")
    st = _new_state(x0, opt)
    ops = get_ops(opt.backend, x0.device, x0.dtype)
    st.backend = ops.ran[MAIN_PASS[opt.method]]
    with torch.no_grad():
        loop(f, x0.clone(), _Tracker(st, opt, ops), _n_evals(opt))
    # rows never reached (early stop) repeat the lowest values, as both references pad them
    if st.rows < st.trace.shape[0]:
        st.trace[st.rows:] = st.lowest
    return st
