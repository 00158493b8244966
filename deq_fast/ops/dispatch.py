"""The per-solve table of fused solver ops the engine calls, built from the op table
(:mod:`deq_fast.ops.table`).

``torch`` backend: per op, the compiled C++ kernel when ``deq_fast._C`` registered one for the
state's device and dtype (today: ``broyden_dots`` / ``broyden_update`` on CPU float32/float64),
called as ``torch.ops.deq_fast.<op>`` so the dispatcher picks it; otherwise the pure-torch
reference, called directly (no dispatcher overhead per call) with a view cache shared for the
solve. ``DEQ_FAST_NO_EXT=1`` (read at every call) gives the references only.
``triton`` backend: the registered ops ``torch.ops.deq_fast.*``, whose CUDA kernels (CPU too under
``TRITON_INTERPRET=1``, where no C++ kernel holds the key) are the Triton launchers.

Which kernel runs is decided once per solve from the registrations, never by an ``if`` on a
tensor's device per call.
"""
from __future__ import annotations

import functools
import types
from typing import Callable, Optional

import torch

from deq_fast.ops import extension
from deq_fast.ops.table import SOLVER_OPS, OpSpec, has_kernel, register_triton

__all__ = ["get_ops", "OP_NAMES"]

OP_NAMES = tuple(spec.name for spec in SOLVER_OPS)


def get_ops(backend: str, device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None) -> types.SimpleNamespace:
    """Namespace of the solver ops (``OP_NAMES``) for a resolved backend, called once per solve.

    Args:
        backend: ``'torch'`` or ``'triton'``.
        device, dtype: of the solver state; on the torch backend they select the compiled C++
            kernels that exist for them. ``None`` gives the pure references.

    Raises:
        ValueError: unknown backend.

    Example:
        >>> ops = get_ops("torch", torch.device("cpu"), torch.float32)
        >>> sorted(vars(ops)) == sorted(OP_NAMES)
        True
    """
    if backend == "torch":
        cache: dict = {}
        use_cpp = device is not None and extension.available()
        return types.SimpleNamespace(**{
            spec.name: (_compiled(spec.name) if use_cpp and _has_cpp(spec, device.type, dtype)
                        else functools.partial(spec.reference, cache=cache))
            for spec in SOLVER_OPS})
    if backend == "triton":
        return _registered()
    raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")


def _has_cpp(spec: OpSpec, device_type: str, dtype: Optional[torch.dtype]) -> bool:
    return dtype in spec.cpp_dtypes and _has_kernel(spec.name, device_type)


@functools.lru_cache(maxsize=None)
def _has_kernel(name: str, device_type: str) -> bool:
    # registrations are static once deq_fast._C is loaded
    return has_kernel(next(s for s in SOLVER_OPS if s.name == name), device_type)


@functools.lru_cache(maxsize=None)
def _compiled(name: str) -> Callable[..., None]:
    # the overload packet's .default: skips the overload resolution of a packet call
    return getattr(torch.ops.deq_fast, name).default


@functools.lru_cache(maxsize=None)
def _registered() -> types.SimpleNamespace:
    register_triton()
    return types.SimpleNamespace(**{n: getattr(torch.ops.deq_fast, n) for n in OP_NAMES})
