"""The DEQ module's options: TorchDEQ's names and defaults, parsed once into :class:`DEQOptions`.

:func:`parse_options` merges an ``args`` object (dict, ``argparse.Namespace``, TorchDEQ
``DEQConfig``) with keyword arguments (keywords win), validates every value with an error that
names the option, and resolves the gradient mode:

* ``grad_mode`` given (not None): that mode (``'ift'``/``'implicit'`` mean ``'exact'``,
  ``'1-step'`` means ``'jfb'``); ``ift=True`` with another mode is an error.
* else ``ift=True`` or ``hook_ift=True``: ``'exact'``.
* else ``ift=False`` given by the caller (as a keyword, or as a key of ``args``, which TorchDEQ's
  and deq_fast's :func:`~deq_fast.nn.deq.add_deq_args` always set): ``'phantom'``, TorchDEQ's
  ``grad``-step phantom gradient with damping ``tau``.
* else (nothing said): ``'exact'``, deq_fast's default.
"""
from __future__ import annotations

import argparse
import difflib
from dataclasses import dataclass
from typing import Any

__all__ = ["DEQOptions", "parse_options", "sample_steps", "GRAD_MODES", "CORES", "DEFAULTS"]

GRAD_MODES = ("exact", "phantom", "jfb", "shine")
CORES = ("sliced", "indexing")
_MODE_ALIASES = {"ift": "exact", "implicit": "exact", "1-step": "jfb"}

# option -> default. TorchDEQ's names and defaults, except grad_mode / b_solver (module doc).
DEFAULTS: dict[str, Any] = {
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
    "grad_mode": None,
    "ift": False,
    "hook_ift": False,
    "grad": 1,
    "tau": 1.0,
    "sup_gap": -1,
    "sup_loc": None,
    "n_states": 1,
    "indexing": None,
    "name": None,
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
B_SOLVER_METHODS = {
    "fixed_point_iter": "fixed_point",
    "simple_fixed_point_iter": "fixed_point",
}


@dataclass(frozen=True)
class DEQOptions:
    """Resolved, validated options of a :class:`~deq_fast.nn.deq.DEQ` module.

    ``f_solver`` is the name (or callable) the user gave; ``b_method`` is the resolved
    :func:`~deq_fast.implicit.backward.implicit_backward` method; ``grad_steps`` has one entry or
    one per sampled state; ``eval_f_max_iter`` is the evaluation cap after ``eval_factor``.
    """

    f_solver: Any
    b_method: str
    f_max_iter: int
    b_max_iter: int
    f_tol: float
    b_tol: float
    f_stop_mode: str
    b_stop_mode: str
    eval_f_max_iter: int
    core: str
    grad_mode: str
    grad_steps: tuple[int, ...]
    tau: float
    sup_gap: int
    sup_loc: tuple[int, ...]
    n_states: int
    indexing_arg: tuple[int, ...]
    name: str | None


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
        if key in DEFAULTS:
            continue
        if key in _OTHER_ARG_KEYS:
            raise TypeError(f"{where} got option {key!r}, which is not a DEQ option (it belongs "
                            f"to {_OTHER_ARG_KEYS[key]})")
        close = difflib.get_close_matches(key, list(DEFAULTS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise TypeError(f"{where} got an unexpected keyword argument {key!r}{hint}")


def _merge(args: Any, kwargs: dict) -> tuple[dict, dict]:
    """``(given, opt)``: the options the caller gave (``args`` keys filtered, ``kwargs`` on top)
    and the full option dict with defaults, stop modes resolved."""
    given = {k: v for k, v in _config_dict(args).items() if k in DEFAULTS}
    given.update(kwargs)
    opt = dict(DEFAULTS)
    opt.update({k: v for k, v in given.items() if v is not None})
    if given.get("stop_mode") is not None:
        if opt["stop_mode"] not in ("abs", "rel"):
            raise ValueError(f"stop_mode must be 'abs' or 'rel', got {opt['stop_mode']!r}")
        for key in ("f_stop_mode", "b_stop_mode"):
            opt[key] = given[key] if key in kwargs else opt["stop_mode"]
    return given, opt


def _check_values(opt: dict) -> None:
    for key in ("f_stop_mode", "b_stop_mode"):
        if opt[key] not in ("abs", "rel"):
            raise ValueError(f"{key} must be 'abs' or 'rel', got {opt[key]!r}")
    if not isinstance(opt["f_max_iter"], int) or opt["f_max_iter"] < 0:
        raise ValueError(f"f_max_iter must be an int >= 0 (0 skips the solver), "
                         f"got {opt['f_max_iter']!r}")
    if not isinstance(opt["b_max_iter"], int) or opt["b_max_iter"] < 1:
        raise ValueError(f"b_max_iter must be a positive int, got {opt['b_max_iter']!r}")
    for key in ("f_tol", "b_tol"):
        if not opt[key] > 0:
            raise ValueError(f"{key} must be > 0, got {opt[key]!r}")
    if opt["core"] not in CORES:
        raise ValueError(f"core must be one of {CORES}, got {opt['core']!r}")
    if int(opt["n_states"]) < 1:
        raise ValueError(f"n_states must be >= 1, got {opt['n_states']}")


def _grad_mode(given: dict, opt: dict) -> str:
    """The gradient mode by the precedence in the module docstring."""
    ift_on = bool(opt["ift"] or opt["hook_ift"])
    if given.get("grad_mode") is None:
        if ift_on:
            return "exact"
        return "phantom" if given.get("ift") is not None else "exact"
    mode = _MODE_ALIASES.get(opt["grad_mode"], opt["grad_mode"])
    if mode not in GRAD_MODES:
        raise ValueError(f"grad_mode must be one of {GRAD_MODES}, got {opt['grad_mode']!r}")
    if ift_on and mode != "exact":
        raise ValueError(f"ift=True asks for the exact gradient but grad_mode={mode!r}")
    return mode


def _grad_and_tau(opt: dict) -> tuple[tuple[int, ...], float]:
    grad = opt["grad"]
    grad = [grad] if isinstance(grad, int) else list(grad)
    if not grad or any(not isinstance(k, int) or k < 1 for k in grad):
        raise ValueError(f"grad must be a positive int or a list of them, got {opt['grad']!r}")
    tau = float(opt["tau"])
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {opt['tau']!r}")
    return tuple(grad), tau


def _b_method(b_solver: Any, mode: str, f_solver: Any, methods: tuple[str, ...]) -> str:
    if mode == "shine" and f_solver != "broyden":
        raise ValueError("grad_mode='shine' needs f_solver='broyden' (it reuses the forward "
                         f"Broyden factors), got f_solver={f_solver!r}")
    method = "shine" if mode == "shine" else B_SOLVER_METHODS.get(b_solver, b_solver)
    if method == "shine" and mode != "shine":
        raise ValueError("b_solver='shine' needs the forward Broyden factors: use "
                         "grad_mode='shine' with f_solver='broyden'")
    if method not in methods:
        raise ValueError(f"b_solver must be one of {sorted(B_SOLVER_METHODS)} or "
                         f"{list(methods)}, got {b_solver!r}")
    return method


def parse_options(args: Any, kwargs: dict, backward_methods: tuple[str, ...],
                  where: str = "get_deq()") -> DEQOptions:
    """Merge, validate and resolve DEQ options (see the module docstring).

    Args:
        args: ``None``, a dict, a namespace or a TorchDEQ ``DEQConfig``; unrelated keys ignored.
        kwargs: keyword options; an unknown key raises ``TypeError`` naming it.
        backward_methods: the accepted backward method names.
        where: the caller's name for error messages.

    Returns:
        :class:`DEQOptions`.

    Example:
        >>> parse_options(None, {"ift": False}, ("auto", "gmres")).grad_mode
        'phantom'
    """
    _check_keys(kwargs, where)
    given, opt = _merge(args, kwargs)
    _check_values(opt)
    mode = _grad_mode(given, opt)
    grad, tau = _grad_and_tau(opt)
    eval_cap = (opt["eval_f_max_iter"] if opt["eval_f_max_iter"] > 0
                else int(opt["f_max_iter"] * opt["eval_factor"]))
    return DEQOptions(
        f_solver=opt["f_solver"], b_method=_b_method(opt["b_solver"], mode, opt["f_solver"],
                                                     backward_methods),
        f_max_iter=opt["f_max_iter"], b_max_iter=opt["b_max_iter"], f_tol=float(opt["f_tol"]),
        b_tol=float(opt["b_tol"]), f_stop_mode=opt["f_stop_mode"],
        b_stop_mode=opt["b_stop_mode"], eval_f_max_iter=eval_cap, core=opt["core"],
        grad_mode=mode, grad_steps=grad, tau=tau, sup_gap=int(opt["sup_gap"]),
        sup_loc=tuple(opt["sup_loc"] or ()), n_states=int(opt["n_states"]),
        indexing_arg=tuple(opt["indexing"] or ()), name=opt["name"])


def sample_steps(core: str, n_states: int, indexing_arg: tuple[int, ...] | list[int],
                 f_max_iter: int) -> list[int]:
    """Solver steps at which states are sampled (TorchDEQ's rule for each core).

    ``'indexing'``: the absolute steps; ``'sliced'``: the length of each solver segment. With
    ``f_max_iter=0`` every entry is 0 (no solver step, as TorchDEQ).

    Example:
        >>> sample_steps("sliced", 1, [3], 10), sample_steps("indexing", 2, [], 10)
        ([3, 7], [5, 10])
    """
    n = n_states
    if core == "indexing":
        if n > 1:
            n = max(min(f_max_iter, n), 1)
            delta = int(f_max_iter // n)
            if f_max_iter % n == 0:
                return [(k + 1) * delta for k in range(n)]
            return [f_max_iter - (n - k - 1) * delta for k in range(n)]
        return [*indexing_arg, f_max_iter]
    if n > 1:
        return [int(f_max_iter // n) for _ in range(n)]
    steps, prev = [], 0
    for idx in [*indexing_arg, f_max_iter]:
        steps.append(idx - prev)
        prev = idx
    if any(s < 0 for s in steps) or (f_max_iter > 0 and any(s < 1 for s in steps)):
        raise ValueError(f"indexing={list(indexing_arg)} must be increasing and below "
                         f"f_max_iter={f_max_iter}")
    return steps

