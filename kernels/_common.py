"""Host-side helpers shared by the launchers: launch plans, scratch, checks, the device guard.

Launch plan (:func:`plan`, a frozen :class:`Plan`): every ``O(B·D)`` solver kernel runs on a 2-D
grid ``(B, chunks)``: program ``(b, c)`` owns the columns ``[c·chunk_d, min((c + 1)·chunk_d, D))``
of sample ``b`` and loops over them in ``BLOCK_D`` steps, with ``ROWS_PAD`` history rows (the
ring, padded to a power of two) as the other axis of its register tiles. The plan is a pure
function of ``(B, D, element size, SM count, rows, tiles)``:

- ``BLOCK_D``: the largest power of two whose ``tiles`` live ``[ROWS_PAD, BLOCK_D]`` tiles fit
  ``REG_BUDGET`` 32-bit registers per thread (float64 counts two) over 4 warps (8 from
  ``ROWS_PAD >= 32``: long Broyden rings), at most ``MAX_BLOCK_D`` and ``next_power_of_2(D)``;
  then halved (not below ``FLOOR_BLOCK_D``) while ``B·cdiv(D, BLOCK_D)`` programs could not
  reach the target.
- ``num_warps``: as many as ``BLOCK_D`` holds with every warp along ``D`` and 16-byte vectors
  (``BLOCK_D / (32·16/elem_size)``, at most 4, or 8 for long rings), raised to what the register
  budget needs (up to ``MAX_WARPS``): small tiles get fewer warps rather than warps stacked
  along the rows, which would add a cross-warp layout conversion per step.
- ``chunks``: enough for ``PROGRAMS_PER_SM`` programs per SM (``cdiv(sm_count·8, B)``), at most
  one per ``BLOCK_D`` step; ``chunk_d`` is a whole number of steps and only the last chunk of a
  sample has a tail.

The SM count is the device's (``multi_processor_count``) on CUDA and ``DEFAULT_SM_COUNT`` (an
H100's 132) for CPU tensors under the interpreter. :func:`forced_plan` overrides ``BLOCK_D`` and
``chunk_d`` (tests: several chunks and tails at interpreter-sized shapes).

Two-level reductions (deterministic, no atomics on data): each program writes its partial sums to
a scratch row ``part[b, c, :]`` (allocated per launch with ``torch.empty``: the caching allocator
makes that an O(1) host operation, it is stream-ordered and CUDA-graph safe, and no state outlives
a launch), then takes a ticket ``atomic_add(ticket[b], 1)``; the program that draws the last ticket
(``chunks - 1``) sums ``part[b, 0..chunks-1]`` in chunk order (loads with ``.cg``: through L2,
never a stale L1 line that a neighbouring sample's reduction pulled in), writes the outputs and
resets ``ticket[b]`` to 0. Results do not depend on which program arrives last. The ticket
counters are the one persistent scratch: zeros allocated once per (device, stream) by
:func:`tickets` (a counter must start at zero, and each launch leaves it at zero for the next;
launches on one stream never overlap). The reduction finishes inside the producing launch, not
in its consumer, because pass 1's ``sq`` is read by ``track_status`` (whose op schema takes a
``[B, 2]`` tensor) before pass 2 runs: the schemas, the launches per iteration (3; 2 for the fixed
point) and the absence of host syncs stay as they were.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["Plan", "plan", "forced_plan", "sm_count", "tickets", "device_guard", "rows_pad",
           "check", "check_state", "unit_inner", "state_dtypes", "acc_dtype_of", "last_arrival",
           "DEFAULT_SM_COUNT"]

REG_BUDGET = 64       # 32-bit registers per thread for the live [ROWS_PAD, BLOCK_D] tiles
MAX_BLOCK_D = 1024
MIN_BLOCK_D = 16
FLOOR_BLOCK_D = 128   # BLOCK_D is not halved below this to make more chunks
MAX_WARPS = 16
PROGRAMS_PER_SM = 8   # target programs per SM when the batch alone does not reach it
DEFAULT_SM_COUNT = 132  # an H100 SXM; the SM count used for tensors not on CUDA

STATE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

_FORCED: dict = {}


@dataclasses.dataclass(frozen=True)
class Plan:
    """How a launcher launches one kernel (see the module docstring).

    Attributes:
        grid: ``(B, chunks)`` programs.
        BLOCK_D: columns per loop step of a program.
        num_warps: warps per program.
        chunks: programs per sample.
        chunk_d: columns per program (a multiple of ``BLOCK_D``; the last chunk may be shorter).
        ROWS_PAD: padded history rows of the tiles (1 for the row-less kernels).
    """

    grid: tuple
    BLOCK_D: int
    num_warps: int
    chunks: int
    chunk_d: int
    ROWS_PAD: int = 1

    def programs_per_sm(self, sms: int) -> float:
        """Programs of the grid per SM on a GPU with ``sms`` SMs."""
        return self.grid[0] * self.grid[1] / sms


def state_dtypes() -> tuple:
    """The state dtypes every kernel accepts."""
    return STATE_DTYPES


def acc_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for a state dtype: float64 for float64 states, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@functools.lru_cache(maxsize=None)
def rows_pad(rows: int) -> int:
    """Power-of-two padding of a history length (``tl.arange`` needs a power of two, >= 2)."""
    return max(2, triton.next_power_of_2(max(rows, 1)))


def _pow2_floor(v: int) -> int:
    return 1 << (max(v, 1).bit_length() - 1)


@functools.lru_cache(maxsize=None)
def _plan(B: int, D: int, elem_size: int, sms: int, rows: int, tiles: int,
          forced: Optional[tuple]) -> Plan:
    R = rows_pad(rows) if rows > 0 else 1
    most_warps = 8 if R >= 32 else 4
    words = 2 if elem_size == 8 else 1
    fit = _pow2_floor(REG_BUDGET * 32 * most_warps // (tiles * R * words))
    bd = max(MIN_BLOCK_D, min(fit, MAX_BLOCK_D, triton.next_power_of_2(max(D, 1))))
    target = sms * PROGRAMS_PER_SM
    floor = min(bd, FLOOR_BLOCK_D)
    while bd > floor and B * triton.cdiv(D, bd) < target:
        bd //= 2
    chunks = max(1, min(triton.cdiv(target, B), triton.cdiv(D, bd)))
    chunk_d = triton.cdiv(triton.cdiv(D, chunks), bd) * bd
    if forced is not None:
        bd, chunk_d = forced
    chunks = max(1, triton.cdiv(D, chunk_d))
    # warps along D with 16-byte vectors where BLOCK_D allows; more where the registers need them
    along_d = max(1, min(most_warps, bd // (32 * (16 // elem_size))))
    needed = triton.next_power_of_2(triton.cdiv(tiles * R * bd * words, 32 * REG_BUDGET))
    warps = min(MAX_WARPS, max(along_d, needed))
    return Plan(grid=(B, chunks), BLOCK_D=bd, num_warps=warps, chunks=chunks, chunk_d=chunk_d,
                ROWS_PAD=R)


def plan(B: int, D: int, elem_size: int, sm_count: int = DEFAULT_SM_COUNT, rows: int = 0,
         tiles: int = 2) -> Plan:
    """The launch plan of a ``[B, D]`` kernel (pure host function; see the module docstring).

    Args:
        B, D: the state's shape.
        elem_size: bytes per state element (8 selects float64 accumulation).
        sm_count: SMs of the GPU (132 for an H100 SXM, 108 for an A100).
        rows: history rows of the kernel's tiles (``m``, ``L``; 0 for none: ``ROWS_PAD = 1``).
        tiles: live ``[ROWS_PAD, BLOCK_D]`` tiles of the kernel (its register budget).

    Example:
        >>> p = plan(1, 65536, 4, 132, rows=6)
        >>> p.grid, p.BLOCK_D, p.num_warps, p.chunk_d
        ((1, 512), 128, 1, 128)
    """
    forced = (_FORCED["block_d"], _FORCED["chunk_d"]) if _FORCED else None
    return _plan(B, D, elem_size, sm_count, rows, tiles, forced)


@contextlib.contextmanager
def forced_plan(block_d: int, chunk_d: int):
    """Within the block every plan uses ``BLOCK_D = block_d`` and ``chunk_d`` columns per program
    (a multiple of ``block_d``): several chunks and tails at small ``D``."""
    if block_d < MIN_BLOCK_D or block_d & (block_d - 1) or chunk_d % block_d:
        raise ValueError(f"block_d must be a power of two >= {MIN_BLOCK_D} dividing chunk_d, got "
                         f"block_d={block_d}, chunk_d={chunk_d}")
    old = dict(_FORCED)
    _FORCED.update(block_d=block_d, chunk_d=chunk_d)
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(old)


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """SMs of ``device``: its ``multi_processor_count`` on CUDA, else ``DEFAULT_SM_COUNT``."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return DEFAULT_SM_COUNT


_TICKETS: dict = {}


def tickets(device: torch.device, B: int) -> torch.Tensor:
    """``[>= B]`` int32 zeros: the last-arrival counters of :func:`last_arrival`, one buffer per
    (device, stream), grown when a larger batch needs more (kernels leave them at zero)."""
    key = (device, torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0)
    t = _TICKETS.get(key)
    if t is None or t.numel() < B:
        t = _TICKETS[key] = torch.zeros(max(B, 64), dtype=torch.int32, device=device)
    return t


def device_guard(device: torch.device):
    """Context that makes ``device`` current for a launch (Triton launches on the current CUDA
    device, not the tensors'); a no-op for CPU tensors under the interpreter."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


@triton.jit
def last_arrival(ticket_ptr, b, chunks):
    """True in the program that finishes last among the ``chunks`` programs of sample ``b``
    (after its partial sums are stored); it resets ``ticket[b]`` for the next launch. The barrier
    and the acquire-release ticket order every program's partial stores before the last one's
    loads."""
    tl.debug_barrier()
    last = tl.atomic_add(ticket_ptr + b, 1, sem="acq_rel", scope="gpu") == chunks - 1
    tl.debug_barrier()
    if last:
        tl.store(ticket_ptr + b, 0)
    return last


def check(name: str, t: torch.Tensor, shape: tuple, dtype: torch.dtype, device: torch.device,
          unit_inner: bool = True, contiguous: bool = False) -> None:
    """Raise ``ValueError`` naming ``name`` unless ``t`` has the expected shape/dtype/device/layout.

    ``unit_inner``: the last dimension has stride 1 (kernels index it with unit stride);
    ``contiguous``: the whole tensor is contiguous (kernels compute its inner offsets).
    """
    # fast path first: the launchers run every solver iteration
    if (isinstance(t, torch.Tensor) and t.shape == shape and t.dtype == dtype
            and t.device == device and (not contiguous or t.is_contiguous())
            and (not unit_inner or t.dim() == 0 or t.shape[-1] <= 1 or t.stride(-1) == 1)):
        return
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if t.dtype != dtype:
        raise ValueError(f"{name} must have dtype {dtype}, got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device}, got {t.device}")
    if contiguous and not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    if unit_inner and t.dim() > 0 and t.shape[-1] > 1 and t.stride(-1) != 1:
        raise ValueError(f"{name} must have unit stride in its last dimension, got {t.stride()}")


def check_state(name: str, t: torch.Tensor) -> None:
    """``t`` is a ``[B, D]`` floating state of a supported dtype."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must have shape [B, D], got {tuple(t.shape)}")
    if t.dtype not in STATE_DTYPES:
        raise ValueError(f"{name} must be float32/float64/float16/bfloat16, got {t.dtype}")


def unit_inner(t: torch.Tensor) -> torch.Tensor:
    """A read-only input with unit inner stride (a copy only when ``f`` returned a strided view)."""
    return t if (t.shape[-1] <= 1 or t.stride(-1) == 1) else t.contiguous()
