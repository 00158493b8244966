"""``torchdeq.loss.jacobian``: ``jac_reg`` (Hutchinson ||J||_F^2 / numel) and ``power_method``.

``jac_reg`` draws its probe vectors as TorchDEQ does (``torch.randn(*z0.shape)`` in the default
dtype on the CPU's generator, then moved to ``z0``'s dtype and device), so a seeded client gets
TorchDEQ's estimate draw for draw in any dtype (:func:`deq_fast.nn.regularizers.jac_reg` draws in
``z0``'s dtype and device, a different stream in float64 or on CUDA); lists of states are passed
to deq_fast's. ``power_method`` is deq_fast's: TorchDEQ's spectral-radius estimate is wrong
(issue 8), ours is the fix and returns ``(eigenvector, eigenvalue)`` as TorchDEQ's does.
"""
from __future__ import annotations

from typing import Any

import torch

from deq_fast.nn.regularizers import jac_reg as _jac_reg, power_method

__all__ = ["jac_reg", "power_method"]


def jac_reg(f0: Any, z0: Any, vecs: int = 1, create_graph: bool = True) -> torch.Tensor:
    """Hutchinson estimate of ``tr(J^T J) / numel(z0)``, ``J = df0/dz0`` (TorchDEQ's draws).

    Example:
        >>> W = torch.eye(8) / 2; z = torch.randn(4, 8, requires_grad=True)
        >>> float(jac_reg(z @ W, z, vecs=400)) < 0.3       # ||W||_F^2 / 8 = 0.25 per sample
        True
    """
    if not (torch.is_tensor(f0) and torch.is_tensor(z0)):
        return _jac_reg(f0, z0, vecs=vecs, create_graph=create_graph)
    if not isinstance(vecs, int) or vecs < 1:
        raise ValueError(f"vecs must be a positive int, got {vecs!r}")
    if not z0.requires_grad:
        raise ValueError("z0 must require grad (f0 must be computed from it)")
    result = 0
    for _ in range(vecs):
        v = torch.randn(*z0.shape).to(z0)
        vj = torch.autograd.grad(f0, z0, v, retain_graph=True, create_graph=create_graph)[0]
        result = result + vj.norm() ** 2
    return result / vecs / z0.numel()
