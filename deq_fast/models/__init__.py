"""DEQ models: the multiscale DEQ classifier and the DEQ transformer language model.

Named configurations (:data:`MODEL_CONFIGS`): ``mdeq-digits``, ``mdeq-tiny``, ``mdeq-large``,
``deq-lm-small``. :func:`build_model` turns a name plus data properties into a module.
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from ._deq_api import DEQ_IMPLS, deq_api
from .configs import MODEL_CONFIGS, get_config
from .mdeq import MDEQ
from .transformer import DEQTransformerLM

__all__ = ["MDEQ", "DEQTransformerLM", "MODEL_CONFIGS", "get_config", "build_model", "deq_api",
           "DEQ_IMPLS"]


def build_model(name: str, *, num_classes: int = 10, in_channels: int = 3, vocab_size: int = 256,
                deq_kwargs: dict[str, Any] | None = None, deq_impl: str = "deq_fast",
                arch_overrides: dict[str, Any] | None = None) -> nn.Module:
    """Build the named model.

    Args:
        name: a key of :data:`MODEL_CONFIGS`.
        num_classes, in_channels: for MDEQ configurations.
        vocab_size: for language-model configurations.
        deq_kwargs: ``get_deq`` options (solvers, caps, tolerances, gradient mode).
        deq_impl: ``"deq_fast"`` or ``"torchdeq"``.
        arch_overrides: replace entries of the configuration's ``arch`` (e.g. smaller widths in tests).

    Returns:
        an :class:`MDEQ` or :class:`DEQTransformerLM`.

    Example:
        >>> m = build_model("mdeq-digits", num_classes=10, in_channels=1,
        ...                 deq_kwargs=dict(f_solver="anderson"))
    """
    cfg = get_config(name)
    arch = dict(cfg["arch"])
    for key, value in (arch_overrides or {}).items():
        if key not in arch:
            raise ValueError(f"arch_overrides: {name} has no option {key!r}; "
                             f"expected some of {sorted(arch)}")
        arch[key] = value
    if cfg["kind"] == "mdeq":
        return MDEQ(num_classes=num_classes, in_channels=in_channels, deq_kwargs=deq_kwargs,
                    deq_impl=deq_impl, **arch)
    return DEQTransformerLM(vocab_size, deq_kwargs=deq_kwargs, deq_impl=deq_impl, **arch)
