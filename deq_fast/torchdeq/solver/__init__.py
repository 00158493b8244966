"""``torchdeq.solver``: fixed-point solvers with TorchDEQ's contract on deq_fast's engine.

``get_solver``/``register_solver`` share one registry with :func:`deq_fast.get_solver` (a solver
registered here is usable as ``f_solver`` in both ``get_deq``\\ s). Fixed against TorchDEQ (see
:mod:`deq_fast.compat.torchdeq`): misspelt keyword arguments are warned about, half precision works,
a NaN sample keeps its best finite estimate, an unknown key raises ``ValueError`` naming it.
"""
from deq_fast.compat.torchdeq import get_solver, register_solver

# torchdeq.solver's namespace also holds the solver functions (outside __all__, as in torchdeq)
from .anderson import anderson_solver as anderson_solver
from .broyden import broyden_solver as broyden_solver
from .fp_iter import fixed_point_iter as fixed_point_iter, simple_fixed_point_iter as simple_fixed_point_iter
from .utils import solver_stat_from_final_step

__all__ = ["register_solver", "get_solver", "solver_stat_from_final_step"]
