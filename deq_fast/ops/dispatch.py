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

Under ``torch.compile`` (:func:`torch.compiler.is_compiling`) the table is built by
:func:`traced_ops`: what runs each op is decided once, at trace time, by a function Dynamo calls
and stores as a constant (:func:`torch.compiler.assume_constant_result`: registry queries and the
lazy Triton registration never enter the graph), and every op is a registered op
(``torch.ops.deq_fast.<op>.default``, or its reference-only twin in ``deq_fast_reference``):
an opaque node of the graph with a fake kernel.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Optional

import torch

from deq_fast.ops import extension
from deq_fast.ops.table import SOLVER_OPS, OpSpec, has_kernel, register_triton, triton_kernels

__all__ = ["get_ops", "traced_ops", "SolverOps", "OP_NAMES"]


class SolverOps(NamedTuple):
    """One callable per solver op (``OP_NAMES``) and ``ran``: op name -> what runs it
    (``'reference'``, ``'cpp'`` or ``'triton'``). A named tuple, which Dynamo traces."""

    anderson_residual: Callable[..., None]
    anderson_mix: Callable[..., None]
    broyden_dots: Callable[..., None]
    broyden_update: Callable[..., None]
    fixed_point_step: Callable[..., None]
    track_status: Callable[..., None]
    ran: dict


OP_NAMES = tuple(spec.name for spec in SOLVER_OPS)


def get_ops(backend: str, device: Optional[torch.device] = None,
            dtype: Optional[torch.dtype] = None) -> SolverOps:
    """The solver ops (``OP_NAMES``) for a resolved backend, called once per solve.

    Args:
        backend: ``'reference'``, ``'cpp'`` or ``'triton'`` (resolved by
            :func:`deq_fast.ops.backends.resolve_backend`).
        device, dtype: of the solver state; for ``cpp`` they select the compiled C++ kernels that
            exist for them.

    Returns:
        a :class:`SolverOps`: one callable per op, and ``ran``: op name -> what runs it.

    Raises:
        ValueError: unknown backend.

    Example:
        >>> ops = get_ops("cpp", torch.device("cpu"), torch.float32)
        >>> sorted(set(ops._fields) - {"ran"}) == sorted(OP_NAMES)
        True
    """
    if torch.compiler.is_compiling():
        return traced_ops(backend, device, dtype)
    if backend in ("reference", "cpp"):
        cache: dict = {}
        ran = _ran(backend, device, dtype)
        return SolverOps(ran=ran, **{
            spec.name: (_compiled(spec.name) if ran[spec.name] == "cpp"
                        else functools.partial(spec.reference, cache=cache))
            for spec in SOLVER_OPS})
    if backend == "triton":
        return _triton_direct() if device is not None and device.type == "cpu" else _registered()
    raise ValueError(f"backend must be 'reference', 'cpp' or 'triton', got {backend!r}")


def traced_ops(backend: str, device: Optional[torch.device] = None,
               dtype: Optional[torch.dtype] = None) -> SolverOps:
    """The table :func:`get_ops` returns while Dynamo traces: registered ops, chosen at trace
    time: ``torch.ops.deq_fast.<op>`` where a C++ or Triton kernel runs, else the reference-only
    twin ``torch.ops.deq_fast_reference.<op>`` (Dynamo cannot trace the references' ``out=``
    writes into strided views, so they enter the graph as opaque ops too).

    Raises:
        ValueError: unknown backend, or ``triton`` on CPU tensors (the interpreted launchers
            cannot be compiled; use ``cpp`` or ``reference``).
    """
    device_type = device.type if device is not None else None
    ran = dict(zip(OP_NAMES, _traced_choice(backend, device_type, dtype)))
    return SolverOps(ran=ran, **{
        spec.name: getattr(torch.ops.deq_fast_reference if ran[spec.name] == "reference"
                           else torch.ops.deq_fast, spec.name).default
        for spec in SOLVER_OPS})


@torch.compiler.assume_constant_result
def _traced_choice(backend: str, device_type: Optional[str],
                   dtype: Optional[torch.dtype]) -> tuple[str, ...]:
    # called by Dynamo at trace time, its result stored as a constant (registry queries and
    # Triton's registration stay out of the graph)
    if backend in ("reference", "cpp"):
        device = torch.device(device_type) if device_type is not None else None
        return tuple(_ran(backend, device, dtype).values())
    if backend != "triton":
        raise ValueError(f"backend must be 'reference', 'cpp' or 'triton', got {backend!r}")
    if device_type == "cpu":
        raise ValueError("backend 'triton' on CPU tensors runs the Triton interpreter, which "
                         "torch.compile cannot trace; use backend='cpp' or 'reference'")
    register_triton()
    return ("triton",) * len(OP_NAMES)


def _ran(backend: str, device: Optional[torch.device], dtype: Optional[torch.dtype]) -> dict:
    use_cpp = backend == "cpp" and device is not None and extension.available()
    return {spec.name: "cpp" if use_cpp and _has_cpp(spec, device.type, dtype) else "reference"
            for spec in SOLVER_OPS}


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
def _triton_direct() -> SolverOps:
    # CPU tensors (TRITON_INTERPRET=1): the C++ kernels hold the CPU key of the ops, so the
    # interpreted launchers are called directly, not through the dispatcher
    launchers = triton_kernels()
    return SolverOps(ran=dict.fromkeys(OP_NAMES, "triton"), **{n: launchers[n] for n in OP_NAMES})


@functools.lru_cache(maxsize=None)
def _registered() -> SolverOps:
    register_triton()
    return SolverOps(ran=dict.fromkeys(OP_NAMES, "triton"),
                     **{n: getattr(torch.ops.deq_fast, n) for n in OP_NAMES})
