"""The Broyden passes implement the original update (locuslab/deq ``broyden``), checked against
dense matrices in float64: ``H = -I + U V^T``, ``v^T = dx^T H``, ``u = (dx - H dg) / <v, dg>``,
``H' = H + u v^T`` (minus the evicted slot's term when the ring wraps), step ``-H' g``.

``dx`` is arbitrary (not ``-H g_old``), as after a line search. Runs the pure-torch reference
and, when the extension is built, the C++ CPU kernels (``torch.ops.deq_fast.*``); the Triton
kernels are compared with the reference in ``test_kernels.py``.
"""
from __future__ import annotations

import pytest
import torch

from deq_fast.ops.broyden import broyden_dots_reference, broyden_update_reference

# (B, D, L, n_valid, slot): first update, partial ring, full ring evicting slot 1
CASES = [(2, 9, 4, 0, 0), (3, 11, 5, 3, 3), (2, 13, 4, 4, 1)]


def _dense_step(x, fx, g_old, dx, U, V, n_valid, slot):
    """One Broyden update with explicit matrices (per sample); returns (u, v, upd)."""
    B, D = x.shape
    us, vs, upds = [], [], []
    for i in range(B):
        I = torch.eye(D, dtype=torch.float64)
        H = -I + U[i, :n_valid].T @ V[i, :n_valid]            # sum_l U_l V_l^T
        g = fx[i] - x[i]
        dg = g - g_old[i]
        v = H.T @ dx[i]                                         # v^T = dx^T H
        u = (dx[i] - H @ dg) / (v @ dg)
        H_new = H + torch.outer(u, v)
        if slot < n_valid:
            H_new = H_new - torch.outer(U[i, slot], V[i, slot])
        us.append(u), vs.append(v), upds.append(-H_new @ g)
    return torch.stack(us), torch.stack(vs), torch.stack(upds)


def _impls():
    impls = [("reference", broyden_dots_reference, broyden_update_reference)]
    try:
        import deq_fast._C  # noqa: F401
        if torch._C._dispatch_has_kernel_for_dispatch_key("deq_fast::broyden_dots", "CPU"):
            impls.append(("cpp", torch.ops.deq_fast.broyden_dots.default,
                          torch.ops.deq_fast.broyden_update.default))
    except ImportError:
        pass
    return impls


@pytest.mark.parametrize("impl", _impls(), ids=lambda t: t[0])
@pytest.mark.parametrize("B,D,L,n_valid,slot", CASES,
                         ids=[f"B{c[0]}-D{c[1]}-L{c[2]}-nv{c[3]}-s{c[4]}" for c in CASES])
def test_update_is_the_original_formula(impl, B, D, L, n_valid, slot):
    _, dots, update = impl
    gen = torch.Generator().manual_seed(1000 * B + 100 * n_valid + slot)
    rnd = lambda *shape, s=1.0: torch.randn(*shape, generator=gen, dtype=torch.float64) * s  # noqa: E731
    U, V = torch.zeros(B, L, D, dtype=torch.float64), torch.zeros(B, L, D, dtype=torch.float64)
    U[:, :n_valid], V[:, :n_valid] = rnd(B, n_valid, D, s=0.3), rnd(B, n_valid, D, s=0.3)
    x, fx, g_old, dx = rnd(B, D), rnd(B, D), rnd(B, D), rnd(B, D, s=0.5)
    u_want, v_want, upd_want = _dense_step(x, fx, g_old, dx, U, V, n_valid, slot)
    g = torch.empty_like(x)
    abc, scal = torch.zeros(B, 3, L, dtype=torch.float64), torch.empty(B, 4, dtype=torch.float64)
    dots(x, fx, g_old, g, dx, U, V, abc, scal, n_valid)
    torch.testing.assert_close(g, fx - x, rtol=0, atol=0)
    dg = g - g_old
    torch.testing.assert_close(scal, torch.stack([(dx * g).sum(1), (dx * dg).sum(1),
                                                  (g * g).sum(1), (fx * fx).sum(1)], 1),
                               rtol=1e-12, atol=1e-12)
    x0, best = x.clone(), torch.zeros_like(x)
    flags = torch.ones(B, dtype=torch.bool)
    active = flags.clone()
    active[-1] = B == 1                     # (B > 1) the last sample has stopped
    U0, V0 = U.clone(), V.clone()
    update(x, g, g_old, dx, U, V, abc, scal, best, flags, active, slot, n_valid)
    on = active
    tol = dict(rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(best, x0, rtol=0, atol=0)
    torch.testing.assert_close(U[on, slot], u_want[on], **tol)
    torch.testing.assert_close(V[on, slot], v_want[on], **tol)
    torch.testing.assert_close(dx[on], upd_want[on], **tol)
    torch.testing.assert_close(x[on], x0[on] + upd_want[on], **tol)
    # a stopped sample keeps its factors and stays put
    torch.testing.assert_close(U[~on], U0[~on], rtol=0, atol=0)
    torch.testing.assert_close(V[~on], V0[~on], rtol=0, atol=0)
    assert (dx[~on] == 0).all() and torch.equal(x[~on], x0[~on])
    # the untouched slots stay as they were
    keep = torch.arange(L) != slot
    torch.testing.assert_close(U[:, keep], U0[:, keep], rtol=0, atol=0)
