"""``torchdeq.solver.anderson``: ``anderson_solver`` on deq_fast's engine."""
from deq_fast.compat.torchdeq import anderson_solver

# torchdeq's module namespace: these helpers are importable from here, as in torchdeq
from .utils import (
    batch_flatten as batch_flatten,
    init_solver_info as init_solver_info,
    solver_stat_from_info as solver_stat_from_info,
    update_state as update_state,
)

__all__ = ["anderson_solver"]
