"""``python -m deq_fast.selftest``: every op against its reference on the device found, timed
against its bandwidth floor, and whole solves against torchdeq, in one table for a bug report.

On a CUDA machine the compiled kernels run on the GPU; without one the Triton kernels run on CPU
tensors under Triton's interpreter (``TRITON_INTERPRET=1``, set here when absent, before Triton is
imported) and the C++ kernels are the CPU ones. One row per check:

* ``triton <op>``: each Triton kernel against its pure-torch reference (``deq_fast/ops``), per
  shape and dtype: the max absolute error, the tolerance (per dtype, scaled by the reference's
  magnitude when above 1) and PASS/FAIL;
* ``solve/<method>``: a short solve with ``backend='triton'`` against ``backend='reference'``;
* ``C++ <op>``: every op of ``deq_fast._C`` with a C++ kernel for the device: on CUDA the CUDA
  kernel against the same op's CPU kernel, on CPU the CPU kernel against the reference; the
  backward ops at shapes that cover several chunks per sample, several column groups, a ``D``
  that is not a multiple of the vector width, ``B = 1`` and ``B > 1`` (:data:`CPP_SHAPES`);
* ``captured/<method>`` (CUDA, or CPU with ``--capture``): each method's fixed-iteration solve
  eager against ``torch.compile(fullgraph=True)`` (``mode="reduce-overhead"``: CUDA graphs; on
  CPU inductor's default mode);
* with ``--timing``: ``time <impl> <op>`` per kernel (Triton on CUDA, C++ on CPU, and the C++
  backward ops) at a timing shape: microseconds per call, the torch reference's, the achieved
  GB/s (the bytes of :mod:`deq_fast.ops.traffic`, the performance model's formulas) and the time
  as a multiple of the bandwidth floor (those bytes at the peak bandwidth: the datasheet's for a
  GPU of :data:`deq_fast.ops.traffic.GPUS`, else measured by a large ``copy_``; the header says
  which); ``torchdeq/<method> eager|captured``: a whole solve against torchdeq's (the same
  ``f``, iterations and tolerance 0), its result compared and both timed ("torchdeq not
  installed" when it is not; ``captured`` rows with the ``captured/`` ones).

Exit code 0 when every comparison passes, 1 otherwise, 2 when the kernels cannot run.
``--json PATH`` also writes the table.

Example:
    $ python -m deq_fast.selftest                 # CUDA: compiled kernels; CPU: the interpreter
    $ python -m deq_fast.selftest --timing        # + time per kernel against its floor, torchdeq
    $ python -m deq_fast.selftest --capture --timing --json selftest.json   # CPU: + inductor
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from typing import Callable, Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# after TRITON_INTERPRET: importing deq_fast may import the kernels
from deq_fast.ops import traffic  # noqa: E402
from deq_fast.testing import (  # noqa: E402
    DTYPE_IDS,
    KERNEL_TOL,
    NAN,
    Draws,
    acc_dtype,
    compare,
)

__all__ = ["main", "Row", "Peak", "run_kernel_checks", "run_solve_checks", "run_capture_checks",
           "run_cpp_checks", "run_cpp_cuda_checks", "cpp_cuda_cases", "run_timing",
           "run_torchdeq_checks", "peak_bandwidth", "render"]


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table.

    Attributes:
        check: what ran (``triton anderson_mix``, ``C++ bwd_track``, ``time C++ bwd_track``,
            ``captured/anderson``, ``torchdeq/broyden eager``, ...).
        shape: ``BxD`` (``C++`` rows: ``BxD m=..``).
        err, tol: max absolute error against the reference and its bound (NaN: not compared).
        ok: PASS/FAIL of the comparison; None for a row that compares nothing (a timing row).
        us: microseconds per call of what is checked.
        base_us: the same for what it is measured against (the torch reference, the eager
            solve, torchdeq).
        gbps: achieved bandwidth, :mod:`deq_fast.ops.traffic`'s bytes / ``us``.
        x_floor: ``us`` / the bandwidth floor (those bytes at the peak bandwidth).
        note: e.g. "torchdeq not installed".
    """
    check: str
    shape: str
    dtype: str
    err: float = NAN
    tol: float = NAN
    ok: Optional[bool] = None
    us: Optional[float] = None
    base_us: Optional[float] = None
    gbps: Optional[float] = None
    x_floor: Optional[float] = None
    note: str = ""


def _compared(check: str, shape: str, dtype: str, pairs: list, tol_of: Callable) -> Row:
    """A comparison row over ``(actual, expected)`` tensor pairs, ``tol_of(scale)`` the bound."""
    err, tol, ok = 0.0, 0.0, True
    for actual, expected in pairs:
        e, scale = compare(actual, expected)
        t = tol_of(scale)
        err, tol, ok = max(err, e), max(tol, t), ok and e <= t
    return Row(check, shape, dtype, err, tol, ok)


def _failed(check: str, shape: str, dtype: str, exc: Exception) -> Row:
    """An exception is a failed row (reported on stderr, not raised)."""
    print(f"  {check} {shape} {dtype}: {type(exc).__name__}: {exc}", file=sys.stderr)
    return Row(check, shape, dtype, ok=False, note=type(exc).__name__)


class _Inputs(Draws):
    """Random inputs for one case (seeded by the case, generated on the CPU, moved to device)."""

    def __init__(self, device: str, *key):
        super().__init__(*key, device=device)

    def full(self, shape, value, dtype) -> torch.Tensor:
        return torch.full(shape, value, dtype=dtype, device=self.device)


def _case(op: str, B: int, D: int, dtype: torch.dtype, big: bool, dev: str):
    """``(tensor/scalar args, {output name: arg index})`` in the engine's layout and invariants;
    outputs the kernel must write completely are NaN-filled."""
    r = _Inputs(dev, op, B, D, dtype, big)
    acc = acc_dtype(dtype)
    x, fx = r.randn((B, D), dtype), r.randn((B, D), dtype)
    if op == "fixed_point_step":
        return [x, fx, r.randn((B, D), dtype), r.full((B, 2), NAN, acc), r.flags(B), r.flags(B)], \
            {"x": 0, "best": 2, "sq": 3}
    if op in ("anderson_residual", "anderson_mix"):
        m = 5
        filled = m if big else 2
        F = r.full((B, m, D), 0.0, dtype)
        G = r.full((B, m, D), 0.0, dtype)
        F[:, :filled] = r.randn((B, filled, D), dtype)
        G[:, :filled] = r.randn((B, filled, D), dtype, 0.5)
        gram = torch.bmm(G.to(acc), G.to(acc).transpose(1, 2))
        if op == "anderson_residual":
            slot = 3 if big else filled
            F[:, slot], G[:, slot], gram[:, slot], gram[:, :, slot] = NAN, NAN, NAN, NAN
            return [x, fx, F, G, gram, r.full((B, 2), NAN, acc), slot], \
                {"F": 2, "G": 3, "gram": 4, "sq": 5}
        n, newest, beta = (m, 2, 0.8) if big else (filled, filled - 1, 1.0)
        return [F, G, gram, r.full((B, D), NAN, dtype), r.randn((B, D), dtype), r.flags(B), n,
                newest, 1e-4, True, beta, True], {"x": 3, "best": 4}
    if op in ("broyden_dots", "broyden_update"):
        L = 6
        n_valid = L if big else 3
        U, V = r.full((B, L, D), 0.0, dtype), r.full((B, L, D), 0.0, dtype)
        U[:, :n_valid] = r.randn((B, n_valid, D), dtype, 0.2)
        V[:, :n_valid] = r.randn((B, n_valid, D), dtype, 0.2)
        dx = r.randn((B, D), dtype, 0.3)
        g_old = r.randn((B, D), dtype)
        abc = r.full((B, 3, L), 0.0, acc)
        if op == "broyden_dots":
            abc[:, :, :n_valid] = NAN
            return [x, fx, g_old, r.full((B, D), NAN, dtype), dx, U, V, abc,
                    r.full((B, 4), NAN, acc), n_valid], {"g": 3, "abc": 7, "scal": 8}
        from deq_fast.ops.broyden import broyden_dots_reference
        g, scal = torch.empty_like(x), r.full((B, 4), NAN, acc)
        broyden_dots_reference(x, fx, g_old, g, dx, U, V, abc, scal, n_valid)
        slot = 2 if big else n_valid
        return [x, g, g_old, dx, U, V, abc, scal, r.randn((B, D), dtype), r.flags(B), r.flags(B),
                slot, n_valid], {"x": 0, "dx": 3, "U": 4, "V": 5, "best": 8}
    if op == "track_status":
        sq = torch.rand(B, 2, generator=r.gen, dtype=torch.float64).to(dtype).to(dev) * 2
        lowest = torch.rand(B, 2, generator=r.gen, dtype=torch.float64).to(dtype).to(dev) * 1.5
        return [sq, lowest, r.full((B, 2), 0.0, dtype), r.full((3, B, 2), NAN, dtype), r.flags(B),
                r.full((B,), False, torch.bool), 1, 5.0, 0.6, 1, big, big, False, 1e-9], \
            {"lowest": 1, "best_step": 2, "trace": 3, "active": 4, "improved": 5}
    raise ValueError(f"unknown op {op!r}")


def _time_us(fn: Callable[[], object], reps: int = 20, device: str = "cuda") -> float:
    """Microseconds per call of ``fn`` (after one warm-up call): CUDA events on CUDA, the median
    of ``reps`` wall-clock calls on CPU."""
    fn()
    if not device.startswith("cuda"):
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2] * 1e6
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000.0 / reps


OPS = ("fixed_point_step", "anderson_residual", "anderson_mix",
       "broyden_dots", "broyden_update", "track_status")


def _dtypes(op: str) -> tuple:
    return (torch.float32, torch.float64) if op == "track_status" else tuple(KERNEL_TOL)


def _clones(args: list) -> list:
    return [a.clone() if isinstance(a, torch.Tensor) else a for a in args]


def _solver_op(impl: str, op: str) -> Callable[..., None]:
    """``impl`` ``"triton"``: the launcher of ``deq_fast.kernels``; ``"C++"``: the op through the
    dispatcher (the C++ kernel of the tensors' device)."""
    if impl == "triton":
        from deq_fast import kernels
        return getattr(kernels, op)
    return getattr(torch.ops.deq_fast, op).default


def run_kernel_checks(device: str, shapes: list, ops: tuple = OPS, impl: str = "triton") -> list:
    """Kernels against their references on ``device`` for ``shapes`` (``[(B, D), ...]``; odd
    positions use full/wrapped histories, even ones partly filled) and every dtype the kernel
    takes (``impl="C++"``: float32 and float64).

    Returns:
        :class:`Row` per (op, shape, dtype), checks named ``"<impl> <op>"``.
    """
    from deq_fast.ops.table import REFERENCE

    rows = []
    for op in ops:
        dtypes = _dtypes(op) if impl == "triton" else (torch.float32, torch.float64)
        for i, (B, D) in enumerate(shapes):
            for dtype in dtypes:
                args, outs = _case(op, B, D, dtype, i % 2 == 1, device)
                kargs, rargs = _clones(args), _clones(args)
                check, dt = f"{impl} {op}", DTYPE_IDS[dtype]
                try:
                    _solver_op(impl, op)(*kargs)
                    getattr(REFERENCE, op)(*rargs)
                    rows.append(_compared(check, f"{B}x{D}", dt,
                                          [(kargs[i], rargs[i]) for i in outs.values()],
                                          lambda scale: KERNEL_TOL[dtype] * scale))
                except Exception as exc:                                 # reported, not raised
                    rows.append(_failed(check, f"{B}x{D}", dt, exc))
    return rows


METHODS = ("anderson", "broyden", "fixed_point")
#: method -> its name in TorchDEQ's solver registry (and deq_fast's drop-in ``get_solver``)
TORCHDEQ_NAMES = {"anderson": "anderson", "broyden": "broyden", "fixed_point": "fixed_point_iter"}


def _solve_problem(device: str, B: int = 3, D: int = 37) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f(z) = tanh(z W + bias)`` on ``[B, D]`` states, ``||W||`` about 0.4 (float32)."""
    gen = torch.Generator().manual_seed(0)
    W = (torch.randn(D, D, generator=gen) * 0.4 / D ** 0.5).to(device)
    bias = torch.randn(B, D, generator=gen).to(device)
    return lambda z: torch.tanh(z @ W + bias)


def run_solve_checks(device: str) -> list:
    """A short solve per method with backend 'triton' against 'reference' (float32)."""
    import deq_fast

    B, D = 3, 37
    f = _solve_problem(device, B, D)
    rows = []
    for method in METHODS:
        x0 = torch.zeros(B, D, device=device)
        check = f"solve/{method}"
        try:
            got = deq_fast.solve(f, x0, method=method, max_iter=10, tol=1e-5, backend="triton")
            want = deq_fast.solve(f, x0, method=method, max_iter=10, tol=1e-5, backend="reference")
            row = _compared(check, f"{B}x{D}", "fp32", [(got.z, want.z),
                                                        (got.rel_trace, want.rel_trace)],
                            lambda scale: 1e-5)
            ok = row.ok and got.nfe == want.nfe and got.backend == "triton"
            rows.append(dataclasses.replace(row, ok=ok, tol=1e-5))
        except Exception as exc:
            rows.append(_failed(check, f"{B}x{D}", "fp32", exc))
    return rows


#: iterations of the eager/captured/torchdeq solves
SOLVE_ITERS = 10


def _eager_solve(f: Callable, x0: torch.Tensor, method: str) -> Callable[[], torch.Tensor]:
    """Each method's fixed-iteration solve through the TorchDEQ drop-in (``deq_fast.get_solver``:
    TorchDEQ's defaults, so the result is comparable with torchdeq's), tolerance 0, no host
    sync (``check_every=0``), the default backend."""
    import deq_fast

    solver = deq_fast.get_solver(TORCHDEQ_NAMES[method])
    return lambda: solver(f, x0, max_iter=SOLVE_ITERS, tol=0.0, check_every=0)[0]


def _captured(fn: Callable[[], torch.Tensor], device: str) -> Callable[[], torch.Tensor]:
    """``fn`` under ``torch.compile(fullgraph=True)``: ``mode="reduce-overhead"`` (CUDA graphs)
    on CUDA, inductor's default mode on CPU; called until the CUDA graph is recorded."""
    torch._dynamo.reset()
    mode = "reduce-overhead" if device.startswith("cuda") else "default"
    captured = torch.compile(fn, mode=mode, fullgraph=True)
    for _ in range(3):          # reduce-overhead records its CUDA graph on a later call
        captured().clone()      # (a CUDA graph's output is overwritten by the next replay)
    return lambda: captured().clone()


def run_capture_checks(device: str, timing: bool = False, B: int = 3, D: int = 37,
                       torchdeq: bool = False) -> list:
    """Eager against captured (:func:`_captured`) for each method's fixed-iteration solve; with
    ``torchdeq``, also the ``torchdeq/<method> captured`` rows (:func:`run_torchdeq_checks`).

    Returns:
        :class:`Row` per method (with ``timing``: ``us`` captured, ``base_us`` eager, per solve).
    """
    f = _solve_problem(device, B, D)
    x0 = torch.zeros(B, D, device=device)
    rows = []
    for method in METHODS:
        check = f"captured/{method}"
        eager = _eager_solve(f, x0, method)
        try:
            captured = _captured(eager, device)
            row = _compared(check, f"{B}x{D}", "fp32", [(captured(), eager())],
                            lambda scale: 1e-5 * scale)
            if timing:
                row = dataclasses.replace(row, us=_time_us(captured, TIMING_REPS, device),
                                          base_us=_time_us(eager, TIMING_REPS, device))
            rows.append(row)
            if torchdeq:
                rows += run_torchdeq_checks(device, {method: captured}, "captured", timing, B, D)
        except Exception as exc:                                         # reported, not raised
            rows.append(_failed(check, f"{B}x{D}", "fp32", exc))
    return rows


def _torchdeq_solver(method: str) -> Optional[Callable]:
    try:
        from torchdeq.solver import get_solver
    except ImportError:
        return None
    return get_solver(TORCHDEQ_NAMES[method])


def run_torchdeq_checks(device: str, solves: Optional[dict] = None, label: str = "eager",
                        timing: bool = True, B: int = 3, D: int = 37) -> list:
    """A whole solve per method (``SOLVE_ITERS`` iterations, tolerance 0) against torchdeq's on
    the same ``f``: the results compared (``1e-5`` relative, float32) and, with ``timing``, both
    timed (``us`` ours, ``base_us`` torchdeq's).

    Args:
        solves: ``{method: () -> z}`` to check (default: the eager :func:`_eager_solve`).
        label: ``"eager"`` or ``"captured"``, the rows' names ``torchdeq/<method> <label>``.
    """
    f = _solve_problem(device, B, D)
    x0 = torch.zeros(B, D, device=device)
    solves = solves or {m: _eager_solve(f, x0, m) for m in METHODS}
    rows = []
    for method, ours in solves.items():
        check, shape = f"torchdeq/{method} {label}", f"{B}x{D}"
        solver = _torchdeq_solver(method)
        if solver is None:
            rows.append(Row(check, shape, "fp32", note="torchdeq not installed"))
            continue
        try:
            def theirs(solver=solver) -> torch.Tensor:
                with torch.no_grad():
                    return solver(f, x0, max_iter=SOLVE_ITERS, tol=0.0)[0]
            row = _compared(check, shape, "fp32", [(ours(), theirs())], lambda scale: 1e-5 * scale)
            if timing:
                us = _time_us(ours, TIMING_REPS, device)
                base = _time_us(theirs, TIMING_REPS, device)
                row = dataclasses.replace(row, us=us, base_us=base,
                                          note=f"{base / us:.2f}x as fast as torchdeq")
            rows.append(row)
        except Exception as exc:                                         # reported, not raised
            rows.append(_failed(check, shape, "fp32", exc))
    return rows


# ----------------------------------------------------------------------------- the C++ ops

#: The shapes of the C++ backward ops' checks, from csrc/cuda/backward_ops.cu's launch config:
#: a chunk of D holds at least kThreads x kMinVecsPerThread = 1024 vectors (4096 floats, 2048
#: doubles), so D = 12,289 gives 3 (float) / 6 (double) chunks per sample with D not a multiple
#: of the vector width (the scalar path and its tail) at B = 3, and D = 16,384 gives 4 / 8
#: vectorised chunks at B = 1. Column groups: kColsPerBlock = 12 columns per block for the
#: Anderson and Arnoldi dots (m = 14 history columns, Arnoldi step j = 13), kBroydenColsPerBlock
#: = 6 for Broyden (8 stored updates): two groups each.
CPP_SHAPES = ((3, 12289), (1, 16384))
CPP_COLUMNS = {"anderson": 14, "broyden": 8, "arnoldi": 13}


def _gmres_state(r: "_Inputs", B: int, D: int, dtype: torch.dtype, steps: int):
    """A restarted-GMRES state after ``bwd_gmres_start`` and ``steps`` Arnoldi steps (the
    references, ``J^T q`` drawn at random), restart ``steps + 1``: ``(Q, R, cs, sn, s, kdim, cyc)``."""
    from deq_fast.ops import backward as bwd

    k = steps + 1
    y = r.randn((B, D), dtype)
    Q = torch.zeros(k + 1, B, D, dtype=dtype)
    R = torch.zeros(B, k, k + 1, dtype=torch.float64)
    cs, sn = torch.zeros(B, k, dtype=torch.float64), torch.zeros(B, k, dtype=torch.float64)
    s = torch.zeros(B, k + 1, dtype=torch.float64)
    kdim = torch.zeros(B, dtype=torch.int64)
    cyc = torch.zeros(B, dtype=torch.bool)
    bwd.bwd_gmres_start_reference(y, torch.ones(B, dtype=torch.bool), Q, s, kdim, cyc)
    ign = torch.ones(B, dtype=torch.float64)
    for j in range(steps):
        bwd.bwd_gmres_arnoldi_reference(r.randn((B, D), dtype, 0.2), Q, R, cs, sn, s, kdim, cyc,
                                        ign, j, 0.0)
    return Q, R, cs, sn, s, kdim, cyc


def cpp_cuda_cases(dtype: torch.dtype = torch.float32, B: int = 3, D: int = 12289,
                   columns: Optional[dict] = None) -> dict:
    """``{op: args}`` on CPU for every op of ``deq_fast._C`` with a CUDA kernel (csrc/cuda/), in
    the layouts the backward loop uses (histories ``[m, B, D]``, small state float64), with full
    rings (the slot written replaces a stored column) and ``columns`` (default
    :data:`CPP_COLUMNS`). Shared by :func:`run_cpp_checks` and tests/ops/test_extension.py."""
    cols = columns or CPP_COLUMNS
    m, L, j = cols["anderson"], cols["broyden"], cols["arnoldi"]
    r = _Inputs("cpu", "cpp", dtype, B, D)
    x, y = r.randn((B, D), dtype), r.randn((B, D), dtype)
    act = torch.arange(B) % 3 != 1                  # B = 3: [True, False, True]
    ign = torch.rand(B, generator=r.gen, dtype=torch.float64) + 0.5
    G = r.randn((m, B, D), dtype)
    gram = torch.einsum("ibd,jbd->bij", G.double(), G.double()).contiguous()
    h = r.randn((B, 5, 7), dtype)
    Q, R, cs, sn, s, kdim, cyc = _gmres_state(r, B, D, dtype, j)
    return {
        "anderson_lstsq": ((h @ h.transpose(1, 2)).contiguous(), 4, 2, 1e-3, True),
        "bwd_track": (x, y, r.randn((B, D), dtype), ign, torch.zeros(B, D, dtype=dtype),
                      torch.zeros(B, D, dtype=dtype),
                      torch.tensor([NAN, 1e9, 1e-9] * B, dtype=torch.float64)[:B],
                      act.clone(), 1e-3),
        "bwd_masked_add": (x.clone(), y, act),
        "bwd_anderson_mix": (x.clone(), y, r.randn((m, B, D), dtype), G.clone(), gram.clone(), act,
                             m // 2, m, 1e-4),
        "bwd_broyden_step": (x.clone(), y, r.randn((B, D), dtype), r.randn((B, D), dtype, 0.3),
                             r.randn((L, B, D), dtype, 0.1), r.randn((L, B, D), dtype, 0.1), act,
                             L, L // 2),
        "bwd_gmres_start": (y, act, torch.zeros_like(Q), s.clone(), kdim.clone(), act.clone()),
        "bwd_gmres_arnoldi": (r.randn((B, D), dtype, 0.2), Q.clone(), R.clone(), cs.clone(),
                              sn.clone(), s.clone(), kdim.clone(), cyc.clone(), ign, j, 0.0),
        "bwd_gmres_update": (x.clone(), Q, R, s, kdim),
    }


def _shape_id(B: int, D: int) -> str:
    c = CPP_COLUMNS
    return f"{B}x{D} m={c['anderson']},L={c['broyden']},j={c['arnoldi']}"


def run_cpp_checks(device: str, against: Optional[str] = None) -> list:
    """Every C++ op of ``deq_fast._C`` with a kernel for ``device``, at each of
    :data:`CPP_SHAPES`, against (``against``) ``"cpu op"``, the same op's CPU kernel (the
    default on CUDA), or ``"reference"``, the op's pure-torch reference (the default on CPU):
    every tensor argument after the call (the in-place outputs) and the return value. (The
    forward solver ops' C++ CPU kernels: :func:`run_kernel_checks` with ``impl="C++"``.)"""
    from deq_fast.ops.table import OPS_BY_NAME

    against = against or ("cpu op" if device.startswith("cuda") else "reference")
    if against not in ("cpu op", "reference"):
        raise ValueError(f"against must be 'cpu op' or 'reference', got {against!r}")
    rows = []
    for B, D in CPP_SHAPES:
        for dtype in (torch.float32, torch.float64):
            for op, args in cpp_cuda_cases(dtype, B, D).items():
                check, shape, dt = f"C++ {op}", _shape_id(B, D), DTYPE_IDS[dtype]
                base = _clones(args)
                ours = [a.to(device) if isinstance(a, torch.Tensor) else a for a in args]
                try:
                    fn = getattr(torch.ops.deq_fast, op).default
                    want = (fn if against == "cpu op" else OPS_BY_NAME[op].reference)(*base)
                    pairs = [(fn(*ours), want)] + [(o, b) for o, b in zip(ours, base)
                                                   if isinstance(b, torch.Tensor)]
                    rows.append(_compared(check, shape, dt, [p for p in pairs if p[1] is not None],
                                          lambda scale: (1e-10 if dtype == torch.float64
                                                         else 2e-5) * scale))
                except Exception as exc:                                 # reported, not raised
                    rows.append(_failed(check, shape, dt, exc))
    return rows


def run_cpp_cuda_checks() -> list:
    """:func:`run_cpp_checks` on CUDA: every C++ CUDA op against the same op's CPU kernel."""
    return run_cpp_checks("cuda")


# ----------------------------------------------------------------------------- timing


@dataclasses.dataclass(frozen=True)
class Peak:
    """The peak bandwidth the floors use, and where it came from."""
    bytes_per_s: float
    source: str


def measure_copy_bandwidth(device: str, mib: int = 256, reps: int = 5) -> float:
    """Bytes per second of ``dst.copy_(src)`` of ``mib`` MiB (read + write), the best of
    ``reps``."""
    n = mib * 2 ** 20 // 4
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    best = min(_time_us(lambda: dst.copy_(src), reps=1, device=device) for _ in range(reps))
    return 2 * n * 4 / (best * 1e-6)


def peak_bandwidth(device: str) -> Peak:
    """A GPU of :data:`deq_fast.ops.traffic.GPUS` (by ``torch.cuda.get_device_name``): its
    datasheet bandwidth; any other device: :func:`measure_copy_bandwidth`."""
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(device)
        gpu = traffic.known_gpu(name)
        if gpu is not None:
            return Peak(gpu.dram_bytes_per_s, f"{gpu.name} datasheet ({name})")
        return Peak(measure_copy_bandwidth(device), f"measured copy_ of 256 MiB ({name})")
    return Peak(measure_copy_bandwidth(device, 64), "measured copy_ of 64 MiB (CPU)")


#: the shapes of the Triton kernels' checks (the interpreter runs the CPU ones): tails, B = 1
KERNEL_SHAPES = {"cpu": ((1, 37), (3, 130)),
                 "cuda": ((1, 37), (3, 130), (64, 4099), (128, 16384))}
TIMING_REPS = 20                # calls timed per row (the reference: a quarter)
#: the timing shapes: ``(B, D)`` per device type (8 MB per float32 state row: the histories
#: exceed a CPU's last-level cache)
TIMING_COLUMNS = {"anderson": 6, "broyden": 8, "arnoldi": 8}   # the C++ backward ops'
TIMING_SHAPES = {"cuda": (32, 65536), "cpu": (4, 2 ** 19)}
SMALL_BYTES = 2 ** 20           # a call moving less is bound by latency, not bandwidth


def _timed(check: str, shape: str, dtype: torch.dtype, fn: Callable, ref: Callable, op: str,
           args: list, peak: Peak, device: str) -> Row:
    """A timing row: ``fn`` and ``ref`` per call, and ``fn`` against ``op``'s bandwidth floor."""
    try:
        us = _time_us(fn, reps=TIMING_REPS, device=device)
        base = _time_us(ref, reps=max(1, TIMING_REPS // 4), device=device)
    except Exception as exc:                                             # reported, not raised
        return _failed(check, shape, DTYPE_IDS[dtype], exc)
    moved = traffic.op_traffic(op, args).moved
    return Row(check, shape, DTYPE_IDS[dtype], us=us, base_us=base, gbps=moved / us / 1e3,
               x_floor=us / (moved / peak.bytes_per_s * 1e6),
               note="O(B) bytes: latency-bound" if moved < SMALL_BYTES else "")


def run_timing(device: str, peak: Peak, shape: Optional[tuple] = None,
               dtypes: tuple = (torch.float32,), impl: Optional[str] = None,
               backward: bool = True) -> list:
    """Each forward kernel (``impl``: ``"triton"``, the default on CUDA, or ``"C++"``, the
    default on CPU) and (``backward``) each C++ backward op at ``shape`` (default :data:`TIMING_SHAPES`; the
    backward ops' histories :data:`TIMING_COLUMNS`) against its bandwidth floor at ``peak``, and
    against its torch reference on the same arguments (the ops run in place on the same
    arguments again and again: the rings are full, so the traffic stays what the formula
    counts)."""
    from deq_fast.ops.table import OPS_BY_NAME, REFERENCE

    B, D = shape or TIMING_SHAPES["cuda" if device.startswith("cuda") else "cpu"]
    impl = impl or ("triton" if device.startswith("cuda") else "C++")
    rows = []
    for dtype in dtypes:
        for op in OPS:
            args, _ = _case(op, B, D, dtype, True, device)
            rargs = _clones(args)
            rows.append(_timed(f"time {impl} {op}", f"{B}x{D}", dtype,
                               lambda: _solver_op(impl, op)(*args),
                               lambda: getattr(REFERENCE, op)(*rargs), op, args, peak, device))
        cases = cpp_cuda_cases(dtype, B, D, TIMING_COLUMNS) if backward else {}
        for op, cpu_args in cases.items():
            if op == "anderson_lstsq":
                continue
            args = [a.to(device) if isinstance(a, torch.Tensor) else a for a in cpu_args]
            rargs = _clones(args)
            rows.append(_timed(f"time C++ {op}", f"{B}x{D}", dtype,
                               lambda: getattr(torch.ops.deq_fast, op).default(*args),
                               lambda: OPS_BY_NAME[op].reference(*rargs), op, args, peak, device))
    return rows


# ----------------------------------------------------------------------------- the table

#: the table's columns: Row field, header, width, format of a value
COLUMNS = (("check", "check", -30, "{}"), ("shape", "shape", 24, "{}"), ("dtype", "dtype", 5, "{}"),
           ("err", "max abs err", 11, "{:.3e}"), ("tol", "tol", 8, "{:.1e}"),
           ("ok", "result", 6, "{}"), ("us", "us", 10, "{:.1f}"), ("base_us", "base us", 10, "{:.1f}"),
           ("gbps", "GB/s", 8, "{:.2f}"), ("x_floor", "x floor", 8, "{:.2f}"),
           ("note", "note", -1, "{}"))


def _cell(value, width: int, fmt: str) -> str:
    """``value`` formatted and padded (``width < 0``: left-aligned); None and NaN show as ``-``."""
    if isinstance(value, bool):
        value = "PASS" if value else "FAIL"
    text = "-" if value is None or (isinstance(value, float) and math.isnan(value)) \
        else fmt.format(value)
    return text.ljust(-width) if width < 0 else text.rjust(width)


def render(rows: list) -> str:
    """The table, plain text, one line per :class:`Row` (``result``: PASS, FAIL, or ``-`` for a
    row that compares nothing)."""
    head = " ".join(_cell(h, w, "{}") for _, h, w, _ in COLUMNS).rstrip()
    lines = [head, "-" * len(head)]
    lines += [" ".join(_cell(getattr(r, k), w, f) for k, _, w, f in COLUMNS).rstrip() for r in rows]
    return "\n".join(lines)


def _cpp_kernels(device: str) -> tuple:
    """``(whether deq_fast._C has its C++ kernels for device, the header line saying so)``: a
    build without nvcc has none for CUDA, and its C++ rows would only fail."""
    from deq_fast.ops import extension
    from deq_fast.ops.table import OPS_BY_NAME, has_kernel

    ok, msg = extension.extension_status()
    kind = device.split(":")[0]
    if ok and not has_kernel(OPS_BY_NAME["bwd_track"], kind):
        return False, (f"{msg}, without {kind.upper()} kernels (built without nvcc? see "
                       "docs/gpu.md): no C++ rows")
    return ok, msg


def _json_row(row: Row) -> dict:
    """The row's fields, NaN as null (strict JSON)."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v
            for k, v in dataclasses.asdict(row).items()}


def main(argv: Optional[list] = None) -> int:
    """Run the self-test; returns the process exit code (0: all rows pass)."""
    parser = argparse.ArgumentParser(prog="python -m deq_fast.selftest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timing", action="store_true",
                        help="also time each kernel against its bandwidth floor and its torch "
                             "reference, and whole solves against torchdeq")
    parser.add_argument("--capture", action="store_true",
                        help="on CPU, also compare eager and torch.compile'd solves (inductor "
                             "builds C++: about a minute); always done on CUDA")
    parser.add_argument("--json", metavar="PATH", help="also write the table as JSON to PATH")
    args = parser.parse_args(argv)
    # the interpreter evaluates with numpy, which warns where a kernel divides by zero on purpose
    # (Broyden's den = 0, a singular Anderson system) before masking the result
    warnings.filterwarnings("ignore", message=".*encountered in", category=RuntimeWarning)

    from deq_fast.ops import backends

    ok, msg = backends.triton_status()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not ok:
        print(f"deq_fast.selftest: cannot run the kernels: {msg}")
        return 2
    if device == "cpu" and not backends.interpreter_enabled():
        print("deq_fast.selftest: no CUDA device and TRITON_INTERPRET is not 1: nothing can run "
              "the Triton kernels")
        return 2
    on_cuda = device == "cuda"
    mode = "compiled, CUDA" if on_cuda else "interpreter, CPU tensors"
    peak = peak_bandwidth(device) if args.timing else None
    has_cpp, cpp_msg = _cpp_kernels(device)
    header = [f"deq_fast.selftest: torch {torch.__version__}, {msg}, device {device} ({mode})",
              cpp_msg]
    if peak:
        header.append(f"peak bandwidth for the floors: {peak.bytes_per_s / 1e9:.1f} GB/s, "
                      f"{peak.source}")
    shapes = KERNEL_SHAPES["cuda" if on_cuda else "cpu"]
    rows = run_kernel_checks(device, shapes) + run_solve_checks(device)
    if has_cpp and not on_cuda:      # the forward ops' C++ CPU kernels
        rows += run_kernel_checks(device, shapes, impl="C++")
    if has_cpp:
        rows += run_cpp_checks(device)
    if args.timing and (on_cuda or has_cpp):    # Triton on CUDA, the C++ kernels on CPU
        rows += run_timing(device, peak, backward=has_cpp)
    if args.timing:
        rows += run_torchdeq_checks(device)
    if on_cuda or args.capture:
        rows += run_capture_checks(device, args.timing, torchdeq=args.timing)
    print("\n".join(header))
    print(render(rows))
    failed = sum(r.ok is False for r in rows)
    compared = sum(r.ok is not None for r in rows)
    print(f"{compared - failed}/{compared} comparisons passed")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"header": header, "peak": dataclasses.asdict(peak) if peak else None,
                       "rows": [_json_row(r) for r in rows]}, fh, indent=1)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
