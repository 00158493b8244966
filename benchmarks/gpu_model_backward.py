"""A GPU performance model of the CUDA backward ops ``deq_fast::bwd_*`` (``csrc/cuda/backward_ops.cu``)
that runs without a GPU: per op, its passes over ``D`` at one shape against the op's bandwidth
floor, for the kernels as they are (split-D grid) and as they were (one block per sample).

Launch shapes are data (:data:`CU`) mirroring the constants of ``backward_ops.cu``; a test parses
them from the source so that the two cannot drift. Registers per thread are ``ptxas -v`` figures
for sm_90 (:data:`REGISTERS`, from ``.ci/cuda_build_check.sh``'s build log).

The model is :mod:`gpu_model`'s, this is its second entry point (the first, ``gpu_model.py``,
models the Triton solver iterations): the GPUs (``GPUS``), the occupancy
(``resident_per_sm``), the round trips (``loop_trips``) and the time (``kernel_time``) are
imported from it; this file only describes the backward kernels as ``KernelShape`` data. A pass is
``P`` blocks of ``W`` bytes; ``R`` blocks fit on an SM (warps, registers, shared memory), so it
runs in waves of ``SMs·R``; each block makes ``trips`` dependent DRAM round trips in sequence (its
loop iterations x round trips per iteration, + 1 for the prologue and the partial-sum write). A
wave of ``p`` blocks takes ``max(trips·latency, p·W / peak)`` (Little's law, capped by the peak
bandwidth). A finalise kernel (one block per sample reading ``chunks x values`` partials,
``kFinaliseThreads`` at a time, then ``O(m^2)``-``O(m^3)`` scalar math on one thread) is a kernel of
``1 + min(loads, chunks)`` round trips with a fixed cost (``KernelShape.fixed_s``) for its scalar
work (:data:`SCALAR_OP_S` per flop). "KB in flight/SM" (``--verbose``) is the model's: DRAM bytes
read per block per round trip, averaged over the block's trips, times the blocks on an SM.

Floors, in units of ``B·D·s`` (``s`` the element size):

* **contract**: every ``[B, D]`` operand the op reads or writes, once.
* **algorithm**: what the op cannot avoid given that a reduction over ``D`` must finish before the
  values that depend on it are formed (an operand needed on both sides of a reduction is read on
  each side; e.g. CGS2 reads the basis three times). The CUDA kernels move exactly this much
  (repeated reads of a chunk by the column groups of one chunk run together and hit L2; not
  counted).

Assumptions (not measured; no GPU was available): the GPUs of ``gpu_model.py`` (H100 SXM5 132
SMs, 3.35 TB/s, 650 ns loaded DRAM latency, 64 warps / 65,536 registers / 228 KB shared memory /
32 blocks per SM; A100 SXM4 108 SMs, 2.039 TB/s, 600 ns, 164 KB). Loads of one loop iteration
are in flight together (the unrolled column loops: ``kColumnUnroll`` columns at a time),
iterations do not overlap (the ``#pragma unroll 2`` of the element loop is not credited); stores
do not wait. The old kernels: one 256-thread block per sample, scalar loads, one round trip per
element-loop iteration, modified Gram-Schmidt (two passes per basis column), a block reduction
(two barriers, ~2 us) per dot; their registers are not known (occupancy by warps only).

Usage::

    python benchmarks/gpu_model_backward.py                    # H100, float32, B=128, D=65,536
    python benchmarks/gpu_model_backward.py --gpu a100 --dtype float64 --B 32 --D 196608
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_model import (  # noqa: E402  (the one model: GPUs, occupancy, Little's law, waves)
    GPU,
    GPUS,
    KernelShape,
    KernelTime,
    kernel_time,
    loop_trips,
    resident_per_sm,
)

from deq_fast.ops.traffic import BACKWARD_ROWS  # noqa: E402  (the floors, one copy)

SCALAR_OP_S = 2e-9          # one dependent double flop on one thread, with its shared-memory access
LAUNCH_GAP_S = 1.5e-6       # back-to-back launches on one stream (not in the kernel times)
OLD_BLOCK_REDUCE_S = 2e-6   # the old kernels' block_sum: two barriers and a serial warp loop
SHARED_BYTES = 2048         # static shared memory per block of the split-D kernels
PARTIAL_BYTES = 8           # the partial sums are doubles

# ----------------------------------------------------------------------------- the .cu as data

#: The launch constants of csrc/cuda/backward_ops.cu (tests/implicit/test_gpu_model_backward.py
#: parses them from the source).
CU = {
    "kThreads": 256,
    "kBlocksPerSm": 8,
    "kMinVecsPerThread": 4,
    "kMaxChunks": 4096,
    "kColsPerBlock": 12,
    "kBroydenColsPerBlock": 6,
    "kFinaliseThreads": 64,
    "kColumnUnroll": 4,
    "kDotsMinBlocks": 2,
    "kVecUnroll": 2,
    "kVecUnrollDots": 1,
}

#: Registers per thread, ptxas sm_90 (float32, float64), CUDA 13.0; zero spills for all.
REGISTERS = {
    "sumsq": (32, 28), "scale": (48, 44), "combine": (48, 40), "track_residual": (48, 48),
    "copy_if": (26, 26), "masked_add": (28, 29), "anderson_dots": (72, 82),
    "broyden_dots": (128, 92), "broyden_v": (74, 64), "broyden_u": (80, 74),
    "arnoldi_dots": (106, 90), "arnoldi_redots": (80, 82), "arnoldi_project": (80, 68),
}

# ----------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Pass:
    """One pass over D: a kernel in units of B·D·s vectors.

    Attributes:
        kernel: key of :data:`REGISTERS`.
        read, written: vectors read / written (DRAM) by the whole pass.
        streams: vectors each thread loads per loop iteration outside the column loops.
        columns: history columns the block loads per iteration; groups: column groups (grid z).
        unrolled: the column loads of one iteration are all in flight (the dots kernels' fully
            unrolled loops); otherwise kColumnUnroll at a time.
        samples: fraction of the samples that run it (the copy of an improved iterate).
    """
    kernel: str
    read: float
    written: float
    streams: int
    columns: int = 0
    groups: int = 1
    unrolled: bool = False
    samples: float = 1.0


@dataclass(frozen=True)
class Finalise:
    values: int             # partial sums per chunk
    flops: float = 0.0      # scalar work of thread 0


@dataclass(frozen=True)
class Shape:
    B: int
    D: int
    s: int                  # element size

    @property
    def vec(self) -> int:
        return 16 // self.s

    @property
    def nvec(self) -> int:
        return -(-self.D // self.vec)

    @property
    def state_bytes(self) -> float:
        return float(self.B * self.D * self.s)


def cuda_block(name: str, regs: int, threads: int = CU["kThreads"],
               shared: int = SHARED_BYTES) -> KernelShape:
    """One block of a kernel, what its occupancy needs (grid and traffic: :func:`dataclasses.replace`)."""
    return KernelShape(name, 1, -(-threads // 32), regs, shared, 0.0, 1, 0.0)


def chunks(shape: Shape, resident: int, groups: int, gpu: GPU) -> int:
    """split_for of backward_ops.cu."""
    slots = gpu.sms * max(1, min(resident, CU["kBlocksPerSm"]))
    fill = max(1, slots // (shape.B * groups))
    most = max(1, shape.nvec // (CU["kThreads"] * CU["kMinVecsPerThread"]))
    return min(fill, most, CU["kMaxChunks"])


def pass_time(p: Pass, shape: Shape, gpu: GPU, dtype_index: int) -> tuple:
    """(KernelTime, chunks) of one split-D pass."""
    threads = CU["kThreads"]
    block = cuda_block(p.kernel, REGISTERS[p.kernel][dtype_index])
    n_chunks = chunks(shape, resident_per_sm(block, gpu), p.groups, gpu)
    blocks = max(1, round(shape.B * p.samples)) * n_chunks * p.groups
    iters = -(-shape.nvec // n_chunks) // threads + 1
    col_trips = 1 if p.unrolled or p.columns == 0 else -(-p.columns // CU["kColumnUnroll"])
    k = replace(block, programs=blocks, trips=loop_trips(iters, col_trips),
                bytes_moved=(p.read + p.written) * shape.state_bytes * p.samples,
                bytes_read=p.read * shape.state_bytes * p.samples)
    return kernel_time(k, gpu), n_chunks


def finalise_time(f: Finalise, n_chunks: int, shape: Shape, gpu: GPU) -> KernelTime:
    """One block per sample: thread loads of the partials in sequence, then the scalar work."""
    reads = -(-n_chunks * f.values // CU["kFinaliseThreads"])
    read = shape.B * n_chunks * f.values * PARTIAL_BYTES
    k = replace(cuda_block("finalise", 0, CU["kFinaliseThreads"], 0), programs=shape.B,
                trips=1 + min(reads, n_chunks), bytes_moved=read, bytes_read=read,
                fixed_s=f.flops * SCALAR_OP_S)
    return kernel_time(k, gpu)


# ----------------------------------------------------------------------------- the ops


@dataclass(frozen=True)
class Op:
    name: str
    steps: tuple            # Pass and Finalise in launch order
    contract: float         # floors, in B·D·s
    algorithm: float
    old: tuple              # the old kernel: (passes over D, streams per pass, block reductions)


def _op(name: str, steps: tuple, columns: int, old: tuple) -> Op:
    """An op with its floors from ``deq_fast.ops.traffic.BACKWARD_ROWS`` (``columns``: the op's
    column count, see there)."""
    return Op(name, steps, *BACKWARD_ROWS[name](columns), old)


def ops(m: int = 6, L: int = 20, j: int = 19, k: int = 20) -> list:
    """The ops at Anderson history m, Broyden memory L (updating), Arnoldi step j, restart k
    (update with k_b = k)."""
    cgs2_groups = -(-(j + 1) // CU["kColsPerBlock"])
    n_b = L - 1  # Broyden columns other than the slot being replaced
    return [
        _op("bwd_track", (Pass("track_residual", 3, 1, 3), Finalise(1, 20),
                          Pass("copy_if", 1, 1, 1)), 0, ((4, 1), (2, 0))),
        _op("bwd_masked_add", (Pass("masked_add", 2, 1, 2),), 0, ((3, 0),)),
        _op("bwd_anderson_mix",
            (Pass("anderson_dots", m + 1, 2, 2, m - 1, -(-m // CU["kColsPerBlock"]), True),
             Finalise(m, 2 * m ** 3), Pass("combine", m, 1, 0, m)),
            m, ((4, 0),) + ((2, 1),) * m + ((m + 1, 0),)),
        _op("bwd_broyden_step",
            (Pass("broyden_dots", 2 * n_b + 3, 0, 3, 2 * n_b, -(-L // CU["kBroydenColsPerBlock"]),
                  True),
             Finalise(3 * L), Pass("broyden_v", n_b + 3, 1, 3, n_b), Finalise(2, 10),
             Pass("broyden_u", n_b + 4, 4, 4, n_b)),
            L,
            ((3, 0),) + ((2, 1),) * (2 * n_b) + ((2 * n_b + 4, 1), (4, 0)) + ((2, 1),) * L
            + ((L + 6, 0),)),
        _op("bwd_gmres_start", (Pass("sumsq", 1, 0, 1), Finalise(1, 2 * k),
                                Pass("scale", 1, 1, 1)), 0, ((1, 1), (2, 0))),
        _op("bwd_gmres_arnoldi",
            (Pass("arnoldi_dots", j + 2, 0, 2, j + 1, cgs2_groups, True), Finalise(j + 2),
             Pass("arnoldi_redots", j + 2, 0, 2, j + 1, cgs2_groups), Finalise(j + 1),
             Pass("arnoldi_project", j + 2, 1, 2, 2 * (j + 1)), Finalise(1, 8 * j + 20),
             Pass("scale", 1, 1, 1)),
            j, ((3, 1),) + ((2, 1), (3, 0)) * (j + 1) + ((1, 1), (2, 0))),
        _op("bwd_gmres_update", (Finalise(0, k * k), Pass("combine", k + 1, 1, 1, k)),
            k, ((k + 2, 0),)),
    ]


@dataclass(frozen=True)
class OpTime:
    name: str
    new_s: float
    old_s: float
    contract_s: float
    algorithm_s: float
    launches: int
    detail: str


def old_time(op: Op, shape: Shape, gpu: GPU) -> float:
    """One 256-thread block per sample, scalar loads (registers not known: they do not limit):
    per pass over D, one round trip per element-loop iteration, plus its block reductions."""
    threads = 256
    block = cuda_block("old", 0, threads, 0)
    t = 0.0
    for streams, reductions in op.old:
        moved = max(streams, 1) * shape.state_bytes
        k = replace(block, programs=shape.B, trips=loop_trips(-(-shape.D // threads), 1),
                    bytes_moved=moved, bytes_read=moved,
                    fixed_s=reductions * OLD_BLOCK_REDUCE_S)
        t += kernel_time(k, gpu).time_s
    return t


def step_time(step, n_chunks: int, shape: Shape, gpu: GPU, dtype_index: int) -> tuple:
    """(seconds, chunks of the last pass, description) of a Pass or a Finalise."""
    if isinstance(step, Finalise):
        ft = finalise_time(step, n_chunks, shape, gpu)
        return ft.time_s, n_chunks, f"finalise {ft.time_s * 1e6:.1f} us"
    pt, n_chunks = pass_time(step, shape, gpu, dtype_index)
    return pt.time_s, n_chunks, (
        f"{step.kernel}: {pt.programs} blocks ({n_chunks} chunks x {step.groups} groups), "
        f"{pt.per_sm}/SM, {pt.in_flight_per_sm / 1024:.0f} KB in flight/SM, "
        f"{pt.time_s * 1e6:.1f} us")


def model_op(op: Op, shape: Shape, gpu: GPU, dtype_index: int) -> OpTime:
    t, n_chunks, parts = 0.0, 1, []
    for step in op.steps:
        dt, n_chunks, part = step_time(step, n_chunks, shape, gpu, dtype_index)
        t += dt
        parts.append(part)
    bw = gpu.dram_bytes_per_s
    return OpTime(op.name, t, old_time(op, shape, gpu), op.contract * shape.state_bytes / bw,
                  op.algorithm * shape.state_bytes / bw, len(op.steps), "; ".join(parts))


def render(rows: Sequence[OpTime], gpu: GPU, shape: Shape, verbose: bool) -> str:
    need = gpu.bytes_in_flight_needed / 1024
    out = [f"{gpu.name}, B={shape.B}, D={shape.D}, {shape.s}-byte elements "
           f"(bytes in flight needed per SM: {need:.1f} KB); times in us, launch gaps aside",
           "| op | floor (contract) | floor (algorithm) | new | new / algorithm | "
           "new / contract | old | old / algorithm | launches |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r.name} | {r.contract_s * 1e6:.1f} | {r.algorithm_s * 1e6:.1f} | "
                   f"{r.new_s * 1e6:.1f} | **{r.new_s / r.algorithm_s:.2f}** | "
                   f"{r.new_s / r.contract_s:.2f} | {r.old_s * 1e6:.0f} | "
                   f"{r.old_s / r.algorithm_s:.1f} | {r.launches} |")
    if verbose:
        out += ["", *(f"{r.name}: {r.detail}" for r in rows)]
    return "\n".join(out)


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gpu", choices=sorted(GPUS), default="h100")
    ap.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    ap.add_argument("--B", type=int, default=128)
    ap.add_argument("--D", type=int, default=65536)
    ap.add_argument("--m", type=int, default=6, help="Anderson history")
    ap.add_argument("--L", type=int, default=20, help="Broyden memory")
    ap.add_argument("--restart", type=int, default=20, help="GMRES restart (Arnoldi j = restart - 1)")
    ap.add_argument("--verbose", action="store_true", help="per-pass grids, occupancy, bytes in flight")
    a = ap.parse_args(argv)
    gpu = GPUS[a.gpu]
    di = 0 if a.dtype == "float32" else 1
    shape = Shape(a.B, a.D, 4 if di == 0 else 8)
    rows = [model_op(op, shape, gpu, di)
            for op in ops(a.m, a.L, a.restart - 1, a.restart)]
    print(render(rows, gpu, shape, a.verbose))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
