"""A fixed-iteration solve, eager against ``torch.compile(fullgraph=True)`` (inductor), on CPU.

The problem: ``f(z) = tanh(z W^T + x)`` with ``||W||_2 = 0.5``, state ``[B, D]``, ``x0 = 0``; the
solve is ``deq_fast.solve(f, x0, method, max_iter=iters, check_every=0)`` (exactly ``iters``
evaluations, no host interaction, so Dynamo captures it as one graph: the loop unrolled, the
fused solver ops opaque nodes, ``f`` compiled by inductor). For every method and size:

* two compiled variants: inductor's defaults (a Python wrapper calls the kernels and the fused
  ops) and ``options={"cpp_wrapper": True}`` (a C++ wrapper calls them: no Python per op);
* compile: seconds of each variant's first call (tracing and inductor's C++ build);
* eager, compiled: median seconds per solve over ``--repeats`` interleaved runs of the three
  (order reversed every repeat, after one warm-up each, ``report.interleaved_times``), one torch
  thread by default;
* speed-up: eager median / compiled median, per variant;
* ``max |dz|``: the largest difference between the eager and a compiled solution.

With ``--training``: the same for one training step of a DEQ layer (``deq_fast.get_deq``,
Anderson forward, ``f_max_iter=20``, exact gradient with ``b_max_iter=20``; loss and parameter
gradients by ``torch.autograd.grad``): eager (C++ backward loop) against the compiled layer
(``CapturedImplicitGrad``), ``max |dz|`` the largest difference of loss and gradients.

Run::

    python benchmarks/bench_compile.py [--repeats 21] [--threads 1] [--iters 20]
                                       [--methods anderson broyden fixed_point] [--training]

Times are reported, never asserted (tests assert that the compiled solve equals the eager one:
``tests/solvers/test_compile.py``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deq_fast  # noqa: E402

from conftest import describe_machine, machine_line  # noqa: E402
from report import interleaved_times  # noqa: E402

SIZES = {"B4-D64": (4, 64), "B32-D256": (32, 256), "B128-D1024": (128, 1024)}
METHODS = ("anderson", "broyden", "fixed_point")
VARIANTS = {"inductor": {}, "cpp_wrapper": {"cpp_wrapper": True}}   # torch.compile options


def make_problem(B: int, D: int, seed: int = 0):
    """``(f, x0)``: the contraction ``tanh(z W^T + x)``, ``||W||_2 = 0.5``, and a zero start."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=gen)
    W *= 0.5 / torch.linalg.matrix_norm(W, ord=2)
    x = torch.randn(B, D, generator=gen)
    return (lambda z: torch.tanh(z @ W.t() + x)), torch.zeros(B, D)


def measure(method: str, size: str, iters: int, repeats: int) -> list[dict]:
    """One row per compiled variant: compile time, eager and compiled medians, speed-up and
    ``max |dz|``."""
    f, x0 = make_problem(*SIZES[size])

    def eager() -> torch.Tensor:
        return deq_fast.solve(f, x0, method, max_iter=iters, check_every=0).z

    torch._dynamo.reset()
    runs, compile_s = {"eager": eager}, {}
    for variant, options in VARIANTS.items():
        runs[variant] = torch.compile(eager, fullgraph=True, options=options)
        t0 = time.perf_counter()
        runs[variant]()
        compile_s[variant] = time.perf_counter() - t0
    times, outs = interleaved_times(runs, repeats)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return [{"method": method, "size": size, "variant": v, "compile_s": compile_s[v],
             "eager_ms": 1e3 * med["eager"], "compiled_ms": 1e3 * med[v],
             "speedup": med["eager"] / med[v],
             "max_dz": float((outs["eager"] - outs[v]).abs().max())} for v in VARIANTS]


class DEQLayer(torch.nn.Module):
    """``z* = tanh(z* W^T + x U^T)``, ``||W||_2 = 0.5``, then a mean-square loss."""

    def __init__(self, D: int, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        W = torch.randn(D, D, generator=gen)
        self.W = torch.nn.Parameter(W * 0.5 / torch.linalg.matrix_norm(W, ord=2))
        self.U = torch.nn.Parameter(torch.randn(D, D, generator=gen) / D ** 0.5)
        self.deq = deq_fast.get_deq(f_solver="anderson", f_max_iter=20, f_tol=1e-6,
                                    b_max_iter=20, b_tol=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x @ self.U.t()
        zs, _ = self.deq(lambda z: torch.tanh(z @ self.W.t() + u), torch.zeros_like(u))
        return zs[-1].square().mean()


def measure_training(size: str, repeats: int) -> list[dict]:
    """Rows like :func:`measure` for one training step (loss and parameter gradients)."""
    B, D = SIZES[size]
    model = DEQLayer(D).train()
    x = torch.randn(B, D, generator=torch.Generator().manual_seed(1))

    def step(layer) -> torch.Tensor:
        loss = layer(x)
        grads = torch.autograd.grad(loss, list(model.parameters()))
        return torch.cat([loss.detach().reshape(1)] + [g.flatten() for g in grads])

    torch._dynamo.reset()
    runs, compile_s = {"eager": lambda: step(model)}, {}
    for variant, options in VARIANTS.items():
        layer = torch.compile(model, fullgraph=True, options=options)
        runs[variant] = lambda layer=layer: step(layer)
        t0 = time.perf_counter()
        runs[variant]()
        compile_s[variant] = time.perf_counter() - t0
    times, outs = interleaved_times(runs, repeats)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return [{"method": "DEQ train step", "size": size, "variant": v, "compile_s": compile_s[v],
             "eager_ms": 1e3 * med["eager"], "compiled_ms": 1e3 * med[v],
             "speedup": med["eager"] / med[v],
             "max_dz": float((outs["eager"] - outs[v]).abs().max())} for v in VARIANTS]


def markdown(rows: list[dict], iters: int, repeats: int, machine: str, command: str) -> str:
    lines = [f"`{command}` — {iters} iterations (`check_every=0`), medians of {repeats} "
             f"interleaved runs; {machine}", "",
             "| method | B-D | compiled | compile s | eager ms | compiled ms | speed-up | max abs dz |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['method']} | {r['size']} | {r['variant']} | {r['compile_s']:.1f} | "
              f"{r['eager_ms']:.3f} | {r['compiled_ms']:.3f} | {r['speedup']:.2f}x | "
              f"{r['max_dz']:.1e} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=21)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--methods", nargs="*", choices=METHODS, default=list(METHODS))
    parser.add_argument("--sizes", nargs="+", choices=list(SIZES), default=list(SIZES))
    parser.add_argument("--training", action="store_true",
                        help="also time a DEQ layer's training step (sizes as --sizes)")
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    rows = [row for method in args.methods for size in args.sizes
            for row in measure(method, size, args.iters, args.repeats)]
    if args.training:
        rows += [row for size in args.sizes for row in measure_training(size, args.repeats)]
    command = "python benchmarks/bench_compile.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(markdown(rows, args.iters, args.repeats, machine_line(describe_machine()), command.strip()))
    return rows


if __name__ == "__main__":
    main()
