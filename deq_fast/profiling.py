"""Count what a solver dispatches: ATen ops (a launch proxy) and host syncs, excluding ``f``.

docs/design.md#measuring-performance: absolute times on shared machines are noise, counts are not.
``OpCounter`` is a
``TorchDispatchMode`` that counts every op reaching the dispatcher (views included), and host
syncs as ``aten._local_scalar_dense`` (what ``.item()``, ``bool(t)`` and ``float(t)`` dispatch
to). Wrap ``f`` with :meth:`OpCounter.exclude` so its own ops are not charged to the solver.

Example:
    >>> counter = OpCounter()
    >>> f = counter.exclude(lambda z: 0.5 * torch.cos(z))
    >>> with counter:
    ...     _ = deq_fast.anderson_solver(f, torch.zeros(2, 8), max_iter=10, tol=0)
    >>> counter.total > 0
    True
"""
from __future__ import annotations

import collections
import functools
from typing import Callable

from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounter", "per_iteration"]

SYNC_OPS = ("aten._local_scalar_dense",)


class OpCounter(TorchDispatchMode):
    """Counts dispatched ops by name while active; ops inside :meth:`exclude`-wrapped callables
    are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()
        self._paused = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self._paused:
            self.counts[str(func.overloadpacket).replace("aten::", "aten.")] += 1
        return func(*args, **(kwargs or {}))

    def exclude(self, fn: Callable) -> Callable:
        """``fn`` with counting paused while it runs (use for the fixed-point map ``f``)."""
        @functools.wraps(fn)
        def wrapped(*a, **k):
            self._paused += 1
            try:
                return fn(*a, **k)
            finally:
                self._paused -= 1
        return wrapped

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def syncs(self) -> int:
        return sum(self.counts[name] for name in SYNC_OPS)


def per_iteration(run: Callable[[Callable, int], object], f: Callable, iters: tuple = (12, 22)):
    """Ops and syncs per iteration of ``run(f_counted, max_iter)``, from the difference of two runs
    with different iteration counts (so setup and teardown cancel out). Use ``tol=0`` in ``run``
    so that no run stops early.

    Returns:
        ``(ops_per_iter, syncs_per_iter, counters)`` with the two :class:`OpCounter` objects.
    """
    counters = []
    for n in iters:
        c = OpCounter()
        fc = c.exclude(f)
        with c:
            run(fc, n)
        counters.append(c)
    span = iters[1] - iters[0]
    return ((counters[1].total - counters[0].total) / span,
            (counters[1].syncs - counters[0].syncs) / span, counters)
