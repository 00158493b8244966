"""Backtracking Armijo line search along a Broyden step, as locuslab/deq and TorchDEQ do it
(``ls=True``), after scipy's ``scalar_search_armijo``.

Along the proposed step ``upd`` from ``x_old``, with ``phi(s) = ||g(x_old + s·upd)||^2`` over the
whole batch (both originals use one batch norm here, also TorchDEQ, whose other norms are per
sample) and ``phi'(0) = -phi(0)``, accept the first ``s`` with

    phi(s) <= phi(0) + c1·s·phi'(0)                                   (Armijo, c1 = 1e-4)

trying ``s = 1``, then the minimiser of the quadratic through ``phi(0), phi'(0), phi(1)``, then
cubic interpolants through the last two trials (halving when the cubic step is too large or too
small), until ``s < amin = 0.01``: the search failed and the full step ``s = 1`` is taken.

The search is host-driven (every trial compares Python floats), like the originals: ``ls=True``
trades the no-sync loop for robustness on hard problems.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

__all__ = ["armijo_search", "search_step"]


def _cubic_step(s0: float, s1: float, phi0: float, dphi0: float, phi_s0: float, phi_s1: float
                ) -> float:
    """Minimiser of the cubic through ``phi(0), phi'(0), phi(s0), phi(s1)``."""
    factor = s0 ** 2 * s1 ** 2 * (s1 - s0)
    r1, r0 = phi_s1 - phi0 - dphi0 * s1, phi_s0 - phi0 - dphi0 * s0
    a = (s0 ** 2 * r1 - s1 ** 2 * r0) / factor
    b = (-s0 ** 3 * r1 + s1 ** 3 * r0) / factor
    return (-b + math.sqrt(abs(b * b - 3 * a * dphi0))) / (3 * a)


def armijo_search(phi: Callable[[float], float], phi0: float, dphi0: float, c1: float = 1e-4,
                  alpha0: float = 1.0, amin: float = 0.0) -> tuple[Optional[float], float, int]:
    """Backtracking search for the Armijo condition (see the module docstring).

    Args:
        phi: the merit function of the step size; phi0, dphi0: ``phi(0)`` and ``phi'(0) < 0``.
        c1: Armijo constant; alpha0: first trial; amin: give up below this step size.

    Returns:
        ``(s, phi(s), cubic_trials)``; ``s`` is ``None`` when the search failed.

    Example:
        >>> armijo_search(lambda s: (1 - s) ** 2, 1.0, -2.0)[0]      # s = 1 satisfies Armijo
        1.0
    """
    s0, phi_s0 = alpha0, phi(alpha0)
    if phi_s0 <= phi0 + c1 * s0 * dphi0:
        return s0, phi_s0, 0
    s1 = -dphi0 * s0 ** 2 / 2.0 / (phi_s0 - phi0 - dphi0 * s0)
    phi_s1 = phi(s1)
    trials = 0
    while s1 > amin:
        try:
            s2 = _cubic_step(s0, s1, phi0, dphi0, phi_s0, phi_s1)
        except (ZeroDivisionError, OverflowError, ValueError):
            s2 = s1 / 2.0
        phi_s2 = phi(s2)
        trials += 1
        if phi_s2 <= phi0 + c1 * s2 * dphi0:
            return s2, phi_s2, trials
        if (s1 - s2) > s1 / 2.0 or (1 - s2 / s1) < 0.96:
            s2 = s1 / 2.0
        s0, s1, phi_s0, phi_s1 = s1, s2, phi_s1, phi_s2
    return None, phi_s1, trials


def _sq_norm(g: torch.Tensor) -> float:
    value = float(torch.linalg.vector_norm(g, dtype=torch.float64) ** 2)
    return value if math.isfinite(value) else math.inf


def search_step(evaluate: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                fx: torch.Tensor, dx: torch.Tensor, phi0: float) -> torch.Tensor:
    """Line search on a step already taken: ``x = x_old + dx`` with ``fx = f(x)`` evaluated.

    Moves ``x`` to ``x_old + s·dx`` and scales ``dx`` by ``s`` in place; returns ``f`` at the new
    ``x``. ``evaluate`` is the (counted) map; ``phi0 = ||f(x_old) - x_old||^2`` (whole batch).
    """
    upd = dx.clone()
    x_old = x - upd
    last = {"s": 1.0, "fx": fx, "phi": _sq_norm(fx - x)}

    def phi(s: float) -> float:
        if s != last["s"]:
            xs = torch.add(x_old, upd, alpha=s)
            fxs = evaluate(xs)
            last.update(s=s, fx=fxs, phi=_sq_norm(fxs - xs))
        return last["phi"]

    s = armijo_search(phi, phi0, -phi0, amin=1e-2)[0]
    s = 1.0 if s is None else s
    if s == 1.0 and last["s"] != 1.0:
        fx = evaluate(torch.add(x_old, upd))                 # the originals evaluate again here
    elif s == last["s"]:
        fx = last["fx"]
    if s != 1.0:
        torch.add(x_old, upd, alpha=s, out=x)
        dx.mul_(s)
    return fx
