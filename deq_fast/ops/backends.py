"""Which implementation runs: backend selection and optional-component discovery.

``import deq_fast`` must work without Triton, without CUDA and without the compiled
extension ``deq_fast._C``. This module is the one place that knows what is available.

Backend names:
    ``torch``  -- the pure-PyTorch reference path (CPU or CUDA tensors).
    ``triton`` -- the fused Triton kernels (CUDA tensors; CPU tensors when TRITON_INTERPRET=1).
    ``auto``   -- ``triton`` for CUDA tensors when Triton imports, else ``torch``.

The choice comes from the ``backend=`` argument of a solver, else the environment variable
``DEQ_FAST_BACKEND`` (read at every call, so tests can flip it), else ``auto``.
"""
from __future__ import annotations

import functools
import os

import torch

BACKENDS = ("auto", "torch", "triton")
ENV_VAR = "DEQ_FAST_BACKEND"


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    """Return ``(available, message)`` for Triton; imported lazily, never raises."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install raising anything
        return False, f"Triton is not importable ({type(exc).__name__}: {exc}); using the torch path"
    return True, f"triton {triton.__version__}"


def interpreter_enabled() -> bool:
    """True when Triton kernels run on CPU tensors through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend(backend: str | None = None) -> str:
    """The backend asked for by argument or environment, validated."""
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    name = name.strip().lower()
    if name not in BACKENDS:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def resolve_backend(device: torch.device, backend: str | None = None) -> str:
    """Resolve ``auto`` to a concrete backend for tensors on ``device``.

    Raises ``RuntimeError`` when ``triton`` is forced but cannot run on ``device``.
    """
    name = requested_backend(backend)
    ok, msg = triton_status()
    if name == "torch":
        return "torch"
    if name == "auto":
        return "triton" if (ok and device.type == "cuda") else "torch"
    # forced triton
    if not ok:
        raise RuntimeError(f"backend 'triton' was forced but {msg}")
    if device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError(
            "backend 'triton' was forced for a tensor on "
            f"{device.type!r}; Triton runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 "
            "set before deq_fast is imported")
    return "triton"
