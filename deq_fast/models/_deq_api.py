"""Which DEQ implementation drives the models: ``deq_fast`` (default) or ``torchdeq`` (baseline).

The models only touch the DEQ machinery through the names collected here (``get_deq``,
``apply_norm``, ``reset_norm``, ``VariationalDropout1d``, ``VariationalDropout2d``,
``reset_dropout``, ``jac_reg``), which both libraries export with the same contract. The benchmark
builds the same model once per implementation and compares them side by side.
"""
from __future__ import annotations

import importlib
from types import SimpleNamespace

__all__ = ["DEQ_IMPLS", "deq_api"]

DEQ_IMPLS = ("deq_fast", "torchdeq")
_NAMES = ("get_deq", "apply_norm", "reset_norm", "VariationalDropout1d", "VariationalDropout2d",
          "reset_dropout", "jac_reg")
_cache: dict[str, SimpleNamespace] = {}


def deq_api(impl: str = "deq_fast") -> SimpleNamespace:
    """The DEQ module and utilities of ``impl`` as one namespace.

    Args:
        impl: ``"deq_fast"`` or ``"torchdeq"``.

    Returns:
        namespace with the attributes listed in the module docstring.

    Example:
        >>> api = deq_api("torchdeq")
        >>> deq = api.get_deq(f_solver="anderson", f_max_iter=10)
    """
    if impl not in DEQ_IMPLS:
        raise ValueError(f"deq_impl must be one of {DEQ_IMPLS}, got {impl!r}")
    if impl not in _cache:
        if impl == "torchdeq":
            try:
                tq = importlib.import_module("torchdeq")
            except ImportError as exc:
                raise RuntimeError("deq_impl='torchdeq' needs the torchdeq package "
                                   "(pip install torchdeq)") from exc
            norm = importlib.import_module("torchdeq.norm")
            drop = importlib.import_module("torchdeq.dropout")
            loss = importlib.import_module("torchdeq.loss")
            _cache[impl] = SimpleNamespace(
                get_deq=tq.get_deq, apply_norm=norm.apply_norm, reset_norm=norm.reset_norm,
                VariationalDropout2d=drop.VariationalDropout2d,
                VariationalDropout1d=drop.VariationalDropout1d,
                reset_dropout=drop.reset_dropout, jac_reg=loss.jac_reg)
        else:
            import deq_fast
            _cache[impl] = SimpleNamespace(**{n: getattr(deq_fast, n) for n in _NAMES})
    return _cache[impl]
