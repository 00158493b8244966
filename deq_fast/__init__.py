"""deq_fast: fast fixed-point solvers and implicit differentiation for deep equilibrium models.

Public API (imported lazily, so ``import deq_fast`` works without Triton, CUDA or the compiled
extension ``deq_fast._C``):

* locuslab/deq style:   ``anderson``, ``broyden``                       (dict results)
* TorchDEQ style:       ``anderson_solver``, ``broyden_solver``, ``fixed_point_iter``,
                        ``simple_fixed_point_iter``, ``get_solver``, ``register_solver``
* native:               ``solve`` -> :class:`SolveResult`
* DEQ module:           ``get_deq``, ``reset_deq`` and the TorchDEQ-style utilities
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> submodule that defines it
_EXPORTS = {
    # solvers
    "solve": "deq_fast.solver", "SolveResult": "deq_fast.solver",
    "anderson": "deq_fast.compat_locuslab", "broyden": "deq_fast.compat_locuslab",
    "anderson_solver": "deq_fast.compat_torchdeq", "broyden_solver": "deq_fast.compat_torchdeq",
    "fixed_point_iter": "deq_fast.compat_torchdeq",
    "simple_fixed_point_iter": "deq_fast.compat_torchdeq",
    "get_solver": "deq_fast.compat_torchdeq", "register_solver": "deq_fast.compat_torchdeq",
    # backend information
    "extension_status": "deq_fast._ext", "triton_status": "deq_fast._backend",
    # DEQ module and utilities
    "get_deq": "deq_fast.deq", "reset_deq": "deq_fast.deq", "DEQ": "deq_fast.deq",
    "add_deq_args": "deq_fast.deq", "BackwardNotConverged": "deq_fast.deq",
    "implicit_backward": "deq_fast.backward",
    "jac_reg": "deq_fast.utils", "power_method": "deq_fast.utils",
    "fp_correction": "deq_fast.utils", "mixed_init": "deq_fast.utils",
    "apply_norm": "deq_fast.norm", "reset_norm": "deq_fast.norm", "remove_norm": "deq_fast.norm",
    "VariationalDropout1d": "deq_fast.dropout", "VariationalDropout2d": "deq_fast.dropout",
    "VariationalDropout3d": "deq_fast.dropout", "VariationalDropToken1d": "deq_fast.dropout",
    "VariationalDropToken2d": "deq_fast.dropout", "VariationalDropToken3d": "deq_fast.dropout",
    "reset_dropout": "deq_fast.dropout",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'deq_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
