"""Gradient functions of a DEQ layer: exact implicit differentiation, phantom gradient, JFB.

Each takes the detached solver estimate ``z*`` (flat ``[B, D]``) and returns tracked state(s)
whose backward is the chosen gradient:

* **exact** (:class:`ImplicitGrad`): the output is ``f(z*)``; the backward replaces the incoming
  gradient by the solution of ``g = grad + J_f(z*)^T g`` (:func:`implicit_backward`, or SHINE's
  ``-H^T grad`` from the forward Broyden factors) and carries ``g`` through ``f(z*)``'s graph.
* **phantom** (:func:`phantom_grad`): ``k`` tracked damped steps ``z <- tau f(z) + (1 - tau) z``
  (TorchDEQ's ``ift=False`` gradient, with its ``sup_gap``/``sup_loc`` trajectory sampling).
* **JFB**: the phantom gradient with ``k = 1``, ``tau = 1``.
* **exact, captured** (:class:`CapturedImplicitGrad`): what a DEQ layer attaches for the exact
  gradient while ``torch.compile`` traces it. The same linear system, solved with no host
  interaction so that Dynamo traces the backward into the compiled graph: the VJP is
  ``torch.func.vjp`` of ``f`` at ``z*`` (recomputed in the backward), and the system
  ``g = grad + J^T g`` is itself a fixed point, solved by :func:`deq_fast.solve` for exactly
  ``max_iter`` iterations (``check_every=0``), its lowest-residual iterate returned.

:func:`grad_plan` turns a module's gradient mode into one :class:`GradSpec` per sampled state.
"""
from __future__ import annotations

import collections
import enum
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from deq_fast.implicit.backward import implicit_backward
from deq_fast.solvers.api import solve

__all__ = ["GradMethod", "GradSpec", "BackwardConfig", "ImplicitGrad", "CapturedImplicitGrad",
           "CAPTURED_METHODS", "BackwardNotConverged", "phantom_grad", "needs_grad_beyond",
           "grad_plan"]


class BackwardNotConverged(UserWarning):
    """Warned when the implicit backward solve stops above its tolerance for some sample.

    The gradient returned is each sample's best iterate (never NaN when a finite one was seen,
    never the unchanged start when a later iterate was finite). Turn it into an error with
    ``warnings.simplefilter("error", deq_fast.BackwardNotConverged)``.
    """


class GradMethod(enum.Enum):
    """How the gradient of one sampled state is produced."""

    PHANTOM = "phantom"   # unrolled damped steps (JFB: 1 step, tau = 1)
    EXACT = "exact"       # implicit differentiation, iterative backward solve
    SHINE = "shine"       # implicit differentiation with the forward Broyden factors


@dataclass(frozen=True)
class GradSpec:
    """The gradient of one sampled state: ``method``, and for PHANTOM ``steps`` and ``tau``."""

    method: GradMethod
    steps: int = 1
    tau: float = 1.0


@dataclass
class BackwardConfig:
    """What :class:`ImplicitGrad`'s backward needs: the backward solve's method, cap and
    tolerance, the SHINE factors (or None), the module's ``info`` dict (updated in place with
    ``b_*`` keys) and the user's ``writer`` (called with the backward info, or None)."""

    method: str
    max_iter: int
    tol: float
    factors: tuple[torch.Tensor, torch.Tensor] | None
    info: dict
    writer: Callable[[dict], Any] | None


def grad_plan(mode: str, steps: Sequence[int], tau: float, n: int) -> list[GradSpec]:
    """One :class:`GradSpec` per sampled state for gradient ``mode``.

    States other than the last always use the phantom gradient (TorchDEQ); ``steps`` has one
    entry (shared) or ``n``.

    Example:
        >>> [s.method.value for s in grad_plan("exact", [2], 0.5, 2)]
        ['phantom', 'exact']
    """
    if mode == "jfb":
        return [GradSpec(GradMethod.PHANTOM, 1, 1.0)] * n
    per_state = list(steps) if len(steps) == n else list(steps) * n
    plan = [GradSpec(GradMethod.PHANTOM, k, tau) for k in per_state]
    if mode in ("exact", "shine"):
        plan[-1] = GradSpec(GradMethod(mode))
    return plan


def _record_backward(cfg: BackwardConfig, binfo: dict, grad: torch.Tensor) -> None:
    """Copy the backward statistics into ``cfg.info``; warn when some sample did not converge."""
    info = cfg.info
    info["b_nvjp"] = int(binfo.get("nvjp", -1))
    info["b_rel_residual"] = binfo.get("rel_residual")
    info["b_converged"] = binfo.get("converged")
    info["b_method"] = binfo.get("method")
    info["b_backend"] = binfo.get("backend")
    conv = binfo.get("converged")
    if conv is None or not bool(torch.isfinite(grad).all()):
        return
    failed = ~torch.as_tensor(conv)
    n_failed = int(failed.sum())
    if n_failed == 0:
        return
    res = binfo.get("rel_residual")
    worst = (float(torch.as_tensor(res)[failed].double().max()) if res is not None
             else float("nan"))
    method = binfo.get("method")
    try_gmres = "" if method == "gmres" else "try b_solver='gmres', "
    warnings.warn(f"DEQ backward solve ({method}) did not reach tol={cfg.tol:g} in "
                  f"{cfg.max_iter} iterations for {n_failed} of {failed.numel()} samples (worst "
                  f"relative residual {worst:.3g}); using each sample's best iterate. Common "
                  f"early in training; if it persists: raise b_max_iter or b_tol, {try_gmres}"
                  "or use the phantom gradient (grad_mode='phantom', TorchDEQ: "
                  "ift=False), which needs no backward solve. A residual far above tol means f is "
                  "not contractive at z* (weight normalisation or jac_loss_weight help)",
                  BackwardNotConverged, stacklevel=3)


class ImplicitGrad(torch.autograd.Function):
    """Identity on ``fz = f(z*)`` in the forward; the backward replaces the incoming gradient by the
    solution of ``g = grad + J^T g`` (``J = df/dz`` at ``z*``), then autograd carries ``g`` through
    ``fz``'s graph into the parameters and inputs of ``f``. ``z`` is the leaf ``fz`` was computed
    from; nothing outlives the graph, so repeated calls per step stack nothing up.

    Call: ``ImplicitGrad.apply(fz, z, cfg)`` with ``fz``, ``z`` ``[B, D]`` and a
    :class:`BackwardConfig`.
    """

    @staticmethod
    def forward(ctx, fz: torch.Tensor, z: torch.Tensor, cfg: BackwardConfig) -> torch.Tensor:
        ctx.cfg = cfg
        ctx.save_for_backward(fz, z)
        return fz.detach().clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        fz, z = ctx.saved_tensors
        cfg: BackwardConfig = ctx.cfg
        grad = grad.contiguous()
        kwargs: dict[str, Any] = dict(method=cfg.method, max_iter=cfg.max_iter, tol=cfg.tol)
        if cfg.factors is not None:
            kwargs["factors"] = cfg.factors
        g, binfo = implicit_backward(fz, z, grad, **kwargs)
        _record_backward(cfg, binfo, grad)
        if cfg.writer is not None:
            cfg.writer(binfo)
        return g, None, None


#: backward method -> the fixed-iteration solver that runs it under torch.compile (GMRES and
#: ``auto``, whose restarts need host decisions, become Anderson on the same system)
CAPTURED_METHODS = {"auto": "anderson", "gmres": "anderson", "anderson": "anderson",
                    "broyden": "broyden", "fixed_point": "fixed_point"}


class CapturedImplicitGrad(torch.autograd.Function):
    """:class:`ImplicitGrad` in a form Dynamo traces (``torch.compile(fullgraph=True)``).

    Identity on ``fz = f(z*)``; the backward solves ``g = grad + J^T g`` (``J = df/dz`` at
    ``z*``) as the fixed point of ``u -> grad + vjp(u)`` with :func:`deq_fast.solve`, exactly
    ``cfg.max_iter`` iterations (no host interaction), starting from ``grad``, and returns the
    lowest-residual iterate (relative residual, as ``cfg.tol`` is); autograd then carries ``g``
    through ``fz``'s graph into the parameters and inputs of ``f``. ``z*`` needs no gradient:
    the VJP is ``torch.func.vjp(func, z*)``, recomputed in the backward. Nothing is recorded in
    ``cfg.info`` (that would read the device) and the writer is not called.

    Call: ``CapturedImplicitGrad.apply(fz, z, func, cfg)`` with ``fz``, ``z`` ``[B, D]``, ``func``
    the map ``[B, D] -> [B, D]`` and a :class:`BackwardConfig` whose method is a key of
    :data:`CAPTURED_METHODS`.
    """

    @staticmethod
    def forward(ctx, fz: torch.Tensor, z: torch.Tensor, func: Callable[[torch.Tensor], torch.Tensor],
                cfg: BackwardConfig) -> torch.Tensor:
        ctx.func, ctx.cfg = func, cfg
        ctx.save_for_backward(z)
        return fz.detach().clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (z,) = ctx.saved_tensors
        with torch.enable_grad():
            _, vjp = torch.func.vjp(ctx.func, z.detach())
        cfg: BackwardConfig = ctx.cfg
        g = solve(lambda u: grad + vjp(u)[0], grad, CAPTURED_METHODS[cfg.method],
                  max_iter=cfg.max_iter, tol=cfg.tol, check_every=0).z
        return g, None, None, None


def needs_grad_beyond(fz: torch.Tensor, z: torch.Tensor) -> bool:
    """Whether ``fz``'s graph reaches a leaf other than ``z`` (a parameter or input of ``func``).

    Breadth-first over the autograd graph, stopping at the first such leaf (usually a weight a
    few nodes away); it only walks all of ``f``'s graph when nothing else needs a gradient.

    Example:
        >>> w = torch.ones(3, requires_grad=True); z = torch.zeros(3, requires_grad=True)
        >>> needs_grad_beyond(z * w, z), needs_grad_beyond(2 * z, z)
        (True, False)
    """
    if fz.grad_fn is None:
        return False
    seen, queue = set(), collections.deque([fz.grad_fn])
    while queue:
        node = queue.popleft()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None:
            if var is not z:
                return True
            continue
        queue.extend(nxt for nxt, _ in node.next_functions)
    return False


def phantom_grad(func: Callable[..., torch.Tensor], z: torch.Tensor, steps: int, tau: float,
                 sup_gap: int, sup_loc: Sequence[int]) -> list[torch.Tensor]:
    """``steps`` tracked damped steps ``z <- tau f(z) + (1 - tau) z`` from a detached ``z``.

    Args:
        func: ``func(z, tau=tau) -> tau f(z) + (1 - tau) z`` on ``[B, D]`` states.
        z: ``[B, D]`` detached start (the solver estimate).
        steps: number of tracked steps (``>= 1``).
        tau: damping in ``(0, 1]``.
        sup_gap: if ``> 0``, return every ``sup_gap``-th state (TorchDEQ; the last only if it
            falls on the gap).
        sup_loc: if ``sup_gap <= 0``, also return the states after these steps.

    Returns:
        list of ``[B, D]`` tracked states, the last the phantom-gradient output.

    Example:
        >>> out = phantom_grad(lambda z, tau=1.0: tau * z.tanh() + (1 - tau) * z,
        ...                    torch.zeros(2, 3), 3, 0.5, -1, [1])
        >>> len(out)
        2
    """
    out = []
    for i in range(steps):
        z = func(z, tau=tau)
        if (sup_gap > 0 and (i + 1) % sup_gap == 0) or (sup_gap <= 0 and sup_loc and i + 1 in sup_loc):
            out.append(z)
    if sup_gap <= 0:
        out.append(z)
    return out
