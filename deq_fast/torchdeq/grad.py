"""``torchdeq.grad``: ``backward_factory``, the gradient functors of a DEQ.

A functor is called as ``produce(trainer, func, z_pred, writer=None)`` with ``func(z, tau=1.0)``
(a :mod:`~deq_fast.torchdeq.utils.layer_utils` wrapper) and returns the tracked states:

* ``grad_type=k`` (int): phantom gradient, ``k`` steps ``z <- tau f(z) + (1 - tau) z`` from the
  detached ``z_pred``; ``sup_gap > 0`` returns every ``sup_gap``-th step, ``sup_loc`` the listed
  steps plus the last.
* ``grad_type='ift'``: ``f(z_pred)`` whose gradient is replaced by the implicit one,
  ``g = grad + J^T g`` solved by deq_fast's :func:`~deq_fast.implicit.backward.implicit_backward`
  (``b_solver``: ``'fixed_point_iter'``, ``'anderson'``, ``'broyden'``; per-sample relative
  residual ``<= tol``, the best iterate, never the unchanged start). ``hook_ift`` means the same.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from deq_fast.implicit.backward import implicit_backward

__all__ = ["backward_factory"]

_B_METHODS = {"fixed_point_iter": "fixed_point", "simple_fixed_point_iter": "fixed_point",
              "anderson": "anderson", "broyden": "broyden"}


def make_pair(target: list, source: list) -> list:
    """``source`` aligned to ``target``'s length (a single value is repeated).

    Raises:
        ValueError: when ``source`` has neither 1 nor ``len(target)`` entries.
    """
    if len(target) == len(source):
        return source
    if len(source) == 1:
        return [source[0]] * len(target)
    raise ValueError(f"cannot align {len(source)} values to {len(target)} sampled states")


def backward_factory(grad_type: Any = "ift", hook_ift: bool = False, b_solver: Any = None,
                     b_solver_kwargs: dict | None = None, sup_gap: int = -1,
                     sup_loc: list | None = None, tau: float = 1.0, **grad_factory_kwargs: Any
                     ) -> Callable:
    """The gradient functor for ``grad_type`` (see the module doc); extra keywords are ignored
    as in TorchDEQ."""
    if grad_type == "ift":
        kw = dict(b_solver_kwargs or {})
        name = getattr(b_solver, "__name__", b_solver) or "fixed_point_iter"
        name = {"anderson_solver": "anderson", "broyden_solver": "broyden"}.get(name, name)
        cfg = dict(method=_B_METHODS.get(name, "fixed_point"), max_iter=kw.get("max_iter", 40),
                   tol=kw.get("tol", 1e-6))

        def ift_grad(_trainer, func, z_pred, writer=None, **_kw):
            z = z_pred.detach().requires_grad_()
            with torch.enable_grad():
                fz = func(z)
            out = _IFTBridge.apply(fz, z, dict(cfg, writer=writer))
            return [out]
        return ift_grad
    if not isinstance(grad_type, int) or grad_type < 1:
        raise ValueError(f"grad_type must be 'ift' or a positive int, got {grad_type!r}")
    sup_loc = list(sup_loc or [])

    def phantom_grad(_trainer, func, z_pred, **_kw):
        out = []
        for i in range(grad_type):
            z_pred = func(z_pred, tau=tau)
            if (sup_gap > 0 and (i + 1) % sup_gap == 0) or (sup_gap <= 0 and i + 1 in sup_loc):
                out.append(z_pred)
        if sup_gap <= 0:
            out.append(z_pred)
        return out
    return phantom_grad


class _IFTBridge(torch.autograd.Function):
    """Forward: ``f(z*)``; backward: the implicit gradient ``g`` pushed through ``f``'s graph to
    the parameters and inputs (``f(z*)``'s graph holds them)."""

    @staticmethod
    def forward(ctx, fz, z, cfg):
        ctx.cfg = cfg
        ctx.save_for_backward(z)
        ctx.fz_graph = fz
        return fz.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        cfg, fz, (z,) = ctx.cfg, ctx.fz_graph, ctx.saved_tensors
        with torch.enable_grad():
            g, info = implicit_backward(fz, z, grad, method=cfg["method"],
                                        max_iter=cfg["max_iter"], tol=cfg["tol"])
        if cfg["writer"]:
            cfg["writer"](info)
        return g, None, None
