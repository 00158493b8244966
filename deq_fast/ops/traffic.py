"""What each op moves through memory, and the peak bandwidth of the GPUs we know: the bandwidth floors.

One copy of each formula, used by the self-test (``python -m deq_fast.selftest --timing``: achieved
GB/s and time ÷ floor per kernel) and by the performance model (``benchmarks/gpu_model.py``,
``benchmarks/gpu_model_backward.py``). The formulas are the ``bytes:`` lines of the ops'
docstrings (``deq_fast/ops/{anderson,broyden,fixed_point,status}.py``, the kernels of
``deq_fast.kernels``, and the pass table of ``csrc/cuda/backward_ops.cu``), with ``s`` the state
element size:

=====================  ==========================================  =====================
op                     read                                        written
=====================  ==========================================  =====================
anderson_residual      x, fx, m - 1 rows of G: ``(m + 1)·B·D·s``   F[s], G[s]: ``2·B·D·s``
anderson_mix           n rows of F (+ n of G when beta != 1)       x: ``B·D·s``
broyden_dots           x, fx, g_old, dx, n_valid rows of U and V   g: ``B·D·s``
broyden_update         x, g, g_old, dx, n_valid rows of U and V    U[s], V[s], dx, x
fixed_point_step       x, fx                                       x (``B·2`` sums)
track_status           ``(4·acc + 1)·B``                           ``(6·acc + 2)·B``
=====================  ==========================================  =====================

The copies of improved samples into ``best`` (Anderson's and Broyden's, and the fixed point's
deferred copy) are left out (they depend on the data). The C++
backward ops (:data:`BACKWARD_ROWS`) are given as two floors in rows of ``B·D·s``: the
*contract* (every ``[B, D]`` operand once) and what the kernels *move* (an operand needed on both
sides of a reduction over ``D`` is read on each side; ``benchmarks/gpu_model_backward.py``'s
"algorithm" floor).

Example:
    >>> from deq_fast.ops import traffic
    >>> traffic.anderson_residual(B=128, D=65536, size=4, m=6).moved / 2**20   # MiB
    288.0
    >>> traffic.op_traffic("fixed_point_step", [torch.zeros(2, 10), torch.zeros(2, 10)]).read
    160.0
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

__all__ = ["Traffic", "anderson_residual", "anderson_mix", "broyden_dots", "broyden_update",
           "fixed_point_step", "track_status", "op_traffic",
           "BACKWARD_ROWS", "backward_traffic", "GPU", "GPUS", "known_gpu"]


@dataclass(frozen=True)
class Traffic:
    """DRAM bytes of one call: ``read`` and ``written``."""
    read: float
    written: float

    @property
    def moved(self) -> float:
        return self.read + self.written


def _rows(read: float, written: float, B: int, D: int, size: int) -> Traffic:
    """``read`` and ``written`` rows of ``B·D`` elements of ``size`` bytes."""
    row = float(B * D * size)
    return Traffic(read * row, written * row)


def anderson_residual(B: int, D: int, size: int, m: int) -> Traffic:
    """Pass 1 of Anderson: read x, fx and the other ``m - 1`` rows of G; write F[s], G[s]."""
    return _rows(m + 1, 2, B, D, size)


def anderson_mix(B: int, D: int, size: int, n: int, beta: float) -> Traffic:
    """Pass 2 of Anderson: read ``n`` rows of F (and of G when ``beta != 1``); write x."""
    return _rows(n * (1 if beta == 1.0 else 2), 1, B, D, size)


def broyden_dots(B: int, D: int, size: int, n_valid: int, ring_blocks: int = 1) -> Traffic:
    """Pass 1 of Broyden: read x, fx, g_old, dx and ``n_valid`` rows of U and V; write g. A
    kernel that takes the ring in ``ring_blocks`` sweeps (the Triton one: ``cdiv(n_valid,
    L_BLOCK)``, ``kernels/broyden.py``) reads g, g_old, dx again in each sweep after the first."""
    return _rows(2 * n_valid + 4 + 3 * (max(ring_blocks, 1) - 1), 1, B, D, size)


def broyden_update(B: int, D: int, size: int, n_valid: int) -> Traffic:
    """Pass 2 of Broyden: read x, g, g_old, dx and ``n_valid`` rows of U and V; write U[s],
    V[s], dx, x."""
    return _rows(2 * n_valid + 4, 4, B, D, size)


def fixed_point_step(B: int, D: int, size: int) -> Traffic:
    """The fixed point's one pass: read x, fx; write x (the ``[B, 2]`` sums are negligible).
    Damping is formed in the pass from the same two reads."""
    return _rows(2, 1, B, D, size)


def track_status(B: int, acc_size: int) -> Traffic:
    """Read sq, lowest (2 + 2 accumulators), active; write lowest, best_step, trace (2 + 2 + 2),
    improved, active: O(B)."""
    return Traffic(float((4 * acc_size + 1) * B), float((6 * acc_size + 2) * B))


def _state(x: torch.Tensor) -> tuple:
    return x.shape[0], x.shape[1], x.element_size()


# op -> its traffic from the op's arguments (the schemas of deq_fast/ops/table.py)
_OF_ARGS: dict = {
    "anderson_residual": lambda a: anderson_residual(*_state(a[0]), a[2].shape[1]),
    "anderson_mix": lambda a: anderson_mix(*_state(a[3]), a[6], a[10]),
    "broyden_dots": lambda a: broyden_dots(*_state(a[0]), a[9]),
    "broyden_update": lambda a: broyden_update(*_state(a[0]), a[12]),
    "fixed_point_step": lambda a: fixed_point_step(*_state(a[0])),
    "track_status": lambda a: track_status(a[0].shape[0], a[0].element_size()),
}

#: C++ backward op -> ``(contract, moved)`` floors in rows of ``B·D·s`` from the op's column
#: count ``c``: ``n`` (Anderson's columns; Broyden's stored updates), the Arnoldi step ``j``,
#: the restart ``k`` of the update (csrc/cuda/backward_ops.cu, "Passes per op").
BACKWARD_ROWS: dict = {
    "bwd_track": lambda c: (6, 6),                   # residual + ||r||^2 | decide | copy to best
    "bwd_masked_add": lambda c: (3, 3),
    "bwd_anderson_mix": lambda c: (2 * c + 3, 2 * c + 4),
    "bwd_broyden_step": lambda c: (2 * c + 7, 4 * c + 11),
    "bwd_gmres_start": lambda c: (2, 3),
    "bwd_gmres_arnoldi": lambda c: (c + 3, 3 * c + 9),   # CGS2 reads the basis three times
    "bwd_gmres_update": lambda c: (c + 2, c + 2),
}

# C++ backward op -> (its [B, D] state argument, its column count) from the op's arguments
_BACKWARD_ARGS: dict = {
    "bwd_track": lambda a: (a[0], 0),
    "bwd_masked_add": lambda a: (a[0], 0),
    "bwd_anderson_mix": lambda a: (a[0], a[7]),
    "bwd_broyden_step": lambda a: (a[0], a[7]),
    "bwd_gmres_start": lambda a: (a[0], 0),
    "bwd_gmres_arnoldi": lambda a: (a[0], a[9]),
    "bwd_gmres_update": lambda a: (a[0], a[1].shape[0] - 1),
}


def backward_traffic(op: str, B: int, D: int, size: int, columns: int) -> Traffic:
    """What the CUDA kernels of backward ``op`` move (counted as read: the floors do not split
    reads from writes)."""
    return Traffic(float(BACKWARD_ROWS[op](columns)[1] * B * D * size), 0.0)


def op_traffic(op: str, args: Sequence) -> Optional[Traffic]:
    """The bytes one call of ``torch.ops.deq_fast.<op>(*args)`` moves, or None for an op
    without a byte count (``anderson_lstsq``: O(B·m²))."""
    if op in _OF_ARGS:
        return _OF_ARGS[op](args)
    if op in _BACKWARD_ARGS:
        x, columns = _BACKWARD_ARGS[op](args)
        return backward_traffic(op, *_state(x), columns)
    return None


# ----------------------------------------------------------------------------- GPUs as data


@dataclass(frozen=True)
class GPU:
    """What the performance model needs of a GPU (bytes, seconds).

    Attributes:
        device_names: substrings of ``torch.cuda.get_device_name()`` that identify this GPU
            (the self-test's peak bandwidth).
    """
    name: str
    arch: int                       # compute capability x10, the AOT compile target
    sms: int
    dram_bytes_per_s: float
    dram_latency_s: float           # loaded latency
    smem_per_sm: int
    device_names: tuple = ()
    warps_per_sm: int = 64
    regs_per_sm: int = 65536
    blocks_per_sm: int = 32
    reg_alloc_unit: int = 256       # registers are allocated per warp in these units
    smem_reserved_per_block: int = 1024

    @property
    def bytes_in_flight_needed(self) -> float:
        """Per SM, to reach the peak (Little's law): bandwidth x latency / SMs."""
        return self.dram_bytes_per_s * self.dram_latency_s / self.sms


#: H100 SXM5 (NVIDIA datasheet; the SXM part names itself "H100 80GB HBM3"), A100 SXM4 80 GB.
GPUS = {
    "h100": GPU("H100 SXM5", 90, 132, 3.35e12, 650e-9, 228 * 1024,
                ("H100 80GB HBM3", "H100 SXM")),
    "a100": GPU("A100 SXM4 80GB", 80, 108, 2.039e12, 600e-9, 164 * 1024,
                ("A100-SXM4-80GB", "A100 SXM4 80GB")),
}


def known_gpu(device_name: str) -> Optional[GPU]:
    """The entry of :data:`GPUS` whose ``device_names`` occur in ``device_name``, else None
    (other variants, e.g. "H100 PCIe", differ in bandwidth and are not guessed)."""
    for gpu in GPUS.values():
        if any(n.lower() in device_name.lower() for n in gpu.device_names):
            return gpu
    return None

