"""jac_reg, power_method, fp_correction, mixed_init against closed forms and TorchDEQ (CPU)."""
from __future__ import annotations

import math

import pytest
import torch
import torchdeq.loss as torchdeq_loss

from deq_fast.nn.regularizers import fp_correction, jac_reg, mixed_init, power_method


def _linear_problem(B, D, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(D, D, generator=g, dtype=dtype).requires_grad_()
    z = torch.randn(B, D, generator=g, dtype=dtype).requires_grad_()
    return A, z, z @ A.T          # per-sample J = A


def test_jac_reg_matches_torchdeq_draw_for_draw():
    A, z, f = _linear_problem(3, 5, torch.float32, seed=1)
    torch.manual_seed(7)
    ours = jac_reg(f, z, vecs=3)
    torch.manual_seed(7)
    ref = torchdeq_loss.jac_reg(f, z, vecs=3)
    assert torch.allclose(ours, ref, rtol=1e-6)


def test_jac_reg_estimates_frobenius_norm_and_is_trainable():
    B, D = 4, 5
    A, z, f = _linear_problem(B, D, seed=2)
    torch.manual_seed(0)
    est = jac_reg(f, z, vecs=400)
    exact = (A.detach() ** 2).sum() / D          # sum_b ||J_b||_F^2 / (B D)
    assert abs(float(est.detach() / exact) - 1) < 0.15
    (gA,) = torch.autograd.grad(est, A)
    assert rel(gA, 2 * A.detach() / D) < 0.25    # d/dA ||A||_F^2 / D, statistically
    assert not jac_reg(f, z, create_graph=False).requires_grad


def test_jac_reg_tuple_states_and_bad_input():
    A, z, f = _linear_problem(2, 4, seed=3)
    z2 = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    est = jac_reg((f, 2 * z2), (z, z2), vecs=2)
    assert est.dim() == 0 and torch.isfinite(est)
    with pytest.raises(ValueError, match="vecs"):
        jac_reg(f, z, vecs=0)
    with pytest.raises(ValueError, match="z0"):
        jac_reg(f, z.detach())


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_power_method_symmetric_per_sample():
    D = 7
    g = torch.Generator().manual_seed(4)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    eig = torch.tensor([0.9, -0.6, 0.5, 0.3, 0.2, 0.1, 0.05], dtype=torch.float64)
    S = Q @ torch.diag(eig) @ Q.T
    scale = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    z = torch.randn(3, D, dtype=torch.float64, requires_grad=True)
    f = (z @ S) * scale[:, None]
    vec, rho = power_method(f, z, n_iters=100)
    assert rho.shape == (3,) and vec.shape == z.shape
    assert torch.allclose(rho, 0.9 * scale, rtol=1e-6)


def test_power_method_complex_dominant_pair_where_torchdeq_is_wrong():
    # blocks: rotation-scaling (eigenvalues 0.8 e^{+-i 1.1}), then 0.3, 0.1
    a, b = 0.8 * math.cos(1.1), 0.8 * math.sin(1.1)
    J = torch.zeros(4, 4, dtype=torch.float64)
    J[:2, :2] = torch.tensor([[a, -b], [b, a]], dtype=torch.float64)
    J[2, 2], J[3, 3] = 0.3, 0.1
    torch.manual_seed(5)
    z = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    f = z @ J.T
    _, rho = power_method(f, z, n_iters=60)
    assert torch.allclose(rho, torch.full((2,), 0.8, dtype=torch.float64), rtol=1e-6)
    _, rho_tq = torchdeq_loss.power_method(f, z, n_iters=60)
    assert not torch.allclose(rho_tq, torch.full((2,), 0.8, dtype=torch.float64), rtol=1e-2)


def test_power_method_zero_jacobian_gives_zero_not_nan():
    z = torch.randn(2, 3, requires_grad=True)
    f = z * 0.0
    _, rho = power_method(f, z, n_iters=5)
    assert torch.equal(rho, torch.zeros(2))
    with pytest.raises(ValueError, match="n_iters"):
        power_method(f, z, n_iters=0)


def test_power_method_tuple_states():
    z1 = torch.randn(2, 3, requires_grad=True, dtype=torch.float64)
    z2 = torch.randn(2, 2, 2, requires_grad=True, dtype=torch.float64)
    vec, rho = power_method((0.5 * z1, 0.25 * z2), (z1, z2), n_iters=60)
    assert isinstance(vec, tuple) and vec[1].shape == (2, 2, 2)
    assert torch.allclose(rho, torch.full((2,), 0.5, dtype=torch.float64))


@pytest.mark.parametrize("weight_func,kw", [("exp", {}), ("exp", {"gamma": 0.5}),
                                            ("linear", {}), ("linear", {"gamma": 0.3, "bias": 0.1})])
def test_fp_correction_matches_torchdeq(weight_func, kw):
    torch.manual_seed(6)
    xs = [torch.randn(3, 4) for _ in range(5)]
    y = torch.randn(3, 4)

    def crit(a, b):
        return ((a - b) ** 2).mean()

    ours, vals = fp_correction(crit, (xs, y), weight_func=weight_func, return_loss_values=True, **kw)
    ref = torchdeq_loss.fp_correction(crit, (xs, y), weight_func=weight_func, **kw)
    assert torch.allclose(ours, ref, rtol=1e-6)
    assert len(vals) == 5 and math.isclose(vals[-1], float(crit(xs[-1], y)), rel_tol=1e-6)


def test_fp_correction_const_and_callable_on_cpu():
    xs = [torch.full((2,), float(i)) for i in range(3)]

    def crit(a):
        return a.sum()

    assert float(fp_correction(crit, (xs,), weight_func="const", c=2.0)) == 2.0 * (0 + 2 + 4)
    assert float(fp_correction(crit, (xs,), weight_func=lambda n, k: k)) == 0 * 0 + 1 * 2 + 2 * 4
    with pytest.raises(ValueError, match="weight_func"):
        fp_correction(crit, (xs,), weight_func="cubic")


def test_mixed_init():
    torch.manual_seed(8)
    z = mixed_init((64, 33), dtype=torch.float64)
    assert z.shape == (64, 33) and z.dtype == torch.float64
    frac = float((z == 0).double().mean())
    assert 0.4 < frac < 0.6
    assert mixed_init((2, 3), device="meta").device.type == "meta"
