"""``torchdeq.grad``: ``backward_factory``, the gradient functors of a DEQ (TorchDEQ's semantics).

A functor is called as ``produce(trainer, func, z_pred, writer=None)`` with ``func(z, tau=1.0)``
(a :mod:`~deq_fast.torchdeq.utils.layer_utils` wrapper) and returns the tracked states:

* ``grad_type=k`` (int): phantom gradient, ``k`` steps ``z <- tau f(z) + (1 - tau) z`` from the
  detached ``z_pred``; ``sup_gap > 0`` returns every ``sup_gap``-th step, ``sup_loc`` the listed
  steps plus the last.
* ``grad_type='ift'``: ``[f(z_pred)]`` whose gradient is replaced by the implicit one, as in
  TorchDEQ 0.1.0: the backward recomputes ``f(h)`` at ``h = f(z_pred)`` (the returned state) and
  solves ``g = J_f(h)^T g + grad`` with ``b_solver(grad_f, zeros_like(grad), **b_solver_kwargs)``,
  ``b_solver`` a TorchDEQ-contract solver (:func:`~deq_fast.torchdeq.solver.get_solver`: deq_fast's
  fused engine; TorchDEQ's stopping rule, the batch maximum of the ``stop_mode`` residual under
  ``tol``); ``writer(info)`` receives that solver's statistics (``abs_lowest``, ``rel_lowest``,
  ``abs_trace``, ``rel_trace``, ``nstep``, ``sradius``, plus deq_fast's ``nfe``, ``backend``).
  ``hook_ift=True``: TorchDEQ's ``register_hook`` variant (the Jacobian at ``z_pred``, the hook
  in ``trainer.hook`` removed before the solve).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import autograd

from .solver import get_solver

__all__ = ["backward_factory"]


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
        return _ift_functor(hook_ift, b_solver, b_solver_kwargs)
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


def _ift_functor(hook_ift: bool, b_solver: Any, b_solver_kwargs: dict | None) -> Callable:
    """TorchDEQ's IFT functor (see the module doc). ``b_solver`` is a solver function with
    TorchDEQ's contract; a registered name is accepted too, and ``None`` means
    ``'fixed_point_iter'`` (TorchDEQ requires the function)."""
    if b_solver is None or isinstance(b_solver, str):
        b_solver = get_solver(b_solver or "fixed_point_iter")
    kwargs = dict(b_solver_kwargs or {})

    if hook_ift:
        def hook_ift_grad(trainer, func, z_pred, writer=None, **_kw):
            z_pred = z_pred.requires_grad_()
            new_z_pred = func(z_pred)                     # one step: the graph to the parameters

            def backward_hook(grad):
                if trainer.hook is not None:
                    trainer.hook.remove()                 # the solve below would re-enter it
                grad_star, _, info = b_solver(
                    lambda y: autograd.grad(new_z_pred, z_pred, y, retain_graph=True)[0] + grad,
                    torch.zeros_like(grad), **kwargs)
                if writer:
                    writer(info)
                return grad_star
            trainer.hook = new_z_pred.register_hook(backward_hook)
            return [new_z_pred]
        return hook_ift_grad

    def ift_grad(_trainer, func, z_pred, writer=None, **_kw):
        new_z_pred = func(z_pred)                         # one step: the graph to the parameters
        return [_IFTGrad.apply(func, new_z_pred, (b_solver, kwargs, writer))]
    return ift_grad


class _IFTGrad(torch.autograd.Function):
    """Identity forward on ``f(z_pred)``; backward: the implicit gradient at that state,
    ``g = J_f(h)^T g + grad`` with ``h`` the saved forward input."""

    @staticmethod
    def forward(ctx, func, z_pred, cfg):
        ctx.func, ctx.cfg = func, cfg
        ctx.save_for_backward(z_pred.detach())
        return z_pred

    @staticmethod
    def backward(ctx, grad):
        func, (b_solver, kwargs, writer) = ctx.func, ctx.cfg
        z_pred, = ctx.saved_tensors
        h = z_pred.clone().detach().requires_grad_()
        with torch.enable_grad():
            f = func(h)

        def grad_f(y):
            return autograd.grad(f, h, y, retain_graph=True)[0] + grad
        grad_star, _, info = b_solver(grad_f, torch.zeros_like(grad), **kwargs)
        if writer:
            writer(info)
        return None, grad_star, None
