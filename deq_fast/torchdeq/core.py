"""``torchdeq.core``: the DEQ module with TorchDEQ's options, defaults and calling convention.

``get_deq(args=None, **kwargs)`` reads TorchDEQ's options (keyword arguments over ``args``; unknown
keys such as ``name=`` are ignored, as in TorchDEQ) and builds the module for ``core``
(``'sliced'``, ``'indexing'`` or a class given to :func:`register_deq`). TorchDEQ's defaults:
``f_solver``/``b_solver='fixed_point_iter'``, ``f_max_iter=b_max_iter=40``, ``f_tol=1e-3``,
``b_tol=1e-6``, ``'abs'`` stop modes, and ``ift=False`` = the ``grad``-step phantom gradient with
damping ``tau``.

Two engines:

* Evaluation: :func:`deq_fast.get_deq` with these options passed explicitly.
* Training (phantom gradient, or ``ift=True`` / ``hook_ift=True``): TorchDEQ's own training
  forward, on deq_fast's
  TorchDEQ-contract solvers (:func:`~deq_fast.torchdeq.solver.get_solver`). The state goes through
  :func:`~deq_fast.torchdeq.utils.layer_utils.deq_decorator` (a list/tuple state is packed into
  one ``(B, D)`` vector unless ``no_stat``, as in TorchDEQ; with ``ift`` also with ``no_stat``,
  where TorchDEQ's IFT would fail on the list).
  ``'sliced'``: each segment of ``_compute_f_iter`` is solved under ``no_grad`` from the previous
  segment's output and ends with its gradient functor (phantom ``grad``/``tau`` steps; with
  ``ift``, IFT for the last). ``'indexing'``: one solve that samples the states at ``indexing``
  exactly where TorchDEQ's solvers sample them; the functors are applied to the sampled states
  (after an early stop TorchDEQ's solvers drop the later samples, and so do these). The exact
  backward is :func:`~deq_fast.torchdeq.grad.backward_factory`'s: TorchDEQ's stopping rule
  (``b_stop_mode``, the batch maximum under ``b_tol``), the Jacobian at ``f(z*)``, and
  ``backward_writer`` receives the backward solver's statistics (``abs_lowest``, ``rel_lowest``,
  ``nstep``, ...). ``info`` is the last solve's statistics (``sradius=-1``).

Behaviour kept from TorchDEQ: ``forward(func, z_init, solver_kwargs=None, sradius_mode=False,
backward_writer=None, **kwargs)`` ignores extra keywords (MDEQ passes ``writer=``);
``f_max_iter=0`` (or ``solver_kwargs={'f_max_iter': 0}``) skips the solver: the gradient functors
start from ``z_init`` and ``info`` holds TorchDEQ's ``1e8`` placeholders with ``nstep=0``; in
evaluation ``info['sradius']`` is ``zeros(1)`` unless ``sradius_mode``.

Fixed against TorchDEQ (deq_fast's behaviour): evaluation outputs keep ``requires_grad`` when
gradients are enabled (TorchDEQ issues #4, #8; then the output is the tracked step ``f(z*)`` of
the gradient mode, from :func:`deq_fast.get_deq`); ``sradius_mode`` uses deq_fast's power method;
the caller's ``args`` namespace is not modified. The native :func:`deq_fast.get_deq` keeps its own
exact backward (per-sample relative stopping), which this namespace no longer uses in training.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from deq_fast.nn.deq import get_deq as _native_get_deq
from deq_fast.nn.norm import mark_stale_norms
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
        self.b_solver = get_solver(opt["b_solver"]) if isinstance(opt["b_solver"], str) \
            else opt["b_solver"]
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
            f_max_iter=max(self.f_max_iter, 1),   # 0 never reaches the engine (see forward)
            b_max_iter=self.b_max_iter, f_tol=self.f_tol, b_tol=self.b_tol,
            f_stop_mode=self.f_stop_mode, b_stop_mode=self.b_stop_mode,
            eval_f_max_iter=max(self.eval_f_max_iter, 1), core=self.core,
            grad_mode="exact" if self.ift else "phantom", ift=self.ift,
            grad=self.grad, tau=self.tau, sup_gap=self.sup_gap, sup_loc=self.sup_loc,
            n_states=self.n_states, indexing=self.indexing_arg)
        # TorchDEQ's sampled solver steps and gradient functors: the training forward
        self.indexing = self._compute_f_iter(self.f_max_iter)
        self.produce_grad = [backward_factory(pg, tau=self.tau, sup_gap=self.sup_gap,
                                              sup_loc=self.sup_loc)
                             for pg in make_pair(self.indexing, self.grad)]
        if self.ift:
            self.produce_grad[-1] = backward_factory(
                "ift", hook_ift=bool(self.args.get("hook_ift", False)), b_solver=self.b_solver,
                b_solver_kwargs=dict(max_iter=self.b_max_iter, tol=self.b_tol,
                                     stop_mode=self.b_stop_mode))

    def _compute_f_iter(self, f_max_iter) -> list:
        """TorchDEQ's sampled solver steps for ``f_max_iter`` (the cores override it)."""
        return [f_max_iter]

    def _f_solve(self, deq_func, z, max_iter, rest: dict, **extra):
        """TorchDEQ's forward solve (no graph); the statistics-free solver takes no ``tol`` or
        ``stop_mode`` (TorchDEQ's swallows them; deq_fast's would warn about them)."""
        kw = dict(rest, **extra)
        if self.f_solver is not get_solver("simple_fixed_point_iter"):
            kw.update(tol=self.f_tol, stop_mode=self.f_stop_mode)
        with torch.no_grad():
            return self.f_solver(deq_func, z, max_iter=max_iter, **kw)

    def _train(self, func: Callable, z_init: Any, skw: dict, backward_writer: Callable | None):
        """TorchDEQ's training forward: the solver states its core samples, each followed by its
        gradient functor (phantom steps; IFT on the last with ``ift``), on deq_fast's solvers."""
        mark_stale_norms()
        z_is_list = isinstance(z_init, (list, tuple))
        # TorchDEQ's IFT needs one tensor: with ``ift`` a list state is packed even when
        # ``no_stat``; otherwise it stays a list as in TorchDEQ (no copy per call of ``func``)
        deq_func, z = deq_decorator(func, z_init, no_stat=self.no_stat and not (z_is_list and self.ift))
        cap = skw.get("f_max_iter")
        indexing = self._compute_f_iter(cap) if type(cap) in (int, float) else self.indexing
        rest = {k: v for k, v in skw.items() if k != "f_max_iter"}
        z_out: list = []
        if self.core == "indexing":
            _, trajectory, info = self._f_solve(
                deq_func, z, cap if cap is not None else self.f_max_iter, rest, indexing=indexing)
            for z_pred, produce in zip(trajectory, self.produce_grad):
                z_out += produce(self, deq_func, deq_func.detach(z_pred), writer=backward_writer)
        else:
            for max_iter, produce in zip(indexing, self.produce_grad):
                z, _, info = self._f_solve(deq_func, z, max_iter, rest)
                z_out += produce(self, deq_func, deq_func.detach(z), writer=backward_writer)
                z = z_out[-1]                    # the next segment resumes from the functor's
        return [deq_func.vec2list(each) for each in z_out], info

    @staticmethod
    def _no_solve(z_init: Any):
        """Evaluation with 0 solver iterations: ``z_init`` itself and TorchDEQ's placeholder
        statistics (residuals ``1e8``, ``nstep`` 0)."""
        z0 = Packer(z_init, "z_init").pack(z_init)
        info = {"abs_lowest": torch.full((z0.shape[0],), _PLACEHOLDER, device=z0.device,
                                         dtype=z0.dtype)}
        info.update(rel_lowest=info["abs_lowest"].clone(), abs_trace=info["abs_lowest"][:, None],
                    rel_trace=info["abs_lowest"][:, None].clone(),
                    nstep=torch.zeros_like(info["abs_lowest"]), sradius=torch.tensor([-1.0]))
        return [z_init], info

    def forward(self, func: Callable, z_init: Any, solver_kwargs: dict | None = None,
                sradius_mode: bool = False, backward_writer: Callable | None = None,
                **kwargs: Any):
        """Solve ``z* = func(z*)`` from ``z_init``; returns ``(z_out list, info)`` as TorchDEQ.

        Extra keyword arguments (e.g. ``writer=``) are accepted and ignored, as in TorchDEQ.
        """
        skw = dict(solver_kwargs or {})
        if self.training:
            return self._train(func, z_init, skw, backward_writer)
        if int(skw.get("f_max_iter", self.eval_f_max_iter)) == 0:
            return self._no_solve(z_init)
        z_out, info = self.engine(func, z_init, solver_kwargs=skw or None,
                                  sradius_mode=sradius_mode, backward_writer=backward_writer)
        if not sradius_mode:
            info["sradius"] = torch.zeros(1)
        return z_out, info


class DEQSliced(_EngineDEQ):
    """Sliced core: the solve is cut into ``n_states``/``indexing`` segments, each ending with the
    gradient functor, the next segment starting from its output."""

    core = "sliced"

    def _compute_f_iter(self, f_max_iter) -> list:
        """Segment lengths: ``n_states`` equal ones, else the gaps of ``[0, *indexing, f_max_iter]``."""
        if self.n_states > 1:
            return [int(f_max_iter // self.n_states) for _ in range(self.n_states)]
        ends = [0, *self.indexing_arg, f_max_iter]
        return [b - a for a, b in zip(ends, ends[1:])]


class DEQIndexing(_EngineDEQ):
    """Indexing core: one solve; the gradient functor is applied to the sampled solver states."""

    core = "indexing"

    def _compute_f_iter(self, f_max_iter) -> list:
        """Sampled steps: ``n_states`` evenly spaced ones ending at ``f_max_iter``, else
        ``[*indexing, f_max_iter]``."""
        if self.n_states > 1:
            n_states = max(min(f_max_iter, self.n_states), 1)
            delta = int(f_max_iter // n_states)
            if f_max_iter % n_states == 0:
                return [(k + 1) * delta for k in range(n_states)]
            return [f_max_iter - (n_states - k - 1) * delta for k in range(n_states)]
        return [*self.indexing_arg, f_max_iter]


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
