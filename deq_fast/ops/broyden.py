"""Broyden's method (the "good" inverse update locuslab/deq and TorchDEQ use) in two fused passes:
``deq_fast::broyden_dots`` and ``deq_fast::broyden_update``.

The inverse-Jacobian estimate of ``g(x) = f(x) - x`` is ``H = -I + sum_l U[:, l] V[:, l]^T``
(``U, V [B, L, D]``, a ring of at most ``L`` rank-1 updates; ``n_valid`` slots written so far).
``upd = -H g`` is the step; ``dx = upd`` of the previous iteration is the step that led to the
current iterate ``x``, so the Broyden update needs no extra matrix product for ``H dx``-style terms:

    H g      = -g + sum_l b_l U_l            b = V g      (one pass over V)
    H dg     = H g + dx                      (since upd_old = -H g_old and dg = g - g_old)
    v^T      = dx^T H = -dx + sum_l a_l V_l  a = U dx     (one pass over U)
    den      = <v, dg> = -<dx, g> + <a, b> + ||dx||^2
    u        = (dx - H dg) / den = -H g / den              (NaN entries of u and v set to 0)
    H' g     = H g - b_s U_s(old) + <v, g> u,  <v, g> = -<dx, g> + <a, b>   (slot s overwritten)
    upd'     = -H' g

Pass 1, ``broyden_dots(x, fx, g, dx, U, V, ab, scal, n_valid)``: ``g = fx - x`` (in place),
``ab[:, 0] = a``, ``ab[:, 1] = b`` (``[B, 2, L]``), ``scal = [<dx, g>, ||dx||^2, ||g||^2, ||fx||^2]``
(``[B, 4]``; its last two columns are the ``sq`` of ``track_status``). Bytes: read x, fx, dx and ``n_valid`` rows of U and V; write g
-> (2·n_valid + 4)·B·D·size.

Pass 2, ``broyden_update(x, g, dx, U, V, ab, scal, best, improved, active, slot, n_valid)``:
``best = x`` where improved; writes ``U[:, slot] = u``, ``V[:, slot] = v``; ``dx = upd'`` (zero
for samples no longer active, so they stay put); ``x += dx``. Bytes: read g, dx, x and ``n_valid``
rows of U and V; write u, v, dx, x -> (2·n_valid + 7)·B·D·size.

Together about (4L + 11)·B·D·size per iteration once the ring is full; TorchDEQ computes three
``-I + U V^T`` products (six passes over its factors) per iteration.
"""
from __future__ import annotations

import torch

__all__ = ["broyden_dots_reference", "broyden_update_reference"]


def broyden_dots_reference(x: torch.Tensor, fx: torch.Tensor, g: torch.Tensor, dx: torch.Tensor,
                           U: torch.Tensor, V: torch.Tensor, ab: torch.Tensor, scal: torch.Tensor,
                           n_valid: int) -> None:
    """Pure-torch pass 1 (in place; see the module docstring)."""
    torch.sub(fx, x, out=g)
    acc = ab.dtype
    if n_valid > 0:
        if U.dtype == acc:
            ab[:, 0, :n_valid] = torch.bmm(U[:, :n_valid], dx[:, :, None]).squeeze(2)
            ab[:, 1, :n_valid] = torch.bmm(V[:, :n_valid], g[:, :, None]).squeeze(2)
        else:
            ab[:, 0, :n_valid] = torch.bmm(U[:, :n_valid].to(acc), dx[:, :, None].to(acc)).squeeze(2)
            ab[:, 1, :n_valid] = torch.bmm(V[:, :n_valid].to(acc), g[:, :, None].to(acc)).squeeze(2)
    d, gg, ff = (dx, g, fx) if x.dtype == acc else (dx.to(acc), g.to(acc), fx.to(acc))
    torch.stack((torch.linalg.vecdot(d, gg), torch.linalg.vecdot(d, d),
                 torch.linalg.vecdot(gg, gg), torch.linalg.vecdot(ff, ff)), dim=1, out=scal)


def broyden_update_reference(x: torch.Tensor, g: torch.Tensor, dx: torch.Tensor, U: torch.Tensor,
                             V: torch.Tensor, ab: torch.Tensor, scal: torch.Tensor,
                             best: torch.Tensor, improved: torch.Tensor, active: torch.Tensor,
                             slot: int, n_valid: int) -> None:
    """Pure-torch pass 2 (in place; see the module docstring)."""
    torch.where(improved[:, None], x, best, out=best)
    dt = x.dtype
    a, b = ab[:, 0, :n_valid], ab[:, 1, :n_valid]
    ab_dot = (a * b).sum(1)
    vg = ab_dot - scal[:, 0]                                             # <v, g>
    den = vg + scal[:, 1]                                                # <v, dg>
    if n_valid > 0:
        hg = torch.bmm(b[:, None].to(dt), U[:, :n_valid]).squeeze(1).sub_(g)   # H g
        v = torch.bmm(a[:, None].to(dt), V[:, :n_valid]).squeeze(1).sub_(dx)   # v
    else:
        hg, v = -g, -dx
    u = hg / (-den[:, None]).to(dt)
    torch.nan_to_num_(u, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    torch.nan_to_num_(v, nan=0.0, posinf=float("inf"), neginf=float("-inf"))
    # H' g = H g - b_s U_s(old) + <v, g> u  (the evicted slot's term, when the ring wraps)
    upd = hg.addcmul_(u, vg[:, None].to(dt))
    if slot < n_valid:
        upd.sub_(U[:, slot] * b[:, slot, None].to(dt))
    U[:, slot] = u
    V[:, slot] = v
    torch.neg(upd.masked_fill_(~active[:, None], 0.0), out=dx)
    x += dx
