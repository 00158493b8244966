"""Broyden's method (the "good" inverse update locuslab/deq and TorchDEQ use) in two fused passes:
``deq_fast::broyden_dots`` and ``deq_fast::broyden_update``.

The inverse-Jacobian estimate of ``g(x) = f(x) - x`` is ``H = -I + sum_l U[:, l] V[:, l]^T``
(``U, V [B, L, D]``, a ring of at most ``L`` rank-1 updates; ``n_valid`` slots written so far).
``dx`` is the step that led from the previous iterate to ``x`` (after a line search, a multiple
of the proposed step), ``dg = g - g_old`` the change of the residual, formed elementwise. The
update is the original's formula, ``v^T = dx^T H``, ``u = (dx - H dg) / <v, dg>``,
``H' = H + u v^T``, step ``-H' g``, with every product against ``U``/``V`` taken from one pass
over each:

    a = U dx,  b = V g,  c = V dg                   (pass 1: U once, V once for both b and c)
    v      = dx^T H = -dx + sum_l a_l V_l
    den    = <v, dg> = -<dx, dg> + <a, c>
    u      = (dx - H dg) / den = (dx + dg - sum_l c_l U_l) / den    (NaN/inf entries of u -> 0)
    <v, g> = -<dx, g> + <a, b>
    upd    = -H' g = g - sum_l b_l U_l - <v, g> u  (+ b_s U_s(old): slot s is overwritten)

(``H dg = -dg + sum_l c_l U_l``, ``H g = -g + sum_l b_l U_l``; when the ring is full the slot
``s`` written now held the oldest update, whose term leaves ``H'``.) Nothing assumes
``dx = -H g_old``, so a line search (``dx <- s·dx``) keeps the update exact, and ``H dg`` is
never formed as a difference of two large vectors.

Pass 1, ``broyden_dots(x, fx, g_old, g, dx, U, V, abc, scal, n_valid)``: ``g = fx - x``,
``dg = g - g_old``; ``abc[:, 0] = a``, ``abc[:, 1] = b``, ``abc[:, 2] = c`` (``[B, 3, L]``, zero
beyond ``n_valid``); ``scal = [<dx, g>, <dx, dg>, ||g||^2, ||fx||^2]`` (``[B, 4]``; its last two
columns are the ``sq`` of ``track_status``). ``g_old`` and ``g`` are two buffers (the engine swaps
them every iteration): pass 2 needs ``g_old`` again for ``dg``. Bytes: read x, fx, g_old, dx and
``n_valid`` rows of U and V; write g -> (2·n_valid + 5)·B·D·size.

Pass 2, ``broyden_update(x, g, g_old, dx, U, V, abc, scal, best, improved, active, slot,
n_valid)``: ``best = x`` where improved; writes ``U[:, slot] = u``, ``V[:, slot] = v`` and
``x <- x + upd`` for active samples (a stopped sample keeps its factors and stays put); ``dx`` is
then the step actually taken, ``x_new - x`` as rounded (the original's ``x_est - prev_x``; 0 for
stopped samples), so the next secant pair ``(dx, dg)`` is exact. Bytes: read x, g, g_old, dx and
``n_valid`` rows of U and V (U once for both ``sum b_l U_l`` and ``sum c_l U_l``); write u, v,
dx, x -> (2·n_valid + 8)·B·D·size (+ B·D·size for the best copy of improved samples).

Together (4·n_valid + 13)·B·D·size per iteration, (4L + 13)·B·D·size once the ring is full
(the Triton kernels take the ring in blocks of up to 64 slots, any ``L``, and their pass 1 reads
``g, g_old, dx`` once more for each block after the first: ``kernels/broyden.py``); TorchDEQ
computes three ``-I + U V^T`` products (six passes over its factors) per iteration.
Half states (float16/bfloat16) accumulate every product in float32 (``abc``/``scal`` dtype).
"""
from __future__ import annotations

from typing import Optional

import torch

from deq_fast.ops._views import view

__all__ = ["broyden_dots_reference", "broyden_update_reference"]


def _bucket(n_valid: int, L: int) -> int:
    """``n_valid`` rounded up to a multiple of 4 (at most ``L``): unwritten ring slots are zero,
    so the products are unchanged, and the torch path reuses its cached ring views for 4
    iterations (at most 3 zero slots of extra work)."""
    return min(L, -(-n_valid // 4) * 4)


def broyden_dots_reference(x: torch.Tensor, fx: torch.Tensor, g_old: torch.Tensor,
                           g: torch.Tensor, dx: torch.Tensor, U: torch.Tensor, V: torch.Tensor,
                           abc: torch.Tensor, scal: torch.Tensor, n_valid: int,
                           cache: Optional[dict] = None) -> None:
    """Pure-torch pass 1 (in place; see the module docstring). ``cache``: see ``_views``."""
    B, D = x.shape
    acc = abc.dtype
    torch.sub(fx, x, out=g)
    # rows g, dg in the accumulation dtype: V is read once for both columns b, c
    gd = view(cache, abc, "gd", lambda: torch.empty(B, 2, D, dtype=acc, device=x.device))
    g_acc, dg = view(cache, gd, "rows", lambda: gd.unbind(1))
    g_acc.copy_(g)
    torch.sub(g_acc, g_old if g_old.dtype == acc else g_old.to(acc), out=dg)
    n = _bucket(n_valid, U.shape[1])
    if n > 0:
        a = view(cache, abc, ("a_col", n), lambda: abc[:, 0, :n, None])                    # [B, n, 1]
        bc = view(cache, abc, ("bc", n), lambda: abc[:, 1:3, :n])                      # [B, 2, n]
        if U.dtype == acc:
            torch.bmm(view(cache, U, n, lambda: U[:, :n]), view(cache, dx, "col", lambda: dx[:, :, None]),
                      out=a)
            torch.bmm(gd, view(cache, V, ("T", n), lambda: V[:, :n].transpose(1, 2)), out=bc)
        else:                                                      # half states: accumulate in fp32
            a.copy_(torch.bmm(U[:, :n].to(acc), dx[:, :, None].to(acc)))
            bc.copy_(torch.bmm(gd, V[:, :n].to(acc).transpose(1, 2)))
    d_row = view(cache, dx, "row", lambda: dx[:, None]) if dx.dtype == acc else dx.to(acc)[:, None]
    torch.bmm(d_row, view(cache, gd, "T", lambda: gd.transpose(1, 2)),
              out=view(cache, scal, "c01", lambda: scal[:, None, 0:2]))        # <dx, g>, <dx, dg>
    torch.linalg.vector_norm(g_acc, dim=1, out=view(cache, scal, 2, lambda: scal[:, 2]))
    torch.linalg.vector_norm(fx, dim=1, dtype=acc, out=view(cache, scal, 3, lambda: scal[:, 3]))
    view(cache, scal, "norms", lambda: scal[:, 2:]).square_()


def _history_terms(g_row, dx_row, U, V, abc, sc, nhg, w, v, n: int, cache) -> None:
    """Pass 2's products with the ring (``n`` slots): ``sc = [<a,b>, <a,c>]``, ``v = a V - dx``,
    ``nhg = -H g = g - b U`` and ``w -= c U`` (``w`` holds ``dx + dg``); rows ``[B, 1, D]``."""
    B, D, dt, acc = g_row.shape[0], g_row.shape[2], g_row.dtype, abc.dtype
    if n == 0:
        sc.zero_()
        nhg.copy_(g_row)
        torch.neg(dx_row, out=v)
        return
    a = view(cache, abc, ("a", n), lambda: abc[:, 0:1, :n])                     # [B, 1, n]
    bc = view(cache, abc, ("bc", n), lambda: abc[:, 1:3, :n])                   # [B, 2, n]
    torch.bmm(a, view(cache, abc, ("bcT", n), lambda: bc.transpose(1, 2)), out=sc)  # <a,b>, <a,c>
    if dt == acc:
        Un, Vn = view(cache, U, n, lambda: U[:, :n]), view(cache, V, n, lambda: V[:, :n])
        P = view(cache, abc, ("P", id(U)), lambda: torch.empty(B, 2, D, dtype=dt, device=U.device))
        torch.bmm(bc, Un, out=P)                                                 # [b U; c U]
        torch.baddbmm(dx_row, a, Vn, beta=-1.0, out=v)                           # v = a V - dx
    else:
        P = torch.bmm(bc.to(dt), U[:, :n])
        torch.sub(torch.bmm(a.to(dt), V[:, :n]), dx_row, out=v)
    torch.sub(g_row, P[:, 0:1], out=nhg)                                       # -H g = g - b U
    w.sub_(P[:, 1:2])                                                           # dx + dg - c U


def broyden_update_reference(x: torch.Tensor, g: torch.Tensor, g_old: torch.Tensor,
                             dx: torch.Tensor, U: torch.Tensor, V: torch.Tensor, abc: torch.Tensor,
                             scal: torch.Tensor, best: torch.Tensor, improved: torch.Tensor,
                             active: torch.Tensor, slot: int, n_valid: int,
                             cache: Optional[dict] = None) -> None:
    """Pure-torch pass 2 (in place; see the module docstring). ``cache``: see ``_views``.

    ``[b; c]·U`` is one ``bmm`` (U read once), ``v = a·V - dx`` one ``baddbmm``.
    """
    B, D = x.shape
    dt, acc = x.dtype, abc.dtype
    torch.where(view(cache, improved, "col", lambda: improved[:, None]), x, best, out=best)
    buf = view(cache, abc, "buf", lambda: torch.empty(B, 3, D, dtype=dt, device=x.device))
    nhg, w = view(cache, buf, "nhg_w", lambda: (buf[:, 0:1], buf[:, 1:2]))     # [B, 1, D] each
    v = view(cache, buf, "v", lambda: buf[:, 2:3])
    sc = view(cache, abc, "scalars", lambda: torch.empty(B, 1, 2, dtype=acc, device=x.device))
    vg, den = view(cache, sc, "cols", lambda: (sc[:, :, 0:1], sc[:, :, 1:2]))  # [B, 1, 1]
    g_row = view(cache, g, "row", lambda: g[:, None])
    dx_row = view(cache, dx, "row", lambda: dx[:, None])
    torch.sub(g_row, view(cache, g_old, "row", lambda: g_old[:, None]), out=w)  # dg
    w.add_(dx_row)                                                              # dx + dg
    _history_terms(g_row, dx_row, U, V, abc, sc, nhg, w, v, _bucket(n_valid, U.shape[1]), cache)
    sc.sub_(view(cache, scal, "c01", lambda: scal[:, None, 0:2]))   # <v, g>, <v, dg> = den
    # u = (dx - H dg) / den. The references zero NaN entries of u; we zero infinite ones too
    # (den = 0): the update then adds nothing instead of poisoning H
    u = torch.div(w, den if dt == acc else den.to(dt), out=w)
    torch.nan_to_num_(u, nan=0.0, posinf=0.0, neginf=0.0)
    # -H' g = -H g - <v, g> u + b_s U_s(old)   (the evicted slot's term, once the ring wraps)
    upd = nhg.addcmul_(u, vg if dt == acc else vg.to(dt), value=-1.0)
    u_s = view(cache, U, ("s", slot), lambda: U[:, slot:slot + 1])
    if slot < n_valid:
        upd.addcmul_(u_s, view(cache, abc, ("bs", slot), lambda: abc[:, 1:2, slot:slot + 1]).to(dt))
    # a stopped sample keeps its factors (they are returned for the backward pass) and stays put
    act = view(cache, active, "col3", lambda: active[:, None, None])
    torch.where(act, u, u_s, out=u_s)
    v_s = view(cache, V, ("s", slot), lambda: V[:, slot:slot + 1])
    torch.where(act, v, v_s, out=v_s)
    torch.where(act, upd, view(cache, dx, "zero", lambda: dx.new_zeros(())), out=dx_row)
    # dx = the step actually taken, x_new - x as rounded (the original's x_est - prev_x)
    x_row = view(cache, x, "row", lambda: x[:, None])
    x_new = torch.add(x_row, dx_row, out=nhg)
    torch.sub(x_new, x_row, out=dx_row)
    x_row.copy_(x_new)
