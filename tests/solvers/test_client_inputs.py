"""What real clients hand the solvers (DEQ Zoo, locuslab/deq): maps that close over parameters,
non-contiguous and other-dtype outputs, 0-d states; and evaluation counts against the originals."""
from __future__ import annotations

import pytest
import torch
import torchdeq.solver as tq

import deq_fast
from deq_fast.solvers.polling import AsyncPoll, HostPoll, make_poll

TQ_SOLVERS = ["anderson_solver", "broyden_solver", "fixed_point_iter"]


class Layer(torch.nn.Module):
    """An f that closes over parameters, like every nn.Module layer used as a DEQ map."""

    def __init__(self, d: int, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.lin = torch.nn.Linear(d, d)
        with torch.no_grad():
            self.lin.weight.copy_(0.5 * torch.randn(d, d, generator=g) / d ** 0.5)

    def forward(self, z):
        return torch.tanh(self.lin(z))


@pytest.mark.parametrize("name", TQ_SOLVERS + ["simple_fixed_point_iter"])
@pytest.mark.parametrize("grad_x0", [False, True], ids=["x0", "x0-requires-grad"])
def test_torchdeq_solvers_accept_parameterised_maps_outside_no_grad(name, grad_x0):
    layer = Layer(7)
    x0 = torch.zeros(3, 7, requires_grad=grad_x0)
    z, _, info = getattr(deq_fast, name)(layer, x0, max_iter=30)
    assert z.shape == x0.shape and torch.isfinite(z).all()
    if name == "simple_fixed_point_iter":       # plain iteration of func: attached, like TorchDEQ
        assert z.requires_grad
    else:                                        # the solve builds no graph
        assert not z.requires_grad and z.grad_fn is None
    if name != "simple_fixed_point_iter":
        z_tq, _, info_tq = getattr(tq, name)(layer, x0, max_iter=30)
        torch.testing.assert_close(z, z_tq.detach(), atol=1e-4, rtol=0)


@pytest.mark.parametrize("api", ["solve", "anderson", "broyden"])
def test_native_and_locuslab_accept_parameterised_maps(api):
    layer = Layer(5)
    x0 = torch.zeros(2, 5)
    if api == "solve":
        z = deq_fast.solve(layer, x0, tol=1e-6).z
    else:
        z = getattr(deq_fast, api)(layer, x0, threshold=30, eps=1e-6)["result"]
    assert not z.requires_grad
    torch.testing.assert_close(layer(z).detach(), z, atol=1e-4, rtol=0)


def _einsum_map(D, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = 0.5 * torch.randn(D, D, generator=g, dtype=torch.float64) / D ** 0.5
    b = torch.randn(D, generator=g, dtype=torch.float64)
    # (B, D, 1) state; einsum/transposes give outputs with other strides than the input
    return lambda z: (torch.tanh(torch.einsum("ij,bjl->bil", W, z) + b[:, None])
                      .transpose(0, 2).contiguous().transpose(0, 2))


@pytest.mark.parametrize("name", TQ_SOLVERS)
def test_non_contiguous_outputs_match_torchdeq(name):
    f = _einsum_map(9)
    x0 = torch.zeros(4, 9, 1, dtype=torch.float64)
    assert not f(x0).is_contiguous()
    z, _, info = getattr(deq_fast, name)(f, x0, max_iter=25, tol=1e-10)
    z_tq, _, info_tq = getattr(tq, name)(f, x0, max_iter=25, tol=1e-10)
    torch.testing.assert_close(z, z_tq, atol=1e-9, rtol=0)
    torch.testing.assert_close(info["nstep"], info_tq["nstep"], check_dtype=False)


def test_graph_layer_transposed_output_with_broyden():
    """IGNN-style ``torch.mm(X.T, W.T).T``: an output that is a transposed view."""
    g = torch.Generator().manual_seed(1)
    W = 0.3 * torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = torch.softmax(torch.randn(10, 10, generator=g, dtype=torch.float64), 1)
    f = lambda X: torch.tanh(torch.mm(torch.mm(A, X.T), W.T).T + 0.1)   # noqa: E731
    x0 = torch.zeros(6, 10, dtype=torch.float64)
    assert not f(x0).is_contiguous()
    for solver in (lambda g: deq_fast.broyden(g, x0, threshold=20)["result"],
                   lambda g: deq_fast.broyden_solver(g, x0, max_iter=20)[0]):
        torch.testing.assert_close(solver(f), solver(lambda X: f(X).contiguous()), atol=0, rtol=0)


@pytest.mark.parametrize("name", TQ_SOLVERS)
def test_zero_dim_state_as_in_torchdeq_docstrings(name):
    f = lambda z: 0.5 * (z + 2 / z)                          # noqa: E731  (TorchDEQ's example)
    z_tq, _, _ = getattr(tq, name)(f, torch.tensor(1.0, dtype=torch.float64))
    z, _, info = getattr(deq_fast, name)(f, torch.tensor(1.0, dtype=torch.float64))
    assert z.shape == z_tq.shape == (1,) and abs(z.item() - 2 ** 0.5) < 1e-3
    torch.testing.assert_close(z, z_tq, atol=1e-6, rtol=0)


def test_zero_dim_state_native_keeps_its_shape():
    res = deq_fast.solve(lambda z: 0.5 * (z + 2 / z), torch.tensor(1.0, dtype=torch.float64), tol=1e-10)
    assert res.z.shape == () and abs(res.z.item() - 2 ** 0.5) < 1e-9


def test_other_floating_dtype_is_cast_back_like_the_originals():
    x0 = torch.zeros(2, 6)
    f32 = lambda z: 0.5 * torch.cos(z)                        # noqa: E731
    f64 = lambda z: 0.5 * torch.cos(z).double()               # noqa: E731  (autocast-style output)
    for api in (lambda f: deq_fast.solve(f, x0, tol=1e-6).z,
                lambda f: deq_fast.anderson(f, x0, eps=1e-6)["result"],
                lambda f: deq_fast.broyden_solver(f, x0, tol=1e-6)[0]):
        out = api(f64)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, api(f32), atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="f returned dtype torch.int64"):
        deq_fast.anderson(lambda z: z.long(), x0)


class CountingMap:
    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, z):
        self.calls += 1
        return self.f(z)


@pytest.mark.parametrize("name", TQ_SOLVERS)
@pytest.mark.parametrize("B", [1, 4])
def test_no_more_evaluations_than_torchdeq(name, B):
    layer = Layer(12, seed=B)
    x0 = torch.randn(B, 12, generator=torch.Generator().manual_seed(3))
    ours, theirs = CountingMap(layer), CountingMap(layer)
    with torch.no_grad():
        getattr(deq_fast, name)(ours, x0, max_iter=40, tol=1e-5)
        getattr(tq, name)(theirs, x0, max_iter=40, tol=1e-5)
    assert ours.calls < 40          # it converged early, so the comparison means something
    assert ours.calls <= theirs.calls


def test_native_solve_stops_right_after_the_converging_evaluation():
    layer = Layer(8)
    f = CountingMap(layer)
    with torch.no_grad():
        res = deq_fast.solve(f, torch.zeros(3, 8), method="anderson", tol=1e-5, max_iter=50)
    assert res.converged.all()
    assert f.calls == res.nfe == int(res.nstep.max())   # nothing after the last sample converged


class FakeEvent:
    """Completion marker standing in for torch.cuda.Event: records, then reports done."""
    made = 0

    def __init__(self):
        FakeEvent.made += 1
        self.recorded = self.synced = False

    def record(self):
        self.recorded = True

    def synchronize(self):
        assert self.recorded
        self.synced = True


def test_async_poll_reads_the_previous_copy_at_most_one_look_late():
    active = torch.ones(3, dtype=torch.bool)
    poll = AsyncPoll(active, every=1, event_factory=FakeEvent)
    assert not poll.should_stop(1)           # first look: only a copy is queued
    active.zero_()
    assert not poll.should_stop(2)           # reads look 1's copy (still active), queues another
    assert poll.should_stop(3)               # reads look 2's copy: every sample stopped
    assert FakeEvent.made == 2


def test_pollers_by_device_and_never_polling():
    active = torch.ones(2, dtype=torch.bool)
    assert isinstance(make_poll(active, 1), HostPoll)
    never = make_poll(active, 0)
    active.zero_()
    assert not any(never.should_stop(k) for k in range(1, 10))
    every3 = make_poll(active, 3)
    assert [every3.should_stop(k) for k in (1, 2, 3)] == [False, False, True]
