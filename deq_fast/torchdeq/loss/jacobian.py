"""``torchdeq.loss.jacobian``: ``jac_reg`` (Hutchinson ||J||_F^2 / numel) and ``power_method``.

``power_method`` is deq_fast's: TorchDEQ's spectral-radius estimate is wrong (issue 8), ours is the
fix and returns ``(eigenvector, eigenvalue)`` as TorchDEQ's does.
"""
from deq_fast.nn.regularizers import jac_reg, power_method

__all__ = ["jac_reg", "power_method"]
