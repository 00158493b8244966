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
from .utils.arg_utils import add_deq_args
from .core import register_deq, get_deq, reset_deq
from .solver import register_solver, get_solver, solver_stat_from_final_step
from .norm import apply_norm, register_norm, register_norm_module, remove_norm, reset_norm
from .dropout import (VariationalDropout, VariationalDropout1d, VariationalDropout2d,
                      VariationalDropout3d, VariationalDropToken1d, VariationalDropToken2d,
                      VariationalDropToken3d, reset_dropout)
from .loss import fp_correction, register_weight_func, jac_reg, power_method
from .utils import mixed_init, mem_gc
