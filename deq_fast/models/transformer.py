"""DEQ transformer language model: one weight-tied causal transformer block solved to equilibrium.

``f(z; u) = LN_out(h + FFN(LN_2 h))`` with ``h = (z + u) + Attn(LN_1(z + u))``, where ``u`` is the
input injection (token embedding plus learned positions, through a linear map), attention is causal
multi-head self-attention, and the state ``z`` is ``(B, L, d)``. Because ``u`` enters every
application and attention is causal, position ``t`` of the fixed point depends on tokens ``<= t``
only. Output: a final LayerNorm and a linear decoder tied to the embedding.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._deq_api import deq_api
from ._deq_block import DEQBlockMixin

__all__ = ["DEQTransformerLM"]


def _math_attention():
    """The Jacobian penalty is differentiated twice; the fused CPU attention kernels have no
    double backward, the math formulation does."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.MATH)


class _Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, d_ff: int, dropout: float, api: Any):
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.ff1 = nn.Linear(d_model, d_ff)
        self.ff2 = nn.Linear(d_ff, d_model)
        self.ln_out = nn.LayerNorm(d_model)
        self.drop = api.VariationalDropout1d(dropout, token_first=True)

    def forward(self, z: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        b, L, d = z.shape
        h = z + u
        q, k, v = self.qkv(self.ln1(h)).view(b, L, 3, self.n_heads, d // self.n_heads).unbind(2)
        att = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                             v.transpose(1, 2), is_causal=True)
        h = h + self.proj(att.transpose(1, 2).reshape(b, L, d))
        h = h + self.ff2(self.drop(F.gelu(self.ff1(self.ln2(h)))))
        return self.ln_out(h)


class DEQTransformerLM(DEQBlockMixin, nn.Module):
    """Causal DEQ transformer language model.

    Args:
        vocab_size: number of token ids.
        d_model: state width ``d``.
        n_heads: attention heads (must divide ``d_model``).
        d_ff: feed-forward width.
        max_len: longest sequence (learned positions).
        dropout: variational dropout rate inside ``f`` (one mask per sequence per forward).
        num_unrolled: weight-tied layers of the warm-up (``forward(..., unrolled=True)``).
        deq_kwargs: options for ``get_deq``.
        deq_impl: ``"deq_fast"`` or ``"torchdeq"``.
        norm: ``"weight_norm"`` (on the block's linear layers) or ``"none"``.

    Returns (forward):
        ``(logits (B, L, vocab_size), info)`` as :class:`~deq_fast.models.MDEQ`.

    Example:
        >>> m = DEQTransformerLM(256, d_model=32, n_heads=2, d_ff=64, max_len=16,
        ...                      deq_kwargs=dict(f_solver="anderson", f_max_iter=8))
        >>> logits, info = m(torch.randint(0, 256, (2, 16)))
        >>> logits.shape
        torch.Size([2, 16, 256])
    """

    def __init__(self, vocab_size: int, d_model: int = 128, n_heads: int = 4, d_ff: int = 512,
                 max_len: int = 256, dropout: float = 0.0, num_unrolled: int = 6,
                 deq_kwargs: dict[str, Any] | None = None, deq_impl: str = "deq_fast",
                 norm: str = "weight_norm"):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"n_heads ({n_heads}) must divide d_model ({d_model})")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if num_unrolled < 1:
            raise ValueError(f"num_unrolled must be >= 1, got {num_unrolled}")
        if norm not in ("weight_norm", "none"):
            raise ValueError(f"norm must be 'weight_norm' or 'none', got {norm!r}")
        api = deq_api(deq_impl)
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, d_model)
        self.pos = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        self.inject = nn.Linear(d_model, d_model)
        self.cell = _Block(d_model, n_heads, d_ff, dropout, api)
        self.ln_f = nn.LayerNorm(d_model)
        self.decoder = nn.Linear(d_model, vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.decoder.weight = self.embed.weight
        self._init_deq_block(api, norm, num_unrolled, deq_kwargs, jac_context=_math_attention)

    def forward(self, tokens: torch.Tensor, unrolled: bool = False, jac_loss: bool = False,
                backward_writer=None) -> tuple[torch.Tensor, dict]:
        if tokens.dim() != 2 or tokens.shape[1] > self.max_len:
            raise ValueError(f"tokens must be (B, L) with L <= {self.max_len}, "
                             f"got shape {tuple(tokens.shape)}")
        self._reset_deq_block()
        L = tokens.shape[1]
        u = self.inject(self.embed(tokens) + self.pos[:L])

        def func(z: torch.Tensor) -> torch.Tensor:
            return self.cell(z, u).to(z.dtype)

        z0 = torch.zeros(u.shape, device=u.device, dtype=torch.float32)
        z, info = self._solve_deq_block(func, z0, unrolled, jac_loss, backward_writer)
        return self.decoder(self.ln_f(z)), info
