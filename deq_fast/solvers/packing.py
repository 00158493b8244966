"""Flatten solver states to one contiguous ``(B, D)`` tensor at the API boundary, and back.

A state is a tensor of any shape (the first dimension is the batch; a 1-D tensor is a batch of
scalars and a 0-d tensor a batch of one scalar, as in TorchDEQ) or a tuple/list of tensors with a
common batch size (MDEQ's multi-resolution states), packed side by side along ``D``.

What ``f`` returns is brought to the state's layout and dtype as the originals do: any strides
(a transposed or ``einsum`` output is made contiguous), another floating dtype (autocast) cast
back to the state's.
"""
from __future__ import annotations

from typing import Callable, Sequence, Union

import torch

State = Union[torch.Tensor, Sequence[torch.Tensor]]

__all__ = ["Packer", "State"]


class Packer:
    """Remembers a state's structure; ``pack`` it to ``(B, D)`` and ``unpack`` it back.

    Example:
        >>> p = Packer((torch.zeros(4, 3, 8, 8), torch.zeros(4, 6, 4, 4)), "x0")
        >>> p.pack((torch.ones(4, 3, 8, 8), torch.ones(4, 6, 4, 4))).shape
        torch.Size([4, 288])
    """

    def __init__(self, x0: State, name: str = "x0") -> None:
        self.name = name
        self.is_tensor = isinstance(x0, torch.Tensor)
        parts = [x0] if self.is_tensor else list(x0)
        if not parts or not all(isinstance(p, torch.Tensor) for p in parts):
            raise ValueError(f"{name} must be a tensor or a non-empty tuple/list of tensors")
        self.sequence_type = type(x0) if not self.is_tensor else None
        first = parts[0]
        if not first.dtype.is_floating_point:
            raise ValueError(f"{name} must have a floating-point dtype, got {first.dtype}")
        if first.dim() == 0 and len(parts) > 1:
            raise ValueError(f"{name}[0] is a 0-d tensor; every part of a tuple state needs a batch "
                             "dimension")
        self.batch = first.shape[0] if first.dim() >= 2 or len(parts) > 1 else max(first.numel(), 1)
        self.shapes = [tuple(p.shape) for p in parts]
        self.dtype, self.device = first.dtype, first.device
        for i, p in enumerate(parts):
            where = name if self.is_tensor else f"{name}[{i}]"
            if p.dtype != self.dtype or p.device != self.device:
                raise ValueError(f"{where} has dtype {p.dtype} on {p.device}; every part of {name} "
                                 f"must match {self.dtype} on {self.device}")
            if len(parts) > 1 and (p.dim() < 1 or p.shape[0] != self.batch):
                raise ValueError(f"{where} has batch size {p.shape[0] if p.dim() else None}; "
                                 f"expected {self.batch}")
        self.sizes = [p.numel() // self.batch for p in parts]
        self.dim = sum(self.sizes)

    def pack(self, x: State, what: str | None = None) -> torch.Tensor:
        """``(B, D)`` contiguous copy/view of ``x``; checks that ``x`` has this structure."""
        what = what or self.name
        parts = [x] if isinstance(x, torch.Tensor) else list(x)
        shapes = [tuple(p.shape) for p in parts] if all(isinstance(p, torch.Tensor) for p in parts) else None
        if shapes != self.shapes:
            raise ValueError(f"{what} returned shapes {shapes if shapes is not None else type(x).__name__}, "
                             f"expected {self.shapes} (the shapes of {self.name})")
        if len(parts) == 1:
            p = parts[0]
            # already (B, D): no reshape, so no op dispatched per solver iteration
            flat = p if p.dim() == 2 and p.shape[1] == self.dim else p.reshape(self.batch, self.dim)
            return flat.contiguous()   # a no-op (no dispatched op) when already contiguous
        return torch.cat([p.reshape(self.batch, -1) for p in parts], dim=1)

    def unpack(self, flat: torch.Tensor) -> State:
        """Views of ``flat`` (``(B, D)``) with this structure."""
        if self.is_tensor:
            return flat if flat.shape == self.shapes[0] else flat.view(self.shapes[0])
        parts = flat.split(self.sizes, dim=1)
        out = [p.reshape(s) for p, s in zip(parts, self.shapes)]
        return self.sequence_type(out) if self.sequence_type in (tuple, list) else tuple(out)

    def wrap(self, f: Callable[[State], State], name: str = "f") -> Callable[[torch.Tensor], torch.Tensor]:
        """``f`` as a map ``(B, D) -> (B, D)``; the output structure is checked on every call
        (a cheap Python comparison of shapes)."""
        def flat_f(x: torch.Tensor) -> torch.Tensor:
            out = self.pack(f(self.unpack(x)), what=name)
            if out.dtype != self.dtype or out.device != self.device:
                if out.device != self.device or not out.dtype.is_floating_point:
                    raise ValueError(f"{name} returned dtype {out.dtype} on {out.device}, expected "
                                     f"a floating dtype on {self.device} (that of {self.name})")
                out = out.to(self.dtype)   # e.g. autocast: the originals cast back to the state
            return out
        return flat_f
