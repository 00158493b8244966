"""The C++ CPU kernels of the Anderson and fixed-point solver ops and of ``track_status``
(csrc/cpu/anderson.cpp, fixed_point.cpp, status.cpp; registered as the ops' CPU kernels) against
their pure-torch references (``deq_fast/ops/{anderson,fixed_point,status}.py``), and the engine
choosing them.

Fresh random inputs seeded per case; odd ``D`` below, at and across the C++ tiles (2048) and dot
lanes; ``B = 1``; empty, partial, full and wrapped rings; ``m`` up to 16 and beyond (the C++ solve
then takes its scratch from the heap, the reference takes LAPACK); the last-iteration call
``n = 0``; ``beta != 1``; ``keep_f``; scaled and absolute ridge; stopped and improved samples; NaN
inputs. Outputs the ops write are NaN-filled first, so an element a kernel forgets fails.
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
OPS = ("anderson_residual", "anderson_mix", "fixed_point_step", "track_status")
# max |op - ref| / max(|ref|, 1): the C++ kernels accumulate in double (Anderson's: 64-element
# blocks in the state dtype, then double), the reference in the accumulation dtype (float32 bmm /
# vector_norm), so float32 differs by the reference's rounding
TOL = {torch.float64: 1e-12, torch.float32: 3e-6}
DT_IDS = {torch.float64: "fp64", torch.float32: "fp32"}
DTYPES = [torch.float32, torch.float64]


@pytest.fixture(scope="module")
def C():
    assert extension.load() is not None, extension.extension_status()[1]   # a missing build fails
    for name in OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"deq_fast::{name}", "CPU"), name
    return torch.ops.deq_fast


def _gen(*key) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(key).encode()))


def _randn(gen, shape, dtype, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype)


def _acc(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _assert_close(names, got, want, tol, nan_ok=False):
    for name, a, b in zip(names, got, want):
        a, b = a.double(), b.double()
        if nan_ok:
            assert torch.equal(a.isnan(), b.isnan()), f"{name}: NaN pattern differs"
            a, b = a.nan_to_num(0.0), b.nan_to_num(0.0)
        else:
            assert not a.isnan().any(), f"{name}: NaN left in the output"
        if a.numel() == 0:
            continue
        err = ((a - b).abs().max() / b.abs().max().clamp(min=1)).item()
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


def _ring(gen, B, m, D, written, dtype, scale=0.3):
    """``F, G [B, m, D]`` with the slots in ``written`` filled, the others zero (as the engine
    leaves them); ``gram`` = their Gram matrix in the accumulation dtype."""
    F, G = torch.zeros(B, m, D, dtype=dtype), torch.zeros(B, m, D, dtype=dtype)
    for j in written:
        F[:, j] = _randn(gen, (B, D), dtype)
        G[:, j] = _randn(gen, (B, D), dtype, scale)
    gram = (G.double() @ G.double().transpose(1, 2)).to(_acc(dtype))
    return F, G, gram


# ---- anderson_residual ---------------------------------------------------------------------

# (B, D, m, slot, written before the call): first call, partial ring, full ring (overwrites slot
# 2), m = 1, a long ring (m > 16), D across tiles
RESIDUAL = [(1, 37, 5, 0, ()), (3, 2500, 6, 3, (0, 1, 2)), (2, 4101, 6, 2, tuple(range(6))),
            (2, 33, 1, 0, (0,)), (2, 40, 20, 17, tuple(range(20))), (1, 2048, 7, 6, (0, 1, 2, 3, 4, 5))]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("B,D,m,slot,written", RESIDUAL,
                         ids=[f"B{c[0]}-D{c[1]}-m{c[2]}-s{c[3]}-w{len(c[4])}" for c in RESIDUAL])
def test_anderson_residual_equals_reference(C, dtype, B, D, m, slot, written):
    gen = _gen("residual", dtype, B, D, m, slot, written)
    F, G, gram = _ring(gen, B, m, D, written, dtype)
    x, fx = _randn(gen, (B, D), dtype), _randn(gen, (B, D), dtype)
    acc = _acc(dtype)
    got = [F.clone(), G.clone(), gram.clone(), torch.full((B, 2), NAN, dtype=acc)]
    got[2][:, slot, :] = NAN                       # the row and column the op must write
    got[2][:, :, slot] = NAN
    want = [F.clone(), G.clone(), gram.clone(), torch.empty(B, 2, dtype=acc)]
    C.anderson_residual.default(x, fx, *got, slot)
    R.anderson_residual(x, fx, *want, slot)
    _assert_close(["F", "G", "gram", "sq"], got, want, TOL[dtype])
    assert torch.equal(got[1][:, slot], fx - x)    # g formed in the state dtype, as torch.sub


def test_anderson_residual_non_contiguous_fx(C):
    """``f`` may return any strides (the locuslab contract): the kernel reads it as its values."""
    gen = _gen("strides")
    B, D, m = 3, 50, 4
    F, G, gram = _ring(gen, B, m, D, (0, 1), torch.float32)
    x = _randn(gen, (B, D), torch.float32)
    fx = _randn(gen, (D, B), torch.float32).t()
    got = [F.clone(), G.clone(), gram.clone(), torch.empty(B, 2)]
    want = [F.clone(), G.clone(), gram.clone(), torch.empty(B, 2)]
    C.anderson_residual.default(x, fx, *got, 2)
    R.anderson_residual(x, fx, *want, 2)
    _assert_close(["F", "G", "gram", "sq"], got, want, TOL[torch.float32])


def test_anderson_residual_nan_input(C):
    """A non-finite ``f`` value reaches the Gram row and the norms exactly as in the reference."""
    gen = _gen("nan-residual")
    B, D, m = 3, 70, 5
    F, G, gram = _ring(gen, B, m, D, (0, 1, 2), torch.float32)
    x, fx = _randn(gen, (B, D), torch.float32), _randn(gen, (B, D), torch.float32)
    fx[1, 13] = NAN
    got = [F.clone(), G.clone(), gram.clone(), torch.empty(B, 2)]
    want = [F.clone(), G.clone(), gram.clone(), torch.empty(B, 2)]
    C.anderson_residual.default(x, fx, *got, 3)
    R.anderson_residual(x, fx, *want, 3)
    _assert_close(["F", "G", "gram", "sq"], got, want, TOL[torch.float32], nan_ok=True)
    assert got[3][1].isnan().all() and not got[3][0].isnan().any()


# ---- anderson_mix --------------------------------------------------------------------------

# (B, D, m, n, newest, lam, scaled, beta, keep_f)
MIX = [
    (1, 37, 5, 1, 0, 1e-4, True, 1.0, False),        # first mix: one entry
    (3, 2500, 6, 4, 3, 1e-4, True, 1.0, True),       # partial ring, keep_f (TorchDEQ)
    (2, 4101, 6, 6, 2, 1e-4, False, 1.0, True),      # full ring, absolute ridge
    (4, 513, 5, 5, 4, 1e-2, True, 0.7, False),       # damped: beta != 1 reads G too
    (2, 300, 16, 16, 9, 1e-4, True, 0.5, True),      # the largest stack-scratch solve
    (2, 40, 20, 20, 17, 1e-4, False, 1.0, False),    # m > 16: heap scratch (reference: LAPACK)
    (3, 41, 6, 0, 2, 1e-4, True, 1.0, True),         # last iteration: only keep the best
    (2, 41, 6, 0, 5, 1e-4, True, 0.8, False),        # ... with x as the best
]


def _mix_inputs(gen, dtype, B, D, m, n):
    F, G, gram = _ring(gen, B, m, D, range(n), dtype)
    x, best = _randn(gen, (B, D), dtype), _randn(gen, (B, D), dtype)
    improved = torch.rand(B, generator=gen) < 0.5
    improved[0] = True
    if B > 1:
        improved[-1] = False
    return F, G, gram, x, best, improved


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("B,D,m,n,newest,lam,scaled,beta,keep_f", MIX,
                         ids=[f"B{c[0]}-D{c[1]}-m{c[2]}-n{c[3]}-new{c[4]}-{'sc' if c[6] else 'abs'}"
                              f"-beta{c[7]}" + ("-keepf" if c[8] else "") for c in MIX])
def test_anderson_mix_equals_reference(C, dtype, B, D, m, n, newest, lam, scaled, beta, keep_f):
    gen = _gen("mix", dtype, B, D, m, n, newest, lam, scaled, beta, keep_f)
    F, G, gram, x, best, improved = _mix_inputs(gen, dtype, B, D, m, n)
    got = [x.clone() if n == 0 else torch.full_like(x, NAN), best.clone()]
    want = [x.clone(), best.clone()]
    if n > 0 and not keep_f:
        got[0] = x.clone()           # best copies the pre-mix x: the op must read it first
    C.anderson_mix.default(F, G, gram, got[0], got[1], improved, n, newest, lam, scaled, beta, keep_f)
    R.anderson_mix(F, G, gram, want[0], want[1], improved, n, newest, lam, scaled, beta, keep_f)
    _assert_close(["x", "best"], got, want, TOL[dtype])
    if n > 0:
        assert not torch.equal(got[0], x)
    # negative checks: the parameters are not ignored
    if n > 1:
        other = x.clone()
        C.anderson_mix.default(F, G, gram, other, best.clone(), improved, n, newest, lam * 1e4 + 1.0,
                               scaled, beta, keep_f)
        assert not torch.allclose(other, got[0])
    if n > 0 and beta != 1.0:
        other = x.clone()
        C.anderson_mix.default(F, G, gram, other, best.clone(), improved, n, newest, lam, scaled,
                               1.0, keep_f)
        assert not torch.allclose(other, got[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
def test_anderson_mix_singular_gram_takes_the_newest(C, dtype):
    """An all-zero Gram matrix (zero residuals, scaled ridge 0): the one-hot step at ``newest``."""
    gen = _gen("singular", dtype)
    B, D, m, n, newest = 2, 100, 5, 4, 2
    F, G, _, x, best, improved = _mix_inputs(gen, dtype, B, D, m, n)
    gram = torch.zeros(B, m, m, dtype=_acc(dtype))
    got, want = x.clone(), x.clone()
    C.anderson_mix.default(F, G, gram, got, best.clone(), improved, n, newest, 1e-4, True, 1.0, False)
    R.anderson_mix(F, G, gram, want, best.clone(), improved, n, newest, 1e-4, True, 1.0, False)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(got, F[:, newest], rtol=0, atol=0)


def test_anderson_mix_nan_gram_falls_back_per_sample(C):
    """A NaN in one sample's Gram matrix gives that sample the one-hot step (never raises); the
    other samples mix as usual; NaN history values propagate as in the reference's bmm."""
    gen = _gen("nan-mix")
    B, D, m, n, newest = 3, 90, 6, 5, 4
    F, G, gram, x, best, improved = _mix_inputs(gen, torch.float32, B, D, m, n)
    gram[1, 0, 0] = NAN
    got, want = [x.clone(), best.clone()], [x.clone(), best.clone()]
    C.anderson_mix.default(F, G, gram, *got, improved, n, newest, 1e-4, True, 1.0, True)
    R.anderson_mix(F, G, gram, *want, improved, n, newest, 1e-4, True, 1.0, True)
    _assert_close(["x", "best"], got, want, TOL[torch.float32])
    torch.testing.assert_close(got[0][1], F[1, newest], rtol=0, atol=0)
    F[2, 0, 7] = NAN                                          # a NaN history value
    got, want = [x.clone(), best.clone()], [x.clone(), best.clone()]
    C.anderson_mix.default(F, G, gram, *got, improved, n, newest, 1e-4, True, 1.0, True)
    R.anderson_mix(F, G, gram, *want, improved, n, newest, 1e-4, True, 1.0, True)
    _assert_close(["x", "best"], got, want, TOL[torch.float32], nan_ok=True)


# ---- fixed_point_step ---------------------------------------------------------------------

FP = [(1, 37, 1.0), (3, 2500, 1.0), (2, 4101, 0.7), (5, 33, 0.35), (6, 130, 1.0)]


def _step_case(gen, B, D, dtype):
    """``x, fx, best`` and flags covering all four (improved, active) pairs when ``B >= 4``."""
    x, fx, best = (_randn(gen, (B, D), dtype) for _ in range(3))
    improved = torch.rand(B, generator=gen) < 0.5
    active = torch.rand(B, generator=gen) < 0.6
    pairs = [(True, True), (True, False), (False, True), (False, False)]
    for b, (imp, act) in zip(range(B), pairs):
        improved[b], active[b] = imp, act
    return x, fx, best, improved, active


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("B,D,tau", FP, ids=[f"B{b}-D{d}-tau{t}" for b, d, t in FP])
def test_fixed_point_step_equals_reference(C, dtype, B, D, tau):
    gen = _gen("step", dtype, B, D, tau)
    x, fx, best, improved, active = _step_case(gen, B, D, dtype)
    acc = _acc(dtype)
    got = [x.clone(), best.clone(), torch.full((B, 2), NAN, dtype=acc)]
    want = [x.clone(), best.clone(), torch.empty(B, 2, dtype=acc)]
    C.fixed_point_step.default(got[0], fx, got[1], got[2], improved, active, tau)
    R.fixed_point_step(want[0], fx, want[1], want[2], improved, active, tau)
    # x and best: elementwise in the state dtype, rounded as torch rounds it: equal, not close
    torch.testing.assert_close(got[:2], want[:2], rtol=0, atol=0)
    _assert_close(["sq"], got[2:], want[2:], TOL[dtype])
    assert torch.equal(got[1][improved], x[improved])          # the deferred copy: the old x
    assert torch.equal(got[0][~active], x[~active])            # a stopped sample stays put
    if tau != 1.0:                                   # negative check: tau is not ignored
        plain = [x.clone(), best.clone(), torch.empty(B, 2, dtype=acc)]
        C.fixed_point_step.default(plain[0], fx, plain[1], plain[2], improved, active, 1.0)
        assert not torch.allclose(plain[2], got[2])


def test_fixed_point_step_fx_aliasing_x(C):
    """``f`` may return its input: ``fx`` is ``x`` itself."""
    gen = _gen("step-alias")
    x, _, best, improved, active = _step_case(gen, 4, 50, torch.float32)
    got, want = [x.clone(), best.clone(), torch.empty(4, 2)], [x.clone(), best.clone(), torch.empty(4, 2)]
    C.fixed_point_step.default(got[0], got[0], got[1], got[2], improved, active, 0.5)
    R.fixed_point_step(want[0], want[0], want[1], want[2], improved, active, 0.5)
    torch.testing.assert_close(got[:2], want[:2], rtol=0, atol=0)
    _assert_close(["sq"], got[2:], want[2:], TOL[torch.float32])
    # y = 0.5·x + 0.5·x = x exactly: no residual, x unchanged
    assert torch.equal(got[2][:, 0], torch.zeros(4)) and torch.equal(got[0], x)


def test_fixed_point_nan_input(C):
    gen = _gen("fp-nan")
    x, fx = _randn(gen, (3, 65), torch.float32), _randn(gen, (3, 65), torch.float32)
    fx[2, 5] = NAN
    flags = torch.ones(3, dtype=torch.bool)
    got, want = [x.clone(), x.clone(), torch.empty(3, 2)], [x.clone(), x.clone(), torch.empty(3, 2)]
    C.fixed_point_step.default(got[0], fx, got[1], got[2], flags, flags, 0.6)
    R.fixed_point_step(want[0], fx, want[1], want[2], flags, flags, 0.6)
    _assert_close(["sq"], got[2:], want[2:], TOL[torch.float32], nan_ok=True)
    assert got[2][2].isnan().all() and not got[2][:2].isnan().any()
    torch.testing.assert_close(got[:2], want[:2], rtol=0, atol=0, equal_nan=True)


# ---- track_status --------------------------------------------------------------------------

STATUS = [dict(whole_batch=w, stop_together=s, always_update=a, stop_idx=i)
          for w, s, a, i in [(False, False, False, 0), (False, True, False, 1), (True, False, False, 1),
                             (False, False, True, 1), (True, True, False, 0), (False, True, True, 0)]]


def _status_state(gen, B, dtype, T):
    lowest = torch.rand(B, 2, generator=gen, dtype=torch.float64).to(dtype) * 2
    lowest[0] = 1e8
    best_step = torch.randint(0, 5, (B, 2), generator=gen).to(dtype)
    trace = torch.full((T, B, 2), 1e8, dtype=dtype)
    active = torch.rand(B, generator=gen) < 0.8
    active[0] = True
    if B > 2:
        active[1] = False
    return [lowest, best_step, trace, active, torch.zeros(B, dtype=torch.bool)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("B", [1, 7])
@pytest.mark.parametrize("opts", STATUS, ids=lambda o: "-".join(k for k, v in o.items() if v is True)
                         + f"-idx{o['stop_idx']}" or "per-sample")
def test_track_status_equals_reference(C, dtype, B, opts):
    gen = _gen("status", dtype, B, tuple(opts.items()))
    T = 4
    for nan in (False, True):
        sq = (torch.rand(B, 2, generator=gen, dtype=torch.float64) * 3).to(dtype)
        if nan:
            sq[-1, 0] = NAN
        got = _status_state(_gen("state", dtype, B, nan), B, dtype, T)
        want = [t.clone() for t in got]
        for t, tol in ((1, 0.9), (2, 0.0)):      # two consecutive calls: state carried over
            args = (t, float(t + 3), tol, opts["stop_idx"], opts["whole_batch"],
                    opts["stop_together"], opts["always_update"], 1e-9)
            C.track_status.default(sq, *got, *args)
            R.track_status(sq, *want, *args)
            for name, a, b in zip(["lowest", "best_step", "trace", "active", "improved"], got, want):
                torch.testing.assert_close(a, b, rtol=1e-6 if dtype == torch.float32 else 1e-12,
                                           atol=0, equal_nan=True, msg=name)
            sq = sq * torch.tensor([0.5, 0.3], dtype=dtype)   # rel changes too (no exact ties:
            # torch's float sqrt is not always correctly rounded, ours is; 1 ulp may flip a tie)


def test_track_status_strided_sq(C):
    """Broyden passes ``sq = scal[:, 2:]`` (a strided view)."""
    gen = _gen("status-strided")
    scal = torch.rand(5, 4, generator=gen)
    got = _status_state(_gen("s"), 5, torch.float32, 3)
    want = [t.clone() for t in got]
    args = (0, 1.0, 0.5, 1, False, False, False, 1e-9)
    C.track_status.default(scal[:, 2:], *got, *args)
    R.track_status(scal[:, 2:], *want, *args)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


# ---- registration, opcheck, dtypes, the engine -------------------------------------------------

def test_opcheck(C):
    """Schemas (mutated arguments), fake kernels and autograd registration pass torch's checks."""
    gen = _gen("opcheck")
    B, D, m = 2, 40, 4
    F, G, gram = _ring(gen, B, m, D, (0, 1), torch.float32)
    x, fx, best = (_randn(gen, (B, D), torch.float32) for _ in range(3))
    flags = torch.tensor([True, False])
    torch.library.opcheck(C.anderson_residual.default, (x, fx, F, G, gram, torch.empty(B, 2), 2))
    torch.library.opcheck(C.anderson_mix.default,
                          (F, G, gram, x.clone(), best.clone(), flags, 3, 2, 1e-4, True, 0.8, True))
    torch.library.opcheck(C.fixed_point_step.default,
                          (x.clone(), fx, best.clone(), torch.empty(B, 2), flags, flags.flip(0), 0.5))
    torch.library.opcheck(C.track_status.default,
                          (torch.rand(B, 2), torch.full((B, 2), 1e8), torch.zeros(B, 2),
                           torch.zeros(3, B, 2), torch.ones(B, dtype=torch.bool), flags.clone(), 1,
                           2.0, 0.1, 1, False, True, False, 1e-9))


def test_bad_arguments_are_refused(C):
    x = torch.randn(2, 8)
    F, gram = torch.zeros(2, 3, 8), torch.zeros(2, 3, 3)
    with pytest.raises(RuntimeError, match="slot must be in"):
        C.anderson_residual.default(x, x, F, F.clone(), gram, torch.empty(2, 2), 3)
    with pytest.raises(RuntimeError, match="accumulation dtype"):
        C.anderson_residual.default(x, x, F, F.clone(), gram.double(), torch.empty(2, 2), 0)
    flags = torch.ones(2, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="n must be in"):
        C.anderson_mix.default(F, F, gram, x.clone(), x.clone(), flags, 4, 0, 1e-4, True, 1.0, False)
    with pytest.raises(RuntimeError, match="newest must be in"):
        C.anderson_mix.default(F, F, gram, x.clone(), x.clone(), flags, 2, 2, 1e-4, True, 1.0, False)
    with pytest.raises(RuntimeError, match="t must be in"):
        C.track_status.default(torch.rand(2, 2), torch.ones(2, 2), torch.ones(2, 2),
                               torch.zeros(1, 2, 2), flags.clone(), flags.clone(), 1, 1.0, 0.1, 0,
                               False, False, False, 1e-9)
    for bad in ("improved", "active"):        # the message names the flag that is wrong
        imp, act = (flags.int(), flags) if bad == "improved" else (flags, flags[:1])
        with pytest.raises(RuntimeError, match=f"fixed_point_step: {bad} must be a contiguous"):
            C.fixed_point_step.default(x.clone(), x, x.clone(), torch.empty(2, 2), imp, act, 1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_other_dtypes_take_the_reference(C, dtype):
    ops = get_ops("cpp", torch.device("cpu"), dtype)
    for name in ("anderson_residual", "anderson_mix", "fixed_point_step"):
        assert getattr(ops, name).func is getattr(R, name), name
    # track_status touches only the float32 bookkeeping of a half state: its C++ kernel stays
    assert ops.track_status is C.track_status.default
    fast = get_ops("cpp", torch.device("cpu"), torch.float32)
    for name in OPS:
        assert getattr(fast, name) is getattr(C, name).default, name
    x, flags = torch.zeros(2, 8, dtype=dtype), torch.ones(2, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="float32 or float64 for the C\\+\\+ CPU kernel"):
        C.fixed_point_step.default(x, x, x.clone(), torch.zeros(2, 2), flags, flags, 1.0)


def test_no_ext_env_gives_the_references(C, monkeypatch):
    monkeypatch.setenv("DEQ_FAST_NO_EXT", "1")
    ops = get_ops("cpp", torch.device("cpu"), torch.float32)
    for name in OPS:
        assert getattr(ops, name).func is getattr(R, name), name


def _reference_solve(solve):
    import deq_fast.solvers.engine as engine
    orig = engine.get_ops
    try:
        engine.get_ops = lambda backend, device, dtype: get_ops("reference", device, dtype)
        return solve()
    finally:
        engine.get_ops = orig


SOLVES = [("anderson", dict(m=5, tau=1.0)), ("anderson", dict(m=18, tau=0.7)),
          ("fixed_point", dict(tau=1.0)), ("fixed_point", dict(tau=0.6))]


@pytest.mark.parametrize("dtype", DTYPES, ids=DT_IDS.get)
@pytest.mark.parametrize("method,kw", SOLVES, ids=[f"{m}-{'-'.join(f'{k}{v}' for k, v in kw.items())}"
                                                   for m, kw in SOLVES])
def test_solve_uses_the_fused_ops_and_equals_the_reference(C, dtype, method, kw):
    """A CPU solve runs the C++ passes and gives the pure-reference solve's iterates."""
    gen = _gen("solve", dtype, method, tuple(kw.items()))
    W = _randn(gen, (301, 301), torch.float64, 0.9 / 301 ** 0.5).to(dtype)
    b = _randn(gen, (3, 301), dtype)

    def f(z):
        return torch.tanh(z @ W.T + b)

    z0 = torch.zeros(3, 301, dtype=dtype)
    with OpNames() as seen:
        fast = deq_fast.solve(f, z0, method=method, max_iter=25, tol=1e-5, backend="torch", **kw)
    names = ({"deq_fast::anderson_residual", "deq_fast::anderson_mix"} if method == "anderson" else
             {"deq_fast::fixed_point_step"}) | {"deq_fast::track_status"}
    assert names <= seen.names
    ref = _reference_solve(lambda: deq_fast.solve(f, z0, method=method, max_iter=25, tol=1e-5,
                                                  backend="torch", **kw))
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(fast.z, ref.z, rtol=tol, atol=tol)
    torch.testing.assert_close(fast.abs_trace, ref.abs_trace, rtol=tol, atol=tol)
    assert fast.nstep.tolist() == ref.nstep.tolist()


@pytest.mark.parametrize("solver", ["anderson_solver", "fixed_point_iter"])
def test_torchdeq_contract_equals_the_reference(C, solver):
    """TorchDEQ options (keep_f, absolute ridge, stop_together, trace padding) on the C++ path."""
    from deq_fast.compat import torchdeq as tdq
    gen = _gen("tdq", solver)
    w = (torch.rand(257, generator=gen) * 2 - 1) * 0.9
    x = torch.randn(4, 257, generator=gen)

    def f(z):
        return 0.5 * torch.tanh(z * w) + x

    z0 = torch.zeros(4, 257)
    fn = getattr(tdq, solver)
    z, _, info = fn(f, z0, max_iter=30, tol=1e-4)
    zr, _, ref = _reference_solve(lambda: fn(f, z0, max_iter=30, tol=1e-4))
    torch.testing.assert_close(z, zr, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(info["abs_trace"], ref["abs_trace"], rtol=1e-4, atol=1e-6)
    assert info["nstep"].tolist() == ref["nstep"].tolist()
