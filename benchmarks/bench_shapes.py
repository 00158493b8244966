"""Solve time deq_fast / torchdeq over a grid of shapes, interleaved in one process (CPU).

For each method, map and shape ``B x D`` of the grid, both libraries solve the same problem from the
same ``x0`` through the TorchDEQ contract for ``--iters`` iterations (``tol=0``: no early stop);
the two alternate (A B, B A, ...) for ``--repeats`` rounds and the ratio of the medians is printed.
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
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_solvers import Size, get_solver, make_problem  # noqa: E402
from conftest import describe_machine, machine_line  # noqa: E402

MAPS = {"affine": "affine", "tanh": "elementwise", "halftanh": "halftanh"}


def _time_once(solver, f, x0, iters) -> float:
    start = time.perf_counter()
    with torch.no_grad():
        solver(f, x0, max_iter=iters, tol=0.0)
    return time.perf_counter() - start


def measure(method: str, fmap: str, B: int, D: int, iters: int, repeats: int) -> dict:
    """Median solve time of each library and their ratio for one grid point."""
    f, x0 = make_problem(Size(B=B, D=D, iters=iters, f=MAPS[fmap]))
    solvers = {lib: get_solver(lib, method) for lib in ("torchdeq", "deq_fast")}
    for lib, solver in solvers.items():                 # warm-up (allocator, first-call costs)
        _time_once(solver, f, x0, iters)
    times: dict[str, list[float]] = {"torchdeq": [], "deq_fast": []}
    for r in range(repeats):
        order = ("torchdeq", "deq_fast") if r % 2 == 0 else ("deq_fast", "torchdeq")
        for lib in order:
            times[lib].append(_time_once(solvers[lib], f, x0, iters))
    tq, fast = statistics.median(times["torchdeq"]), statistics.median(times["deq_fast"])
    return {"torchdeq_ms": 1e3 * tq, "deq_fast_ms": 1e3 * fast, "ratio": fast / tq}


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
    print("| method | map | B | D | torchdeq ms | deq_fast ms | deq_fast / torchdeq |")
    print("|---|---|---|---|---|---|---|")
    worst: dict[str, float] = {}
    for method in args.methods:
        for fmap in args.maps:
            for B in args.B:
                for D in args.D:
                    r = measure(method, fmap, B, D, args.iters, args.repeats)
                    worst[method] = max(worst.get(method, 0.0), r["ratio"])
                    print(f"| {method} | {fmap} | {B} | {D} | {r['torchdeq_ms']:.1f} | "
                          f"{r['deq_fast_ms']:.1f} | **{r['ratio']:.2f}** |", flush=True)
    for method, ratio in worst.items():
        print(f"{method}: largest deq_fast / torchdeq over the grid = {ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
