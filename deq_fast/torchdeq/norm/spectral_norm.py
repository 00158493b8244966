"""``torchdeq.norm.spectral_norm``: ``SpectralNorm`` (``W = W_orig * min(clip_value, g / sigma)``).

deq_fast's computation (:mod:`deq_fast.nn.norm`) with TorchDEQ's numbers: ``u``, ``v`` drawn as
TorchDEQ draws them, no power step at ``apply``, each power step ``v`` then ``u``, one per
``reset_norm`` in training; the original parameter object kept as ``<name>_orig`` and ``<name>``
its raw data until the first ``reset_norm``, as TorchDEQ does (so an in-place initialisation of
``module.weight`` after ``apply_norm``, as MDEQ's, reaches the parameter). Fixed against TorchDEQ:
``g`` takes the weight's dtype, and stale weights are recomputed automatically.
"""
from __future__ import annotations

from deq_fast.nn import norm as _impl

from ..utils.config import DEQConfig
from .weight_norm import _NormFactory

__all__ = ["SpectralNorm"]


class SpectralNorm(_NormFactory):
    """Spectral normalisation; ``apply(module, deq_args=None, names=None, dims=None,
    learn_scale=True, target_norm=1., clip=False, clip_value=1., n_power_iterations=1)``."""

    _kind = "spectral_norm"
    _target_modules = {cls: tuple(v) for cls, v in _impl._TARGETS.items()}

    @classmethod
    def apply(cls, module, deq_args=None, names=None, dims=None, learn_scale=True,
              target_norm=1.0, clip=False, clip_value=1.0, n_power_iterations=1):
        n_power_iterations = DEQConfig(deq_args).get("sn_n_power_iters", n_power_iterations)
        return super().apply(module, deq_args, names, dims, learn_scale=learn_scale,
                             target_norm=target_norm, clip=clip, clip_value=clip_value,
                             n_power_iterations=n_power_iterations, init_power_steps=0,
                             v_first=True, raw_until_reset=True)
