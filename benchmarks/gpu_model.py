"""A GPU performance model of deq_fast's solver iterations that runs without a GPU.

For a solver (Anderson, Broyden, fixed point), a state ``[B, D]`` and a GPU, it predicts the
kernel time of one iteration (launch overhead aside) as a multiple of the iteration's
bandwidth floor, from three sources:

* **The launches the solver really makes**: ``deq_fast.aot.one_iteration`` runs the solve on
  ``meta`` tensors at the real size with every Triton launch recorded and not run, so the grid,
  tile sizes (``BLOCK_*`` constexprs) and ``num_warps`` are the launchers' own choices at that size
  (a host ``plan`` function, when the kernels have one, is called by the launcher itself).
* **The compiled kernels**: each distinct variant is compiled ahead of time for the GPU's arch
  with the runtime's specialisation (``deq_fast.aot.compile_launches``): registers per thread,
  shared memory, and the dependent load round trips per step of the main loop (a store between
  loads costs a second one).
* **What each kernel moves** (:data:`TRAFFIC`: the formulas of ``deq_fast.ops.traffic``, which
  the self-test's timing rows use too) and the floors (:data:`FLOORS`).

Model (all of it in :func:`kernel_time`): a kernel is ``P`` programs of ``W`` bytes each, every
program making ``trips`` dependent round trips to DRAM in sequence (loop steps × round trips
per step, + 1 for its prologue and epilogue: :func:`loop_trips`). ``R`` programs fit on an SM
(warps, registers, shared memory and block limits, :func:`resident_per_sm`), so the GPU runs
them in waves of at most ``C = SMs·R``. A wave of ``p`` programs takes
``max(trips·latency, p·W / peak_bandwidth)``: Little's law (achieved bandwidth = bytes in
flight / latency, ``p·W/trips`` bytes in flight), capped by the peak. Waves run one after the
other (wave quantisation); a kernel's fixed cost (``KernelShape.fixed_s``: scalar work,
barriers; zero for the solver kernels) is added once. Writes count towards the bytes moved,
not the bytes in flight (stores do not wait for DRAM).

Floors, in units of ``B·D·s`` (``s`` the state element size), the DRAM traffic an iteration
cannot avoid:

* Anderson ``2m + 3``: read ``x`` and ``f(x)`` (2), the ``m - 1`` older residual rows for the
  Gram row (``m - 1``), write the new residual row (1), read the ``m`` rows of ``F`` for the mix
  (``m``), write ``x`` (1). The kernels also copy ``f(x)`` into the ring (``2m + 4``).
* Broyden ``4L + 13`` (``L`` stored updates): pass 1 reads ``x, f(x), g_old, dx`` and the ``2L``
  rows of ``U, V`` and writes ``g`` (``2L + 5``); the coefficients need the whole of ``D``, so
  pass 2 reads ``x, g, g_old, dx`` and ``U, V`` again and writes ``U[s], V[s], dx, x``
  (``2L + 8``). The kernels move exactly this while the ring fits one ``L_BLOCK = 64``-slot
  tile; pass 1 takes longer rings one block after the other and reads ``g, g_old, dx`` again for
  each further block (``+3`` per ``4·64`` ring rows, 1.2 %), and both passes make one round
  trip per ring block and column step.
* Fixed point ``3``: read ``x`` and ``f(x)``, write ``x``. The one fused pass
  (``fixed_point_step``) moves exactly this.
The copy into ``best`` of samples that improved is left out of both (Anderson, Broyden: ``+2``
for those samples; fixed point ``+1``: the next pass writes the ``x`` it reads anyway).

Assumptions (stated, not measured; no GPU was available):

* H100 SXM5: 132 SMs, 3.35 TB/s HBM3, 64 warps / 65,536 registers / 228 KB shared memory / 32
  blocks per SM (NVIDIA H100 datasheet and the CUDA C Programming Guide's compute-capability
  table), loaded DRAM latency 650 ns (microbenchmarks put it at 600-700 ns under load).
* A100 SXM4 80 GB: 108 SMs, 2.039 TB/s HBM2e, 64 warps / 65,536 registers / 164 KB shared
  memory / 32 blocks per SM, loaded DRAM latency 600 ns.
* Registers are allocated per warp in units of 256; every block reserves 1 KB of shared memory.
* Loads of one loop step are in flight together and no step overlaps the next (Triton pipelines
  only loops feeding ``tl.dot``); L2 hits are ignored (the states are larger than L2).
* The per-iteration O(B) bookkeeping kernel (``_track_status_kernel``) moves ~10 accumulators
  per sample; its time is latency (one program).

Usage::

    python benchmarks/gpu_model.py                        # H100, float32, the standard shapes
    python benchmarks/gpu_model.py --gpu a100 --dtype bf16 --json out.json
    python benchmarks/gpu_model.py --markdown             # the README table

One model, two entry points: this file (the Triton solver iterations) and
``gpu_model_backward.py`` (the CUDA backward ops), which describes its kernels as
:class:`KernelShape` data (blocks, warps, registers, shared memory, bytes moved and read, round
trips from :func:`loop_trips`, a fixed cost ``fixed_s`` for scalar work) and times them with this
file's :data:`GPUS`, :func:`resident_per_sm` and :func:`kernel_time`. Any other kernel enters the
same way (:meth:`KernelShape.from_threads`: round trips from the bytes each thread keeps in flight).
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

if __name__ == "__main__" and "TRITON_INTERPRET" not in os.environ:
    os.environ["TRITON_INTERPRET"] = "1"        # the recorded solves run on meta tensors

import torch  # noqa: E402

from deq_fast.ops import traffic as op_bytes  # noqa: E402

# the GPUs as data (H100, A100), one copy: the self-test reads its peak bandwidths there too
from deq_fast.ops.traffic import GPU, GPUS  # noqa: E402

# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class KernelShape:
    """A launch as the model sees it.

    Attributes:
        name: for the tables.
        programs: blocks in the grid.
        warps: per block.
        regs_per_thread: from the compiled kernel (0: not known, registers do not limit).
        shared_bytes: per block (static + dynamic).
        bytes_moved: DRAM bytes of the whole launch (reads and writes).
        trips: dependent DRAM round trips each block makes one after the other.
        bytes_read: DRAM bytes read by the whole launch (what is in flight), ``<= bytes_moved``.
        fixed_s: the kernel's fixed cost besides its DRAM traffic (scalar work, barriers),
            added once to the launch.
    """
    name: str
    programs: int
    warps: int
    regs_per_thread: int
    shared_bytes: int
    bytes_moved: float
    trips: int
    bytes_read: float
    fixed_s: float = 0.0

    @classmethod
    def from_threads(cls, name: str, programs: int, threads: int, regs_per_thread: int,
                     shared_bytes: int, bytes_moved: float, bytes_read: float,
                     bytes_in_flight_per_thread: float, extra_trips: int = 1) -> "KernelShape":
        """From a CUDA kernel's description: each thread keeps ``bytes_in_flight_per_thread``
        bytes of loads outstanding per round trip (e.g. 4 float4 loads issued before use: 64)."""
        per_trip = threads * bytes_in_flight_per_thread
        trips = math.ceil(bytes_read / programs / per_trip) + extra_trips
        return cls(name, programs, math.ceil(threads / 32), regs_per_thread, shared_bytes,
                   bytes_moved, trips, bytes_read)

    @property
    def bytes_in_flight(self) -> float:
        """Per block, per round trip."""
        return self.bytes_read / self.programs / self.trips


def resident_per_sm(k: KernelShape, gpu: GPU) -> int:
    """Blocks of ``k`` one SM holds at once (0: the kernel cannot launch)."""
    by_warps = gpu.warps_per_sm // k.warps
    regs_per_warp = math.ceil(k.regs_per_thread * 32 / gpu.reg_alloc_unit) * gpu.reg_alloc_unit
    by_regs = (gpu.regs_per_sm // max(regs_per_warp, 1)) // k.warps
    by_smem = gpu.smem_per_sm // (k.shared_bytes + gpu.smem_reserved_per_block)
    return max(0, min(gpu.blocks_per_sm, by_warps, by_regs, by_smem))


def loop_trips(steps: int, trips_per_step: int) -> int:
    """Dependent round trips of a block: its loop steps x round trips per step, + 1 for the
    prologue and epilogue."""
    return steps * max(trips_per_step, 1) + 1


def wave_sizes(programs: int, per_wave: int) -> list:
    """Programs in each wave: full waves of ``per_wave``, then the remainder."""
    full, rest = divmod(programs, per_wave)
    return [per_wave] * full + ([rest] if rest else [])


@dataclass(frozen=True)
class KernelTime:
    """The model's prediction for one launch."""
    name: str
    time_s: float
    bytes_moved: float
    programs: int
    per_sm: int                 # blocks on the busiest SM in the first wave
    in_flight_per_sm: float     # bytes, first wave
    waves: int
    bound: str                  # "bandwidth" or "latency" (of the first wave)


def kernel_time(k: KernelShape, gpu: GPU) -> KernelTime:
    """Little's law per wave, capped by the peak bandwidth, waves in sequence, + ``k.fixed_s``."""
    resident = resident_per_sm(k, gpu)
    if resident == 0:
        raise ValueError(f"{k.name}: no block fits on an SM of the {gpu.name}")
    waves = wave_sizes(k.programs, gpu.sms * resident)
    per_program = k.bytes_moved / k.programs
    latency = k.trips * gpu.dram_latency_s
    time = sum(max(latency, p * per_program / gpu.dram_bytes_per_s) for p in waves) + k.fixed_s
    per_sm = min(resident, math.ceil(k.programs / gpu.sms))
    bound = ("bandwidth" if waves[0] * per_program / gpu.dram_bytes_per_s >= latency
             else "latency")
    return KernelTime(k.name, time, k.bytes_moved, k.programs, per_sm,
                      per_sm * k.bytes_in_flight, len(waves), bound)


# ----------------------------------------------------------------------------- kernel traffic


@dataclass(frozen=True)
class Traffic:
    """DRAM bytes of one launch and the extent its programs loop over."""
    read: float
    written: float
    extent: int                 # elements the programs' loops cover together (B·D or B)
    block: str                  # the constexpr giving the elements per loop step


def _state(a: dict, ptr: str = "x_ptr") -> tuple:
    """``(B, D, itemsize)`` of the state pointer ``ptr``."""
    t = a[ptr]
    return t.shape[0], a["D"], t.itemsize


def _rows(t: op_bytes.Traffic, a: dict) -> Traffic:
    """An O(B·D) kernel's bytes (``deq_fast.ops.traffic``), its loops covering ``B·D``."""
    B, D, _ = _state(a)
    return Traffic(t.read, t.written, B * D, "BLOCK_D")


def _track_status(a: dict) -> Traffic:
    t = op_bytes.track_status(a["B"], a["sq_ptr"].itemsize)
    return Traffic(t.read, t.written, a["B"], "BLOCK_B")


def _ring_blocks(a: dict) -> int:
    """Ring blocks of ``L_BLOCK`` slots a Broyden pass sweeps (kernels/broyden.py)."""
    return max(1, -(-a["n_valid"] // a["L_BLOCK"]))


def _broyden(t: op_bytes.Traffic, a: dict) -> Traffic:
    """A Broyden pass: one dependent sweep of its columns per ring block (a round trip per block
    and column step), so its loops cover ``blocks·B·D``."""
    r = _rows(t, a)
    return Traffic(r.read, r.written, r.extent * _ring_blocks(a), r.block)


# kernel name -> its traffic from the launch's arguments (name -> value; tensors as TensorArg):
# the formulas of deq_fast.ops.traffic (the kernels' docstrings; best copies left out)
TRAFFIC: dict = {
    "_anderson_residual_kernel": lambda a: _rows(op_bytes.anderson_residual(*_state(a), a["m"]), a),
    "_anderson_mix_kernel": lambda a: _rows(op_bytes.anderson_mix(*_state(a), a["n"], a["beta"]),
                                            a),
    "_broyden_dots_kernel": lambda a: _broyden(
        op_bytes.broyden_dots(*_state(a), a["n_valid"], _ring_blocks(a)), a),
    "_broyden_update_kernel": lambda a: _broyden(
        op_bytes.broyden_update(*_state(a), a["n_valid"]), a),
    "_fixed_point_step_kernel": lambda a: _rows(op_bytes.fixed_point_step(*_state(a)), a),
    "_track_status_kernel": _track_status,
}

# method -> the iteration's floor in state rows (module docstring), from m and L
FLOORS: dict = {
    "anderson": lambda m, L: 2 * m + 3,
    "broyden": lambda m, L: 4 * L + 13,
    "fixed_point": lambda m, L: 3,
}


def traffic(launch) -> Traffic:
    """The DRAM traffic of a recorded launch (``deq_fast.aot.Launch``)."""
    if launch.kernel not in TRAFFIC:
        raise KeyError(f"no traffic formula for {launch.kernel}: add it to TRAFFIC")
    return TRAFFIC[launch.kernel](launch.bound())


def triton_kernel_shape(launch, facts) -> KernelShape:
    """A recorded Triton launch and its compiled variant (``deq_fast.aot.CompileFacts``)."""
    t = traffic(launch)
    programs = launch.programs
    steps = math.ceil(t.extent / programs / launch.options[t.block])
    return KernelShape(launch.kernel, programs, facts.num_warps, facts.n_regs,
                       facts.shared_bytes, t.read + t.written,
                       loop_trips(steps, facts.round_trips), t.read)


# ----------------------------------------------------------------------------- iterations


@dataclass(frozen=True)
class Case:
    """A solver iteration to model."""
    method: str
    batch: int
    dim: int
    dtype: torch.dtype = torch.float32
    m: int = 6                  # Anderson history
    memory: int = 30            # Broyden's L

    @property
    def floor_bytes(self) -> float:
        return FLOORS[self.method](self.m, self.memory) * self.batch * self.dim * self.dtype.itemsize

    def options(self) -> dict:
        return {"anderson": {"m": self.m}, "broyden": {"memory": self.memory},
                "fixed_point": {}}[self.method]

    def warm(self) -> int:
        """An iteration with full rings."""
        return {"anderson": self.m, "broyden": self.memory, "fixed_point": 1}[self.method] + 1


@dataclass(frozen=True)
class IterationTime:
    case: Case
    kernels: tuple              # KernelTime per launch
    gpu: str

    @property
    def time_s(self) -> float:
        return sum(k.time_s for k in self.kernels)

    def floor_s(self, gpu: GPU) -> float:
        return self.case.floor_bytes / gpu.dram_bytes_per_s

    @property
    def bytes_moved(self) -> float:
        return sum(k.bytes_moved for k in self.kernels)


def iteration_launches(case: Case) -> list:
    from deq_fast.aot import one_iteration

    return one_iteration(case.method, case.dtype, case.batch, case.dim, case.warm(),
                         **case.options())


def model_iteration(case: Case, gpu: GPU, facts_of: Callable) -> IterationTime:
    """Predict one iteration; ``facts_of(launch)`` gives the launch's compiled facts."""
    launches = iteration_launches(case)
    times = tuple(kernel_time(triton_kernel_shape(x, facts_of(x)), gpu) for x in launches)
    return IterationTime(case, times, gpu.name)


# ----------------------------------------------------------------------------- compiled facts


@functools.lru_cache(maxsize=None)
def _sources_hash(module: str) -> str:
    """Hash of every Python source beside ``module`` (the kernel and the jit helpers it calls)."""
    folder = Path(importlib.import_module(module).__file__).parent
    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class FactsCache:
    """Compiled facts per kernel source, specialisation and arch, kept in a JSON file."""

    def __init__(self, path: Optional[Path]):
        self.path = path
        self.facts = json.loads(path.read_text()) if path and path.exists() else {}

    @staticmethod
    def key(launch, arch: int) -> str:
        from deq_fast.aot import variant

        return "|".join((_sources_hash(launch.module), *variant(launch, arch), str(arch)))

    def fill(self, launches: Sequence, arch: int) -> None:
        """Compile the launches whose facts are missing (one subprocess)."""
        from deq_fast.aot import compile_launches, distinct

        todo = {self.key(x, arch): x for x in distinct(launches, arch)}
        todo = {k: x for k, x in todo.items() if k not in self.facts}
        if not todo:
            return
        for key, facts in zip(todo, compile_launches(list(todo.values()), archs=(arch,))):
            if isinstance(facts, str):
                raise RuntimeError(f"{todo[key].kernel} does not compile for sm_{arch}: {facts}")
            self.facts[key] = asdict(facts)
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.facts, indent=0))

    def get(self, launch, arch: int):
        from deq_fast.aot import CompileFacts

        return CompileFacts(**self.facts[self.key(launch, arch)])


def model_cases(cases: Sequence[Case], gpu: GPU, cache: FactsCache) -> list:
    """Predict every case, compiling the variants they launch first (once each)."""
    cache.fill([x for c in cases for x in iteration_launches(c)], gpu.arch)
    return [model_iteration(c, gpu, lambda x: cache.get(x, gpu.arch)) for c in cases]


# ----------------------------------------------------------------------------- tables

NAMED = {(128, 196608): "CIFAR MDEQ", (8, 524288): "LM state"}
BATCHES = (1, 8, 32, 128, 512, 1024)
DIMS = (65536, 196608, 524288)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16,
          "fp64": torch.float64}


def standard_cases(dtype: torch.dtype, m: int, memory: int,
                   methods: Sequence[str] = ("anderson", "broyden", "fixed_point")) -> list:
    return [Case(meth, b, d, dtype, m, memory) for meth in methods for d in DIMS for b in BATCHES]


def acceptance(case: Case) -> Optional[bool]:
    """Whether the issue's 1.3x target applies: B in {1, 8, 32, 128}, B·D >= 2^20."""
    return case.batch in (1, 8, 32, 128) and case.batch * case.dim >= 2 ** 20


def row(it: IterationTime, gpu: GPU) -> dict:
    c = it.case
    slowest = max(it.kernels, key=lambda k: k.time_s)
    ratio = it.time_s / it.floor_s(gpu)
    return {
        "method": c.method, "B": c.batch, "D": c.dim, "dtype": str(c.dtype).removeprefix("torch."),
        "shape": NAMED.get((c.batch, c.dim), ""), "floor_us": it.floor_s(gpu) * 1e6,
        "model_us": it.time_s * 1e6, "x_floor": ratio,
        "bytes_x_floor": it.bytes_moved / c.floor_bytes, "launches": len(it.kernels),
        "slowest": slowest.name.strip("_").removesuffix("_kernel"),
        "blocks_per_sm": slowest.per_sm, "kb_in_flight_per_sm": slowest.in_flight_per_sm / 1024,
        "waves": slowest.waves, "bound": slowest.bound,
        "target": ("ok" if ratio <= 1.3 else "MISSED") if acceptance(c) else "n/a",
    }


COLUMNS = [("method", "method", "{}"), ("B", "B", "{}"), ("D", "D", "{}"), ("shape", "shape", "{}"),
           ("floor_us", "floor µs", "{:.1f}"), ("model_us", "model µs", "{:.1f}"),
           ("x_floor", "× floor", "{:.2f}"), ("bytes_x_floor", "bytes × floor", "{:.2f}"),
           ("slowest", "slowest kernel", "{}"), ("blocks_per_sm", "blocks/SM", "{}"),
           ("kb_in_flight_per_sm", "KB in flight/SM", "{:.1f}"), ("waves", "waves", "{}"),
           ("bound", "bound", "{}"), ("target", "≤1.3×", "{}")]


def render(rows: list, markdown: bool) -> str:
    cells = [[fmt.format(r[k]) for k, _, fmt in COLUMNS] for r in rows]
    head = [h for _, h, _ in COLUMNS]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(c) + " |" for c in cells])
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*c) for c in cells])


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--m", type=int, default=6, help="Anderson history (default 6)")
    p.add_argument("--memory", type=int, default=30, help="Broyden's L (default 30)")
    p.add_argument("--methods", nargs="+", default=["anderson", "broyden", "fixed_point"])
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    p.add_argument("--markdown", action="store_true", help="a Markdown table (the README's)")
    p.add_argument("--cache", type=Path,
                   default=Path.home() / ".cache" / "deq_fast" / "gpu_model_facts.json",
                   help="compiled facts kept between runs (keyed by the kernels' sources)")
    args = p.parse_args(argv)
    gpu = GPUS[args.gpu]
    cases = standard_cases(DTYPES[args.dtype], args.m, args.memory, args.methods)
    rows = [row(it, gpu) for it in model_cases(cases, gpu, FactsCache(args.cache))]
    print(f"{gpu.name}: {gpu.sms} SMs, {gpu.dram_bytes_per_s / 1e12:.2f} TB/s, "
          f"{gpu.dram_latency_s * 1e9:.0f} ns -> {gpu.bytes_in_flight_needed / 1024:.1f} KB in "
          f"flight per SM for the peak; {args.dtype}, Anderson m={args.m}, Broyden "
          f"L={args.memory}; per iteration, launch overhead aside")
    print(render(rows, args.markdown))
    if args.json:
        args.json.write_text(json.dumps({"gpu": asdict(gpu), "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
