"""Anderson mixing in two fused passes: ``deq_fast::anderson_residual`` and ``deq_fast::anderson_mix``.

State (per sample ``b``; ``m`` history slots used as a ring, ``s`` the slot being written):
``F [B, m, D]`` past ``f`` values, ``G [B, m, D]`` past residuals ``g = f(x) - x`` (state dtype),
``gram [B, m, m]`` their Gram matrix ``<G_i, G_j>`` (accumulation dtype: float32, float64 for
float64 states), updated one row per iteration instead of recomputed.

Pass 1, ``anderson_residual(x, fx, F, G, gram, sq, slot)``::

    F[:, s] = fx;   G[:, s] = g = fx - x
    gram[:, s, j] = gram[:, j, s] = <G[:, j], g>      for every slot j (unwritten slots hold zeros)
    sq[:, 0] = ||g||^2;   sq[:, 1] = ||fx||^2
    bytes: read x, fx, the other m-1 rows of G; write F[:, s], G[:, s]  ->  (m + 3)·B·D·size

Pass 2, ``anderson_mix(F, G, gram, x, best, improved, n, newest, lam, scaled, beta, keep_f)``::

    alpha = anderson_lstsq(gram, n, newest, lam, scaled)         (see deq_fast.ops.lstsq)
    best[b] = (F[b, newest] if keep_f else x[b])   where improved[b]
    x = sum_j alpha_j (F_j - (1 - beta) G_j)        (= beta·alpha·F + (1 - beta)·alpha·X, X = F - G)
    bytes: read n rows of F (and of G when beta != 1), write x  ->  (m + 1)·B·D·size (beta = 1)
    n == 0 means: only update ``best`` (the solver's last iteration).

Together (2m + 4)·B·D·size per iteration, against about 62·B·D·4 for TorchDEQ's step.
"""
from __future__ import annotations

from typing import Optional

import torch

from deq_fast.ops._views import view
from deq_fast.ops.lstsq import anderson_lstsq

__all__ = ["anderson_residual_reference", "anderson_mix_reference"]


def anderson_residual_reference(x: torch.Tensor, fx: torch.Tensor, F: torch.Tensor,
                                G: torch.Tensor, gram: torch.Tensor, sq: torch.Tensor,
                                slot: int, cache: Optional[dict] = None) -> None:
    """Pure-torch pass 1 (in place; see the module docstring). ``cache``: see ``_views``."""
    B, m, _ = F.shape
    view(cache, F, slot, lambda: F[:, slot]).copy_(fx)
    g = view(cache, G, slot, lambda: G[:, slot])
    torch.sub(fx, x, out=g)
    row = view(cache, gram, "row", lambda: torch.empty(B, m, 1, dtype=gram.dtype, device=gram.device))
    if G.dtype == gram.dtype:
        torch.bmm(G, view(cache, G, ("col", slot), lambda: g.unsqueeze(2)), out=row)
    else:                                                               # half states: accumulate in fp32
        torch.bmm(G.to(gram.dtype), g.to(gram.dtype).unsqueeze(2), out=row)
    view(cache, gram, ("c", slot), lambda: gram[:, :, slot:slot + 1]).copy_(row)
    view(cache, gram, ("r", slot), lambda: gram[:, slot:slot + 1, :]).copy_(
        view(cache, row, "t", lambda: row.transpose(1, 2)))
    view(cache, sq, 0, lambda: sq[:, 0]).copy_(view(cache, row, slot, lambda: row[:, slot, 0]))
    torch.linalg.vector_norm(fx, dim=1, dtype=sq.dtype, out=view(cache, sq, 1, lambda: sq[:, 1])).square_()


def anderson_mix_reference(F: torch.Tensor, G: torch.Tensor, gram: torch.Tensor, x: torch.Tensor,
                           best: torch.Tensor, improved: torch.Tensor, n: int, newest: int,
                           lam: float, scaled: bool, beta: float, keep_f: bool,
                           cache: Optional[dict] = None) -> None:
    """Pure-torch pass 2 (in place; see the module docstring). ``cache``: see ``_views``."""
    src = view(cache, F, newest, lambda: F[:, newest]) if keep_f else x
    imp = view(cache, improved, "col", lambda: improved[:, None])
    torch.where(imp, src, best, out=best)
    if n == 0:
        return
    B, m, _ = F.shape
    # alpha is zero beyond n and unwritten ring slots are zero: mix over all m slots
    alpha = anderson_lstsq(gram, n, newest, lam, scaled).view(B, 1, m)
    if F.dtype != alpha.dtype:
        alpha = alpha.to(F.dtype)
    x_row = view(cache, x, "row", lambda: x.unsqueeze(1))
    torch.bmm(alpha, F, out=x_row)
    if beta != 1.0:
        x_row.baddbmm_(alpha, G, alpha=beta - 1.0)
