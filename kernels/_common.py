"""Host-side helpers shared by the launchers: block sizes and boundary checks (no device work)."""
from __future__ import annotations

import functools

import torch
import triton

__all__ = ["block_d", "rows_pad", "check", "check_state", "unit_inner", "state_dtypes",
           "acc_dtype_of"]

# A program keeps at most a [ROWS_PAD, BLOCK_D] tile per operand in registers: 4096 elements over
# 4 warps is 32 registers per thread and operand, which leaves room for two tiles plus accumulators.
MAX_TILE = 4096
MAX_BLOCK_D = 1024
MIN_BLOCK_D = 16

STATE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


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


@functools.lru_cache(maxsize=None)
def block_d(D: int, rows: int = 1) -> int:
    """Chunk of the feature dimension one loop iteration of a program covers."""
    return max(MIN_BLOCK_D, min(triton.next_power_of_2(max(D, 1)), MAX_BLOCK_D, MAX_TILE // rows))


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
