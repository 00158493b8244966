"""The DEQ module: forward fixed-point solve plus a choice of gradients, TorchDEQ-compatible.

``get_deq(**options)`` returns a :class:`DEQ` module called as
``deq(func, z_init, solver_kwargs=None, sradius_mode=False, backward_writer=None)`` that returns
``(z_out, info)``, with TorchDEQ's option names and defaults (``../shared/COMPAT.md`` §C) except:

* **The default gradient is exact implicit differentiation** (``grad_mode='exact'``): the backward
  solves ``g = grad + J_f(z*)^T g`` with :func:`deq_fast.implicit.backward.implicit_backward` and
  back-propagates ``g`` through one tracked ``f(z*)``. TorchDEQ's out-of-the-box behaviour
  (``ift=False``: a ``grad``-step phantom gradient with damping ``tau``) is
  ``get_deq(grad_mode='phantom')``; ``grad_mode='jfb'`` is the 1-step Jacobian-free gradient and
  ``grad_mode='shine'`` reuses the forward Broyden factors (needs ``f_solver='broyden'``).
* ``b_solver`` defaults to ``'auto'``: the backward method deq_fast measured cheapest to tolerance
  (restarted GMRES); TorchDEQ's names (``'fixed_point_iter'``, ``'anderson'``, ``'broyden'``)
  select those methods. The backward stops per sample on the relative residual
  ``||grad + J^T g - g|| / ||grad|| <= b_tol`` whatever ``b_stop_mode`` says.
* ``stop_mode=`` sets both ``f_stop_mode`` and ``b_stop_mode`` (TorchDEQ ignores it, issue #12).
* A misspelt option passed as a keyword raises ``TypeError`` naming it (TorchDEQ swallows it);
  ``args`` namespaces (e.g. from :func:`add_deq_args`) may carry unrelated keys.
* With ``core='indexing'`` the returned list always has one entry per sampled step, also when the
  solver stops early (TorchDEQ then drops the entries, including the implicit-gradient one).
* In evaluation mode with gradients enabled, the output keeps ``requires_grad`` when ``func``'s
  inputs or parameters need it (TorchDEQ issues #4, #8); under ``torch.no_grad()`` the output is
  the solver's estimate and costs no extra evaluation.
* ``hook_ift`` is accepted and means exact gradients: no backward hooks are used anywhere
  (the exact gradient is a ``torch.autograd.Function``), so calling the module several times in one
  step (e.g. with Jacobian regularisation) stacks nothing up.

States may be a tensor ``(B, ...)`` or a tuple/list of tensors ``(B, ...)`` of different shapes
(MDEQ's multi-resolution states, ``func(*states) -> states``); they are packed once into a flat
``(B, D)`` tensor at the boundary, which is what the solvers and the backward see.
"""
from __future__ import annotations

import argparse
import collections
import difflib
import inspect
import warnings
from typing import Any, Callable, Sequence

import torch
from torch import nn

from deq_fast.implicit.backward import METHODS as BACKWARD_METHODS
from deq_fast.implicit.backward import implicit_backward
from deq_fast.compat.torchdeq import get_solver
from deq_fast.nn.dropout import reset_dropout
from deq_fast.nn.norm import reset_norm
from deq_fast.solvers.packing import Packer
from deq_fast.solvers.api import solve
from deq_fast.nn.regularizers import power_method

__all__ = ["DEQ", "get_deq", "reset_deq", "add_deq_args", "BackwardNotConverged", "GRAD_MODES"]

GRAD_MODES = ("exact", "phantom", "jfb", "shine")
CORES = ("sliced", "indexing")

# option -> default. TorchDEQ's names and defaults, except grad_mode / b_solver (see module doc).
_DEFAULTS: dict[str, Any] = {
    "f_solver": "fixed_point_iter",
    "b_solver": "auto",
    "no_stat": None,
    "f_max_iter": 40,
    "b_max_iter": 40,
    "f_tol": 1e-3,
    "b_tol": 1e-6,
    "f_stop_mode": "abs",
    "b_stop_mode": "abs",
    "stop_mode": None,
    "eval_factor": 1.0,
    "eval_f_max_iter": 0,
    "core": "sliced",
    "grad_mode": "exact",
    "ift": False,
    "hook_ift": False,
    "grad": 1,
    "tau": 1.0,
    "sup_gap": -1,
    "sup_loc": None,
    "n_states": 1,
    "indexing": None,
}

# Keys that add_deq_args defines for other components (norm, regularisation, monitoring). Passed
# to get_deq directly they do nothing, so they are reported like misspellings.
_OTHER_ARG_KEYS = {
    "norm_type": "apply_norm", "norm_no_scale": "apply_norm", "norm_clip": "apply_norm",
    "norm_clip_value": "apply_norm", "norm_target_norm": "apply_norm",
    "sn_n_power_iters": "apply_norm", "gamma": "fp_correction", "jac_loss_weight": "jac_reg",
    "jac_loss_freq": "jac_reg", "jac_incremental": "jac_reg", "sradius_mode": "DEQ.forward",
}

# TorchDEQ backward-solver names -> implicit_backward methods.
_B_SOLVER_METHODS = {
    "fixed_point_iter": "fixed_point",
    "simple_fixed_point_iter": "fixed_point",
}


class BackwardNotConverged(UserWarning):
    """Warned when the implicit backward solve stops above its tolerance for some sample.

    The gradient returned is the best iterate found (never NaN when a finite one was seen). Turn it
    into an error with ``warnings.simplefilter("error", deq_fast.nn.deq.BackwardNotConverged)``.
    """


# ----------------------------------------------------------------------------------------------
# forward solvers
# ----------------------------------------------------------------------------------------------

def _get_forward_solver(name: Any) -> Callable:
    """TorchDEQ-contract solver ``solver(func, x0, max_iter, tol, stop_mode, indexing, **kw)``."""
    if callable(name):
        return name
    try:
        return get_solver(name)
    except (AssertionError, KeyError, ValueError) as exc:
        raise ValueError(f"f_solver: {exc}") from exc


def _solve_broyden_with_factors(func, x0, max_iter, tol, stop_mode):
    """Forward Broyden solve returning ``(z, info, (U, V))`` for SHINE (native deq_fast solver).

    ``H = -I + sum_l U[:, l] V[:, l]^T`` approximates ``(J_f - I)^{-1}`` at the solution."""
    res = solve(func, x0, method="broyden", max_iter=max_iter, tol=tol, stop_mode=stop_mode,
                stop_together=True)
    info = {"abs_lowest": res.abs_lowest, "rel_lowest": res.rel_lowest, "nstep": res.nstep,
            "abs_trace": res.abs_trace, "rel_trace": res.rel_trace}
    U, V = res.factors
    # An update taken after a sample converged can divide by a ~zero <v, dg> and leave a
    # non-finite rank-1 term; drop such terms (per sample) so that SHINE never returns NaN.
    ok = (torch.isfinite(U).all(2) & torch.isfinite(V).all(2))[..., None]
    return res.z, info, (torch.where(ok, U, 0.0), torch.where(ok, V, 0.0))


# ----------------------------------------------------------------------------------------------
# state packing
# ----------------------------------------------------------------------------------------------

def _check_output(packer: Packer, out: Any) -> None:
    """Raise ValueError naming the mismatch between ``func``'s output and ``z_init``."""
    if packer.is_tensor:
        outs = [out]
    elif isinstance(out, (tuple, list)) and len(out) == len(packer.shapes):
        outs = list(out)
    else:
        got = f"{len(out)} states" if isinstance(out, (tuple, list)) else type(out).__name__
        raise ValueError(f"func returned {got}, but z_init has {len(packer.shapes)} states")
    for i, (t, shape) in enumerate(zip(outs, packer.shapes)):
        name = "func output" if packer.is_tensor else f"func output[{i}]"
        ref = "z_init" if packer.is_tensor else f"z_init[{i}]"
        if not torch.is_tensor(t):
            raise ValueError(f"{name} is {type(t).__name__}, expected a tensor like {ref}")
        if tuple(t.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(t.shape)}, but {ref} has shape {shape}")
        if t.dtype != packer.dtype or t.device != packer.device:
            raise ValueError(f"{name} has dtype {t.dtype} on {t.device}, but {ref} has dtype "
                             f"{packer.dtype} on {packer.device}")


class _FlatFunc:
    """``func`` on flat ``(B, D)`` states, counting evaluations; ``tau`` damps as in TorchDEQ.
    Tuple/list states call ``func(*states)`` (TorchDEQ's MDEQ convention)."""

    def __init__(self, func: Callable, packer: Packer):
        self.func, self.packer, self.nfe = func, packer, 0

    def __call__(self, zf: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
        self.nfe += 1
        z = self.packer.unpack(zf)
        out = self.func(z) if self.packer.is_tensor else self.func(*z)
        _check_output(self.packer, out)
        fz = self.packer.pack(out)
        return fz if tau == 1.0 else tau * fz + (1.0 - tau) * zf


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------

class _ImplicitGrad(torch.autograd.Function):
    """Identity on ``fz = f(z*)`` in the forward; the backward replaces the incoming gradient by the
    solution of ``g = grad + J^T g`` (``J = df/dz`` at ``z*``), then autograd carries ``g`` through
    ``fz``'s graph into the parameters and inputs of ``f``. ``z`` is the leaf ``fz`` was computed
    from; nothing outlives the graph, so repeated calls per step stack nothing up."""

    @staticmethod
    def forward(ctx, fz: torch.Tensor, z: torch.Tensor, cfg: dict) -> torch.Tensor:
        ctx.cfg = cfg
        ctx.save_for_backward(fz, z)
        return fz.detach().clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor):
        fz, z = ctx.saved_tensors
        cfg = ctx.cfg
        grad = grad.contiguous()
        kwargs = dict(method=cfg["method"], max_iter=cfg["max_iter"], tol=cfg["tol"])
        if cfg["factors"] is not None:
            kwargs["factors"] = cfg["factors"]
        g, binfo = implicit_backward(fz, z, grad, **kwargs)
        info = cfg["info"]
        info["b_nvjp"] = int(binfo.get("nvjp", -1))
        info["b_rel_residual"] = binfo.get("rel_residual")
        info["b_converged"] = binfo.get("converged")
        info["b_method"] = binfo.get("method")
        info["b_backend"] = binfo.get("backend")
        conv = binfo.get("converged")
        if conv is not None and not bool(torch.as_tensor(conv).all()) \
                and bool(torch.isfinite(grad).all()):
            res = binfo.get("rel_residual")
            worst = float(torch.as_tensor(res).max()) if res is not None else float("nan")
            warnings.warn(f"DEQ backward solve ({binfo.get('method')}) did not reach tol="
                          f"{cfg['tol']:g} in {cfg['max_iter']} iterations for some samples "
                          f"(worst relative residual {worst:.3g}); using the best iterate",
                          BackwardNotConverged, stacklevel=2)
        if cfg["writer"] is not None:
            cfg["writer"](binfo)
        return g, None, None


def _needs_grad_beyond(fz: torch.Tensor, z: torch.Tensor) -> bool:
    """Whether ``fz``'s graph reaches a leaf other than ``z`` (a parameter or input of ``func``).

    Breadth-first over the autograd graph, stopping at the first such leaf (usually a weight a
    few nodes away); it only walks all of ``f``'s graph when nothing else needs a gradient."""
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


def _phantom(ffunc: _FlatFunc, z: torch.Tensor, steps: int, tau: float, sup_gap: int,
             sup_loc: Sequence[int]) -> list[torch.Tensor]:
    """``steps`` tracked damped steps ``z <- tau f(z) + (1 - tau) z`` from a detached ``z``."""
    out = []
    for i in range(steps):
        z = ffunc(z, tau=tau)
        if (sup_gap > 0 and (i + 1) % sup_gap == 0) or (sup_gap <= 0 and sup_loc and i + 1 in sup_loc):
            out.append(z)
    if sup_gap <= 0:
        out.append(z)
    return out


# ----------------------------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------------------------

def _config_dict(args: Any) -> dict:
    if args is None:
        return {}
    if isinstance(args, dict):
        return dict(args)
    if isinstance(args, argparse.Namespace):
        return dict(vars(args))
    if hasattr(args, "config") and isinstance(args.config, dict):  # torchdeq DEQConfig
        return dict(args.config)
    if hasattr(args, "__dict__"):
        return dict(vars(args))
    raise ValueError(f"args must be None, a dict or a namespace, got {type(args).__name__}")


def _check_keys(kwargs: dict, where: str) -> None:
    for key in kwargs:
        if key in _DEFAULTS:
            continue
        if key in _OTHER_ARG_KEYS:
            raise TypeError(f"{where} got option {key!r}, which is not a DEQ option (it belongs "
                            f"to {_OTHER_ARG_KEYS[key]})")
        close = difflib.get_close_matches(key, list(_DEFAULTS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TypeError(f"{where} got an unexpected keyword argument {key!r}{hint}")


class DEQ(nn.Module):
    """Deep equilibrium layer: fixed-point solve forward, chosen gradient backward.

    Build it with :func:`get_deq`; options are documented there.

    Call: ``deq(func, z_init, solver_kwargs=None, sradius_mode=False, backward_writer=None)``.

    Args:
        func: the map ``f``: ``func(z) -> z`` for a tensor state, ``func(*states) -> states`` for
            a tuple/list state (same shapes, dtype and device as ``z_init``).
        z_init: initial state, a tensor ``(B, ...)`` or a tuple/list of tensors ``(B, ...)``.
        solver_kwargs: per-call overrides for the forward solver (``f_max_iter`` for the
            iteration cap, anything else is passed to the solver, e.g. ``tol``, ``m``).
        sradius_mode: estimate the spectral radius of ``df/dz`` at the fixed point (100 power
            iterations) into ``info['sradius']`` (shape ``(B,)``).
        backward_writer: called with the backward solver's info dict after each backward solve.

    Returns:
        ``(z_out, info)``: ``z_out`` is a list of states shaped like ``z_init``. Training: the
        sampled trajectory states the loss is applied to (``n_states``/``indexing``; one entry
        by default), the last one carrying the ``grad_mode`` gradient. Evaluation: ``[z*]``.
        ``info``: TorchDEQ's keys (``abs_lowest``, ``rel_lowest``, ``nstep``, traces when the
        solver gives them, ``sradius``) plus ``nfe`` (forward evaluations of ``func``) and, after
        a backward, ``b_nvjp``, ``b_rel_residual``, ``b_converged``, ``b_method``.

    Example:
        >>> deq = get_deq(f_solver="anderson", f_max_iter=30, f_tol=1e-6)
        >>> x = torch.randn(4, 8, requires_grad=True); W = 0.3 * torch.randn(8, 8) / 8 ** 0.5
        >>> z_out, info = deq(lambda z: torch.tanh(z @ W + x), torch.zeros(4, 8))
        >>> z_out[-1].shape
        torch.Size([4, 8])
    """

    def __init__(self, args: Any = None, **kwargs: Any):
        super().__init__()
        _check_keys(kwargs, "get_deq()")
        cfg = {k: v for k, v in _config_dict(args).items() if k in _DEFAULTS}
        cfg.update(kwargs)
        opt = dict(_DEFAULTS)
        opt.update({k: v for k, v in cfg.items() if v is not None or k in ("stop_mode",)})
        if cfg.get("stop_mode") is not None:
            if opt["stop_mode"] not in ("abs", "rel"):
                raise ValueError(f"stop_mode must be 'abs' or 'rel', got {opt['stop_mode']!r}")
            opt["f_stop_mode"] = cfg["f_stop_mode"] if "f_stop_mode" in kwargs else opt["stop_mode"]
            opt["b_stop_mode"] = cfg["b_stop_mode"] if "b_stop_mode" in kwargs else opt["stop_mode"]
        for key in ("f_stop_mode", "b_stop_mode"):
            if opt[key] not in ("abs", "rel"):
                raise ValueError(f"{key} must be 'abs' or 'rel', got {opt[key]!r}")
        for key in ("f_max_iter", "b_max_iter"):
            if not isinstance(opt[key], int) or opt[key] < 1:
                raise ValueError(f"{key} must be a positive int, got {opt[key]!r}")
        for key in ("f_tol", "b_tol"):
            if not opt[key] > 0:
                raise ValueError(f"{key} must be > 0, got {opt[key]!r}")
        if opt["core"] not in CORES:
            raise ValueError(f"core must be one of {CORES}, got {opt['core']!r}")
        mode = {"ift": "exact", "implicit": "exact", "1-step": "jfb"}.get(opt["grad_mode"],
                                                                           opt["grad_mode"])
        if mode not in GRAD_MODES:
            raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {opt['grad_mode']!r}")
        if (opt["ift"] or opt["hook_ift"]) and mode != "exact":
            raise ValueError(f"ift=True asks for the exact gradient but grad_mode={mode!r}")
        grad = opt["grad"]
        grad = [grad] if isinstance(grad, int) else list(grad)
        if not grad or any(not isinstance(k, int) or k < 1 for k in grad):
            raise ValueError(f"grad must be a positive int or a list of them, got {opt['grad']!r}")
        tau = float(opt["tau"])
        if not 0.0 < tau <= 1.0:
            raise ValueError(f"tau must be in (0, 1], got {opt['tau']!r}")
        if mode == "shine" and opt["f_solver"] != "broyden":
            raise ValueError("grad_mode='shine' needs f_solver='broyden' (it reuses the forward "
                             f"Broyden factors), got f_solver={opt['f_solver']!r}")
        self.f_solver_name = opt["f_solver"]
        self.f_solver = _get_forward_solver(opt["f_solver"])
        try:
            self._f_solver_params = set(inspect.signature(self.f_solver).parameters)
        except (TypeError, ValueError):  # builtins / C callables: pass everything
            self._f_solver_params = {"tol", "stop_mode"}
        b_solver = opt["b_solver"]
        self.b_method = "shine" if mode == "shine" else _B_SOLVER_METHODS.get(b_solver, b_solver)
        if self.b_method == "shine" and mode != "shine":
            raise ValueError("b_solver='shine' needs the forward Broyden factors: use "
                             "grad_mode='shine' with f_solver='broyden'")
        if self.b_method not in BACKWARD_METHODS:
            raise ValueError(f"b_solver must be one of {sorted(_B_SOLVER_METHODS)} or "
                             f"{list(BACKWARD_METHODS)}, got {b_solver!r}")
        self.f_max_iter, self.b_max_iter = opt["f_max_iter"], opt["b_max_iter"]
        self.f_tol, self.b_tol = float(opt["f_tol"]), float(opt["b_tol"])
        self.f_stop_mode, self.b_stop_mode = opt["f_stop_mode"], opt["b_stop_mode"]
        self.eval_f_max_iter = (opt["eval_f_max_iter"] if opt["eval_f_max_iter"] > 0
                                else int(self.f_max_iter * opt["eval_factor"]))
        self.core, self.grad_mode = opt["core"], mode
        self.grad_steps, self.tau = grad, tau
        self.sup_gap = int(opt["sup_gap"])
        self.sup_loc = list(opt["sup_loc"] or [])
        self.n_states = int(opt["n_states"])
        self.indexing_arg = list(opt["indexing"] or [])
        if self.n_states < 1:
            raise ValueError(f"n_states must be >= 1, got {self.n_states}")
        self.indexing = self._compute_f_iter(self.f_max_iter)
        if len(grad) not in (1, len(self.indexing)):
            raise ValueError(f"grad has {len(grad)} entries but {len(self.indexing)} states are "
                             "sampled (n_states/indexing); give one value or one per state")
        if mode == "shine" and len(self.indexing) > 1 and self.core == "indexing":
            raise NotImplementedError("grad_mode='shine' with core='indexing' and several states "
                                      "(n_states/indexing) is not supported; use core='sliced'")
        if mode == "exact" and len(self.indexing) == 1 and (grad != [1] or tau != 1.0):
            warnings.warn(f"grad={opt['grad']!r}/tau={tau} only shape phantom gradients, but "
                          "grad_mode='exact' (deq_fast's default); pass grad_mode='phantom' for "
                          "TorchDEQ's phantom gradient", UserWarning, stacklevel=3)

    def extra_repr(self) -> str:
        return (f"core={self.core!r}, grad_mode={self.grad_mode!r}, f_solver={self.f_solver_name!r}"
                f", f_max_iter={self.f_max_iter}, f_tol={self.f_tol:g}, b_method={self.b_method!r}"
                f", b_max_iter={self.b_max_iter}, b_tol={self.b_tol:g}")

    def _compute_f_iter(self, f_max_iter: int) -> list[int]:
        """Solver steps at which states are sampled (TorchDEQ's rule for each core)."""
        n = self.n_states
        if self.core == "indexing":
            if n > 1:
                n = max(min(f_max_iter, n), 1)
                delta = int(f_max_iter // n)
                if f_max_iter % n == 0:
                    return [(k + 1) * delta for k in range(n)]
                return [f_max_iter - (n - k - 1) * delta for k in range(n)]
            return [*self.indexing_arg, f_max_iter]
        if n > 1:
            return [int(f_max_iter // n) for _ in range(n)]
        steps, prev = [], 0
        for idx in [*self.indexing_arg, f_max_iter]:
            steps.append(idx - prev)
            prev = idx
        if any(s < 1 for s in steps):
            raise ValueError(f"indexing={self.indexing_arg} must be increasing and below "
                             f"f_max_iter={f_max_iter}")
        return steps

    def _solve(self, ffunc, z0, max_iter, tol_kw, indexing=None):
        kw = dict(max_iter=max_iter)
        # tol/stop_mode only for solvers that take them (simple_fixed_point_iter does not)
        kw.update({k: v for k, v in (("tol", self.f_tol), ("stop_mode", self.f_stop_mode))
                   if k in self._f_solver_params})
        kw.update(tol_kw)
        with torch.no_grad():
            z, traj, info = self.f_solver(ffunc, z0, indexing=indexing, **kw)
        return z, traj, dict(info)

    def _produce(self, ffunc, z_star, kind, factors, info, writer) -> list[torch.Tensor]:
        """Tracked output state(s) at the (detached) solver estimate ``z_star``."""
        z_star = z_star.detach()
        if kind[0] == "phantom":
            return _phantom(ffunc, z_star, kind[1], kind[2], self.sup_gap, self.sup_loc)
        if not torch.is_grad_enabled():   # e.g. a training-mode forward under torch.no_grad()
            return [ffunc(z_star)]
        z = z_star.requires_grad_()
        fz = ffunc(z)
        if not _needs_grad_beyond(fz, z):  # no parameter or input of func needs a gradient
            return [fz.detach()]
        cfg = dict(method=self.b_method, max_iter=self.b_max_iter, tol=self.b_tol,
                   factors=factors, info=info, writer=writer)
        return [_ImplicitGrad.apply(fz, z, cfg)]

    def _kinds(self, n: int) -> list[tuple]:
        steps = self.grad_steps if len(self.grad_steps) == n else self.grad_steps * n
        if self.grad_mode == "jfb":
            return [("phantom", 1, 1.0)] * n
        kinds = [("phantom", k, self.tau) for k in steps]
        if self.grad_mode in ("exact", "shine"):
            kinds[-1] = (self.grad_mode,)
        return kinds

    def forward(self, func: Callable, z_init: Any, solver_kwargs: dict | None = None,
                sradius_mode: bool = False, backward_writer: Callable | None = None,
                **kwargs: Any):
        """Solve ``z* = func(z*)`` from ``z_init`` and attach the gradient; see the class doc.

        Returns:
            ``(z_out, info)``: list of states shaped like ``z_init`` and the statistics dict.
        """
        if kwargs:
            raise TypeError(f"DEQ.forward() got unexpected keyword arguments {sorted(kwargs)}")
        if solver_kwargs is not None and not isinstance(solver_kwargs, dict):
            raise ValueError(f"solver_kwargs must be a dict, got {type(solver_kwargs).__name__}")
        packer = Packer(z_init, "z_init")
        ffunc = _FlatFunc(func, packer)
        z0 = packer.pack(z_init).detach()
        skw = dict(solver_kwargs or {})
        f_max_iter = skw.pop("f_max_iter", None)
        info: dict = {}
        track = torch.is_grad_enabled()

        if not self.training:
            max_iter = int(f_max_iter) if f_max_iter is not None else self.eval_f_max_iter
            if self.grad_mode == "shine" and track:
                with torch.no_grad():
                    z_star, sinfo, factors = _solve_broyden_with_factors(
                        ffunc, z0, max_iter, skw.get("tol", self.f_tol), self.f_stop_mode)
            else:
                z_star, _, sinfo = self._solve(ffunc, z0, max_iter, skw)
                factors = None
            info.update(sinfo)
            kinds = self._kinds(1)
            if track:
                out = self._produce(ffunc, z_star, kinds[-1], factors, info, backward_writer)
                z_list = [out[-1]]
            else:
                z_list = [z_star]
        else:
            max_iter = int(f_max_iter) if f_max_iter is not None else self.f_max_iter
            indexing = self._compute_f_iter(max_iter) if f_max_iter is not None else self.indexing
            kinds = self._kinds(len(indexing))
            z_list = []
            if self.core == "indexing":
                z_star, traj, sinfo = self._solve(ffunc, z0, max_iter, skw, indexing=indexing)
                info.update(sinfo)
                traj = list(traj)[: len(indexing)]
                traj += [z_star] * (len(indexing) - len(traj))  # solver stopped early
                traj[-1] = z_star
                for z_pred, kind in zip(traj, kinds):
                    z_list += self._produce(ffunc, z_pred, kind, None, info, backward_writer)
            else:
                z = z0
                for steps, kind in zip(indexing, kinds):
                    factors = None
                    if kind[0] == "shine":
                        with torch.no_grad():
                            z_star, sinfo, factors = _solve_broyden_with_factors(
                                ffunc, z, steps, skw.get("tol", self.f_tol), self.f_stop_mode)
                    else:
                        z_star, _, sinfo = self._solve(ffunc, z, steps, skw)
                    info.update(sinfo)
                    z_list += self._produce(ffunc, z_star, kind, factors, info, backward_writer)
                    z = z_list[-1].detach()

        info["nfe"] = ffunc.nfe
        if sradius_mode:
            zs = z_list[-1].detach().requires_grad_()
            with torch.enable_grad():
                fzs = ffunc(zs)
            info["sradius"] = power_method(fzs, zs, n_iters=100)[1].detach()
        else:
            info.setdefault("sradius", torch.full((1,), -1.0, device=z0.device))
        return [packer.unpack(z) for z in z_list], info


def get_deq(args: Any = None, **kwargs: Any) -> DEQ:
    """Build a :class:`DEQ` module from TorchDEQ-style options.

    Options (``kwargs`` override ``args``; ``args`` may be a dict, an ``argparse.Namespace`` such as
    :func:`add_deq_args` produces, or a TorchDEQ ``DEQConfig``; unrelated keys in ``args`` are
    ignored, unknown keyword arguments raise ``TypeError`` naming them):

    * ``f_solver='fixed_point_iter'`` (``'anderson'``, ``'broyden'``, ``'simple_fixed_point_iter'``
      or a solver registered with ``deq_fast.register_solver``), ``f_max_iter=40``, ``f_tol=1e-3``,
      ``f_stop_mode='abs'``; ``eval_factor=1.0`` / ``eval_f_max_iter=0`` (evaluation cap).
    * ``grad_mode='exact'``: ``'exact'`` (implicit differentiation; alias ``'ift'``),
      ``'phantom'`` (TorchDEQ's default: ``grad``-step unrolled gradient with damping ``tau``),
      ``'jfb'`` (1 step, no damping), ``'shine'`` (forward Broyden factors, 0 VJPs; needs
      ``f_solver='broyden'``). ``ift``/``hook_ift=True`` are accepted and mean ``'exact'``.
    * ``b_solver='auto'`` (backward method of :func:`deq_fast.implicit.backward.implicit_backward`:
      ``'auto'``, ``'gmres'``, ``'anderson'``, ``'broyden'``, ``'fixed_point'``; TorchDEQ's
      ``'fixed_point_iter'`` means ``'fixed_point'``), ``b_max_iter=40`` (VJPs), ``b_tol=1e-6``.
      The backward always stops per sample on the relative residual
      ``||grad + J^T g - g|| / ||grad|| <= b_tol``; ``b_stop_mode`` (default ``'abs'``) is kept
      for compatibility and does not change it. ``stop_mode`` sets ``f_stop_mode`` and
      ``b_stop_mode``.
    * ``core='sliced'`` or ``'indexing'``, ``n_states=1``, ``indexing=None``, ``grad=1``,
      ``tau=1.0``, ``sup_gap=-1``, ``sup_loc=None`` with TorchDEQ's meaning; states other than
      the last always use the phantom gradient (as TorchDEQ with ``ift=True``).
    * ``no_stat`` is accepted and ignored (states are always packed to ``(B, D)``).

    Returns:
        A :class:`DEQ` module.

    Example:
        >>> deq = get_deq(f_solver="anderson", f_max_iter=30, stop_mode="rel")
        >>> torchdeq_like = get_deq(grad_mode="phantom")   # TorchDEQ's default 1-step gradient
    """
    return DEQ(args, **kwargs)


def reset_deq(model: nn.Module) -> None:
    """Recompute normalised weights and draw new variational-dropout masks (once per step).

    Args:
        model: the module holding ``f``'s layers.

    Example:
        >>> reset_deq(deq_layer)     # at the start of each training iteration
    """
    reset_norm(model)
    reset_dropout(model)


def add_deq_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add TorchDEQ's command-line options (plus ``--grad_mode`` and ``--stop_mode``) to ``parser``.

    Defaults are TorchDEQ's except ``--grad_mode exact`` and ``--b_solver auto`` (see
    :func:`get_deq`). Returns the parser.

    Example:
        >>> parser = argparse.ArgumentParser(); add_deq_args(parser)
        >>> deq = get_deq(parser.parse_args(["--f_solver", "anderson"]))
    """
    add = parser.add_argument
    add("--f_solver", default="fixed_point_iter", type=str, help="forward solver")
    add("--b_solver", default="auto", type=str, help="backward method (auto, fixed_point_iter, "
        "anderson, broyden, or a deq_fast backward method name)")
    add("--f_max_iter", type=int, default=40, help="forward solver iteration cap")
    add("--b_max_iter", type=int, default=40, help="backward solver iteration cap")
    add("--f_tol", type=float, default=1e-3, help="forward tolerance")
    add("--b_tol", type=float, default=1e-6, help="backward tolerance")
    add("--f_stop_mode", type=str, default="abs", choices=["abs", "rel"])
    add("--b_stop_mode", type=str, default="abs", choices=["abs", "rel"])
    add("--stop_mode", type=str, default=None, choices=["abs", "rel"],
        help="sets both f_stop_mode and b_stop_mode")
    add("--eval_factor", type=float, default=1.0, help="f_max_iter multiplier at test time")
    add("--eval_f_max_iter", type=int, default=0, help="f_max_iter at test time (overrides)")
    add("--norm_type", default="weight_norm", type=str,
        help="none, weight_norm or spectral_norm (apply_norm)")
    add("--norm_no_scale", action="store_true", help="no learnable scale in the normalisation")
    add("--norm_clip", action="store_true", help="clip the normalisation factor")
    add("--norm_clip_value", default=1.0, type=float, help="upper bound of the factor")
    add("--norm_target_norm", default=1.0, type=float, help="target norm without learned scale")
    add("--sn_n_power_iters", default=1, type=int, help="spectral-norm power iterations")
    add("--core", default="sliced", type=str, choices=list(CORES))
    add("--grad_mode", default="exact", type=str, choices=list(GRAD_MODES) + ["ift"],
        help="exact (default), phantom (TorchDEQ's default), jfb or shine")
    add("--ift", action="store_true", help="exact implicit gradient (deq_fast's default anyway)")
    add("--hook_ift", action="store_true", help="same as --ift (no hooks are used)")
    add("--n_states", type=int, default=1, help="number of sampled states")
    add("--indexing", type=int, nargs="+", default=[], help="solver steps to sample")
    add("--gamma", type=float, default=0.8, help="fixed-point correction decay")
    add("--grad", type=int, nargs="+", default=[1], help="phantom gradient steps")
    add("--tau", type=float, default=1.0, help="phantom gradient damping")
    add("--sup_gap", type=int, default=-1, help="phantom trajectory sampling gap")
    add("--sup_loc", type=int, nargs="+", default=[], help="phantom trajectory sampling steps")
    add("--jac_loss_weight", type=float, default=0.0, help="Jacobian regularisation weight")
    add("--jac_loss_freq", type=float, default=0.0, help="Jacobian regularisation frequency")
    add("--jac_incremental", type=int, default=0, help="increase jac_loss_weight every N steps")
    add("--sradius_mode", action="store_true", help="monitor the spectral radius in validation")
    return parser
