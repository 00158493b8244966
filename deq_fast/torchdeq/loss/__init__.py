"""``torchdeq.loss``: fixed-point correction and Jacobian regularisation."""
from .correction import fp_correction, register_weight_func
from .jacobian import jac_reg, power_method
