"""Backward linear solve: VJPs to tolerance and wall time, deq_fast's methods vs torchdeq's.

Problem (near the edge of contraction): ``f(z) = tanh(z W^T + b)`` with symmetric
``W = Q diag(lam) Q^T``, five eigenvalues in ``[0.9, rho]`` (``rho`` = 0.9 or 0.95) and the rest
uniform in ``[-0.5, 0.6]``; small pre-activations, so ``J = diag(tanh') W`` has spectral radius
about ``rho`` (the measured value is printed). One tracked ``fz = f(z)`` per problem; the backward
solves ``g = grad + J^T g`` per sample to a relative residual ``||grad + J^T g - g|| / ||grad||``
of 1e-8 (float64).

torchdeq is run the way its ``ift=True`` backward runs it: its solver (``fixed_point_iter``,
``anderson_solver``) applied to ``y -> J^T y + grad`` from zeros. Its stopping test is on the
batch maximum of ``||f(y) - y||`` (``stop_mode='abs'``), so it gets
``tol = 1e-8 * min_b ||grad_b||``: the same relative tolerance (slightly stricter). Its VJPs are
counted by wrapping the function; the relative residual of its result is measured afterwards.

Run:
    python benchmarks/bench_backward.py                  # the side-by-side table (B=8, D=1024)
    BENCH_B=32 BENCH_D=4096 python benchmarks/bench_backward.py
    pytest benchmarks/bench_backward.py --benchmark-only  # pytest-benchmark timings
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch

from deq_fast.implicit.backward import DEFAULT_METHOD, implicit_backward

B = int(os.environ.get("BENCH_B", "8"))
D = int(os.environ.get("BENCH_D", "1024"))
TOL = 1e-8
MAX_ITER = 600
RHOS = (0.9, 0.95)
OURS = ("fixed_point", "anderson", "broyden", "gmres")
THEIRS = ("fixed_point_iter", "anderson")


def make_problem(rho: float, seed: int = 0):
    """Returns fz (tracked), z, grad and the spectral radius of J for sample 0."""
    gen = torch.Generator().manual_seed(seed)
    dt = torch.float64
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=dt))
    lam = torch.rand(D, generator=gen, dtype=dt) * 1.1 - 0.5
    lam[:5] = torch.linspace(0.9, rho, 5, dtype=dt)
    W = (Q * lam) @ Q.T
    b = 0.01 * torch.randn(D, generator=gen, dtype=dt)
    z = (0.01 * torch.randn(B, D, generator=gen, dtype=dt)).requires_grad_()
    fz = torch.tanh(z @ W.T + b)
    grad = torch.randn(B, D, generator=gen, dtype=dt)
    # J_0 = diag(d) W is similar to the symmetric diag(d)^1/2 W diag(d)^1/2 (d = tanh' > 0)
    s0 = (1 - fz[0].detach() ** 2).sqrt()
    sradius = torch.linalg.eigvalsh(s0[:, None] * W * s0[None, :]).abs().max().item()
    return fz, z, grad, sradius


def rel_residual(fz, z, grad, g):
    jtg = torch.autograd.grad(fz, z, g, retain_graph=True)[0]
    return ((grad + jtg - g).norm(dim=1) / grad.norm(dim=1)).max().item()


def run_ours(problem, method, backend="auto"):
    fz, z, grad, _ = problem
    g, info = implicit_backward(fz, z, grad, method=method, tol=TOL, max_iter=MAX_ITER,
                                backend=backend)
    return g, info["nvjp"], info["backend"]


def run_torchdeq(problem, solver_name):
    from torchdeq.solver import get_solver

    fz, z, grad, _ = problem
    count = [0]

    def linear_map(y):
        count[0] += 1
        return torch.autograd.grad(fz, z, y, retain_graph=True)[0] + grad

    tol = TOL * grad.norm(dim=1).min().item()
    out, _, _ = get_solver(solver_name)(linear_map, torch.zeros_like(grad), max_iter=MAX_ITER,
                                        tol=tol, stop_mode="abs")
    return out, count[0], "torchdeq"


def contenders():
    rows = [(f"deq_fast {m}", run_ours, m) for m in OURS]
    rows.append((f"deq_fast auto ({DEFAULT_METHOD}, python loop)",
                 lambda p, m: run_ours(p, m, backend="python"), "auto"))
    rows += [(f"torchdeq {s}", run_torchdeq, s) for s in THEIRS]
    return rows


# ---------------------------------------------------------------------------------------------
# pytest-benchmark
# ---------------------------------------------------------------------------------------------
_PROBLEMS: dict[float, tuple] = {}


def _problem(rho):
    if rho not in _PROBLEMS:
        _PROBLEMS[rho] = make_problem(rho)
    return _PROBLEMS[rho]


@pytest.mark.parametrize("rho", RHOS, ids=[f"rho{r}" for r in RHOS])
@pytest.mark.parametrize("name,runner,arg", contenders(), ids=[c[0] for c in contenders()])
def test_backward_solve(benchmark, rho, name, runner, arg):
    problem = _problem(rho)
    benchmark.group = f"backward rho={rho} B={B} D={D}"
    g, nvjp, backend = benchmark.pedantic(runner, args=(problem, arg), rounds=3, iterations=1,
                                          warmup_rounds=1)
    benchmark.extra_info.update(nvjp=nvjp, backend=backend, sradius=problem[3],
                                rel_residual=rel_residual(problem[0], problem[1], problem[2], g))


# ---------------------------------------------------------------------------------------------
# the side-by-side table
# ---------------------------------------------------------------------------------------------
def main(repeats: int = 3) -> None:
    import deq_fast

    print(f"backward solve to rel residual {TOL:g}, float64, B={B}, D={D}, cap {MAX_ITER} VJPs, "
          f"torch threads {torch.get_num_threads()}; {deq_fast.extension_status()[1]}")
    for rho in RHOS:
        problem = make_problem(rho)
        print(f"\nrho target {rho}: spectral radius of J (sample 0) = {problem[3]:.4f}")
        print(f"{'method':<44}{'VJPs':>6}{'rel resid':>11}{'time ms':>10}{'vs td anderson':>16}"
              f"{'backend':>10}")
        results = []
        for name, runner, arg in contenders():
            runner(problem, arg)  # warm-up
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                g, nvjp, backend = runner(problem, arg)
                times.append(time.perf_counter() - t0)
            res = rel_residual(problem[0], problem[1], problem[2], g)
            results.append((name, nvjp, res, statistics.median(times) * 1e3, backend))
        ref_t = next(r[3] for r in results if r[0] == "torchdeq anderson")
        for name, nvjp, res, ms, backend in results:
            print(f"{name:<44}{nvjp:>6}{res:>11.2e}{ms:>10.1f}{ms / ref_t:>15.2f}x{backend:>10}")


if __name__ == "__main__":
    main()
