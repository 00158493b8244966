"""``torchdeq.loss``: fixed-point correction and Jacobian regularisation."""
# re-exports (torchdeq's namespace; no __all__, as torchdeq)
from .correction import fp_correction as fp_correction, register_weight_func as register_weight_func
from .jacobian import jac_reg as jac_reg, power_method as power_method
