"""``torchdeq.loss.correction``: ``fp_correction`` and its weight-function registry (deq_fast's)."""
from deq_fast.nn.regularizers import fp_correction, register_weight_func

__all__ = ["fp_correction", "register_weight_func"]
