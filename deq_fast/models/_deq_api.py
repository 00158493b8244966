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
# name -> module that defines it, per implementation (both export the same contract)
_SOURCES = {
    "deq_fast": {"get_deq": "deq_fast.nn.deq", "apply_norm": "deq_fast.nn.norm",
                 "reset_norm": "deq_fast.nn.norm", "VariationalDropout1d": "deq_fast.nn.dropout",
                 "VariationalDropout2d": "deq_fast.nn.dropout",
                 "reset_dropout": "deq_fast.nn.dropout", "jac_reg": "deq_fast.nn.regularizers"},
    "torchdeq": {"get_deq": "torchdeq", "apply_norm": "torchdeq.norm",
                 "reset_norm": "torchdeq.norm", "VariationalDropout1d": "torchdeq.dropout",
                 "VariationalDropout2d": "torchdeq.dropout", "reset_dropout": "torchdeq.dropout",
                 "jac_reg": "torchdeq.loss"},
}
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
        try:
            names = {name: getattr(importlib.import_module(module), name)
                     for name, module in _SOURCES[impl].items()}
        except ImportError as exc:
            raise RuntimeError(f"deq_impl={impl!r} needs the {impl} package "
                               f"(pip install {impl})") from exc
        _cache[impl] = SimpleNamespace(**names)
    return _cache[impl]
