"""The README's figures, measured and written by one command.

Runs the two measurements the README quotes and rewrites its results block (between
``<!-- figures:begin -->`` and ``<!-- figures:end -->``) from their JSON record:

* the main job, ``deq-fast train --seed N`` for seeds 0, 1, 2 (the default ``mdeq-digits`` run),
  each in a fresh output directory: the final test accuracy per seed, given as mean ± sample
  standard deviation over the seeds (with the range), and the minutes per run;
* the solver benchmark of ``benchmarks/report.py`` (used as a library: the same problems, the same
  interleaved timing and op/sync counts), TorchDEQ 0.1.0 against deq_fast through the TorchDEQ
  contract at B=32, D=4096, 40 iterations, one torch thread.

Run::

    python benchmarks/readme_figures.py            # about 15 minutes on a 2-core CPU
    python benchmarks/readme_figures.py --smoke    # tiny sizes, 1 seed, a 1-epoch job (seconds)

writes ``benchmarks/results/readme.json`` and the README's block (``--json``/``--readme`` choose
other files; ``--render-only`` rewrites the README from the JSON without measuring). The tests
check that the README's block is exactly :func:`render` of the committed JSON, so a hand edit of a
figure fails the suite.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import report  # noqa: E402
from bench_solvers import SIZES, Size  # noqa: E402

BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "readme.json"
DEFAULT_README = ROOT / "README.md"

SEEDS = (0, 1, 2)
SOLVER_SIZES = ("cheap", "tanh")                  # B=32, D=4096: w*z + b and tanh(w*z + b)
METHODS = ("anderson", "broyden", "fixed_point")
REPEATS = 9
# --smoke: a tiny problem (registered under this name so report.compare can use it), one seed,
# one epoch at a larger batch
SMOKE_SIZE = ("smoke", Size(B=2, D=64, iters=8, f="affine"))
SMOKE_TRAIN = ("--epochs", "1", "--batch_size", "128")
F_TEXT = {"affine": "`w*z + b`", "elementwise": "`tanh(w*z + b)`", "halftanh": "`0.5*tanh(z) + x`",
          "matmul": "`tanh(z W^T + b)`"}
METHOD_TEXT = {"anderson": "Anderson", "broyden": "Broyden", "fixed_point": "fixed point"}


# ------------------------------------------------------------------------------ measuring
def train_once(seed: int, out_dir: Path, extra: tuple[str, ...]) -> dict[str, Any]:
    """One ``deq-fast train --seed SEED`` run in ``out_dir``: its last epoch record's test
    accuracy and the run's minutes."""
    cmd = [sys.executable, "-m", "deq_fast.train", "--seed", str(seed), "--out", str(out_dir),
           "--progress", "false", *extra]
    report.log(f"main job: {' '.join(cmd[1:])}")
    subprocess.run(cmd, check=True, cwd=ROOT)
    lines = (out_dir / "metrics.jsonl").read_text().splitlines()
    last = json.loads(lines[-1])
    return {"seed": seed, "epochs": last["epoch"], "test_acc": last["test_acc"],
            "minutes": last["elapsed"] / 60}


def main_job(seeds: tuple[int, ...], extra: tuple[str, ...], runs_dir: Path | None) -> dict[str, Any]:
    """The main job over ``seeds``, each run in ``runs_dir/seed<N>`` (a temporary folder when
    ``runs_dir`` is None)."""
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(runs_dir) if runs_dir is not None else Path(tmp)
        runs = [train_once(seed, base / f"seed{seed}", extra) for seed in seeds]
    command = " ".join(["deq-fast train --seed N", *extra])
    return {"command": command, "runs": runs}


def solver_rows(sizes: tuple[str, ...], methods: tuple[str, ...], repeats: int) -> list[dict[str, Any]]:
    """``report.compare`` for each size and method on the CPU, reduced to what the README shows."""
    rows = []
    for size in sizes:
        for method in methods:
            row = report.compare(method, size, "cpu", repeats)
            rows.append({"method": method, "size": size, "B": row["B"], "D": row["D"],
                         "iters": row["iters"], "f": row["f"], "ratio": row["ratio"],
                         "ratio_min": row["ratio_min"], "median_s": row["median_s"],
                         "max_abs_dz": row["max_abs_dz"],
                         "ops_per_iter": {lib: row[lib]["ops_per_iter"] for lib in report.LIBS},
                         "syncs_per_solve": {lib: row[lib]["syncs_per_solve"] for lib in report.LIBS}})
    return rows


def measure(smoke: bool, runs_dir: Path | None) -> dict[str, Any]:
    """Every figure of the README, with the machine it was measured on."""
    import torch
    torch.set_num_threads(1)                      # report.py's default: steady ratios when shared
    if smoke:
        SIZES.setdefault(*SMOKE_SIZE)
        sizes, seeds, extra, repeats = (SMOKE_SIZE[0],), SEEDS[:1], SMOKE_TRAIN, 5
    else:
        sizes, seeds, extra, repeats = SOLVER_SIZES, SEEDS, (), REPEATS
    solvers = solver_rows(sizes, METHODS, repeats)
    return {"smoke": smoke, "machine": report.machine_line(report.describe_machine()),
            "solver_command": f"python benchmarks/report.py --repeats {repeats} --sizes {' '.join(sizes)}",
            "repeats": repeats, "solvers": solvers, "main_job": main_job(seeds, extra, runs_dir)}


# ------------------------------------------------------------------------------ rendering
def accuracy_text(runs: list[dict[str, Any]]) -> str:
    """``97.68 ± 0.16 %`` (mean ± sample standard deviation, in percent) and the per-seed values."""
    accs = [100 * r["test_acc"] for r in runs]
    mean = statistics.fmean(accs)
    if len(accs) == 1:
        return f"**{mean:.2f} %** (seed {runs[0]['seed']}, one seed)"
    spread = statistics.stdev(accs)
    per_seed = ", ".join(f"{a:.2f}" for a in accs)
    seeds = ", ".join(str(r["seed"]) for r in runs)
    return f"**{mean:.2f} ± {spread:.2f} %** (seeds {seeds}: {per_seed} %)"


def render(data: dict[str, Any]) -> str:
    """The README's results block (without the markers) from the JSON record; deterministic."""
    job = data["main_job"]
    minutes = [r["minutes"] for r in job["runs"]]
    epochs = job["runs"][0]["epochs"]
    problems = ("a tiny smoke-test problem" if data["smoke"] else
                f"the problems of `{data['solver_command']}`")
    lines = [
        f"The main job (`{job['command']}`: the default `mdeq-digits` run, {epochs} "
        f"epoch{'s' if epochs != 1 else ''}): {accuracy_text(job['runs'])} test accuracy on the "
        f"held-out fifth of the digits (mean ± standard deviation over seeds), "
        f"{min(minutes):.1f}–{max(minutes):.1f} min per run.",
        "",
        f"Solvers against torchdeq 0.1.0 through the TorchDEQ contract, "
        f"{data['solvers'][0]['iters']} iterations without early stop, one CPU thread ({problems}; "
        f"time: ratio of the medians of {data['repeats']} interleaved solves, lower is better; "
        f"counts exclude `f`):",
        "",
        "| method | problem | time deq_fast / torchdeq | ops per iteration torchdeq → deq_fast "
        "| host syncs per solve torchdeq → deq_fast |",
        "|---|---|---|---|---|",
    ]
    for r in data["solvers"]:
        ops, syncs = r["ops_per_iter"], r["syncs_per_solve"]
        lines.append(f"| {METHOD_TEXT[r['method']]} | {F_TEXT[r['f']]}, B={r['B']}, D={r['D']} | "
                     f"**{r['ratio']:.2f}** | {ops['torchdeq']:.0f} → {ops['deq_fast']:.0f} | "
                     f"{syncs['torchdeq']} → {syncs['deq_fast']} |")
    lines += ["", f"Measured on: {data['machine']}" + (" (smoke run: not the README's figures)"
                                                        if data["smoke"] else "") + "."]
    return "\n".join(lines)


def _block_span(text: str) -> tuple[int, int]:
    """Start and end of the text between the markers.

    Raises:
        ValueError: the markers are missing or out of order.
    """
    start, stop = text.find(BEGIN), text.find(END)
    if start < 0 or stop < start:
        raise ValueError(f"the README must contain {BEGIN!r} followed by {END!r}")
    return start + len(BEGIN), stop


def replace_block(text: str, block: str) -> str:
    """``text`` with everything between the markers replaced by ``block``."""
    start, stop = _block_span(text)
    return text[:start] + "\n" + block + "\n" + text[stop:]


def current_block(text: str) -> str:
    """The block between the markers of ``text`` (what :func:`render` wrote)."""
    start, stop = _block_span(text)
    return text[start:stop].strip("\n")


def check_finite(data: dict[str, Any]) -> None:
    """Refuse to write a record with a non-finite figure (a failed measurement)."""
    values = [r["ratio"] for r in data["solvers"]] + [r["test_acc"] for r in data["main_job"]["runs"]]
    if not all(math.isfinite(v) for v in values):
        raise RuntimeError(f"a measured figure is not finite: {values}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true",
                        help="tiny solver problem, one seed, a one-epoch job (checks the pipeline)")
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON,
                        help=f"the record to write (default {DEFAULT_JSON.relative_to(ROOT)})")
    parser.add_argument("--readme", type=Path, default=DEFAULT_README,
                        help="the file whose figures block is rewritten (default README.md)")
    parser.add_argument("--runs-dir", type=Path, default=None,
                        help="keep the training runs here (default: a temporary folder)")
    parser.add_argument("--render-only", action="store_true",
                        help="do not measure: rewrite the README block from the JSON record")
    args = parser.parse_args(argv)
    if args.render_only:
        data = json.loads(args.json.read_text())
    else:
        t0 = time.perf_counter()
        data = measure(args.smoke, args.runs_dir)
        check_finite(data)
        data["minutes_total"] = (time.perf_counter() - t0) / 60
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
        report.log(f"saved {args.json}")
    block = render(data)
    args.readme.write_text(replace_block(args.readme.read_text(), block))
    report.log(f"rewrote the figures block of {args.readme}")
    print(block)
    return data


if __name__ == "__main__":
    main()
