"""Broyden's update formula on hard linear systems: deq_fast's engine against the original formula.

The backward system of implicit differentiation, ``y = J^T y + grad``, solved as the fixed point of
``f(y) = J^T y + grad`` through the locuslab/deq contract (``deq_fast.broyden``) and through an
unfused restatement of the original (the oracle of ``tests/compat/test_locuslab.py``: explicit
``H dg``, the formula of locuslab/deq). ``J`` has spectral radius above 1 (``--radius``, plain
iteration diverges) or a wide spread of eigenvalues; ``--starts`` perturbed starting points
``y0 ~ N(0, sigma^2)``; the error is ``||y - y*|| / ||y*||`` against the exact solution.

Run::

    python benchmarks/bench_broyden_robustness.py [--starts 200] [--dtypes float32 float64]

Prints, per dtype: median and 90th-percentile error of each, and on how many starts deq_fast's
error is larger than the original's (by more than 1 %).
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--starts", type=int, default=200)
    p.add_argument("--dtypes", nargs="+", default=["float32", "float64"])
    p.add_argument("--D", type=int, default=24)
    p.add_argument("--radius", type=float, default=1.3)
    p.add_argument("--threshold", type=int, default=40)
    p.add_argument("--sigma", type=float, default=1.0)
    args = p.parse_args(argv)
    print("| dtype | median err deq_fast | median err original | p90 deq_fast | p90 original | "
          "starts where deq_fast is worse |")
    print("|---|---|---|---|---|---|")
    for name in args.dtypes:
        dtype = getattr(torch, name)
        J, grad, exact = system(args.D, args.radius, 0, dtype)
        f = lambda y: y @ J + grad                      # noqa: E731  (J^T y per row)
        ours, theirs = [], []
        g = torch.Generator().manual_seed(1)
        for _ in range(args.starts):
            y0 = (args.sigma * torch.randn(2, args.D, generator=g, dtype=torch.float64)).to(dtype)
            a = deq_fast.broyden(f, y0, args.threshold, eps=1e-12, stop_mode="abs")["result"]
            b = oracle_broyden(f, y0, args.threshold, eps=1e-12, stop_mode="abs")["result"]
            ours.append(float((a.double() - exact).norm() / exact.norm()))
            theirs.append(float((b.double() - exact).norm() / exact.norm()))
        worse = sum(o > 1.01 * t for o, t in zip(ours, theirs))
        print(f"| {name} | {statistics.median(ours):.3g} | {statistics.median(theirs):.3g} | "
              f"{percentile(ours, 0.9):.3g} | {percentile(theirs, 0.9):.3g} | "
              f"{worse} / {args.starts} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
