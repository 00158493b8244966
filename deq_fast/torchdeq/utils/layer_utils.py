"""``torchdeq.utils.layer_utils``: the wrappers that give a DEQ ``f`` one calling convention.

``deq_decorator(func, z_init, no_stat)`` returns ``(wrapper, z)``: a tensor state is used as is
(:class:`DEQWrapper`); a list of states is packed into one ``(B, D)`` vector
(:class:`MDEQWrapper`), or kept as a list when ``no_stat`` (:class:`SpeedyMDEQWrapper`). Every
wrapper is called as ``wrapper(z, tau=1.0)`` = ``tau * f(z) + (1 - tau) * z``.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def _flat(z: torch.Tensor) -> torch.Tensor:
    return z.flatten(start_dim=1) if z.dim() >= 2 else z.reshape(z.numel(), 1)


def _damp(fz, z, tau: float):
    return fz if tau == 1.0 else tau * fz + (1 - tau) * z


class DEQWrapper:
    """A tensor state: ``f(z)``."""

    def __init__(self, func: Callable, z_init: Any = None):
        self.func = func

    def list2vec(self, z):
        return z

    def vec2list(self, z):
        return z

    def detach(self, z):
        return z.detach()

    def __call__(self, z, tau: float = 1.0):
        return _damp(self.func(z), z, tau)

    def norm_diff(self, z_new, z_old, **kwargs):
        return (z_new - z_old).norm(p=1)


class MDEQWrapper:
    """A list of states ``(B, ...)`` packed into one ``(B, D)`` vector; ``f(*states)``."""

    def __init__(self, func: Callable, z_init):
        self.func = func
        self.z_shape = [z.shape for z in z_init]
        sizes = [_flat(z)[0].numel() for z in z_init]
        self.z_indexing = [0]
        for n in sizes:
            self.z_indexing.append(self.z_indexing[-1] + n)

    def list2vec(self, z_list):
        return torch.cat([_flat(z) for z in z_list], dim=1)

    def vec2list(self, z_hid):
        idx = self.z_indexing
        return [z_hid[:, idx[i]:idx[i + 1]].reshape(s) for i, s in enumerate(self.z_shape)]

    def detach(self, z_hid):
        return z_hid.detach()

    def __call__(self, z_hid, tau: float = 1.0):
        return _damp(self.list2vec(self.func(*self.vec2list(z_hid))), z_hid, tau)

    def norm_diff(self, z_new, z_old, show_list: bool = False):
        if show_list:
            return [(a - b).norm(p=1).item()
                    for a, b in zip(self.vec2list(z_new), self.vec2list(z_old))]
        return (z_new - z_old).norm(p=1).item()


class SpeedyMDEQWrapper(DEQWrapper):
    """A list of states kept as a list; ``f(*states)``."""

    def detach(self, z_list):
        return [z.detach() for z in z_list]

    def __call__(self, z_list, tau: float = 1.0):
        out = self.func(*z_list)
        return out if tau == 1.0 else [_damp(a, b, tau) for a, b in zip(out, z_list)]

    def norm_diff(self, z_new, z_old, show_list: bool = False):
        diff = [(a - b).norm(p=1).item() for a, b in zip(z_new, z_old)]
        return diff if show_list else float(sum(diff))


def deq_decorator(func: Callable, z_init: Any = None, no_stat: bool = True):
    """``(wrapper, z)`` for ``func`` and ``z_init`` (see the module doc)."""
    if torch.is_tensor(z_init):
        return DEQWrapper(func, z_init), z_init
    if not isinstance(z_init, (tuple, list)):
        raise ValueError(f"z_init must be a tensor or a list/tuple of tensors, got "
                         f"{type(z_init).__name__}")
    if no_stat:
        return SpeedyMDEQWrapper(func, z_init), z_init
    wrapper = MDEQWrapper(func, z_init)
    return wrapper, wrapper.list2vec(z_init)
