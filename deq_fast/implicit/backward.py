"""The backward linear solve of implicit differentiation.

A DEQ layer returns ``z* = f(z*)``; its backward receives ``grad = dL/dz*`` and needs the solution
``g`` of the linear system, per sample,

    g = grad + J^T g          (J = d f / d z at z*),  i.e.  (I - J^T) g = grad,

after which ``g`` is back-propagated through one tracked ``f(z*)`` into the parameters and the
input. ``J^T v`` is a vector-Jacobian product (VJP) through the autograd graph of that ``f(z*)``.
:func:`implicit_backward` solves it with one of several methods; the iteration loop runs in C++
(``deq_fast._C.backward_solve``, VJPs through the autograd engine, per-sample state updates as the
registered ops ``deq_fast::bwd_*``) or, as the oracle and the fallback, in the Python loop of this
module, which implements the same algorithms with plain torch operations.

Methods (``J^T v`` = one VJP ``torch.autograd.grad(fz, z, v, retain_graph=True)``):

* ``"fixed_point"``: ``g <- grad + J^T g`` (TorchDEQ's backward).
* ``"anderson"``: Anderson acceleration (window ``m``) on ``T(g) = grad + J^T g``, per sample,
  ridge ``lam * trace(Gram) / n`` scaled to the Gram matrix (an absolute ridge stalls Anderson
  once residuals are small, docs/contracts.md#torchdeq-solvers); a degenerate least-squares system
  (e.g. an all-zero
  Gram matrix) mixes one-hot at the newest entry, as the forward Anderson does.
* ``"broyden"``: good Broyden on ``r(g) = T(g) - g`` with inverse estimate
  ``H = -I + U V^T``; memory ``min(restart, max_iter)`` pairs, restarted (``H = -I``) when
  full (a ring buffer that drops only the oldest pair stalls at spectral radius 0.95).
* ``"gmres"``: restarted GMRES(``restart``) on ``(I - J^T) g = grad``, per sample.
* ``"shine"``: no iterations: ``g = -H^T grad = grad - sum_l V_l <U_l, grad>`` from the
  forward Broyden factors ``H = -I + sum_l U_l V_l^T ≈ (J - I)^{-1}`` (0 VJPs).
* ``"auto"``: :data:`DEFAULT_METHOD` (restarted GMRES, the fewest VJPs to 1e-8 on problems
  with spectral radius 0.9-0.95; numbers in the comment above :data:`DEFAULT_METHOD`).

Start: ``init`` if given, else ``shine_apply(grad, *factors)`` if ``factors`` is given
(SHINE-style warm start), else zero (whose image ``T(0) = grad`` costs no VJP).

Stopping: per sample when ``||grad + J^T g - g|| / ||grad|| <= tol`` (measured; GMRES also
stops a restart cycle on its tracked estimate and then measures). Converged samples freeze.
The host reads a device flag every ``check_every`` iterations (GMRES: also once per cycle;
a warm start: also after its first measurement), never per iteration.
At most ``max_iter`` VJPs.

The registered ops ``deq_fast::bwd_*`` and their pure-torch references are
:mod:`deq_fast.ops.backward`; the Python loop is :mod:`deq_fast.implicit.reference`. This module is
the API: validation, start, backend choice, and the fake (shape-only) kernels of the ops.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from deq_fast.implicit.reference import python_solve
from deq_fast.ops import backends, extension
from deq_fast.ops.backward import MAX_HISTORY
from deq_fast.ops.dtypes import acc_dtype

__all__ = ["implicit_backward", "METHODS", "DEFAULT_METHOD", "shine_apply"]

METHODS = ("auto", "fixed_point", "anderson", "broyden", "gmres", "shine")

#: The method ``"auto"`` resolves to: restarted GMRES. Measured with
#: ``python benchmarks/bench_backward.py`` (float64, B=8, D=1024, f(z) = tanh(W z + b), spectral
#: radius of J 0.90 / 0.95, relative residual 1e-8, zero start, C++ loop, defaults m=6,
#: restart=20; torchdeq run as its ift=True backward does, same tolerance):
#:
#:   ===========================  ============  ============
#:   VJPs to rel. residual 1e-8   rho = 0.90    rho = 0.95
#:   ===========================  ============  ============
#:   deq_fast fixed_point              155           307
#:   deq_fast anderson                  31            67
#:   deq_fast broyden                   31            47
#:   deq_fast gmres (default)           26            42
#:   torchdeq fixed_point_iter         154           306
#:   torchdeq anderson                 230    600 (cap, 3e-8)
#:   ===========================  ============  ============
#:
#: Same ranking at B=32, D=4096 (gmres 26 / 42, anderson 27 / 67, broyden 31 / 47, fixed_point
#: 151 / 299; torchdeq fixed_point_iter 150 / 298, anderson 206 / 600 capped).
#:
#: GMRES needs the fewest VJPs because on a linear system it minimises the residual over the
#: whole Krylov space at every step; Anderson (a window of m residuals) and Broyden (secant
#: updates) approach that, plain iteration converges like rho^k. Its extra work per step (one
#: Gram-Schmidt pass over at most ``restart`` vectors) is small next to a VJP, and it is
#: parameter-free apart from ``restart``. Wall time in the same run: 0.02x (rho 0.95) of
#: torchdeq's Anderson backward, whose absolute ridge makes it degrade to damped iteration.
DEFAULT_METHOD = "gmres"

def _cpp_module():
    """The extension module when it provides ``backward_solve`` (and its ops), else None."""
    if not extension.available():
        return None
    module = extension.load()
    if module is None or not hasattr(module, "backward_solve"):
        return None
    return module


def resolve_backend(backend: Optional[str], device: torch.device) -> str:
    """The backward loop for state on ``device``: ``"cpp"`` or ``"reference"`` (one vocabulary
    with the forward solvers, :mod:`deq_fast.ops.backends`; ``"python"`` is accepted for
    ``"reference"``, ``None`` reads ``$DEQ_FAST_BACKEND``).

    Raises:
        ValueError: unknown backend name.
        RuntimeError: ``"cpp"`` forced but ``deq_fast._C`` (with ``backward_solve``) is not loaded
            or the device is neither CPU nor CUDA.
    """
    missing = None if _cpp_module() is not None else (
        "deq_fast._C has no backward_solve: its module init must call register_backward_bindings "
        "(csrc/include/deq_fast/module.h); rebuild the extension")
    return backends.resolve_backward_backend(device, backend, loop_missing=missing)


# ---------------------------------------------------------------------------------------------
# public entry point
# ---------------------------------------------------------------------------------------------
def shine_apply(grad: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """SHINE estimate ``(I - J)^{-T} grad ≈ -H^T grad = grad - sum_l V[:, l] <U[:, l], grad>``.

    ``H = -I + sum_l U[:, l] V[:, l]^T ≈ (J - I)^{-1}`` is the forward Broyden solver's
    inverse-Jacobian estimate.

    Args:
        grad: ``[B, D]``.
        U, V: ``[B, L, D]`` Broyden factors.

    Returns:
        ``[B, D]`` tensor, ``grad``'s dtype.

    Example:
        >>> g = torch.randn(2, 5); U = torch.zeros(2, 3, 5); V = torch.zeros(2, 3, 5)
        >>> torch.equal(shine_apply(g, U, V), g)
        True
    """
    acc = acc_dtype(grad.dtype)
    coef = torch.einsum("bld,bd->bl", U.to(acc), grad.to(acc))
    return (grad.to(acc) - torch.einsum("bl,bld->bd", coef, V.to(acc))).to(grad.dtype)


def _validate_tensors(fz, z, grad, method):
    if not isinstance(z, torch.Tensor) or z.dim() != 2:
        raise ValueError(f"z must be a 2-D tensor [B, D], got {getattr(z, 'shape', type(z))}")
    if not isinstance(fz, torch.Tensor) or fz.shape != z.shape:
        raise ValueError(f"fz must be a tensor of z's shape {tuple(z.shape)}, "
                         f"got {getattr(fz, 'shape', type(fz))}")
    if not isinstance(grad, torch.Tensor) or grad.shape != z.shape:
        raise ValueError(f"grad must be a tensor of z's shape {tuple(z.shape)}, "
                         f"got {getattr(grad, 'shape', type(grad))}")
    if grad.device != z.device or fz.device != z.device:
        raise ValueError(f"fz, z and grad must be on one device, got {fz.device}, {z.device}, "
                         f"{grad.device}")
    if not grad.is_floating_point():
        raise ValueError(f"grad must be a floating-point tensor, got {grad.dtype}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method != "shine" and not (z.requires_grad and fz.requires_grad):
        raise ValueError("z must require grad and fz must be computed from it with autograd "
                         "recording (fz.requires_grad is False)")


def _validate_options(max_iter, tol, m, lam, restart, check_every):
    if not isinstance(max_iter, int) or max_iter < 1:
        raise ValueError(f"max_iter must be an int >= 1, got {max_iter!r}")
    if not (isinstance(tol, (int, float)) and tol >= 0):
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    if not isinstance(m, int) or not 1 <= m <= MAX_HISTORY:
        raise ValueError(f"m must be an int in [1, {MAX_HISTORY}], got {m!r}")
    if not (isinstance(lam, (int, float)) and lam >= 0):
        raise ValueError(f"lam must be a number >= 0, got {lam!r}")
    if not isinstance(restart, int) or not 1 <= restart <= MAX_HISTORY:
        raise ValueError(f"restart must be an int in [1, {MAX_HISTORY}], got {restart!r}")
    if not isinstance(check_every, int) or check_every < 1:
        raise ValueError(f"check_every must be an int >= 1, got {check_every!r}")


def _validate_start(z, method, init, factors):
    if init is not None and (not isinstance(init, torch.Tensor) or init.shape != z.shape):
        raise ValueError(f"init must be None or a tensor of shape {tuple(z.shape)}, "
                         f"got {getattr(init, 'shape', type(init))}")
    if factors is not None:
        if not (isinstance(factors, (tuple, list)) and len(factors) == 2):
            raise ValueError("factors must be None or a pair (U, V) of [B, L, D] tensors")
        U, V = factors
        B, D = z.shape
        for name, t in (("U", U), ("V", V)):
            if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[0] != B or t.shape[2] != D:
                raise ValueError(f"factors {name} must be a [B={B}, L, D={D}] tensor, "
                                 f"got {getattr(t, 'shape', type(t))}")
        if U.shape != V.shape:
            raise ValueError(f"factors U and V must have one shape, got {tuple(U.shape)} and "
                             f"{tuple(V.shape)}")
    if method == "shine" and factors is None:
        raise ValueError("method='shine' needs factors=(U, V) from the forward Broyden solver")


def implicit_backward(fz: torch.Tensor, z: torch.Tensor, grad: torch.Tensor, method: str = "auto",
                      max_iter: int = 50, tol: float = 1e-8, init: torch.Tensor | None = None,
                      factors: tuple[torch.Tensor, torch.Tensor] | None = None, m: int = 6,
                      lam: float = 1e-4, restart: int = 20, check_every: int = 4,
                      backend: Optional[str] = None) -> tuple[torch.Tensor, dict]:
    """Solve ``g = grad + J^T g`` per sample, ``J = d fz / d z``, by VJPs through autograd.

    Methods, start and stopping rule: see the module docstring. The result is each sample's
    lowest-residual measured iterate (finite whenever a finite iterate was seen); a sample whose
    ``grad`` is non-finite gets NaN and ``converged=False``; a zero ``grad`` gives ``g = 0``.

    Args:
        fz: ``[B, D]`` output of ``f`` with its autograd graph (``fz = f(z)``).
        z: ``[B, D]`` input that requires grad.
        grad: ``[B, D]`` incoming gradient ``dL/dz*``.
        method: see the module docstring.
        max_iter, tol: cap on the VJPs; relative residual tolerance.
        init, factors: optional ``[B, D]`` initial guess; optional ``(U, V)``, each ``[B, L, D]``.
        m, lam: Anderson window (1..64); ridge, relative to ``trace(Gram) / n``.
        restart: GMRES restart length and Broyden memory (1..64).
        check_every: iterations between host checks of the convergence flags.
        backend: ``"cpp"`` (C++ loop, needs ``deq_fast._C``), ``"reference"`` (Python loop),
            ``"auto"`` (``cpp`` when available for the device).

    Returns:
        ``(g, info)``: ``g`` is ``[B, D]`` in ``grad``'s dtype; ``info`` has ``nvjp`` (int),
        ``rel_residual`` (``[B]``, ``grad``'s dtype; NaN for ``shine``, which measures nothing),
        ``converged`` (``[B]`` bool; for ``shine``, True where ``grad`` is finite), ``method``
        (resolved name), ``backend`` (``"cpp"`` | ``"reference"``), ``nsync`` (host syncs).

    Example:
        >>> W = 0.5 * torch.eye(4, dtype=torch.float64)
        >>> z = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
        >>> fz = z @ W.T
        >>> g, info = implicit_backward(fz, z, torch.ones(2, 4, dtype=torch.float64))
        >>> torch.allclose(g, torch.full((2, 4), 2.0, dtype=torch.float64)), g.shape
        (True, torch.Size([2, 4]))
    """
    _validate_tensors(fz, z, grad, method)
    _validate_options(max_iter, tol, m, lam, restart, check_every)
    _validate_start(z, method, init, factors)
    resolved = DEFAULT_METHOD if method == "auto" else method
    with torch.no_grad():
        g, gnorm, finite, pos, inv_gnorm = _prepare_grad(grad)
        shine = (shine_apply(g, factors[0].detach(), factors[1].detach())
                 if factors is not None else None)
        if resolved == "shine":
            return _shine_result(shine, gnorm, finite, grad.dtype)
        x0 = _start(init, shine, g)
        chosen = resolve_backend(backend, g.device)
        args = (fz, z, g, inv_gnorm, pos, x0, init is None and factors is None, resolved,
                max_iter, float(tol), m, float(lam), restart, check_every)
        solver = _cpp_module().backward_solve if chosen == "cpp" else python_solve
        best_x, best_rel, nvjp, nsync = solver(*args)
        g_out = torch.where(pos[:, None], best_x, 0)
        g_out = torch.where(finite[:, None], g_out, math.nan).to(grad.dtype)
        rel = torch.where(pos, best_rel, torch.where(finite, 0.0, math.nan)).to(grad.dtype)
        converged = finite & (~pos | (best_rel <= tol))
    return g_out, {"nvjp": int(nvjp), "rel_residual": rel, "converged": converged,
                   "method": resolved, "backend": chosen, "nsync": int(nsync)}


def _prepare_grad(grad: torch.Tensor):
    """``(g, gnorm, finite, pos, inv_gnorm)``: ``grad`` in the working dtype (float64 stays,
    anything else float32) with non-finite rows zeroed, its per-sample norm, which rows are
    finite / finite and nonzero, and ``1 / ||grad||`` (0 elsewhere)."""
    work = acc_dtype(grad.dtype)
    g = grad.detach().to(work).contiguous()
    gnorm = g.double().norm(dim=1)
    finite = torch.isfinite(gnorm)
    g = torch.where(finite[:, None], g, 0)
    pos = finite & (gnorm > 0)
    inv_gnorm = torch.where(pos, 1.0 / torch.where(pos, gnorm, 1.0), 0.0)
    return g, gnorm, finite, pos, inv_gnorm


def _shine_result(shine: torch.Tensor, gnorm: torch.Tensor, finite: torch.Tensor,
                  out_dtype: torch.dtype) -> tuple[torch.Tensor, dict]:
    g_out = torch.where(finite[:, None], shine, math.nan).to(out_dtype)
    info = {"nvjp": 0, "rel_residual": torch.full_like(gnorm, math.nan).to(out_dtype),
            "converged": finite.clone(), "method": "shine", "backend": "reference", "nsync": 0}
    return g_out, info


def _start(init: torch.Tensor | None, shine: torch.Tensor | None, g: torch.Tensor) -> torch.Tensor:
    """The start: ``init`` (non-finite entries zeroed), else the SHINE estimate, else zero."""
    if init is not None:
        x0 = init.detach().to(device=g.device, dtype=g.dtype).contiguous()
        return torch.where(torch.isfinite(x0), x0, 0)
    if shine is not None:
        return shine
    return torch.zeros_like(g)
