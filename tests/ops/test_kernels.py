"""The Triton kernels (``deq_fast.kernels``) against their pure-torch references (``deq_fast/ops``).

On CPU the kernels run under Triton's interpreter (``TRITON_INTERPRET=1``, set in conftest.py
before anything imports the kernels); on a CUDA machine they run compiled on the GPU. Inputs are
fresh random tensors (seeded per case), odd ``D``, ``B`` in {1, 3}, histories not yet full and
full/wrapped, every state dtype with an explicit tolerance. Outputs a kernel must write are filled
with NaN first, so an element it forgets fails the comparison. Shapes stay small: the interpreter
costs about 0.5 ms per program instance and per op.

Split-D grids: every test here runs under a forced plan of ``BLOCK_D = 16`` and 32 columns per
program (``SMALL_PLAN``), so ``D = 37`` is 2 chunks (the second a 5-column tail) and ``D = 130``
is 5 (a 2-column tail), each chunk two loop steps; ``test_natural_plan_*`` run the plans the
launchers pick by themselves (B = 1: several chunks per sample).
"""
from __future__ import annotations

import collections
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

# the interpreter evaluates with numpy, which warns where the kernels deliberately divide by zero
# (Broyden's den = 0, a singular Anderson system) before masking the result
pytestmark = pytest.mark.filterwarnings("ignore:.*encountered in:RuntimeWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402, F401  (a declared test dependency: imported, never skipped)

import deq_fast  # noqa: E402
import deq_fast.kernels as K  # noqa: E402
from deq_fast.kernels import _common  # noqa: E402
from deq_fast.ops import table  # noqa: E402
from deq_fast.ops.table import REFERENCE as R  # noqa: E402
from deq_fast.testing import (  # noqa: E402
    DTYPE_IDS,
    KERNEL_TOL,
    NAN,
    Draws,
    acc_dtype,
    max_err,
    nan_empty,
)

DTYPES = list(KERNEL_TOL)   # max |kernel - reference| / max(|reference|, 1) per state dtype
SMALL_PLAN = dict(block_d=16, chunk_d=32)


@pytest.fixture(autouse=True)
def _small_plan(request):
    """Several chunks per sample, with tails, at interpreter-sized shapes (module docstring)."""
    if request.node.name.startswith(("test_plan", "test_natural_plan", "test_forced_plan")):
        yield
        return
    with _common.forced_plan(**SMALL_PLAN):
        yield


def _gen(*key) -> Draws:
    return Draws(*key, device=DEVICE)


def _clone(ts):
    return [t.clone() if isinstance(t, torch.Tensor) else t for t in ts]


def assert_outputs(names, got, want, tol):
    for name, a, e in zip(names, got, want):
        if not isinstance(a, torch.Tensor):
            continue
        if a.dtype == torch.bool:
            assert torch.equal(a, e), f"{name}: {a.tolist()} != {e.tolist()}"
        else:
            err = max_err(a, e)
            assert err <= tol, f"{name}: max err {err:.3g} > tol {tol:.3g}"


# ----------------------------------------------------------------------------- fixed point
def _step_state(gen, B, D, dtype):
    """``x, fx, best`` and per-sample flags; with ``B >= 4`` every (improved, active) pair."""
    x, fx, best = (gen.randn((B, D), dtype) for _ in range(3))
    improved, active = gen.flags(B), gen.flags(B)
    for b, (imp, act) in zip(range(B), [(True, True), (True, False), (False, True), (False, False)]):
        improved[b], active[b] = imp, act
    return x, fx, best, improved, active


def _step_both(x, fx, best, improved, active, tau):
    """``fixed_point_step`` by the kernel and by the reference: ``(got, want)``, each
    ``[x, best, sq]`` (``sq`` NaN-filled first)."""
    sq = nan_empty((x.shape[0], 2), acc_dtype(x.dtype), DEVICE)
    got, want = [x.clone(), best.clone(), sq.clone()], [x.clone(), best.clone(), sq.clone()]
    K.fixed_point_step(got[0], fx, got[1], got[2], improved, active, tau)
    R.fixed_point_step(want[0], fx, want[1], want[2], improved, active, tau)
    return got, want


@pytest.mark.parametrize("tau", [1.0, 0.6], ids=["plain", "damped"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("B,D", [(1, 37), (4, 130)], ids=["B1-D37", "B4-D130"])
def test_fixed_point_step(dtype, B, D, tau):
    gen = _gen("fps", dtype, B, D)
    x, fx, best, improved, active = _step_state(gen, B, D, dtype)
    got, want = _step_both(x, fx, best, improved, active, tau)
    # best: a copy of the old x, exact; x plain: a copy of fx, exact; damped: one rounding of
    # tau·f + (1 - tau)·x (fused in-kernel)
    assert_outputs(["best"], got[1:2], want[1:2], 0.0)
    assert_outputs(["x"], got[:1], want[:1], 0.0 if tau == 1.0 else KERNEL_TOL[dtype])
    assert_outputs(["sq"], got[2:], want[2:], KERNEL_TOL[dtype])
    assert torch.equal(got[1][~improved], best[~improved]) and torch.equal(got[0][~active], x[~active])
    if tau != 1.0:                      # negative check: the damping is not ignored
        plain = nan_empty((B, 2), acc_dtype(dtype), DEVICE)
        R.fixed_point_step(x.clone(), fx, best.clone(), plain, improved, active)
        assert max_err(got[2], plain) > KERNEL_TOL[dtype]


def test_fixed_point_step_strided_fx():
    """``f`` may return a strided view: the launcher copies it, the result is unchanged."""
    gen = _gen("fps-strided")
    x, _, best, improved, active = _step_state(gen, 4, 37, torch.float32)
    fx = gen.randn((37, 4), torch.float32).t()
    got, want = _step_both(x, fx, best, improved, active, 1.0)
    assert_outputs(["x", "best", "sq"], got, want, KERNEL_TOL[torch.float32])



@pytest.mark.parametrize("tau", [1.0, 0.6], ids=["plain", "damped"])
def test_fixed_point_step_fx_aliasing_x(tau):
    """``f`` may return its input: with ``fx`` the very tensor ``x``, the kernel equals the
    reference on a separate copy (each element loaded before it is stored)."""
    gen = _gen("fps-alias")
    x, _, best, improved, active = _step_state(gen, 4, 130, torch.float32)
    got_x, got_best, want_best = x.clone(), best.clone(), best.clone()
    got_sq = nan_empty((4, 2), torch.float32, DEVICE)
    want_sq, want_x = got_sq.clone(), x.clone()
    K.fixed_point_step(got_x, got_x, got_best, got_sq, improved, active, tau)
    R.fixed_point_step(want_x, x.clone(), want_best, want_sq, improved, active, tau)
    assert_outputs(["x", "best", "sq"], [got_x, got_best, got_sq], [want_x, want_best, want_sq],
                   KERNEL_TOL[torch.float32])
    assert torch.equal(got_best[improved], x[improved])

# ---------------------------------------------------------------------------------- Anderson
def _anderson_state(gen, B, D, m, filled, dtype):
    """Rings with ``filled`` written slots (the rest zero, as the engine keeps them) and their
    consistent Gram matrix."""
    F = torch.zeros(B, m, D, dtype=dtype, device=DEVICE)
    G = torch.zeros(B, m, D, dtype=dtype, device=DEVICE)
    F[:, :filled] = gen.randn((B, filled, D), dtype)
    G[:, :filled] = gen.randn((B, filled, D), dtype, 0.5)
    Ga = G.to(acc_dtype(dtype))
    gram = torch.bmm(Ga, Ga.transpose(1, 2))
    return F, G, gram


# (B, D, m, slot, filled): m = 1; first write; history not full; full ring, wrapped slot
RESIDUAL_CASES = [(1, 37, 1, 0, 0), (3, 37, 5, 0, 0), (3, 130, 5, 2, 2), (3, 37, 5, 3, 5)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("B,D,m,slot,filled", RESIDUAL_CASES,
                         ids=[f"B{c[0]}-D{c[1]}-m{c[2]}-s{c[3]}-n{c[4]}" for c in RESIDUAL_CASES])
def test_anderson_residual(dtype, B, D, m, slot, filled):
    gen = _gen("ar", dtype, B, D, m, slot, filled)
    F, G, gram = _anderson_state(gen, B, D, m, filled, dtype)
    F[:, slot] = NAN                                   # must be written
    G[:, slot] = NAN
    gram[:, slot, :] = NAN
    gram[:, :, slot] = NAN
    x, fx = gen.randn((B, D), dtype), gen.randn((B, D), dtype)
    sq = nan_empty((B, 2), acc_dtype(dtype), DEVICE)
    got, want = [F, G, gram, sq], _clone([F, G, gram, sq])
    K.anderson_residual(x, fx, *got, slot)
    R.anderson_residual(x, fx, *want, slot)
    assert_outputs(["F", "G", "gram", "sq"], got, want, KERNEL_TOL[dtype])


# (B, D, m, n, newest, lam, scaled, beta, keep_f)
MIX_CASES = [
    (1, 37, 1, 1, 0, 1e-4, True, 1.0, False),       # m = 1: a plain f step
    (3, 37, 5, 2, 1, 1e-4, True, 1.0, False),       # history not yet full
    (3, 130, 5, 5, 2, 1e-4, True, 0.7, True),       # full, wrapped (newest in the middle), damped
    (3, 37, 6, 6, 5, 1e-2, False, 1.0, True),       # absolute ridge (TorchDEQ)
    (3, 37, 5, 0, 3, 1e-4, True, 1.0, False),       # n == 0: only the best copy
]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("B,D,m,n,newest,lam,scaled,beta,keep_f", MIX_CASES,
                         ids=[f"B{c[0]}-D{c[1]}-m{c[2]}-n{c[3]}-new{c[4]}-beta{c[7]}"
                              f"-keepf{int(c[8])}" for c in MIX_CASES])
def test_anderson_mix(dtype, B, D, m, n, newest, lam, scaled, beta, keep_f):
    gen = _gen("am", dtype, B, D, m, n, newest)
    F, G, gram = _anderson_state(gen, B, D, m, max(n, 1), dtype)
    # x is written completely when n > 0 (and only then read: for the best copy when not keep_f)
    x = nan_empty((B, D), dtype, DEVICE) if (n > 0 and keep_f) else \
        gen.randn((B, D), dtype)
    best = gen.randn((B, D), dtype)
    improved = gen.flags(B)
    got, want = [x, best], _clone([x, best])
    args = (n, newest, lam, scaled, beta, keep_f)
    K.anderson_mix(F, G, gram, *got, improved, *args)
    R.anderson_mix(F, G, gram, *want, improved, *args)
    assert_outputs(["x", "best"], got, want, KERNEL_TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_IDS.get)
def test_anderson_mix_fallback(dtype):
    """Singular (zero Gram, no ridge) and NaN systems fall back to the one-hot at ``newest``,
    per sample, without touching the healthy sample."""
    B, D, m, n, newest = 3, 37, 4, 4, 2
    gen = _gen("am-fallback", dtype)
    F, G, gram = _anderson_state(gen, B, D, m, n, dtype)
    gram[0] = 0.0
    gram[1, 2, 1] = NAN                               # lower triangle: the part a Cholesky reads
    got = nan_empty((B, D), dtype, DEVICE)
    want = got.clone()
    best, improved = torch.zeros(B, D, dtype=dtype, device=DEVICE), gen.flags(B)
    K.anderson_mix(F, G, gram, got, best.clone(), improved, n, newest, 0.0, False, 1.0, True)
    R.anderson_mix(F, G, gram, want, best.clone(), improved, n, newest, 0.0, False, 1.0, True)
    assert max_err(got, want) <= KERNEL_TOL[dtype]
    assert torch.equal(got[:2], F[:2, newest])                     # one-hot: x = F[newest]
    assert not torch.equal(got[2], F[2, newest])


def test_anderson_mix_lam_and_beta_matter():
    """Negative check: a kernel that ignored ``lam``, ``scaled`` or ``beta`` would fail."""
    B, D, m = 3, 37, 5
    gen = _gen("am-neg")
    F, G, gram = _anderson_state(gen, B, D, m, m, torch.float32)
    improved = torch.zeros(B, dtype=torch.bool, device=DEVICE)
    best = torch.zeros(B, D, device=DEVICE)

    def run(fn, lam, scaled, beta):
        x = torch.zeros(B, D, device=DEVICE)
        fn(F, G, gram, x, best, improved, m, 1, lam, scaled, beta, False)
        return x

    base = run(R.anderson_mix, 1e-4, True, 1.0)
    for lam, scaled, beta in [(0.5, True, 1.0), (1e-4, True, 0.5), (0.5, False, 1.0)]:
        got = run(K.anderson_mix, lam, scaled, beta)
        assert max_err(got, run(R.anderson_mix, lam, scaled, beta)) <= KERNEL_TOL[torch.float32]
        assert max_err(got, base) > 100 * KERNEL_TOL[torch.float32], (lam, scaled, beta)


def test_long_history_takes_the_reference():
    """Anderson m > 16: the registered ops fall back to the reference instead of failing."""
    f, x0 = _problem(B=1, D=19)
    kw = dict(method="anderson", max_iter=3, tol=0.0, m=17)
    got = deq_fast.solve(f, x0, backend="triton", **kw)
    want = deq_fast.solve(f, x0, backend="reference", **kw)
    assert max_err(got.z, want.z) == 0.0


def _triton_broyden_solve(f, x0, **kw):
    """A Triton Broyden solve and the launches of its two passes."""
    from deq_fast.aot import record_launches
    with record_launches() as launches:
        got = deq_fast.solve(f, x0, method="broyden", backend="triton", **kw)
    return got, [x for x in launches if x.kernel.startswith("_broyden")]


def test_long_broyden_ring_runs_on_triton():
    """Broyden L > 256 (not a whole number of ring blocks): both passes launch the Triton kernels
    with the ring-block loops every iteration (no reference fallback) and equal the reference."""
    f, x0 = _problem(B=1, D=19)
    kw = dict(max_iter=4, tol=0.0, memory=300)
    got, launches = _triton_broyden_solve(f, x0, **kw)
    want = deq_fast.solve(f, x0, method="broyden", backend="reference", **kw)
    assert len(launches) == 2 * 4 and all(x.options["MANY_BLOCKS"] for x in launches)
    assert max_err(got.z, want.z) <= 1e-5
    assert max_err(got.rel_trace, want.rel_trace) <= 1e-5


@pytest.mark.slow       # about a minute under the interpreter: 260 iterations of 2-5 ring blocks
def test_solve_past_256_iterations_equals_reference():
    """``max_iter = 260`` (``memory`` defaults to it): the rings grow past 256 written slots, on
    Triton, and the solve equals the reference (float64; B = 1, a 2-step chunk with a tail)."""
    f, x0 = _problem(B=1, D=19, dtype=torch.float64)
    kw = dict(max_iter=260, tol=0.0)
    got, launches = _triton_broyden_solve(f, x0, **kw)
    want = deq_fast.solve(f, x0, method="broyden", backend="reference", **kw)
    written = [x.bound()["n_valid"] for x in launches if x.kernel == "_broyden_update_kernel"]
    assert max(written) > 256
    assert max_err(got.z, want.z) <= 1e-12
    assert max_err(got.rel_trace, want.rel_trace) <= 1e-12
    # the converging iterations (before the residual reaches rounding noise) to 1e-9 relative
    head = want.rel_trace[:20]
    assert float(((got.rel_trace[:20] - head).abs() / head.abs()).max()) <= 1e-9


# ----------------------------------------------------------------------------------- Broyden
def _broyden_state(gen, B, D, L, n_valid, dtype):
    """Rings with ``n_valid`` written rows; rows (and ``ab`` entries) beyond are zero."""
    U = torch.zeros(B, L, D, dtype=dtype, device=DEVICE)
    V = torch.zeros(B, L, D, dtype=dtype, device=DEVICE)
    U[:, :n_valid] = gen.randn((B, n_valid, D), dtype, 0.2)
    V[:, :n_valid] = gen.randn((B, n_valid, D), dtype, 0.2)
    return U, V


# (B, D, L, n_valid): empty ring, partly filled (odd, not a multiple of 4), full; then ring
# lengths around the ring block (RING_BLOCK = 64 slots per tile): one slot, one block less one,
# exactly one, one block and one slot, and rings of several blocks, full or ending mid-block
DOTS_CASES = [(1, 37, 4, 0), (3, 130, 6, 3), (3, 37, 5, 5), (1, 37, 1, 1), (3, 37, 63, 63),
              (1, 130, 64, 64), (3, 37, 65, 65), (1, 37, 257, 257), (3, 37, 300, 300),
              (1, 130, 300, 130)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("B,D,L,n_valid", DOTS_CASES,
                         ids=[f"B{c[0]}-D{c[1]}-L{c[2]}-nv{c[3]}" for c in DOTS_CASES])
def test_broyden_dots(dtype, B, D, L, n_valid):
    gen = _gen("bd", dtype, B, D, L, n_valid)
    U, V = _broyden_state(gen, B, D, L, n_valid, dtype)
    x, fx = gen.randn((B, D), dtype), gen.randn((B, D), dtype)
    g_old = gen.randn((B, D), dtype)
    dx = gen.randn((B, D), dtype, 0.3)
    acc = acc_dtype(dtype)
    g = nan_empty((B, D), dtype, DEVICE)
    abc = torch.zeros(B, 3, L, dtype=acc, device=DEVICE)
    abc[:, :, :n_valid] = NAN
    scal = nan_empty((B, 4), acc, DEVICE)
    got, want = [g, abc, scal], _clone([g, abc, scal])
    K.broyden_dots(x, fx, g_old, got[0], dx, U, V, got[1], got[2], n_valid)
    R.broyden_dots(x, fx, g_old, want[0], dx, U, V, want[1], want[2], n_valid)
    assert_outputs(["g", "abc", "scal"], got, want, KERNEL_TOL[dtype])


# (B, D, L, n_valid, slot, zero_step): first update, not full, wrapped ring (evicts slot 2),
# a zero previous step (den = 0: u = +-inf/NaN -> 0); then long rings as for pass 1, the slot
# written in the first, a middle and the last ring block (wrapped rings evict it)
UPDATE_CASES = [(1, 37, 4, 0, 0, False), (3, 130, 6, 3, 3, False), (3, 37, 5, 5, 2, False),
                (3, 37, 4, 0, 0, True), (1, 37, 1, 1, 0, False), (3, 37, 63, 40, 40, False),
                (1, 130, 64, 64, 17, False), (3, 37, 65, 65, 64, False),
                (1, 37, 257, 200, 200, False), (3, 37, 300, 300, 299, False),
                (1, 130, 300, 300, 70, False), (3, 37, 300, 300, 130, True)]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("B,D,L,n_valid,slot,zero_step", UPDATE_CASES,
                         ids=[f"B{c[0]}-D{c[1]}-L{c[2]}-nv{c[3]}-s{c[4]}" + ("-dx0" if c[5] else "")
                              for c in UPDATE_CASES])
def test_broyden_update(dtype, B, D, L, n_valid, slot, zero_step):
    gen = _gen("bu", dtype, B, D, L, n_valid, slot, zero_step)
    U, V = _broyden_state(gen, B, D, L, n_valid, dtype)
    x, fx = gen.randn((B, D), dtype), gen.randn((B, D), dtype)
    g_old = gen.randn((B, D), dtype)
    dx = gen.randn((B, D), dtype, 0.3)
    if zero_step:
        dx.zero_()
    acc = acc_dtype(dtype)
    g, abc, scal = torch.empty(B, D, dtype=dtype, device=DEVICE), \
        torch.zeros(B, 3, L, dtype=acc, device=DEVICE), torch.empty(B, 4, dtype=acc, device=DEVICE)
    R.broyden_dots(x, fx, g_old, g, dx, U, V, abc, scal, n_valid)   # consistent pass-1 outputs
    best = gen.randn((B, D), dtype)
    improved, active = gen.flags(B), gen.flags(B)
    active[0] = True
    got, want = [x, dx, U, V, best], _clone([x, dx, U, V, best])

    def call(fn, t):
        fn(t[0], g, g_old, t[1], t[2], t[3], abc, scal, t[4], improved, active, slot, n_valid)

    call(K.broyden_update, got)
    call(R.broyden_update, want)
    assert_outputs(["x", "dx", "U", "V", "best"], got, want, KERNEL_TOL[dtype])


# ------------------------------------------------------------------------------------ status
STATUS_FLAGS = [(wb, st, au, si) for wb in (False, True) for st in (False, True)
                for au in (False, True) for si in (0, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("whole_batch,stop_together,always_update,stop_idx", STATUS_FLAGS,
                         ids=[f"wb{int(a)}-st{int(b)}-au{int(c)}-{'abs' if d == 0 else 'rel'}"
                              for a, b, c, d in STATUS_FLAGS])
def test_track_status(dtype, B, whole_batch, stop_together, always_update, stop_idx):
    gen = _gen("ts", dtype, B, whole_batch, stop_together, always_update, stop_idx)
    scal = (torch.rand(B, 4, generator=gen.gen, dtype=torch.float64) * 2).to(dtype).to(DEVICE)
    sq = scal[:, 2:]                                  # Broyden passes this strided view
    if B > 1:
        sq[1, 0] = NAN                                # f went non-finite for sample 1
    lowest = (torch.rand(B, 2, generator=gen.gen, dtype=torch.float64) * 1.5).to(dtype).to(DEVICE)
    best_step = torch.zeros(B, 2, dtype=dtype, device=DEVICE)
    trace = nan_empty((4, B, 2), dtype, DEVICE)
    active = gen.flags(B)
    improved = torch.zeros(B, dtype=torch.bool, device=DEVICE)
    got = [lowest, best_step, trace, active, improved]
    want = _clone(got)
    # tol between the typical residuals: some samples stop, some continue
    args = (2, 7.0, -float("inf") if always_update else 0.6, stop_idx, whole_batch, stop_together,
            always_update, 1e-9)
    K.track_status(sq, *got, *args)
    R.track_status(sq, *want, *args)
    assert_outputs(["lowest", "best_step", "trace", "active", "improved"], got, want, KERNEL_TOL[dtype])


@pytest.mark.parametrize("whole_batch,stop_together", [(False, False), (True, True)])
def test_track_status_several_blocks(whole_batch, stop_together):
    """B > 1024: the single program loops over batch blocks (sums and ``any`` across blocks)."""
    B = 1500
    gen = _gen("ts-big", whole_batch, stop_together)
    sq = torch.rand(B, 2, generator=gen.gen).to(DEVICE)
    sq[:, 1] += 1.0
    lowest = torch.rand(B, 2, generator=gen.gen).to(DEVICE)
    got = [lowest, torch.zeros(B, 2, device=DEVICE), torch.full((2, B, 2), NAN, device=DEVICE),
           torch.ones(B, dtype=torch.bool, device=DEVICE),
           torch.zeros(B, dtype=torch.bool, device=DEVICE)]
    want = _clone(got)
    args = (1, 3.0, 0.5, 1, whole_batch, stop_together, False, 1e-9)
    K.track_status(sq, *got, *args)
    R.track_status(sq, *want, *args)
    assert_outputs(["lowest", "best_step", "trace", "active", "improved"], got, want,
                   KERNEL_TOL[torch.float32])


# ------------------------------------------------------------------------ boundary and registry
def test_launchers_validate_arguments():
    x = torch.zeros(2, 37, device=DEVICE)
    flags = torch.zeros(2, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="sq"):
        K.fixed_point_step(x, x, x.clone(), torch.zeros(2, 2, dtype=torch.float64, device=DEVICE),
                           flags, flags)
    with pytest.raises(ValueError, match="fx"):
        K.fixed_point_step(x, torch.zeros(2, 36, device=DEVICE), x.clone(),
                           torch.zeros(2, 2, device=DEVICE), flags, flags)
    with pytest.raises(ValueError, match="improved"):
        K.fixed_point_step(x, x, x.clone(), torch.zeros(2, 2, device=DEVICE), flags.int(), flags)
    U = torch.zeros(2, 0, 37, device=DEVICE)
    with pytest.raises(ValueError, match="L >= 1"):
        K.broyden_dots(x, x, x, x.clone(), x, U, U, torch.zeros(2, 3, 0, device=DEVICE),
                       torch.zeros(2, 4, device=DEVICE), 0)
    U = torch.zeros(2, 300, 37, device=DEVICE)
    with pytest.raises(ValueError, match="n_valid"):
        K.broyden_dots(x, x, x, x.clone(), x, U, U, torch.zeros(2, 3, 300, device=DEVICE),
                       torch.zeros(2, 4, device=DEVICE), 301)
    F = torch.zeros(2, 17, 37, device=DEVICE)
    with pytest.raises(ValueError, match="m <= 16"):
        K.anderson_residual(x, x, F, F, torch.zeros(2, 17, 17, device=DEVICE),
                            torch.zeros(2, 2, device=DEVICE), 0)
    F, gram = torch.zeros(2, 3, 37, device=DEVICE), torch.zeros(2, 3, 3, device=DEVICE)
    with pytest.raises(ValueError, match="newest"):
        K.anderson_mix(F, F, gram, x, x.clone(), flags, 3, 3, 1e-4, True, 1.0, False)
    with pytest.raises(ValueError, match="x"):
        K.fixed_point_step(x.long(), x.long(), x.long(), torch.zeros(2, 2, device=DEVICE), flags,
                           flags)


def test_ops_registered_with_triton_kernels():
    assert DEVICE in table.register_triton()


def _op_args():
    B, D, m, L = 2, 37, 3, 3
    x, fx, best = torch.randn(B, D), torch.randn(B, D), torch.randn(B, D)
    flags = torch.tensor([True, False])
    F, G = torch.randn(B, m, D), torch.randn(B, m, D)
    gram = torch.bmm(G, G.transpose(1, 2))
    U, V = torch.randn(B, L, D) * 0.1, torch.randn(B, L, D) * 0.1
    ab, scal = torch.randn(B, 3, L), torch.rand(B, 4) + 1
    trace = torch.zeros(3, B, 2)
    return {
        "anderson_residual": (x, fx, F, G, gram, torch.empty(B, 2), 1),
        "anderson_mix": (F, G, gram, x.clone(), best.clone(), flags, 2, 1, 1e-4, True, 0.8, False),
        "broyden_dots": (x, fx, best, torch.empty(B, D), x.clone(), U, V, ab.clone(),
                         scal.clone(), L),
        "broyden_update": (x.clone(), fx, best, x.clone(), U.clone(), V.clone(), ab, scal,
                           best.clone(), flags, flags.clone(), 1, L),
        "fixed_point_step": (x.clone(), fx, best.clone(), torch.empty(B, 2), flags, flags.flip(0)),
        "track_status": (torch.rand(B, 2), torch.full((B, 2), 1e8), torch.zeros(B, 2), trace,
                         flags.clone(), flags.clone(), 1, 2.0, 1e-3, 1, False, False, False, 1e-9),
    }


@pytest.mark.parametrize("namespace", ["deq_fast", "deq_fast_reference"])
@pytest.mark.parametrize("name", list(_op_args()))
def test_opcheck(name, namespace):
    """Schema (declared mutations), fake kernel and AOT dispatch of every custom op (and of its
    reference-only twin, what ``torch.compile`` traces for ``backend='reference'``)."""
    args = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in _op_args()[name])
    torch.library.opcheck(getattr(getattr(torch.ops, namespace), name).default, args)


# ------------------------------------------------------------------------------- end to end
def _problem(B=3, D=37, dtype=torch.float32):
    gen = _gen("e2e", B, D)
    W = (torch.randn(D, D, generator=gen.gen) * 0.4 / D ** 0.5).to(dtype).to(DEVICE)
    bias = torch.randn(B, D, generator=gen.gen).to(dtype).to(DEVICE)
    return (lambda z: torch.tanh(z @ W + bias)), torch.zeros(B, D, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=DTYPE_IDS.get)
@pytest.mark.parametrize("method", ["anderson", "broyden", "fixed_point"])
def test_solve_triton_equals_torch(method, dtype):
    f, x0 = _problem(dtype=dtype)
    kw = dict(method=method, max_iter=10, tol=1e-5, m=4)
    got = deq_fast.solve(f, x0, backend="triton", **kw)
    want = deq_fast.solve(f, x0, backend="reference", **kw)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert got.backend == "triton" and want.backend == "reference"
    assert got.nfe == want.nfe
    assert max_err(got.z, want.z) <= tol
    assert max_err(got.rel_trace, want.rel_trace) <= tol
    assert torch.equal(got.nstep, want.nstep)
    if method == "broyden" and dtype == torch.float64:
        # the late rank-1 factors divide by tiny steps (den ~ ||dx||^2): they amplify rounding
        # differences (~1e-3 relative in float32), so they are compared in float64
        for a, b in zip(got.factors, want.factors):
            assert max_err(a, b) <= 1e-9


@pytest.mark.parametrize("solver", ["anderson_solver", "broyden_solver", "fixed_point_iter"])
def test_torchdeq_api_triton_equals_torch(solver, monkeypatch):
    """The TorchDEQ-style API with the backend forced through the environment."""
    f, x0 = _problem(B=2)
    fn = getattr(deq_fast, solver)
    monkeypatch.setenv("DEQ_FAST_BACKEND", "triton")
    z_t, traj_t, info_t = fn(f, x0, max_iter=8, tol=1e-5)
    monkeypatch.setenv("DEQ_FAST_BACKEND", "reference")
    z_r, traj_r, info_r = fn(f, x0, max_iter=8, tol=1e-5)
    assert info_t["backend"] == "triton" and info_r["backend"] == "reference"
    assert max_err(z_t, z_r) <= 1e-5
    assert max_err(info_t["rel_lowest"], info_r["rel_lowest"]) <= 1e-5


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_locuslab_api_triton_equals_torch(solver):
    """The locuslab/deq-style API (whole-batch norms, extra stop rules) with ``backend=``."""
    f, x0 = _problem(B=2)
    fn = getattr(deq_fast, solver)
    got = fn(f, x0, threshold=8, eps=1e-5, backend="triton")
    want = fn(f, x0, threshold=8, eps=1e-5, backend="reference")
    assert max_err(got["result"], want["result"]) <= 1e-5
    assert got["nstep"] == want["nstep"] and len(got["rel_trace"]) == len(want["rel_trace"])
    assert max_err(torch.tensor(got["rel_trace"]), torch.tensor(want["rel_trace"])) <= 1e-5


class _CountOps(TorchDispatchMode):
    """Counts dispatched ops that launch work (views excluded) and host syncs."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            self.ops[func.namespace + "::" + func.__name__.split(".")[0]] += 1
        return func(*args, **(kwargs or {}))


def _count(fn) -> collections.Counter:
    with _CountOps() as mode:
        fn()
    return mode.ops


@pytest.mark.parametrize("method,tau", [("anderson", 1.0), ("broyden", 1.0), ("fixed_point", 1.0),
                                        ("anderson", 0.7), ("fixed_point", 0.7)])
def test_launches_per_iteration(method, tau, monkeypatch):
    """Triton path: exactly 3 fused launches per iteration besides ``f`` (pass 1, status, pass 2),
    2 for fixed point (the fused step, status; damping included), no other op and no host sync
    (``check_every=0``). On a GPU the launches are the dispatched ``deq_fast::`` ops; on the CPU
    (interpreter) the launchers called directly, whose interpreter-internal ops are not counted."""
    from deq_fast.ops import dispatch

    f, x0 = _problem(B=2)
    f_ops = _count(lambda: f(x0))
    launches = collections.Counter()
    if DEVICE == "cpu":
        table = dispatch.get_ops("triton", x0.device, x0.dtype)

        def counted(name, fn):
            def launch(*args):
                launches["deq_fast::" + name] += 1
                with torch.utils._python_dispatch._disable_current_modes():
                    return fn(*args)
            return launch
        counted_table = table._replace(**{name: counted(name, getattr(table, name))
                                          for name in dispatch.OP_NAMES})
        monkeypatch.setattr(dispatch, "_triton_direct", lambda: counted_table)

    def solve(n):
        launches.clear()
        ops = _count(lambda: deq_fast.solve(f, x0, method=method, max_iter=n, tol=0.0, m=3,
                                            tau=tau, check_every=0, backend="triton"))
        return ops + launches

    n1, n2 = 4, 7
    per_iter = solve(n2)
    per_iter.subtract(solve(n1))
    for op, k in f_ops.items():
        per_iter[op] -= k * (n2 - n1)
    per_iter = {op: k / (n2 - n1) for op, k in per_iter.items() if k}
    fused = {op: k for op, k in per_iter.items() if op.startswith("deq_fast::")}
    assert sum(fused.values()) == (2 if method == "fixed_point" else 3), per_iter
    assert per_iter == fused, f"non-fused ops per iteration: {per_iter}"
    assert "aten::_local_scalar_dense" not in per_iter


def test_selftest_table(monkeypatch):
    """``python -m deq_fast.selftest`` passes here, and reports FAIL for a broken kernel."""
    from deq_fast import selftest

    rows = selftest.run_kernel_checks(DEVICE, [(1, 37)], ops=("fixed_point_step", "anderson_mix"))
    assert len(rows) == 8 and all(r.ok for r in rows), rows

    def broken(x, fx, best, sq, improved, active, tau=1.0):       # forgets ||y||^2
        K.fixed_point_step(x, fx, best, sq, improved, active, tau)
        sq[:, 1] = NAN

    monkeypatch.setattr(K, "fixed_point_step", broken)
    rows = selftest.run_kernel_checks(DEVICE, [(1, 37)], ops=("fixed_point_step",))
    assert not any(r.ok for r in rows)


# ------------------------------------------------------------------------- split-D launch plans
PLAN_SHAPES = [(B, D) for B in (1, 8, 32, 128) for D in (65536, 196608, 524288)]
ROWS = {"anderson": (1, 5, 16), "broyden": (1, 8, 30, 64, 65, 200, 300, 512, 4096),
        "fixed_point": (0,)}


def _plans(sms=132):
    """Every module's plan over the issue's shapes, ring lengths and element sizes."""
    from deq_fast.kernels import anderson, broyden, fixed_point
    for B, D in PLAN_SHAPES + [(3, 37), (1, 1000), (1024, 4096)]:
        for size in (2, 4, 8):
            for m in ROWS["anderson"]:
                yield "anderson", B, D, m, size, 2, anderson.launch_plan(B, D, m, size, sms)
            for L in ROWS["broyden"]:
                yield "broyden", B, D, L, size, 5, broyden.launch_plan(B, D, L, size, sms)
            yield "fixed_point", B, D, 0, size, 2, fixed_point.launch_plan(B, D, size, sms)


@pytest.mark.parametrize("sms", [132, 108], ids=["H100", "A100"])
def test_plans_cover_d_and_fit_registers(sms):
    """Chunks tile ``[0, D)`` exactly (whole ``BLOCK_D`` steps, one tail at most) and the live
    tiles stay within the register budget (no spills by construction) for every ring length:
    Broyden's tiles hold one ring block of at most ``RING_BLOCK`` slots."""
    from deq_fast.kernels import broyden
    for kind, B, D, rows, size, tiles, p in _plans(sms):
        assert p.grid == (B, p.chunks), (kind, B, D)
        assert p.chunk_d % p.BLOCK_D == 0 and (p.chunks - 1) * p.chunk_d < D <= p.chunks * p.chunk_d
        assert p.BLOCK_D & (p.BLOCK_D - 1) == 0 and p.BLOCK_D >= _common.MIN_BLOCK_D
        tile_rows = min(_common.rows_pad(rows), broyden.RING_BLOCK) if kind == "broyden" else \
            _common.rows_pad(rows) if rows else 1
        assert p.ROWS_PAD == tile_rows, (kind, rows, p)
        regs = tiles * p.ROWS_PAD * p.BLOCK_D * (2 if size == 8 else 1) / (32 * p.num_warps)
        assert regs <= _common.REG_BUDGET, (kind, rows, size, p)
        # warps along D: no more warps than BLOCK_D holds with 16-byte vectors, unless half as
        # many would exceed the register budget
        if p.BLOCK_D >= 32 * (16 // size):
            assert p.num_warps * 32 * (16 // size) <= p.BLOCK_D or 2 * regs > _common.REG_BUDGET, p


def test_plans_fill_the_gpu():
    """Every SM holds several programs for the issue's shapes, B = 1 included, and the grid does
    not grow past about PROGRAMS_PER_SM per SM once the batch alone fills the GPU."""
    for kind, B, D, rows, size, tiles, p in _plans():
        if (B, D) in PLAN_SHAPES:
            assert p.programs_per_sm(132) >= 3.8, (kind, B, D, rows, size, p)
            assert p.chunks == 1 or p.programs_per_sm(132) < 2 * _common.PROGRAMS_PER_SM, p


def test_plan_at_b1_spreads_one_sample():
    p = _common.plan(1, 65536, 4, 132, rows=6)
    assert p.grid == (1, 512) and p.BLOCK_D == 128 and p.chunk_d == 128 and p.num_warps == 1
    big = _common.plan(2048, 65536, 4, 132, rows=6)      # the batch fills the GPU: one chunk
    assert big.grid == (2048, 1) and big.chunk_d >= 65536


def test_forced_plan_validates_and_restores():
    with pytest.raises(ValueError, match="block_d"):
        with _common.forced_plan(block_d=24, chunk_d=48):
            pass
    natural = _common.plan(3, 37, 4, 132)
    with _common.forced_plan(block_d=16, chunk_d=48):
        assert _common.plan(3, 37, 4, 132).grid == (3, 1)
        with _common.forced_plan(block_d=16, chunk_d=16):
            assert _common.plan(3, 37, 4, 132).grid == (3, 3)
        assert _common.plan(3, 37, 4, 132).chunk_d == 48
    assert _common.plan(3, 37, 4, 132) == natural


def test_small_plan_is_in_force():
    """The fixture's forced plan reaches the launchers: D = 130 is 5 chunks of 32."""
    from deq_fast.kernels import anderson
    p = anderson.launch_plan(3, 130, 5, 4, _common.sm_count(torch.device(DEVICE)))
    assert p.grid == (3, 5) and p.BLOCK_D == 16


def _natural_args(dtype, B=1, D=1000, m=5):
    """Arguments of every launcher at a shape whose own plan has several chunks per sample."""
    gen = _gen("natural", dtype, B, D)
    acc = acc_dtype(dtype)
    F, G, gram = _anderson_state(gen, B, D, m, m - 1, dtype)
    U, V = _broyden_state(gen, B, D, m, m - 1, dtype)
    x, fx, best = (gen.randn((B, D), dtype) for _ in range(3))
    g_old, dx = gen.randn((B, D), dtype), gen.randn((B, D), dtype, 0.3)
    flags = torch.ones(B, dtype=torch.bool, device=DEVICE)
    abc, scal = torch.zeros(B, 3, m, dtype=acc, device=DEVICE), nan_empty((B, 4), acc, DEVICE)
    R.broyden_dots(x, fx, g_old, torch.empty_like(x), dx, U, V, abc, scal, m - 1)
    abc_out = torch.zeros_like(abc)
    abc_out[:, :, :m - 1] = NAN                       # written entries (the rest stay zero)
    return {
        "anderson_residual": ((x, fx, F, G, gram, nan_empty((B, 2), acc, DEVICE), m - 1),
                              ["F", "G", "gram", "sq"], (2, 3, 4, 5)),
        "anderson_mix": ((F, G, gram, x.clone(), best, flags, m - 1, m - 2, 1e-4, True, 0.7,
                          False), ["x", "best"], (3, 4)),
        "broyden_dots": ((x, fx, g_old, nan_empty((B, D), dtype, DEVICE), dx, U, V,
                          abc_out, nan_empty((B, 4), acc, DEVICE), m - 1),
                         ["g", "abc", "scal"], (3, 7, 8)),
        "broyden_update": ((x.clone(), fx - x, g_old, dx.clone(), U.clone(), V.clone(), abc, scal,
                            best.clone(), flags, flags, m - 1, m - 1),
                           ["x", "dx", "U", "V", "best"], (0, 3, 4, 5, 8)),
        "fixed_point_step": ((x.clone(), fx, best.clone(), nan_empty((B, 2), acc, DEVICE), flags,
                              flags, 0.8), ["x", "best", "sq"], (0, 2, 3)),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS.get)
def test_natural_plan_launchers_equal_reference(dtype):
    """The launchers' own plans (no override) at B = 1, D = 1000: several chunks with a tail,
    equal to the reference; the last-arrival tickets are left at zero for the next launch."""
    cases = _natural_args(dtype)
    for name, (args, names, out) in cases.items():
        p = _plan_of(name, args)
        assert p.chunks >= 4 and 1000 % p.chunk_d != 0, (name, p)
        got, want = list(_clone(args)), list(_clone(args))
        getattr(K, name)(*got)
        getattr(R, name)(*want)
        assert_outputs(names, [got[i] for i in out], [want[i] for i in out], KERNEL_TOL[dtype])
        assert not _common.tickets(torch.device(DEVICE), 1).any(), name


def _plan_of(name, args):
    from deq_fast.kernels import anderson, broyden, fixed_point
    x = args[3] if name == "anderson_mix" else args[0]
    B, D, size, sms = x.shape[0], x.shape[1], x.element_size(), _common.sm_count(x.device)
    if name.startswith("anderson"):
        return anderson.launch_plan(B, D, args[2 if name == "anderson_residual" else 0].shape[1],
                                    size, sms)
    if name.startswith("broyden"):
        return broyden.launch_plan(B, D, args[5 if name == "broyden_dots" else 4].shape[1], size,
                                   sms)
    return fixed_point.launch_plan(B, D, size, sms)


@pytest.mark.parametrize("method", ["anderson", "broyden", "fixed_point"])
def test_natural_plan_solve_equals_reference(method):
    """A whole solve at B = 1 with the launchers' own multi-chunk plans."""
    f, x0 = _problem(B=1, D=600)
    kw = dict(method=method, max_iter=6, tol=1e-6, m=4)
    got = deq_fast.solve(f, x0, backend="triton", **kw)
    want = deq_fast.solve(f, x0, backend="reference", **kw)
    assert _common.plan(1, 600, 4, _common.sm_count(x0.device)).chunks >= 4
    assert max_err(got.z, want.z) <= 1e-5
    assert max_err(got.rel_trace, want.rel_trace) <= 1e-5


# ------------------------------------------------------------------------------- device guard
class _Recorder:
    """A device guard stand-in: records the device it is entered with and whether a kernel was
    launched while it was entered."""

    def __init__(self):
        self.entered, self.inside, self.launched_inside = [], False, []

    def guard(self, device):
        rec = self

        class _Ctx:
            def __enter__(self):
                rec.entered.append(device)
                rec.inside = True

            def __exit__(self, *exc):
                rec.inside = False

        return _Ctx()

    def spy(self, kernel):
        rec = self

        class _Spy:
            def __getitem__(self, grid):
                def launch(*args, **kwargs):
                    rec.launched_inside.append(rec.inside)
                    return kernel[grid](*args, **kwargs)
                return launch

        return _Spy()


@pytest.mark.parametrize("name", list(K.KERNELS))
def test_every_launch_is_inside_the_device_guard(name, monkeypatch):
    """Each launcher enters the device guard with its tensors' device around its launch."""
    from deq_fast.kernels import anderson, broyden, fixed_point, status
    rec = _Recorder()
    for mod in (anderson, broyden, fixed_point, status):
        monkeypatch.setattr(mod, "device_guard", rec.guard)
        for kname, kernel in K.KERNELS.items():
            attr = kernel.fn.__name__ if hasattr(kernel, "fn") else None
            if attr and hasattr(mod, attr):
                monkeypatch.setattr(mod, attr, rec.spy(getattr(mod, attr)))
    args = tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in _op_args()[name])
    getattr(K, name)(*args)
    assert rec.entered == [torch.device(DEVICE)] and rec.launched_inside == [True]


def test_device_guard_selects_the_tensors_cuda_device(monkeypatch):
    """On CUDA the guard is ``torch.cuda.device(<the tensors' device>)`` (cuda:1 here, mocked:
    no GPU needed); on the CPU (interpreter) it changes nothing."""
    entered = []

    class FakeCudaDevice:
        def __init__(self, device):
            self.device = device

        def __enter__(self):
            entered.append(self.device)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "device", FakeCudaDevice)
    with _common.device_guard(torch.device("cuda", 1)):
        pass
    assert entered == [torch.device("cuda", 1)]
    with _common.device_guard(torch.device("cpu")):
        pass
    assert entered == [torch.device("cuda", 1)]


def _not_specialised(kernel) -> set:
    """Argument names a kernel does not specialise (interpreted: its jit kwargs; compiled: the
    JITFunction's indices or names)."""
    raw = getattr(kernel, "kwargs", {}).get("do_not_specialize") if hasattr(kernel, "kwargs") \
        else kernel.do_not_specialize
    return {kernel.arg_names[a] if isinstance(a, int) else a for a in (raw or ())}


def test_plan_uses_the_devices_sm_count(monkeypatch):
    """CUDA tensors: the SM count of their device (mocked: an A100 as cuda:1); CPU tensors: the
    default (an H100's 132)."""
    asked = []

    def props(device):
        asked.append(device)
        return type("Props", (), {"multi_processor_count": 108})()

    monkeypatch.setattr(torch.cuda, "get_device_properties", props)
    _common.sm_count.cache_clear()
    try:
        assert _common.sm_count(torch.device("cuda", 1)) == 108
        assert _common.sm_count(torch.device("cpu")) == _common.DEFAULT_SM_COUNT == 132
    finally:
        _common.sm_count.cache_clear()
    assert asked == [torch.device("cuda", 1)]


def test_per_iteration_integers_are_not_specialised():
    """``slot``/``n``/``newest``/``n_valid``/``t`` change every iteration: one compile serves all."""
    want = {"anderson_residual": {"slot"}, "anderson_mix": {"n", "newest"},
            "broyden_dots": {"n_valid"}, "broyden_update": {"slot", "n_valid"},
            "track_status": {"t"}, "fixed_point_step": set()}
    assert set(want) == set(K.KERNELS)
    for name, params in want.items():
        assert _not_specialised(K.KERNELS[name]) == params, name


def test_anderson_mix_rejects_strided_x():
    """``x`` is written with unit inner stride: a transposed view is refused, naming ``x``."""
    B, D, m = 3, 37, 2
    F, G = torch.zeros(B, m, D, device=DEVICE), torch.zeros(B, m, D, device=DEVICE)
    gram = torch.zeros(B, m, m, device=DEVICE)
    x = torch.zeros(D, B, device=DEVICE).t()
    flags = torch.zeros(B, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="^x must have unit stride"):
        K.anderson_mix(F, G, gram, x, torch.zeros(B, D, device=DEVICE), flags, 1, 0, 1e-4, True,
                       1.0, False)
