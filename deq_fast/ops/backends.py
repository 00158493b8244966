"""Which implementation runs: one vocabulary for every solver, forward and backward.

``import deq_fast`` must work without Triton, without CUDA and without the compiled extension
``deq_fast._C``; this module is the one place that decides what runs. The names say what runs:

    ``reference``  the pure-PyTorch reference ops (forward) and the Python loop (backward): the
                   oracle, and the fallback when nothing compiled is available.
    ``cpp``        the compiled kernels of ``deq_fast._C``: the forward solver passes that have a
                   C++ CPU kernel (the others stay on the reference) and the C++ backward loop
                   (CPU and CUDA kernels). Needs the extension.
    ``triton``     the fused Triton kernels of the forward solver passes (CUDA tensors; CPU
                   tensors when ``TRITON_INTERPRET=1``). The backward has no Triton loop: asked
                   for ``triton``, it runs what ``auto`` picks.
    ``auto``       ``triton`` for CUDA tensors when Triton imports, else ``cpp`` when the extension
                   is loaded, else ``reference``.

The choice comes from the ``backend=`` argument, else the environment variable
``DEQ_FAST_BACKEND`` (read at every call, so tests can flip it), else ``auto``. Older spellings
are accepted: ``torch`` (= ``auto`` without Triton), ``python`` (= ``reference``), and
``DEQ_FAST_NO_EXT=1`` (= never ``cpp``). What ran is reported by every result
(``SolveResult.backend``, the ``backend`` of the backward's info), in these names.
"""
from __future__ import annotations

import functools
import os
from typing import Optional

import torch

from deq_fast.ops import extension

__all__ = ["BACKENDS", "ENV_VAR", "triton_status", "interpreter_enabled", "requested_backend",
           "resolve_backend", "resolve_backward_backend"]

BACKENDS = ("auto", "reference", "cpp", "triton")
ALIASES = {"torch": "torch", "python": "reference"}
ENV_VAR = "DEQ_FAST_BACKEND"


@functools.lru_cache(maxsize=None)
def triton_status() -> tuple[bool, str]:
    """Return ``(available, message)`` for Triton; imported lazily, never raises."""
    try:
        import triton
    except Exception as exc:  # ImportError, or a broken install raising anything
        return False, f"Triton is not importable ({type(exc).__name__}: {exc}); using the torch path"
    return True, f"triton {triton.__version__}"


def interpreter_enabled() -> bool:
    """True when Triton kernels run on CPU tensors through ``TRITON_INTERPRET=1``."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend(backend: Optional[str] = None) -> str:
    """The name asked for by argument or environment, validated (aliases kept as given)."""
    name = backend if backend is not None else os.environ.get(ENV_VAR, "auto")
    name = str(name).strip().lower()
    if name not in BACKENDS and name not in ALIASES:
        source = "backend" if backend is not None else ENV_VAR
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return ALIASES.get(name, name)


def _cpp_or_reference(forced: bool) -> str:
    if extension.available():
        return "cpp"
    if forced:
        raise RuntimeError(f"backend 'cpp' was forced but {extension.extension_status()[1]}")
    return "reference"


def resolve_backend(device: torch.device, backend: Optional[str] = None) -> str:
    """The forward solver's implementation for tensors on ``device``: ``reference``, ``cpp`` or
    ``triton``.

    Raises:
        ValueError: an unknown name. RuntimeError: ``triton`` or ``cpp`` forced where it cannot run.
    """
    name = requested_backend(backend)
    if name == "reference":
        return "reference"
    if name in ("cpp", "torch"):
        return _cpp_or_reference(forced=name == "cpp")
    ok, msg = triton_status()
    if name == "auto":
        return "triton" if (ok and device.type == "cuda") else _cpp_or_reference(forced=False)
    if not ok:
        raise RuntimeError(f"backend 'triton' was forced but {msg}")
    if device.type != "cuda" and not interpreter_enabled():
        raise RuntimeError(
            "backend 'triton' was forced for a tensor on "
            f"{device.type!r}; Triton runs on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1 "
            "set before deq_fast is imported")
    return "triton"


def resolve_backward_backend(device: torch.device, backend: Optional[str] = None,
                             loop_missing: Optional[str] = None) -> str:
    """The backward loop's implementation: ``cpp`` (the C++ loop) or ``reference`` (the Python
    loop). ``loop_missing``: why a loaded extension lacks the C++ loop (``None``: it has it).

    Raises:
        ValueError: an unknown name. RuntimeError: ``cpp`` forced where it cannot run.
    """
    name = requested_backend(backend)
    if name == "reference":
        return "reference"
    ok = extension.available() and loop_missing is None and device.type in ("cpu", "cuda")
    if name == "cpp" and not ok:
        why = (extension.extension_status()[1] if not extension.available()
               else loop_missing or f"no C++ backward loop for device {device.type!r}")
        raise RuntimeError(f"backend='cpp' was forced but it cannot run: {why}")
    return "cpp" if ok else "reference"
