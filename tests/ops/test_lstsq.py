"""deq_fast::anderson_lstsq: the C++ op and the public wrapper against the pure-torch reference
and against the bordered system that locuslab/deq and TorchDEQ solve."""
from __future__ import annotations

import os

import pytest
import torch

from deq_fast.ops import extension, lstsq
from deq_fast.ops.lstsq import anderson_lstsq, anderson_lstsq_reference
from deq_fast.testing import LSTSQ_TOL

# The built op is tested unless the run explicitly opted out of the extension.
needs_ext = pytest.mark.skipif(os.environ.get("DEQ_FAST_NO_EXT") == "1",
                               reason="DEQ_FAST_NO_EXT=1: the extension is deliberately not used")

# LSTSQ_TOL: both implementations solve in float64 and round once at the end: fp32 differs by
# output rounding, fp64 by summation order inside a well-conditioned n x n solve.


def random_gram(batch: int, m: int, dtype: torch.dtype, seed: int, d: int = 37) -> torch.Tensor:
    """Gram matrices G G^T of random residual histories, [batch, m, m], well conditioned (d > m)."""
    gen = torch.Generator().manual_seed(seed)
    g = torch.randn(batch, m, d, generator=gen, dtype=torch.float64)
    g = g * torch.rand(batch, 1, 1, generator=gen, dtype=torch.float64).add(0.1)  # per-sample scale
    return (g @ g.transpose(1, 2)).to(dtype).contiguous()


def bordered_alpha(gram: torch.Tensor, n: int, lam: float, scaled: bool) -> torch.Tensor:
    """alpha from [[0, 1^T], [1, A + ridge I]] [nu; alpha] = [1; 0] (locuslab/deq, TorchDEQ), fp64."""
    a = gram[:, :n, :n].double()
    batch = a.shape[0]
    ridge = lam * a.diagonal(dim1=1, dim2=2).sum(-1) / n if scaled else torch.full((batch,), lam,
                                                                                    dtype=torch.float64)
    h = torch.zeros(batch, n + 1, n + 1, dtype=torch.float64)
    h[:, 0, 1:] = 1
    h[:, 1:, 0] = 1
    h[:, 1:, 1:] = a + ridge[:, None, None] * torch.eye(n, dtype=torch.float64)
    rhs = torch.zeros(batch, n + 1, dtype=torch.float64)
    rhs[:, 0] = 1
    return torch.linalg.solve(h, rhs)[:, 1:]


def _grid():
    for m in (1, 5, 8):
        for n in sorted({m, max(1, m - 2)}):
            for batch in (1, 3, 17):
                yield batch, m, n


GRID = list(_grid())
GRID_IDS = [f"B{b}-m{m}-n{n}" for b, m, n in GRID]


@needs_ext
@pytest.mark.parametrize("scaled", [True, False], ids=["scaled", "absolute"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("batch,m,n", GRID, ids=GRID_IDS)
def test_op_matches_reference(batch, m, n, dtype, scaled):
    gram = random_gram(batch, m, dtype, seed=1000 * m + 10 * n + batch)
    lam = 1e-2 if scaled else 1e-1
    newest = n - 1
    out = torch.ops.deq_fast.anderson_lstsq(gram, n, newest, lam, scaled)
    ref = anderson_lstsq_reference(gram, n, newest, lam, scaled)
    assert out.shape == (batch, m) and out.dtype == dtype
    torch.testing.assert_close(out, ref, **LSTSQ_TOL[dtype])
    assert torch.all(out[:, n:] == 0)
    torch.testing.assert_close(out[:, :n].double().sum(-1), torch.ones(batch, dtype=torch.float64),
                               **LSTSQ_TOL[dtype])


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize("scaled", [True, False], ids=["scaled", "absolute"])
@pytest.mark.parametrize("batch,m,n", [(3, 5, 5), (17, 8, 6), (1, 8, 1)], ids=str)
def test_matches_bordered_system(impl, batch, m, n, scaled):
    if impl == "op" and not extension.available():
        pytest.skip("DEQ_FAST_NO_EXT=1") if extension.disabled_by_env() else pytest.fail(
            extension.extension_status()[1])
    gram = random_gram(batch, m, torch.float64, seed=7 * m + n)
    lam = 1e-3
    fn = torch.ops.deq_fast.anderson_lstsq if impl == "op" else anderson_lstsq_reference
    out = fn(gram, n, 0, lam, scaled)
    torch.testing.assert_close(out[:, :n], bordered_alpha(gram, n, lam, scaled),
                               rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize("scaled", [True, False], ids=["scaled", "absolute"])
def test_singular_gram_falls_back_to_newest(impl, scaled):
    if impl == "op" and not extension.available():
        pytest.skip("DEQ_FAST_NO_EXT=1") if extension.disabled_by_env() else pytest.fail(
            extension.extension_status()[1])
    fn = torch.ops.deq_fast.anderson_lstsq if impl == "op" else anderson_lstsq_reference
    for dtype in (torch.float32, torch.float64):
        out = fn(torch.zeros(4, 6, 6, dtype=dtype), 5, 3, 0.0, scaled)
        expected = torch.zeros(4, 6, dtype=dtype)
        expected[:, 3] = 1
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize("impl", ["op", "reference"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_non_finite_sample_falls_back_alone(impl, bad):
    """A NaN/Inf sample gets the one-hot; the other samples are untouched (per-sample results)."""
    if impl == "op" and not extension.available():
        pytest.skip("DEQ_FAST_NO_EXT=1") if extension.disabled_by_env() else pytest.fail(
            extension.extension_status()[1])
    fn = torch.ops.deq_fast.anderson_lstsq if impl == "op" else anderson_lstsq_reference
    gram = random_gram(5, 6, torch.float32, seed=3)
    clean = fn(gram, 6, 2, 1e-3, True)
    gram[1, 0, 0] = bad
    gram[3, 4, 2] = bad          # off-diagonal, lower triangle
    gram[3, 2, 4] = bad
    out = fn(gram, 6, 2, 1e-3, True)
    assert torch.isfinite(out).all()
    onehot = torch.zeros(6)
    onehot[2] = 1
    torch.testing.assert_close(out[1], onehot, rtol=0, atol=0)
    torch.testing.assert_close(out[3], onehot, rtol=0, atol=0)
    torch.testing.assert_close(out[[0, 2, 4]], clean[[0, 2, 4]], rtol=0, atol=0)


def test_rank_deficient_gram_never_raises_or_returns_nan():
    g = torch.randn(6, 2, 11, dtype=torch.float64)
    g = torch.cat([g, g[:, :1] * 2, g[:, 1:] - g[:, :1]], dim=1)          # 4 rows of rank 2
    gram = g @ g.transpose(1, 2)
    for fn in (anderson_lstsq, anderson_lstsq_reference):
        out = fn(gram, 4, 3, 0.0, False)
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("impl", ["public", "reference"])
def test_lam_and_scaling_are_used(impl):
    """Negative check: the ridge must change alpha; a huge ridge gives uniform weights."""
    fn = anderson_lstsq if impl == "public" else anderson_lstsq_reference
    gram = random_gram(3, 5, torch.float64, seed=11)
    a0 = fn(gram, 5, 4, 0.0, False)
    a1 = fn(gram, 5, 4, 1.0, False)
    a1s = fn(gram, 5, 4, 1.0, True)
    assert (a0 - a1).abs().max() > 1e-3
    assert (a1 - a1s).abs().max() > 1e-3
    torch.testing.assert_close(fn(gram, 5, 4, 1e9, True), torch.full((3, 5), 0.2, dtype=torch.float64),
                               rtol=0, atol=1e-6)


def test_public_uses_extension_unless_disabled(monkeypatch):
    calls = []
    reference = lstsq.anderson_lstsq_reference
    monkeypatch.setattr(lstsq, "anderson_lstsq_reference",
                        lambda *args: calls.append(args) or reference(*args))
    gram = random_gram(2, 5, torch.float32, seed=5)
    expected = reference(gram, 4, 1, 1e-4, True)
    monkeypatch.setenv("DEQ_FAST_NO_EXT", "1")
    torch.testing.assert_close(anderson_lstsq(gram, 4, 1, 1e-4, True), expected, **LSTSQ_TOL[torch.float32])
    assert len(calls) == 1
    monkeypatch.delenv("DEQ_FAST_NO_EXT")
    torch.testing.assert_close(anderson_lstsq(gram, 4, 1, 1e-4, True), expected, **LSTSQ_TOL[torch.float32])
    assert len(calls) == (1 if extension.load() is not None else 2)


def test_public_large_history_uses_reference():
    gram = random_gram(2, lstsq.MAX_M + 3, torch.float64, seed=9)
    out = anderson_lstsq(gram, lstsq.MAX_M + 1, 0, 1e-3, True)
    torch.testing.assert_close(out, anderson_lstsq_reference(gram, lstsq.MAX_M + 1, 0, 1e-3, True))


def test_public_non_contiguous_and_meta():
    gram = random_gram(3, 5, torch.float64, seed=13).transpose(1, 2)   # symmetric, not contiguous
    torch.testing.assert_close(anderson_lstsq(gram, 5, 2), anderson_lstsq_reference(gram, 5, 2, 1e-4, True))
    out = anderson_lstsq(torch.empty(4, 6, 6, device="meta"), 3, 0)
    assert out.shape == (4, 6) and out.device.type == "meta"


@pytest.mark.parametrize("kwargs,match", [
    (dict(gram=torch.zeros(5, 5)), "gram must have shape"),
    (dict(gram=torch.zeros(2, 5, 4)), "gram must have shape"),
    (dict(gram=torch.zeros(2, 5, 5, dtype=torch.float16)), "gram must be float32 or float64"),
    (dict(gram=[[1.0]]), "gram must be a torch.Tensor"),
    (dict(n=0), "n must satisfy"),
    (dict(n=6), "n must satisfy"),
    (dict(newest=3), "newest must satisfy"),
    (dict(newest=-1), "newest must satisfy"),
    (dict(lam=-1.0), "lam must be"),
    (dict(lam=float("nan")), "lam must be"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_public_bad_arguments(kwargs, match):
    args = dict(gram=torch.zeros(2, 5, 5), n=3, newest=1, lam=1e-4, scaled=True)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        anderson_lstsq(**args)
