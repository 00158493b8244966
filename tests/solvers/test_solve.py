"""The native API ``deq_fast.solve``: per-sample semantics, state structures, dtypes, bad input."""
from __future__ import annotations

import pytest
import torch

import deq_fast
from deq_fast.ops import extension, table
from deq_fast.profiling import OpCounter
from deq_fast.solvers.engine import MAIN_PASS
from deq_fast.testing import linear_problem

METHODS = ["anderson", "broyden", "fixed_point"]
# fixed point contracts at rate 0.6 here: it needs more iterations than the accelerated methods
BUDGET = {"anderson": 60, "broyden": 40, "fixed_point": 80}


@pytest.mark.parametrize("method", METHODS)
def test_converges_to_the_fixed_point(method):
    f, z_star = linear_problem(3, 17)
    res = deq_fast.solve(f, torch.zeros(3, 17, dtype=torch.float64), method=method,
                         max_iter=BUDGET[method], tol=1e-10)
    assert res.converged.all() and not res.nonfinite.any()
    torch.testing.assert_close(res.z, z_star, atol=1e-8, rtol=0)
    main_pass = table.OPS_BY_NAME[MAIN_PASS[method]]
    assert res.method == method
    assert res.backend == ("cpp" if table.has_kernel(main_pass, "cpu") else "reference")
    assert res.abs_trace.shape[0] == 3 and res.nfe <= BUDGET[method] + 1


@pytest.mark.parametrize("method", METHODS)
def test_a_sample_does_not_depend_on_the_batch(method):
    """Per-sample norms and stopping: solving a sample alone gives the same answer and step."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(12, 12, generator=g, dtype=torch.float64) / 12 ** 0.5 * 0.7
    scales = torch.tensor([0.01, 1, 3, 0.1, 10.0]).double()   # float32 values, as before
    b = torch.randn(5, 12, generator=g, dtype=torch.float64) * scales[:, None]
    f = lambda z: torch.tanh(z @ W.T + b[: z.shape[0]] if z.shape[0] == 5 else z @ W.T + b[2:3])  # noqa: E731
    full = deq_fast.solve(f, torch.zeros(5, 12, dtype=torch.float64), method=method, tol=1e-6, max_iter=60)
    alone = deq_fast.solve(f, torch.zeros(1, 12, dtype=torch.float64), method=method, tol=1e-6, max_iter=60)
    torch.testing.assert_close(full.z[2:3], alone.z, atol=1e-12, rtol=0)
    assert full.nstep[2] == alone.nstep[0]


def test_tuple_state_of_different_shapes():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(2, 3, 8, 8, generator=g, dtype=torch.float64)
    Bt = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)

    def f(state):
        a, b = state
        return (0.5 * torch.tanh(a) + A + 0.1 * b.mean(), 0.3 * b + Bt)
    res = deq_fast.solve(f, (torch.zeros(2, 3, 8, 8, dtype=torch.float64),
                             torch.zeros(2, 5, 4, dtype=torch.float64)), method="broyden", tol=1e-10)
    assert isinstance(res.z, tuple) and res.z[0].shape == (2, 3, 8, 8) and res.z[1].shape == (2, 5, 4)
    fa, fb = f(res.z)
    torch.testing.assert_close(fa, res.z[0], atol=1e-8, rtol=0)
    torch.testing.assert_close(fb, res.z[1], atol=1e-8, rtol=0)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3), (torch.bfloat16, 2e-2)],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("method", METHODS)
def test_low_precision_states(method, dtype, tol):
    """TorchDEQ's Anderson fails for half states (no half LU); small solves here run in fp32."""
    f, z_star = linear_problem(2, 24, radius=0.5, dtype=dtype)
    res = deq_fast.solve(f, torch.zeros(2, 24, dtype=dtype), method=method, tol=tol / 10, max_iter=40)
    assert res.z.dtype == dtype and res.abs_lowest.dtype == torch.float32
    err = (res.z.double() - z_star).norm(dim=1) / z_star.norm(dim=1)
    assert (err < 10 * tol).all(), err


@pytest.mark.parametrize("method", METHODS)
def test_nonfinite_sample_keeps_best_finite_iterate(method):
    """f turns NaN for sample 1 after a few evaluations: that sample keeps its best finite
    iterate and is flagged; the others are unaffected; nothing raises."""
    f0, z_star = linear_problem(3, 10)
    calls = [0]

    def f(z):
        calls[0] += 1
        out = f0(z)
        if calls[0] >= 4:
            out[1] = float("nan")
        return out
    res = deq_fast.solve(f, torch.zeros(3, 10, dtype=torch.float64), method=method, tol=1e-10,
                         max_iter=BUDGET[method])
    assert torch.isfinite(res.z).all()
    assert res.nonfinite.tolist() == [False, True, False]
    assert not res.converged[1]
    torch.testing.assert_close(res.z[[0, 2]], z_star[[0, 2]], atol=1e-8, rtol=0)


@pytest.mark.parametrize("method", METHODS)
def test_fixed_iteration_count_makes_no_host_sync(method):
    f, _ = linear_problem(2, 8)
    counter = OpCounter()
    with counter:
        res = deq_fast.solve(counter.exclude(f), torch.zeros(2, 8, dtype=torch.float64), method=method,
                             max_iter=30, tol=1e-30, check_every=0)
    assert counter.syncs == 0
    assert res.nfe == 30 + (method == "broyden")


def test_broyden_factors_satisfy_the_secant_condition():
    """The returned factors are the solver's inverse-Jacobian estimate H = -I + U^T V (per sample,
    on the flattened state): the last Broyden update makes H (g_3 - g_2) = x_3 - x_2 exactly."""
    f0, _ = linear_problem(2, 6, radius=0.5)
    seen = []
    f = lambda z: seen.append(z.clone()) or torch.tanh(f0(z))      # noqa: E731
    res = deq_fast.solve(f, torch.zeros(2, 6, dtype=torch.float64), method="broyden", max_iter=4,
                         tol=0.0, check_every=0)
    U, V = res.factors
    assert U.shape == V.shape == (2, 3, 6)                     # updates after evaluations 1, 2, 3
    x = torch.stack(seen)                                        # evaluations 0..4
    g = torch.tanh(f0(x)) - x
    dx, dg = x[3] - x[2], g[3] - g[2]
    H_dg = -dg + torch.einsum("bld,bl->bd", U, torch.einsum("bld,bd->bl", V, dg))
    torch.testing.assert_close(H_dg, dx, atol=1e-10, rtol=1e-8)
    assert torch.isfinite(U).all() and torch.isfinite(V).all()


def test_scaled_ridge_keeps_anderson_fast_at_tight_tolerance():
    """docs/contracts.md#torchdeq-solvers: with five eigenvalues in [0.9, 0.95] and rel tol 1e-8
    (float64), TorchDEQ's
    absolute ridge swamps the shrinking Gram matrix and Anderson stalls; ours is relative."""
    g = torch.Generator().manual_seed(2)
    Q, _ = torch.linalg.qr(torch.randn(30, 30, generator=g, dtype=torch.float64))
    lam = torch.zeros(30, dtype=torch.float64)
    lam[:5] = torch.linspace(0.9, 0.95, 5, dtype=torch.float64)
    A = Q @ torch.diag(lam) @ Q.T
    c = torch.randn(1, 30, generator=g, dtype=torch.float64)
    f = lambda z: z @ A.T + c                                   # noqa: E731
    x0 = torch.zeros(1, 30, dtype=torch.float64)
    ours = deq_fast.solve(f, x0, tol=1e-8, max_iter=600)
    _, _, theirs = deq_fast.anderson_solver(f, x0, max_iter=600, tol=1e-8, stop_mode="rel")
    assert ours.converged.all() and ours.nstep[0] <= 60, ours.nstep
    assert theirs["rel_lowest"][0] > 1e-8 or theirs["nstep"][0] > 4 * ours.nstep[0]


@pytest.mark.parametrize("bad,match", [
    (dict(method="newton"), "method"), (dict(m=0), "m must"), (dict(tol=-1.0), "tol must"),
    (dict(stop_mode="max"), "stop_mode"), (dict(max_iter=-3), "max_iter"), (dict(tau=0.0), "tau"),
    (dict(check_every=-1), "check_every"), (dict(memory=0), "memory"), (dict(backend="cuda"), "backend"),
])
def test_bad_arguments_name_themselves(bad, match):
    with pytest.raises(ValueError, match=match):
        deq_fast.solve(lambda z: z, torch.zeros(2, 3), **bad)


def test_bad_states_and_maps():
    with pytest.raises(ValueError, match="floating"):
        deq_fast.solve(lambda z: z, torch.zeros(2, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match=r"f returned shapes \[\(2, 4\)\]"):
        deq_fast.solve(lambda z: torch.zeros(2, 4), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="f returned dtype torch.int64"):
        deq_fast.solve(lambda z: z.long(), torch.zeros(2, 3))
    with pytest.raises(ValueError, match="callable"):
        deq_fast.solve(None, torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"x0\[1\]"):
        deq_fast.solve(lambda z: z, (torch.zeros(2, 3), torch.zeros(3, 3)))


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("max_iter", [0, 1, 2])
def test_tiny_budgets_are_defined(method, max_iter):
    f, _ = linear_problem(2, 5)
    x0 = torch.zeros(2, 5, dtype=torch.float64)
    res = deq_fast.solve(f, x0, method=method, max_iter=max_iter)
    assert torch.isfinite(res.z).all() and res.z.shape == x0.shape
    for name in ("anderson_solver", "broyden_solver", "fixed_point_iter"):
        z, _, info = getattr(deq_fast, name)(f, x0, max_iter=max_iter)
        assert torch.isfinite(z).all()


def test_forced_triton_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="triton"):
        deq_fast.solve(lambda z: 0.5 * z, torch.zeros(2, 3), backend="triton")


def test_stopped_samples_keep_finite_broyden_factors():
    """After a sample stops, its steps are zero; the update of a zero step would be 0/0. Its
    factors must stay as they were (finite), since the backward pass may reuse them."""
    f, _ = linear_problem(2, 6, radius=0.5)
    res = deq_fast.solve(f, torch.zeros(2, 6, dtype=torch.float64), method="broyden", max_iter=40, tol=1e-12,
                         check_every=4)          # stopped samples iterate on until the next look
    assert res.converged.all() and res.nfe > res.nstep.max() + 1
    assert torch.isfinite(res.factors[0]).all() and torch.isfinite(res.factors[1]).all()


@pytest.mark.parametrize("method", METHODS)
def test_backend_names_what_ran(method, monkeypatch):
    """One vocabulary (reference | cpp | triton); the result reports what ran, and the old names
    (``torch``, ``DEQ_FAST_NO_EXT=1``) keep working."""
    f, _ = linear_problem(2, 6)
    x0 = torch.zeros(2, 6, dtype=torch.float64)
    assert deq_fast.solve(f, x0, method=method, backend="reference").backend == "reference"
    cpp = deq_fast.solve(f, x0, method=method, backend="cpp")
    has = table.has_kernel(table.OPS_BY_NAME[MAIN_PASS[method]], "cpu")
    assert cpp.backend == ("cpp" if has else "reference")
    assert deq_fast.solve(f, x0, method=method, backend="torch").backend == cpp.backend
    torch.testing.assert_close(cpp.z, deq_fast.solve(f, x0, method=method, backend="reference").z,
                               atol=1e-10, rtol=0)
    monkeypatch.setenv("DEQ_FAST_NO_EXT", "1")
    assert deq_fast.solve(f, x0, method=method).backend == "reference"
    with pytest.raises(RuntimeError, match="backend 'cpp' was forced"):
        deq_fast.solve(f, x0, method=method, backend="cpp")


def _fixed_point_oracle(f, x0, max_iter, tol, tau):
    """The damped fixed-point iteration written out per sample, with the best copy taken in the
    iteration that found it and a sample frozen before its step once it stops: ``(z, nstep,
    rel_trace)`` (stop mode ``'rel'``)."""
    x, z = x0.clone(), x0.clone()
    B = x0.shape[0]
    lowest, nstep = [1e8] * B, [0.0] * B
    active, trace = [True] * B, torch.empty(B, max_iter, dtype=x0.dtype)
    for k in range(max_iter):
        fx = f(x)
        y = tau * fx + (1 - tau) * x
        for b in range(B):
            rel = float((y[b] - x[b]).norm() / (y[b].norm() + 1e-9))
            if active[b] and rel < lowest[b]:
                lowest[b], nstep[b], z[b] = rel, k + 1.0, y[b]
            trace[b, k] = rel if active[b] else lowest[b]
            active[b] = active[b] and rel >= tol
            if active[b]:
                x[b] = y[b]
    return z, torch.tensor(nstep, dtype=x0.dtype), trace


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("tau", [1.0, 0.7])
def test_fixed_point_deferred_best_copy_equals_the_plain_iteration(backend, tau):
    """The fused pass copies the best iterate one iteration late (and the stopping iteration's step
    is taken): samples stopping at different iterations, the host looking every 4 evaluations,
    still return the iterate, step and trace of the plain per-sample iteration."""
    if backend == "cpp" and not extension.available():
        pytest.skip("the C++ CPU kernels are not built")
    g = torch.Generator().manual_seed(11)
    W = torch.randn(40, 40, generator=g, dtype=torch.float64) / 40 ** 0.5 * 0.8
    b = torch.randn(6, 40, generator=g, dtype=torch.float64) * torch.logspace(-3, 1, 6)[:, None].double()
    x0 = torch.randn(6, 40, generator=g, dtype=torch.float64)

    def f(z):
        return torch.tanh(z @ W.T + b)

    res = deq_fast.solve(f, x0, method="fixed_point", max_iter=40, tol=1e-5, tau=tau,
                         check_every=4, backend=backend)
    z, nstep, trace = _fixed_point_oracle(f, x0, 40, 1e-5, tau)
    assert len(set(nstep.tolist())) > 2                 # samples stop at different iterations
    torch.testing.assert_close(res.z, z, atol=1e-12, rtol=0)
    assert res.nstep.tolist() == nstep.tolist()
    torch.testing.assert_close(res.rel_trace, trace, atol=1e-12, rtol=1e-10)


@pytest.mark.skipif(not extension.available(), reason="the C++ CPU kernels are not built")
@pytest.mark.parametrize("tau", [1.0, 0.6])
def test_fixed_point_iteration_is_two_ops(tau):
    """C++ path: the fused step and the bookkeeping, nothing else (damping included)."""
    from deq_fast.profiling import per_iteration
    f, _ = linear_problem(3, 40)
    x0 = torch.zeros(3, 40, dtype=torch.float64)
    ops, syncs, _ = per_iteration(lambda fc, n: deq_fast.solve(
        fc, x0, method="fixed_point", max_iter=n, tol=0.0, tau=tau, check_every=0), f)
    assert (ops, syncs) == (2.0, 0.0)


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("stop_together", [False, True])
def test_fixed_point_indexed_copies_and_nan_sample_see_the_deferred_best(backend, stop_together):
    """The estimates the engine keeps at ``indexing`` (TorchDEQ's indexing core reads them
    mid-solve) equal the best of a solve stopped at that evaluation count, though the best copy is
    deferred by one pass; a sample whose ``f`` turns NaN keeps its best finite iterate."""
    if backend == "cpp" and not extension.available():
        pytest.skip("the C++ CPU kernels are not built")
    from deq_fast.solvers import engine
    g = torch.Generator().manual_seed(5)
    W = torch.randn(24, 24, generator=g, dtype=torch.float64) / 24 ** 0.5 * 0.9
    x0 = torch.randn(4, 24, generator=g, dtype=torch.float64)

    def run(max_iter, indexing=()):
        calls = [0]

        def f(z):
            calls[0] += 1
            out = torch.tanh(z @ W.T + 1.0)
            if calls[0] > 4:                              # sample 2: NaN from the 5th evaluation
                out[2] = float("nan")
            return out

        return engine.run(f, x0, engine.Options(
            method="fixed_point", max_iter=max_iter, tol=1e-30, tau=0.8, backend=backend,
            indexing=indexing, stop_together=stop_together))

    st = run(12, indexing=(3, 7, 12))
    assert len(st.index_list) == 3
    for k, kept in zip((3, 7, 12), st.index_list):
        torch.testing.assert_close(kept, run(k).best, atol=0, rtol=0)
    assert torch.isfinite(st.best).all()
    torch.testing.assert_close(st.best[2], run(4).best[2], atol=0, rtol=0)
    assert not torch.equal(st.best[0], run(4).best[0])
