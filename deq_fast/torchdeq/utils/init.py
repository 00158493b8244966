"""``torchdeq.utils.init``: ``mixed_init``."""
from __future__ import annotations

from typing import Any, Sequence

import torch

from deq_fast.nn.regularizers import mixed_init as _mixed_init


def mixed_init(z_shape: Sequence[int], device: Any = None) -> torch.Tensor:
    """Half standard-normal, half zero initial state of shape ``z_shape`` (TorchDEQ's signature).

    Example:
        >>> z0 = mixed_init((4, 16))
    """
    return _mixed_init(z_shape, device=device)
