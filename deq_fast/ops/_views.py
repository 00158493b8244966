"""Per-solve cache of tensor views for the torch path.

Every view (``F[:, slot]``, ``gram[:, :, slot]``, ``trace[t]``, ...) is an op the dispatcher
runs. The solver's buffers live for the whole solve, so the torch path builds each view once and
reuses it: per-iteration dispatch is then only the arithmetic. ``cache=None`` (a one-off call, as in
tests and the custom-op fallback) builds views on the fly.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch


def view(cache: Optional[dict], t: torch.Tensor, key, make: Callable[[], torch.Tensor]) -> torch.Tensor:
    """``make()``, cached in ``cache`` under ``(id(t), key)`` (the buffers outlive the solve's cache)."""
    if cache is None:
        return make()
    k = (id(t), key)
    v = cache.get(k)
    if v is None:
        v = cache[k] = make()
    return v
