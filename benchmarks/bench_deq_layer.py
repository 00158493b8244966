"""One training step of a DEQ layer (forward solve + exact backward), deq_fast against torchdeq.

The layer: ``z = tanh(z W^T + x U^T + b)`` with ``||W||_2 = 0.9`` (near the edge of contraction),
state ``[B, D]``, followed by a linear readout and an MSE loss; one step = forward, loss,
backward (parameter gradients). Both libraries get the same settings: Anderson forward,
``f_max_iter=30``, ``f_tol=1e-4`` (relative); the exact implicit gradient with a backward tolerance
of 1e-6 and 60 iterations at most. torchdeq runs ``ift=True`` with its Anderson backward;
deq_fast runs its default backward (restarted GMRES in the compiled loop).

Run::

    python benchmarks/bench_deq_layer.py              # side-by-side table (interleaved, medians)
    pytest benchmarks/bench_deq_layer.py --benchmark-only --benchmark-group-by=group

Reported: step time (median of interleaved repeats), forward evaluations of ``f`` (counted in
``f``), backward VJPs (deq_fast reports them in ``info['b_nvjp']``; for torchdeq the calls of
``torch.autograd.grad`` made by its backward solver are counted), and
the relative gap between the two libraries' parameter gradients. Times are never asserted.
"""
from __future__ import annotations

import os
import statistics
import time

import pytest
import torch
from torch import nn

import deq_fast

B = int(os.environ.get("BENCH_B", "32"))
D = int(os.environ.get("BENCH_D", "512"))
SETTINGS = dict(f_solver="anderson", f_max_iter=30, f_tol=1e-4, f_stop_mode="rel",
                b_max_iter=60, b_tol=1e-6, b_stop_mode="rel")


class Layer(nn.Module):
    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        W = torch.randn(D, D, generator=g)
        self.W = nn.Parameter(0.9 * W / torch.linalg.matrix_norm(W, ord=2))
        self.U = nn.Parameter(torch.randn(D, D, generator=g) / D ** 0.5)
        self.b = nn.Parameter(0.1 * torch.randn(D, generator=g))
        self.head = nn.Linear(D, 10)
        with torch.no_grad():                        # same readout in every instance
            self.head.weight.copy_(torch.randn(10, D, generator=g) / D ** 0.5)
            self.head.bias.zero_()
        self.calls = 0

    def f(self, z: torch.Tensor, inj: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return torch.tanh(z @ self.W.T + inj)


def make_deq(lib: str):
    if lib == "deq_fast":
        return deq_fast.get_deq(**SETTINGS)
    import torchdeq
    return torchdeq.get_deq(ift=True, b_solver="anderson", **SETTINGS)


class _CountVJPs:
    """Counts ``torch.autograd.grad`` calls made from torchdeq's backward (its VJPs)."""

    def __init__(self) -> None:
        import torchdeq.grad as tg
        self.module, self.count = tg, 0
        self.original = tg.autograd.grad

    def __enter__(self):
        def counted(*a, **k):
            self.count += 1
            return self.original(*a, **k)
        self.module.autograd.grad = counted
        return self

    def __exit__(self, *exc):
        self.module.autograd.grad = self.original


def step(lib: str, layer: Layer, deq, x: torch.Tensor, y: torch.Tensor) -> dict:
    """One forward + backward; returns evaluation counts and the gradient of W."""
    layer.zero_grad(set_to_none=True)
    layer.calls = 0
    inj = x @ layer.U.T + layer.b
    z_out, info = deq(lambda z: layer.f(z, inj), torch.zeros(B, D))
    n_fwd = layer.calls
    loss = nn.functional.mse_loss(layer.head(z_out[-1]), y)
    if lib == "torchdeq":
        with _CountVJPs() as counter:
            loss.backward()
        vjps = counter.count
    else:
        loss.backward()
        vjps = info["b_nvjp"]
    return {"f_nfe": n_fwd, "f_extra": layer.calls - n_fwd, "b_vjp": vjps,
            "gradW": layer.W.grad.clone()}


def problem(seed: int = 0):
    g = torch.Generator().manual_seed(seed + 1)
    return torch.randn(B, D, generator=g), torch.randn(B, 10, generator=g)


@pytest.mark.parametrize("lib", ["torchdeq", "deq_fast"])
def test_deq_layer_step(benchmark, lib):
    if lib == "torchdeq":
        pytest.importorskip("torchdeq")
    benchmark.group = f"deq-layer-step-B{B}-D{D}"
    layer, deq = Layer(), make_deq(lib)
    x, y = problem()
    benchmark.pedantic(step, args=(lib, layer, deq, x, y), rounds=3, warmup_rounds=1)


def main(repeats: int = 5) -> None:
    import torchdeq  # noqa: F401  (the baseline must be installed for the table)
    x, y = problem()
    layers = {lib: Layer() for lib in ("torchdeq", "deq_fast")}
    deqs = {lib: make_deq(lib) for lib in layers}
    times = {lib: [] for lib in layers}
    last = {}
    for r in range(repeats + 1):                       # first round: warm-up, not timed
        for lib in (("torchdeq", "deq_fast") if r % 2 else ("deq_fast", "torchdeq")):
            t0 = time.perf_counter()
            last[lib] = step(lib, layers[lib], deqs[lib], x, y)
            if r:
                times[lib].append(time.perf_counter() - t0)
    gap = ((last["deq_fast"]["gradW"] - last["torchdeq"]["gradW"]).norm()
           / last["torchdeq"]["gradW"].norm()).item()
    med = {lib: statistics.median(v) * 1e3 for lib, v in times.items()}
    print(f"DEQ layer training step, B={B}, D={D}, torch threads {torch.get_num_threads()}; "
          f"{repeats} interleaved repeats, medians")
    print("| library | step ms | forward NFE | f re-evaluated in backward | backward VJPs |")
    print("|---|---|---|---|---|")
    for lib in ("torchdeq", "deq_fast"):
        r = last[lib]
        print(f"| {lib} | {med[lib]:.1f} | {r['f_nfe']} | {r['f_extra']} | {r['b_vjp']} |")
    print(f"ratio deq_fast / torchdeq: {med['deq_fast'] / med['torchdeq']:.2f}; "
          f"relative gap of dL/dW: {gap:.1e}")


if __name__ == "__main__":
    main()
