"""The DEQ module: exact implicit gradients against the dense (I - J)^{-T} reference, the cheaper
gradients against their definitions computed by hand, options, states and error paths (CPU)."""
from __future__ import annotations

import argparse
import warnings

import pytest
import torch
from torch import nn

import deq_fast
from deq_fast.implicit.backward import resolve_backend
from deq_fast.nn import deq as deq_mod
from deq_fast.nn.deq import BackwardNotConverged, add_deq_args, get_deq, reset_deq
from deq_fast.nn.regularizers import jac_reg
from deq_fast.testing import DEQ_GRAD_TOL

# ---------------------------------------------------------------------------------------------
# problems and references
# ---------------------------------------------------------------------------------------------

class TanhProblem:
    """f(z) = tanh(z W^T + x), ||W||_2 = rho < 1 (a contraction); J(z) = diag(1 - f^2) W."""

    def __init__(self, B, D, dtype=torch.float64, rho=0.6, seed=0):
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(D, D, generator=g, dtype=torch.float64)
        W = rho * W / torch.linalg.matrix_norm(W, ord=2)
        self.W = nn.Parameter(W.to(dtype))
        self.x = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        self.c = torch.randn(B, D, generator=g, dtype=torch.float64).to(dtype)
        self.B, self.D, self.dtype = B, D, dtype

    def f(self, z):
        return torch.tanh(z @ self.W.T + self.x)

    def params(self):
        return [self.W, self.x]

    def z0(self):
        return torch.zeros(self.B, self.D, dtype=self.dtype)

    def fixed_point64(self, n=400):
        W, x = self.W.detach().double(), self.x.detach().double()
        z = torch.zeros(self.B, self.D, dtype=torch.float64)
        for _ in range(n):
            z = torch.tanh(z @ W.T + x)
        return z

    def dense_exact(self):
        """(dL/dW, dL/dx) for L = <c, z*> from the full per-sample Jacobian, in float64."""
        W, x, c = self.W.detach().double(), self.x.detach().double(), self.c.double()
        z = self.fixed_point64()
        s = 1 - torch.tanh(z @ W.T + x) ** 2
        gW, gx = torch.zeros_like(W), torch.zeros_like(x)
        eye = torch.eye(self.D, dtype=torch.float64)
        for b in range(self.B):
            J = s[b, :, None] * W
            g = torch.linalg.solve((eye - J).T, c[b])
            gx[b] = s[b] * g
            gW += torch.outer(s[b] * g, z[b])
        return gW, gx


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def grads_of(prob, z_out):
    loss = (prob.c * z_out[-1]).sum()
    return torch.autograd.grad(loss, prob.params())


def dense_generic(flat_f, zstar, c, params):
    """Exact implicit gradient of <c, z*> w.r.t. params from the dense Jacobian of flat_f."""
    B, D = zstar.shape
    Jfull = torch.autograd.functional.jacobian(flat_f, zstar)      # (B, D, B, D)
    eye = torch.eye(D, dtype=zstar.dtype)
    g = torch.stack([torch.linalg.solve((eye - Jfull[b, :, b, :]).T, c[b]) for b in range(B)])
    return torch.autograd.grad(flat_f(zstar), params, g)


class VJPCounter:
    """Counts vector-Jacobian products through f (a tensor hook fires once per backward pass)."""

    def __init__(self, prob):
        self.prob, self.count = prob, 0

    def f(self, z):
        pre = z @ self.prob.W.T + self.prob.x
        if pre.requires_grad:
            pre.register_hook(self._hook)
        return torch.tanh(pre)

    def _hook(self, grad):
        self.count += 1


# ---------------------------------------------------------------------------------------------
# exact gradient
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("f_solver", ["anderson", "broyden", "fixed_point_iter"])
@pytest.mark.parametrize("B,D", [(1, 5), (3, 7)], ids=["B1D5", "B3D7"])
def test_exact_matches_dense_implicit_gradient(dtype, f_solver, B, D):
    prob = TanhProblem(B, D, dtype, seed=B * 10 + D)
    f_tol = 1e-13 if dtype == torch.float64 else 1e-6
    deq = get_deq(f_solver=f_solver, f_max_iter=120, f_tol=f_tol, b_tol=f_tol / 10,
                  b_max_iter=200)
    assert deq.grad_mode == "exact"
    z_out, info = deq(prob.f, prob.z0())
    assert len(z_out) == 1 and z_out[0].shape == (B, D) and z_out[0].dtype == dtype
    gW, gx = grads_of(prob, z_out)
    rW, rx = prob.dense_exact()
    assert rel_err(gW, rW) <= DEQ_GRAD_TOL[dtype]
    assert rel_err(gx, rx) <= DEQ_GRAD_TOL[dtype]
    assert info["b_nvjp"] > 0 and bool(torch.as_tensor(info["b_converged"]).all())
    # the module runs the compiled backward loop whenever implicit_backward can
    assert info["b_backend"] == resolve_backend("auto", torch.device("cpu"))


def test_exact_gradcheck_float64():
    torch.manual_seed(1)
    W0 = torch.randn(3, 3, dtype=torch.float64)
    W = (0.5 * W0 / torch.linalg.matrix_norm(W0, ord=2)).requires_grad_()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    deq = get_deq(f_solver="anderson", f_max_iter=100, f_tol=1e-15, b_tol=1e-14, b_max_iter=100)

    def fn(x, W):
        z_out, _ = deq(lambda z: torch.tanh(z @ W.T + x), torch.zeros(2, 3, dtype=torch.float64))
        return z_out[-1]

    assert torch.autograd.gradcheck(fn, (x, W), eps=1e-6, atol=1e-7, rtol=1e-5)


class TupleProblem:
    """Two states of different shapes, (B, 2, 3) and (B, 5), coupled; func(*states) -> tuple."""

    def __init__(self, B, dtype=torch.float64, seed=3):
        g = torch.Generator().manual_seed(seed)
        D1, D2 = 6, 5
        M = torch.randn(D1 + D2, D1 + D2, generator=g, dtype=torch.float64)
        M = 0.7 * M / torch.linalg.matrix_norm(M, ord=2)
        self.M = nn.Parameter(M.to(dtype))
        self.x1 = torch.randn(B, 2, 3, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        self.x2 = torch.randn(B, 5, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
        self.c = torch.randn(B, D1 + D2, generator=g, dtype=torch.float64).to(dtype)
        self.B, self.dtype = B, dtype

    def f(self, z1, z2):
        flat = torch.cat([z1.reshape(self.B, -1), z2], dim=1) @ self.M.T
        a, b = flat[:, :6], flat[:, 6:]
        return torch.tanh(a.reshape(self.B, 2, 3) + self.x1), torch.sin(b) * 0.9 + self.x2

    def flat_f(self, zf):
        o1, o2 = self.f(zf[:, :6].reshape(self.B, 2, 3), zf[:, 6:])
        return torch.cat([o1.reshape(self.B, -1), o2], dim=1)

    def params(self):
        return [self.M, self.x1, self.x2]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("B", [1, 3])
def test_exact_tuple_states(dtype, B):
    prob = TupleProblem(B, dtype)
    f_tol = 1e-13 if dtype == torch.float64 else 1e-6
    deq = get_deq(f_solver="anderson", f_max_iter=150, f_tol=f_tol, b_tol=f_tol / 10,
                  b_max_iter=200)
    z0 = (torch.zeros(B, 2, 3, dtype=dtype), torch.zeros(B, 5, dtype=dtype))
    z_out, info = deq(prob.f, z0)
    z1, z2 = z_out[-1]
    assert isinstance(z_out[-1], tuple) and z1.shape == (B, 2, 3) and z2.shape == (B, 5)
    loss = (prob.c[:, :6] * z1.reshape(B, -1)).sum() + (prob.c[:, 6:] * z2).sum()
    grads = torch.autograd.grad(loss, prob.params())
    # reference in float64 from a tightly converged fixed point
    p64 = TupleProblem(B, torch.float64)
    zf = torch.zeros(B, 11, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(300):
            zf = p64.flat_f(zf)
    ref = dense_generic(p64.flat_f, zf, p64.c, p64.params())
    for g, r in zip(grads, ref):
        assert rel_err(g, r) <= DEQ_GRAD_TOL[dtype]


def test_exact_list_state_returns_list_and_gradcheck():
    torch.manual_seed(2)
    A = (0.4 * torch.randn(4, 4, dtype=torch.float64) / 2).requires_grad_()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    deq = get_deq(f_solver="anderson", f_max_iter=100, f_tol=1e-15, b_tol=1e-14, b_max_iter=100)

    def fn(A, x):
        def f(a, b):
            return [torch.tanh(b @ A + 0.3 * a + x), torch.tanh(a @ A.T) * 0.5 + x]
        z_out, _ = deq(f, [torch.zeros(2, 4, dtype=torch.float64)] * 2)
        assert isinstance(z_out[-1], list)
        return tuple(z_out[-1])

    assert torch.autograd.gradcheck(fn, (A, x), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# cheaper gradients: their definitions, by hand
# ---------------------------------------------------------------------------------------------

def _solver_fixed_point(prob, deq, monkeypatch):
    """Run deq and capture the (detached) solver estimate z* the gradient is built at."""
    seen = {}
    orig = deq._produce

    def spy(ffunc, z_star, kind, factors, info, writer):
        seen["z"] = z_star.detach().clone()
        seen["factors"] = factors
        return orig(ffunc, z_star, kind, factors, info, writer)

    monkeypatch.setattr(deq, "_produce", spy)
    z_out, info = deq(prob.f, prob.z0())
    return z_out, info, seen


def test_jfb_equals_dL_dz_times_df_dtheta(monkeypatch):
    prob = TanhProblem(3, 6, seed=5)
    deq = get_deq(grad_mode="jfb", f_solver="anderson", f_max_iter=60, f_tol=1e-12)
    z_out, info, seen = _solver_fixed_point(prob, deq, monkeypatch)
    gW, gx = grads_of(prob, z_out)
    z = seen["z"]
    s = 1 - torch.tanh(z @ prob.W.detach().T + prob.x.detach()) ** 2
    u = s * prob.c                       # c^T df/d(pre-activation)
    assert rel_err(gx, u) <= 1e-12
    assert rel_err(gW, u.T @ z) <= 1e-12
    rW, _ = prob.dense_exact()
    assert rel_err(gW, rW) > 1e-3         # JFB is not the exact gradient (negative check)


@pytest.mark.parametrize("k,tau", [(1, 1.0), (3, 0.6), (5, 0.8)])
def test_phantom_equals_unrolled_damped_derivative(monkeypatch, k, tau):
    prob = TanhProblem(2, 5, seed=7, rho=0.8)
    deq = get_deq(grad_mode="phantom", grad=k, tau=tau, f_solver="anderson", f_max_iter=60,
                  f_tol=1e-12)
    z_out, info, seen = _solver_fixed_point(prob, deq, monkeypatch)
    gW, gx = grads_of(prob, z_out)
    # by hand: z_{i+1} = tau f(z_i) + (1 - tau) z_i;  f(z) = tanh(W z + x)
    W, x = prob.W.detach(), prob.x.detach()
    zs = [seen["z"]]
    for _ in range(k):
        zs.append(tau * torch.tanh(zs[-1] @ W.T + x) + (1 - tau) * zs[-1])
    v = prob.c.clone()
    hW, hx = torch.zeros_like(W), torch.zeros_like(x)
    for i in reversed(range(k)):
        s = 1 - torch.tanh(zs[i] @ W.T + x) ** 2
        u = tau * s * v                  # adjoint at the pre-activation of step i
        hx += u
        hW += u.T @ zs[i]
        v = u @ W + (1 - tau) * v        # (tau J_i^T + (1 - tau) I) v
    assert rel_err(gx, hx) <= 1e-12
    assert rel_err(gW, hW) <= 1e-12
    assert torch.allclose(z_out[-1], zs[-1], atol=1e-14)
    if tau != 1.0:   # negative check: tau is not ignored
        deq1 = get_deq(grad_mode="phantom", grad=k, tau=1.0, f_solver="anderson",
                       f_max_iter=60, f_tol=1e-12)
        g1W, _ = grads_of(prob, deq1(prob.f, prob.z0())[0])
        assert rel_err(g1W, gW) > 1e-3


def test_shine_equals_formula_with_forward_broyden_factors(monkeypatch):
    prob = TanhProblem(3, 6, seed=11)
    deq = get_deq(grad_mode="shine", f_solver="broyden", f_max_iter=30, f_tol=1e-10)
    z_out, info, seen = _solver_fixed_point(prob, deq, monkeypatch)
    gW, gx = grads_of(prob, z_out)
    U, V = seen["factors"]
    assert U.shape[0] == 3 and U.shape[2] == 6 and U.shape == V.shape
    # H = -I + sum_l u_l v_l^T ~ (J - I)^{-1};  (I - J)^{-T} c ~ -H^T c = c - sum_l v_l (u_l . c)
    g = prob.c - torch.einsum("bld,bl->bd", V, torch.einsum("bld,bd->bl", U, prob.c))
    z = seen["z"]
    s = 1 - torch.tanh(z @ prob.W.detach().T + prob.x.detach()) ** 2
    assert rel_err(gx, s * g) <= 1e-10
    assert rel_err(gW, (s * g).T @ z) <= 1e-10
    assert info["b_nvjp"] == 0
    rW, _ = prob.dense_exact()
    assert rel_err(gW, rW) < 0.5          # an approximation of the exact gradient


def test_shine_needs_broyden():
    with pytest.raises(ValueError, match="f_solver"):
        get_deq(grad_mode="shine", f_solver="anderson")


def test_vjp_counts_per_gradient_mode():
    counts = {}
    for mode, kw in [("exact", {}), ("phantom", dict(grad=3)), ("jfb", {}),
                     ("shine", dict(f_solver="broyden"))]:
        prob = TanhProblem(2, 6, seed=13, rho=0.9)
        counter = VJPCounter(prob)
        deq = get_deq(grad_mode=mode, f_max_iter=60, f_tol=1e-10, b_tol=1e-10, b_max_iter=200,
                      **{"f_solver": "anderson", **kw})
        z_out, info = deq(counter.f, prob.z0())
        grads_of(prob, z_out)
        counts[mode] = counter.count
        if mode == "exact":
            assert counter.count == info["b_nvjp"] + 1
    assert counts["jfb"] == 1 and counts["phantom"] == 3 and counts["shine"] == 1
    assert counts["exact"] > counts["phantom"]


# ---------------------------------------------------------------------------------------------
# repeated calls, evaluation mode, non-convergence
# ---------------------------------------------------------------------------------------------

def test_two_calls_per_step_with_jac_reg_do_not_accumulate():
    prob = TanhProblem(2, 5, seed=17)
    deq = get_deq(f_solver="anderson", f_max_iter=80, f_tol=1e-13, b_tol=1e-13, b_max_iter=200)
    state_before = (set(deq.__dict__), len(deq._forward_hooks), len(deq._backward_hooks))
    x2 = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)

    def f2(z):
        return torch.tanh(z @ prob.W.T + x2)

    def step(parts):
        torch.manual_seed(0)
        loss = 0
        if "a" in parts:
            loss = loss + (prob.c * deq(prob.f, prob.z0())[0][-1]).sum()
        if "b" in parts:
            loss = loss + (prob.c ** 2 * deq(f2, prob.z0())[0][-1]).sum()
        if "j" in parts:
            z = deq(prob.f, prob.z0())[0][-1]
            loss = loss + 0.3 * jac_reg(prob.f(z), z)
        return torch.autograd.grad(loss, [prob.W, prob.x, x2], allow_unused=True)

    joint = step("abj")
    again = step("abj")
    parts = [step(p) for p in ("a", "b", "j")]
    for i in range(3):
        expect = sum(p[i] for p in parts if p[i] is not None)
        assert rel_err(joint[i], expect) <= 1e-10
        assert torch.equal(joint[i], again[i])
    assert state_before == (set(deq.__dict__), len(deq._forward_hooks), len(deq._backward_hooks))


def test_eval_mode_keeps_requires_grad_and_exact_gradient():
    prob = TanhProblem(2, 5, seed=19)
    deq = get_deq(f_solver="anderson", f_max_iter=80, f_tol=1e-13, b_tol=1e-13, b_max_iter=200)
    deq.eval()
    z_out, info = deq(prob.f, prob.z0())
    assert z_out[-1].requires_grad
    gW, gx = grads_of(prob, z_out)
    rW, rx = prob.dense_exact()
    assert rel_err(gW, rW) <= 1e-8 and rel_err(gx, rx) <= 1e-8
    with torch.no_grad():
        z_ng, info_ng = deq(prob.f, prob.z0())
    assert not z_ng[-1].requires_grad and info_ng["nfe"] == info["nfe"] - 1
    frozen = TanhProblem(2, 5, seed=19)
    frozen.W.requires_grad_(False)
    frozen.x.requires_grad_(False)
    assert not deq(frozen.f, frozen.z0())[0][-1].requires_grad


def test_eval_uses_eval_f_max_iter():
    prob = TanhProblem(2, 5, seed=19, rho=0.95)
    deq = get_deq(f_solver="fixed_point_iter", f_max_iter=4, eval_f_max_iter=9, f_tol=1e-14)
    deq.eval()
    with torch.no_grad():
        _, info = deq(prob.f, prob.z0())
    assert info["nfe"] == 9
    deq.train()
    _, info = deq(prob.f, prob.z0())
    assert info["nfe"] == 4 + 1


def test_backward_not_converged_warns_and_stays_finite():
    prob = TanhProblem(2, 6, seed=23, rho=0.97)
    deq = get_deq(f_solver="anderson", f_max_iter=80, f_tol=1e-12, b_solver="fixed_point_iter",
                  b_tol=1e-14, b_max_iter=2)
    z_out, info = deq(prob.f, prob.z0())
    with pytest.warns(BackwardNotConverged):
        gW, gx = grads_of(prob, z_out)
    assert torch.isfinite(gW).all() and torch.isfinite(gx).all()
    assert not bool(torch.as_tensor(info["b_converged"]).all())
    z_out, _ = deq(prob.f, prob.z0())
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackwardNotConverged)
        with pytest.raises(BackwardNotConverged):
            grads_of(prob, z_out)


def test_backward_writer_receives_backward_info():
    prob = TanhProblem(2, 5, seed=29)
    seen = []
    deq = get_deq(f_solver="anderson", f_max_iter=40, f_tol=1e-10)
    z_out, info = deq(prob.f, prob.z0(), backward_writer=seen.append)
    grads_of(prob, z_out)
    assert len(seen) == 1 and seen[0]["nvjp"] == info["b_nvjp"]


# ---------------------------------------------------------------------------------------------
# cores, states sampling, options
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("core", ["sliced", "indexing"])
def test_n_states_trajectory(core):
    prob = TanhProblem(2, 5, seed=31)
    deq = get_deq(core=core, n_states=3, f_solver="fixed_point_iter", f_max_iter=12,
                  f_tol=1e-14, grad=2, b_tol=1e-12, b_max_iter=100)
    z_out, info = deq(prob.f, prob.z0())
    assert len(z_out) == 3 and all(z.requires_grad for z in z_out)
    zstar = prob.fixed_point64()
    errs = [float((z.detach() - zstar).norm()) for z in z_out]
    assert errs[0] > errs[-1]             # later states are closer to z*
    sum(z.sum() for z in z_out).backward()
    assert prob.W.grad is not None


def test_indexing_core_keeps_all_states_when_solver_stops_early():
    prob = TanhProblem(2, 5, seed=37, rho=0.3)
    deq = get_deq(core="indexing", indexing=[3, 30], f_solver="fixed_point_iter", f_max_iter=60,
                  f_tol=1e-6)
    z_out, info = deq(prob.f, prob.z0())
    assert len(z_out) == 3                # TorchDEQ returns fewer entries here
    assert info["nfe"] < 60


def test_phantom_sup_gap_outputs():
    prob = TanhProblem(2, 5, seed=41)
    deq = get_deq(grad_mode="phantom", grad=4, sup_gap=2, f_solver="anderson", f_max_iter=30)
    z_out, _ = deq(prob.f, prob.z0())
    assert len(z_out) == 2
    deq = get_deq(grad_mode="phantom", grad=4, sup_loc=[1], f_solver="anderson", f_max_iter=30)
    assert len(deq(prob.f, prob.z0())[0]) == 2


def test_stop_mode_sets_both_and_changes_the_solve():
    deq = get_deq(stop_mode="rel")
    assert deq.f_stop_mode == "rel" and deq.b_stop_mode == "rel"
    assert get_deq(stop_mode="rel", f_stop_mode="abs").f_stop_mode == "abs"
    W = 0.5 * torch.eye(4, dtype=torch.float64)

    def f(z):                              # ||f(z*)|| = 200: rel residual is 200x smaller
        return z @ W + 100.0

    nfe = {m: get_deq(stop_mode=m, f_tol=1e-3, f_max_iter=60)(f, torch.zeros(1, 4,
                                                                             dtype=torch.float64))[1]["nfe"]
           for m in ("abs", "rel")}
    assert nfe["rel"] < nfe["abs"]


def test_misspelt_keyword_raises_naming_it():
    with pytest.raises(TypeError, match="f_max_iters.*f_max_iter"):
        get_deq(f_max_iters=10)
    with pytest.raises(TypeError, match="norm_type"):
        get_deq(norm_type="weight_norm")
    with pytest.raises(ValueError, match="core"):
        get_deq(core="slised")
    with pytest.raises(ValueError, match="grad_mode"):
        get_deq(grad_mode="exactly")
    with pytest.raises(ValueError, match="f_solver"):
        get_deq(f_solver="andersen")
    with pytest.raises(ValueError, match="tau"):
        get_deq(tau=0.0)
    with pytest.raises(ValueError, match="b_solver"):
        get_deq(b_solver="gmress")
    # the forward ignores unknown keywords as TorchDEQ does (MDEQ's writer=), warning on near-misses
    with pytest.warns(UserWarning, match="solver_kwarg.*solver_kwargs"):
        get_deq()(torch.tanh, torch.zeros(2, 3), solver_kwarg={})


def test_args_namespace_from_add_deq_args():
    parser = add_deq_args(argparse.ArgumentParser())
    args = parser.parse_args(["--f_solver", "anderson", "--f_max_iter", "17", "--stop_mode", "rel",
                              "--core", "indexing"])
    deq = get_deq(args, f_tol=1e-5)
    assert (deq.f_solver_name, deq.f_max_iter, deq.f_stop_mode, deq.core, deq.f_tol) == \
        ("anderson", 17, "rel", "indexing", 1e-5)
    assert deq.grad_mode == "phantom"   # add_deq_args sets ift=False: TorchDEQ's phantom gradient
    assert get_deq(parser.parse_args(["--ift"])).grad_mode == "exact"
    assert get_deq(parser.parse_args(["--grad_mode", "phantom"])).grad_mode == "phantom"
    assert get_deq(parser.parse_args(["--grad_mode", "jfb"])).grad_mode == "jfb"
    assert get_deq({"f_max_iter": 5, "unrelated": 1}).f_max_iter == 5
    with pytest.raises(ValueError, match="grad_mode"):
        get_deq(ift=True, grad_mode="phantom")


def test_grad_without_phantom_mode_warns():
    with pytest.warns(UserWarning, match="grad_mode='phantom'"):
        get_deq(grad=3)


def test_wrong_func_output_raises_naming_it():
    prob = TanhProblem(3, 7)
    deq = get_deq()
    with pytest.raises(ValueError, match=r"shape \(3, 6\).*z_init.*\(3, 7\)"):
        deq(lambda z: prob.f(z)[:, :6], prob.z0())
    with pytest.raises(ValueError, match="dtype torch.float32"):
        deq(lambda z: prob.f(z).float(), prob.z0())
    with pytest.raises(ValueError, match="2 states"):
        deq(lambda a, b, c: (a, b), (torch.zeros(2, 3),) * 3)
    with pytest.raises(ValueError, match="z_init"):
        deq(prob.f, torch.zeros(3, 7, dtype=torch.int64))


def test_sradius_mode_reports_per_sample_spectral_radius():
    prob = TanhProblem(3, 6, seed=43, rho=0.8)
    deq = get_deq(f_solver="anderson", f_max_iter=80, f_tol=1e-12)
    deq.eval()
    with torch.no_grad():
        _, info = deq(prob.f, prob.z0(), sradius_mode=True)
    z = prob.fixed_point64()
    s = 1 - z.mul(0).add(torch.tanh(z @ prob.W.detach().T + prob.x.detach())) ** 2
    ref = torch.stack([torch.linalg.eigvals(s[b, :, None] * prob.W.detach()).abs().max()
                       for b in range(3)])
    assert info["sradius"].shape == (3,)
    assert torch.allclose(info["sradius"], ref, rtol=2e-2)


def test_top_level_exports():
    for name in ("get_deq", "reset_deq", "DEQ", "add_deq_args"):
        assert getattr(deq_fast, name) is getattr(deq_mod, name)


def test_training_mode_under_no_grad_and_solver_kwargs_override():
    prob = TanhProblem(2, 5, seed=47)
    deq = get_deq(f_solver="fixed_point_iter", f_max_iter=30, f_tol=1e-14)
    with torch.no_grad():
        z_out, info = deq(prob.f, prob.z0(), solver_kwargs={"f_max_iter": 7})
    assert not z_out[-1].requires_grad and info["nfe"] == 7 + 1
    zstar = prob.fixed_point64()
    assert torch.allclose(z_out[-1], zstar, atol=0.6 ** 7)


def test_shine_is_finite_when_forward_broyden_converges_tightly():
    # D=64 at a tight tolerance: updates after convergence can carry non-finite factor rows
    prob = TanhProblem(4, 64, seed=1, rho=0.9)
    deq = get_deq(grad_mode="shine", f_solver="broyden", f_max_iter=200, f_tol=1e-12)
    gW, gx = grads_of(prob, deq(prob.f, prob.z0())[0])
    rW, rx = prob.dense_exact()
    assert torch.isfinite(gW).all() and torch.isfinite(gx).all()
    assert rel_err(gW, rW) < 0.5


def test_nonfinite_incoming_gradient_propagates_without_warning():
    prob = TanhProblem(2, 5, seed=53)
    deq = get_deq(f_solver="anderson", f_max_iter=60, f_tol=1e-12, b_tol=1e-12, b_max_iter=100)
    z_out, info = deq(prob.f, prob.z0())
    c = prob.c.clone()
    c[1, 2] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("error", BackwardNotConverged)
        (gx,) = torch.autograd.grad((c * z_out[-1]).sum(), [prob.x])
    assert torch.isnan(gx[1]).all() and torch.isfinite(gx[0]).all()   # sample 0 unaffected


def test_conv_state_with_weight_norm_and_dropout_exact_gradient():
    """A small MDEQ-like cell: 4-D state, weight-normalised conv, variational dropout, GroupNorm;
    exact gradients of the normalisation parameters against the dense implicit gradient."""
    from deq_fast.nn.dropout import VariationalDropout2d
    from deq_fast.nn.norm import apply_norm
    torch.manual_seed(59)
    conv = nn.Conv2d(2, 2, 3, padding=1).double()
    gn = nn.GroupNorm(1, 2).double()
    drop = VariationalDropout2d(0.3, token_first=False)
    cell = nn.ModuleList([conv, gn, drop])
    apply_norm(cell, "weight_norm", learn_scale=True)
    with torch.no_grad():
        conv.weight_g.mul_(0.25)
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64, requires_grad=True)

    def f(z):
        return drop(torch.tanh(gn(conv(z)) * 0.5 + x))

    reset_deq(cell)
    deq = get_deq(f_solver="broyden", f_max_iter=100, f_tol=1e-13, b_tol=1e-13, b_max_iter=200)
    c = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    z_out, info = deq(f, torch.zeros(2, 2, 3, 3, dtype=torch.float64))
    assert float(info["abs_lowest"].max()) < 1e-12
    params = [conv.weight_g, conv.weight_v, gn.weight, x]
    grads = torch.autograd.grad((c * z_out[-1]).sum(), params)
    # the reference uses the same normalised weight and dropout mask (no reset in between)

    def flat(zf):
        return f(zf.view(2, 2, 3, 3)).reshape(2, -1)

    zf = z_out[-1].detach().reshape(2, -1)
    with torch.no_grad():
        for _ in range(50):
            zf = flat(zf)
    ref = dense_generic(flat, zf, c.reshape(2, -1), params)
    for g, r in zip(grads, ref):
        assert rel_err(g, r) <= 1e-8
