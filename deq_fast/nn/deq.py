"""The DEQ module: forward fixed-point solve plus a choice of gradients, TorchDEQ-compatible.

``get_deq(**options)`` returns a :class:`DEQ` module called as
``deq(func, z_init, solver_kwargs=None, sradius_mode=False, backward_writer=None)`` that returns
``(z_out, info)``, with TorchDEQ's option names and defaults (the TorchDEQ contract,
docs/contracts.md#torchdeq-deq-module)
except:

* **When the caller says nothing about the gradient, it is exact implicit differentiation**: the
  backward solves ``g = grad + J_f(z*)^T g`` with :func:`deq_fast.implicit.backward.implicit_backward`
  and back-propagates ``g`` through one tracked ``f(z*)``. An option the caller passes means what
  it means in TorchDEQ: ``ift=False`` given explicitly (as a keyword, or in an ``args`` namespace
  such as :func:`add_deq_args` builds, which always sets it) is TorchDEQ's ``grad``-step phantom
  gradient with damping ``tau``, as is ``grad_mode='phantom'``; ``grad_mode='jfb'`` is the
  1-step Jacobian-free gradient and ``grad_mode='shine'`` reuses the forward Broyden factors
  (needs ``f_solver='broyden'``). The option parsing is :mod:`deq_fast.nn.options`, the gradient
  functions :mod:`deq_fast.implicit.grad`.
* ``b_solver`` defaults to ``'auto'``: the backward method deq_fast measured cheapest to tolerance
  (restarted GMRES); TorchDEQ's names (``'fixed_point_iter'``, ``'anderson'``, ``'broyden'``)
  select those methods. The backward stops per sample on the relative residual
  ``||grad + J^T g - g|| / ||grad|| <= b_tol`` whatever ``b_stop_mode`` says.
* ``stop_mode=`` sets both ``f_stop_mode`` and ``b_stop_mode`` (TorchDEQ ignores it, issue #12).
* A misspelt option passed to :func:`get_deq` as a keyword raises ``TypeError`` naming it (TorchDEQ
  swallows it); ``args`` namespaces (e.g. from :func:`add_deq_args`) may carry unrelated keys;
  ``name=`` is accepted and stored (``deq.name``). The forward ignores unknown keywords such as
  MDEQ's ``writer=``, as TorchDEQ does (a near-miss of its own keywords warns).
* ``f_max_iter=0`` skips the solver: the gradient is built at ``z_init``, as TorchDEQ does
  (statistics ``abs_lowest = rel_lowest = 1e8``, ``nstep = 0``).
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
import difflib
import inspect
import warnings
from typing import Any, Callable

import torch
from torch import nn

from deq_fast.compat.torchdeq import get_solver
from deq_fast.implicit.backward import METHODS as BACKWARD_METHODS
from deq_fast.implicit.grad import (
    CAPTURED_METHODS,
    BackwardConfig,
    BackwardNotConverged,
    CapturedImplicitGrad,
    GradMethod,
    GradSpec,
    ImplicitGrad,
    grad_plan,
    needs_grad_beyond,
    phantom_grad,
)
from deq_fast.nn.dropout import reset_dropout
from deq_fast.nn.norm import mark_stale_norms, reset_norm
from deq_fast.nn.options import CORES, GRAD_MODES, parse_options, sample_steps
from deq_fast.nn.regularizers import power_method
from deq_fast.solvers.api import solve
from deq_fast.solvers.packing import Packer

__all__ = ["DEQ", "get_deq", "reset_deq", "add_deq_args", "BackwardNotConverged", "GRAD_MODES"]

_FORWARD_KEYWORDS = ("solver_kwargs", "sradius_mode", "backward_writer")
_INIT_LOSS = 1e8  # TorchDEQ's "no step measured yet" residual


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


def _zero_step_info(z0: torch.Tensor) -> dict:
    """Statistics of a solve of 0 steps, as TorchDEQ reports them (nothing measured)."""
    B = z0.shape[0]
    full = torch.full((B,), _INIT_LOSS, dtype=z0.dtype, device=z0.device)
    return {"abs_lowest": full, "rel_lowest": full.clone(), "abs_trace": full[:, None].clone(),
            "rel_trace": full[:, None].clone(), "nstep": torch.zeros_like(full)}


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
        fz = self.evaluate(zf)
        return fz if tau == 1.0 else tau * fz + (1.0 - tau) * zf

    def evaluate(self, zf: torch.Tensor) -> torch.Tensor:
        """``func`` on a flat state, not counted (the captured backward's VJPs)."""
        z = self.packer.unpack(zf)
        out = self.func(z) if self.packer.is_tensor else self.func(*z)
        _check_output(self.packer, out)
        return self.packer.pack(out)


def _ignore_extra_keywords(kwargs: dict) -> None:
    """TorchDEQ's forward ignores unknown keywords (MDEQ passes ``writer=``); so do we, but a
    near-miss of one of our own keywords (``solver_kwarg``) is worth a warning."""
    for key in kwargs:
        close = difflib.get_close_matches(key, _FORWARD_KEYWORDS, n=1, cutoff=0.85)
        if close:
            warnings.warn(f"DEQ.forward() ignores keyword argument {key!r}; did you mean "
                          f"{close[0]!r}?", UserWarning, stacklevel=5)


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

    Under ``torch.compile(fullgraph=True)`` the forward solver runs ``check_every=0`` (exactly
    ``f_max_iter`` iterations) unless ``solver_kwargs`` say otherwise, and the exact gradient is
    :class:`~deq_fast.implicit.grad.CapturedImplicitGrad` (``b_max_iter`` iterations of the
    adjoint fixed point; no ``b_*`` keys are recorded); ``grad_mode='shine'`` raises there.

    Example:
        >>> deq = get_deq(f_solver="anderson", f_max_iter=30, f_tol=1e-6)
        >>> x = torch.randn(4, 8, requires_grad=True); W = 0.3 * torch.randn(8, 8) / 8 ** 0.5
        >>> z_out, info = deq(lambda z: torch.tanh(z @ W + x), torch.zeros(4, 8))
        >>> z_out[-1].shape
        torch.Size([4, 8])
    """


    def __init__(self, args: Any = None, **kwargs: Any):
        super().__init__()
        opts = parse_options(args, kwargs, BACKWARD_METHODS)
        self.options = opts
        self.name = opts.name
        self.f_solver_name = opts.f_solver
        self.f_solver = _get_forward_solver(opts.f_solver)
        try:
            self._f_solver_params = set(inspect.signature(self.f_solver).parameters)
        except (TypeError, ValueError):  # builtins / C callables: pass everything
            self._f_solver_params = {"tol", "stop_mode"}
        self.b_method = opts.b_method
        self.f_max_iter, self.b_max_iter = opts.f_max_iter, opts.b_max_iter
        self.f_tol, self.b_tol = opts.f_tol, opts.b_tol
        self.f_stop_mode, self.b_stop_mode = opts.f_stop_mode, opts.b_stop_mode
        self.eval_f_max_iter = opts.eval_f_max_iter
        self.core, self.grad_mode = opts.core, opts.grad_mode
        self.grad_steps, self.tau = list(opts.grad_steps), opts.tau
        self.sup_gap, self.sup_loc = opts.sup_gap, list(opts.sup_loc)
        self.n_states, self.indexing_arg = opts.n_states, list(opts.indexing_arg)
        self.indexing = self._compute_f_iter(self.f_max_iter)
        self._check_plan()

    def _check_plan(self) -> None:
        """Checks that need the sampled steps (``indexing``) as well as the options."""
        n, grad = len(self.indexing), self.grad_steps
        if len(grad) not in (1, n):
            raise ValueError(f"grad has {len(grad)} entries but {n} states are "
                             "sampled (n_states/indexing); give one value or one per state")
        if self.grad_mode == "shine" and n > 1 and self.core == "indexing":
            raise NotImplementedError("grad_mode='shine' with core='indexing' and several states "
                                      "(n_states/indexing) is not supported; use core='sliced'")
        if self.grad_mode == "exact" and n == 1 and (grad != [1] or self.tau != 1.0):
            shown = grad[0] if len(grad) == 1 else grad
            warnings.warn(f"grad={shown!r}/tau={self.tau} only shape phantom gradients, but "
                          "grad_mode='exact' (deq_fast's default); pass grad_mode='phantom' (or "
                          "ift=False) for TorchDEQ's phantom gradient", UserWarning, stacklevel=4)

    def extra_repr(self) -> str:
        return (f"core={self.core!r}, grad_mode={self.grad_mode!r}, f_solver={self.f_solver_name!r}"
                f", f_max_iter={self.f_max_iter}, f_tol={self.f_tol:g}, b_method={self.b_method!r}"
                f", b_max_iter={self.b_max_iter}, b_tol={self.b_tol:g}")

    def _compute_f_iter(self, f_max_iter: int) -> list[int]:
        """Solver steps at which states are sampled (TorchDEQ's rule for each core)."""
        return sample_steps(self.core, self.n_states, self.indexing_arg, f_max_iter)

    def _kinds(self, n: int) -> list[GradSpec]:
        return grad_plan(self.grad_mode, self.grad_steps, self.tau, n)

    # ------------------------------------------------------------------ one solver segment
    def _solve(self, ffunc, z0, max_iter, tol_kw, indexing=None):
        """``(z, trajectory, info)`` of the forward solver from ``z0`` (no graph); 0 steps skip
        the solver and return ``z0`` (TorchDEQ's ``f_max_iter=0``)."""
        if max_iter == 0:
            return z0, [z0] if indexing else [], _zero_step_info(z0)
        kw = dict(max_iter=max_iter)
        # tol/stop_mode only for solvers that take them (simple_fixed_point_iter does not)
        kw.update({k: v for k, v in (("tol", self.f_tol), ("stop_mode", self.f_stop_mode))
                   if k in self._f_solver_params})
        kw.update(tol_kw)
        with torch.no_grad():
            z, traj, info = self.f_solver(ffunc, z0, indexing=indexing, **kw)
        return z, traj, dict(info)

    def _solve_segment(self, ffunc, z0, steps, skw, with_factors: bool):
        """``(z*, info, factors)``: one forward solve; with the Broyden factors for SHINE."""
        if not with_factors:
            z_star, _, info = self._solve(ffunc, z0, steps, skw)
            return z_star, info, None
        if steps == 0:
            B, D = z0.shape
            empty = z0.new_zeros(B, 0, D)
            return z0, _zero_step_info(z0), (empty, empty)
        with torch.no_grad():
            return _solve_broyden_with_factors(ffunc, z0, steps, skw.get("tol", self.f_tol),
                                               self.f_stop_mode)

    def _produce(self, ffunc, z_star, kind: GradSpec, factors, info, writer) -> list[torch.Tensor]:
        """Tracked output state(s) at the (detached) solver estimate ``z_star``."""
        z_star = z_star.detach()
        if kind.method is GradMethod.PHANTOM:
            return phantom_grad(ffunc, z_star, kind.steps, kind.tau, self.sup_gap, self.sup_loc)
        if not torch.is_grad_enabled():   # e.g. a training-mode forward under torch.no_grad()
            return [ffunc(z_star)]
        if torch.compiler.is_compiling():
            return [self._captured_exact(ffunc, z_star, info, writer)]
        z = z_star.requires_grad_()
        fz = ffunc(z)
        if not needs_grad_beyond(fz, z):  # no parameter or input of func needs a gradient
            return [fz.detach()]
        cfg = BackwardConfig(method=self.b_method, max_iter=self.b_max_iter, tol=self.b_tol,
                             factors=factors, info=info, writer=writer)
        return [ImplicitGrad.apply(fz, z, cfg)]

    def _check_capturable(self) -> None:
        """Under ``torch.compile`` with grad enabled: raise for SHINE, whose forward Broyden
        factors come from a solve that polls the host; name what can be captured."""
        if self.grad_mode == "shine" or (self.grad_mode == "exact"
                                          and self.b_method not in CAPTURED_METHODS):
            raise NotImplementedError(
                f"torch.compile of a DEQ layer supports grad_mode 'exact' (b_method one of "
                f"{sorted(CAPTURED_METHODS)}), 'phantom' and 'jfb'; got grad_mode="
                f"{self.grad_mode!r}, b_method={self.b_method!r}")

    def _captured_exact(self, ffunc, z_star, info, writer) -> torch.Tensor:
        """The exact gradient under ``torch.compile``: :class:`CapturedImplicitGrad` (no walk of
        the autograd graph, no host interaction; see ``docs/design.md``, Full-graph capture)."""
        cfg = BackwardConfig(method=self.b_method, max_iter=self.b_max_iter, tol=self.b_tol,
                             factors=None, info=info, writer=writer)
        return CapturedImplicitGrad.apply(ffunc(z_star), z_star, ffunc.evaluate, cfg)

    # ------------------------------------------------------------------ the three forward paths
    def _forward_eval(self, ffunc, z0, max_iter, skw, info, writer) -> list[torch.Tensor]:
        """Evaluation: one solve to ``eval_f_max_iter``; ``[z*]``, with the gradient attached
        only when autograd records."""
        track = torch.is_grad_enabled()
        kind = self._kinds(1)[-1]
        z_star, sinfo, factors = self._solve_segment(
            ffunc, z0, max_iter, skw, with_factors=track and kind.method is GradMethod.SHINE)
        info.update(sinfo)
        if not track:
            return [z_star]
        return [self._produce(ffunc, z_star, kind, factors, info, writer)[-1]]

    def _forward_indexing(self, ffunc, z0, max_iter, indexing, skw, info, writer):
        """Training, ``core='indexing'``: one solve, the gradient attached at each sampled step."""
        z_star, traj, sinfo = self._solve(ffunc, z0, max_iter, skw, indexing=indexing)
        info.update(sinfo)
        traj = list(traj)[: len(indexing)]
        traj += [z_star] * (len(indexing) - len(traj))  # solver stopped early
        traj[-1] = z_star
        z_list: list[torch.Tensor] = []
        for z_pred, kind in zip(traj, self._kinds(len(indexing))):
            z_list += self._produce(ffunc, z_pred, kind, None, info, writer)
        return z_list

    def _forward_sliced(self, ffunc, z0, segments, skw, info, writer):
        """Training, ``core='sliced'``: solve each segment from the previous tracked output."""
        z, z_list = z0, []
        for steps, kind in zip(segments, self._kinds(len(segments))):
            z_star, sinfo, factors = self._solve_segment(
                ffunc, z, steps, skw, with_factors=kind.method is GradMethod.SHINE)
            info.update(sinfo)
            z_list += self._produce(ffunc, z_star, kind, factors, info, writer)
            z = z_list[-1].detach()
        return z_list

    def forward(self, func: Callable, z_init: Any, solver_kwargs: dict | None = None,
                sradius_mode: bool = False, backward_writer: Callable | None = None,
                **kwargs: Any):
        """Solve ``z* = func(z*)`` from ``z_init`` and attach the gradient; see the class doc.

        Extra keyword arguments (e.g. MDEQ's ``writer=``) are ignored, as TorchDEQ does.

        Returns:
            ``(z_out, info)``: list of states shaped like ``z_init`` and the statistics dict.
        """
        _ignore_extra_keywords(kwargs)
        if solver_kwargs is not None and not isinstance(solver_kwargs, dict):
            raise ValueError(f"solver_kwargs must be a dict, got {type(solver_kwargs).__name__}")
        mark_stale_norms()   # normalised layers updated in place since their weights were computed
        packer = Packer(z_init, "z_init")
        ffunc = _FlatFunc(func, packer)
        z0 = packer.pack(z_init).detach()
        skw = dict(solver_kwargs or {})
        if torch.compiler.is_compiling():
            if torch.is_grad_enabled():
                self._check_capturable()
            if "kwargs" in self._f_solver_params:
                skw.setdefault("check_every", 0)   # a fixed iteration count: no host look
        f_max_iter = skw.pop("f_max_iter", None)
        info: dict = {}
        if not self.training:
            max_iter = int(f_max_iter) if f_max_iter is not None else self.eval_f_max_iter
            z_list = self._forward_eval(ffunc, z0, max_iter, skw, info, backward_writer)
        else:
            max_iter = int(f_max_iter) if f_max_iter is not None else self.f_max_iter
            indexing = self._compute_f_iter(max_iter) if f_max_iter is not None else self.indexing
            if self.core == "indexing":
                z_list = self._forward_indexing(ffunc, z0, max_iter, indexing, skw, info,
                                                backward_writer)
            else:
                z_list = self._forward_sliced(ffunc, z0, indexing, skw, info, backward_writer)
        self._finish_info(info, ffunc, z_list[-1], sradius_mode)
        return [packer.unpack(z) for z in z_list], info

    @staticmethod
    def _finish_info(info: dict, ffunc: _FlatFunc, z_last: torch.Tensor, sradius_mode: bool):
        """Add ``nfe`` and ``sradius`` (power method at the output, or TorchDEQ's -1)."""
        info["nfe"] = ffunc.nfe
        if sradius_mode:
            zs = z_last.detach().requires_grad_()
            with torch.enable_grad():
                fzs = ffunc(zs)
            info["sradius"] = power_method(fzs, zs, n_iters=100)[1].detach()
        else:
            info.setdefault("sradius", torch.full((1,), -1.0, device=z_last.device))


def get_deq(args: Any = None, **kwargs: Any) -> DEQ:
    """Build a :class:`DEQ` module from TorchDEQ-style options.

    Options (``kwargs`` override ``args``; ``args`` may be a dict, an ``argparse.Namespace`` such as
    :func:`add_deq_args` produces, or a TorchDEQ ``DEQConfig``; unrelated keys in ``args`` are
    ignored, unknown keyword arguments raise ``TypeError`` naming them):

    * ``f_solver='fixed_point_iter'`` (``'anderson'``, ``'broyden'``, ``'simple_fixed_point_iter'``
      or a solver registered with ``deq_fast.register_solver``), ``f_max_iter=40``, ``f_tol=1e-3``,
      ``f_stop_mode='abs'``; ``eval_factor=1.0`` / ``eval_f_max_iter=0`` (evaluation cap).
    * ``grad_mode``: ``'exact'`` (implicit differentiation; alias ``'ift'``),
      ``'phantom'`` (TorchDEQ's default: ``grad``-step unrolled gradient with damping ``tau``),
      ``'jfb'`` (1 step, no damping), ``'shine'`` (forward Broyden factors, 0 VJPs; needs
      ``f_solver='broyden'``). Unset, it is ``'exact'`` if ``ift``/``hook_ift`` is true,
      ``'phantom'`` if the caller gave ``ift=False`` (keyword or ``args`` key), else ``'exact'``.
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
    * ``no_stat`` is accepted and ignored (states are always packed to ``(B, D)``); ``name`` is
      stored as ``deq.name``; ``f_max_iter=0`` skips the solver (TorchDEQ).

    Returns:
        A :class:`DEQ` module.

    Example:
        >>> deq = get_deq(f_solver="anderson", f_max_iter=30, stop_mode="rel")
        >>> torchdeq_like = get_deq(ift=False, grad=3, tau=0.5)   # TorchDEQ's phantom gradient
        >>> torchdeq_like.grad_mode
        'phantom'
    """
    return DEQ(args, **kwargs)


def reset_deq(model: nn.Module) -> None:
    """Recompute normalised weights and draw new variational-dropout masks (once per step).

    Args:
        model: the module holding ``f``'s layers.

    Example:
        >>> from deq_fast.nn.dropout import VariationalDropout
        >>> from deq_fast.nn.norm import apply_norm
        >>> deq_layer = nn.Sequential(nn.Linear(8, 8), VariationalDropout(0.5))
        >>> apply_norm(deq_layer, "weight_norm"); y = deq_layer(torch.randn(4, 8))
        >>> reset_deq(deq_layer)     # at the start of each training iteration
        >>> deq_layer[1].mask is None
        True
    """
    reset_norm(model)
    reset_dropout(model)


def add_deq_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add TorchDEQ's command-line options (plus ``--grad_mode`` and ``--stop_mode``) to ``parser``.

    Defaults are TorchDEQ's except ``--b_solver auto`` (see :func:`get_deq`): without ``--ift``
    (or ``--grad_mode``) the namespace means TorchDEQ's phantom gradient. Returns the parser.

    Example:
        >>> parser = add_deq_args(argparse.ArgumentParser())
        >>> deq = get_deq(parser.parse_args(["--f_solver", "anderson"]))
        >>> deq.options.f_solver, deq.grad_mode
        ('anderson', 'phantom')
    """
    add = parser.add_argument
    add("--f_solver", default="fixed_point_iter", type=str, help="forward solver")
    add("--b_solver", default="auto", type=str, help="backward method (auto, fixed_point_iter, "
        "anderson, broyden, or a deq_fast backward method name)")
    add("--f_stop_mode", type=str, default="abs", choices=["abs", "rel"])
    add("--b_stop_mode", type=str, default="abs", choices=["abs", "rel"])
    add("--stop_mode", type=str, default=None, choices=["abs", "rel"],
        help="sets both f_stop_mode and b_stop_mode")
    add("--core", default="sliced", type=str, choices=list(CORES))
    add("--grad_mode", default=None, type=str, choices=list(GRAD_MODES) + ["ift"],
        help="exact, phantom, jfb or shine (default: exact with --ift, else phantom)")
    add("--ift", action="store_true", help="exact implicit gradient (else the phantom gradient)")
    add("--hook_ift", action="store_true", help="same as --ift (no hooks are used)")
    add_common_deq_args(parser)
    return parser


def add_common_deq_args(parser: argparse.ArgumentParser) -> None:
    """The options that deq_fast's and the TorchDEQ namespace's ``add_deq_args`` share, with
    TorchDEQ's defaults: caps and tolerances, test-time caps, normalisation, state sampling,
    phantom-gradient shape, regularisation and monitoring."""
    add = parser.add_argument
    add("--f_max_iter", type=int, default=40, help="forward solver iteration cap (0: no solve)")
    add("--b_max_iter", type=int, default=40, help="backward solver iteration cap")
    add("--f_tol", type=float, default=1e-3, help="forward tolerance")
    add("--b_tol", type=float, default=1e-6, help="backward tolerance")
    add("--eval_factor", type=float, default=1.0, help="f_max_iter multiplier at test time")
    add("--eval_f_max_iter", type=int, default=0, help="f_max_iter at test time (overrides)")
    add("--norm_type", default="weight_norm", type=str,
        help="none, weight_norm or spectral_norm (apply_norm)")
    add("--norm_no_scale", action="store_true", help="no learnable scale in the normalisation")
    add("--norm_clip", action="store_true", help="clip the normalisation factor")
    add("--norm_clip_value", default=1.0, type=float, help="upper bound of the factor")
    add("--norm_target_norm", default=1.0, type=float, help="target norm without learned scale")
    add("--sn_n_power_iters", default=1, type=int, help="spectral-norm power iterations")
    add("--n_states", type=int, default=1, help="number of sampled states")
    add("--indexing", type=int, nargs="+", default=[], help="solver steps to sample")
    add("--gamma", type=float, default=0.8, help="fixed-point correction decay")
    add("--grad", type=int, nargs="+", default=[1], help="phantom gradient steps")
    add("--tau", type=float, default=1.0, help="phantom gradient damping")
    add("--sup_gap", type=int, default=-1, help="phantom trajectory sampling gap")
    add("--sup_loc", type=int, nargs="+", default=[], help="phantom trajectory sampling steps")
    add("--jac_loss_weight", type=float, default=0.0, help="Jacobian regularisation weight")
    add("--jac_loss_freq", type=float, default=0.0, help="Jacobian regularisation frequency")
    add("--jac_incremental", type=int, default=0, help="raise jac_loss_weight every N steps")
    add("--sradius_mode", action="store_true", help="monitor the spectral radius in validation")
