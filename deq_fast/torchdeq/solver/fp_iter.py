"""``torchdeq.solver.fp_iter``: ``fixed_point_iter``, ``simple_fixed_point_iter`` on deq_fast."""
from deq_fast.compat.torchdeq import fixed_point_iter, simple_fixed_point_iter

# torchdeq's module namespace: these helpers are importable from here, as in torchdeq
from .utils import (
    batch_flatten as batch_flatten,
    dummy_solver_stat as dummy_solver_stat,
    init_solver_info as init_solver_info,
    solver_stat_from_final_step as solver_stat_from_final_step,
    solver_stat_from_info as solver_stat_from_info,
    update_state as update_state,
)

__all__ = ["fixed_point_iter", "simple_fixed_point_iter"]
