"""``torchdeq.utils.config``: ``DEQConfig``, the options holder ``get_deq``/``apply_norm`` read."""
from __future__ import annotations

import argparse
from typing import Any


class DEQConfig:
    """Options from ``None``, a dict, an ``argparse.Namespace``, another ``DEQConfig`` or any
    object with attributes.

    Unlike TorchDEQ, the options are copied: ``get_deq(args, f_max_iter=0)`` does not write
    ``f_max_iter`` back into the caller's namespace.

    Example:
        >>> DEQConfig({"f_max_iter": 8}).get("f_max_iter")
        8
    """

    def __init__(self, config: Any = None):
        if config is None:
            config = {}
        elif isinstance(config, DEQConfig):
            config = config.config
        elif isinstance(config, (dict, argparse.Namespace)):
            config = dict(config) if isinstance(config, dict) else vars(config)
        elif hasattr(config, "__dict__"):
            config = vars(config)
        else:
            raise ValueError(f"args must be None, a dict, a namespace or a DEQConfig, got "
                             f"{type(config).__name__}")
        self.config = dict(config)

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key`` or ``default``."""
        return self.config.get(key, default)

    def update(self, **kwargs: Any) -> None:
        """Set the given options."""
        self.config.update(kwargs)
