"""Discovery of the compiled extension ``deq_fast._C``.

``deq_fast._C`` holds the C++ (and, in a CUDA build, CUDA) kernels. Importing it registers its ops
in the ``deq_fast`` namespace of the PyTorch dispatcher (``torch.ops.deq_fast.*``). It is optional:
without it every op falls back to its pure-PyTorch reference, so :func:`load` never raises.

Build it with ``pip install --no-build-isolation -e .`` (``--no-build-isolation`` builds against the
installed torch; an isolated build environment would download a multi-GB CUDA torch).
"""
from __future__ import annotations

import os
import threading
from types import ModuleType

BUILD_HINT = "Build with: pip install --no-build-isolation -e ."
NO_EXT_ENV = "DEQ_FAST_NO_EXT"

_lock = threading.Lock()
_state: dict[str, object] = {}


def load() -> ModuleType | None:
    """Import ``deq_fast._C`` once and return it, or ``None`` when it is not importable.

    Never raises: a missing or broken build (ImportError, an undefined symbol from a torch
    version mismatch, ...) is remembered and reported by :func:`extension_status`.

    Returns:
        The extension module, or ``None``.

    Example:
        >>> from deq_fast.ops import extension
        >>> extension.load() is None or hasattr(extension.load(), "__file__")
        True
    """
    if "module" in _state:
        return _state["module"]  # type: ignore[return-value]
    with _lock:
        if "module" not in _state:
            try:
                import torch  # noqa: F401  (the .so links against libtorch: load it first)

                from deq_fast import _C as module
                _state["error"] = None
            except Exception as exc:  # ImportError, OSError (undefined symbol), anything
                module = None
                _state["error"] = f"{type(exc).__name__}: {exc}"
            _state["module"] = module
    return _state["module"]  # type: ignore[return-value]


def disabled_by_env() -> bool:
    """True when ``DEQ_FAST_NO_EXT=1`` asks for the Python reference path (read at every call)."""
    return os.environ.get(NO_EXT_ENV, "0") == "1"


def available() -> bool:
    """True when ``deq_fast._C`` is loaded and not disabled by ``DEQ_FAST_NO_EXT=1``."""
    return not disabled_by_env() and load() is not None


def extension_status() -> tuple[bool, str]:
    """Return ``(available, message)`` for the compiled extension ``deq_fast._C``.

    Returns:
        ``available`` is True when the ops of ``deq_fast._C`` will be used; ``message`` says
        which path runs and, when the extension is missing, why and how to build it.

    Example:
        >>> import deq_fast
        >>> ok, msg = deq_fast.extension_status()
        >>> isinstance(ok, bool) and isinstance(msg, str)
        True
    """
    module = load()
    if module is None:
        return False, (f"deq_fast._C not built ({_state['error']}); using the Python reference "
                       f"path. {BUILD_HINT}")
    if disabled_by_env():
        return False, (f"deq_fast._C is built ({module.__file__}) but {NO_EXT_ENV}=1; "
                       "using the Python reference path")
    return True, f"deq_fast._C loaded from {module.__file__}"
