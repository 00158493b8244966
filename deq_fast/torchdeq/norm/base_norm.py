"""``torchdeq.norm.base_norm``: ``apply_norm``/``reset_norm``/``remove_norm`` and the registries.

``register_norm_module(cls, norm_type, names, dims)`` makes ``apply_norm`` normalise the parameters
``names`` of every module of class ``cls`` (e.g. IGNN's implicit graph layer with ``W``,
``Omega_1``, ``Omega_2``); ``register_norm(norm_type, cls)`` adds a normalisation class with
TorchDEQ's protocol (``cls._target_modules``, ``cls.apply(module, deq_args=..., **kw)`` returning a
callable that recomputes the weights and has ``remove(module)``).
"""
from __future__ import annotations

from typing import Any, Sequence

from torch import nn

from deq_fast.nn import norm as _impl

from ..utils.config import DEQConfig
from .spectral_norm import SpectralNorm
from .weight_norm import WeightNorm

__all__ = ["apply_norm", "reset_norm", "remove_norm", "register_norm", "register_norm_module"]

_norm_class: dict = {"weight_norm": WeightNorm, "spectral_norm": SpectralNorm}


def register_norm(norm_type: str, norm_class: type) -> None:
    """Register a normalisation class under ``norm_type`` (for ``apply_norm``/``--norm_type``)."""
    _norm_class[norm_type] = norm_class


def register_norm_module(module_class: type, norm_type: str, names: Any = "weight",
                         dims: Any = 0) -> None:
    """Normalise the parameters ``names`` (over all dims but ``dims``) of ``module_class`` modules
    under ``norm_type``.

    Example:
        >>> class ImplicitLayer(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.W, self.U = nn.Parameter(torch.randn(8, 8)), nn.Parameter(torch.randn(8, 4))
        >>> register_norm_module(ImplicitLayer, "weight_norm", names=["W", "U"], dims=[0, 0])
        >>> layer = ImplicitLayer(); apply_norm(layer, "weight_norm")
        >>> sorted(name for name, _ in layer.named_parameters())
        ['U_g', 'U_v', 'W_g', 'W_v']
    """
    if norm_type not in _norm_class:
        raise ValueError(f"norm_type must be one of {sorted(_norm_class)}, got {norm_type!r}")
    _norm_class[norm_type]._target_modules[module_class] = (names, dims)


def _as_list(x: str | Sequence[str] | None) -> list[str]:
    return [x] if isinstance(x, str) else list(x or [])


def apply_norm(model: nn.Module, norm_type: str = "weight_norm",
               prefix_filter_out: str | Sequence[str] | None = None,
               filter_out: str | Sequence[str] | None = None, args: Any = None,
               **norm_kwargs: Any) -> None:
    """Normalise every registered module of ``model`` (Linear/Conv/ConvTranspose and classes given
    to :func:`register_norm_module`), ``model`` itself included.

    Args:
        model: the module (modified in place).
        norm_type: ``'weight_norm'``, ``'spectral_norm'``, a registered type or ``'none'``;
            ``args.norm_type`` takes priority (TorchDEQ's rule).
        prefix_filter_out: skip modules whose qualified name starts with one of these.
        filter_out: skip modules whose qualified name contains one of these.
        args: options namespace/dict (``norm_no_scale``, ``norm_clip``, ``norm_clip_value``,
            ``norm_target_norm``, ``sn_n_power_iters``), over ``norm_kwargs``.
        **norm_kwargs: passed to the normalisation class's ``apply`` (``learn_scale``, ...).

    Example:
        >>> model = nn.ModuleDict({"embedding": nn.Linear(4, 8), "cell": nn.Linear(8, 8)})
        >>> apply_norm(model, "weight_norm", filter_out=["embedding"])
        >>> sorted(name for name, _ in model.named_parameters() if name.endswith("_g"))
        ['cell.weight_g']
    """
    cfg = DEQConfig(args)
    cfg.update(**norm_kwargs)
    norm_type = cfg.get("norm_type", norm_type)
    if norm_type == "none":
        return
    if norm_type not in _norm_class:
        raise ValueError(f"norm_type must be one of {sorted(_norm_class) + ['none']}, "
                         f"got {norm_type!r}")
    norm = _norm_class[norm_type]
    prefixes, contains = _as_list(prefix_filter_out), _as_list(filter_out)
    for qual, module in list(model.named_modules()):
        if any(qual.startswith(p) for p in prefixes) or any(s in qual for s in contains):
            continue
        if type(module) in norm._target_modules:
            module._deq_norm = norm.apply(module, deq_args=cfg, **norm_kwargs)


def reset_norm(model: nn.Module) -> None:
    """Recompute the normalised weights of ``model`` (once per training step)."""
    for module in model.modules():
        fn = getattr(module, "_deq_norm", None)
        if isinstance(fn, _impl._Norm):
            fn.reset(module)
        elif fn is not None:               # a class given to register_norm
            fn(module)


def remove_norm(model: nn.Module) -> None:
    """Fold the normalisation into plain parameters and remove it from ``model``."""
    for module in model.modules():
        fn = getattr(module, "_deq_norm", None)
        if fn is None:
            continue
        if isinstance(fn, _impl._Norm):   # deq_fast's normalisation: restores the class too
            _impl.detach_norm(module)
        else:                              # a class given to register_norm
            fn.remove(module)
            del module._deq_norm
