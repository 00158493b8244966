"""Solve time deq_fast / torchdeq over a grid of shapes, interleaved in one process (CPU).

For each method, map and shape ``B x D`` of the grid, both libraries solve the same problem from the
same ``x0`` through the TorchDEQ contract for ``--iters`` iterations (``tol=0``: no early stop);
the two and ``f`` alone (the solve's ``--iters`` evaluations by themselves) alternate (A B C,
C B A, ...) for ``--repeats`` rounds (``report.interleaved_times``, after one warm-up each); the
ratio of the medians is printed with the floor ``f alone / torchdeq``, the lowest ratio any solver
can reach at that point.

The grid holds the clients' shapes: small batches with long states (MDEQ and the LMs per device:
B=1-4, D >= 30,000) and the acceptance size B=32, D=4096.

Run::

    python benchmarks/bench_shapes.py [--methods anderson broyden fixed_point] [--maps affine tanh]
        [--B 1 2 8 32] [--D 1024 4096 30720 65536] [--iters 40] [--repeats 7] [--threads 1]

Prints a markdown table (one row per method/map/B/D) and a summary line per method: the largest
ratio over the grid. Times are reported, never asserted.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_solvers import Size, get_solver, make_problem  # noqa: E402
from conftest import describe_machine, machine_line  # noqa: E402
from report import F_ALONE, f_alone, interleaved_times  # noqa: E402

MAPS = {"affine": "affine", "tanh": "elementwise", "halftanh": "halftanh"}


def _solve(solver, f, x0, iters) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.no_grad():
            return solver(f, x0, max_iter=iters, tol=0.0)[0]
    return run


def measure(method: str, fmap: str, B: int, D: int, iters: int, repeats: int) -> dict:
    """Median solve time of each library, their ratio and the floor for one grid point."""
    f, x0 = make_problem(Size(B=B, D=D, iters=iters, f=MAPS[fmap]))
    runs = {lib: _solve(get_solver(lib, method), f, x0, iters) for lib in ("torchdeq", "deq_fast")}
    runs[F_ALONE] = f_alone(f, x0, iters)
    times, _ = interleaved_times(runs, repeats)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"torchdeq_ms": 1e3 * med["torchdeq"], "deq_fast_ms": 1e3 * med["deq_fast"],
            "ratio": med["deq_fast"] / med["torchdeq"], "f_alone_ms": 1e3 * med[F_ALONE],
            "floor": med[F_ALONE] / med["torchdeq"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["anderson", "broyden", "fixed_point"])
    p.add_argument("--maps", nargs="+", default=["affine", "tanh"], choices=list(MAPS))
    p.add_argument("--B", nargs="+", type=int, default=[1, 2, 8, 32])
    p.add_argument("--D", nargs="+", type=int, default=[1024, 4096, 30720, 65536])
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(machine_line(describe_machine()))
    print("| method | map | B | D | torchdeq ms | deq_fast ms | deq_fast / torchdeq | f alone ms | floor |")
    print("|---|---|---|---|---|---|---|---|---|")
    worst: dict[str, float] = {}
    for method in args.methods:
        for fmap in args.maps:
            for B in args.B:
                for D in args.D:
                    r = measure(method, fmap, B, D, args.iters, args.repeats)
                    worst[method] = max(worst.get(method, 0.0), r["ratio"])
                    print(f"| {method} | {fmap} | {B} | {D} | {r['torchdeq_ms']:.1f} | "
                          f"{r['deq_fast_ms']:.1f} | **{r['ratio']:.2f}** | {r['f_alone_ms']:.1f} | "
                          f"{r['floor']:.2f} |", flush=True)
    for method, ratio in worst.items():
        print(f"{method}: largest deq_fast / torchdeq over the grid = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
