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
    "solve": "deq_fast.solvers.api", "SolveResult": "deq_fast.solvers.api",
    "anderson": "deq_fast.compat.locuslab", "broyden": "deq_fast.compat.locuslab",
    "anderson_solver": "deq_fast.compat.torchdeq", "broyden_solver": "deq_fast.compat.torchdeq",
    "fixed_point_iter": "deq_fast.compat.torchdeq",
    "simple_fixed_point_iter": "deq_fast.compat.torchdeq",
    "get_solver": "deq_fast.compat.torchdeq", "register_solver": "deq_fast.compat.torchdeq",
    # backend information
    "extension_status": "deq_fast.ops.extension", "triton_status": "deq_fast.ops.backends",
    # DEQ module and utilities
    "get_deq": "deq_fast.nn.deq", "reset_deq": "deq_fast.nn.deq", "DEQ": "deq_fast.nn.deq",
    "add_deq_args": "deq_fast.nn.deq", "BackwardNotConverged": "deq_fast.nn.deq",
    "implicit_backward": "deq_fast.implicit.backward",
    "jac_reg": "deq_fast.nn.regularizers", "power_method": "deq_fast.nn.regularizers",
    "fp_correction": "deq_fast.nn.regularizers", "mixed_init": "deq_fast.nn.regularizers",
    "apply_norm": "deq_fast.nn.norm", "reset_norm": "deq_fast.nn.norm", "remove_norm": "deq_fast.nn.norm",
    "VariationalDropout1d": "deq_fast.nn.dropout", "VariationalDropout2d": "deq_fast.nn.dropout",
    "VariationalDropout3d": "deq_fast.nn.dropout", "VariationalDropToken1d": "deq_fast.nn.dropout",
    "VariationalDropToken2d": "deq_fast.nn.dropout", "VariationalDropToken3d": "deq_fast.nn.dropout",
    "reset_dropout": "deq_fast.nn.dropout",
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
