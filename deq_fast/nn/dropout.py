"""Variational dropout for DEQs: one mask per training step, fixed across solver iterations.

TorchDEQ-compatible classes (``dropout=0.5``, ``token_first=True``). Fixed here: masks are drawn on
the input's device and dtype (TorchDEQ draws them on the CPU, torchdeq issue #13); a mask that does
not fit the input (a new batch size without :func:`reset_dropout`) is redrawn instead of failing;
``dropout=1`` zeroes the input instead of producing NaN (0/0).

Channel-wise classes drop whole feature channels (mask ``(B, 1, ..., D)`` for ``token_first=True``,
``(B, D, 1, ...)`` otherwise); token-wise classes drop whole tokens/positions.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["VariationalDropout", "VariationalDropout1d", "VariationalDropout2d",
           "VariationalDropout3d", "VariationalDropToken1d", "VariationalDropToken2d",
           "VariationalDropToken3d", "reset_dropout"]


class _VariationalDropoutNd(nn.Module):
    """Base class. Subclasses define ``_mask_shape(x)``; ``n_spatial`` is the number of spatial dims
    (``None``: any shape)."""

    n_spatial: int | None = None
    channelwise = True

    def __init__(self, dropout: float = 0.5, token_first: bool = True):
        super().__init__()
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout!r}")
        self.dropout = float(dropout)
        self.token_first = bool(token_first)
        self.mask: torch.Tensor | None = None

    def extra_repr(self) -> str:
        return f"dropout={self.dropout}, token_first={self.token_first}"

    def _mask_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        nd = self.n_spatial
        if x.dim() != nd + 2:
            layout = "(B, *spatial, D)" if self.token_first else "(B, D, *spatial)"
            raise ValueError(f"{type(self).__name__} expects a {nd + 2}-D input {layout}, got shape "
                             f"{tuple(x.shape)}")
        shape = [1] * x.dim()
        shape[0] = x.shape[0]
        chan = x.dim() - 1 if self.token_first else 1
        if self.channelwise:
            shape[chan] = x.shape[chan]
        else:
            for d in range(1, x.dim()):
                if d != chan:
                    shape[d] = x.shape[d]
        return tuple(shape)

    def reset_mask(self, x: torch.Tensor) -> None:
        """Draw a new mask for inputs shaped like ``x`` on ``x``'s device and dtype."""
        keep = 1.0 - self.dropout
        shape = self._mask_shape(x)
        if keep == 0.0:
            self.mask = x.new_zeros(shape)
        else:
            self.mask = x.new_empty(shape).bernoulli_(keep).div_(keep)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.dropout == 0.0:
            return x
        m = self.mask
        if m is None or m.device != x.device or m.dtype != x.dtype \
                or m.shape != self._mask_shape(x):
            self.reset_mask(x)
        return x * self.mask


class VariationalDropout(_VariationalDropoutNd):
    """Element-wise variational dropout (one mask of the input's full shape per step).

    Example:
        >>> m = VariationalDropout(0.3); y = m(torch.randn(4, 16))
    """

    def _mask_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        return tuple(x.shape)


class VariationalDropout1d(_VariationalDropoutNd):
    """Channel-wise variational dropout for ``(B, L, D)`` (``token_first``) or ``(B, D, L)`` inputs.

    Example:
        >>> m = VariationalDropout1d(0.25, token_first=False); y = m(torch.randn(4, 8, 10))
    """
    n_spatial = 1


class VariationalDropout2d(_VariationalDropoutNd):
    """Channel-wise variational dropout for ``(B, H, W, D)`` or ``(B, D, H, W)`` inputs."""
    n_spatial = 2


class VariationalDropout3d(_VariationalDropoutNd):
    """Channel-wise variational dropout for ``(B, T, H, W, D)`` or ``(B, D, T, H, W)`` inputs."""
    n_spatial = 3


class VariationalDropToken1d(_VariationalDropoutNd):
    """Token-wise variational dropout for ``(B, L, D)`` (``token_first``) or ``(B, D, L)`` inputs."""
    n_spatial = 1
    channelwise = False


class VariationalDropToken2d(_VariationalDropoutNd):
    """Token-wise variational dropout for ``(B, H, W, D)`` or ``(B, D, H, W)`` inputs."""
    n_spatial = 2
    channelwise = False


class VariationalDropToken3d(_VariationalDropoutNd):
    """Token-wise variational dropout for ``(B, T, H, W, D)`` or ``(B, D, T, H, W)`` inputs."""
    n_spatial = 3
    channelwise = False


def reset_dropout(model: nn.Module) -> None:
    """Forget the masks of all variational dropout layers in ``model`` (new masks next call).

    Args:
        model: module containing variational dropout layers.

    Example:
        >>> deq_layer = nn.Sequential(nn.Linear(8, 8), VariationalDropout(0.5))
        >>> y = deq_layer(torch.randn(4, 8)); deq_layer[1].mask.shape
        torch.Size([4, 8])
        >>> reset_dropout(deq_layer)   # at the start of each training iteration
        >>> deq_layer[1].mask is None
        True
    """
    for module in model.modules():
        if isinstance(module, _VariationalDropoutNd):
            module.mask = None
