"""Side-by-side solver report: deq_fast vs TorchDEQ 0.1.0, one process, interleaved runs.

For every method (Anderson, Broyden, fixed point) and size of ``bench_solvers.SIZES`` (the same
problems and TorchDEQ-contract calls as the pytest-benchmark groups, ``tol=0``):

* time: median over ``--repeats`` (>= 5) solves per library, the libraries alternating
  (A B, B A, A B, ...) so that load changes on a shared machine hit both; the ratio
  ``deq_fast / torchdeq`` of the medians and of the minima (also, in the JSON, the median of the
  per-pair ratios);
* ATen ops per iteration, excluding ``f`` (``deq_fast.profiling.per_iteration``: difference of a
  12- and a 22-iteration solve, so setup cancels out) — a launch proxy;
* host syncs (``aten._local_scalar_dense``) per ``iters``-iteration solve (``OpCounter.syncs``);
* solver state: bytes allocated by factory ops (``zeros``/``empty``/``full``/``ones``, their
  ``_like``/``new_`` forms) during one solve: the preallocated histories (Anderson ``X, F`` or
  ``F, G``: ``2·B·m·D``), Broyden factors (``2·B·D·L``, ``L = max_iter`` by default in both) and
  per-sample bookkeeping; per-iteration temporaries are not counted;
* ``max |dz|``: the largest difference between the two libraries' solutions (same problem);
* ``f`` alone: ``iters`` evaluations of ``f`` by themselves, timed in the same interleaved rounds,
  and the floor ``f / torchdeq``: the lowest ratio any solver can reach on that problem (both
  libraries pay for the same ``iters`` evaluations; a bar below the floor cannot be met).

Then the same counts for deq_fast's locuslab-style API (``deq_fast.anderson``/``broyden``; no
baseline package is installed for it) and the native ``deq_fast.solve`` (``check_every=1``, the
default, and ``check_every=0``), and Broyden's state with a bounded memory (``solve(..., memory=8)``).

Run::

    python benchmarks/report.py [--json out.json] [--repeats 9] [--threads 1] [--sizes cheap matmul]
                                [--methods anderson broyden fixed_point]

CPU times are single-threaded by default (``--threads 1``; ``--threads 0`` keeps torch's default):
on a shared machine a multi-threaded op waits for its slowest thread, and a descheduled thread
turned 0.2 s solves into 5 s ones in our runs; one thread gives ratios that repeat.

Prints markdown tables ready for the README, with the machine/versions/commit line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deq_fast  # noqa: E402
from deq_fast.profiling import OpCounter, per_iteration  # noqa: E402

from bench_solvers import DEVICES, LIBS, METHODS, SIZES, Size, get_solver, make_problem, timed_solve  # noqa: E402
from conftest import describe_machine, machine_line  # noqa: E402

FACTORY_OPS = frozenset({"empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones",
                         "ones_like", "full", "full_like", "new_empty", "new_empty_strided",
                         "new_zeros", "new_ones", "new_full"})
MIB = 2 ** 20
MEMORY = 8                                                          # bounded Broyden memory row


class StateBytes(TorchDispatchMode):
    """Sums the bytes of tensors created by factory ops (the solver's preallocated state)."""

    def __init__(self) -> None:
        super().__init__()
        self.nbytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__ in FACTORY_OPS and isinstance(out, torch.Tensor):
            self.nbytes += out.untyped_storage().nbytes()
        return out


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[report {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


def counts(run: Callable[[Callable, int], object], f: Callable, iters: int) -> dict:
    """Ops per iteration, syncs per ``iters``-iteration solve and state bytes of ``run(f, n)``."""
    ops, _, _ = per_iteration(run, f)
    counter, state = OpCounter(), StateBytes()
    with state, counter:                                  # f makes no factory allocations here
        run(counter.exclude(f), iters)
    return {"ops_per_iter": ops, "syncs_per_solve": counter.syncs, "state_bytes": state.nbytes}


def interleaved_times(runs: dict[str, Callable[[], torch.Tensor]], repeats: int) -> tuple[dict, dict]:
    """Seconds per solve for each entry of ``runs``, alternating the order every repeat, after
    one warm-up each. Returns ``(times, last_outputs)``."""
    names = list(runs)
    outs = {name: runs[name]() for name in names}                   # warm-up
    times: dict[str, list] = {name: [] for name in names}
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            outs[name] = runs[name]()
            times[name].append(time.perf_counter() - t0)
    return times, outs


F_ALONE = "f alone"


def f_alone(f: Callable, x0: torch.Tensor, iters: int) -> Callable[[], torch.Tensor]:
    """``iters`` evaluations of ``f`` and nothing else (what both libraries pay for in a solve)."""
    sync = torch.cuda.synchronize if x0.is_cuda else (lambda: None)

    def run() -> torch.Tensor:
        with torch.no_grad():
            z = x0
            for _ in range(iters):
                z = f(z)
        sync()
        return z
    return run


def compare(method: str, size_name: str, device: str, repeats: int) -> dict:
    """One row of the main table: both libraries on one problem."""
    spec: Size = SIZES[size_name]
    f, x0 = make_problem(spec, device)
    log(f"{method}-{size_name}-{device}: timing ({repeats} interleaved repeats) ...")
    runs = {lib: timed_solve(lib, method, f, x0, spec.iters) for lib in LIBS}
    runs[F_ALONE] = f_alone(f, x0, spec.iters)
    times, outs = interleaved_times(runs, repeats)
    row = {"method": method, "size": size_name, "device": device, "B": spec.B, "D": spec.D,
           "iters": spec.iters, "f": spec.f, "times_s": times,
           "max_abs_dz": (outs["deq_fast"] - outs["torchdeq"]).abs().max().item()}
    med = {lib: statistics.median(times[lib]) for lib in LIBS}
    row["median_s"] = med
    row["f_alone_median_s"] = statistics.median(times[F_ALONE])
    row["floor"] = row["f_alone_median_s"] / med["torchdeq"]
    row["ratio"] = med["deq_fast"] / med["torchdeq"]
    row["ratio_min"] = min(times["deq_fast"]) / min(times["torchdeq"])
    row["paired_ratio_median"] = statistics.median(
        a / b for a, b in zip(times["deq_fast"], times["torchdeq"]))
    log(f"{method}-{size_name}-{device}: counting ops ...")
    for lib in LIBS:
        solver = get_solver(lib, method)

        def run(fc, n, solver=solver):
            with torch.no_grad():
                return solver(fc, x0, max_iter=n, tol=0.0)
        row[lib] = counts(run, f, spec.iters)
    return row


def ours_only(size_name: str, device: str) -> list[dict]:
    """Counts of deq_fast's locuslab-style and native APIs (no baseline installed for these)."""
    spec = SIZES[size_name]
    f, x0 = make_problem(spec, device)
    calls = {
        "deq_fast.anderson (locuslab)": lambda fc, n: deq_fast.anderson(fc, x0, threshold=n, eps=0.0),
        "deq_fast.broyden (locuslab)": lambda fc, n: deq_fast.broyden(fc, x0, threshold=n, eps=0.0),
    }
    for method in METHODS:
        for every in (1, 0):
            calls[f"deq_fast.solve({method!r}, check_every={every})"] = (
                lambda fc, n, method=method, every=every:
                deq_fast.solve(fc, x0, method=method, max_iter=n, tol=0.0, check_every=every))
    calls[f"deq_fast.solve('broyden', memory={MEMORY})"] = (
        lambda fc, n: deq_fast.solve(fc, x0, method="broyden", max_iter=n, tol=0.0, memory=MEMORY))
    rows = []
    for api, run in calls.items():
        log(f"{api} ({size_name}-{device}): counting ...")
        with torch.no_grad():
            rows.append({"api": api, "size": size_name, "device": device, **counts(run, f, spec.iters)})
    return rows


def markdown(rows: list[dict], extra: list[dict], repeats: int, machine: str, command: str) -> str:
    head = ("| method | size | device | torchdeq ms | deq_fast ms | ratio | ratio of mins | "
            "ops/iter torchdeq | ops/iter deq_fast | syncs/solve torchdeq | syncs/solve deq_fast | "
            "state MiB torchdeq | state MiB deq_fast | max abs dz | f alone ms | floor |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        t, o = r["torchdeq"], r["deq_fast"]
        lines.append(
            f"| {r['method']} | {r['size']} (B={r['B']}, D={r['D']}, {r['iters']} it) | "
            f"{r['device']} | "
            f"{1e3 * r['median_s']['torchdeq']:.1f} | {1e3 * r['median_s']['deq_fast']:.1f} | "
            f"**{r['ratio']:.2f}** | {r['ratio_min']:.2f} | {t['ops_per_iter']:.1f} | "
            f"{o['ops_per_iter']:.1f} | "
            f"{t['syncs_per_solve']} | {o['syncs_per_solve']} | {t['state_bytes'] / MIB:.2f} | "
            f"{o['state_bytes'] / MIB:.2f} | {r['max_abs_dz']:.1e} | "
            f"{1e3 * r['f_alone_median_s']:.1f} | {r['floor']:.2f} |")
    lines += ["", f"Times: median of {repeats} interleaved solves per library; ratio = deq_fast / torchdeq "
              "medians (lower is better); ratio of mins: the same for the fastest solve of each (the "
              "least disturbed by other load). Ops exclude `f`. f alone: the solve's "
              "evaluations of `f` by themselves, in the same rounds; floor = f alone / torchdeq, the "
              "lowest ratio any solver can reach there.", ""]
    if extra:
        lines += ["| deq_fast API | size | ops/iter | syncs/solve | state MiB |", "|---|---|---|---|---|"]
        for e in extra:
            lines.append(f"| `{e['api']}` | {e['size']} | {e['ops_per_iter']:.1f} | "
                         f"{e['syncs_per_solve']} | {e['state_bytes'] / MIB:.2f} |")
        lines.append("")
    lines += [f"Machine: {machine}", f"Command: `{command}`"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="also save the results (with machine info) here")
    parser.add_argument("--repeats", type=int, default=9, help="timed solves per library (>= 5; default 9)")
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op CPU threads (default 1; 0: torch's own choice). One "
                             "thread keeps the ratios steady on a busy shared machine: with several, "
                             "a descheduled thread stalls the others at every op")
    parser.add_argument("--devices", nargs="+", default=list(DEVICES), choices=list(DEVICES))
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error(f"--repeats must be >= 5 (medians of fewer runs are noise), got {args.repeats}")
    if args.threads < 0:
        parser.error(f"--threads must be >= 0, got {args.threads}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    command = " ".join(["python benchmarks/report.py", *(sys.argv[1:] if argv is None else argv)])
    info = describe_machine()
    rows = [compare(method, size, device, args.repeats)
            for device in args.devices for size in args.sizes for method in args.methods]
    # counts do not depend on the size: take the smallest one for the deq_fast-only table
    smallest = min(args.sizes, key=lambda name: SIZES[name].B * SIZES[name].D)
    extra = [e for device in args.devices for e in ours_only(smallest, device)]
    table = markdown(rows, extra, args.repeats, machine_line(info), command)
    print(table)
    result = {"machine": info, "command": command, "repeats": args.repeats, "rows": rows,
              "deq_fast_apis": extra, "markdown": table}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
        log(f"saved {args.json}")
    return result


if __name__ == "__main__":
    main()
