"""``python -m deq_fast.selftest``: every Triton kernel against its torch reference, here.

On a CUDA machine the compiled kernels run on the GPU; without one they run on CPU tensors under
Triton's interpreter (``TRITON_INTERPRET=1``, set here when absent, before Triton is imported).
Prints one row per (op, shape, dtype): the max absolute error against the pure-torch reference
(``deq_fast/ops``), the tolerance (per dtype, scaled by the reference's magnitude when above 1)
and PASS/FAIL; then a short end-to-end solve per method with ``backend='triton'`` against
``backend='reference'``; then (on CUDA, or on CPU with ``--capture``) each method's fixed-iteration
solve eager against captured by ``torch.compile(fullgraph=True)`` (``mode="reduce-overhead"``:
CUDA graphs; inductor on CPU). With ``--timing`` (CUDA, or CPU with ``--capture``) it adds the time
per call of the kernel and of the torch reference (for the ``captured/`` rows: captured and eager
microseconds per solve). Exit code 0 when every row passes, 1 otherwise, 2 when the kernels cannot
run.

Example:
    $ python -m deq_fast.selftest                 # CUDA: compiled kernels; CPU: the interpreter
    $ python -m deq_fast.selftest --timing        # + microseconds per call (CUDA)
    $ python -m deq_fast.selftest --capture --timing   # CPU: + eager vs inductor per solve
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from typing import Callable, Optional

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# after TRITON_INTERPRET: importing deq_fast may import the kernels
from deq_fast.testing import (  # noqa: E402
    DTYPE_IDS,
    KERNEL_TOL,
    NAN,
    Draws,
    acc_dtype,
    compare,
)

__all__ = ["main", "run_kernel_checks", "run_solve_checks", "run_capture_checks",
           "run_cpp_cuda_checks", "cpp_cuda_cases"]


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


def _time_us(fn: Callable[[], None], reps: int = 50, device: str = "cuda") -> float:
    fn()
    if device != "cuda":
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        return (time.perf_counter() - start) * 1e6 / reps
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


def run_kernel_checks(device: str, shapes: list, timing: bool = False,
                      ops: tuple = OPS) -> list:
    """Kernels against their references on ``device`` for ``shapes`` (``[(B, D), ...]``; odd
    positions use full/wrapped histories, even ones partly filled) and every dtype.

    Returns:
        table rows ``(op, shape, dtype, max abs err, tol, ok, kernel us, torch us)``.
    """
    from deq_fast import kernels
    from deq_fast.ops.table import REFERENCE

    rows = []
    for op in ops:
        dtypes = (torch.float32, torch.float64) if op == "track_status" else tuple(KERNEL_TOL)
        for i, (B, D) in enumerate(shapes):
            for dtype in dtypes:
                args, outs = _case(op, B, D, dtype, i % 2 == 1, device)
                kargs = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
                rargs = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
                err, tol, t_k, t_r = 0.0, 0.0, None, None
                try:
                    getattr(kernels, op)(*kargs)
                    getattr(REFERENCE, op)(*rargs)
                    ok = True
                    for idx in outs.values():
                        e, scale = compare(kargs[idx], rargs[idx])
                        err, tol = max(err, e), max(tol, KERNEL_TOL[dtype] * scale)
                        ok &= e <= KERNEL_TOL[dtype] * scale
                    if timing and device == "cuda":
                        t_k = _time_us(lambda: getattr(kernels, op)(*kargs))
                        t_r = _time_us(lambda: getattr(REFERENCE, op)(*rargs))
                except Exception as exc:                                 # reported, not raised
                    ok, err = False, float("nan")
                    print(f"  {op} {B}x{D} {DTYPE_IDS[dtype]}: {type(exc).__name__}: {exc}",
                          file=sys.stderr)
                rows.append((op, f"{B}x{D}", DTYPE_IDS[dtype], err, tol, ok, t_k, t_r))
    return rows


METHODS = ("anderson", "broyden", "fixed_point")


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
        try:
            got = deq_fast.solve(f, x0, method=method, max_iter=10, tol=1e-5, backend="triton")
            want = deq_fast.solve(f, x0, method=method, max_iter=10, tol=1e-5, backend="reference")
            err = max(compare(got.z, want.z)[0], compare(got.rel_trace, want.rel_trace)[0])
            ok = err <= 1e-5 and got.nfe == want.nfe and got.backend == "triton"
        except Exception as exc:
            ok, err = False, float("nan")
            print(f"  solve/{method}: {type(exc).__name__}: {exc}", file=sys.stderr)
        rows.append((f"solve/{method}", f"{B}x{D}", "fp32", err, 1e-5, ok, None, None))
    return rows


def run_capture_checks(device: str, timing: bool = False, B: int = 3, D: int = 37) -> list:
    """Eager against captured: each method's fixed-iteration solve (``check_every=0``, the
    default backend) eager and under ``torch.compile(fullgraph=True)``: ``mode="reduce-overhead"``
    (CUDA graphs) on CUDA, inductor's default mode on CPU.

    Returns:
        table rows ``(op, shape, dtype, max abs err, tol, ok, captured us, eager us)`` (the
        times per solve with ``timing``, else None).
    """
    import deq_fast

    f = _solve_problem(device, B, D)
    x0 = torch.zeros(B, D, device=device)
    mode = "reduce-overhead" if device == "cuda" else "default"
    rows = []
    for method in METHODS:
        def eager(method=method) -> torch.Tensor:
            return deq_fast.solve(f, x0, method=method, max_iter=10, check_every=0).z
        err, tol, t_c, t_e = float("nan"), 0.0, None, None
        try:
            torch._dynamo.reset()
            captured = torch.compile(eager, mode=mode, fullgraph=True)
            for _ in range(3):          # reduce-overhead records its CUDA graph on a later call
                got = captured().clone()  # (a CUDA graph's output is overwritten by the next replay)
            err, scale = compare(got, eager())
            tol = 1e-5 * scale
            ok = err <= tol
            if timing:
                t_c, t_e = _time_us(captured, device=device), _time_us(eager, device=device)
        except Exception as exc:                                         # reported, not raised
            ok = False
            print(f"  captured/{method}: {type(exc).__name__}: {exc}", file=sys.stderr)
        rows.append((f"captured/{method}", f"{B}x{D}", "fp32", err, tol, ok, t_c, t_e))
    return rows


def cpp_cuda_cases(dtype: torch.dtype = torch.float32) -> dict:
    """``{op: args}`` on CPU for every op of ``deq_fast._C`` with a CUDA kernel (csrc/cuda/), in
    the layouts the backward loop uses (histories ``[m, B, D]``, small state float64). Shared by
    :func:`run_cpp_cuda_checks` and tests/ops/test_extension.py."""
    r = _Inputs("cpu", "cpp", dtype)
    B, D, m = 3, 300, 4
    x, y = r.randn((B, D), dtype), r.randn((B, D), dtype)
    act = torch.tensor([True, False, True])
    ign = torch.rand(B, generator=r.gen, dtype=torch.float64) + 0.5
    G = r.randn((m, B, D), dtype)
    gram = torch.einsum("ibd,jbd->bij", G.double(), G.double()).contiguous()
    k = 3
    Q = torch.zeros(k + 1, B, D, dtype=dtype)
    Q[0] = y / y.norm(dim=1, keepdim=True)
    s0 = torch.zeros(B, k + 1, dtype=torch.float64)
    s0[:, 0] = 1.0
    R = torch.zeros(B, k, k + 1, dtype=torch.float64)
    R[:, 0, :2] = torch.tensor([2.0, 0.5], dtype=torch.float64)
    kdim = torch.tensor([1, 0, 1])
    h = r.randn((B, 5, 7), dtype)
    return {
        "anderson_lstsq": ((h @ h.transpose(1, 2)).contiguous(), 4, 2, 1e-3, True),
        "bwd_track": (x, y, r.randn((B, D), dtype), ign, torch.zeros(B, D, dtype=dtype),
                      torch.zeros(B, D, dtype=dtype), torch.tensor([NAN, 1e9, 1e-9],
                                                                   dtype=torch.float64),
                      act.clone(), 1e-3),
        "bwd_masked_add": (x.clone(), y, act),
        "bwd_anderson_mix": (x.clone(), y, r.randn((m, B, D), dtype), G.clone(), gram.clone(), act,
                             2, 3, 1e-4),
        "bwd_broyden_step": (x.clone(), y, r.randn((B, D), dtype), r.randn((B, D), dtype, 0.3),
                             r.randn((m, B, D), dtype, 0.1), r.randn((m, B, D), dtype, 0.1), act,
                             2, 2),
        "bwd_gmres_start": (y, act, Q.clone(), s0.clone(), kdim.clone(), act.clone()),
        "bwd_gmres_arnoldi": (r.randn((B, D), dtype, 0.2), Q.clone(), R.clone(),
                              torch.zeros(B, k, dtype=torch.float64),
                              torch.zeros(B, k, dtype=torch.float64), s0.clone(), kdim.clone(),
                              act.clone(), ign, 0, 1e-6),
        "bwd_gmres_update": (x.clone(), Q, R, s0, kdim),
    }


def run_cpp_cuda_checks() -> list:
    """Every C++ CUDA op (``deq_fast._C``, csrc/cuda/) against the same op's CPU kernel: every
    tensor argument after the call (the in-place outputs) and the return value. CUDA only."""
    rows = []
    for dtype in (torch.float32, torch.float64):
        for op, args in cpp_cuda_cases(dtype).items():
            cpu = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            gpu = [a.to("cuda") if isinstance(a, torch.Tensor) else a for a in args]
            err, tol = 0.0, 0.0
            try:
                fn = getattr(torch.ops.deq_fast, op).default
                outs = [(fn(*cpu), fn(*gpu))]
                outs += [(c, g) for c, g in zip(cpu, gpu) if isinstance(c, torch.Tensor)]
                ok = True
                for c, g in outs:
                    if c is None:
                        continue
                    e, scale = compare(g, c)
                    t = (1e-10 if dtype == torch.float64 else 2e-5) * scale
                    err, tol, ok = max(err, e), max(tol, t), ok and e <= t
            except Exception as exc:                                     # reported, not raised
                ok, err = False, float("nan")
                print(f"  {op} {DTYPE_IDS[dtype]}: {type(exc).__name__}: {exc}", file=sys.stderr)
            rows.append((f"C++ {op}", "cuda/cpu", DTYPE_IDS[dtype], err, tol, ok, None, None))
    return rows


def _print(rows: list, timing: bool) -> None:
    head = f"{'op':<22} {'shape':>10} {'dtype':>5} {'max abs err':>12} {'tol':>10} {'result':>6}"
    if timing:
        head += f" {'kernel us':>10} {'torch us':>10}"
    print(head)
    print("-" * len(head))
    for op, shape, dt, err, tol, ok, t_k, t_r in rows:
        verdict = "PASS" if ok else "FAIL"
        line = f"{op:<22} {shape:>10} {dt:>5} {err:>12.3e} {tol:>10.1e} {verdict:>6}"
        if timing:
            line += f" {t_k if t_k is not None else float('nan'):>10.1f}"
            line += f" {t_r if t_r is not None else float('nan'):>10.1f}"
        print(line)


def main(argv: Optional[list] = None) -> int:
    """Run the self-test; returns the process exit code (0: all rows pass)."""
    parser = argparse.ArgumentParser(prog="python -m deq_fast.selftest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--timing", action="store_true",
                        help="also time kernel and reference per call (CUDA only)")
    parser.add_argument("--capture", action="store_true",
                        help="on CPU, also compare eager and torch.compile'd solves (inductor "
                             "builds C++: about a minute); always done on CUDA")
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
    mode = "compiled, CUDA" if device == "cuda" else "interpreter, CPU tensors"
    print(f"deq_fast.selftest: torch {torch.__version__}, {msg}, device {device} ({mode})")
    shapes = [(1, 37), (3, 130)] if device == "cpu" else [(1, 37), (3, 130), (64, 4099),
                                                          (128, 16384)]
    rows = run_kernel_checks(device, shapes, args.timing) + run_solve_checks(device)
    from deq_fast.ops import extension
    if device == "cuda" and extension.available():   # the C++ CUDA kernels of deq_fast._C
        rows += run_cpp_cuda_checks()
    if device == "cuda" or args.capture:
        rows += run_capture_checks(device, args.timing)
    _print(rows, args.timing and (device == "cuda" or args.capture))
    failed = sum(not r[5] for r in rows)
    print(f"{len(rows) - failed}/{len(rows)} passed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
