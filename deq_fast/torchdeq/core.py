"""``torchdeq.core``: the DEQ module with TorchDEQ's options, defaults and calling convention.

``get_deq(args=None, **kwargs)`` reads TorchDEQ's options (keyword arguments over ``args``; unknown
keys such as ``name=`` are ignored, as in TorchDEQ) and builds the module for ``core``
(``'sliced'``, ``'indexing'`` or a class given to :func:`register_deq`). The solve and the
gradients run on :func:`deq_fast.get_deq` with TorchDEQ's defaults passed explicitly:
``f_solver``/``b_solver='fixed_point_iter'``, ``f_max_iter=b_max_iter=40``, ``f_tol=1e-3``,
``b_tol=1e-6``, ``'abs'`` stop modes, and ``ift=False`` = the ``grad``-step phantom gradient with
damping ``tau`` (``ift=True`` or ``hook_ift=True``: the exact implicit gradient).

Behaviour kept from TorchDEQ: ``forward(func, z_init, solver_kwargs=None, sradius_mode=False,
backward_writer=None, **kwargs)`` ignores extra keywords (MDEQ passes ``writer=``);
``f_max_iter=0`` (or ``solver_kwargs={'f_max_iter': 0}``) skips the solver: the phantom steps start
from ``z_init`` and ``info`` holds TorchDEQ's ``1e8`` placeholders with ``nstep=0``; in evaluation
``info['sradius']`` is ``zeros(1)`` unless ``sradius_mode``.

Fixed against TorchDEQ (deq_fast's behaviour): the exact backward stops per sample on the relative
residual ``||grad + J^T g - g|| / ||grad|| <= b_tol`` and returns the best iterate; evaluation
outputs keep ``requires_grad`` when gradients are enabled (TorchDEQ issues #4, #8; then the output
is the tracked step ``f(z*)`` of the gradient mode); ``sradius_mode`` uses deq_fast's power method;
the caller's ``args`` namespace is not modified.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from deq_fast.nn.deq import get_deq as _native_get_deq
from deq_fast.solvers.packing import Packer

from .dropout import reset_dropout
from .grad import backward_factory, make_pair
from .loss import power_method as power_method  # torchdeq.core's namespace
from .norm import reset_norm
from .solver import get_solver
from .utils.config import DEQConfig
from .utils.layer_utils import deq_decorator as deq_decorator  # torchdeq.core's namespace

__all__ = ["get_deq", "reset_deq", "register_deq", "DEQSliced", "DEQIndexing"]

# TorchDEQ 0.1.0's options and defaults (DEQBase, DEQIndexing/DEQSliced).
TORCHDEQ_DEFAULTS: dict[str, Any] = {
    "f_solver": "fixed_point_iter", "b_solver": "fixed_point_iter", "no_stat": None,
    "f_max_iter": 40, "b_max_iter": 40, "f_tol": 1e-3, "b_tol": 1e-6,
    "f_stop_mode": "abs", "b_stop_mode": "abs", "eval_factor": 1.0, "eval_f_max_iter": 0,
    "ift": False, "hook_ift": False, "grad": 1, "tau": 1.0, "sup_gap": -1, "sup_loc": None,
    "n_states": 1, "indexing": None,
}
_PLACEHOLDER = 1e8   # TorchDEQ's residuals before the first solver step


class DEQBase(nn.Module):
    """TorchDEQ's DEQ base class: parses the options into attributes (``f_max_iter``, ``f_tol``,
    ``eval_f_max_iter``, ...). Subclass it and override ``forward`` to register your own core with
    :func:`register_deq`."""

    core = "sliced"

    def __init__(self, args: Any = None, **kwargs: Any):
        super().__init__()
        self.args = DEQConfig(args)
        self.args.update(**kwargs)
        opt = {k: self.args.get(k, v) for k, v in TORCHDEQ_DEFAULTS.items()}
        self.f_solver_name, self.b_solver_name = opt["f_solver"], opt["b_solver"]
        self.f_solver = get_solver(opt["f_solver"]) if isinstance(opt["f_solver"], str) \
            else opt["f_solver"]
        self.no_stat = (opt["f_solver"] == "simple_fixed_point_iter" if opt["no_stat"] is None
                        else opt["no_stat"])
        self.f_max_iter, self.b_max_iter = int(opt["f_max_iter"]), int(opt["b_max_iter"])
        self.f_tol, self.b_tol = opt["f_tol"], opt["b_tol"]
        self.f_stop_mode, self.b_stop_mode = opt["f_stop_mode"], opt["b_stop_mode"]
        self.eval_f_max_iter = (opt["eval_f_max_iter"] if opt["eval_f_max_iter"] > 0
                                else int(self.f_max_iter * opt["eval_factor"]))
        self.ift = bool(opt["ift"] or opt["hook_ift"])
        grad = opt["grad"]
        self.grad = [grad] if isinstance(grad, int) else list(grad)
        self.tau, self.sup_gap = float(opt["tau"]), int(opt["sup_gap"])
        self.sup_loc = list(opt["sup_loc"] or [])
        self.n_states, self.indexing_arg = int(opt["n_states"]), list(opt["indexing"] or [])
        self.hook = None

    def forward(self, func: Callable, z_init: Any, solver_kwargs: dict | None = None,
                sradius_mode: bool = False, backward_writer: Callable | None = None,
                **kwargs: Any):
        raise NotImplementedError


class _EngineDEQ(DEQBase):
    """DEQ on :func:`deq_fast.get_deq` (``core`` set by the subclass)."""

    def __init__(self, args: Any = None, **kwargs: Any):
        super().__init__(args, **kwargs)
        b_solver = self.b_solver_name if self.ift else "fixed_point_iter"  # unused without ift
        self.engine = _native_get_deq(
            f_solver=self.f_solver_name, b_solver=b_solver, no_stat=self.no_stat,
            f_max_iter=max(self.f_max_iter, 1),   # 0 is handled here (see _skip_solver)
            b_max_iter=self.b_max_iter, f_tol=self.f_tol, b_tol=self.b_tol,
            f_stop_mode=self.f_stop_mode, b_stop_mode=self.b_stop_mode,
            eval_f_max_iter=max(self.eval_f_max_iter, 1), core=self.core,
            grad_mode="exact" if self.ift else "phantom", ift=self.ift,
            grad=self.grad, tau=self.tau, sup_gap=self.sup_gap, sup_loc=self.sup_loc,
            n_states=self.n_states, indexing=self.indexing_arg)

    def _skip_solver(self, func: Callable, z_init: Any):
        """TorchDEQ with 0 solver iterations: the gradient functor applied to ``z_init``."""
        packer = Packer(z_init, "z_init")
        z0 = packer.pack(z_init).detach()
        info = {"abs_lowest": torch.full((z0.shape[0],), _PLACEHOLDER, device=z0.device,
                                         dtype=z0.dtype)}
        info.update(rel_lowest=info["abs_lowest"].clone(), abs_trace=info["abs_lowest"][:, None],
                    rel_trace=info["abs_lowest"][:, None].clone(),
                    nstep=torch.zeros_like(info["abs_lowest"]), sradius=torch.tensor([-1.0]))
        if not self.training:
            return [z_init], info
        if self.ift:
            raise NotImplementedError("f_max_iter=0 with ift=True: deq_fast.get_deq does not "
                                      "accept a 0-iteration solve yet")

        def flat(z, tau=1.0):
            out = func(*packer.unpack(z)) if isinstance(z_init, (list, tuple)) \
                else func(packer.unpack(z))
            fz = packer.pack(out)
            return fz if tau == 1.0 else tau * fz + (1 - tau) * z
        produce = backward_factory(make_pair([0], self.grad)[0], tau=self.tau,
                                   sup_gap=self.sup_gap, sup_loc=self.sup_loc)
        return [packer.unpack(z) for z in produce(self, flat, z0)], info

    def forward(self, func: Callable, z_init: Any, solver_kwargs: dict | None = None,
                sradius_mode: bool = False, backward_writer: Callable | None = None,
                **kwargs: Any):
        """Solve ``z* = func(z*)`` from ``z_init``; returns ``(z_out list, info)`` as TorchDEQ.

        Extra keyword arguments (e.g. ``writer=``) are accepted and ignored, as in TorchDEQ.
        """
        skw = dict(solver_kwargs or {})
        cap = skw.get("f_max_iter")
        if cap is None:
            cap = self.f_max_iter if self.training else self.eval_f_max_iter
        if int(cap) == 0:
            return self._skip_solver(func, z_init)
        if "f_max_iter" not in skw and self.training and self.f_max_iter != self.engine.f_max_iter:
            skw["f_max_iter"] = self.f_max_iter
        z_out, info = self.engine(func, z_init, solver_kwargs=skw or None,
                                  sradius_mode=sradius_mode, backward_writer=backward_writer)
        if not self.training and not sradius_mode:
            info["sradius"] = torch.zeros(1)
        return z_out, info


class DEQSliced(_EngineDEQ):
    """Sliced core: the solve is cut into ``n_states``/``indexing`` segments, each ending with the
    gradient functor, the next segment starting from its output."""

    core = "sliced"


class DEQIndexing(_EngineDEQ):
    """Indexing core: one solve; the gradient functor is applied to the sampled solver states."""

    core = "indexing"


_core: dict[str, type] = {"sliced": DEQSliced, "indexing": DEQIndexing}


def register_deq(deq_type: str, core: type) -> None:
    """Register a DEQ class (e.g. a :class:`DEQBase` subclass) for ``get_deq(core=deq_type)``."""
    _core[deq_type] = core


def get_deq(args: Any = None, **kwargs: Any) -> nn.Module:
    """The DEQ module for TorchDEQ's options (see the module doc); ``kwargs`` override ``args``.

    Example:
        >>> W = 0.3 * torch.randn(8, 8) / 8 ** 0.5; x = torch.randn(4, 8)
        >>> deq = get_deq(f_solver="anderson", f_max_iter=20)      # phantom gradient, grad=1
        >>> z_out, info = deq(lambda z: torch.tanh(z @ W + x), torch.zeros(4, 8))
        >>> len(z_out), z_out[-1].shape
        (1, torch.Size([4, 8]))
    """
    cfg = DEQConfig(args)
    cfg.update(**kwargs)
    core = cfg.get("core", "sliced")
    if core not in _core:
        raise ValueError(f"core must be one of {sorted(_core)} (register_deq adds more), "
                         f"got {core!r}")
    return _core[core](cfg)


def reset_deq(model: nn.Module) -> None:
    """Recompute normalised weights and forget variational-dropout masks (once per step)."""
    reset_norm(model)
    reset_dropout(model)
