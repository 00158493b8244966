"""Fused per-sample residual norms and the fixed-point advance (Triton).

With the damped map ``y = tau·fx + (1 - tau)·x`` (``y = fx`` when not ``DAMPED``):
``residual_norms``: ``sq[b] = [||y_b - x_b||^2, ||y_b||^2]``; ``fixed_point_advance``:
``best_b = y_b`` where ``improved_b``, ``x_b = y_b`` where ``active_b``. Semantics: the
pure-torch references in ``deq_fast/ops/fixed_point.py`` (this package never imports them).

Grid (:func:`launch_plan`, see ``_common.py``): ``(B, chunks)`` programs, program ``(b, c)``
owning ``chunk_d`` columns of sample ``b`` and looping over them in ``BLOCK_D`` steps, warps along
``D``. ``residual_norms`` writes per-chunk partial sums to a scratch ``[B, chunks, 2]``; the last
program of each sample to finish sums them in chunk order (deterministic, no atomics on data).
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

__all__ = ["residual_norms", "fixed_point_advance", "launch_plan"]


def launch_plan(B: int, D: int, elem_size: int, sms: int) -> Plan:
    """The plan both fixed-point launchers use for ``[B, D]`` states of ``elem_size`` bytes on a
    GPU with ``sms`` SMs (no history rows)."""
    return plan(B, D, elem_size, sms)


@triton.jit
def _residual_norms_kernel(x_ptr, fx_ptr, sq_ptr, part_ptr, ticket_ptr, D, chunk_d, chunks,
                           stride_x, stride_fx, stride_sq, stride_part, tau, DAMPED: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    """``sq[b, 0] = ||y[b] - x[b]||^2``, ``sq[b, 1] = ||y[b]||^2``, ``y`` the damped ``fx``.

    Shapes: ``x, fx [B, D]`` (state dtype), ``sq [B, 2]`` (accumulation dtype: float32, float64
    for float64 states). ``g = fx - x`` is rounded to the state dtype before squaring, as the
    reference does. Program ``(b, c)`` stores its chunk's two sums in ``part[b, c]``; the last
    program of the sample sums them in chunk order. Bytes: read x, fx -> ``2·B·D·size``
    (+ 2·B·chunks partial sums).
    """
    ACC = sq_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * chunk_d
    end = tl.minimum(start + chunk_d, D)
    cols = tl.arange(0, BLOCK_D)
    gg = tl.zeros([BLOCK_D], dtype=ACC)
    ff = tl.zeros([BLOCK_D], dtype=ACC)
    for d0 in range(start, end, BLOCK_D):
        offs = d0 + cols
        dm = offs < end
        xv = tl.load(x_ptr + b * stride_x + offs, mask=dm, other=0.0)
        fv = tl.load(fx_ptr + b * stride_fx + offs, mask=dm, other=0.0)
        if DAMPED:
            fv = _damped(fv, xv, tau, ACC)
        g = (fv.to(ACC) - xv.to(ACC)).to(fv.dtype).to(ACC)   # rounded like the reference's g
        fa = fv.to(ACC)
        gg += g * g
        ff += fa * fa
    part = part_ptr + b * stride_part + tl.program_id(1) * 2
    tl.store(part, tl.sum(gg, axis=0))
    tl.store(part + 1, tl.sum(ff, axis=0))
    if last_arrival(ticket_ptr, b, chunks):
        two = tl.arange(0, 2)
        total = tl.zeros([2], dtype=ACC)
        for c in range(0, chunks):                              # fixed order: deterministic
            total += tl.load(part_ptr + b * stride_part + c * 2 + two, cache_modifier=".cg")
        tl.store(sq_ptr + b * stride_sq + two, total)


@triton.jit
def _damped(fv, xv, tau, ACC: tl.constexpr):
    """TorchDEQ's ``tau·f + (1 - tau)·x`` in ``ACC``, rounded to the state dtype like the
    reference."""
    return (tau * fv.to(ACC) + (1.0 - tau) * xv.to(ACC)).to(xv.dtype)


@triton.jit
def _fixed_point_advance_kernel(x_ptr, fx_ptr, best_ptr, improved_ptr, active_ptr, D, chunk_d,
                                stride_x, stride_fx, stride_best, tau, DAMPED: tl.constexpr,
                                BLOCK_D: tl.constexpr):
    """``best[b] = y[b]`` if ``improved[b]``; ``x[b] = y[b]`` if ``active[b]`` (masked stores),
    ``y`` the damped ``fx``, on the columns of chunk ``program_id(1)``.

    Shapes: ``x, fx, best [B, D]`` (state dtype), ``improved, active [B]`` bool. No arithmetic
    unless damped (then ``x`` is read; each element is loaded and stored by the same thread).
    Bytes: read fx (only for samples with a flag set), write x and/or best -> at most
    ``3·B·D·size``.
    """
    b = tl.program_id(0).to(tl.int64)
    imp = tl.load(improved_ptr + b) != 0
    act = tl.load(active_ptr + b) != 0
    if imp | act:
        ACC = tl.float64 if x_ptr.dtype.element_ty == tl.float64 else tl.float32
        start = tl.program_id(1) * chunk_d
        end = tl.minimum(start + chunk_d, D)
        cols = tl.arange(0, BLOCK_D)
        for d0 in range(start, end, BLOCK_D):
            offs = d0 + cols
            dm = offs < end
            fv = tl.load(fx_ptr + b * stride_fx + offs, mask=dm, other=0.0)
            if DAMPED:
                fv = _damped(fv, tl.load(x_ptr + b * stride_x + offs, mask=dm, other=0.0), tau,
                             ACC)
            tl.store(best_ptr + b * stride_best + offs, fv, mask=dm & imp)
            tl.store(x_ptr + b * stride_x + offs, fv, mask=dm & act)


def _plan_for(x: torch.Tensor) -> Plan:
    return launch_plan(x.shape[0], x.shape[1], x.element_size(), sm_count(x.device))


def residual_norms(x: torch.Tensor, fx: torch.Tensor, sq: torch.Tensor, tau: float = 1.0) -> None:
    """Per-sample squared residual and ``f`` norms, in place into ``sq``.

    Args:
        x: ``[B, D]`` current iterate (float32/float64/float16/bfloat16).
        fx: ``[B, D]`` ``f(x)``, same dtype as ``x``.
        sq: ``[B, 2]`` output, float32 (float64 for float64 states); row stride free, unit inner.
        tau: damping; the norms are those of ``tau·fx + (1 - tau)·x``.

    Returns:
        None (``sq[:, 0] = ||fx - x||^2``, ``sq[:, 1] = ||fx||^2``).

    Example:
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"   # CPU: under TRITON_INTERPRET=1
        >>> x, fx = torch.randn(3, 37, device=dev), torch.randn(3, 37, device=dev)
        >>> sq = torch.empty(3, 2, device=dev); residual_norms(x, fx, sq)       # sq: [3, 2]
        >>> torch.allclose(sq[:, 0], (fx - x).square().sum(1)), torch.allclose(sq[:, 1], fx.square().sum(1))
        (True, True)
    """
    check_state("x", x)
    B, D = x.shape
    check("fx", fx, (B, D), x.dtype, x.device, unit_inner=False)
    check("sq", sq, (B, 2), acc_dtype_of(x.dtype), x.device)
    x, fx = unit_inner(x), unit_inner(fx)
    p = _plan_for(x)
    part = torch.empty(B, p.chunks, 2, dtype=sq.dtype, device=x.device)
    with device_guard(x.device):
        _residual_norms_kernel[p.grid](
            x, fx, sq, part, tickets(x.device, B), D, p.chunk_d, p.chunks, x.stride(0),
            fx.stride(0), sq.stride(0), part.stride(0), float(tau), DAMPED=tau != 1.0,
            BLOCK_D=p.BLOCK_D, num_warps=p.num_warps)


def fixed_point_advance(x: torch.Tensor, fx: torch.Tensor, best: torch.Tensor,
                        improved: torch.Tensor, active: torch.Tensor, tau: float = 1.0) -> None:
    """In place: ``best = fx`` where ``improved``; ``x = fx`` where ``active`` (per sample).

    Args:
        x: ``[B, D]`` iterate, updated in place (unit inner stride).
        fx: ``[B, D]`` the (damped) ``f(x)``, same dtype.
        best: ``[B, D]`` best-so-far estimate, updated in place.
        improved, active: ``[B]`` bool flags.
        tau: damping; ``y = tau·fx + (1 - tau)·x`` is what is stored.

    Returns:
        None.

    Example:
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"   # CPU: under TRITON_INTERPRET=1
        >>> x, fx, best = (torch.randn(2, 130, device=dev) for _ in range(3))
        >>> x_old, best_old = x.clone(), best.clone()
        >>> flags = torch.tensor([True, False], device=dev)
        >>> fixed_point_advance(x, fx, best, flags, flags)       # row 0 of x and best <- fx
        >>> torch.equal(x[0], fx[0]), torch.equal(best[0], fx[0]), torch.equal(x[1], x_old[1])
        (True, True, True)
    """
    check_state("x", x)
    B, D = x.shape
    check("x", x, (B, D), x.dtype, x.device)
    check("fx", fx, (B, D), x.dtype, x.device, unit_inner=False)
    check("best", best, (B, D), x.dtype, x.device)
    check("improved", improved, (B,), torch.bool, x.device)
    check("active", active, (B,), torch.bool, x.device)
    fx = unit_inner(fx)
    p = _plan_for(x)
    with device_guard(x.device):
        _fixed_point_advance_kernel[p.grid](
            x, fx, best, improved, active, D, p.chunk_d, x.stride(0), fx.stride(0),
            best.stride(0), float(tau), DAMPED=tau != 1.0, BLOCK_D=p.BLOCK_D,
            num_warps=p.num_warps)
