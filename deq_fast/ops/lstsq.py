"""``deq_fast::anderson_lstsq``: the small regularised least-squares solve of Anderson mixing.

Math (per sample ``b``, in float64 whatever the input dtype)::

    A      = gram[b, :n, :n]                       (symmetric PSD, n x n; G G^T of the residuals)
    ridge  = lam * (trace(A) / n  if scaled else 1)
    w      = (A + ridge I)^{-1} 1                  (Cholesky / LDL^T, no pivoting)
    alpha  = w / sum(w)                            (so sum(alpha) = 1)

    alpha minimises ||alpha^T G||^2 + ridge ||alpha||^2 subject to sum(alpha) = 1. It equals the
    alpha of the bordered system [[0, 1^T], [1, A + ridge I]] [nu; alpha] = [1; 0] that locuslab/deq
    and TorchDEQ solve with a batched LU. The SPD form is preferred: it is half the size, needs no
    pivoting, is solved stably by Cholesky, and its failure (a pivot <= 0) is detected for free,
    whereas LU of the indefinite bordered matrix raises "singular U" on CUDA (locuslab/deq #20).

Fallback (per sample, never raises): if a pivot is <= 0 or not finite, or ``w`` or ``sum(w)`` is
not finite, or ``|sum(w)| < 1e-300``, then ``alpha`` is one-hot at ``newest`` (a plain fixed-point
step from the newest history entry). This covers the degenerate all-zero Gram matrix (every
residual of the window is zero; the scaled ridge is then zero and so is the first pivot): the
forward and the backward solve (``deq_fast.implicit``) both take the one-hot step there.

Output ``alpha``: ``[B, m]`` in ``gram``'s dtype; entries ``n..m-1`` are zero.

Implementations: ``deq_fast._C`` (CPU and CUDA kernels sharing
``csrc/include/deq_fast/anderson_lstsq.h``, which the backward solve uses too), the fake (meta)
kernel of the op table (``deq_fast/ops/table.py``), and :func:`anderson_lstsq_reference` in pure
torch (fallback and oracle). ``DEQ_FAST_NO_EXT=1`` (read at every call) forces the reference.
"""
from __future__ import annotations

import math

import torch

from deq_fast.ops import extension

__all__ = ["anderson_lstsq", "anderson_lstsq_reference", "MAX_M", "OP_NAME"]

OP_NAME = "deq_fast::anderson_lstsq"
MAX_M = 16  # history size the C++/CUDA kernels accept (fixed-size per-thread arrays); larger -> reference
SUM_TINY = 1e-300


def _check_args(gram: torch.Tensor, n: int, newest: int, lam: float) -> None:
    if not isinstance(gram, torch.Tensor):
        raise ValueError(f"gram must be a torch.Tensor, got {type(gram).__name__}")
    if gram.dim() != 3 or gram.shape[1] != gram.shape[2]:
        raise ValueError(f"gram must have shape [B, m, m], got {tuple(gram.shape)}")
    if gram.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"gram must be float32 or float64, got {gram.dtype}")
    m = gram.shape[1]
    if not 1 <= n <= m:
        raise ValueError(f"n must satisfy 1 <= n <= m = {m}, got n={n}")
    if not 0 <= newest < n:
        raise ValueError(f"newest must satisfy 0 <= newest < n = {n}, got newest={newest}")
    if not (math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite float >= 0, got {lam}")


def anderson_lstsq_reference(gram: torch.Tensor, n: int, newest: int, lam: float,
                             scaled: bool) -> torch.Tensor:
    """Pure-PyTorch ``anderson_lstsq`` (any device; vectorised over the batch; the oracle).

    Args:
        gram: ``[B, m, m]`` float32/float64 Gram matrices of the residual history; only the
            leading ``n x n`` block is read.
        n: number of valid history entries, ``1 <= n <= m``.
        newest: index of the newest entry, ``0 <= newest < n`` (the fallback's one-hot).
        lam: ridge, ``>= 0``; relative to ``trace(A) / n`` when ``scaled``, else absolute.
        scaled: whether ``lam`` is scaled by the mean diagonal of ``A``.

    Returns:
        ``alpha``: ``[B, m]`` in ``gram``'s dtype, each row summing to 1 over its first ``n``
        entries, zeros after.

    Example:
        >>> g = torch.randn(4, 6, 32); gram = g @ g.transpose(1, 2)       # [4, 6, 6]
        >>> anderson_lstsq_reference(gram, 5, 4, 1e-4, True).shape
        torch.Size([4, 6])
    """
    batch, m = gram.shape[0], gram.shape[1]
    a = gram[:, :n, :n].to(torch.float64)
    if scaled:
        ridge = lam * a.diagonal(dim1=-2, dim2=-1).sum(-1) / n                         # [B]
    else:
        ridge = torch.full((batch,), float(lam), dtype=torch.float64, device=gram.device)
    eye = torch.eye(n, dtype=torch.float64, device=gram.device)
    chol, info = torch.linalg.cholesky_ex(a + ridge[:, None, None] * eye)
    ones = torch.ones(batch, n, 1, dtype=torch.float64, device=gram.device)
    w = torch.cholesky_solve(ones, chol).squeeze(-1)                                   # [B, n]
    total = w.sum(-1)                                                                  # [B]
    # diag(chol)^2 are the pivots: an infinite one passes LAPACK's check but not ours.
    # One isfinite over [pivots, w, sum(w)] (isfinite is several aten ops).
    finite = torch.isfinite(torch.cat([chol.diagonal(dim1=-2, dim2=-1), w, total[:, None]], -1))
    ok = (info == 0) & finite.all(-1) & (total.abs() >= SUM_TINY)
    onehot = (torch.arange(n, device=gram.device) == newest).to(torch.float64)
    # torch.where, not arithmetic masking: a NaN in the rejected branch must not leak
    alpha = torch.where(ok[:, None], w / total[:, None], onehot)
    return torch.nn.functional.pad(alpha, (0, m - n)).to(gram.dtype)


# Registrations are static once _C is loaded: look them up once, here, so that the dispatch in
# anderson_lstsq is a constant dict lookup that torch.compile traces without a graph break.
# (A CPU-only build has no CUDA kernel: CUDA tensors then take the reference path.) The op's
# fake kernel is registered with the op table (deq_fast/ops/table.py).
if extension.load() is not None and torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, "CPU"):
    _HAS_KERNEL = {"cpu": True, "meta": True,
                   "cuda": torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, "CUDA")}
else:
    _HAS_KERNEL = {}


def anderson_lstsq(gram: torch.Tensor, n: int, newest: int, lam: float = 1e-4,
                   scaled: bool = True) -> torch.Tensor:
    """Anderson mixing weights ``alpha`` from the history's Gram matrix (see the module docstring).

    Runs ``torch.ops.deq_fast.anderson_lstsq`` when ``deq_fast._C`` is built with a kernel for
    ``gram``'s device and ``m <= 16``, else :func:`anderson_lstsq_reference`
    (``DEQ_FAST_NO_EXT=1`` forces the reference). Never raises on singular or NaN input: such
    samples get the one-hot fallback at ``newest``. No host synchronisation.

    Args:
        gram: ``[B, m, m]`` float32/float64 Gram matrices (``gram[b, i, j] = <g_i, g_j>`` of
            sample ``b``'s residual history); only the leading ``n x n`` block is read.
        n: number of valid history entries, ``1 <= n <= m``.
        newest: index of the newest entry, ``0 <= newest < n``.
        lam: ridge ``>= 0`` (default 1e-4).
        scaled: if True (default) the ridge is ``lam * trace(A) / n``, which keeps it in
            proportion to the residuals as they shrink; if False it is ``lam`` (TorchDEQ).

    Returns:
        ``alpha``: ``[B, m]`` in ``gram``'s dtype; ``alpha[:, :n].sum(-1) == 1``,
        ``alpha[:, n:] == 0``.

    Raises:
        ValueError: naming the argument, for a wrong shape/dtype of ``gram`` or ``n``/``newest``/
            ``lam`` out of range.

    Example:
        >>> g = torch.randn(3, 5, 100)                        # B=3, m=5 residuals of size 100
        >>> gram = g @ g.transpose(1, 2)                      # [3, 5, 5]
        >>> alpha = anderson_lstsq(gram, n=5, newest=2)       # [3, 5]
        >>> torch.allclose(alpha.sum(-1), torch.ones(3))
        True
    """
    _check_args(gram, n, newest, lam)
    if gram.shape[1] <= MAX_M and _HAS_KERNEL.get(gram.device.type, False) and extension.available():
        return torch.ops.deq_fast.anderson_lstsq(gram.contiguous(), n, newest, float(lam),
                                                 bool(scaled))
    return anderson_lstsq_reference(gram, n, newest, lam, scaled)
