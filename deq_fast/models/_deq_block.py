"""The DEQ block both models share: the DEQ module, norm/dropout resets, the unrolled warm-up or the
equilibrium solve, and the Jacobian penalty.

A mixin rather than a submodule, so that the models keep their attribute and parameter names
(``cell.*``, ``deq``) and their checkpoints.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, ContextManager

import torch
import torch.nn as nn

__all__ = ["DEQBlockMixin"]


class DEQBlockMixin:
    """For an ``nn.Module`` with an equilibrium cell ``self.cell``: call :meth:`_init_deq_block`
    in ``__init__`` after building ``self.cell``, then :meth:`_reset_deq_block` and
    :meth:`_solve_deq_block` in ``forward``.

    Example:
        >>> class Toy(DEQBlockMixin, nn.Module):
        ...     def __init__(self):
        ...         super().__init__(); self.cell = nn.Linear(4, 4)
        ...         self._init_deq_block(deq_api(), "weight_norm", 3, dict(f_max_iter=5))
        >>> from deq_fast.models._deq_api import deq_api
        >>> toy = Toy(); toy._reset_deq_block()
        >>> z, info = toy._solve_deq_block(lambda z: 0.5 * toy.cell(z), torch.zeros(2, 4))
    """

    cell: nn.Module

    def _init_deq_block(self, api: Any, norm: str, num_unrolled: int,
                        deq_kwargs: dict[str, Any] | None,
                        jac_context: Callable[[], ContextManager] = contextlib.nullcontext) -> None:
        """Normalise ``self.cell`` (unless ``norm == 'none'``) and build ``self.deq``.

        Args:
            api: the DEQ implementation's namespace (:func:`~deq_fast.models.deq_api`).
            norm: ``'weight_norm'`` or ``'none'``.
            num_unrolled: weight-tied applications of ``f`` in the warm-up.
            deq_kwargs: options for ``api.get_deq``.
            jac_context: context the Jacobian penalty runs in (e.g. math attention).
        """
        self.api, self.norm, self.num_unrolled = api, norm, num_unrolled
        self._jac_context = jac_context
        if norm != "none":
            api.apply_norm(self.cell, norm)
        self.deq = api.get_deq(**(deq_kwargs or {}))

    def _reset_deq_block(self) -> None:
        """Recompute the normalised weights (once per forward, not in every solver iteration) and
        draw new variational-dropout masks for this batch."""
        if self.norm != "none":
            self.api.reset_norm(self.cell)
        self.api.reset_dropout(self.cell)

    def _solve_deq_block(self, func: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor,
                         unrolled: bool = False, jac_loss: bool = False,
                         backward_writer: Callable | None = None) -> tuple[torch.Tensor, dict]:
        """``(z, info)``: ``num_unrolled`` tracked applications of ``func`` from ``z0`` with
        ``info = {}`` (warm-up), or the DEQ module's fixed point and statistics, plus
        ``info['jac_loss']`` when ``jac_loss`` is asked for in training."""
        if unrolled:
            z = z0
            for _ in range(self.num_unrolled):
                z = func(z)
            return z, {}
        kwargs = {"backward_writer": backward_writer} if backward_writer is not None else {}
        z_out, info = self.deq(func, z0, **kwargs)
        z = z_out[-1]
        if jac_loss and self.training:
            zj = z.detach().requires_grad_()
            info = dict(info)
            with self._jac_context():
                info["jac_loss"] = self.api.jac_reg(func(zj), zj)
        return z, info
