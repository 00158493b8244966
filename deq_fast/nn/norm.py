"""Weight normalisation and spectral normalisation computed once per training step (TorchDEQ style).

A DEQ calls the same layer dozens of times per step; recomputing ``W = g * v / ||v||`` (or
``W / sigma(W)``) at every call, as ``torch.nn.utils.parametrizations`` does, wastes time and keeps
one normalisation graph per solver iteration. Here the normalised weight is a plain attribute of
the module, computed by :func:`apply_norm` and recomputed by :func:`reset_norm` (call it, or
:func:`deq_fast.reset_deq`, once per training step); every call in between reuses it.

Formulas (TorchDEQ's, same parameter names as torch's old ``weight_norm``/``spectral_norm``):

* weight norm: ``W = v * min(clip_value, g / ||v||)`` with the norm over all dims except ``dim``
  (0 for Linear/Conv, 1 for ConvTranspose); parameters ``weight_g`` (init ``||v||``) and
  ``weight_v``. Without learned scale (``learn_scale=False``) ``g`` is ``target_norm``.
* spectral norm: ``W = W_orig * min(clip_value, g / sigma)``, ``sigma = u^T M v`` with ``M`` the
  weight reshaped to ``(out, -1)`` and ``u, v`` refined by ``n_power_iterations`` power steps per
  reset in training mode; parameters ``weight_orig``, ``weight_g`` (init ``target_norm``), buffers
  ``weight_u``, ``weight_v``.

Fixed against TorchDEQ: the spectral-normalised weight is normalised from the start (TorchDEQ leaves
the raw weight in place until the first ``reset_norm``; here ``u, v`` get 15 initial power steps, as
torch does); a stale cached weight is recomputed automatically before the module runs (see below;
TorchDEQ raises "backward through the graph a second time" or silently uses stale weights); and
normalised layers survive ``copy.deepcopy`` and ``torch.save`` (torch's old ``weight_norm`` and
TorchDEQ raise on the non-leaf weight): ``apply_norm`` switches a layer to a subclass
(``NormedLinear``, ``NormedConv2d``, ...) that pickles the weight detached, ``remove_norm`` switches
it back.

Calling ``reset_norm`` once per training step (before the forward) is the documented TorchDEQ
usage and stays the cheapest; forgetting it is safe here: the cached weight is also recomputed
before the next forward once a backward pass has reached it (its graph may be freed), after an
in-place parameter update, or when it lacks a graph that is now needed.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["apply_norm", "reset_norm", "remove_norm"]

_TARGETS: dict[type, tuple[str, int]] = {
    nn.Linear: ("weight", 0), nn.Conv1d: ("weight", 0), nn.Conv2d: ("weight", 0),
    nn.Conv3d: ("weight", 0), nn.ConvTranspose1d: ("weight", 1),
    nn.ConvTranspose2d: ("weight", 1), nn.ConvTranspose3d: ("weight", 1),
}


def _norm_except(p: torch.Tensor, dim: int) -> torch.Tensor:
    """``||p||`` over all dims except ``dim``, shaped to broadcast against ``p``."""
    dims = [d for d in range(p.dim()) if d != dim]
    return torch.linalg.vector_norm(p, dim=dims, keepdim=True)


def _scale_shape(weight: torch.Tensor, dim: int) -> list[int]:
    shape = [1] * weight.dim()
    shape[dim] = weight.shape[dim]
    return shape


class _Retaining(threading.local):
    active = False


_RETAINING = _Retaining()


@contextlib.contextmanager
def graph_retained():
    """Inside this block, a backward pass that reaches a normalised weight does not mark it for
    recomputation: for ``torch.autograd.grad(..., retain_graph=True)`` calls, whose graph (and so
    the weight's) stays usable -- e.g. gradient checkpointing's backward (``mem_gc``), which
    otherwise recomputed every normalised weight once per checkpointed call."""
    previous, _RETAINING.active = _RETAINING.active, True
    try:
        yield
    finally:
        _RETAINING.active = previous


class _Norm:
    """Common part: names/dims per module, caching and staleness of the computed weights."""

    def __init__(self, names, dims, learn_scale, target_norm, clip, clip_value):
        self.names, self.dims = names, dims
        self.learn_scale, self.target_norm = bool(learn_scale), float(target_norm)
        self.clip, self.clip_value = bool(clip), float(clip_value)
        self._versions: tuple = ()
        self._consumed = False

    def _factor(self, module, name, denom):
        g = getattr(module, name + "_g") if self.learn_scale else self.target_norm
        factor = g / denom
        if self.clip:
            factor = torch.clamp(factor, max=self.clip_value)
        return factor

    def _params(self, module) -> list[torch.Tensor]:
        raise NotImplementedError

    def __call__(self, module: nn.Module, power: bool | None = None) -> None:
        """Recompute the normalised weights of ``module`` (once per step); ``power``: refine the
        spectral-norm estimate (default: in training mode)."""
        self._consumed = False
        for name, dim in zip(self.names, self.dims):
            weight = self.compute_weight(module, name, dim, module.training if power is None else power)
            if weight.requires_grad:
                weight.register_hook(self._mark_consumed)
            setattr(module, name, weight)
        self._versions = tuple(p._version for p in self._params(module))

    def _mark_consumed(self, grad: torch.Tensor) -> None:
        # A backward pass reached the weight: its graph may now be freed, so the next forward
        # recomputes it (gradient accumulation without reset_norm keeps working). A pass that
        # retains the graph (``graph_retained``) leaves the weight usable.
        if not _RETAINING.active:
            self._consumed = True

    def stale(self, module: nn.Module) -> bool:
        if self._consumed:
            return True
        params = self._params(module)
        if tuple(p._version for p in params) != self._versions:
            return True
        if torch.is_grad_enabled() and any(p.requires_grad for p in params):
            return any(getattr(module, n).grad_fn is None for n in self.names)
        return False


class _WeightNorm(_Norm):
    suffixes = ("_g", "_v")

    def _params(self, module):
        out = []
        for name in self.names:
            out.append(getattr(module, name + "_v"))
            if self.learn_scale:
                out.append(getattr(module, name + "_g"))
        return out

    def compute_weight(self, module, name, dim, training=True):
        v = getattr(module, name + "_v")
        return v * self._factor(module, name, _norm_except(v, dim))

    def attach(self, module):
        for name, dim in zip(self.names, self.dims):
            weight = module._parameters.pop(name)
            if self.learn_scale:
                module.register_parameter(name + "_g",
                                          nn.Parameter(_norm_except(weight.detach(), dim).clone()))
            module.register_parameter(name + "_v", nn.Parameter(weight.detach().clone()))
        self(module)

    def remove(self, module):
        for name, dim in zip(self.names, self.dims):
            with torch.no_grad():
                weight = self.compute_weight(module, name, dim)
            delattr(module, name)
            for suffix in self.suffixes:
                if hasattr(module, name + suffix):
                    delattr(module, name + suffix)
            module.register_parameter(name, nn.Parameter(weight.detach()))


class _SpectralNorm(_Norm):
    suffixes = ("_g", "_orig", "_u", "_v")

    def __init__(self, names, dims, learn_scale, target_norm, clip, clip_value,
                 n_power_iterations=1, eps=1e-12, init_power_steps=15, v_first=False,
                 raw_until_reset=False):
        super().__init__(names, dims, learn_scale, target_norm, clip, clip_value)
        if not isinstance(n_power_iterations, int) or n_power_iterations < 1:
            raise ValueError(f"n_power_iterations must be a positive int, got {n_power_iterations!r}")
        self.n_power_iterations, self.eps = n_power_iterations, eps
        # deq_fast: 15 power steps at attach, so sigma is estimated from the first forward on.
        # The TorchDEQ namespace: none, TorchDEQ's order of the two half-steps (v first), and
        # TorchDEQ's attach: the original parameter object becomes ``<name>_orig`` and
        # ``<name>`` is its raw data until the first reset (an in-place initialisation of
        # ``module.weight`` after apply_norm, as MDEQ's, then writes into the parameter)
        self.init_power_steps, self.v_first = init_power_steps, v_first
        self.raw_until_reset = raw_until_reset

    def _params(self, module):
        out = []
        for name in self.names:
            out.append(getattr(module, name + "_orig"))
            if self.learn_scale:
                out.append(getattr(module, name + "_g"))
        return out

    @staticmethod
    def _matrix(weight, dim):
        if dim != 0:
            weight = weight.movedim(dim, 0)
        return weight.reshape(weight.shape[0], -1)

    def _power(self, module, name, mat, n):
        u, v = getattr(module, name + "_u"), getattr(module, name + "_v")
        with torch.no_grad():
            for _ in range(n):   # u first: torch.nn.utils.parametrizations.spectral_norm's order
                if self.v_first:
                    v.copy_(F.normalize(torch.mv(mat.t(), u), dim=0, eps=self.eps))
                u.copy_(F.normalize(torch.mv(mat, v), dim=0, eps=self.eps))
                if not self.v_first:
                    v.copy_(F.normalize(torch.mv(mat.t(), u), dim=0, eps=self.eps))

    def compute_weight(self, module, name, dim, training=True):
        weight = getattr(module, name + "_orig")
        mat = self._matrix(weight, dim)
        if training:
            self._power(module, name, mat.detach(), self.n_power_iterations)
        u = getattr(module, name + "_u").clone(memory_format=torch.contiguous_format)
        v = getattr(module, name + "_v").clone(memory_format=torch.contiguous_format)
        sigma = torch.dot(u, torch.mv(mat, v))
        return weight * self._factor(module, name, sigma)

    def attach(self, module):
        for name, dim in zip(self.names, self.dims):
            weight = module._parameters.pop(name)
            mat = self._matrix(weight.detach(), dim)
            h, w = mat.shape
            module.register_parameter(name + "_orig", weight if self.raw_until_reset
                                      else nn.Parameter(weight.detach().clone()))
            if self.learn_scale:
                g = torch.full(_scale_shape(weight, dim), self.target_norm, dtype=weight.dtype,
                               device=weight.device)
                module.register_parameter(name + "_g", nn.Parameter(g))
            module.register_buffer(name + "_u", F.normalize(mat.new_empty(h).normal_(), dim=0,
                                                            eps=self.eps))
            module.register_buffer(name + "_v", F.normalize(mat.new_empty(w).normal_(), dim=0,
                                                            eps=self.eps))
            self._power(module, name, mat, self.init_power_steps)
            if self.raw_until_reset:
                setattr(module, name, weight.data)
        if not self.raw_until_reset:
            self(module, power=None if self.init_power_steps > 0 else False)

    def remove(self, module):
        for name, dim in zip(self.names, self.dims):
            with torch.no_grad():
                weight = self.compute_weight(module, name, dim, training=False)
            delattr(module, name)
            for suffix in self.suffixes:
                if hasattr(module, name + suffix):
                    delattr(module, name + suffix)
            module.register_parameter(name, nn.Parameter(weight.detach()))


_NORMS = {"weight_norm": _WeightNorm, "spectral_norm": _SpectralNorm}
_NORM_KWARGS = {"names", "dims", "learn_scale", "target_norm", "clip", "clip_value",
                "n_power_iterations", "eps"}


def _args_dict(args: Any) -> dict:
    if args is None:
        return {}
    if isinstance(args, dict):
        return args
    if hasattr(args, "config") and isinstance(args.config, dict):
        return args.config
    return vars(args)


def _getstate_detached(self) -> dict:
    """Pickle/deepcopy state with the normalised weights detached: they are non-leaf tensors,
    which ``copy.deepcopy`` refuses. The copy's pre-hook recomputes them with a graph when
    gradients are needed (their ``grad_fn`` is None)."""
    state = self.__dict__.copy()
    for name in self._deq_norm.names:
        state[name] = state[name].detach()
    return state


# One subclass per target layer, defined at module level so that normalised layers pickle by
# reference (``deq_fast.nn.norm.NormedLinear``, ...). apply_norm switches a layer's class to it and
# remove_norm switches it back; isinstance checks against the torch class keep working.
_NORMED: dict[type, type] = {}
for _cls in _TARGETS:
    _sub = type(f"Normed{_cls.__name__}", (_cls,), {"__getstate__": _getstate_detached,
                                                   "__module__": __name__})
    globals()[_sub.__name__] = _sub
    _NORMED[_cls] = _sub
del _cls, _sub


def _refresh_hook(module: nn.Module, _inputs) -> None:
    fn = getattr(module, "_deq_norm", None)
    if fn is not None and fn.stale(module):
        fn(module)


def apply_norm(model: nn.Module, norm_type: str = "weight_norm",
               prefix_filter_out: str | Sequence[str] | None = None,
               filter_out: str | Sequence[str] | None = None, args: Any = None,
               **norm_kwargs: Any) -> None:
    """Apply weight or spectral normalisation to every Linear/Conv/ConvTranspose layer of ``model``.

    Args:
        model: the module (modified in place).
        norm_type: ``'weight_norm'``, ``'spectral_norm'`` or ``'none'``.
        prefix_filter_out: skip modules whose qualified name starts with one of these.
        filter_out: skip modules whose qualified name contains one of these.
        args: optional config (namespace/dict, e.g. from ``add_deq_args``); its ``norm_type``,
            ``norm_no_scale``, ``norm_target_norm``, ``norm_clip``, ``norm_clip_value``,
            ``sn_n_power_iters`` take priority over the keyword arguments.
        **norm_kwargs: ``learn_scale=True``, ``target_norm=1.0``, ``clip=False``,
            ``clip_value=1.0``; spectral norm also ``n_power_iterations=1``, ``eps=1e-12``;
            ``names``/``dims`` to override the parameter names and normalised dims.

    Example:
        >>> layer = torch.nn.ModuleDict({"embedding": torch.nn.Linear(4, 8),
        ...                              "cell": torch.nn.Linear(8, 8)})
        >>> apply_norm(layer, "weight_norm", filter_out=["embedding"])
        >>> type(layer["cell"]).__name__, type(layer["embedding"]).__name__
        ('NormedLinear', 'Linear')
        >>> reset_norm(layer)      # once per training step
    """
    unknown = set(norm_kwargs) - _NORM_KWARGS
    if unknown:
        raise TypeError(f"apply_norm() got unexpected keyword arguments {sorted(unknown)}")
    cfg = _args_dict(args)
    norm_type = cfg.get("norm_type", norm_type)
    if norm_type == "none":
        return
    if norm_type not in _NORMS:
        raise ValueError(f"norm_type must be one of {sorted(_NORMS) + ['none']}, got {norm_type!r}")
    kw = _norm_options(norm_type, cfg, norm_kwargs)
    prefixes = [prefix_filter_out] if isinstance(prefix_filter_out, str) else (prefix_filter_out or [])
    contains = [filter_out] if isinstance(filter_out, str) else (filter_out or [])
    for qual, module in list(model.named_modules()):
        if any(qual.startswith(p) for p in prefixes) or any(s in qual for s in contains):
            continue
        if hasattr(module, "_deq_norm"):
            raise ValueError(f"module {qual or type(module).__name__!r} is already normalised; "
                             "call remove_norm first")
        if type(module) in _TARGETS:
            _normalise(module, norm_type, kw, norm_kwargs)


def _norm_options(norm_type: str, cfg: dict, norm_kwargs: dict) -> dict:
    """The normalisation's options: ``args`` keys over keyword arguments over defaults."""
    kw = dict(learn_scale=norm_kwargs.get("learn_scale", True),
              target_norm=norm_kwargs.get("target_norm", 1.0),
              clip=norm_kwargs.get("clip", False), clip_value=norm_kwargs.get("clip_value", 1.0))
    if "norm_no_scale" in cfg:
        kw["learn_scale"] = not cfg["norm_no_scale"]
    kw["target_norm"] = cfg.get("norm_target_norm", kw["target_norm"])
    kw["clip"] = cfg.get("norm_clip", kw["clip"])
    kw["clip_value"] = cfg.get("norm_clip_value", kw["clip_value"])
    if norm_type == "spectral_norm":
        kw["n_power_iterations"] = cfg.get("sn_n_power_iters",
                                           norm_kwargs.get("n_power_iterations", 1))
        kw["eps"] = norm_kwargs.get("eps", 1e-12)
    return kw


def _normalise(module: nn.Module, norm_type: str, kw: dict, norm_kwargs: dict) -> None:
    """Attach the normalisation to one target layer and switch it to its ``Normed*`` class."""
    names = norm_kwargs.get("names") or _TARGETS[type(module)][0]
    dims = norm_kwargs.get("dims")
    dims = _TARGETS[type(module)][1] if dims is None else dims
    names = [names] if isinstance(names, str) else list(names)
    dims = [dims] if isinstance(dims, int) else list(dims)
    if len(names) != len(dims):
        raise ValueError(f"names {names} and dims {dims} must have the same length")
    fn = _NORMS[norm_type](names, dims, **kw)
    fn.attach(module)
    module.__class__ = _NORMED[type(module)]
    module._deq_norm = fn
    module._deq_norm_handle = module.register_forward_pre_hook(_refresh_hook)


def reset_norm(model: nn.Module) -> None:
    """Recompute the normalised weights of every normalised layer in ``model`` (once per step).

    Spectral norm also refines ``u, v`` by ``n_power_iterations`` power steps in training mode.

    Example:
        >>> layer = torch.nn.Linear(8, 8); apply_norm(layer, "spectral_norm")
        >>> reset_norm(layer)
    """
    for module in model.modules():
        fn = getattr(module, "_deq_norm", None)
        if fn is not None:
            fn(module)


def remove_norm(model: nn.Module) -> None:
    """Fold the normalisation into plain ``weight`` parameters and remove it from ``model``.

    Example:
        >>> layer = torch.nn.Linear(8, 8); apply_norm(layer, "weight_norm")
        >>> remove_norm(layer)    # e.g. before exporting
        >>> type(layer).__name__, sorted(name for name, _ in layer.named_parameters())
        ('Linear', ['bias', 'weight'])
    """
    for module in model.modules():
        fn = getattr(module, "_deq_norm", None)
        if fn is not None:
            fn.remove(module)
            module.__class__ = module.__class__.__bases__[0]
            module._deq_norm_handle.remove()
            del module._deq_norm, module._deq_norm_handle
