"""The fused fixed-point step (Triton): one pass per iteration over ``x`` and ``f(x)``.

With the damped map ``y = tau·fx + (1 - tau)·x`` (``y = fx`` when not ``DAMPED``), per sample
``b``: ``best_b = x_b`` where ``improved_b`` (the previous iteration's deferred best copy),
``sq[b] = [||y_b - x_b||^2, ||y_b||^2]``, ``x_b = y_b`` where ``active_b``. Semantics: the
pure-torch reference in ``deq_fast/ops/fixed_point.py`` (this package never imports it).

Grid (:func:`launch_plan`, see ``_common.py``): ``(B, chunks)`` programs, program ``(b, c)``
owning ``chunk_d`` columns of sample ``b`` and looping over them in ``BLOCK_D`` steps, warps along
``D``, every step's loads issued before its stores. Each program writes its two partial sums to a
scratch ``[B, chunks, 2]``; the last program of each sample to finish sums them in chunk order
(deterministic, no atomics on data).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    Plan,
    acc_dtype_of,
    check,
    check_state,
    device_guard,
    last_arrival,
    plan,
    sm_count,
    tickets,
    unit_inner,
)

__all__ = ["fixed_point_step", "launch_plan"]


def launch_plan(B: int, D: int, elem_size: int, sms: int) -> Plan:
    """The plan of :func:`fixed_point_step` for ``[B, D]`` states of ``elem_size`` bytes on a
    GPU with ``sms`` SMs (no history rows)."""
    return plan(B, D, elem_size, sms)


@triton.jit
def _damped(fv, xv, tau, ACC: tl.constexpr):
    """TorchDEQ's ``tau·f + (1 - tau)·x`` in ``ACC``, rounded to the state dtype like the
    reference."""
    return (tau * fv.to(ACC) + (1.0 - tau) * xv.to(ACC)).to(xv.dtype)


@triton.jit
def _fixed_point_step_kernel(x_ptr, fx_ptr, best_ptr, sq_ptr, improved_ptr, active_ptr, part_ptr,
                             ticket_ptr, D, chunk_d, chunks, stride_x, stride_fx, stride_best,
                             stride_sq, stride_part, tau, DAMPED: tl.constexpr,
                             BLOCK_D: tl.constexpr):
    """``best[b] = x[b]`` if ``improved[b]``; ``sq[b] = [||y[b] - x[b]||^2, ||y[b]||^2]``;
    ``x[b] = y[b]`` if ``active[b]`` (masked stores), ``y`` the damped ``fx``.

    Shapes: ``x, fx, best [B, D]`` (state dtype), ``sq [B, 2]`` (accumulation dtype: float32,
    float64 for float64 states), ``improved, active [B]`` bool. ``g = y - x`` is rounded to the
    state dtype before squaring, as the reference does; each element is loaded and stored by the
    same thread (``fx`` may alias ``x``). Program ``(b, c)`` stores its chunk's two sums in
    ``part[b, c]``; the last program of the sample sums them in chunk order. Bytes: read x, fx,
    write x (active samples) -> ``3·B·D·size``, + ``B·D·size`` written for improved samples
    (+ 2·B·chunks partial sums). ``tau`` arrives as float32 (Triton's float arguments; the
    interpreter keeps it float64): a damped float64 solve on a GPU iterates with ``fp32(tau)``,
    a relative change of the damping below 6e-8 that leaves the fixed point where it is.
    """
    ACC = sq_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    imp = tl.load(improved_ptr + b) != 0
    act = tl.load(active_ptr + b) != 0
    start = tl.program_id(1) * chunk_d
    end = tl.minimum(start + chunk_d, D)
    cols = tl.arange(0, BLOCK_D)
    gg = tl.zeros([BLOCK_D], dtype=ACC)
    yy = tl.zeros([BLOCK_D], dtype=ACC)
    for d0 in range(start, end, BLOCK_D):
        offs = d0 + cols
        dm = offs < end
        xv = tl.load(x_ptr + b * stride_x + offs, mask=dm, other=0.0)
        yv = tl.load(fx_ptr + b * stride_fx + offs, mask=dm, other=0.0)
        if DAMPED:
            yv = _damped(yv, xv, tau, ACC)
        g = (yv.to(ACC) - xv.to(ACC)).to(yv.dtype).to(ACC)   # rounded like the reference's g
        ya = yv.to(ACC)
        gg += g * g
        yy += ya * ya
        tl.store(best_ptr + b * stride_best + offs, xv, mask=dm & imp)
        tl.store(x_ptr + b * stride_x + offs, yv, mask=dm & act)
    part = part_ptr + b * stride_part + tl.program_id(1) * 2
    tl.store(part, tl.sum(gg, axis=0))
    tl.store(part + 1, tl.sum(yy, axis=0))
    if last_arrival(ticket_ptr, b, chunks):
        two = tl.arange(0, 2)
        total = tl.zeros([2], dtype=ACC)
        for c in range(0, chunks):                              # fixed order: deterministic
            total += tl.load(part_ptr + b * stride_part + c * 2 + two, cache_modifier=".cg")
        tl.store(sq_ptr + b * stride_sq + two, total)


def fixed_point_step(x: torch.Tensor, fx: torch.Tensor, best: torch.Tensor, sq: torch.Tensor,
                     improved: torch.Tensor, active: torch.Tensor, tau: float = 1.0) -> None:
    """One fixed-point iteration's pass, in place: ``best = x`` where ``improved``; the squared
    residual and ``y`` norms into ``sq``; ``x = y`` where ``active`` (per sample).

    Args:
        x: ``[B, D]`` iterate (float32/float64/float16/bfloat16), updated in place (unit inner
            stride).
        fx: ``[B, D]`` ``f(x)``, same dtype as ``x``.
        best: ``[B, D]`` best-so-far estimate, updated in place (the deferred copy of ``x``).
        sq: ``[B, 2]`` output, float32 (float64 for float64 states); row stride free, unit inner.
        improved, active: ``[B]`` bool flags.
        tau: damping; ``y = tau·fx + (1 - tau)·x``.

    Returns:
        None (``sq[:, 0] = ||y - x||^2``, ``sq[:, 1] = ||y||^2``).

    Example:
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"   # CPU: under TRITON_INTERPRET=1
        >>> x, fx, best = (torch.randn(2, 130, device=dev) for _ in range(3))
        >>> x_old, sq = x.clone(), torch.empty(2, 2, device=dev)
        >>> flags = torch.tensor([True, False], device=dev)
        >>> fixed_point_step(x, fx, best, sq, flags, flags)   # row 0: best <- x_old, x <- fx
        >>> torch.equal(best[0], x_old[0]), torch.equal(x[0], fx[0]), torch.equal(x[1], x_old[1])
        (True, True, True)
        >>> torch.allclose(sq[:, 0], (fx - x_old).square().sum(1))
        True
    """
    check_state("x", x)
    B, D = x.shape
    check("x", x, (B, D), x.dtype, x.device)
    check("fx", fx, (B, D), x.dtype, x.device, unit_inner=False)
    check("best", best, (B, D), x.dtype, x.device)
    check("sq", sq, (B, 2), acc_dtype_of(x.dtype), x.device)
    check("improved", improved, (B,), torch.bool, x.device)
    check("active", active, (B,), torch.bool, x.device)
    fx = unit_inner(fx)
    p = launch_plan(B, D, x.element_size(), sm_count(x.device))
    part = torch.empty(B, p.chunks, 2, dtype=sq.dtype, device=x.device)
    with device_guard(x.device):
        _fixed_point_step_kernel[p.grid](
            x, fx, best, sq, improved, active, part, tickets(x.device, B), D, p.chunk_d, p.chunks,
            x.stride(0), fx.stride(0), best.stride(0), sq.stride(0), part.stride(0), float(tau),
            DAMPED=tau != 1.0, BLOCK_D=p.BLOCK_D, num_warps=p.num_warps)
