"""Fused Triton kernels of the deq_fast solver engine (installed as ``deq_fast.kernels``).

One module per reference module of ``deq_fast/ops``: each holds the kernels ``_<op>_kernel`` (math,
shapes, accumulation dtype and bytes moved in their docstrings), the launchers ``<op>(...)``,
which validate their arguments, launch exactly one kernel (inside a device guard) and never
synchronise with the host, and ``launch_plan(...)``: the pure-host split-D launch plan (grid,
``BLOCK_D``, ``num_warps``, chunks; ``_common.plan``) the launchers use, which can be evaluated
for any GPU's SM count without one.
This package imports only torch and triton; the rest of deq_fast reaches it through the custom ops
registered by the op table ``deq_fast/ops/table.py``. Under ``TRITON_INTERPRET=1`` (set before this package
is imported) the kernels run on CPU tensors.
"""
from .anderson import _anderson_mix_kernel, _anderson_residual_kernel, anderson_mix, anderson_residual
from .broyden import _broyden_dots_kernel, _broyden_update_kernel, broyden_dots, broyden_update
from .fixed_point import _fixed_point_step_kernel, fixed_point_step
from .status import _track_status_kernel, track_status

__all__ = ["anderson_residual", "anderson_mix", "broyden_dots", "broyden_update",
           "fixed_point_step", "track_status", "KERNELS"]

# op name -> its Triton kernel (for ahead-of-time compilation checks)
KERNELS = {
    "anderson_residual": _anderson_residual_kernel, "anderson_mix": _anderson_mix_kernel,
    "broyden_dots": _broyden_dots_kernel, "broyden_update": _broyden_update_kernel,
    "fixed_point_step": _fixed_point_step_kernel,
    "track_status": _track_status_kernel,
}
