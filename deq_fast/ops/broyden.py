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
``best = x`` where improved; writes ``U[:, slot] = u``, ``V[:, slot] = v`` and ``dx = upd'`` for
active samples (a stopped sample keeps its factors and gets ``dx = 0``, so it stays put);
``x += dx``. Bytes: read g, dx, x and ``n_valid``
rows of U and V; write u, v, dx, x -> (2·n_valid + 7)·B·D·size.

Together about (4L + 11)·B·D·size per iteration once the ring is full; TorchDEQ computes three
``-I + U V^T`` products (six passes over its factors) per iteration.
"""
from __future__ import annotations

from typing import Optional

import torch

from deq_fast.ops._views import view

__all__ = ["broyden_dots_reference", "broyden_update_reference"]


def _bucket(n_valid: int, L: int) -> int:
    """``n_valid`` rounded up to a multiple of 4 (at most ``L``): unwritten ring slots are zero, so
    the products are unchanged, and the torch path reuses its cached ring views for 4 iterations (at most 3 zero slots of extra work)."""
    return min(L, -(-n_valid // 4) * 4)


def broyden_dots_reference(x: torch.Tensor, fx: torch.Tensor, g: torch.Tensor, dx: torch.Tensor,
                           U: torch.Tensor, V: torch.Tensor, ab: torch.Tensor, scal: torch.Tensor,
                           n_valid: int, cache: Optional[dict] = None) -> None:
    """Pure-torch pass 1 (in place; see the module docstring). ``cache``: see ``_views``."""
    torch.sub(fx, x, out=g)
    acc = ab.dtype
    n = _bucket(n_valid, U.shape[1])
    if n > 0:
        a = view(cache, ab, (0, n), lambda: ab[:, 0, :n, None])
        b = view(cache, ab, (1, n), lambda: ab[:, 1, :n, None])
        if U.dtype == acc:
            torch.bmm(view(cache, U, n, lambda: U[:, :n]), view(cache, dx, "col", lambda: dx[:, :, None]),
                      out=a)
            torch.bmm(view(cache, V, n, lambda: V[:, :n]), view(cache, g, "col", lambda: g[:, :, None]),
                      out=b)
        else:                                                      # half states: accumulate in fp32
            a.copy_(torch.bmm(U[:, :n].to(acc), dx[:, :, None].to(acc)))
            b.copy_(torch.bmm(V[:, :n].to(acc), g[:, :, None].to(acc)))
    if x.dtype == acc:
        torch.bmm(view(cache, dx, "row", lambda: dx[:, None]), view(cache, g, "col", lambda: g[:, :, None]),
                  out=view(cache, scal, "c0", lambda: scal[:, 0:1, None]))
        d, gg, ff = dx, g, fx
    else:
        d, gg, ff = dx.to(acc), g.to(acc), fx.to(acc)
        scal[:, 0] = torch.linalg.vecdot(d, gg)
    torch.linalg.vector_norm(d, dim=1, out=view(cache, scal, 1, lambda: scal[:, 1]))
    torch.linalg.vector_norm(gg, dim=1, out=view(cache, scal, 2, lambda: scal[:, 2]))
    torch.linalg.vector_norm(ff, dim=1, out=view(cache, scal, 3, lambda: scal[:, 3]))
    view(cache, scal, "norms", lambda: scal[:, 1:]).square_()


def broyden_update_reference(x: torch.Tensor, g: torch.Tensor, dx: torch.Tensor, U: torch.Tensor,
                             V: torch.Tensor, ab: torch.Tensor, scal: torch.Tensor,
                             best: torch.Tensor, improved: torch.Tensor, active: torch.Tensor,
                             slot: int, n_valid: int, cache: Optional[dict] = None) -> None:
    """Pure-torch pass 2 (in place; see the module docstring). ``cache``: see ``_views``.

    Works with ``nhg = -H g`` and ``v = sum_l a_l V_l - dx`` so each is one ``baddbmm``.
    """
    B, D = x.shape
    dt, acc = x.dtype, ab.dtype
    torch.where(view(cache, improved, "col", lambda: improved[:, None]), x, best, out=best)
    buf = view(cache, ab, "buf", lambda: torch.empty(3, B, D, dtype=dt, device=x.device))
    nhg, v, u = view(cache, buf, "rows", lambda: tuple(r[:, None] for r in buf.unbind(0)))  # [B, 1, D]
    sc = view(cache, ab, "scalars", lambda: torch.empty(2, B, 1, 1, dtype=acc, device=x.device))
    vg, den = view(cache, sc, "rows", lambda: sc.unbind(0))                                 # [B, 1, 1]
    g_row = view(cache, g, "row", lambda: g[:, None])
    dx_row = view(cache, dx, "row", lambda: dx[:, None])
    n = _bucket(n_valid, U.shape[1])
    if n > 0:
        a = view(cache, ab, ("a", n), lambda: ab[:, 0:1, :n])                   # [B, 1, n]
        b = view(cache, ab, ("b", n), lambda: ab[:, 1:2, :n])
        torch.bmm(a, view(cache, ab, ("bT", n), lambda: b.transpose(1, 2)), out=vg)   # <a, b>
        if dt == acc:
            Un, Vn = view(cache, U, n, lambda: U[:, :n]), view(cache, V, n, lambda: V[:, :n])
            torch.baddbmm(g_row, b, Un, alpha=-1.0, out=nhg)                     # -H g = g - b U
            torch.baddbmm(dx_row, a, Vn, beta=-1.0, out=v)                       # v = a V - dx
        else:
            torch.sub(g_row, torch.bmm(b.to(dt), U[:, :n]), out=nhg)
            torch.sub(torch.bmm(a.to(dt), V[:, :n]), dx_row, out=v)
    else:
        vg.zero_()
        nhg.copy_(g_row)
        torch.neg(dx_row, out=v)
    vg.sub_(view(cache, scal, "c0", lambda: scal[:, 0:1, None]))                 # <v, g>
    torch.add(vg, view(cache, scal, "c1", lambda: scal[:, 1:2, None]), out=den)  # <v, dg>
    # u = (dx - H dg) / den = -H g / den   (H dg = H g + dx). The references zero NaN entries of u;
    # we zero infinite ones too (den = 0): the update then adds nothing instead of poisoning H
    torch.div(nhg, den if dt == acc else den.to(dt), out=u)
    torch.nan_to_num_(u, nan=0.0, posinf=0.0, neginf=0.0)
    # -H' g = -H g - <v, g> u + b_s U_s(old)   (the evicted slot's term, once the ring wraps)
    upd = nhg.addcmul_(u, vg if dt == acc else vg.to(dt), value=-1.0)
    u_s = view(cache, U, ("s", slot), lambda: U[:, slot:slot + 1])
    if slot < n_valid:
        upd.addcmul_(u_s, view(cache, ab, ("bs", slot), lambda: ab[:, 1:2, slot:slot + 1]).to(dt))
    # a stopped sample keeps its factors (they are returned for the backward pass) and stays put
    act = view(cache, active, "col3", lambda: active[:, None, None])
    torch.where(act, u, u_s, out=u_s)
    v_s = view(cache, V, ("s", slot), lambda: V[:, slot:slot + 1])
    torch.where(act, v, v_s, out=v_s)
    torch.where(act, upd, view(cache, dx, "zero", lambda: dx.new_zeros(())), out=dx_row)
    x += dx
