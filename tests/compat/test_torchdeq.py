"""The TorchDEQ-style API against the installed torchdeq 0.1.0, the numerical oracle."""
from __future__ import annotations

import warnings
import zlib

import pytest
import torch
import torchdeq.solver as torchdeq_solver

import deq_fast
from deq_fast.profiling import OpCounter, per_iteration
from deq_fast.testing import contraction

ATOL = 1e-4
SOLVERS = ["anderson", "broyden", "fixed_point_iter"]


def assert_same(ours, theirs):
    z1, idx1, info1 = ours
    z2, idx2, info2 = theirs
    assert z1.shape == z2.shape and z1.dtype == z2.dtype
    torch.testing.assert_close(z1, z2, atol=ATOL, rtol=0)
    assert len(idx1) == len(idx2)
    for a, b in zip(idx1, idx2):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    for key in ("abs_lowest", "rel_lowest", "abs_trace", "rel_trace", "nstep"):
        assert info1[key].shape == info2[key].shape, key
    for key in ("abs_lowest", "rel_lowest", "abs_trace", "rel_trace"):
        torch.testing.assert_close(info1[key].float(), info2[key].float(), atol=ATOL, rtol=1e-4,
                                   msg=key)
    # the step of the lowest residual is well defined only above the float32 noise floor, where
    # a residual of ~1e-6 can be lowest at one step or the next by rounding alone
    clear = torch.minimum(info1["abs_lowest"], info2["abs_lowest"]) > 1e-5
    assert torch.equal(info1["nstep"][clear].float(), info2["nstep"][clear].float())


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
@pytest.mark.parametrize("shape", [(4, 50), (1, 7), (3, 2, 5, 3), (6,)], ids=["B4-D50", "B1-D7", "4d", "1d"])
def test_matches_torchdeq(name, stop_mode, shape):
    f = contraction(shape, seed=zlib.crc32(repr((name, stop_mode, shape)).encode()) % 1000)
    x0 = torch.zeros(shape)
    kw = dict(max_iter=30, tol=1e-5, stop_mode=stop_mode)
    assert_same(deq_fast.get_solver(name)(f, x0, **kw), torchdeq_solver.get_solver(name)(f, x0, **kw))


@pytest.mark.parametrize("name,options", [
    ("anderson", dict(m=3, lam=1e-3)),
    ("anderson", dict(m=8, tau=0.7)),
    ("anderson", dict(return_final=True)),
    ("anderson", dict(indexing=[5, 12, 29])),
    ("anderson", dict(max_iter=12, tol=1e-2)),
    ("broyden", dict(LBFGS_thres=7)),
    ("broyden", dict(return_final=True, max_iter=20)),
    ("broyden", dict(indexing=[3, 10])),
    ("broyden", dict(max_iter=45, tol=1e-9)),
    ("fixed_point_iter", dict(tau=0.6)),
    ("fixed_point_iter", dict(return_final=True)),
    ("fixed_point_iter", dict(indexing=[2, 40], tol=1e-2)),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={v[k]}" for k in v))
def test_matches_torchdeq_options(name, options):
    f = contraction((5, 33), radius=0.9, seed=len(str(options)))
    x0 = torch.randn(5, 33, generator=torch.Generator().manual_seed(1))
    kw = dict(max_iter=40, tol=1e-5, stop_mode="abs")
    kw.update(options)
    assert_same(deq_fast.get_solver(name)(f, x0, **kw), torchdeq_solver.get_solver(name)(f, x0, **kw))


@pytest.mark.parametrize("name,key,values", [
    ("anderson", "lam", (1e-4, 1.0)), ("anderson", "tau", (1.0, 0.5)), ("anderson", "m", (2, 6)),
    ("fixed_point_iter", "tau", (1.0, 0.5)), ("broyden", "LBFGS_thres", (None, 2)),
])
def test_options_take_effect(name, key, values):
    """Negative check: each option changes the result (it is not swallowed)."""
    f = contraction((3, 40), radius=0.9, seed=3)
    x0 = torch.zeros(3, 40)
    runs = [deq_fast.get_solver(name)(f, x0, max_iter=15, tol=0, **{key: v})[0] for v in values]
    assert (runs[0] - runs[1]).abs().max() > 1e-6


def test_unknown_keyword_warns_once():
    f = contraction((2, 8))
    with pytest.warns(UserWarning, match="toll"):
        deq_fast.anderson_solver(f, torch.zeros(2, 8), toll=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        deq_fast.anderson_solver(f, torch.zeros(2, 8), toll=1e-3)   # second time: silent


def test_registry():
    assert deq_fast.get_solver("anderson") is deq_fast.anderson_solver
    mine = lambda func, x0, **kw: (x0, [], {})   # noqa: E731
    deq_fast.register_solver("mine", mine)
    assert deq_fast.get_solver("mine") is mine
    with pytest.raises(ValueError, match="newton"):
        deq_fast.get_solver("newton")


def test_simple_fixed_point_iter_matches():
    f = contraction((3, 20))
    x0 = torch.zeros(3, 20)
    fd = lambda z, tau=1.0: tau * f(z) + (1 - tau) * z   # noqa: E731  (TorchDEQ passes tau=)
    z1, _, i1 = deq_fast.simple_fixed_point_iter(fd, x0, max_iter=12, tau=0.8, indexing=[4])
    z2, _, i2 = torchdeq_solver.simple_fixed_point_iter(fd, x0, max_iter=12, tau=0.8, indexing=[4])
    torch.testing.assert_close(z1, z2)
    torch.testing.assert_close(i1["abs_lowest"], i2["abs_lowest"], atol=1e-6, rtol=1e-5)


# --------------------------------------------------------------------------- dispatch counts
# docs/design.md#measuring-performance: ops dispatched per iteration (excluding f) and host syncs
# per solve. Counts are
# deterministic, so they are asserted; times are only reported by the benchmarks.

@pytest.mark.parametrize("name", ["anderson", "broyden"])
def test_ops_per_iteration_at_most_a_third_of_torchdeq(name):
    f = contraction((8, 64))
    x0 = torch.zeros(8, 64)
    ours, _, _ = per_iteration(lambda fc, n: deq_fast.get_solver(name)(fc, x0, max_iter=n, tol=0), f)
    theirs, _, _ = per_iteration(lambda fc, n: torchdeq_solver.get_solver(name)(fc, x0, max_iter=n, tol=0), f)
    assert ours <= theirs / 3, (ours, theirs)


@pytest.mark.parametrize("name", SOLVERS)
def test_host_syncs_per_40_iteration_solve(name):
    f = contraction((8, 64))
    counter = OpCounter()
    with counter:
        deq_fast.get_solver(name)(counter.exclude(f), torch.zeros(8, 64), max_iter=40, tol=0)
    assert counter.syncs <= 12, counter.syncs


def _normed_chain(checkpointed: bool) -> tuple[torch.nn.Linear, torch.Tensor]:
    """Three calls of one weight-normalised layer (the deq-lm pattern), optionally under mem_gc;
    returns the layer and the input, after one backward."""
    from deq_fast.torchdeq.norm import apply_norm, reset_norm
    from deq_fast.torchdeq.utils.mem import mem_gc

    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8).double()
    apply_norm(layer, "weight_norm")
    reset_norm(layer)
    x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    z = x
    for _ in range(3):
        z = torch.tanh(mem_gc(layer, (z,)) if checkpointed else layer(z))
    z.square().sum().backward()
    return layer, x


def test_mem_gc_reuses_the_normalised_weight_within_a_step(monkeypatch):
    # TorchDEQ's checkpointing keeps the graph (retain_graph=True), so the weight computed by
    # reset_norm serves every checkpointed call of the step; recomputing it per call made a deq-lm
    # step 18 % slower than TorchDEQ's
    from deq_fast.nn import norm

    calls = []
    original = norm._WeightNorm.compute_weight
    monkeypatch.setattr(norm._WeightNorm, "compute_weight",
                        lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    ref_layer, ref_x = _normed_chain(checkpointed=False)
    plain_calls, calls[:] = len(calls), []
    layer, x = _normed_chain(checkpointed=True)
    assert len(calls) == plain_calls            # apply_norm's and reset_norm's, none in backward
    torch.testing.assert_close(x.grad, ref_x.grad, rtol=1e-12, atol=0)
    for (name, p), (_, q) in zip(layer.named_parameters(), ref_layer.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0, msg=name)


def test_mem_gc_runs_the_normalisation_backward_once_per_step():
    # the checkpointed VJPs stop at the normalised weight: its backward (to weight_g, weight_v)
    # runs once for the three checkpointed calls, with the gradients of the plain chain above
    from deq_fast.torchdeq.norm import apply_norm, reset_norm
    from deq_fast.torchdeq.utils.mem import mem_gc

    runs = []
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 8).double()
    apply_norm(layer, "weight_norm")
    reset_norm(layer)
    layer.weight.grad_fn.register_prehook(lambda grads: runs.append(1))
    z = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
    for _ in range(3):
        z = torch.tanh(mem_gc(layer, (z,)))
    z.square().sum().backward()
    assert len(runs) == 1
    ref_layer, _ = _normed_chain(checkpointed=False)
    for (name, p), (_, q) in zip(layer.named_parameters(), ref_layer.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=0, msg=name)


class _SharedScale(torch.nn.Module):
    """Uses a normalised layer's ``weight_g`` directly too (a shared source parameter)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(6, 6).double()

    def forward(self, z):
        return torch.tanh(self.lin(z)) * self.g.sum()


def test_mem_gc_gradients_with_a_shared_normalisation_parameter():
    from deq_fast.torchdeq.norm import apply_norm, reset_norm
    from deq_fast.torchdeq.utils.mem import mem_gc

    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(1)
        m = _SharedScale()
        apply_norm(m, "weight_norm")
        m.g = m.lin.weight_g                   # registered a second time, on the parent
        reset_norm(m)
        z = torch.randn(3, 6, dtype=torch.float64)
        for _ in range(2):
            z = mem_gc(m, (z,)) if checkpointed else m(z)
        z.sum().backward()
        grads.append({n: p.grad for n, p in m.lin.named_parameters()})
    for name, ref in grads[0].items():
        torch.testing.assert_close(grads[1][name], ref, rtol=1e-12, atol=1e-14, msg=name)


def test_mem_gc_backward_differentiates_the_weights_its_forward_used():
    # reset_norm between the checkpointed forward and the backward: the recomputation uses the
    # pinned weight of the forward (whose gradient the checkpoint returns), not the new one
    from deq_fast.torchdeq.norm import apply_norm, reset_norm
    from deq_fast.torchdeq.utils.mem import mem_gc

    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(2)
        layer = torch.nn.Linear(5, 5).double()
        apply_norm(layer, "weight_norm")
        reset_norm(layer)
        x = torch.randn(3, 5, dtype=torch.float64)
        y = mem_gc(layer, (x,)) if checkpointed else layer(x)
        reset_norm(layer)
        y.square().sum().backward()
        grads.append({n: p.grad for n, p in layer.named_parameters()})
    for name, ref in grads[0].items():
        assert grads[1][name] is not None, name
        torch.testing.assert_close(grads[1][name], ref, rtol=1e-12, atol=1e-14, msg=name)


def test_list_state_reaches_func_unpacked_without_ift():
    # no_stat without ift (deq-flow's simple_fixed_point_iter): the (h, c) state stays a list as
    # in TorchDEQ (no packing into one vector and views out of it per call); same outputs and
    # gradients as torchdeq
    import torchdeq

    import deq_fast.torchdeq as fast

    results = []
    for lib in (torchdeq, fast):
        torch.manual_seed(3)
        W = (0.3 * torch.randn(4, 4, dtype=torch.float64)).requires_grad_()
        views = []

        def f(h, c):
            views.append(h._base is not None or c._base is not None)
            return torch.tanh(h @ W + c), 0.5 * c + 0.1 * h.mean(dim=1, keepdim=True)

        deq = lib.get_deq(f_solver="simple_fixed_point_iter", f_max_iter=6, n_states=2, grad=1)
        deq.train()
        z0 = (torch.zeros(2, 4, dtype=torch.float64), torch.ones(2, 4, dtype=torch.float64))
        z_out, _ = deq(f, z0)
        sum(h.square().sum() + c.sum() for h, c in z_out).backward()
        results.append(([t.detach() for z in z_out for t in z], W.grad, views))
    (out_tq, grad_tq, _), (out_fast, grad_fast, views_fast) = results
    assert not any(views_fast)
    for a, b in zip(out_fast, out_tq):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad_fast, grad_tq, rtol=1e-12, atol=1e-14)


def test_mem_gc_without_grad_mode_is_a_plain_call(monkeypatch):
    # a solver's iterations run under no_grad: nothing to checkpoint, so no autograd.Function
    from deq_fast.torchdeq.norm import apply_norm
    from deq_fast.torchdeq.utils import mem

    torch.manual_seed(4)
    layer = torch.nn.Sequential(torch.nn.Linear(6, 6), torch.nn.Tanh()).double()
    apply_norm(layer, "weight_norm")
    x = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    applied = []
    monkeypatch.setattr(mem.DEQGradCkpt, "apply", lambda *a: applied.append(1) or layer(*a[2:3]))
    with torch.no_grad():
        y = mem.mem_gc(layer, (x,))
        assert not applied and not y.requires_grad
        torch.testing.assert_close(y, layer(x), rtol=0, atol=0)
    mem.mem_gc(layer, (x,))
    assert applied == [1]


class _SelfResetting(torch.nn.Module):
    """Resets its own normalisation in its forward, as IGNN's implicit graph layer."""

    def __init__(self, reset_norm):
        super().__init__()
        self.W = torch.nn.Parameter(0.3 * torch.randn(5, 5))
        self._reset_norm = reset_norm

    def forward(self, x):
        self._reset_norm(self)
        return torch.tanh(x @ self.W.T)


def test_self_resetting_spectral_layer_trains_as_torchdeq(monkeypatch):
    # each step: backward (the weight goes stale), optimizer step, forward: the stale layer's
    # recomputation and its own reset_norm make one computation and one power step, as TorchDEQ's
    import torchdeq.norm as tq_norm

    import deq_fast.torchdeq.norm as fast_norm
    from deq_fast.nn import norm

    computed = []
    compute = norm._SpectralNorm.compute_weight
    monkeypatch.setattr(norm._SpectralNorm, "compute_weight",
                        lambda *a, **k: computed.append(1) or compute(*a, **k))
    steps = []
    for lib in (tq_norm, fast_norm):
        lib.register_norm_module(_SelfResetting, "spectral_norm", names=["W"], dims=[0])
        torch.manual_seed(0)
        layer = _SelfResetting(lib.reset_norm)
        lib.apply_norm(layer, "spectral_norm")
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        x = torch.randn(3, 5)
        got = []
        for _ in range(4):
            layer(x).square().sum().backward()
            opt.step()
            opt.zero_grad()
            got.append([layer.W.detach().clone(), layer.W_u.clone(), layer.W_v.clone()])
        steps.append(got)
    assert len(computed) == 4
    for step_tq, step_fast in zip(*steps):
        for a, b in zip(step_tq, step_fast):
            torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
