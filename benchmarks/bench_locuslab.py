"""locuslab/deq's own solvers vs deq_fast's locuslab API, at the clients' shapes, in one run (CPU).

The original solvers are the user's copy: ``--upstream DIR`` is a checkout of
https://github.com/locuslab/deq, and ``DIR/lib/solvers.py`` is imported from there by file path at
run time (nothing of it is copied into deq_fast). Two adaptations make it run on a current
PyTorch, both outside its code: ``torch.solve`` (removed in PyTorch 1.13: a stub that raises; the
original's Anderson calls ``torch.solve(y, H)``) is supplied to that module alone as
``torch.linalg.solve(H, y)``, and ``termcolor`` (used only by its debugging printout) is stubbed
while it imports when not installed.

The shapes are read from the same checkout:

* MDEQ-Vision: each CIFAR-10 configuration (``MDEQ-Vision/experiments/cifar/*.yaml``) packs its
  branches into one ``(B, sum_i C_i·H_i·W_i, 1)`` state (``list2vec``); branch ``i`` has
  ``NUM_CHANNELS[i]`` channels at ``IMAGE_SIZE / 2**(DOWNSAMPLE_TIMES + i)``. Solved with
  ``F_SOLVER``/``B_SOLVER`` for ``F_THRES``/``B_THRES``, at ``B = 2`` (``--mdeq-batch``).
* DEQ-Sequence: each ``DEQ-Sequence/wt103_*.sh`` solves a ``(B, d_model, tgt_len)`` state with
  ``--f_solver``/``--b_solver`` for ``--f_thres``/``--b_thres``; ``B`` is 2 and the per-device
  batch ``--gpu0_bsz``.
* the small-batch grid: ``B`` in ``--grid-batch`` (1 2 4) with ``D = --grid-d`` (30720, a
  ``(B, D, 1)`` state), Anderson and Broyden for ``--grid-threshold`` (30) evaluations.

Each shape runs with a cheap map (``w*z + b`` elementwise) and a tanh map (``0.5·tanh(z) + b``)
(``bench_solvers.make_problem``'s ``affine`` and ``halftanh``), ``eps=0`` (no early stop: both
run ``threshold`` evaluations). Per row: the original's and deq_fast's median times (interleaved,
``--repeats`` rounds, one torch thread), ``f alone`` (the solve's evaluations of ``f`` by
themselves, in the same rounds), the ratio deq_fast / original and the floor f alone / original
(``report.py``'s helpers: the lowest ratio any solver can reach there), and ``max |dz|`` between
the two results.

Run::

    git clone https://github.com/locuslab/deq /tmp/deq
    python benchmarks/bench_locuslab.py --upstream /tmp/deq [--repeats 5] [--maps affine halftanh]
        [--clients mdeq deq-seq grid] [--json out.json]

Prints a markdown table and, per client, the largest ratio. Times are reported, never asserted.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import re
import statistics
import sys
import types
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import deq_fast  # noqa: E402

from bench_solvers import Size, make_problem  # noqa: E402
from conftest import describe_machine, machine_line  # noqa: E402
from report import F_ALONE, f_alone, interleaved_times, log  # noqa: E402

MAPS = ("affine", "halftanh")
CLIENTS = ("mdeq", "deq-seq", "grid")
NEEDS_UPSTREAM = (
    "bench_locuslab.py needs --upstream DIR: a checkout of https://github.com/locuslab/deq "
    "(e.g. `git clone https://github.com/locuslab/deq /tmp/deq`). The benchmark imports the "
    "original solvers from DIR/lib/solvers.py and reads the client shapes from "
    "DIR/MDEQ-Vision/experiments/cifar/*.yaml and DIR/DEQ-Sequence/wt103_*.sh.")


@dataclasses.dataclass(frozen=True)
class ClientShape:
    """One solver call of a client: ``method`` on a ``(B, d, L)`` state for ``threshold``."""
    client: str
    config: str
    B: int
    d: int
    L: int
    method: str
    threshold: int

    @property
    def D(self) -> int:
        return self.d * self.L

    @property
    def n_evals(self) -> int:
        """Evaluations of ``f`` in a solve that does not stop early (both libraries)."""
        return self.threshold + 1 if self.method == "broyden" else self.threshold


# ---- reading the upstream configurations --------------------------------------------------------

def yaml_value(text: str, key: str) -> str:
    """The scalar after ``KEY:`` in a flat YAML text (the MDEQ configs' keys are unique)."""
    match = re.search(rf"^\s*{re.escape(key)}:[ \t]*([^\s#]+)", text, re.MULTILINE)
    if match is None:
        raise KeyError(f"{key} not found")
    return match.group(1).strip("'\"")


def yaml_int_list(text: str, key: str) -> list[int]:
    """The block list of ints under ``KEY:`` (``KEY:\\n  - 1\\n  - 2``)."""
    match = re.search(rf"^\s*{re.escape(key)}:[ \t]*\n((?:[ \t]*-[ \t]*\d+[ \t]*\n?)+)", text,
                      re.MULTILINE)
    if match is None:
        raise KeyError(f"{key} not found")
    return [int(v) for v in re.findall(r"-[ \t]*(\d+)", match.group(1))]


def mdeq_packed_size(channels: list[int], image_size: list[int], downsample_times: int) -> int:
    """``sum_i C_i·H_i·W_i`` of MDEQ's ``list2vec`` state: branch ``i`` at ``1 / 2**(ds + i)``."""
    H, W = image_size
    return sum(c * (H >> (downsample_times + i)) * (W >> (downsample_times + i))
               for i, c in enumerate(channels))


def mdeq_shapes(config: Path, batch: int) -> list[ClientShape]:
    """The forward and backward solver calls of one MDEQ-Vision configuration."""
    text = config.read_text()
    D = mdeq_packed_size(yaml_int_list(text, "NUM_CHANNELS"), yaml_int_list(text, "IMAGE_SIZE"),
                         int(yaml_value(text, "DOWNSAMPLE_TIMES")))
    return [ClientShape("MDEQ-Vision", f"{config.stem} {pass_}", batch, D, 1,
                        yaml_value(text, f"{p}_SOLVER"), int(yaml_value(text, f"{p}_THRES")))
            for p, pass_ in (("F", "fwd"), ("B", "bwd"))]


def script_flags(text: str) -> dict[str, str]:
    """``--flag value`` pairs of a shell command line (flags without a value map to ``''``)."""
    tokens = text.replace("\\\n", " ").split()
    flags = {}
    for i, tok in enumerate(tokens):
        if tok.startswith("--"):
            nxt = tokens[i + 1] if i + 1 < len(tokens) else ""
            flags[tok[2:]] = "" if nxt.startswith("--") else nxt
    return flags


def deq_sequence_shapes(script: Path, batches: tuple[int, ...] = (2,)) -> list[ClientShape]:
    """The forward and backward solver calls of one DEQ-Sequence run script, at ``batches`` and
    the script's per-device batch ``--gpu0_bsz``."""
    flags = script_flags(script.read_text())
    d, L = int(flags["d_model"]), int(flags["tgt_len"])
    per_device = int(flags.get("gpu0_bsz") or flags["batch_size"])
    return [ClientShape("DEQ-Sequence", f"{script.stem} {pass_}", B, d, L,
                        flags[f"{p}_solver"], int(flags[f"{p}_thres"]))
            for B in sorted({*batches, per_device}) for p, pass_ in (("f", "fwd"), ("b", "bwd"))]


def grid_shapes(batches, D: int, threshold: int) -> list[ClientShape]:
    return [ClientShape("grid", f"B={B}", B, D, 1, method, threshold)
            for B in batches for method in ("anderson", "broyden")]


def client_shapes(upstream: Path, clients, mdeq_batch: int, grid_batch, grid_d: int,
                  grid_threshold: int) -> list[ClientShape]:
    shapes: list[ClientShape] = []
    if "mdeq" in clients:
        for config in sorted((upstream / "MDEQ-Vision/experiments/cifar").glob("*.yaml")):
            shapes += mdeq_shapes(config, mdeq_batch)
    if "deq-seq" in clients:
        for script in sorted((upstream / "DEQ-Sequence").glob("wt103_*.sh")):
            shapes += deq_sequence_shapes(script)
    if "grid" in clients:
        shapes += grid_shapes(grid_batch, grid_d, grid_threshold)
    return _dedup(shapes)


def _dedup(shapes: list[ClientShape]) -> list[ClientShape]:
    """One row per distinct solver call (configs that share B, state, method and threshold)."""
    seen, out = set(), []
    for s in shapes:
        key = (s.B, s.d, s.L, s.method, s.threshold)
        if key not in seen:
            seen.add(key)
            out.append(s)
    return out


# ---- the original solvers -----------------------------------------------------------------------

def _torch_with_solve() -> types.ModuleType:
    """``torch`` plus the removed ``torch.solve(B, A) -> (X, LU)`` as ``torch.linalg.solve``."""
    shim = types.ModuleType("torch")
    shim.__dict__.update(torch.__dict__)
    shim.solve = lambda B, A: (torch.linalg.solve(A, B), A)
    return shim


def load_upstream_solvers(upstream: Path) -> types.ModuleType:
    """The user's ``lib/solvers.py`` of locuslab/deq, imported by file path."""
    path = Path(upstream) / "lib" / "solvers.py"
    if not path.is_file():
        raise FileNotFoundError(f"--upstream: {path} not found; {NEEDS_UPSTREAM}")
    stub = importlib.util.find_spec("termcolor") is None       # only its debug printout uses it
    if stub:
        sys.modules["termcolor"] = types.ModuleType("termcolor")
        sys.modules["termcolor"].colored = lambda text, *args, **kwargs: text
    spec = importlib.util.spec_from_file_location("locuslab_deq_solvers", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    finally:
        if stub:
            sys.modules.pop("termcolor")
    module.torch = _torch_with_solve()        # torch.solve exists but raises since torch 1.13
    return module


# ---- timing -------------------------------------------------------------------------------------

def client_problem(shape: ClientShape, fmap: str) -> tuple[Callable, torch.Tensor]:
    """``make_problem``'s map on the client's ``(B, d, L)`` state (reshaped views, no copy)."""
    f, x0 = make_problem(Size(B=shape.B, D=shape.D, iters=shape.threshold, f=fmap))
    state = (shape.B, shape.d, shape.L)
    return (lambda z: f(z.reshape(shape.B, shape.D)).reshape(state)), x0.reshape(state)


def solver_run(solver: Callable, f: Callable, x0: torch.Tensor,
               threshold: int) -> Callable[[], torch.Tensor]:
    """One no-early-stop solve (``eps=0``) through the locuslab contract; returns ``result``."""
    def run() -> torch.Tensor:
        with torch.no_grad():
            return solver(f, x0, threshold=threshold, eps=0.0)["result"]
    return run


def time_row(shape: ClientShape, fmap: str, original: dict, ours: dict, repeats: int) -> dict:
    """Interleaved medians of the original, deq_fast and ``f`` alone on one shape and map.

    ``original`` and ``ours`` map a method name to a locuslab-contract solver.
    """
    f, x0 = client_problem(shape, fmap)
    runs = {"original": solver_run(original[shape.method], f, x0, shape.threshold),
            "deq_fast": solver_run(ours[shape.method], f, x0, shape.threshold),
            F_ALONE: f_alone(f, x0, shape.n_evals)}
    times, outs = interleaved_times(runs, repeats)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {**dataclasses.asdict(shape), "D": shape.D, "map": fmap, "times_s": times,
            "original_ms": 1e3 * med["original"], "deq_fast_ms": 1e3 * med["deq_fast"],
            "f_alone_ms": 1e3 * med[F_ALONE], "ratio": med["deq_fast"] / med["original"],
            "floor": med[F_ALONE] / med["original"],
            "max_abs_dz": (outs["deq_fast"] - outs["original"]).abs().max().item()}


def markdown(rows: list[dict], machine: str, command: str, repeats: int) -> str:
    lines = ["| client | config | method | B | state (d, L) | D | threshold | map | original ms | "
             "deq_fast ms | ratio | f alone ms | floor | max abs dz |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r['client']} | {r['config']} | {r['method']} | {r['B']} | ({r['d']}, {r['L']}) | "
            f"{r['D']} | {r['threshold']} | {r['map']} | {r['original_ms']:.1f} | "
            f"{r['deq_fast_ms']:.1f} | **{r['ratio']:.2f}** | {r['f_alone_ms']:.1f} | "
            f"{r['floor']:.2f} | {r['max_abs_dz']:.1e} |")
    lines += ["", f"Times: medians of {repeats} interleaved solves (eps=0, no early stop), one torch "
              "thread; ratio = deq_fast / original; floor = f alone / original, the lowest ratio any "
              "solver can reach there.", "", f"Machine: {machine}", f"Command: `{command}`"]
    return "\n".join(lines)


def summary(rows: list[dict]) -> list[str]:
    """Per client and method: the largest ratio, and whether 0.5 is reachable (floor)."""
    out = []
    for key in sorted({(r["client"], r["method"]) for r in rows}):
        group = [r for r in rows if (r["client"], r["method"]) == key]
        worst = max(group, key=lambda r: r["ratio"])
        out.append(f"{key[0]} {key[1]}: largest ratio {worst['ratio']:.2f} "
                   f"({worst['config']}, {worst['map']}, floor {worst['floor']:.2f}); "
                   f"rows with floor > 0.5: {sum(r['floor'] > 0.5 for r in group)} of {len(group)}")
    return out


def parse_args(argv: Optional[list[str]]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--upstream", type=Path, help="a checkout of locuslab/deq (required)")
    p.add_argument("--clients", nargs="+", default=list(CLIENTS), choices=CLIENTS)
    p.add_argument("--maps", nargs="+", default=list(MAPS), choices=MAPS)
    p.add_argument("--mdeq-batch", type=int, default=2)
    p.add_argument("--grid-batch", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--grid-d", type=int, default=30720)
    p.add_argument("--grid-threshold", type=int, default=30)
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (>= 3; default 5)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    p.add_argument("--json", type=Path, help="also save the rows (with machine info) here")
    args = p.parse_args(argv)
    if args.upstream is None:
        p.error(NEEDS_UPSTREAM)
    if not (args.upstream / "lib" / "solvers.py").is_file():
        p.error(f"--upstream {args.upstream}: no lib/solvers.py there. {NEEDS_UPSTREAM}")
    if args.repeats < 3:
        p.error(f"--repeats must be >= 3, got {args.repeats}")
    return args


def main(argv: Optional[list[str]] = None) -> list[dict]:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    upstream = load_upstream_solvers(args.upstream)
    original = {"anderson": upstream.anderson, "broyden": upstream.broyden}
    ours = {"anderson": deq_fast.anderson, "broyden": deq_fast.broyden}
    shapes = client_shapes(args.upstream, args.clients, args.mdeq_batch, args.grid_batch,
                           args.grid_d, args.grid_threshold)
    rows = []
    for shape in shapes:
        for fmap in args.maps:
            log(f"{shape.client} {shape.config} {shape.method} B={shape.B} D={shape.D} {fmap} ...")
            rows.append(time_row(shape, fmap, original, ours, args.repeats))
    command = " ".join(["python benchmarks/bench_locuslab.py", *(sys.argv[1:] if argv is None else argv)])
    info = describe_machine()
    print(markdown(rows, machine_line(info), command, args.repeats))
    print("\n".join(summary(rows)))
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "command": command, "rows": rows}, indent=2))
    return rows


if __name__ == "__main__":
    main()
