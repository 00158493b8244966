"""``torchdeq.norm.weight_norm``: ``WeightNorm`` (``W = v * min(clip_value, g / ||v||)``).

The computation is deq_fast's (:mod:`deq_fast.nn.norm`): one normalised weight per training step,
recomputed automatically when stale (TorchDEQ raises or silently uses stale weights there), layers
stay deep-copyable and picklable.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from deq_fast.nn import norm as _impl

__all__ = ["WeightNorm"]


class _NormFactory:
    """Base of :class:`WeightNorm`/``SpectralNorm``: ``_target_modules`` maps a module class to
    ``(names, dims)``; ``apply`` normalises one module and returns the reset callable."""

    _kind = ""
    _target_modules: dict = {}

    @classmethod
    def _options(cls, args: Any, kw: dict) -> dict:
        from ..utils.config import DEQConfig
        cfg = DEQConfig(args)
        if cfg.get("norm_no_scale") is not None:
            kw["learn_scale"] = not cfg.get("norm_no_scale")
        for key, name in (("target_norm", "norm_target_norm"), ("clip", "norm_clip"),
                          ("clip_value", "norm_clip_value")):
            kw[key] = cfg.get(name, kw[key])
        return kw

    @classmethod
    def apply(cls, module: nn.Module, deq_args: Any = None, names=None, dims=None, **kw: Any):
        """Normalise ``module``'s parameters ``names`` over all dims but ``dims`` (defaults: the
        registration of ``type(module)``); options in ``deq_args`` override ``kw``."""
        if names is None or dims is None:
            names, dims = cls._target_modules[type(module)]
        names = [names] if isinstance(names, str) else list(names)
        dims = [dims] if isinstance(dims, int) else list(dims)
        if len(names) != len(dims):
            raise ValueError(f"names {names} and dims {dims} must have the same length")
        fn = _impl._NORMS[cls._kind](names, dims, **cls._options(deq_args, kw))
        _impl.attach_norm(module, fn)
        return fn


class WeightNorm(_NormFactory):
    """Weight normalisation; ``apply(module, deq_args=None, names=None, dims=None,
    learn_scale=True, target_norm=1., clip=False, clip_value=1.)``."""

    _kind = "weight_norm"
    _target_modules = {cls: tuple(v) for cls, v in _impl._TARGETS.items()}

    @classmethod
    def apply(cls, module, deq_args=None, names=None, dims=None, learn_scale=True,
              target_norm=1.0, clip=False, clip_value=1.0):
        return super().apply(module, deq_args, names, dims, learn_scale=learn_scale,
                             target_norm=target_norm, clip=clip, clip_value=clip_value)
