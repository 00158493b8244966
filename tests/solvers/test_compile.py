"""Full-graph capture: ``torch.compile(fullgraph=True)`` of a fixed-iteration ``deq_fast.solve``.

With ``check_every=0`` a solve has no host interaction, so Dynamo captures it as one graph: the
loop unrolled, the fused solver ops opaque nodes with fake kernels (registered at import of the op
table), the backend and the op table decided at trace time. Checked for every method, tensor and
tuple states, the C++ and the reference ops: no graph break, one graph, no recompilation when the
solve is called again with new values (``error_on_recompile``), and the result equal to eager.

The graph tests compile with ``backend="aot_eager"`` (Dynamo, fake kernels and functionalization,
no code generation; one case per method in the fast suite, the whole grid ``slow``); the inductor
tests (which build C++ on CPU) are ``slow``.
"""
from __future__ import annotations

import pytest
import torch
import torch._dynamo

import deq_fast
from deq_fast.ops import dispatch, extension

METHODS = ["anderson", "broyden", "fixed_point"]
BACKENDS = ["cpp", "reference"]
ITERS = 4


def _needs(backend: str) -> None:
    if backend == "cpp" and not extension.available():
        pytest.skip(f"backend 'cpp' needs deq_fast._C: {extension.extension_status()[1]}")


def _problem(state: str, seed: int, dtype=torch.float32):
    """``(f, x0)``: a contraction on a ``[3, 7]`` tensor state or a tuple ``([3, 2, 5], [3, 4])``."""
    g = torch.Generator().manual_seed(seed)
    W = 0.4 * torch.randn(14, 14, generator=g, dtype=dtype) / 14 ** 0.5
    b = torch.randn(3, 14, generator=g, dtype=dtype)
    if state == "tensor":
        return (lambda z: torch.tanh(z @ W[:7, :7] + b[:, :7])), torch.randn(3, 7, generator=g, dtype=dtype)

    def f(zs):
        a, c = zs
        mixed = torch.tanh(torch.cat([a.flatten(1), c], 1) @ W + b)
        return mixed[:, :10].view(3, 2, 5), mixed[:, 10:]
    return f, (torch.randn(3, 2, 5, generator=g, dtype=dtype), torch.randn(3, 4, generator=g, dtype=dtype))


def _solve(method: str, backend: str):
    def run(f, x0):
        res = deq_fast.solve(f, x0, method, max_iter=ITERS, check_every=0, backend=backend)
        return res.z, res.abs_lowest, res.abs_trace
    return run


@pytest.fixture
def no_recompile():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield torch._dynamo.utils.counters
    torch._dynamo.reset()


FAST_CASES = [("anderson", "cpp", "tensor"), ("broyden", "cpp", "tuple"),
              ("fixed_point", "reference", "tuple")]
ALL_CASES = [(m, b, s) for m in METHODS for b in BACKENDS for s in ("tensor", "tuple")]


@pytest.mark.parametrize("method,backend,state", FAST_CASES + [
    pytest.param(*case, marks=pytest.mark.slow) for case in ALL_CASES if case not in FAST_CASES])
def test_fixed_iteration_solve_is_one_graph_without_recompiles(method, backend, state, no_recompile):
    _needs(backend)
    run = _solve(method, backend)
    compiled = torch.compile(run, backend="aot_eager", fullgraph=True)
    for seed in (0, 1):                                   # new values, same shapes: no recompile
        f, x0 = _problem(state, seed)
        got, want = compiled(f, x0), run(f, x0)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    assert no_recompile["stats"]["unique_graphs"] == 1
    assert not no_recompile["graph_break"]


def test_explain_reports_one_graph_and_no_break():
    f, x0 = _problem("tuple", 0)
    explained = torch._dynamo.explain(_solve("fixed_point", "auto"))(f, x0)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    ops = {str(n.target) for g in explained.graphs for n in g.graph.nodes if n.op == "call_function"}
    # the fused ops are nodes of the graph (opaque), chosen at trace time
    assert {"deq_fast.fixed_point_step.default", "deq_fast.track_status.default"} <= ops or \
        {"deq_fast_reference.fixed_point_step.default", "deq_fast_reference.track_status.default"} <= ops


def test_traced_table_is_the_eager_choice_as_registered_ops():
    """What runs each op under compile is what runs eagerly: the registered op where a C++
    kernel runs, the reference-only twin (no CPU kernel) where the reference does."""
    for backend in BACKENDS:
        if backend == "cpp" and not extension.available():
            continue
        eager = dispatch.get_ops(backend, torch.device("cpu"), torch.float32)
        traced = dispatch.traced_ops(backend, torch.device("cpu"), torch.float32)
        assert traced.ran == eager.ran
        for name, ran in traced.ran.items():
            namespace = torch.ops.deq_fast if ran == "cpp" else torch.ops.deq_fast_reference
            assert getattr(traced, name) is getattr(namespace, name).default
    assert not torch._C._dispatch_has_kernel_for_dispatch_key("deq_fast_reference::track_status",
                                                              "CPU")


def test_a_polling_solve_is_not_one_graph():
    """Negative check: with ``check_every=1`` the host reads the flags (a graph break), so the
    fullgraph path above is what ``check_every=0`` buys."""
    f, x0 = _problem("tensor", 0)
    explained = torch._dynamo.explain(
        lambda f, x0: deq_fast.solve(f, x0, "fixed_point", max_iter=2, check_every=1).z)(f, x0)
    assert explained.graph_break_count > 0


def test_triton_on_cpu_tensors_cannot_be_compiled_and_says_why():
    f, x0 = _problem("tensor", 0)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="torch.compile cannot trace"):
        torch.compile(_solve("anderson", "triton"), backend="eager", fullgraph=True)(f, x0)


@pytest.mark.slow
@pytest.mark.parametrize("state", ["tensor", "tuple"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
def test_inductor_solve_equals_eager(method, backend, state, no_recompile):
    _needs(backend)
    run = _solve(method, backend)
    compiled = torch.compile(run, fullgraph=True)
    for seed in (0, 1):
        f, x0 = _problem(state, seed, torch.float64)
        torch.testing.assert_close(compiled(f, x0), run(f, x0), atol=1e-12, rtol=1e-10)
    assert no_recompile["stats"]["unique_graphs"] == 1


# ---------------------------------------------------------------------------------------------
# a DEQ layer (deq_fast.get_deq) in training: forward solve and exact implicit backward captured
# ---------------------------------------------------------------------------------------------

class _DEQNet(torch.nn.Module):
    """``z* = tanh(0.3 W z* + U x)`` (tensor state) or its two-part split (tuple state), then
    a mean-square loss; float64 so that the forward and backward solves converge far below the
    tolerance the test compares at."""

    def __init__(self, state: str, **deq_kw) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.W = torch.nn.Parameter(torch.randn(10, 10, generator=gen, dtype=torch.float64) / 10 ** 0.5)
        self.U = torch.nn.Parameter(torch.randn(10, 6, generator=gen, dtype=torch.float64) / 6 ** 0.5)
        self.state = state
        self.deq = deq_fast.get_deq(**{**dict(f_solver="anderson", f_max_iter=14, f_tol=1e-12,
                                              b_max_iter=14, b_tol=1e-12), **deq_kw})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = x @ self.U.t()
        f = lambda z: torch.tanh(0.3 * z @ self.W.t() + u)  # noqa: E731
        if self.state == "tensor":
            zs, _ = self.deq(f, torch.zeros_like(u))
            return sum(z.square().mean() for z in zs)     # every sampled state (n_states)
        zs, _ = self.deq(lambda a, b: f(torch.cat([a, b], 1)).split([4, 6], 1),
                         (u.new_zeros(u.shape[0], 4), u.new_zeros(u.shape[0], 6)))
        return sum(part.square().mean() for z in zs for part in z)


def _loss_and_grads(model, x):
    loss = model(x)
    return (loss, *torch.autograd.grad(loss, list(model.parameters())))


SAMPLED = dict(n_states=2, core="indexing")   # two states of one solve's trajectory


@pytest.mark.parametrize("state,compiler,sampling", [
    ("tensor", "aot_eager", {}),
    pytest.param("tuple", "aot_eager", {}, marks=pytest.mark.slow),
    pytest.param("tensor", "aot_eager", SAMPLED, marks=pytest.mark.slow),
    pytest.param("tensor", "inductor", {}, marks=pytest.mark.slow),
    pytest.param("tuple", "inductor", {}, marks=pytest.mark.slow)])
def test_deq_training_step_compiles_and_equals_eager(state, compiler, sampling, no_recompile):
    """Loss and parameter gradients of the compiled layer (exact gradient: the captured backward)
    equal eager's (the C++/Python backward loop to its tolerance); a second batch reuses the
    graph. Negative check: the phantom gradient is not within the tolerance."""
    model = _DEQNet(state, **sampling).train()
    compiled = torch.compile(model, backend=compiler, fullgraph=True)
    gen = torch.Generator().manual_seed(1)
    for _ in range(2):
        x = torch.randn(5, 6, generator=gen, dtype=torch.float64)
        want = _loss_and_grads(model, x)
        torch.testing.assert_close(_loss_and_grads(compiled, x), want, atol=1e-9, rtol=1e-7)
    assert no_recompile["stats"]["unique_graphs"] == 1
    phantom = _loss_and_grads(_DEQNet(state, grad_mode="phantom", grad=2).train(), x)
    assert (phantom[1] - want[1]).abs().max() > 1e-4


def test_shine_under_compile_says_what_is_supported():
    torch._dynamo.reset()
    model = _DEQNet("tensor", grad_mode="shine", f_solver="broyden").train()
    with pytest.raises(Exception, match="grad_mode 'exact'"):
        torch.compile(model, backend="eager", fullgraph=True)(torch.randn(2, 6, dtype=torch.float64))


@pytest.mark.slow
def test_selftest_capture_rows_pass_on_cpu():
    """``python -m deq_fast.selftest --capture``: eager vs inductor rows, one per method."""
    from deq_fast import selftest

    rows = selftest.run_capture_checks("cpu", timing=True)
    assert [r.check for r in rows] == [f"captured/{m}" for m in METHODS]
    assert all(r.ok and r.err <= r.tol and r.us > 0 and r.base_us > 0 for r in rows), rows
