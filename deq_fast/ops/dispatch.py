"""The per-backend table of fused solver ops the engine calls.

``torch``: the pure-PyTorch references, called directly (no dispatcher overhead per call), the
oracle everywhere. For CPU float32/float64 states Broyden's two passes instead run the fused C++
kernels ``deq_fast::cpu_broyden_dots`` / ``cpu_broyden_update`` (csrc/solver_cpu.cpp) when the
extension is built and not disabled (``DEQ_FAST_NO_EXT=1``); ``get_ops("torch", fused_cpu=False)``
is the pure reference table. ``triton``: the registered custom ops
``torch.ops.deq_fast.*`` (``deq_fast/ops/registered.py``), whose CUDA kernels are the Triton
launchers (CPU tensors too under ``TRITON_INTERPRET=1``), with fake kernels for tracing.
"""
from __future__ import annotations

import functools
import types

import torch

from deq_fast.ops import extension

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


def get_ops(backend: str, fused_cpu: bool = True) -> types.SimpleNamespace:
    """Namespace of the seven fused ops for a resolved backend (``'torch'`` or ``'triton'``).

    Call it once per solve: the torch ops share a fresh view cache (``deq_fast.ops._views``).
    ``fused_cpu``: on the torch backend, let CPU float32/float64 Broyden states take the C++
    kernels when the extension is available.
    """
    if backend == "torch":
        cache: dict = {}
        ops = {n: functools.partial(getattr(REFERENCE, n), cache=cache) for n in OP_NAMES}
        if fused_cpu and extension.available():
            ops["broyden_dots"] = _cpu_or(ops["broyden_dots"], "cpu_broyden_dots")
            ops["broyden_update"] = _cpu_or(ops["broyden_update"], "cpu_broyden_update")
        return types.SimpleNamespace(**ops)
    return _registered(backend)


CPU_FUSED = ("cpu_broyden_dots", "cpu_broyden_update")


@functools.lru_cache(maxsize=None)
def _register_cpu_fakes() -> None:
    """Fake kernels of the C++ CPU ops (they only mutate their arguments), for tracing."""
    for name in CPU_FUSED:
        torch.library.register_fake(f"deq_fast::{name}")(lambda *args: None)


def _cpu_or(reference, name: str):
    """The C++ op ``name`` for CPU float32/float64 states (first argument), else ``reference``."""
    _register_cpu_fakes()
    fused = getattr(torch.ops.deq_fast, name)

    def op(x, *args):
        if x.device.type == "cpu" and x.dtype in (torch.float32, torch.float64):
            return fused(x, *args)
        return reference(x, *args)
    op.__name__ = name
    return op


@functools.lru_cache(maxsize=None)
def _registered(backend: str) -> types.SimpleNamespace:
    if backend == "triton":
        from deq_fast.ops import registered  # noqa: F401  (registers torch.ops.deq_fast.*)
        return types.SimpleNamespace(**{n: getattr(torch.ops.deq_fast, n) for n in OP_NAMES})
    raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")
