"""The accumulation-dtype rule of every norm, dot product and small solve of the package.

Float64 states accumulate in float64, every other floating state (float32, float16, bfloat16) in
float32. This is the package's one copy of the rule; the Triton kernels, which never import the
package, state the same rule in ``kernels/_common.py`` (``acc_dtype_of``) and the C++ kernels
accumulate in double.
"""
from __future__ import annotations

import torch

__all__ = ["acc_dtype"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype for a state dtype.

    Example:
        >>> acc_dtype(torch.bfloat16), acc_dtype(torch.float64)
        (torch.float32, torch.float64)
    """
    return torch.float64 if dtype == torch.float64 else torch.float32
