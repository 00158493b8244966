"""The Python reference loop of the implicit backward: the oracle and the fallback of the C++ loop.

:func:`python_solve` is the pure-Python twin of ``backward_solve`` in ``csrc/backward/loop.cpp``: same
arguments, same algorithms, same stopping points and results. Its per-iteration steps are the
op references of :mod:`deq_fast.ops.backward`; the VJPs go through autograd.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from deq_fast.ops.backward import (
    bwd_anderson_mix_reference,
    bwd_broyden_step_reference,
    bwd_gmres_arnoldi_reference,
    bwd_gmres_start_reference,
    bwd_gmres_update_reference,
    bwd_masked_add_reference,
    bwd_track_reference,
)

__all__ = ["python_solve"]


def _vjp(fz: torch.Tensor, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = torch.autograd.grad(fz, z, v.to(fz.dtype), retain_graph=True, allow_unused=True)[0]
    if out is None:
        return torch.zeros_like(v)
    return out.to(v.dtype).contiguous()


@dataclass
class _Loop:
    """The state every method shares: the system, the iterate ``x``, its residual ``r``, the
    best iterate per sample, the active flags, and the VJP / host-sync counters."""

    fz: torch.Tensor
    z: torch.Tensor
    grad: torch.Tensor
    inv_gnorm: torch.Tensor
    tol: float
    x: torch.Tensor
    r: torch.Tensor
    best_x: torch.Tensor
    best_rel: torch.Tensor
    active: torch.Tensor
    free: bool                 # the next measurement is of the zero start (J^T 0 = 0, no VJP)
    nvjp: int = 0
    nsync: int = 0
    start_rel: torch.Tensor | None = None

    def vjp(self, v: torch.Tensor) -> torch.Tensor:
        self.nvjp += 1
        return _vjp(self.fz, self.z, v)

    def any_active(self, flags: torch.Tensor) -> bool:
        self.nsync += 1
        return bool(flags.any())

    def measure(self) -> None:
        """Residual of ``x``; best iterate and convergence flags updated."""
        zero_start = self.free
        jtx = torch.zeros_like(self.x) if zero_start else self.vjp(self.x)
        self.free = False
        bwd_track_reference(self.x, jtx, self.grad, self.inv_gnorm, self.r, self.best_x,
                            self.best_rel, self.active, self.tol)
        if zero_start:  # the zero start is a fallback only (see the C++ loop)
            self.start_rel = self.best_rel.clone()
            self.best_rel.masked_fill_(self.active, math.inf)


def _stationary_step(method: str, hist: int, m: int, lam: float):
    """The per-iteration update of fixed point / Anderson / Broyden, as ``step(loop, k)``."""
    if method == "fixed_point":
        return lambda lp, k: bwd_masked_add_reference(lp.x, lp.r, lp.active)
    if method == "anderson":
        buf: dict = {}

        def anderson(lp: _Loop, k: int) -> None:
            if not buf:
                B, D = lp.grad.shape
                buf["F"] = lp.grad.new_zeros(m, B, D)
                buf["G"] = lp.grad.new_zeros(m, B, D)
                buf["gram"] = torch.zeros(B, m, m, dtype=torch.float64, device=lp.grad.device)
            bwd_anderson_mix_reference(lp.x, lp.r, buf["F"], buf["G"], buf["gram"], lp.active,
                                       k % m, min(k + 1, m), lam)
        return anderson
    bufs: dict = {}

    def broyden(lp: _Loop, k: int) -> None:
        if not bufs:
            B, D = lp.grad.shape
            bufs.update(U=lp.grad.new_zeros(hist, B, D), V=lp.grad.new_zeros(hist, B, D),
                        r_prev=torch.zeros_like(lp.grad), dx=torch.zeros_like(lp.grad))
        slot = -1 if k == 0 else (k - 1) % hist
        bwd_broyden_step_reference(lp.x, lp.r, bufs["r_prev"], bufs["dx"], bufs["U"], bufs["V"],
                                   lp.active, 0 if k == 0 else (k - 1) % hist, slot)
    return broyden


def _stationary_loop(lp: _Loop, step, max_iter: int, check_every: int, zero_init: bool) -> None:
    k = 0
    while True:
        if lp.nvjp >= max_iter and not lp.free:
            break
        lp.measure()
        step(lp, k)
        look = (k + 1) % check_every == 0 or (k == 0 and not zero_init)
        if look and not lp.any_active(lp.active):
            break
        k += 1


def _gmres_loop(lp: _Loop, max_iter: int, restart: int, check_every: int) -> None:
    B, D = lp.grad.shape
    dopt = dict(dtype=torch.float64, device=lp.grad.device)
    Q = lp.grad.new_zeros(restart + 1, B, D)
    R = torch.zeros(B, restart, restart + 1, **dopt)
    cs, sn = torch.zeros(B, restart, **dopt), torch.zeros(B, restart, **dopt)
    s = torch.zeros(B, restart + 1, **dopt)
    kdim = torch.zeros(B, dtype=torch.long, device=lp.grad.device)
    cyc = torch.zeros(B, dtype=torch.bool, device=lp.grad.device)
    while True:
        lp.measure()
        if lp.nvjp >= max_iter - 1 or not lp.any_active(lp.active):
            break
        bwd_gmres_start_reference(lp.r, lp.active, Q, s, kdim, cyc)
        for j in range(restart):
            if lp.nvjp >= max_iter - 1:
                break
            jtq = lp.vjp(Q[j])
            bwd_gmres_arnoldi_reference(jtq, Q, R, cs, sn, s, kdim, cyc, lp.inv_gnorm, j, lp.tol)
            if (j + 1) % check_every == 0 and j + 1 < restart and not lp.any_active(cyc):
                break
        bwd_gmres_update_reference(lp.x, Q, R, s, kdim)


def python_solve(fz: torch.Tensor, z: torch.Tensor, grad: torch.Tensor, inv_gnorm: torch.Tensor,
                 active0: torch.Tensor, x0: torch.Tensor, zero_init: bool, method: str,
                 max_iter: int, tol: float, m: int, lam: float, restart: int,
                 check_every: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Pure-Python twin of ``backward_solve`` in csrc/backward/loop.cpp (same arguments and results).

    Args:
        fz, z: ``[B, D]`` output and input of the tracked ``f`` evaluation (VJPs ``J^T v``).
        grad: ``[B, D]`` right-hand side (finite rows); ``inv_gnorm``: ``[B]`` float64
            ``1 / ||grad||`` (0 where ``grad`` is zero or not finite).
        active0: ``[B]`` bool, the samples to solve; ``x0``: ``[B, D]`` start;
            ``zero_init``: whether ``x0`` is the zero start (its residual costs no VJP).
        method: ``"fixed_point"``, ``"anderson"``, ``"broyden"`` or ``"gmres"``.
        max_iter, tol, m, lam, restart, check_every: as :func:`implicit_backward`.

    Returns:
        ``(best_x [B, D], best_rel [B] float64, nvjp, nsync)``.
    """
    B = grad.shape[0]
    lp = _Loop(fz=fz, z=z, grad=grad, inv_gnorm=inv_gnorm, tol=tol, x=x0.clone(),
               r=torch.zeros_like(grad), best_x=x0.clone(),
               best_rel=torch.full((B,), math.inf, dtype=torch.float64, device=grad.device),
               active=active0.clone(), free=zero_init)
    if method in ("fixed_point", "anderson", "broyden"):
        hist = min(restart, max_iter) if method == "broyden" else m
        _stationary_loop(lp, _stationary_step(method, hist, m, lam), max_iter, check_every,
                         zero_init)
    elif method == "gmres":
        _gmres_loop(lp, max_iter, restart, check_every)
    else:
        raise ValueError(f"method must be one of fixed_point, anderson, broyden, gmres; "
                         f"got {method!r}")
    best_rel = lp.best_rel
    if lp.start_rel is not None:  # no finite iterate after the zero start: best_x is zero
        best_rel = torch.where(torch.isinf(best_rel), lp.start_rel, best_rel)
    return lp.best_x, best_rel, lp.nvjp, lp.nsync
