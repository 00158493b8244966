"""Broyden's update formula on hard linear systems: deq_fast's engine against the original formula.

The backward system of implicit differentiation, ``y = J^T y + grad``, solved as the fixed point of
``f(y) = J^T y + grad`` through the locuslab/deq contract (``deq_fast.broyden``) and through an
unfused restatement of the original (the oracle of ``tests/compat/test_locuslab.py``: explicit
``H dg``, the formula of locuslab/deq). ``J`` has spectral radius above 1 (``--radius``, plain
iteration diverges) or a wide spread of eigenvalues; ``--starts`` perturbed starting points
``y0 ~ N(0, sigma^2)``; the error is ``||y - y*|| / ||y*||`` against the exact solution.

Run::

    python benchmarks/bench_broyden_robustness.py [--starts 200] [--systems 1] [--dtypes float32 float64]

Prints, per dtype and per group of starts, the median and 90th-percentile error of each with a
95 % bootstrap interval (resampling the starts; ``--systems`` > 1 draws that many ``J`` and pools
the starts), the paired difference of the 90th percentiles with its interval, and on how many
starts deq_fast's error is larger than the original's (by more than 1 %). Groups: all starts, and
the starts where both converge (error under ``--converged``). On the others the error is that of
a solve that has not found the solution (errors of order 1): which of two non-converged iterates
is nearer to ``y*`` is decided by rounding (a different rounding of the same formula moves the
iterate by its own size there), so a percentile over them is not a measure of the update
formula; the intervals say how much of a difference the starts can resolve.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "compat"))

import deq_fast  # noqa: E402

from test_locuslab import oracle_broyden  # noqa: E402


def system(D: int, radius: float, seed: int, dtype: torch.dtype):
    """``J`` with eigenvalues spread in ``[-radius, radius]`` (some outside the unit disc)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    eig = torch.linspace(-radius, radius, D, dtype=torch.float64)
    J = Q @ torch.diag(eig) @ Q.T + 0.05 * torch.randn(D, D, generator=g, dtype=torch.float64)
    grad = torch.randn(2, D, generator=g, dtype=torch.float64)
    exact = torch.linalg.solve(torch.eye(D, dtype=torch.float64) - J.T, grad.T).T
    return J.to(dtype), grad.to(dtype), exact


def percentile(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def bootstrap(ours: list[float], theirs: list[float], stat, rounds: int = 2000,
              seed: int = 0) -> tuple[list[float], list[float], list[float]]:
    """``stat`` of ``ours``, of ``theirs`` and of their paired difference on ``rounds`` resamples
    of the starts (the same resample for both: the pairing is kept)."""
    g = torch.Generator().manual_seed(seed)
    n = len(ours)
    a, b, d = [], [], []
    for _ in range(rounds):
        idx = torch.randint(0, n, (n,), generator=g).tolist()
        sa, sb = stat([ours[i] for i in idx]), stat([theirs[i] for i in idx])
        a.append(sa)
        b.append(sb)
        d.append(sa - sb)
    return a, b, d


def interval(samples: list[float]) -> str:
    """The 95 % interval of bootstrap ``samples``."""
    return f"[{percentile(samples, 0.025):.3g}, {percentile(samples, 0.975):.3g}]"


def errors(f, exact: torch.Tensor, y0: torch.Tensor, threshold: int) -> tuple[float, float]:
    """Relative errors of deq_fast's and of the original formula's solve from ``y0``."""
    a = deq_fast.broyden(f, y0, threshold, eps=1e-12, stop_mode="abs")["result"]
    b = oracle_broyden(f, y0, threshold, eps=1e-12, stop_mode="abs")["result"]
    return (float((a.double() - exact).norm() / exact.norm()),
            float((b.double() - exact).norm() / exact.norm()))


def row(dtype: str, group: str, ours: list[float], theirs: list[float]) -> str:
    """One table row: medians and p90s with intervals, the p90 difference, the worse count."""
    if not ours:
        return f"| {dtype} | {group} | 0 | - | - | - | - | - | - |"
    _, _, dmed = bootstrap(ours, theirs, statistics.median)
    a90, b90, d90 = bootstrap(ours, theirs, lambda v: percentile(v, 0.9), seed=1)
    worse = sum(o > 1.01 * t for o, t in zip(ours, theirs))
    return (f"| {dtype} | {group} | {len(ours)} | {statistics.median(ours):.3g} | "
            f"{statistics.median(theirs):.3g} | {percentile(ours, 0.9):.3g} {interval(a90)} | "
            f"{percentile(theirs, 0.9):.3g} {interval(b90)} | "
            f"{percentile(ours, 0.9) - percentile(theirs, 0.9):+.3g} {interval(d90)} "
            f"(median {interval(dmed)}) | {worse} |")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--starts", type=int, default=200)
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    p.add_argument("--D", type=int, default=24)
    p.add_argument("--radius", type=float, default=1.3)
    p.add_argument("--threshold", type=int, default=40)
    p.add_argument("--sigma", type=float, default=1.0)
    p.add_argument("--systems", type=int, default=1, help="systems J (seeds 0..) pooled")
    p.add_argument("--converged", type=float, default=1e-2,
                   help="error under which a solve counts as converged")
    args = p.parse_args(argv)
    print(f"D={args.D}, radius={args.radius}, threshold={args.threshold}, sigma={args.sigma}, "
          f"{args.systems} system(s) x {args.starts} starts; intervals: 95 % bootstrap over starts")
    print("| dtype | starts | n | median err deq_fast | median err original | p90 deq_fast | "
          "p90 original | p90 deq_fast - original (median diff) | deq_fast worse by > 1 % |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.dtypes:
        dtype = getattr(torch, name)
        ours, theirs = [], []
        for seed in range(args.systems):
            J, grad, exact = system(args.D, args.radius, seed, dtype)
            f = lambda y, J=J, grad=grad: y @ J + grad           # noqa: E731  (J^T y per row)
            g = torch.Generator().manual_seed(1 + seed)
            for _ in range(args.starts):
                y0 = (args.sigma * torch.randn(2, args.D, generator=g, dtype=torch.float64)).to(dtype)
                o, t = errors(f, exact, y0, args.threshold)
                ours.append(o)
                theirs.append(t)
        both = [i for i, (o, t) in enumerate(zip(ours, theirs)) if max(o, t) < args.converged]
        print(row(name, "all", ours, theirs), flush=True)
        print(row(name, f"both converged (< {args.converged:g})", [ours[i] for i in both],
                  [theirs[i] for i in both]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
