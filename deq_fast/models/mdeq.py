"""Multiscale deep equilibrium model (MDEQ) for image classification.

Structure (Bai, Koltun, Kolter, "Multiscale Deep Equilibrium Models", 2020;
docs/contracts.md#mdeq-reference-configurations):

* a stem turns the image into the **injection** ``u`` for the highest-resolution branch;
* the equilibrium cell ``f`` holds ``n`` branches at resolutions ``H/2^i``; each branch runs one
  residual block (two 3x3 convolutions, GroupNorm, expansion ``e``, variational dropout), the
  injection is added in branch 0 only, the other branches start from zero states;
* **multiscale fusion**: every output branch ``i`` sums all branches ``j`` brought to its resolution
  (identity for ``j == i``; ``i - j`` strided 3x3 convolutions down for ``j < i``; a 1x1 convolution
  and nearest upsampling for ``j > i``), followed by post-fusion ReLU, 1x1 convolution and GroupNorm;
* weight normalisation on every convolution of ``f`` (recomputed once per forward, outside the
  solver loop) through the DEQ library's ``apply_norm``/``reset_norm``;
* the fixed point ``z* = f(z*, u)`` comes from the DEQ module (``get_deq``), or, during the warm-up,
  from ``num_unrolled`` explicit weight-tied applications of ``f`` with ordinary backpropagation;
* the classification head merges the branches from high to low resolution and ends with global
  average pooling and a linear layer.

The branch states travel through the solver packed into one ``(B, D)`` tensor, so any solver that
accepts a tensor state works; ``f`` always returns the state's dtype (with bf16 autocast the
convolutions run in bf16 while the solver's state and mixing stay fp32).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._deq_api import deq_api
from ._deq_block import DEQBlockMixin

__all__ = ["MDEQ"]


def _gn(channels: int, groups: int) -> nn.GroupNorm:
    # The reference uses 8 groups; widths such as 14 (mdeq-large's head) are not divisible by 8, so
    # the group count falls back to the largest common divisor.
    return nn.GroupNorm(math.gcd(groups, channels), channels)


class _ResidualBlock(nn.Module):
    """``out = GN(ReLU(GN(conv2(drop(ReLU(GN(conv1 z)))) + u) + z))``, width ``C -> e*C -> C``."""

    def __init__(self, channels: int, expansion: int, groups: int, dropout: float, api: Any):
        super().__init__()
        hidden = channels * expansion
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1, bias=False)
        self.gn1 = _gn(hidden, groups)
        self.conv2 = nn.Conv2d(hidden, channels, 3, padding=1, bias=False)
        self.gn2 = _gn(channels, groups)
        self.gn3 = _gn(channels, groups)
        self.drop = api.VariationalDropout2d(dropout, token_first=False)

    def forward(self, z: torch.Tensor, injection: torch.Tensor | None) -> torch.Tensor:
        out = self.drop(F.relu(self.gn1(self.conv1(z))))
        out = self.conv2(out)
        if injection is not None:
            out = out + injection
        out = F.relu(self.gn2(out) + z)
        return self.gn3(out)


class _Fuse(nn.Module):
    """Sum of all branches resampled to branch ``i``'s resolution and width."""

    def __init__(self, channels: Sequence[int], i: int, groups: int):
        super().__init__()
        self.i = i
        paths = []
        for j, cj in enumerate(channels):
            if j == i:
                paths.append(nn.Identity())
            elif j > i:   # lower resolution -> 1x1 conv, upsample by 2^(j-i)
                paths.append(nn.Sequential(nn.Conv2d(cj, channels[i], 1, bias=False),
                                           _gn(channels[i], groups)))
            else:         # higher resolution -> (i - j) strided 3x3 convs
                layers: list[nn.Module] = []
                for k in range(i - j):
                    last = k == i - j - 1
                    cout = channels[i] if last else cj
                    layers += [nn.Conv2d(cj, cout, 3, stride=2, padding=1, bias=False),
                               _gn(cout, groups)]
                    if not last:
                        layers.append(nn.ReLU())
                paths.append(nn.Sequential(*layers))
        self.paths = nn.ModuleList(paths)

    def forward(self, xs: list[torch.Tensor]) -> torch.Tensor:
        out = xs[self.i]
        size = out.shape[-2:]
        for j, (path, x) in enumerate(zip(self.paths, xs)):
            if j == self.i:
                continue
            y = path(x)
            if j > self.i:
                y = F.interpolate(y, size=size, mode="nearest")
            out = out + y
        return out


class _MDEQCell(nn.Module):
    """The equilibrium map ``f(z_0..z_{n-1}; u)``: blocks, fusion, post-fusion layers."""

    def __init__(self, channels: Sequence[int], expansion: int, groups: int, dropout: float,
                 api: Any):
        super().__init__()
        self.blocks = nn.ModuleList(_ResidualBlock(c, expansion, groups, dropout, api)
                                    for c in channels)
        self.fuse = nn.ModuleList(_Fuse(channels, i, groups) for i in range(len(channels)))
        self.post = nn.ModuleList(
            nn.Sequential(nn.ReLU(), nn.Conv2d(c, c, 1, bias=False), _gn(c, groups))
            for c in channels)

    def forward(self, zs: list[torch.Tensor], injection: torch.Tensor) -> list[torch.Tensor]:
        ys = [blk(z, injection if i == 0 else None) for i, (blk, z) in enumerate(zip(self.blocks, zs))]
        return [post(fuse(ys)) for fuse, post in zip(self.fuse, self.post)]


class _Head(nn.Module):
    """Merge branches from high to low resolution, pool, classify."""

    def __init__(self, channels: Sequence[int], head_channels: Sequence[int], final_channels: int,
                 num_classes: int, groups: int):
        super().__init__()
        self.incre = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, h, 1, bias=False), _gn(h, groups), nn.ReLU(),
                          nn.Conv2d(h, h, 3, padding=1, bias=False), _gn(h, groups), nn.ReLU())
            for c, h in zip(channels, head_channels))
        self.down = nn.ModuleList(
            nn.Sequential(nn.Conv2d(head_channels[i], head_channels[i + 1], 3, stride=2,
                                    padding=1, bias=False),
                          _gn(head_channels[i + 1], groups), nn.ReLU())
            for i in range(len(channels) - 1))
        self.final = nn.Sequential(nn.Conv2d(head_channels[-1], final_channels, 1, bias=False),
                                   _gn(final_channels, groups), nn.ReLU())
        self.classifier = nn.Linear(final_channels, num_classes)

    def forward(self, zs: list[torch.Tensor]) -> torch.Tensor:
        y = self.incre[0](zs[0])
        for i in range(1, len(zs)):
            y = self.incre[i](zs[i]) + self.down[i - 1](y)
        y = self.final(y)
        return self.classifier(y.mean(dim=(2, 3)))


class MDEQ(DEQBlockMixin, nn.Module):
    """Multiscale DEQ classifier (see the module docstring for the structure).

    Args:
        channels: width of each branch, e.g. ``(24, 24)``; branch ``i`` has resolution ``H/2^i``.
        head_channels: per-branch widths of the classification head.
        final_channels: width before global pooling.
        num_classes: number of classes.
        in_channels: image channels.
        num_groups: GroupNorm groups (largest common divisor with the width is used).
        expansion: width factor inside a residual block.
        dropout: variational dropout rate inside ``f`` (one mask per sample per forward).
        num_unrolled: weight-tied layers of the warm-up (``forward(..., unrolled=True)``).
        deq_kwargs: options for ``get_deq`` (``f_solver``, ``f_max_iter``, ``ift``, ...).
        deq_impl: ``"deq_fast"`` or ``"torchdeq"`` (the same model driven by the baseline).
        norm: ``"weight_norm"`` or ``"none"``.

    Returns (forward):
        ``(logits (B, num_classes), info)`` where ``info`` is the DEQ module's solver statistics
        (``nstep``, ``abs_lowest``, ``rel_lowest``, traces; empty during the warm-up) plus
        ``jac_loss`` when requested.

    Example:
        >>> m = MDEQ((8, 16), (8, 16), 32, num_classes=10, in_channels=1, num_groups=4,
        ...          deq_kwargs=dict(f_solver="anderson", f_max_iter=8))
        >>> logits, info = m(torch.randn(2, 1, 8, 8))
        >>> logits.shape
        torch.Size([2, 10])
    """

    def __init__(self, channels: Sequence[int], head_channels: Sequence[int], final_channels: int,
                 num_classes: int, in_channels: int = 3, num_groups: int = 8, expansion: int = 5,
                 dropout: float = 0.0, num_unrolled: int = 10,
                 deq_kwargs: dict[str, Any] | None = None, deq_impl: str = "deq_fast",
                 norm: str = "weight_norm"):
        super().__init__()
        if not channels:
            raise ValueError("channels must list at least one branch width")
        if len(head_channels) != len(channels):
            raise ValueError(f"head_channels must have one width per branch ({len(channels)}), "
                             f"got {len(head_channels)}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if num_unrolled < 1:
            raise ValueError(f"num_unrolled must be >= 1, got {num_unrolled}")
        if norm not in ("weight_norm", "none"):
            raise ValueError(f"norm must be 'weight_norm' or 'none', got {norm!r}")
        api = deq_api(deq_impl)
        self.channels = tuple(int(c) for c in channels)
        c0 = self.channels[0]
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, c0, 3, padding=1, bias=False), _gn(c0, num_groups), nn.ReLU(),
            nn.Conv2d(c0, c0, 3, padding=1, bias=False), _gn(c0, num_groups))
        self.cell = _MDEQCell(self.channels, expansion, num_groups, dropout, api)
        self.head = _Head(self.channels, head_channels, final_channels, num_classes, num_groups)
        self._init_deq_block(api, norm, num_unrolled, deq_kwargs)

    def _shapes(self, x: torch.Tensor) -> list[tuple[int, ...]]:
        b, _, h, w = x.shape
        return [(b, c, -(-h // 2 ** i), -(-w // 2 ** i)) for i, c in enumerate(self.channels)]

    def forward(self, x: torch.Tensor, unrolled: bool = False, jac_loss: bool = False,
                backward_writer=None) -> tuple[torch.Tensor, dict]:
        if x.dim() != 4:
            raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
        self._reset_deq_block()
        injection = self.stem(x)
        shapes = self._shapes(x)
        sizes = [math.prod(s[1:]) for s in shapes]

        def func(z: torch.Tensor) -> torch.Tensor:
            zs = [p.view(s) for p, s in zip(torch.split(z, sizes, dim=1), shapes)]
            out = self.cell(zs, injection)
            return torch.cat([o.flatten(1) for o in out], dim=1).to(z.dtype)

        z0 = torch.zeros(x.shape[0], sum(sizes), device=x.device, dtype=torch.float32)
        z, info = self._solve_deq_block(func, z0, unrolled, jac_loss, backward_writer)
        zs = [p.view(s) for p, s in zip(torch.split(z, sizes, dim=1), shapes)]
        return self.head(zs), info
