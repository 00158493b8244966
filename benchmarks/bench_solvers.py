"""Solver throughput: deq_fast against TorchDEQ 0.1.0 on the same problems (pytest-benchmark).

One benchmark group per (method, size, device); each group holds the pair
``<method>-<size>-torchdeq`` / ``<method>-<size>-deq_fast`` solving the same problem from the same
``x0`` for the same number of iterations (``tol=0``, so neither library stops early), both through
the TorchDEQ contract (``get_solver(name)(f, x0, max_iter=..., tol=0)``, default options).

Sizes (``SIZES``):
    cheap   B=32, D=4096, 40 iterations, ``f(z) = w * z + b`` elementwise (|w| <= 0.9): the
            cheapest map, so the solver's own cost dominates (the issue's acceptance size).
    tanh    the same with ``f(z) = tanh(w * z + b)``: on a CPU the tanh alone costs about as much
            as a solver step, which dilutes the ratio.
    halftanh  the same with ``f(z) = 0.5 * tanh(z) + x`` (``x`` fixed): a cheap nonlinear map.
    matmul  B=16, D=1024, 40 iterations, ``f(z) = tanh(z W^T + b)``: ``f`` costs more.

Run::

    pytest benchmarks/ --benchmark-only --benchmark-group-by=group [--bench-rounds=3]

The pytest-benchmark table prints each row's time relative to the fastest of its group in
parentheses: that is the ratio to read. Times are never asserted; ``report.py`` measures the same
problems interleaved in one process, with op and sync counts.

This module is also the single definition of the problems and solver calls used by ``report.py``.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import pytest
import torch

import deq_fast

try:
    from torchdeq.solver import get_solver as torchdeq_get_solver
except ImportError:                       # the baseline is optional; its rows are skipped
    torchdeq_get_solver = None

METHODS = ("anderson", "broyden", "fixed_point")
LIBS = ("torchdeq", "deq_fast")
DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)

# method -> registry key in both TorchDEQ-style APIs
SOLVER_KEYS = {"anderson": "anderson", "broyden": "broyden", "fixed_point": "fixed_point_iter"}


@dataclasses.dataclass(frozen=True)
class Size:
    """A benchmark problem size: batch ``B``, flattened state ``D``, ``iters`` solver iterations,
    ``f`` one of ``'affine'`` (``w*z + b``), ``'elementwise'`` (``tanh(w*z + b)``) or
    ``'matmul'`` (``tanh(z W^T + b)``) or ``'halftanh'`` (``0.5 * tanh(z) + b``)."""
    B: int
    D: int
    iters: int
    f: str


SIZES = {
    "cheap": Size(B=32, D=4096, iters=40, f="affine"),
    "tanh": Size(B=32, D=4096, iters=40, f="elementwise"),
    "halftanh": Size(B=32, D=4096, iters=40, f="halftanh"),
    "matmul": Size(B=16, D=1024, iters=40, f="matmul"),
}


def make_problem(size: Size, device: str = "cpu", seed: int = 0,
                 dtype: torch.dtype = torch.float32) -> tuple[Callable, torch.Tensor]:
    """A random contraction ``f`` (Lipschitz constant 0.9 at most) and ``x0 = 0``, ``[B, D]``.

    Args:
        size: the problem size.
        device, dtype: where the problem lives.
        seed: the generator seed (fresh parameters per seed).

    Returns:
        ``(f, x0)`` with ``f: [B, D] -> [B, D]``.

    Example:
        >>> f, x0 = make_problem(SIZES["matmul"])
        >>> f(x0).shape
        torch.Size([16, 1024])
    """
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(size.B, size.D, generator=g, dtype=dtype).to(device)
    if size.f == "halftanh":
        x0 = torch.zeros(size.B, size.D, dtype=dtype, device=device)
        return (lambda z: torch.add(b, torch.tanh(z), alpha=0.5)), x0
    if size.f in ("affine", "elementwise"):
        w = ((torch.rand(size.D, generator=g, dtype=dtype) * 2 - 1) * 0.9).to(device)
        x0 = torch.zeros(size.B, size.D, dtype=dtype, device=device)
        if size.f == "affine":
            return (lambda z: torch.addcmul(b, z, w)), x0
        return (lambda z: torch.tanh(z * w + b)), x0
    if size.f == "matmul":
        W = torch.randn(size.D, size.D, generator=g, dtype=dtype)
        W = (0.9 * W / torch.linalg.matrix_norm(W, ord=2)).to(device)    # spectral norm 0.9
        return (lambda z: torch.tanh(z @ W.T + b)), torch.zeros(size.B, size.D, dtype=dtype, device=device)
    raise ValueError(f"size.f must be 'affine', 'elementwise', 'halftanh' or 'matmul', got {size.f!r}")


def get_solver(lib: str, method: str) -> Callable:
    """The TorchDEQ-contract solver ``(f, x0, max_iter=..., tol=...) -> (z, list, info)`` of
    ``lib`` (``'deq_fast'`` or ``'torchdeq'``) for ``method`` (one of ``METHODS``)."""
    if method not in SOLVER_KEYS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if lib == "deq_fast":
        return deq_fast.get_solver(SOLVER_KEYS[method])
    if lib == "torchdeq":
        if torchdeq_get_solver is None:
            raise RuntimeError("torchdeq is not installed (pip install torchdeq==0.1.0)")
        return torchdeq_get_solver(SOLVER_KEYS[method])
    raise ValueError(f"lib must be one of {LIBS}, got {lib!r}")


def timed_solve(lib: str, method: str, f: Callable, x0: torch.Tensor,
                iters: int) -> Callable[[], torch.Tensor]:
    """A no-argument callable running one full solve (no early stop), synchronised on CUDA, and
    returning the solution (the thing a benchmark times)."""
    solver = get_solver(lib, method)
    sync = torch.cuda.synchronize if x0.is_cuda else (lambda: None)

    def run() -> torch.Tensor:
        with torch.no_grad():
            z = solver(f, x0, max_iter=iters, tol=0.0)[0]
        sync()
        return z
    return run


CASES = [pytest.param(method, size, lib, device,
                      id=f"{method}-{size}-{lib}" + ("" if device == "cpu" else f"-{device}"))
         for device in DEVICES for method in METHODS for size in SIZES for lib in LIBS]


@pytest.mark.parametrize("method, size, lib, device", CASES)
def test_solver(benchmark, method, size, lib, device, bench_rounds):
    if lib == "torchdeq" and torchdeq_get_solver is None:
        pytest.skip("torchdeq is not installed: no baseline row")
    spec = SIZES[size]
    f, x0 = make_problem(spec, device)
    benchmark.group = f"{method}-{size}-{device}"
    benchmark.extra_info.update(method=method, size=size, lib=lib, device=device, B=spec.B, D=spec.D,
                                iters=spec.iters, f=spec.f)
    z = benchmark.pedantic(timed_solve(lib, method, f, x0, spec.iters), rounds=bench_rounds,
                           warmup_rounds=1, iterations=1)
    assert z.shape == x0.shape          # a smoke check of the call, never of the time
