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
torch does); a stale cached weight is recomputed automatically (see below; TorchDEQ raises
"backward through the graph a second time" or silently uses stale weights); and normalised layers
survive ``copy.deepcopy`` and ``torch.save`` (torch's old ``weight_norm`` and TorchDEQ raise on the
non-leaf weight): ``apply_norm`` switches a layer to a subclass (``NormedLinear``,
``NormedConv2d``, ...) that pickles the weight detached, ``remove_norm`` switches it back.

Calling ``reset_norm`` once per training step (before the forward) is the documented TorchDEQ
usage and stays the cheapest. A call of a normalised layer costs what a plain layer's does (no
check per call): staleness is marked by the events that cause it, and only a stale layer carries a
one-shot forward pre-hook that recomputes its weight before its next call. The events: a backward
pass reached the weight (its graph may be freed; gradient accumulation without ``reset_norm``
keeps working), an optimizer step changed the layer's parameters (a global
``torch.optim`` step post-hook compares the parameters' ``_version``), a copy or unpickled layer
(its weight was saved detached), ``load_state_dict`` or a conversion of its parameters (``.to()``,
``.double()``, ...), and, checked once per DEQ forward (:func:`mark_stale_norms`), any
other in-place parameter update or a weight without the graph that gradients now need. The weight
is always computed with its graph when a parameter requires grad, also under ``torch.no_grad()``.
A hand-written in-place update of a layer called outside any DEQ forward needs ``reset_norm``,
as in TorchDEQ.
"""
from __future__ import annotations

import functools
import threading
import weakref
from typing import Any, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = ["apply_norm", "reset_norm", "remove_norm", "mark_stale_norms"]

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


class graph_retained:
    """Inside this block, a backward pass that reaches a normalised weight does not mark it for
    recomputation: for ``torch.autograd.grad(..., retain_graph=True)`` calls, whose graph (and so
    the weight's) stays usable -- e.g. gradient checkpointing's backward (``mem_gc``), which
    otherwise recomputed every normalised weight once per checkpointed call. (A class, not a
    generator: it is entered once per checkpointed call.)"""

    __slots__ = ("_previous",)

    def __enter__(self) -> None:
        self._previous, _RETAINING.active = _RETAINING.active, True

    def __exit__(self, *_exc) -> None:
        _RETAINING.active = self._previous


class _Norm:
    """Common part: names/dims per module, caching and staleness of the computed weights.

    ``_stale_hook`` is the id of the one-shot forward pre-hook of a stale module (None while its
    weights are current); ``_versions`` the parameters' ``_version`` when they were computed;
    ``_pinned`` counts the open :class:`pinned_weights` blocks of the module (no recomputation);
    ``_call_hook`` is the id of the one-shot forward hook of a call that began by recomputing."""

    _pinned = 0
    _stale_hook: int | None = None
    _call_hook: int | None = None
    source_suffix: str   # the normalised parameter's suffix: ``_v`` or ``_orig``

    def __init__(self, names, dims, learn_scale, target_norm, clip, clip_value):
        self.names, self.dims = names, dims
        self.learn_scale, self.target_norm = bool(learn_scale), float(target_norm)
        self.clip, self.clip_value = bool(clip), float(clip_value)
        self._versions: tuple = ()
        self._stale_hook: int | None = None

    def _factor(self, module, name, denom):
        g = getattr(module, name + "_g") if self.learn_scale else self.target_norm
        factor = g / denom
        if self.clip:
            factor = torch.clamp(factor, max=self.clip_value)
        return factor

    def _params(self, module) -> list[torch.Tensor]:
        """The parameters the weights are computed from (``<name><source_suffix>``, ``<name>_g``)."""
        suffixes = (self.source_suffix, "_g") if self.learn_scale else (self.source_suffix,)
        params = module._parameters
        return [params[name + suffix] for name in self.names for suffix in suffixes]

    def __call__(self, module: nn.Module, power: bool | None = None) -> None:
        """Recompute the normalised weights of ``module`` (once per step), with their graph when a
        parameter requires grad (also under ``no_grad``); ``power``: refine the spectral-norm
        estimate (default: in training mode)."""
        on_grad = functools.partial(_on_weight_grad, weakref.ref(module))
        for name, dim in zip(self.names, self.dims):
            with torch.enable_grad():
                weight = self.compute_weight(module, name, dim,
                                             module.training if power is None else power)
            if weight.requires_grad:
                weight.register_hook(on_grad)
            setattr(module, name, weight)
        self._versions = self._param_versions(module)
        self._clear_stale(module)

    def reset(self, module: nn.Module) -> None:
        """``reset_norm``'s recomputation. Inside a call of ``module`` that began by recomputing
        its stale weights (a layer that resets itself in its forward, as IGNN's), with nothing
        changed since, they are not computed a second time: one computation and one spectral
        power step per step, as TorchDEQ's reset_norm."""
        if self._call_hook is None or self._stale_hook is not None or \
                self._param_versions(module) != self._versions:
            self(module)

    def _param_versions(self, module) -> tuple:
        return tuple(p._version for p in self._params(module))

    def invalidate(self, module: nn.Module) -> None:
        """Mark ``module``'s weights stale: its next call recomputes them first."""
        if self._stale_hook is None:
            self._stale_hook = module.register_forward_pre_hook(_refresh_hook).id

    def _clear_stale(self, module: nn.Module) -> None:
        if self._stale_hook is not None:
            module._forward_pre_hooks.pop(self._stale_hook, None)
            self._stale_hook = None

    def outdated(self, module: nn.Module, need_graph: bool) -> bool:
        """Whether the cached weights are older than the parameters, or lack the graph that
        gradients need (``need_graph``: grad mode is on)."""
        if self._param_versions(module) != self._versions:
            return True
        return need_graph and any(p.requires_grad for p in self._params(module)) and \
            any(getattr(module, n).grad_fn is None for n in self.names)


def _on_weight_grad(module_ref: weakref.ref, grad: torch.Tensor) -> None:
    # A backward pass reached the weight: its graph may now be freed, so the next call recomputes
    # it (gradient accumulation without reset_norm keeps working). A pass that retains the graph
    # (``graph_retained``) leaves the weight usable.
    if _RETAINING.active:
        return
    module = module_ref()
    fn = None if module is None else module.__dict__.get("_deq_norm")
    if fn is not None:
        fn.invalidate(module)


def _refresh_hook(module: nn.Module, _inputs) -> None:
    """The one-shot pre-hook of a stale module: recompute (which removes this hook), unless its
    weights are pinned."""
    fn = module._deq_norm
    if fn._pinned:
        return
    fn(module)
    if fn._call_hook is None:
        fn._call_hook = module.register_forward_hook(_end_of_refreshed_call, always_call=True).id


def _end_of_refreshed_call(module: nn.Module, _inputs, _output) -> None:
    _drop_call_hook(module, module._deq_norm)


def _drop_call_hook(module: nn.Module, fn: _Norm) -> None:
    if fn._call_hook is not None:
        module._forward_hooks.pop(fn._call_hook, None)
        module._forward_hooks_always_called.pop(fn._call_hook, None)
        fn._call_hook = None


# Every live normalised module, for the checks that are not per call (mark_stale_norms).
_LIVE: weakref.WeakSet = weakref.WeakSet()


def mark_stale_norms(need_graph: bool | None = None) -> None:
    """Mark stale every live normalised layer whose parameters changed in place since its weights
    were computed, or (``need_graph``, default: grad mode is on) whose weights lack the graph
    gradients need; each recomputes its weights before its next call.

    Called once per DEQ forward and after every ``torch.optim`` optimizer step, never per layer
    call.

    Example:
        >>> layer = torch.nn.Linear(3, 3); apply_norm(layer, "weight_norm")
        >>> with torch.no_grad():
        ...     _ = layer.weight_g.mul_(2.0)       # a hand-written update, no reset_norm
        >>> mark_stale_norms(); len(layer._forward_pre_hooks)
        1
    """
    if torch.compiler.is_compiling():   # a traced forward: the eager calls around it check
        return
    need_graph = torch.is_grad_enabled() if need_graph is None else need_graph
    for module in list(_LIVE):
        fn = module.__dict__.get("_deq_norm")
        if fn is not None and fn._stale_hook is None and fn.outdated(module, need_graph):
            fn.invalidate(module)


def current_weights(module: nn.Module) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]] | None:
    """``(weights, sources)`` of a layer normalised here: its normalised weights by name,
    recomputed first if stale, and the parameters they are computed from; None for any other
    module."""
    fn = module.__dict__.get("_deq_norm")
    if not isinstance(fn, _Norm):
        return None
    if fn._stale_hook is not None and not fn._pinned:
        fn(module)
    return {n: module.__dict__[n] for n in fn.names}, fn._params(module)


class pinned_weights:
    """Inside this block each layer of ``pins`` (``[(module, {name: weight})]``) computes with the
    given normalised weights, not recomputed even if stale; the current ones are restored after.
    For a recomputation that must use the weights of the original computation (``mem_gc``'s
    backward, which differentiates with respect to them)."""

    __slots__ = ("pins", "_saved")

    def __init__(self, pins: Sequence[tuple[nn.Module, dict]]):
        self.pins = pins

    def __enter__(self) -> None:
        self._saved = [(module, {n: module.__dict__[n] for n in weights})
                       for module, weights in self.pins]
        for module, weights in self.pins:
            module.__dict__.update(weights)
            module._deq_norm._pinned += 1

    def __exit__(self, *_exc) -> None:
        for module, weights in self._saved:
            module._deq_norm._pinned -= 1
            module.__dict__.update(weights)


def _after_optimizer_step(_optimizer, _args, _kwargs) -> None:
    mark_stale_norms(need_graph=False)


register_optimizer_step_post_hook(_after_optimizer_step)


class _WeightNorm(_Norm):
    suffixes = ("_g", "_v")
    source_suffix = "_v"

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
    source_suffix = "_orig"

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
    which ``copy.deepcopy`` refuses."""
    state = self.__dict__.copy()
    for name in self._deq_norm.names:
        state[name] = state[name].detach()
    return state


def _setstate_stale(self, state: dict) -> None:
    """A copy's weights were saved detached: it recomputes them (with a graph) before its first
    call, and joins the live normalised layers."""
    nn.Module.__setstate__(self, state)
    _LIVE.add(self)
    self._deq_norm.invalidate(self)


def _stale_after(method):
    """``cls.method`` followed by marking the layer stale: for the ``nn.Module`` methods that
    replace or convert its parameters (``load_state_dict``'s per-module copy, ``.to()``/``.cuda()``/
    ``.double()``'s ``_apply``), so its next call recomputes the weights from the new ones."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        out = method(self, *args, **kwargs)
        fn = self.__dict__.get("_deq_norm")
        if fn is not None:
            fn.invalidate(self)
        return out
    return wrapper


def normed_subclass(cls: type) -> type:
    """The subclass of ``cls`` a normalised layer is switched to (made once per class): it pickles
    its weights detached and recomputes them after unpickling, loading a state dict, or a
    conversion of its parameters (``.to()``, ``.double()``, ...)."""
    sub = _NORMED.get(cls)
    if sub is None:
        sub = type(f"Normed{cls.__name__}", (cls,), {
            "__getstate__": _getstate_detached, "__setstate__": _setstate_stale,
            "_load_from_state_dict": _stale_after(cls._load_from_state_dict),
            "_apply": _stale_after(cls._apply), "__module__": __name__})
        _NORMED[cls] = sub
    return sub


# One subclass per target layer, defined at module level so that normalised layers pickle by
# reference (``deq_fast.nn.norm.NormedLinear``, ...). apply_norm switches a layer's class to it and
# remove_norm switches it back; isinstance checks against the torch class keep working.
_NORMED: dict[type, type] = {}
for _cls in _TARGETS:
    _sub = normed_subclass(_cls)
    globals()[_sub.__name__] = _sub
del _cls, _sub


def attach_norm(module: nn.Module, fn: _Norm) -> None:
    """Normalise ``module`` with ``fn`` (computes its weights) and switch it to its normed class."""
    fn.attach(module)
    module.__class__ = normed_subclass(type(module))
    module._deq_norm = fn
    _LIVE.add(module)


def detach_norm(module: nn.Module) -> None:
    """Fold ``module``'s normalisation into plain parameters and restore its class."""
    fn = module._deq_norm
    fn._clear_stale(module)
    _drop_call_hook(module, fn)
    fn.remove(module)
    if type(module) is _NORMED.get(type(module).__bases__[0]):
        module.__class__ = type(module).__bases__[0]
    _LIVE.discard(module)
    del module._deq_norm


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
    attach_norm(module, _NORMS[norm_type](names, dims, **kw))


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
            fn.reset(module)


def remove_norm(model: nn.Module) -> None:
    """Fold the normalisation into plain ``weight`` parameters and remove it from ``model``.

    Example:
        >>> layer = torch.nn.Linear(8, 8); apply_norm(layer, "weight_norm")
        >>> remove_norm(layer)    # e.g. before exporting
        >>> type(layer).__name__, sorted(name for name, _ in layer.named_parameters())
        ('Linear', ['bias', 'weight'])
    """
    for module in model.modules():
        if getattr(module, "_deq_norm", None) is not None:
            detach_norm(module)
