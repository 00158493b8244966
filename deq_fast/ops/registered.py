"""The seven fused solver ops as PyTorch custom ops: ``torch.ops.deq_fast.<name>``.

Each op is declared once with ``torch.library.custom_op`` (schema inferred from the type hints,
mutated arguments declared, no outputs):

* default implementation (every device): the pure-torch reference of ``deq_fast/ops/*.py``;
* ``cuda``: the Triton launcher of ``deq_fast.kernels`` (when Triton imports; Anderson histories
  longer than 16 take the reference, the in-kernel solve holds at most 16 entries);
* ``cpu``: also the Triton launcher when ``TRITON_INTERPRET=1`` was set before this module was
  imported, so ``DEQ_FAST_BACKEND=triton`` runs the Triton kernels on CPU tensors (interpreter);
* fake (meta) implementation: nothing to compute, the ops only mutate their arguments, so
  ``torch.compile`` / ``torch.library.opcheck`` trace them without running anything.

The engine reaches these through :func:`deq_fast.ops.dispatch.get_ops` (backend ``'triton'``).
``KERNEL_DEVICES`` records where the Triton kernels are registered.

Example:
    >>> import torch, deq_fast.ops.registered                      # registers torch.ops.deq_fast.*
    >>> x, fx, sq = torch.randn(2, 37), torch.randn(2, 37), torch.empty(2, 2)
    >>> torch.ops.deq_fast.residual_norms(x, fx, sq)               # sq: [2, 2]
"""
from __future__ import annotations

from torch import Tensor
from torch.library import custom_op

from deq_fast.ops import backends
from deq_fast.ops.anderson import anderson_mix_reference, anderson_residual_reference
from deq_fast.ops.broyden import broyden_dots_reference, broyden_update_reference
from deq_fast.ops.fixed_point import fixed_point_advance_reference, residual_norms_reference
from deq_fast.ops.status import track_status_reference

__all__ = ["anderson_residual", "anderson_mix", "broyden_dots", "broyden_update",
           "residual_norms", "fixed_point_advance", "track_status", "KERNEL_DEVICES"]


@custom_op("deq_fast::anderson_residual", mutates_args=("F", "G", "gram", "sq"))
def anderson_residual(x: Tensor, fx: Tensor, F: Tensor, G: Tensor, gram: Tensor, sq: Tensor,
                      slot: int) -> None:
    """Anderson pass 1 (see ``deq_fast.ops.anderson``)."""
    anderson_residual_reference(x, fx, F, G, gram, sq, slot)


@custom_op("deq_fast::anderson_mix", mutates_args=("x", "best"))
def anderson_mix(F: Tensor, G: Tensor, gram: Tensor, x: Tensor, best: Tensor, improved: Tensor,
                 n: int, newest: int, lam: float, scaled: bool, beta: float, keep_f: bool) -> None:
    """Anderson pass 2 (see ``deq_fast.ops.anderson``)."""
    anderson_mix_reference(F, G, gram, x, best, improved, n, newest, lam, scaled, beta, keep_f)


@custom_op("deq_fast::broyden_dots", mutates_args=("g", "ab", "scal"))
def broyden_dots(x: Tensor, fx: Tensor, g: Tensor, dx: Tensor, U: Tensor, V: Tensor, ab: Tensor,
                 scal: Tensor, n_valid: int) -> None:
    """Broyden pass 1 (see ``deq_fast.ops.broyden``)."""
    broyden_dots_reference(x, fx, g, dx, U, V, ab, scal, n_valid)


@custom_op("deq_fast::broyden_update", mutates_args=("x", "dx", "U", "V", "best"))
def broyden_update(x: Tensor, g: Tensor, dx: Tensor, U: Tensor, V: Tensor, ab: Tensor,
                   scal: Tensor, best: Tensor, improved: Tensor, active: Tensor, slot: int,
                   n_valid: int) -> None:
    """Broyden pass 2 (see ``deq_fast.ops.broyden``)."""
    broyden_update_reference(x, g, dx, U, V, ab, scal, best, improved, active, slot, n_valid)


@custom_op("deq_fast::residual_norms", mutates_args=("sq",))
def residual_norms(x: Tensor, fx: Tensor, sq: Tensor, tau: float = 1.0) -> None:
    """Per-sample squared residual norms of the damped map (see ``deq_fast.ops.fixed_point``)."""
    residual_norms_reference(x, fx, sq, tau)


@custom_op("deq_fast::fixed_point_advance", mutates_args=("x", "best"))
def fixed_point_advance(x: Tensor, fx: Tensor, best: Tensor, improved: Tensor,
                        active: Tensor, tau: float = 1.0) -> None:
    """Fixed-point advance to the damped map (see ``deq_fast.ops.fixed_point``)."""
    fixed_point_advance_reference(x, fx, best, improved, active, tau)


@custom_op("deq_fast::track_status",
           mutates_args=("lowest", "best_step", "trace", "active", "improved"))
def track_status(sq: Tensor, lowest: Tensor, best_step: Tensor, trace: Tensor, active: Tensor,
                 improved: Tensor, t: int, step: float, tol: float, stop_idx: int,
                 whole_batch: bool, stop_together: bool, always_update: bool,
                 rel_eps: float) -> None:
    """Residual bookkeeping (see ``deq_fast.ops.status``)."""
    track_status_reference(sq, lowest, best_step, trace, active, improved, t, step, tol, stop_idx,
                           whole_batch, stop_together, always_update, rel_eps)


_OPS = {"anderson_residual": anderson_residual, "anderson_mix": anderson_mix,
        "broyden_dots": broyden_dots, "broyden_update": broyden_update,
        "residual_norms": residual_norms, "fixed_point_advance": fixed_point_advance,
        "track_status": track_status}


def _no_output(*args, **kwargs) -> None:
    """Fake kernel: the ops only mutate their (already allocated) arguments."""
    return None


for _op in _OPS.values():
    _op.register_fake(_no_output)


def _register_kernels() -> tuple:
    """Register the Triton launchers; returns the device types they serve (never raises)."""
    if not backends.triton_status()[0]:
        return ()
    try:
        from deq_fast import kernels
    except Exception:  # a broken Triton install: the references stay in place
        return ()
    # CPU tensors only when the kernels were built by the interpreter (TRITON_INTERPRET=1 before
    # deq_fast.kernels was first imported; a compiled kernel cannot run on CPU tensors)
    interpreted = type(kernels.KERNELS["residual_norms"]).__name__ == "InterpretedFunction"
    devices = ("cuda", "cpu") if (interpreted and backends.interpreter_enabled()) else ("cuda",)
    launchers = {name: getattr(kernels, name) for name in _OPS}
    # the in-kernel solve keeps the history in registers (m <= kernels.anderson.MAX_M = 16);
    # longer Anderson histories take the reference (a shape check, no host sync)
    max_m = kernels.anderson.MAX_M

    def anderson_residual_kernel(x, fx, F, G, gram, sq, slot):
        if F.shape[1] > max_m:
            return anderson_residual_reference(x, fx, F, G, gram, sq, slot)
        return kernels.anderson_residual(x, fx, F, G, gram, sq, slot)

    def anderson_mix_kernel(F, G, gram, x, best, improved, n, newest, lam, scaled, beta, keep_f):
        if F.shape[1] > max_m:
            return anderson_mix_reference(F, G, gram, x, best, improved, n, newest, lam, scaled,
                                          beta, keep_f)
        return kernels.anderson_mix(F, G, gram, x, best, improved, n, newest, lam, scaled, beta,
                                    keep_f)

    launchers.update(anderson_residual=anderson_residual_kernel, anderson_mix=anderson_mix_kernel)
    for name, op in _OPS.items():
        op.register_kernel(devices)(launchers[name])
    return devices


KERNEL_DEVICES = _register_kernels()
