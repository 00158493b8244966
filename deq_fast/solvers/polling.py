"""How the host learns that a solve may stop, without a per-iteration host sync.

The per-sample stop flags (``active``, a ``[B]`` bool tensor) live on the solver's device and are
updated in place by the fused ops. Looking at them must not cost more than it saves: an extra
evaluation of ``f`` (in the backward, an extra VJP through the layer) costs far more than reading
a flag, so the host looks after every evaluation, in the cheapest way its device allows:

* CPU: the flags are ordinary host memory; they are read through a NumPy view made once, which
  dispatches no ATen op (no ``aten._local_scalar_dense``, nothing counted as a sync). A solve stops
  right after the evaluation that converged, as the originals do.
* CUDA: ``any(active)`` is copied to pinned host memory with ``non_blocking=True`` and an event is
  recorded; at the next look the host waits for that event (by then the next evaluation of ``f``
  is already queued behind the copy, so the GPU never idles) and reads the copy. No
  ``aten._local_scalar_dense``, no drained queue; the solve stops at most one evaluation late.

``every=k`` looks every ``k`` evaluations; ``every=0`` never looks (a fixed iteration count: no
host interaction at all, capturable by CUDA graphs).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

__all__ = ["StopPoll", "NeverPoll", "make_poll"]


class StopPoll:
    """Polls a device flag tensor for "every sample has stopped"; see the module docstring."""

    def __init__(self, active: torch.Tensor, every: int) -> None:
        self.active = active
        self.every = every

    def due(self, count: int) -> bool:
        """True when the ``count``-th tracked evaluation (1-based) is one to look after."""
        return self.every > 0 and count % self.every == 0

    def should_stop(self, count: int) -> bool:
        """After the ``count``-th tracked evaluation: True when the host knows every sample stopped."""
        raise NotImplementedError


class HostPoll(StopPoll):
    """Flags in host memory: read directly through a NumPy view (no dispatched op)."""

    def __init__(self, active: torch.Tensor, every: int) -> None:
        super().__init__(active, every)
        self._view = active.numpy()   # shares memory: in-place updates are visible

    def should_stop(self, count: int) -> bool:
        return self.due(count) and not self._view.any()


class AsyncPoll(StopPoll):
    """Flags in device memory: a non-blocking copy to pinned memory, read when its event is done.

    ``event_factory`` makes the completion marker (``torch.cuda.Event`` on CUDA; injectable so the
    protocol is tested on the CPU).
    """

    def __init__(self, active: torch.Tensor, every: int,
                 event_factory: Optional[Callable[[], object]] = None) -> None:
        super().__init__(active, every)
        pinned = torch.cuda.is_available()
        self._host = torch.zeros(1, dtype=torch.bool, pin_memory=pinned)
        self._host_view = self._host.numpy()
        self._event_factory = event_factory or torch.cuda.Event
        self._event = None

    def should_stop(self, count: int) -> bool:
        if not self.due(count):
            return False
        stop = False
        if self._event is not None:
            self._event.synchronize()     # the copy of the previous look; f is queued behind it
            stop = not self._host_view[0]
            self._event = None
        if not stop:
            self._host.copy_(self.active.any().view(1), non_blocking=True)
            self._event = self._event_factory()
            self._event.record()
        return stop


class NeverPoll(StopPoll):
    """``every=0``: never looks (touches neither the flags nor the host; traceable by Dynamo)."""

    def should_stop(self, count: int) -> bool:
        return False


def make_poll(active: torch.Tensor, every: int) -> StopPoll:
    """The poller for ``active``'s device: :class:`NeverPoll` for ``every=0``, :class:`HostPoll`
    on CPU, else :class:`AsyncPoll`."""
    if every == 0:
        return NeverPoll(active, every)
    if active.device.type == "cpu":
        return HostPoll(active, every)
    return AsyncPoll(active, every)
