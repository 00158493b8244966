"""The C++ CPU kernels of the solver ops ``deq_fast::broyden_dots`` / ``broyden_update``
(csrc/cpu/broyden.cpp, registered as the ops' CPU kernels) against their pure-torch references
(``deq_fast/ops/broyden.py``), and the engine choosing them.

Fresh random inputs seeded per case; ``D`` below, at and across the C++ tiles (2048) and dot lanes
(16); empty, partial, full and wrapped rings; stopped and improved samples; a zero previous step
(den = 0). Outputs the op writes are NaN-filled first, so an element it forgets fails.
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch

import deq_fast
from deq_fast.ops import extension
from deq_fast.ops.dispatch import get_ops
from deq_fast.ops.table import REFERENCE as R
from deq_fast.testing import OpNames

pytestmark = pytest.mark.skipif(os.environ.get("DEQ_FAST_NO_EXT") == "1",
                                reason="DEQ_FAST_NO_EXT=1: the extension is deliberately not used")

NAN = float("nan")
TOL = {torch.float64: 1e-12, torch.float32: 2e-6}   # max |op - ref| / max(|ref|, 1)
DT_IDS = {torch.float64: "fp64", torch.float32: "fp32"}


@pytest.fixture(scope="module")
def C():
    assert extension.load() is not None, extension.extension_status()[1]   # a missing build fails
    # the op's CPU kernel is the C++ one, not the reference (both give the same numbers)
    for name in ("deq_fast::broyden_dots", "deq_fast::broyden_update"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU"), name
    return torch.ops.deq_fast


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _randn(gen, shape, dtype, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _ring(gen, B, D, L, n_valid, dtype):
    U, V = torch.zeros(B, L, D, dtype=dtype), torch.zeros(B, L, D, dtype=dtype)
    U[:, :n_valid] = _randn(gen, (B, n_valid, D), dtype, 0.2)
    V[:, :n_valid] = _randn(gen, (B, n_valid, D), dtype, 0.2)
    return U, V


def _assert_close(names, got, want, tol):
    for name, a, b in zip(names, got, want):
        assert not a.isnan().any(), f"{name}: NaN left in the output"
        err = ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp(min=1)).item()
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


DOTS = [(1, 37, 4, 0), (3, 2500, 6, 3), (2, 4096, 5, 5), (2, 40, 70, 69)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DT_IDS.get)
@pytest.mark.parametrize("B,D,L,n_valid", DOTS, ids=[f"B{b}-D{d}-L{l}-nv{n}" for b, d, l, n in DOTS])
def test_broyden_dots_equals_reference(C, dtype, B, D, L, n_valid):
    gen = _gen("dots", dtype, B, D, L, n_valid)
    U, V = _ring(gen, B, D, L, n_valid, dtype)
    x, fx, dx = _randn(gen, (B, D), dtype), _randn(gen, (B, D), dtype), _randn(gen, (B, D), dtype)
    g_old = _randn(gen, (B, D), dtype)
    acc = _acc(dtype)
    got = [torch.full((B, D), NAN, dtype=dtype), torch.full((B, 3, L), NAN, dtype=acc),
           torch.full((B, 4), NAN, dtype=acc)]
    want = [torch.empty(B, D, dtype=dtype), torch.zeros(B, 3, L, dtype=acc),
            torch.empty(B, 4, dtype=acc)]
    C.broyden_dots.default(x, fx, g_old, got[0], dx, U, V, got[1], got[2], n_valid)
    R.broyden_dots(x, fx, g_old, want[0], dx, U, V, want[1], want[2], n_valid)
    _assert_close(["g", "abc", "scal"], got, want, TOL[dtype])


# (B, D, L, n_valid, slot, zero_step): first update, partial ring, wrapped ring (evicts slot 2),
# a zero previous step (den = 0: u is not finite -> 0)
UPDATE = [(1, 37, 4, 0, 0, False), (3, 2500, 6, 3, 3, False), (4, 4100, 5, 5, 2, False),
          (3, 37, 4, 2, 2, True), (2, 40, 70, 70, 66, False)]   # last: a ring longer than 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DT_IDS.get)
@pytest.mark.parametrize("B,D,L,n_valid,slot,zero_step", UPDATE,
                         ids=[f"B{c[0]}-D{c[1]}-L{c[2]}-nv{c[3]}-s{c[4]}" + ("-dx0" if c[5] else "")
                              for c in UPDATE])
def test_broyden_update_equals_reference(C, dtype, B, D, L, n_valid, slot, zero_step):
    gen = _gen("update", dtype, B, D, L, n_valid, slot, zero_step)
    U, V = _ring(gen, B, D, L, n_valid, dtype)
    x, fx, dx = _randn(gen, (B, D), dtype), _randn(gen, (B, D), dtype), _randn(gen, (B, D), dtype, 0.3)
    if zero_step:
        dx.zero_()
    g_old = _randn(gen, (B, D), dtype)
    acc = _acc(dtype)
    g, abc, scal = torch.empty(B, D, dtype=dtype), torch.zeros(B, 3, L, dtype=acc), \
        torch.empty(B, 4, dtype=acc)
    R.broyden_dots(x, fx, g_old, g, dx, U, V, abc, scal, n_valid)    # consistent pass-1 outputs
    best = _randn(gen, (B, D), dtype)
    improved = torch.rand(B, generator=gen) < 0.6
    active = torch.rand(B, generator=gen) < 0.6
    active[0], active[-1] = True, B == 1   # at least one running and (B > 1) one stopped sample
    got = [t.clone() for t in (x, dx, U, V, best)]
    want = [t.clone() for t in (x, dx, U, V, best)]
    C.broyden_update.default(got[0], g, g_old, got[1], got[2], got[3], abc, scal, got[4],
                             improved, active, slot, n_valid)
    R.broyden_update(want[0], g, g_old, want[1], want[2], want[3], abc, scal, want[4], improved,
                     active, slot, n_valid)
    _assert_close(["x", "dx", "U", "V", "best"], got, want, TOL[dtype])


def test_bad_arguments_are_refused(C):
    x = torch.randn(2, 8)
    U = torch.zeros(2, 3, 8)
    abc, scal = torch.zeros(2, 3, 3), torch.zeros(2, 4)
    with pytest.raises(RuntimeError, match="n_valid must be in"):
        C.broyden_dots.default(x, x, x, x.clone(), x, U, U, abc, scal, 4)
    with pytest.raises(RuntimeError, match="accumulation dtype"):
        C.broyden_dots.default(x, x, x, x.clone(), x, U, U, abc.double(), scal, 1)
    with pytest.raises(RuntimeError, match="accumulation dtype"):     # the old [B, 2, L] layout
        C.broyden_dots.default(x, x, x, x.clone(), x, U, U, abc[:, :2].contiguous(), scal, 1)
    g = x.clone()
    with pytest.raises(RuntimeError, match="different buffers"):
        C.broyden_dots.default(x, x, g, g, x, U, U, abc, scal, 1)
    flags = torch.ones(2, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="slot must be in"):
        C.broyden_update.default(x, x, x, x.clone(), U, U, abc, scal, x.clone(), flags, flags, 3, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DT_IDS.get)
def test_solve_uses_the_fused_ops_and_equals_the_reference(C, dtype):
    """A CPU Broyden solve runs the C++ passes and gives the pure-reference solve's iterates."""
    gen = _gen("solve", dtype)
    W = _randn(gen, (300, 300), torch.float64, 0.9 / 300 ** 0.5).to(dtype)
    b = _randn(gen, (4, 300), dtype)

    def f(z):
        return torch.tanh(z @ W.T + b)

    z0 = torch.zeros(4, 300, dtype=dtype)
    with OpNames() as seen:
        fast = deq_fast.solve(f, z0, method="broyden", max_iter=25, tol=0.0, backend="torch")
    assert {"deq_fast::broyden_dots", "deq_fast::broyden_update"} <= seen.names
    assert fast.backend == "cpp"                               # reported as what ran
    ref_ops = get_ops("reference", torch.device("cpu"), dtype)
    assert ref_ops.broyden_update.func is R.broyden_update   # the pure table really is pure
    import deq_fast.solvers.engine as engine
    orig = engine.get_ops
    try:
        engine.get_ops = lambda backend, device, dtype: get_ops("reference", device, dtype)
        ref = deq_fast.solve(f, z0, method="broyden", max_iter=25, tol=0.0, backend="torch")
    finally:
        engine.get_ops = orig
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(fast.z, ref.z, rtol=tol, atol=tol)
    torch.testing.assert_close(fast.abs_trace, ref.abs_trace, rtol=tol, atol=tol)


def test_opcheck(C):
    """Schemas (mutated arguments), fake kernels and autograd registration pass torch's checks."""
    B, D, L = 2, 40, 3
    gen = _gen("opcheck")
    U, V = _ring(gen, B, D, L, 2, torch.float32)
    x, fx, dx = (_randn(gen, (B, D), torch.float32) for _ in range(3))
    abc, scal = torch.zeros(B, 3, L), torch.zeros(B, 4)
    torch.library.opcheck(C.broyden_dots.default,
                          (x, fx, dx * 0.5, torch.empty(B, D), dx, U, V, abc, scal, 2))
    flags = torch.tensor([True, False])
    torch.library.opcheck(C.broyden_update.default,
                          (x.clone(), fx, dx * 0.5, dx.clone(), U.clone(), V.clone(), abc, scal,
                           x.clone(), flags, flags, 2, 2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_other_dtypes_take_the_reference(C, dtype):
    """The C++ kernels take float32/float64: the torch path calls the reference for the rest,
    and the C++ kernel refuses them with an error that says so."""
    ops = get_ops("cpp", torch.device("cpu"), dtype)
    assert ops.broyden_dots.func is R.broyden_dots and ops.broyden_update.func is R.broyden_update
    fast = get_ops("cpp", torch.device("cpu"), torch.float32)
    assert fast.broyden_dots is C.broyden_dots.default
    x, U = torch.zeros(2, 8, dtype=dtype), torch.zeros(2, 3, 8, dtype=dtype)
    with pytest.raises(RuntimeError, match="float32 or float64 for the C\\+\\+ CPU kernel"):
        C.broyden_dots.default(x, x, x, x.clone(), x, U, U, torch.zeros(2, 3, 3), torch.zeros(2, 4),
                               1)


def test_no_ext_env_gives_the_references(C, monkeypatch):
    monkeypatch.setenv("DEQ_FAST_NO_EXT", "1")
    ops = get_ops("cpp", torch.device("cpu"), torch.float32)
    assert ops.broyden_dots.func is R.broyden_dots
