"""The locuslab/deq-style API against an oracle written from the original's formulas.

The oracle below is a direct, unfused restatement of docs/contracts.md#locuslabdeq-solvers
(whole-batch norms, bordered
least squares solved with ``torch.linalg.solve`` in float64, ``.item()`` every iteration, the
original's stop rules and trace padding). It is independent of the engine: no shared code.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

import deq_fast
from deq_fast.compat import locuslab
from deq_fast.profiling import per_iteration
from deq_fast.solvers import engine
from deq_fast.testing import contraction


def oracle_anderson(f, x0, m=6, lam=1e-4, threshold=50, eps=1e-3, stop_mode="rel", beta=1.0):
    B = x0.shape[0]
    flat = lambda t: t.reshape(B, -1)                      # noqa: E731
    X, F = [flat(x0)], [flat(f(x0))]
    X.append(F[0])
    F.append(flat(f(F[0].reshape(x0.shape))))
    traces = {"abs": [], "rel": []}
    lowest = {"abs": 1e8, "rel": 1e8}
    step = {"abs": 0, "rel": 0}
    best = None
    for k in range(2, threshold):
        n = min(k, m)
        Xs, Fs = torch.stack(X[-n:], 1), torch.stack(F[-n:], 1)           # newest n, any order works
        G = (Fs - Xs).double()
        H = torch.zeros(B, n + 1, n + 1, dtype=torch.float64)
        H[:, 0, 1:] = H[:, 1:, 0] = 1
        H[:, 1:, 1:] = G @ G.transpose(1, 2) + lam * torch.eye(n, dtype=torch.float64)
        rhs = torch.zeros(B, n + 1, 1, dtype=torch.float64)
        rhs[:, 0] = 1
        alpha = torch.linalg.solve(H, rhs)[:, 1:, 0].to(x0.dtype)
        x = beta * (alpha[:, None] @ Fs)[:, 0] + (1 - beta) * (alpha[:, None] @ Xs)[:, 0]
        fx = flat(f(x.reshape(x0.shape)))
        X.append(x)
        F.append(fx)
        a = (fx - x).norm().item()
        vals = {"abs": a, "rel": a / (1e-5 + fx.norm().item())}
        for mode in ("rel", "abs"):
            traces[mode].append(vals[mode])
            if vals[mode] < lowest[mode]:
                if mode == stop_mode:
                    best = x.reshape(x0.shape).clone()
                lowest[mode], step[mode] = vals[mode], k
        if vals[stop_mode] < eps:
            for mode in ("rel", "abs"):
                traces[mode] += [lowest[mode]] * (threshold - 1 - k)
            break
    return {"result": best, "lowest": lowest[stop_mode], "nstep": step[stop_mode],
            "prot_break": False, "abs_trace": traces["abs"], "rel_trace": traces["rel"],
            "eps": eps, "threshold": threshold}


def oracle_armijo(phi, phi0, c1=1e-4, amin=1e-2):
    """scipy's scalar_search_armijo as the original uses it (derphi0 = -phi0), restated."""
    d0 = -phi0
    a0, p0 = 1.0, phi(1.0)
    if p0 <= phi0 + c1 * a0 * d0:
        return a0
    a1 = -d0 * a0 ** 2 / 2.0 / (p0 - phi0 - d0 * a0)
    p1 = phi(a1)
    while a1 > amin:
        fac = a0 ** 2 * a1 ** 2 * (a1 - a0)
        a = (a0 ** 2 * (p1 - phi0 - d0 * a1) - a1 ** 2 * (p0 - phi0 - d0 * a0)) / fac
        b = (-a0 ** 3 * (p1 - phi0 - d0 * a1) + a1 ** 3 * (p0 - phi0 - d0 * a0)) / fac
        a2 = (-b + math.sqrt(abs(b ** 2 - 3 * a * d0))) / (3.0 * a)
        p2 = phi(a2)
        if p2 <= phi0 + c1 * a2 * d0:
            return a2
        if (a1 - a2) > a1 / 2.0 or (1 - a2 / a1) < 0.96:
            a2 = a1 / 2.0
        a0, a1, p0, p1 = a1, a2, p1, p2
    return None


def oracle_broyden(f, x0, threshold, eps=1e-3, stop_mode="rel", ls=False):
    B = x0.shape[0]
    flat = lambda t: t.reshape(B, -1)                      # noqa: E731
    g = lambda y: flat(f(y.reshape(x0.shape))) - y          # noqa: E731
    x = flat(x0)
    gx = g(x)
    Us, VTs = [], []                                        # H = -I + sum u v^T

    def H(y):
        out = -y
        for u, v in zip(Us, VTs):
            out = out + u * (v * y).sum(1, keepdim=True)
        return out

    def HT(y):
        out = -y
        for u, v in zip(Us, VTs):
            out = out + v * (u * y).sum(1, keepdim=True)
        return out

    update = -H(gx)
    protect = (1e6 if stop_mode == "abs" else 1e3) * x0.shape[-1]
    traces = {"abs": [], "rel": []}
    lowest = {"abs": 1e8, "rel": 1e8}
    step = {"abs": 0, "rel": 0}
    best, prot, nstep = x0, False, 0
    while nstep < threshold:
        s_ok = 1.0
        if ls:
            seen = {}

            def phi(s):
                seen[s] = g(x + s * update)
                return seen[s].norm().item() ** 2
            s_ok = oracle_armijo(phi, gx.norm().item() ** 2) or 1.0
        x_new = x + s_ok * update
        g_new = seen[s_ok] if ls and s_ok in seen else g(x_new)
        dx, dg = x_new - x, g_new - gx
        x, gx = x_new, g_new
        nstep += 1
        a = gx.norm().item()
        vals = {"abs": a, "rel": a / ((gx + x).norm().item() + 1e-9)}
        for mode in ("rel", "abs"):
            traces[mode].append(vals[mode])
            if vals[mode] < lowest[mode]:
                if mode == stop_mode:
                    best = x.reshape(x0.shape).clone()
                lowest[mode], step[mode] = vals[mode], nstep
        obj = vals[stop_mode]
        tr = traces[stop_mode]
        if obj < eps:
            break
        if obj < 3 * eps and nstep > 30 and max(tr[-30:]) / min(tr[-30:]) < 1.3:
            break
        if obj > tr[0] * protect:
            prot = True
            break
        vT = HT(dx)
        u = (dx - H(dg)) / (vT * dg).sum(1, keepdim=True)
        Us.append(torch.nan_to_num(u, nan=0.0, posinf=math.inf, neginf=-math.inf))
        VTs.append(torch.nan_to_num(vT, nan=0.0, posinf=math.inf, neginf=-math.inf))
        update = -H(gx)
    for mode in ("rel", "abs"):
        traces[mode] += [lowest[mode]] * (threshold + 1 - len(traces[mode]))
    return {"result": best, "lowest": lowest[stop_mode], "nstep": step[stop_mode],
            "prot_break": prot, "abs_trace": traces["abs"], "rel_trace": traces["rel"],
            "eps": eps, "threshold": threshold}


def assert_same_dict(ours, ref, atol=1e-4):
    assert set(ours) == set(ref)
    assert isinstance(ours["lowest"], float) and isinstance(ours["nstep"], int)
    assert isinstance(ours["prot_break"], bool)
    assert all(isinstance(v, float) for v in ours["abs_trace"] + ours["rel_trace"])
    assert ours["result"].shape == ref["result"].shape
    torch.testing.assert_close(ours["result"], ref["result"], atol=atol, rtol=0)
    assert ours["lowest"] == pytest.approx(ref["lowest"], abs=atol)
    assert ours["nstep"] == ref["nstep"]
    assert ours["prot_break"] == ref["prot_break"]
    assert len(ours["abs_trace"]) == len(ref["abs_trace"])
    for key in ("abs_trace", "rel_trace"):
        torch.testing.assert_close(torch.tensor(ours[key]), torch.tensor(ref[key]), atol=atol, rtol=1e-4)
    assert (ours["eps"], ours["threshold"]) == (ref["eps"], ref["threshold"])


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("shape", [(3, 6, 7), (1, 5, 3), (4, 9), (2, 3, 4, 5)], ids=["3d", "B1", "2d", "4d"])
@pytest.mark.parametrize("opts", [dict(threshold=30, eps=1e-5), dict(threshold=40, eps=1e-3, m=3, lam=1e-3),
                                  dict(threshold=25, eps=1e-4, beta=0.8)], ids=["default", "m3", "beta"])
def test_anderson_matches_original(stop_mode, shape, opts):
    f = contraction(shape, radius=0.85, seed=len(shape))
    x0 = torch.zeros(shape)
    assert_same_dict(deq_fast.anderson(f, x0, stop_mode=stop_mode, **opts),
                     oracle_anderson(f, x0, stop_mode=stop_mode, **opts))


@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("shape", [(3, 6, 7), (1, 5, 3), (4, 9)], ids=["3d", "B1", "2d"])
@pytest.mark.parametrize("threshold,eps", [(30, 1e-5), (40, 1e-3), (12, 1e-9)])
def test_broyden_matches_original(stop_mode, shape, threshold, eps):
    f = contraction(shape, radius=0.85, seed=len(shape) + 7)
    x0 = torch.zeros(shape)
    assert_same_dict(deq_fast.broyden(f, x0, threshold, eps=eps, stop_mode=stop_mode),
                     oracle_broyden(f, x0, threshold, eps=eps, stop_mode=stop_mode))


@pytest.fixture(params=["host", "device"])
def breaks_on(request, monkeypatch):
    """Broyden's extra breaks evaluated by the host (CPU default) or by device ops (other
    devices' path, forced here on the CPU)."""
    monkeypatch.setattr(locuslab, "_BroydenBreaks", functools.partial(
        locuslab._BroydenBreaks, on_host=request.param == "host"))
    return request.param


def test_broyden_protective_break(breaks_on):
    """A map that blows up trips the protective break like the original."""
    def exploding():
        calls = [0]

        def f(z):   # a well-behaved map whose fourth evaluation jumps by 1e12
            calls[0] += 1
            return 0.5 * torch.tanh(z) + (1e12 if calls[0] == 4 else 1.0)
        return f
    x0 = torch.zeros(2, 3, 4)
    ours = deq_fast.broyden(exploding(), x0, 30, eps=1e-9, stop_mode="abs")
    ref = oracle_broyden(exploding(), x0, 30, eps=1e-9, stop_mode="abs")
    assert ref["prot_break"] is True
    assert_same_dict(ours, ref, atol=1e-3)


def _breaks_after(objectives: list, step: int, on_host: bool, eps: float = 1e-3,
                  protect: float = 1e3):
    """(still active, prot_break) after the rules look at ``objectives[-1]`` at Broyden ``step``."""
    B, T = 2, len(objectives)
    trace = torch.zeros(T + 3, B, 2)
    trace[:T, 0, 1] = torch.tensor(objectives)
    st = engine.EngineState(best=torch.zeros(B, 1), lowest=torch.zeros(B, 2),
                            best_step=torch.zeros(B, 2), trace=trace,
                            active=torch.full((B,), not objectives[-1] < eps))
    rules = locuslab._BroydenBreaks(eps, 1, protect, trace.device, on_host=on_host)
    rules(st, T - 1, step)
    return bool(st.active.all()), bool(rules.prot)


@pytest.mark.parametrize("case,objectives,step,expected", [
    ("progressing", [1.0] + [2.9e-3 * 0.98 ** k for k in range(30)], 31, (True, False)),
    ("stalled", [1.0] + [2e-3 * (1 + 0.01 * (-1) ** k) for k in range(30)], 31, (False, False)),
    ("stalled-early", [1.0] + [2e-3] * 29, 30, (True, False)),
    ("stalled-above-3eps", [1.0] + [4e-3] * 30, 31, (True, False)),
    ("nan-in-window", [1.0] + [2e-3] * 15 + [math.nan] + [2e-3] * 14, 31, (True, False)),
    ("blowup", [1.0, 0.5, 2e3], 3, (False, True)),
    ("blowup-nan", [1.0, 0.5, math.nan], 3, (True, False)),
    ("converged", [1.0, 0.5, 1e-4], 3, (False, False)),
])
def test_broyden_breaks_host_and_device_agree(case, objectives, step, expected):
    """The original's no-progress and protective breaks, on chosen traces: the host rules (NumPy
    views, no op) and the device rules (small ops) decide the same, as the original would."""
    assert _breaks_after(objectives, step, on_host=True) == expected
    assert _breaks_after(objectives, step, on_host=False) == expected


@pytest.mark.parametrize("method", ["anderson", "broyden"])
def test_locuslab_api_costs_what_solve_costs(method):
    """The locuslab API adds no dispatched op per iteration to the native solve's (its traces and
    breaks come from the engine's buffers), on the CPU where the host reads them for free."""
    f = contraction((3, 40), radius=0.85)
    x0 = torch.zeros(3, 40)
    locus = getattr(deq_fast, method)
    iters = (32, 42)                   # past step 30, where Broyden's no-progress rule looks
    loc_ops = per_iteration(lambda fc, n: locus(fc, x0, threshold=n, eps=0.0), f, iters)[0]
    native_ops = per_iteration(
        lambda fc, n: deq_fast.solve(fc, x0, method=method, max_iter=n, tol=0.0), f, iters)[0]
    assert loc_ops == native_ops


@pytest.mark.parametrize("threshold", [0, 1, 2])
def test_anderson_small_threshold_is_defined(threshold):
    """The original raises UnboundLocalError for threshold <= 2 (deq #26)."""
    f = contraction((2, 5), radius=0.85)
    out = deq_fast.anderson(f, torch.zeros(2, 5), threshold=threshold)
    assert out["abs_trace"] == [] and out["rel_trace"] == []
    assert torch.isfinite(out["result"]).all() and math.isfinite(out["lowest"])


def test_anderson_nan_first_residual_returns_x0():
    """The original raises UnboundLocalError when the first residual is NaN (deq #26)."""
    x0 = torch.randn(2, 5)
    out = deq_fast.anderson(lambda z: torch.full_like(z, float("nan")), x0, threshold=10)
    torch.testing.assert_close(out["result"], x0)
    assert out["lowest"] == 1e8


def test_singular_least_squares_never_raises():
    """A constant map makes every residual equal after one step: G G^T is rank one, and with
    lam=0 singular. The original's LU raises on CUDA (deq #20); we fall back per sample."""
    x0 = torch.zeros(3, 4, 2)
    out = deq_fast.anderson(lambda z: torch.ones_like(z), x0, lam=0.0, threshold=10, eps=1e-8)
    torch.testing.assert_close(out["result"], torch.ones_like(x0))


def test_extra_keywords_follow_the_original():
    f = contraction((2, 4), radius=0.85)
    deq_fast.anderson(f, torch.zeros(2, 4), name="forward")     # the original takes **kwargs
    with pytest.raises(TypeError, match="bogus"):
        deq_fast.broyden(f, torch.zeros(2, 4), 10, bogus=1)     # ... its broyden does not


@pytest.mark.parametrize("radius", [0.85, 1.6], ids=["contractive", "expansive"])
def test_broyden_line_search_matches_original(radius):
    """``ls=True``: the Armijo search with the original's formulas (whole-batch norm, s = 1 first,
    quadratic then cubic backtracking, full step when it fails); float64, same numbers."""
    x0 = torch.zeros(3, 12, dtype=torch.float64)
    g = torch.Generator().manual_seed(7)
    W = (torch.randn(12, 12, generator=g, dtype=torch.float64) / 12 ** 0.5 * radius)
    b = torch.randn(3, 12, generator=g, dtype=torch.float64)
    f64 = lambda z: torch.tanh(z @ W.T + b)                           # noqa: E731
    ours = deq_fast.broyden(f64, x0, 25, eps=1e-12, ls=True)
    ref = oracle_broyden(f64, x0, 25, eps=1e-12, ls=True)
    assert_same_dict(ours, ref, atol=1e-9)


def test_broyden_memory_bound():
    """``memory=L`` bounds the stored factors (deq #28); L >= threshold changes nothing."""
    f = contraction((2, 30), radius=0.85, seed=5)
    x0 = torch.zeros(2, 30)
    full = deq_fast.broyden(f, x0, 20, eps=1e-9)
    same = deq_fast.broyden(f, x0, 20, eps=1e-9, memory=20)
    small = deq_fast.broyden(f, x0, 20, eps=1e-9, memory=3)
    torch.testing.assert_close(full["result"], same["result"])
    assert full["abs_trace"] != small["abs_trace"]
