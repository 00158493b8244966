"""``torchdeq.utils.mem``: ``mem_gc``, gradient checkpointing of one module call.

The forward keeps no activations; the backward re-runs the module under ``enable_grad`` and takes
one VJP for the tensor inputs that need gradients and the module's trainable tensors (as TorchDEQ,
but a layer normalised by deq_fast contributes its normalised weight rather than ``weight_g`` and
``weight_v``: the normalisation's backward then runs once per step, not once per checkpointed call).
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from deq_fast.nn.norm import current_weights, graph_retained, pinned_weights

__all__ = ["mem_gc"]


def filter_input(in_args: Sequence[Any]) -> tuple[tuple, tuple, tuple]:
    """Detached copies of ``in_args`` (keeping ``requires_grad``), the copies that need gradients,
    and their positions."""
    forward_args, grad_args, grad_idx = [], [], []
    for i, arg in enumerate(in_args):
        if torch.is_tensor(arg):
            arg = arg.detach().requires_grad_(arg.requires_grad)
            if arg.requires_grad:
                grad_args.append(arg)
                grad_idx.append(i)
        forward_args.append(arg)
    return tuple(forward_args), tuple(grad_args), tuple(grad_idx)


def filter_out(out: Sequence[Any], out_grad: Sequence[Any]) -> tuple[tuple, tuple]:
    """The outputs that received a gradient tensor, and those gradients."""
    pairs = [(o, g) for o, g in zip(out, out_grad) if torch.is_tensor(g)]
    return tuple(o for o, _ in pairs), tuple(g for _, g in pairs)


def reset_grad(grad: Sequence[Any], in_args: Sequence[Any], grad_idx: Sequence[int]) -> tuple:
    """Input gradients at their argument positions (``None`` elsewhere), then the parameters'."""
    out: list = [None] * len(in_args)
    for k, i in enumerate(grad_idx):
        out[i] = grad[k]
    return tuple(out) + tuple(grad[len(grad_idx):])


def _checkpoint_inputs(module: nn.Module) -> tuple[list[torch.Tensor], list]:
    """The trainable tensors ``module`` computes with, and the normalised weights to pin.

    As TorchDEQ's ``fetch_params``, except that a layer normalised by deq_fast contributes its
    normalised weights instead of the parameters they are computed from: the checkpointed VJP
    stops at the weight, and autograd runs the normalisation's backward once for all the
    checkpointed calls of a step instead of once per call (same gradients). Those weights are
    pinned (:class:`~deq_fast.nn.norm.pinned_weights`) for the backward's recomputation, so it
    differentiates the weights the forward used even if they were recomputed in between. A source
    parameter also used by another module keeps its layer on the parameters.
    """
    params, seen, shared, normed = [], set(), set(), []
    stack, visited = [module], {id(module)}
    while stack:                       # one walk (Module.modules() builds qualified names)
        sub = stack.pop()
        for p in sub._parameters.values():
            if p is not None:
                if id(p) in seen:
                    shared.add(id(p))
                else:
                    seen.add(id(p))
                    params.append(p)
        weights_sources = current_weights(sub)
        if weights_sources is not None:
            normed.append((sub, *weights_sources))
        for child in reversed(sub._modules.values()):
            if child is not None and id(child) not in visited:
                visited.add(id(child))
                stack.append(child)
    skip, weights, pins = set(), [], []
    for sub, named, sources in normed:
        if not any(id(p) in shared for p in sources):
            skip.update(id(p) for p in sources)
            weights += [w for w in named.values() if w.requires_grad]
            pins.append((sub, named))
    return weights + [p for p in params if p.requires_grad and id(p) not in skip], pins


class _PinnedCall:
    """``func(*args)`` with the normalised weights of ``pins`` (see :func:`_checkpoint_inputs`)."""

    __slots__ = ("func", "pins")

    def __init__(self, func: nn.Module, pins: list):
        self.func, self.pins = func, pins

    def __call__(self, *args: Any) -> Any:
        if not torch.is_grad_enabled():   # DEQGradCkpt's forward: the weights were just fetched
            return self.func(*args)
        with pinned_weights(self.pins):   # its backward's recomputation
            return self.func(*args)


class DEQGradCkpt(torch.autograd.Function):
    """``apply(func, n_args, *args, *params)``: ``func(*args)`` without stored activations."""

    @staticmethod
    def fetch_params(modules: Any) -> list[torch.Tensor]:
        """Trainable tensors of a module or list of modules (replicas: their tensor attributes), as
        TorchDEQ's (``mem_gc`` itself passes a normalised layer's weights instead)."""
        modules = modules if isinstance(modules, (list, tuple)) else [modules]
        params: list[torch.Tensor] = []
        for module in modules:
            if getattr(module, "_is_replica", False):   # DataParallel replicas hold plain tensors
                for sub in module.modules():
                    params += [v for v in sub.__dict__.values()
                               if torch.is_tensor(v) and v.requires_grad]
            else:
                params += [p for p in module.parameters() if p.requires_grad]
        return params

    @staticmethod
    def forward(ctx, func, n_func_args, *args):
        ctx.func = func
        ctx.in_args, ctx.params = args[:n_func_args], args[n_func_args:]
        return func(*ctx.in_args)

    @staticmethod
    def backward(ctx, *out_grad):
        forward_args, grad_args, grad_idx = filter_input(ctx.in_args)
        with torch.enable_grad():
            out = ctx.func(*forward_args)
        out = (out,) if torch.is_tensor(out) else tuple(out)
        outs, grads = filter_out(out, out_grad)
        wrt = grad_args + tuple(ctx.params)
        if not wrt:
            return (None, None, *reset_grad((), ctx.in_args, grad_idx))
        # retain_graph as TorchDEQ: the normalised weights' graphs (built once per step by
        # reset_norm) stay usable by the next checkpointed call instead of being recomputed
        with graph_retained():
            vjp = torch.autograd.grad(outs, wrt, grads, retain_graph=True, allow_unused=True)
        return (None, None, *reset_grad(vjp, ctx.in_args, grad_idx))


def mem_gc(func: nn.Module, in_args: Sequence[Any] | None = None) -> Any:
    """Run ``func(*in_args)`` with O(1) activation memory; gradients reach the tensor inputs that
    need them and ``func``'s trainable parameters.

    Args:
        func: the module to run.
        in_args: its positional arguments (tensors or anything else).

    Returns:
        ``func(*in_args)``.

    Example:
        >>> ffn = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))
        >>> x = torch.randn(4, 8, requires_grad=True)
        >>> y = mem_gc(ffn, (x,))         # same value and gradients as ffn(x)
        >>> torch.allclose(y, ffn(x))
        True
        >>> y.sum().backward(); x.grad.shape
        torch.Size([4, 8])
    """
    in_args = tuple(in_args) if in_args else ()
    if not torch.is_grad_enabled():   # no graph to checkpoint (a solver's iterations): the call
        return func(*in_args)         # TorchDEQ's autograd.Function makes, without its overhead
    if isinstance(func, nn.Module) and not getattr(func, "_is_replica", False):
        tensors, pins = _checkpoint_inputs(func)
        func = _PinnedCall(func, pins) if pins else func
    else:
        tensors = DEQGradCkpt.fetch_params(func)
    return DEQGradCkpt.apply(func, len(in_args), *in_args, *tensors)
