"""The backward linear solve ``deq_fast.implicit.backward.implicit_backward`` (C++ loop and Python oracle)
and its registered ops ``deq_fast::bwd_*``.

Reference: the dense solution ``(I - J^T)^{-1} grad`` from the explicit per-sample Jacobian of
``f(z) = tanh(W z + b)`` with ``W`` scaled to spectral radius 0.9.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from deq_fast.implicit import backward as bw
from deq_fast.implicit.backward import implicit_backward
from deq_fast.ops import backward as bwd_ops, extension
from deq_fast.ops.backward import OP_NAMES
from deq_fast.testing import BACKWARD_TOL

ITERATIVE = ("fixed_point", "anderson", "broyden", "gmres")
# a missing build is a failure, not a skip (CI builds the extension); only an explicit opt-out skips
needs_ext = pytest.mark.skipif(os.environ.get("DEQ_FAST_NO_EXT") == "1",
                               reason="DEQ_FAST_NO_EXT=1: the extension is deliberately not used")
BACKENDS = [pytest.param("reference", id="reference"), pytest.param("cpp", id="cpp", marks=needs_ext)]


def make_problem(B: int, D: int, dtype: torch.dtype, rho: float = 0.9, seed: int = 0):
    """f(z) = tanh(z W^T + b); returns fz, z, grad and the dense solution (float64)."""
    gen = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=gen, dtype=torch.float64)
    # exact spectral radius for small D; for large D the circular law's rho / sqrt(D) suffices
    W = W * (rho / (torch.linalg.eigvals(W).abs().max() if D <= 256 else math.sqrt(D)))
    b = 0.1 * torch.randn(D, generator=gen, dtype=torch.float64)
    z0 = 0.3 * torch.randn(B, D, generator=gen, dtype=torch.float64)
    grad = torch.randn(B, D, generator=gen, dtype=torch.float64)
    z = z0.to(dtype).requires_grad_()
    fz = torch.tanh(z @ W.to(dtype).T + b.to(dtype))
    return fz, z, grad.to(dtype), dense_solution(z0.to(dtype).double(), W, b, grad.to(dtype).double())


def dense_solution(z, W, b, grad):
    d = 1 - torch.tanh(z @ W.T + b) ** 2  # J_b = diag(d_b) W
    eye = torch.eye(W.shape[0], dtype=torch.float64)
    return torch.stack([torch.linalg.solve(eye - (d[i][:, None] * W).T, grad[i])
                        for i in range(z.shape[0])])


def rel_err(a, ref):
    return ((a.double() - ref).norm(dim=1) / ref.norm(dim=1)).max().item()


def measured_residual(fz, z, grad, g):
    jtg = torch.autograd.grad(fz, z, g.to(fz.dtype), retain_graph=True)[0]
    return ((grad + jtg - g).double().norm(dim=1) / grad.double().norm(dim=1))


# ---------------------------------------------------------------------------------------------
# every method against the dense solution
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ITERATIVE + ("auto",))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("B,D", [(1, 5), (3, 17)], ids=["B1D5", "B3D17"])
def test_matches_dense_solution(B, D, dtype, method, backend):
    fz, z, grad, ref = make_problem(B, D, dtype, seed=B * 100 + D)
    tol, bound = BACKWARD_TOL[dtype]
    g, info = implicit_backward(fz, z, grad, method=method, tol=tol, max_iter=2000,
                                backend=backend)
    assert g.shape == grad.shape and g.dtype == dtype
    assert rel_err(g, ref) <= bound
    assert info["converged"].all() and info["converged"].dtype == torch.bool
    assert info["backend"] == backend
    assert info["method"] == (bw.DEFAULT_METHOD if method == "auto" else method)
    assert isinstance(info["nvjp"], int) and 1 <= info["nvjp"] <= 2000
    assert info["rel_residual"].shape == (B,) and (info["rel_residual"] <= tol).all()
    # rel_residual is the measured residual of the returned iterate
    torch.testing.assert_close(info["rel_residual"].double(), measured_residual(fz, z, grad, g),
                               rtol=1e-3 if dtype == torch.float32 else 1e-6, atol=tol * 1e-2)


@needs_ext
@pytest.mark.parametrize("method", ITERATIVE)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("B,D", [(3, 17), (2, 2500)], ids=["D17", "D2500"])
def test_cpp_equals_python(method, dtype, B, D):
    """Same algorithm, same iteration count (tol=0: no early stop): same iterates. D=2500 runs the
    CPU kernels' blocked dots (256) and tiled history sweeps (2048) with ragged tails."""
    fz, z, grad, _ = make_problem(B, D, dtype, rho=0.95, seed=7)
    kw = dict(method=method, tol=0.0, max_iter=23, m=4, restart=6, check_every=3)
    g_py, i_py = implicit_backward(fz, z, grad, backend="reference", **kw)
    g_cpp, i_cpp = implicit_backward(fz, z, grad, backend="cpp", **kw)
    assert i_py["nvjp"] == i_cpp["nvjp"] == 23
    assert i_py["nsync"] == i_cpp["nsync"]
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(g_cpp, g_py, rtol=rtol, atol=rtol)
    torch.testing.assert_close(i_cpp["rel_residual"], i_py["rel_residual"], rtol=rtol * 10, atol=0)


@needs_ext
def test_cpp_backend_is_what_runs():
    """Fails if the C++ loop silently falls back to the Python reference."""
    module = extension.load()
    assert module is not None, extension.extension_status()[1]
    assert hasattr(module, "backward_solve"), (
        "deq_fast._C has no backward_solve: its module init must call "
        "register_backward_bindings (csrc/include/deq_fast/module.h)")
    fz, z, grad, _ = make_problem(2, 5, torch.float64)
    _, info = implicit_backward(fz, z, grad)
    assert info["backend"] == "cpp"
    for name in OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"deq_fast::{name}", "CPU")


def test_forced_cpp_without_extension_raises(monkeypatch):
    monkeypatch.setenv("DEQ_FAST_NO_EXT", "1")
    fz, z, grad, ref = make_problem(2, 5, torch.float64)
    with pytest.raises(RuntimeError, match="backend='cpp'"):
        implicit_backward(fz, z, grad, backend="cpp")
    g, info = implicit_backward(fz, z, grad, tol=1e-11)  # auto: the Python reference
    assert info["backend"] == "reference" and rel_err(g, ref) <= 1e-8


@pytest.mark.parametrize("backend", BACKENDS)
def test_reentrant_inside_autograd_function_backward(backend):
    """The way the DEQ module calls it: from an autograd.Function backward (GIL, re-entrancy)."""
    fz0, z0, _, _ = make_problem(3, 17, torch.float64)
    gen = torch.Generator().manual_seed(3)
    W = 0.9 * torch.linalg.qr(torch.randn(9, 9, generator=gen, dtype=torch.float64))[0]
    x = torch.randn(2, 9, dtype=torch.float64, generator=gen)

    class Implicit(torch.autograd.Function):
        @staticmethod
        def forward(ctx, zstar):
            ctx.save_for_backward(zstar)
            return zstar.clone()

        @staticmethod
        def backward(ctx, grad):
            zstar, = ctx.saved_tensors
            with torch.enable_grad():
                zz = zstar.detach().requires_grad_()
                fz = torch.tanh(zz @ W.T + x)
            g, info = implicit_backward(fz, zz, grad, tol=1e-12, backend=backend)
            assert info["backend"] == backend
            return g

    zstar = torch.zeros(2, 9, dtype=torch.float64)
    for _ in range(200):
        zstar = torch.tanh(zstar @ W.T + x)
    leaf = zstar.clone().requires_grad_()
    out = Implicit.apply(leaf)
    w = torch.randn(2, 9, dtype=torch.float64, generator=gen)
    (out * w).sum().backward()
    ref = dense_solution(zstar, W, x, w)
    assert rel_err(leaf.grad, ref) <= 1e-9


# ---------------------------------------------------------------------------------------------
# SHINE and warm starts
# ---------------------------------------------------------------------------------------------
def exact_factors(fz, z):
    """U, V with -I + U V^T = (J - I)^{-1} per sample (L = D, V = I)."""
    B, D = z.shape
    eye = torch.eye(D, dtype=torch.float64)
    Us = []
    for i in range(B):
        J = torch.stack([torch.autograd.grad(fz[i, k], z, retain_graph=True)[0][i]
                         for k in range(D)]).double()
        Us.append(torch.linalg.inv(J - eye) + eye)
    U = torch.stack(Us).to(z.dtype)  # U[:, l] = column l of H + I, V[:, l] = e_l
    V = eye.expand(B, D, D).to(z.dtype).contiguous()
    return U.transpose(1, 2).contiguous(), V


def test_shine_equals_formula():
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    U = torch.randn(3, 4, 7, generator=gen, dtype=torch.float64)
    V = torch.randn(3, 4, 7, generator=gen, dtype=torch.float64)
    fz = torch.zeros(3, 7, dtype=torch.float64)
    g, info = implicit_backward(fz, fz, grad, method="shine", factors=(U, V))
    expected = grad - torch.stack([sum(V[b, l] * (U[b, l] @ grad[b]) for l in range(4))
                                   for b in range(3)])
    torch.testing.assert_close(g, expected, rtol=1e-12, atol=1e-12)
    assert info["nvjp"] == 0 and info["method"] == "shine"
    assert torch.isnan(info["rel_residual"]).all() and info["converged"].all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ITERATIVE)
def test_exact_factors_shine_and_warm_start(method, backend):
    fz, z, grad, ref = make_problem(2, 6, torch.float64, seed=5)
    U, V = exact_factors(fz, z)
    g, _ = implicit_backward(fz, z, grad, method="shine", factors=(U, V))
    assert rel_err(g, ref) <= 1e-10
    # warm start from the exact SHINE estimate: converged at the first (measuring) VJP
    g, info = implicit_backward(fz, z, grad, method=method, factors=(U, V), tol=1e-9,
                                backend=backend)
    assert info["nvjp"] == 1 and info["converged"].all() and rel_err(g, ref) <= 1e-9
    # negative check: without factors the same solve needs more VJPs
    _, info0 = implicit_backward(fz, z, grad, method=method, tol=1e-9, backend=backend)
    assert info0["nvjp"] > 3


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_half_precision_state_solved_in_float32(dtype, backend):
    fz, z, grad, ref = make_problem(2, 17, dtype, seed=12)
    g, info = implicit_backward(fz, z, grad, tol=1e-2, backend=backend)
    assert g.dtype == dtype and info["converged"].all()
    assert rel_err(g, ref) <= 5e-2  # the VJPs themselves are in half precision


@pytest.mark.parametrize("backend", BACKENDS)
def test_init_is_used(backend):
    fz, z, grad, ref = make_problem(3, 17, torch.float64, seed=11)
    g, info = implicit_backward(fz, z, grad, init=ref.clone(), tol=1e-10, backend=backend)
    assert info["nvjp"] == 1 and rel_err(g, ref) <= 1e-12


# ---------------------------------------------------------------------------------------------
# bad input: non-convergence, non-finite gradients, wrong arguments
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ITERATIVE)
def test_non_convergence_returns_best_measured_iterate(method, backend):
    fz, z, grad, _ = make_problem(3, 17, torch.float64, rho=0.99, seed=2)
    g, info = implicit_backward(fz, z, grad, method=method, max_iter=4, tol=1e-14,
                                backend=backend)
    assert torch.isfinite(g).all() and not info["converged"].any()
    assert info["nvjp"] <= 4
    torch.testing.assert_close(info["rel_residual"], measured_residual(fz, z, grad, g),
                               rtol=1e-8, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ITERATIVE)
def test_divergent_problem_never_nan(method, backend):
    """J = 1.5 I: plain iteration diverges; the best finite iterate is returned."""
    z = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    fz = 1.5 * z
    grad = torch.randn(2, 5, dtype=torch.float64)
    g, info = implicit_backward(fz, z, grad, method=method, max_iter=300, tol=1e-10,
                                backend=backend)
    assert torch.isfinite(g).all() and torch.isfinite(info["rel_residual"]).all()
    torch.testing.assert_close(info["rel_residual"], measured_residual(fz, z, grad, g),
                               rtol=1e-8, atol=1e-12)
    if method == "fixed_point":
        assert not info["converged"].any()
    else:  # the linear-system methods solve it anyway: g = grad / (1 - 1.5)
        torch.testing.assert_close(g, -2 * grad, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_diverging_solve_never_returns_the_zero_start(backend):
    """J = 3 I: every fixed-point iterate has a larger residual than the zero start (rel 1); the
    result is the first real iterate (grad itself), not a zero gradient."""
    z = torch.randn(2, 5, dtype=torch.float64, requires_grad=True)
    fz = 3.0 * z
    grad = torch.randn(2, 5, dtype=torch.float64)
    g, info = implicit_backward(fz, z, grad, method="fixed_point", max_iter=6, tol=1e-10,
                                backend=backend)
    torch.testing.assert_close(g, grad)
    torch.testing.assert_close(info["rel_residual"], measured_residual(fz, z, grad, g))
    assert (info["rel_residual"] > 1).all() and not info["converged"].any()


@pytest.mark.parametrize("backend", BACKENDS)
def test_gmres_budget_of_one_falls_back_to_the_zero_start(backend):
    """max_iter=1 leaves GMRES no VJP after the free measurement: g = 0 with its true residual 1."""
    fz, z, grad, _ = make_problem(2, 7, torch.float64)
    g, info = implicit_backward(fz, z, grad, method="gmres", max_iter=1, tol=1e-10,
                                backend=backend)
    assert (g == 0).all()
    torch.testing.assert_close(info["rel_residual"], torch.ones(2, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ["anderson", "broyden", "gmres"])
@pytest.mark.parametrize("scale", [1e-24, 1e20], ids=["tiny", "huge"])
def test_float32_gradients_of_extreme_magnitude(method, backend, scale):
    """Dot products are formed in double: fp32 products of 1e-24-sized entries would underflow
    to zero (and GMRES would not start), of 1e20-sized ones overflow; the solution scales."""
    fz, z, grad, ref = make_problem(2, 300, torch.float32, rho=0.5, seed=3)
    g, info = implicit_backward(fz, z, grad * scale, method=method, max_iter=40, tol=1e-5,
                                backend=backend)
    assert info["converged"].all()
    assert rel_err(g / scale, ref) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ITERATIVE)
def test_nonfinite_and_zero_grad_samples(method, backend):
    fz, z, grad, ref = make_problem(4, 17, torch.float64, seed=4)
    grad = grad.clone()
    grad[1, 3] = math.nan
    grad[2, 0] = math.inf
    grad[3] = 0.0
    g, info = implicit_backward(fz, z, grad, method=method, tol=1e-11, max_iter=500,
                                backend=backend)
    assert torch.isnan(g[1]).all() and torch.isnan(g[2]).all()
    assert (g[3] == 0).all() and rel_err(g[:1], ref[:1]) <= 1e-8
    assert info["converged"].tolist() == [True, False, False, True]
    assert torch.isnan(info["rel_residual"][1:3]).all() and info["rel_residual"][3] == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_sample_result_does_not_depend_on_batch(backend):
    gen = torch.Generator().manual_seed(9)
    W = torch.randn(17, 17, generator=gen, dtype=torch.float64)
    W = W * (0.95 / torch.linalg.eigvals(W).abs().max())
    b = 0.1 * torch.randn(17, generator=gen, dtype=torch.float64)
    z = (0.3 * torch.randn(3, 17, generator=gen, dtype=torch.float64)).requires_grad_()
    grad = torch.randn(3, 17, generator=gen, dtype=torch.float64)
    g, _ = implicit_backward(torch.tanh(z @ W.T + b), z, grad, tol=1e-10, backend=backend)
    z1 = z.detach()[1:2].clone().requires_grad_()
    g1, _ = implicit_backward(torch.tanh(z1 @ W.T + b), z1, grad[1:2], tol=1e-10, backend=backend)
    torch.testing.assert_close(g1, g[1:2], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("kwargs,match", [
    (dict(method="newton"), "method"), (dict(max_iter=0), "max_iter"), (dict(tol=-1.0), "tol"),
    (dict(m=0), "m must"), (dict(lam=-1.0), "lam"), (dict(restart=65), "restart"),
    (dict(check_every=0), "check_every"), (dict(backend="gpu"), "backend"),
    (dict(init=torch.zeros(3, 4)), "init"), (dict(method="shine"), "factors"),
    (dict(factors=(torch.zeros(2, 1, 5), torch.zeros(2, 1, 5))), "factors U"),
], ids=["method", "max_iter", "tol", "m", "lam", "restart", "check_every", "backend", "init",
        "shine-no-factors", "factors-shape"])
def test_rejects_bad_arguments(kwargs, match):
    fz, z, grad, _ = make_problem(3, 5, torch.float64)
    with pytest.raises(ValueError, match=match):
        implicit_backward(fz, z, grad, **kwargs)


def test_rejects_bad_tensors():
    fz, z, grad, _ = make_problem(3, 5, torch.float64)
    with pytest.raises(ValueError, match="grad"):
        implicit_backward(fz, z, grad[:, :4])
    with pytest.raises(ValueError, match="z must be a 2-D"):
        implicit_backward(fz, z[0], grad)
    with pytest.raises(ValueError, match="requires_grad|require grad"):
        implicit_backward(fz.detach(), z, grad)


# ---------------------------------------------------------------------------------------------
# parameters are not ignored; host syncs are bounded
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_anderson_lam_and_m_matter(backend):
    fz, z, grad, _ = make_problem(3, 17, torch.float64, rho=0.95, seed=3)
    kw = dict(method="anderson", tol=0.0, max_iter=12, backend=backend)
    g_a, _ = implicit_backward(fz, z, grad, lam=1e-4, **kw)
    g_b, _ = implicit_backward(fz, z, grad, lam=1.0, **kw)
    g_c, _ = implicit_backward(fz, z, grad, m=2, **kw)
    assert rel_err(g_a, g_b.double()) > 1e-6 and rel_err(g_a, g_c.double()) > 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_gmres_restart_matters(backend):
    fz, z, grad, _ = make_problem(2, 17, torch.float64, rho=0.95, seed=3)
    _, i_a = implicit_backward(fz, z, grad, method="gmres", tol=1e-12, restart=20, backend=backend)
    _, i_b = implicit_backward(fz, z, grad, method="gmres", tol=1e-12, restart=2, backend=backend)
    assert i_b["nvjp"] > i_a["nvjp"]


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", ITERATIVE)
@pytest.mark.parametrize("check_every", [1, 4])
def test_host_syncs_are_bounded(method, backend, check_every):
    fz, z, grad, _ = make_problem(3, 17, torch.float64, rho=0.95, seed=6)
    restart = 8
    with SyncCounter() as counter:
        _, info = implicit_backward(fz, z, grad, method=method, tol=1e-10, max_iter=400,
                                    restart=restart, check_every=check_every, backend=backend)
    assert info["converged"].all()
    assert counter.syncs == info["nsync"]
    its = info["nvjp"] + 1
    cycles = math.ceil(its / restart) if method == "gmres" else 0
    assert counter.syncs <= math.ceil(its / check_every) + cycles + 1
    if check_every == 4:
        assert counter.syncs < its / 2  # negative check: not one sync per iteration


# ---------------------------------------------------------------------------------------------
# the registered ops: schema, fake kernels, PT2 (opcheck)
# ---------------------------------------------------------------------------------------------
def _op_samples(dtype):
    gen = torch.Generator().manual_seed(0)
    B, D, m = 3, 7, 4

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    active = torch.tensor([True, False, True])
    ign = torch.rand(B, generator=gen, dtype=torch.float64) + 0.5
    best_rel = torch.tensor([math.inf, 1.0, 1e-3], dtype=torch.float64)
    gram = torch.zeros(B, m, m, dtype=torch.float64)
    G = rnd(m, B, D)
    for i in range(2):
        for j in range(2):
            gram[:, i, j] = (G[i].double() * G[j].double()).sum(1)
    Q = torch.zeros(m + 1, B, D, dtype=dtype)
    Q[0] = torch.nn.functional.normalize(rnd(B, D), dim=1)
    s = torch.zeros(B, m + 1, dtype=torch.float64)
    s[:, 0] = 2.0
    R = torch.rand(B, m, m + 1, generator=gen, dtype=torch.float64) + torch.eye(m, m + 1)
    kdim = torch.tensor([2, 0, 3])
    return {
        "bwd_track": (rnd(B, D), rnd(B, D), rnd(B, D), ign, rnd(B, D), rnd(B, D), best_rel,
                      active.clone(), 1e-2),
        "bwd_masked_add": (rnd(B, D), rnd(B, D), active),
        "bwd_anderson_mix": (rnd(B, D), rnd(B, D), rnd(m, B, D), G, gram, active, 2, 3, 1e-4),
        "bwd_broyden_step": (rnd(B, D), rnd(B, D), rnd(B, D), rnd(B, D), rnd(m, B, D),
                             rnd(m, B, D), active, 2, 2),
        "bwd_gmres_start": (rnd(B, D), active, Q.clone(), s.clone(), kdim.clone(),
                            torch.zeros(B, dtype=torch.bool)),
        "bwd_gmres_arnoldi": (rnd(B, D), Q.clone(), R.clone(), torch.zeros(B, m, dtype=torch.float64),
                              torch.zeros(B, m, dtype=torch.float64), s.clone(),
                              kdim.clone(), active.clone(), ign, 0, 1e-3),
        "bwd_gmres_update": (rnd(B, D), rnd(m + 1, B, D), R, s, kdim),
    }


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", OP_NAMES)
def test_opcheck(name, dtype):
    assert bw._cpp_module() is not None, extension.extension_status()[1]
    args = _op_samples(dtype)[name]
    torch.library.opcheck(getattr(torch.ops.deq_fast, name).default, args)


_REFERENCE_OPS = {name: getattr(bwd_ops, f"{name}_reference") for name in bwd_ops.OP_NAMES}


@needs_ext
@pytest.mark.parametrize("name", sorted(_REFERENCE_OPS))
def test_op_matches_python_reference(name):
    assert bw._cpp_module() is not None, extension.extension_status()[1]
    args_c = _op_samples(torch.float64)[name]
    args_p = tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args_c)
    getattr(torch.ops.deq_fast, name)(*args_c)
    _REFERENCE_OPS[name](*args_p)
    for a, b in zip(args_c, args_p):
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_every_op_has_cpu_and_cuda_registration_in_source():
    """The CUDA build check (.ci/cuda_build_check.sh) asserts the registered CUDA kernels; this
    cheap check keeps the op list, the schemas and both registrations in step."""
    from deq_fast.ops import table
    csrc = Path(__file__).resolve().parents[2] / "csrc"
    schemas = (csrc / "ops.cpp").read_text()
    cpp = (csrc / "cpu" / "backward_ops.cpp").read_text()
    cu = (csrc / "cuda" / "backward_ops.cu").read_text()
    names = [s.name for s in table.OPS if s.name.startswith("bwd_")]
    assert sorted(names) == sorted(OP_NAMES)
    for name in names:
        assert f'm.def("{name}(' in schemas and f'm.impl("{name}", &{name}_cpu)' in cpp
        assert f'm.impl("{name}", &{name}_cuda)' in cu


# ---------------------------------------------------------------------------------------------
# one Anderson least-squares reference for forward and backward
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("n,newest", [(1, 0), (3, 2), (4, 1)], ids=["n1", "n3-new2", "n4-new1"])
def test_backward_anderson_alpha_is_the_forward_reference(n, newest):
    from deq_fast.ops.lstsq import anderson_lstsq_reference
    gen = torch.Generator().manual_seed(n)
    G = torch.randn(5, n, 13, generator=gen, dtype=torch.float64)
    gram = G @ G.transpose(1, 2)
    torch.testing.assert_close(bwd_ops.anderson_alpha(gram, 1e-4, newest),
                               anderson_lstsq_reference(gram, n, newest, 1e-4, True),
                               rtol=0, atol=0)


def test_backward_anderson_degenerate_gram_is_one_hot_at_newest():
    """An all-zero Gram matrix (every stored residual zero) mixes one-hot at the newest entry, as
    the forward Anderson does (it used to give uniform weights in the backward)."""
    gram = torch.zeros(2, 3, 3, dtype=torch.float64)
    gram[1] = torch.eye(3, dtype=torch.float64)           # a regular sample next to it
    alpha = bwd_ops.anderson_alpha(gram, 1e-4, 2)
    assert alpha[0].tolist() == [0.0, 0.0, 1.0]
    torch.testing.assert_close(alpha[1], torch.full((3,), 1 / 3, dtype=torch.float64))
    # through the mixing step: x becomes F[newest] = x + r of the newest slot
    B, D, m = 2, 4, 3
    x, r = torch.randn(B, D, dtype=torch.float64), torch.zeros(B, D, dtype=torch.float64)
    F, G = torch.randn(m, B, D, dtype=torch.float64), torch.zeros(m, B, D, dtype=torch.float64)
    gram = torch.zeros(B, m, m, dtype=torch.float64)
    x_before = x.clone()
    bwd_ops.bwd_anderson_mix_reference(x, r, F, G, gram, torch.ones(B, dtype=torch.bool), 1, 3,
                                       1e-4)
    torch.testing.assert_close(x, x_before)               # F[1] = x + 0, one-hot at slot 1


def test_backend_vocabulary_is_shared_with_the_forward(monkeypatch):
    """One vocabulary: ``python`` is the old name of ``reference``; ``$DEQ_FAST_BACKEND`` applies to
    the backward too; ``triton`` (forward only) leaves the backward to ``auto``."""
    W = 0.5 * torch.eye(4, dtype=torch.float64)
    z = torch.zeros(2, 4, dtype=torch.float64, requires_grad=True)
    fz = z @ W.T
    grad = torch.ones(2, 4, dtype=torch.float64)
    assert implicit_backward(fz, z, grad, backend="python")[1]["backend"] == "reference"
    monkeypatch.setenv("DEQ_FAST_BACKEND", "reference")
    assert implicit_backward(fz, z, grad)[1]["backend"] == "reference"
    monkeypatch.setenv("DEQ_FAST_BACKEND", "triton")
    expected = "cpp" if extension.available() else "reference"
    assert implicit_backward(fz, z, grad)[1]["backend"] == expected
    with pytest.raises(ValueError, match="backend must be one of"):
        implicit_backward(fz, z, grad, backend="cuda")


# ---------------------------------------------------------------------------------------------
# GMRES's Arnoldi step: classical Gram-Schmidt applied twice (one formula in the Python reference,
# the CPU op and the CUDA kernel) against modified Gram-Schmidt on an ill-conditioned Krylov basis
# ---------------------------------------------------------------------------------------------
def _mgs_project(w, Q):
    """Modified Gram-Schmidt (the previous formula): one column at a time."""
    w, hs = w.double(), []
    for c in range(Q.shape[0]):
        hc = (w * Q[c].double()).sum(1)
        hs.append(hc)
        w = w - hc[:, None] * Q[c].double()
    return w, torch.stack(hs, 1)


def _arnoldi_run(step, A, r, k):
    """k Arnoldi steps of A = I - J^T (jtq = q - A q) from r; returns Q and s."""
    B, D = r.shape
    dopt = {"dtype": torch.float64}
    Q, R = torch.zeros(k + 1, B, D, **dopt), torch.zeros(B, k, k + 1, **dopt)
    cs, sn, s = torch.zeros(B, k, **dopt), torch.zeros(B, k, **dopt), torch.zeros(B, k + 1, **dopt)
    kdim, cyc = torch.zeros(B, dtype=torch.long), torch.zeros(B, dtype=torch.bool)
    bwd_ops.bwd_gmres_start_reference(r, torch.ones(B, dtype=torch.bool), Q, s, kdim, cyc)
    for j in range(k):
        step(Q[j] - Q[j] @ A.T, Q, R, cs, sn, s, kdim, cyc, torch.ones(B, **dopt), j, 0.0)
    assert kdim.tolist() == [k] * B
    return Q, s


def _loss_of_orthogonality(Q):
    eye = torch.eye(Q.shape[0], dtype=torch.float64)
    return (torch.einsum("cbd,ebd->bce", Q, Q) - eye).abs().max().item()


_ARNOLDI_STEPS = [pytest.param(bwd_ops.bwd_gmres_arnoldi_reference, id="reference"),
                  pytest.param(lambda *a: torch.ops.deq_fast.bwd_gmres_arnoldi(*a), id="cpp",
                               marks=needs_ext)]


@pytest.mark.parametrize("step", _ARNOLDI_STEPS)
def test_cgs2_agrees_with_mgs_on_an_ill_conditioned_krylov_basis(step, monkeypatch):
    """A with condition number 1e12: modified Gram-Schmidt's basis loses orthogonality (~1e-9);
    CGS2 keeps it at rounding level, and both give the same basis and residual estimates."""
    gen = torch.Generator().manual_seed(0)
    B, D, k = 2, 48, 30
    U, _ = torch.linalg.qr(torch.randn(D, D, generator=gen, dtype=torch.float64))
    A = U @ torch.diag(torch.logspace(0, -12, D, dtype=torch.float64)) @ U.T
    r = torch.randn(B, D, generator=gen, dtype=torch.float64)
    Q_cgs2, s_cgs2 = _arnoldi_run(step, A, r, k)
    monkeypatch.setattr(bwd_ops, "cgs2_project", _mgs_project)
    Q_mgs, s_mgs = _arnoldi_run(bwd_ops.bwd_gmres_arnoldi_reference, A, r, k)
    assert _loss_of_orthogonality(Q_cgs2) < 1e-14
    assert _loss_of_orthogonality(Q_mgs) > 1e-12  # the basis is ill-conditioned enough to show
    torch.testing.assert_close(Q_cgs2, Q_mgs, rtol=0, atol=1e-7)
    torch.testing.assert_close(s_cgs2, s_mgs, rtol=1e-7, atol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_cgs2_project_is_classical_gram_schmidt_twice(dtype):
    """The reference formula against a plain loop: h = Q^T w, w1 = w - Q h, h2 = Q^T w1,
    w2 = w1 - Q h2, returns (w2, h + h2) in float64."""
    gen = torch.Generator().manual_seed(3)
    Q = torch.linalg.qr(torch.randn(3, 9, 5, generator=gen, dtype=torch.float64))[0]
    Q = Q.permute(2, 0, 1).to(dtype)  # [5, 3, 9]
    w = torch.randn(3, 9, generator=gen, dtype=dtype)
    w2, h = bwd_ops.cgs2_project(w, Q)
    Qd, wd = Q.double(), w.double()
    h1 = torch.stack([(wd * Qd[c]).sum(1) for c in range(5)], 1)
    w1 = wd - sum(h1[:, c, None] * Qd[c] for c in range(5))
    h2 = torch.stack([(w1 * Qd[c]).sum(1) for c in range(5)], 1)
    torch.testing.assert_close(h, h1 + h2, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(w2, w1 - sum(h2[:, c, None] * Qd[c] for c in range(5)),
                               rtol=1e-13, atol=1e-13)
    assert w2.dtype == torch.float64
    assert torch.einsum("cbd,bd->bc", Qd, w2).abs().max() < 1e-12  # orthogonal to the basis


# ---------------------------------------------------------------------------------------------
# argument checks (deq_fast/op_checks.h, shared by the CPU and CUDA kernels): errors name the
# offending argument
# ---------------------------------------------------------------------------------------------
def _bad_args(name, dtype=torch.float64):
    args = list(_op_samples(dtype)[name])
    B, D = 3, 7
    if name == "bwd_gmres_update":   # restart 65 > 64: the CUDA kernels' small arrays
        args[1] = torch.zeros(66, B, D, dtype=dtype)
        args[2] = torch.zeros(B, 65, 66, dtype=torch.float64)
        args[3] = torch.zeros(B, 66, dtype=torch.float64)
        return args, "Q history longer"
    if name == "bwd_gmres_arnoldi":  # cs not [B, restart]
        args[3] = torch.zeros(B, 2, dtype=torch.float64)
        return args, "cs"
    if name == "bwd_track":          # best_x transposed: not contiguous
        args[5] = torch.zeros(D, B, dtype=dtype).t()
        return args, "best_x"
    if name == "bwd_broyden_step":   # r_prev of the wrong dtype
        args[2] = args[2].float()
        return args, "r_prev"
    if name == "bwd_anderson_mix":   # gram of the wrong dtype
        args[4] = args[4].float()
        return args, "gram"
    if name == "bwd_gmres_start":    # kdim int32
        args[4] = args[4].int()
        return args, "kdim"
    args[2] = torch.ones(2, dtype=torch.bool)  # bwd_masked_add: active of the wrong length
    return args, "active"


@needs_ext
@pytest.mark.parametrize("name", OP_NAMES)
def test_op_errors_name_the_argument(name):
    args, arg_name = _bad_args(name)
    with pytest.raises(RuntimeError, match=arg_name):
        getattr(torch.ops.deq_fast, name)(*args)


def test_cuda_and_cpu_ops_share_the_argument_checks():
    """Every CUDA op calls the same check function as its CPU twin (op_checks.h)."""
    csrc = Path(__file__).resolve().parents[2] / "csrc"
    cpp = (csrc / "cpu" / "backward_ops.cpp").read_text()
    cu = (csrc / "cuda" / "backward_ops.cu").read_text()
    for name in OP_NAMES:
        check = f"check_{name.removeprefix('bwd_')}_args("
        assert check in (csrc / "include" / "deq_fast" / "op_checks.h").read_text()
        assert cpp.count(check) == 2 and f"{check}" in cu  # definition + CPU call; CUDA call
        assert "c10::DeviceType::CUDA" in cu.split(check, 1)[1].split(";", 1)[0]
