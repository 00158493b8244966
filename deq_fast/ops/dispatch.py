"""The per-backend table of fused solver ops the engine calls.

``torch``: the pure-PyTorch references, called directly (no dispatcher overhead per call; on CPU
this is the fast path, and the oracle everywhere). ``triton``: the registered custom ops
``torch.ops.deq_fast.*`` (``deq_fast/ops/registered.py``), whose CUDA kernels are the Triton
launchers (CPU tensors too under ``TRITON_INTERPRET=1``), with fake kernels for tracing.
"""
from __future__ import annotations

import functools
import types

from deq_fast.ops.anderson import anderson_mix_reference, anderson_residual_reference
from deq_fast.ops.broyden import broyden_dots_reference, broyden_update_reference
from deq_fast.ops.fixed_point import fixed_point_advance_reference, residual_norms_reference
from deq_fast.ops.status import track_status_reference

OP_NAMES = ("anderson_residual", "anderson_mix", "broyden_dots", "broyden_update",
            "residual_norms", "fixed_point_advance", "track_status")

REFERENCE = types.SimpleNamespace(
    anderson_residual=anderson_residual_reference, anderson_mix=anderson_mix_reference,
    broyden_dots=broyden_dots_reference, broyden_update=broyden_update_reference,
    residual_norms=residual_norms_reference, fixed_point_advance=fixed_point_advance_reference,
    track_status=track_status_reference)


def get_ops(backend: str) -> types.SimpleNamespace:
    """Namespace of the seven fused ops for a resolved backend (``'torch'`` or ``'triton'``).

    Call it once per solve: the torch ops share a fresh view cache (``deq_fast.ops._views``).
    """
    if backend == "torch":
        cache: dict = {}
        return types.SimpleNamespace(**{n: functools.partial(getattr(REFERENCE, n), cache=cache)
                                        for n in OP_NAMES})
    return _registered(backend)


@functools.lru_cache(maxsize=None)
def _registered(backend: str) -> types.SimpleNamespace:
    if backend == "triton":
        import torch

        from deq_fast.ops import registered  # noqa: F401  (registers torch.ops.deq_fast.*)
        return types.SimpleNamespace(**{n: getattr(torch.ops.deq_fast, n) for n in OP_NAMES})
    raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
