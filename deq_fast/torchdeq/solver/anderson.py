"""``torchdeq.solver.anderson``: ``anderson_solver`` on deq_fast's engine."""
from deq_fast.compat.torchdeq import anderson_solver

from .utils import batch_flatten, init_solver_info, solver_stat_from_info, update_state

__all__ = ["anderson_solver"]
