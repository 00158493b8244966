"""Per-iteration ops of the implicit backward loop: names and pure-torch references.

The C++ loop (``deq_fast._C.backward_solve``) runs these as the registered ops
``deq_fast::bwd_*`` (schemas in ``csrc/ops.cpp``, CPU kernels in ``csrc/cpu/backward_ops.cpp``,
CUDA kernels in ``csrc/cuda/backward_ops.cu``, shared per-sample math in
``csrc/include/deq_fast/backward_math.h``); the Python reference
loop (:mod:`deq_fast.implicit.reference`) calls the functions below, which implement the same math
with plain torch operations and are the oracle the ops are tested against. Every op mutates its
``Tensor(a!)`` arguments and returns nothing; shapes: state ``[B, D]``, histories ``[m, B, D]``,
Gram ``[B, m, m]`` float64.

* ``bwd_track``: residual ``r = grad + J^T x - x``, ``rel = ||r|| / ||grad||``, best-iterate and
  per-sample convergence flags (active samples only; frozen ones keep their values).
* ``bwd_masked_add``: ``x += y`` on active samples (plain iteration).
* ``bwd_anderson_mix``: store ``F = x + r``, ``G = r`` in a ring slot, update one Gram row, solve
  the ridge-regularised least-squares problem (:func:`anderson_alpha`), mix ``x = sum alpha_i F_i``.
* ``bwd_broyden_step``: good-Broyden update of ``H = -I + U V^T`` and step ``x -= H r``.
* ``bwd_gmres_start`` / ``bwd_gmres_arnoldi`` / ``bwd_gmres_update``: restarted GMRES (Arnoldi with
  classical Gram-Schmidt applied twice (:func:`cgs2_project`), Givens rotations, back
  substitution), all per sample.
"""
from __future__ import annotations

import torch

from deq_fast.ops.lstsq import anderson_lstsq_reference

__all__ = ["OP_NAMES", "BREAKDOWN", "MAX_HISTORY", "anderson_alpha", "bwd_track_reference",
           "bwd_masked_add_reference", "bwd_anderson_mix_reference", "bwd_broyden_step_reference",
           "bwd_gmres_start_reference", "bwd_gmres_arnoldi_reference", "cgs2_project",
           "bwd_gmres_update_reference"]

#: The registered ops, ``deq_fast::<name>``.
OP_NAMES = ("bwd_track", "bwd_masked_add", "bwd_anderson_mix", "bwd_broyden_step",
            "bwd_gmres_start", "bwd_gmres_arnoldi", "bwd_gmres_update")
BREAKDOWN = 1e-14   # csrc/include/deq_fast/backward_math.h kBreakdown
MAX_HISTORY = 64    # csrc/include/deq_fast/backward_math.h kMaxHistory


def bwd_track_reference(x, jtx, grad, inv_gnorm, r, best_x, best_rel, active, tol):
    r_new = grad + jtx - x
    r.copy_(torch.where(active[:, None], r_new, r))
    rel = r_new.double().norm(dim=1) * inv_gnorm
    finite = torch.isfinite(rel)
    improve = active & finite & ~(rel >= best_rel)
    best_rel.copy_(torch.where(improve, rel, best_rel))
    best_x.copy_(torch.where(improve[:, None], x, best_x))
    active &= ~(finite & (rel <= tol))


def anderson_alpha(gram: torch.Tensor, lam: float, newest: int) -> torch.Tensor:
    """Mixing weights ``[B, n]`` from the ``[B, n, n]`` float64 Gram block: the one Python Anderson
    least-squares reference (:func:`deq_fast.ops.lstsq.anderson_lstsq_reference`, ridge
    ``lam * trace / n``); a degenerate system (e.g. an all-zero Gram) gives one-hot at ``newest``."""
    n = gram.shape[-1]
    return anderson_lstsq_reference(gram, n, newest, lam, scaled=True)


def bwd_masked_add_reference(x, y, active):
    """``x += y`` on active samples."""
    x.copy_(torch.where(active[:, None], x + y, x))


def bwd_anderson_mix_reference(x, r, F, G, gram, active, slot, n, lam):
    act = active[:, None]
    F[slot] = torch.where(act, x + r, F[slot])
    G[slot] = torch.where(act, r, G[slot])
    gv = torch.einsum("nbd,bd->bn", G[:n].double(), G[slot].double())
    gram[:, slot, :n] = torch.where(act, gv, gram[:, slot, :n])
    gram[:, :n, slot] = torch.where(act, gv, gram[:, :n, slot])
    alpha = anderson_alpha(gram[:, :n, :n], lam, slot)
    x_new = torch.einsum("bn,nbd->bd", alpha, F[:n].double()).to(x.dtype)
    x.copy_(torch.where(act, x_new, x))


def bwd_broyden_step_reference(x, r, r_prev, dx, U, V, active, n, slot):
    act = active[:, None]
    dt = x.dtype
    if slot >= 0:
        dr = r - r_prev
        keep = [l for l in range(n) if l != slot]
        dxd, drd = dx.double(), dr.double()
        v = -dxd
        h = -drd
        for l in keep:
            v = v + (dxd * U[l].double()).sum(1, keepdim=True) * V[l].double()
            h = h + (V[l].double() * drd).sum(1, keepdim=True) * U[l].double()
        den = (v * drd).sum(1)
        ok = torch.isfinite(den) & (den != 0)
        u_num = (dxd - h).to(dt)
        u = (u_num.double() / torch.where(ok, den, 1.0)[:, None]).to(dt)
        U[slot] = torch.where(act, torch.where(ok[:, None], u, 0), U[slot])
        V[slot] = torch.where(act, torch.where(ok[:, None], v.to(dt), 0), V[slot])
    n_after = max(n, slot + 1) if slot >= 0 else n
    d = r.double()
    for l in range(n_after):
        d = d - (V[l].double() * r.double()).sum(1, keepdim=True) * U[l].double()
    d = d.to(dt)
    dx.copy_(torch.where(act, d, dx))
    x.copy_(torch.where(act, x + d, x))
    r_prev.copy_(torch.where(act, r, r_prev))


def bwd_gmres_start_reference(r, active, Q, s, kdim, cyc):
    beta = r.double().norm(dim=1)
    go = active & (beta > 0) & torch.isfinite(beta)
    Q[0] = torch.where(go[:, None], (r.double() / torch.where(go, beta, 1.0)[:, None]).to(r.dtype), 0)
    s.zero_()
    s[:, 0] = torch.where(go, beta, 0.0)
    kdim.zero_()
    cyc.copy_(go)


def _givens_column(j, h, cs, sn, s):
    """Vectorised copy of csrc/include/deq_fast/backward_math.h givens_column; h is [B, j+2] (modified)."""
    for i in range(j):
        t = cs[:, i] * h[:, i] + sn[:, i] * h[:, i + 1]
        h[:, i + 1] = -sn[:, i] * h[:, i] + cs[:, i] * h[:, i + 1]
        h[:, i] = t
    a, b = h[:, j].clone(), h[:, j + 1].clone()
    nz = b != 0
    rho = torch.hypot(a, b)
    safe = torch.where(nz, rho, 1.0)
    c = torch.where(nz, a / safe, 1.0)
    sg = torch.where(nz, b / safe, 0.0)
    h[:, j] = torch.where(nz, rho, a)
    h[:, j + 1] = 0.0
    cs_new, sn_new = c, sg
    s_j1 = -sg * s[:, j]
    s_j = c * s[:, j]
    return h, cs_new, sn_new, s_j, s_j1


def cgs2_project(w, Q):
    """Classical Gram-Schmidt applied twice against the basis ``Q`` ``[c, B, D]``, per sample:
    ``h = Q^T w; w1 = w - Q h; h2 = Q^T w1; w2 = w1 - Q h2``, every product and sum in float64
    (``w1`` is never rounded to the state dtype). Returns ``(w2, h + h2)``: the projected vector
    (float64) and the Hessenberg column entries ``[B, c]``. Each of the two inner-product sets is
    one pass over the basis (all ``c`` dots at once), which is what lets the CUDA kernel read the
    basis once per set instead of once per column as modified Gram-Schmidt must."""
    Qd = Q.double()
    wd = w.double()
    h = torch.einsum("cbd,bd->bc", Qd, wd)
    w1 = wd - torch.einsum("bc,cbd->bd", h, Qd)
    h2 = torch.einsum("cbd,bd->bc", Qd, w1)
    return w1 - torch.einsum("bc,cbd->bd", h2, Qd), h + h2


def bwd_gmres_arnoldi_reference(jtq, Q, R, cs, sn, s, kdim, cyc, inv_gnorm, j, tol):
    dt = jtq.dtype
    w = Q[j] - jtq
    n0 = w.double().norm(dim=1)
    h = torch.zeros(jtq.shape[0], j + 2, dtype=torch.float64, device=jtq.device)
    w2, h[:, : j + 1] = cgs2_project(w, Q[: j + 1])
    w = w2.to(dt)  # the projected vector is stored in the state dtype, then normalised
    hn = w.double().norm(dim=1)
    breakdown = ~(hn > BREAKDOWN * n0)
    h[:, j + 1] = torch.where(breakdown, 0.0, hn)
    q_next = torch.where(breakdown[:, None], 0,
                         (w.double() / torch.where(breakdown, 1.0, hn)[:, None]).to(dt))
    Q[j + 1] = torch.where(cyc[:, None], q_next, 0)
    h, c_new, s_new, s_j, s_j1 = _givens_column(j, h, cs, sn, s)
    act = cyc[:, None]
    R[:, j, : j + 2] = torch.where(act, h, R[:, j, : j + 2])
    cs[:, j] = torch.where(cyc, c_new, cs[:, j])
    sn[:, j] = torch.where(cyc, s_new, sn[:, j])
    s[:, j] = torch.where(cyc, s_j, s[:, j])
    s[:, j + 1] = torch.where(cyc, s_j1, s[:, j + 1])
    kdim.copy_(torch.where(cyc, j + 1, kdim))
    est = s_j1.abs() * inv_gnorm
    cyc &= ~(breakdown | (est <= tol))


def bwd_gmres_update_reference(x, Q, R, s, kdim):
    B, k = R.shape[0], R.shape[1]
    y = torch.zeros(B, k, dtype=torch.float64, device=x.device)
    for i in reversed(range(k)):
        t = s[:, i] - (R[:, i + 1:, i] * y[:, i + 1:]).sum(1)
        piv = R[:, i, i]
        yi = t / torch.where(piv != 0, piv, 1.0)
        valid = (i < kdim) & (piv != 0) & torch.isfinite(yi)
        y[:, i] = torch.where(valid, yi, 0.0)
    upd = torch.einsum("bk,kbd->bd", y, Q[:k].double())
    x.copy_((x.double() + upd).to(x.dtype))
