"""The per-solve table of fused solver ops the engine calls, built from the op table
(:mod:`deq_fast.ops.table`).

Implementations (:mod:`deq_fast.ops.backends`): ``reference``: the pure-torch references, called
directly (no dispatcher overhead per call) with a view cache shared for the solve. ``cpp``: per
op, the compiled C++ kernel when ``deq_fast._C`` registered one for the state's device and dtype,
called as ``torch.ops.deq_fast.<op>`` so the dispatcher picks it; the reference otherwise.
``triton``: the registered ops ``torch.ops.deq_fast.*``, whose CUDA kernels are the Triton
launchers; for CPU tensors (``TRITON_INTERPRET=1``) the interpreted launchers called directly,
since the C++ kernels hold the ops' CPU key.
``ops.ran[name]`` says which of the three each op of the returned table is.

Which kernel runs is decided once per solve from the registrations, never by an ``if`` on a
tensor's device per call.
"""
from __future__ import annotations

import functools
import types
from typing import Callable, Optional

import torch

from deq_fast.ops import extension
from deq_fast.ops.table import SOLVER_OPS, OpSpec, has_kernel, register_triton, triton_kernels

__all__ = ["get_ops", "OP_NAMES"]

OP_NAMES = tuple(spec.name for spec in SOLVER_OPS)


def get_ops(backend: str, device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None) -> types.SimpleNamespace:
    """Namespace of the solver ops (``OP_NAMES``) for a resolved backend, called once per solve.

    Args:
        backend: ``'reference'``, ``'cpp'`` or ``'triton'`` (resolved by
            :func:`deq_fast.ops.backends.resolve_backend`).
        device, dtype: of the solver state; for ``cpp`` they select the compiled C++ kernels that
            exist for them.

    Returns:
        a namespace of callables, one per op, and ``ran``: op name -> what runs it.

    Raises:
        ValueError: unknown backend.

    Example:
        >>> ops = get_ops("cpp", torch.device("cpu"), torch.float32)
        >>> sorted(set(vars(ops)) - {"ran"}) == sorted(OP_NAMES)
        True
    """
    if backend in ("reference", "cpp"):
        cache: dict = {}
        use_cpp = backend == "cpp" and device is not None and extension.available()
        ran = {spec.name: "cpp" if use_cpp and _has_cpp(spec, device.type, dtype) else "reference"
               for spec in SOLVER_OPS}
        return types.SimpleNamespace(ran=ran, **{
            spec.name: (_compiled(spec.name) if ran[spec.name] == "cpp"
                        else functools.partial(spec.reference, cache=cache))
            for spec in SOLVER_OPS})
    if backend == "triton":
        return _triton_direct() if device is not None and device.type == "cpu" else _registered()
    raise ValueError(f"backend must be 'reference', 'cpp' or 'triton', got {backend!r}")


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
def _triton_direct() -> types.SimpleNamespace:
    # CPU tensors (TRITON_INTERPRET=1): the C++ kernels hold the CPU key of the ops, so the
    # interpreted launchers are called directly, not through the dispatcher
    launchers = triton_kernels()
    return types.SimpleNamespace(ran=dict.fromkeys(OP_NAMES, "triton"),
                                 **{n: launchers[n] for n in OP_NAMES})


@functools.lru_cache(maxsize=None)
def _registered() -> types.SimpleNamespace:
    register_triton()
    return types.SimpleNamespace(ran=dict.fromkeys(OP_NAMES, "triton"),
                                 **{n: getattr(torch.ops.deq_fast, n) for n in OP_NAMES})
