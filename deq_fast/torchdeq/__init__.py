"""TorchDEQ namespace: ``torchdeq`` 0.1.0's public module paths, names and defaults on deq_fast.

A TorchDEQ client changes only ``torchdeq`` -> ``deq_fast.torchdeq`` in its imports. Defaults are
TorchDEQ's (``f_solver``/``b_solver='fixed_point_iter'``, ``f_max_iter=40``, ``ift=False`` = the
``grad``-step phantom gradient with damping ``tau``), unlike :func:`deq_fast.get_deq`, whose own
defaults (exact gradient, GMRES backward) stay as they are. Module map:

* ``core``: ``get_deq``, ``register_deq``, ``reset_deq``, ``DEQBase``, ``DEQIndexing``, ``DEQSliced``
* ``solver`` (``anderson``, ``broyden``, ``fp_iter``, ``stat``, ``utils``): the solvers of
  :mod:`deq_fast.compat.torchdeq`, ``get_solver``/``register_solver`` (one registry shared with
  ``deq_fast.get_deq``), ``solver_stat_from_final_step``
* ``grad``: ``backward_factory``, ``make_pair``
* ``norm`` (``base_norm``, ``weight_norm``, ``spectral_norm``): ``apply_norm`` ... with
  ``register_norm``/``register_norm_module``
* ``dropout``, ``loss`` (``correction``, ``jacobian``), ``utils`` (``mem``, ``arg_utils``,
  ``config``, ``init``, ``layer_utils``)
"""
# Re-exports, spelt `name as name` (explicit for the linter). No __all__: as in torchdeq, a star
# import also brings the subpackages.
from .core import get_deq as get_deq, register_deq as register_deq, reset_deq as reset_deq
from .dropout import (
    VariationalDropout as VariationalDropout,
    VariationalDropout1d as VariationalDropout1d,
    VariationalDropout2d as VariationalDropout2d,
    VariationalDropout3d as VariationalDropout3d,
    VariationalDropToken1d as VariationalDropToken1d,
    VariationalDropToken2d as VariationalDropToken2d,
    VariationalDropToken3d as VariationalDropToken3d,
    reset_dropout as reset_dropout,
)
from .loss import (
    fp_correction as fp_correction,
    jac_reg as jac_reg,
    power_method as power_method,
    register_weight_func as register_weight_func,
)
from .norm import (
    apply_norm as apply_norm,
    register_norm as register_norm,
    register_norm_module as register_norm_module,
    remove_norm as remove_norm,
    reset_norm as reset_norm,
)
from .solver import (
    get_solver as get_solver,
    register_solver as register_solver,
    solver_stat_from_final_step as solver_stat_from_final_step,
)
from .utils import mem_gc as mem_gc, mixed_init as mixed_init
from .utils.arg_utils import add_deq_args as add_deq_args
