"""One training step of the package's DEQ models, deq_fast against TorchDEQ driving the same model.

Cases (batch 32): ``mdeq-tiny`` and ``mdeq-large`` at CIFAR-10 shapes (3x32x32), and
``deq-lm-small`` (byte-level, 64 tokens). Each model is built once per library from the same seed
(identical weights); the DEQ module, weight norm and variational dropout come from that library
(``deq_impl``). Both run the same forward solver (Anderson or Broyden), the same iteration caps and
tolerances (MDEQ reference: 18 forward / 20 backward, relative stopping) and the exact implicit
gradient (``ift=True``) with the same backward solver. A step is forward + loss + backward + Adam
step.

A third row, ``floor``, is what no DEQ library can beat at these counts: the same model doing
deq_fast's number of ``f`` evaluations (plain ``z <- f(z)`` without grad, then one tracked) and of
backward VJPs (``g <- grad + J^T g``), with no solver arithmetic, bookkeeping or stopping test. The
``over floor`` column is a library's own cost in the step (solver and backward-solve arithmetic,
tracking, buffers); when ``f`` dominates (convolutions on a CPU), the step-time ratio cannot fall
below ``floor / torchdeq`` however small deq_fast's own cost is.

Reported per (case, solver, library): median step time over interleaved repetitions (the two
libraries alternate, so machine noise hits both), forward evaluations and backward VJPs per step,
(``f_evals`` counts every call of the equilibrium cell in the step, solver and tracked
re-evaluations included), and the peak memory the step adds (in a fresh subprocess per row after
one warm-up step: the resident-set high-water mark above the resident set before the step, on CUDA
``max_memory_allocated`` above ``memory_allocated``). The ratio column is deq_fast / torchdeq.

Run::

    python benchmarks/bench_train.py                       # all cases, table to stdout
    python benchmarks/bench_train.py --cases mdeq-tiny --solvers anderson --reps 5
    pytest benchmarks/bench_train.py --benchmark-only     # pytest-benchmark timings
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.nn.functional as F

from deq_fast.models import build_model

LIBS = ("torchdeq", "deq_fast")
FLOOR = "floor"
CASES = {
    "mdeq-tiny": dict(kind="mdeq", shape=(32, 3, 32, 32)),
    "mdeq-large": dict(kind="mdeq", shape=(32, 3, 32, 32)),
    "deq-lm-small": dict(kind="lm", shape=(32, 64)),
}
SOLVERS = ("anderson", "broyden")


def deq_kwargs(solver: str) -> dict:
    return dict(f_solver=solver, f_max_iter=18, f_tol=1e-3, f_stop_mode="rel", b_solver=solver,
                b_max_iter=20, b_tol=1e-6, b_stop_mode="rel", ift=True)


class _FloorGrad(torch.autograd.Function):
    """Identity on ``fz = f(z)``; the backward runs ``n`` plain VJP iterations g <- grad + J^T g."""

    @staticmethod
    def forward(ctx, fz, z, n):
        ctx.n = n
        ctx.save_for_backward(fz, z)
        return fz.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        fz, z = ctx.saved_tensors
        g = grad
        for _ in range(ctx.n):
            g = grad + torch.autograd.grad(fz, z, g, retain_graph=True)[0]
        return g, None, None


class FloorDEQ(torch.nn.Module):
    """The work every DEQ library must do at given counts, and nothing else: ``n_f`` evaluations
    of ``f`` without grad, one tracked evaluation, ``n_b`` VJPs in the backward."""

    def __init__(self, n_f: int, n_b: int):
        super().__init__()
        self.n_f, self.n_b = n_f, n_b

    def forward(self, func, z0, backward_writer=None, **_):
        with torch.no_grad():
            z = z0
            for _ in range(self.n_f):
                z = func(z)
        z = z.detach().requires_grad_()
        out = _FloorGrad.apply(func(z), z, self.n_b)
        if backward_writer is not None:
            backward_writer({"nvjp": self.n_b})
        return [out], {}


class Step:
    """A model, its optimizer and a fixed batch; ``run()`` does one training step.

    ``lib="floor"`` needs ``counts=(f_evals, b_vjps)``: deq_fast's model with :class:`FloorDEQ`."""

    def __init__(self, case: str, solver: str, lib: str, device: str = "cpu",
                 counts: tuple[int, int] | None = None):
        spec = CASES[case]
        torch.manual_seed(0)
        kw = dict(deq_kwargs=deq_kwargs(solver), deq_impl="deq_fast" if lib == FLOOR else lib)
        if spec["kind"] == "mdeq":
            self.model = build_model(case, num_classes=10, in_channels=3, **kw)
            self.x = torch.randn(*spec["shape"])
            self.y = torch.randint(0, 10, spec["shape"][:1])
        else:
            self.model = build_model(case, vocab_size=256, **kw)
            self.x = torch.randint(0, 256, spec["shape"])
            self.y = torch.randint(0, 256, spec["shape"])
        if lib == FLOOR:
            self.model.deq = FloorDEQ(counts[0] - 1, counts[1])
        self.model.to(device)
        self.x, self.y = self.x.to(device), self.y.to(device)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=1e-3)
        self.state = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.f_nfe = self.b_nfe = float("nan")
        self.calls = 0
        self.model.cell.register_forward_hook(self._count)

    def _count(self, *_):
        self.calls += 1

    def run(self) -> None:
        # Same weights every repetition: the solver sees the same problem each time.
        self.model.load_state_dict(self.state)
        torch.manual_seed(1)
        self.calls = 0
        b_info: list = []
        logits, info = self.model(self.x, backward_writer=b_info.append)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.y.reshape(-1))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.f_nfe = float(self.calls)      # every evaluation of f, forward and backward
        if b_info:
            n = b_info[-1].get("nvjp", b_info[-1].get("nstep"))
            self.b_nfe = float(torch.as_tensor(n).float().max())


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def step_peak_mb(step: "Step", device: str) -> float:
    """Extra memory at the peak of one step: CUDA allocator peak, or on CPU the resident-set
    high-water mark (reset through /proc/self/clear_refs) above the resident set before it."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step.run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")                       # reset VmHWM (Linux >= 4.0)
    except OSError:
        return float("nan")
    base = _rss_kb("VmRSS")
    step.run()
    return (_rss_kb("VmHWM") - base) / 1024


def measure_memory(case: str, solver: str, lib: str, device: str) -> float:
    """MB of peak memory one step adds, measured in a fresh process after one warm-up step."""
    code = ("import gc,json,sys,torch,warnings; warnings.simplefilter('ignore');"
            "sys.path.insert(0, %r); from bench_train import Step, step_peak_mb;"
            "torch.set_num_threads(1); s = Step(%r, %r, %r, %r); s.run(); gc.collect();"
            "print(json.dumps(step_peak_mb(s, %r)))") % (
                os.path.dirname(os.path.abspath(__file__)), case, solver, lib, device, device)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=1800)
    if out.returncode != 0:
        return float("nan")
    return float(json.loads(out.stdout.strip().splitlines()[-1]))


def compare(case: str, solver: str, reps: int, device: str, memory: bool) -> list[dict]:
    steps = {lib: Step(case, solver, lib, device) for lib in LIBS}
    for lib in LIBS:                                    # warm-up (and deq_fast's counts)
        steps[lib].run()
    fast = steps["deq_fast"]
    steps[FLOOR] = Step(case, solver, FLOOR, device, counts=(int(fast.f_nfe), int(fast.b_nfe)))
    steps[FLOOR].run()
    names = (*LIBS, FLOOR)
    times: dict[str, list[float]] = {lib: [] for lib in names}
    for _ in range(reps):
        for lib in names:
            _sync(device)
            t0 = time.perf_counter()
            steps[lib].run()
            _sync(device)
            times[lib].append(time.perf_counter() - t0)
    med = {lib: statistics.median(times[lib]) for lib in names}
    rows = []
    for lib in names:
        rows.append(dict(case=case, solver=solver, lib=lib, step_s=med[lib],
                         f_nfe=steps[lib].f_nfe, b_nfe=steps[lib].b_nfe,
                         over_floor_s=med[lib] - med[FLOOR],
                         mem_mb=measure_memory(case, solver, lib, device) if memory and lib in LIBS
                         else float("nan")))
    ratio = med["deq_fast"] / med["torchdeq"]
    for r in rows:
        r["ratio"] = ratio
        r["floor_ratio"] = med[FLOOR] / med["torchdeq"]
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--solvers", nargs="+", default=list(SOLVERS), choices=SOLVERS)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-memory", action="store_true", help="skip the subprocess memory rows")
    p.add_argument("--json", help="also write the rows to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    print(f"torch {torch.__version__}, device {args.device}, {args.threads} thread(s), "
          f"batch 32, caps 18/20, rel tol 1e-3 / 1e-6, ift=True, median of {args.reps}")
    print(f"{'case':14s} {'solver':9s} {'library':9s} {'step (s)':>9s} {'f_evals':>7s} "
          f"{'b_vjp':>6s} {'over floor (s)':>14s} {'peak MB':>8s} {'fast/tq':>8s} "
          f"{'floor/tq':>8s}")
    rows = []
    for case in args.cases:
        for solver in args.solvers:
            for r in compare(case, solver, args.reps, args.device, not args.no_memory):
                rows.append(r)
                print(f"{r['case']:14s} {r['solver']:9s} {r['lib']:9s} {r['step_s']:9.3f} "
                      f"{r['f_nfe']:7.0f} {r['b_nfe']:6.1f} {r['over_floor_s']:14.3f} "
                      f"{r['mem_mb']:8.1f} {r['ratio']:8.2f} {r['floor_ratio']:8.2f}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(torch=torch.__version__, device=args.device, rows=rows), fh, indent=1)
    return 0


# ------------------------------------------------------------------------ pytest-benchmark entry
@pytest.mark.parametrize("lib", LIBS)
@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("case", ["mdeq-tiny", "deq-lm-small"])
def test_train_step(benchmark, case, solver, lib):
    pytest.importorskip("torchdeq")
    warnings.simplefilter("ignore")
    step = Step(case, solver, lib)
    step.run()
    benchmark.group = f"train-step-{case}-{solver}"
    benchmark.pedantic(step.run, rounds=3, iterations=1)


if __name__ == "__main__":
    sys.exit(main())
