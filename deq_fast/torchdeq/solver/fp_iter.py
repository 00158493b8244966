"""``torchdeq.solver.fp_iter``: ``fixed_point_iter``, ``simple_fixed_point_iter`` on deq_fast."""
from deq_fast.compat.torchdeq import fixed_point_iter, simple_fixed_point_iter

from .utils import (batch_flatten, dummy_solver_stat, init_solver_info,
                    solver_stat_from_final_step, solver_stat_from_info, update_state)

__all__ = ["fixed_point_iter", "simple_fixed_point_iter"]
