"""Per-iteration residual bookkeeping on the device (Triton): ``track_status``.

Semantics: the pure-torch reference in ``deq_fast/ops/status.py`` (this package never imports it).
O(B) work: a single program loops over the batch in ``BLOCK_B`` blocks, which also makes the
whole-batch norm and the stop-together ``any`` plain in-program reductions (no atomics, no second
launch, deterministic). Bytes: about ``(2 + 2 + 2 + 2 + 2)·B·acc_size + 2·B`` -> negligible next
to the ``O(B·D)`` passes.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import check, device_guard

__all__ = ["track_status", "block_b"]


def block_b(B: int) -> int:
    """Batch entries per loop step of the single ``track_status`` program (grid ``(1,)``)."""
    return min(1024, max(16, triton.next_power_of_2(B)))


@triton.jit(do_not_specialize=["t"])
def _track_status_kernel(sq_ptr, lowest_ptr, best_step_ptr, trace_ptr, active_ptr, improved_ptr,
                         B, t, step, tol, stop_idx, whole_batch, stop_together, always_update,
                         rel_eps, stride_sq, stride_lowest, stride_best_step, stride_trace_t,
                         stride_trace_b, BLOCK_B: tl.constexpr):
    """One program for the whole batch (``s = sq`` per sample, or summed over the batch)::

        abs = sqrt(s0);  rel = abs / (sqrt(s1) + rel_eps);  vals = [abs, rel]
        imp = active & (vals < lowest)        (active & (vals < inf) if always_update)
        lowest = where(imp, vals, lowest);  best_step = where(imp, step, best_step)
        trace[t] = where(active, vals, lowest);  improved = imp[:, stop_idx]
        keep = vals[:, stop_idx] >= tol
        active &= keep                  (per sample)   |   active &= any(active & keep)  (together)

    Shapes: ``sq, lowest, best_step [B, 2]``, ``trace [T, B, 2]`` (accumulation dtype, unit
    inner stride), ``active, improved [B]`` bool. ``sqrt`` and division are IEEE
    round-to-nearest as torch computes them (``sqrt_rn``/``div_rn`` for float32, whose defaults
    are approximate; float64 ones are IEEE already), so traces and stop decisions match the
    reference; ``step``/``tol``/``rel_eps`` arrive as float32 (Triton's float arguments).
    """
    ACC = lowest_ptr.dtype.element_ty
    offs0 = tl.arange(0, BLOCK_B)
    s0 = tl.zeros([], dtype=ACC)
    s1 = tl.zeros([], dtype=ACC)
    if whole_batch:
        a0 = tl.zeros([BLOCK_B], dtype=ACC)
        a1 = tl.zeros([BLOCK_B], dtype=ACC)
        for b0 in range(0, B, BLOCK_B):
            offs = b0 + offs0
            bm = offs < B
            a0 += tl.load(sq_ptr + offs * stride_sq, mask=bm, other=0.0)
            a1 += tl.load(sq_ptr + offs * stride_sq + 1, mask=bm, other=0.0)
        s0 = tl.sum(a0, axis=0)
        s1 = tl.sum(a1, axis=0)
    any_keep = tl.zeros([], dtype=tl.int32)
    if stop_together:
        for b0 in range(0, B, BLOCK_B):
            offs = b0 + offs0
            bm = offs < B
            q0 = tl.where(whole_batch, s0, tl.load(sq_ptr + offs * stride_sq, mask=bm, other=0.0))
            q1 = tl.where(whole_batch, s1, tl.load(sq_ptr + offs * stride_sq + 1, mask=bm,
                                                   other=0.0))
            if ACC == tl.float64:
                va = tl.sqrt(q0)
                vr = va / (tl.sqrt(q1) + rel_eps)
            else:                   # IEEE sqrt/division as torch's (fp32 defaults are approximate)
                va = tl.sqrt_rn(q0)
                vr = tl.div_rn(va, tl.sqrt_rn(q1) + rel_eps)
            v = tl.where(stop_idx == 0, va, vr)
            act = tl.load(active_ptr + offs, mask=bm, other=0) != 0
            any_keep = tl.maximum(any_keep, tl.max(tl.where(act & (v >= tol) & bm, 1, 0), axis=0))
    for b0 in range(0, B, BLOCK_B):
        offs = b0 + offs0
        bm = offs < B
        q0 = tl.where(whole_batch, s0, tl.load(sq_ptr + offs * stride_sq, mask=bm, other=0.0))
        q1 = tl.where(whole_batch, s1, tl.load(sq_ptr + offs * stride_sq + 1, mask=bm, other=0.0))
        if ACC == tl.float64:
            va = tl.sqrt(q0)
            vr = va / (tl.sqrt(q1) + rel_eps)
        else:                   # IEEE sqrt/division as torch's (fp32 defaults are approximate)
            va = tl.sqrt_rn(q0)
            vr = tl.div_rn(va, tl.sqrt_rn(q1) + rel_eps)
        act = tl.load(active_ptr + offs, mask=bm, other=0) != 0
        low0 = tl.load(lowest_ptr + offs * stride_lowest, mask=bm, other=0.0)
        low1 = tl.load(lowest_ptr + offs * stride_lowest + 1, mask=bm, other=0.0)
        i0 = act & tl.where(always_update, va < float("inf"), va < low0)
        i1 = act & tl.where(always_update, vr < float("inf"), vr < low1)
        low0 = tl.where(i0, va, low0)
        low1 = tl.where(i1, vr, low1)
        tl.store(lowest_ptr + offs * stride_lowest, low0, mask=bm)
        tl.store(lowest_ptr + offs * stride_lowest + 1, low1, mask=bm)
        stepv = tl.zeros_like(va) + step
        tl.store(best_step_ptr + offs * stride_best_step, stepv, mask=bm & i0)
        tl.store(best_step_ptr + offs * stride_best_step + 1, stepv, mask=bm & i1)
        trow = trace_ptr + t * stride_trace_t + offs * stride_trace_b
        tl.store(trow, tl.where(act, va, low0), mask=bm)
        tl.store(trow + 1, tl.where(act, vr, low1), mask=bm)
        tl.store(improved_ptr + offs, tl.where(stop_idx == 0, i0, i1), mask=bm)
        keep = tl.where(stop_together, any_keep != 0, tl.where(stop_idx == 0, va, vr) >= tol)
        tl.store(active_ptr + offs, act & keep, mask=bm)


def track_status(sq: torch.Tensor, lowest: torch.Tensor, best_step: torch.Tensor,
                 trace: torch.Tensor, active: torch.Tensor, improved: torch.Tensor, t: int,
                 step: float, tol: float, stop_idx: int, whole_batch: bool, stop_together: bool,
                 always_update: bool, rel_eps: float) -> None:
    """Residual bookkeeping of one solver iteration in one launch (in place; see the kernel).

    Args:
        sq: ``[B, 2]`` squared ``[||f(x) - x||^2, ||f(x)||^2]`` (float32/float64; any row stride).
        lowest, best_step: ``[B, 2]`` lowest abs/rel residual and its step, updated in place.
        trace: ``[T, B, 2]`` residual trace; row ``t`` is written.
        active, improved: ``[B]`` bool; ``active`` is cleared for stopped samples, ``improved``
            set where the stop-mode residual reached a new lowest.
        t: trace row, ``0 <= t < T``.
        step: step number recorded in ``best_step``.
        tol: stop tolerance (``-inf``: never stop).
        stop_idx: 0 (abs) or 1 (rel).
        whole_batch: one norm over the whole batch (locuslab).
        stop_together: stop only when every active sample is under ``tol`` (TorchDEQ).
        always_update: every finite iterate counts as an improvement (TorchDEQ ``return_final``).
        rel_eps: ``rel = abs / (||f|| + rel_eps)``.

    Returns:
        None.

    Example:
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"   # CPU: under TRITON_INTERPRET=1
        >>> B = 3; sq = torch.rand(B, 2, device=dev)
        >>> lowest = torch.full((B, 2), 1e8, device=dev)
        >>> best_step = torch.zeros(B, 2, device=dev)
        >>> trace = torch.zeros(5, B, 2, device=dev)
        >>> active = torch.ones(B, dtype=torch.bool, device=dev)
        >>> improved = torch.zeros_like(active)
        >>> track_status(sq, lowest, best_step, trace, active, improved, 0, 1.0, 1e-3, 1,
        ...              False, False, False, 1e-9)                  # improved: all True
        >>> improved.tolist(), torch.allclose(lowest[:, 0], sq[:, 0].sqrt())
        ([True, True, True], True)
    """
    if not isinstance(lowest, torch.Tensor) or lowest.dim() != 2 or lowest.shape[1] != 2:
        raise ValueError(f"lowest must be a [B, 2] tensor, got {getattr(lowest, 'shape', lowest)}")
    B, acc, dev = lowest.shape[0], lowest.dtype, lowest.device
    if acc not in (torch.float32, torch.float64):
        raise ValueError(f"lowest must be float32 or float64, got {acc}")
    check("sq", sq, (B, 2), acc, dev)
    check("lowest", lowest, (B, 2), acc, dev)
    check("best_step", best_step, (B, 2), acc, dev)
    if not isinstance(trace, torch.Tensor) or trace.dim() != 3:
        raise ValueError(f"trace must be a [T, B, 2] tensor, got {getattr(trace, 'shape', trace)}")
    check("trace", trace, (trace.shape[0], B, 2), acc, dev)
    check("active", active, (B,), torch.bool, dev)
    check("improved", improved, (B,), torch.bool, dev)
    if not 0 <= t < trace.shape[0]:
        raise ValueError(f"t must satisfy 0 <= t < T = {trace.shape[0]}, got {t}")
    if stop_idx not in (0, 1):
        raise ValueError(f"stop_idx must be 0 or 1, got {stop_idx}")
    if math.isnan(tol):
        raise ValueError("tol must not be NaN")
    with device_guard(dev):
        _track_status_kernel[(1,)](
            sq, lowest, best_step, trace, active, improved, B, t, float(step), float(tol),
            stop_idx, bool(whole_batch), bool(stop_together), bool(always_update),
            float(rel_eps), sq.stride(0), lowest.stride(0), best_step.stride(0), trace.stride(0),
            trace.stride(1), BLOCK_B=block_b(B), num_warps=4)
