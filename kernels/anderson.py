"""Anderson mixing in two fused passes (Triton): ``anderson_residual`` and ``anderson_mix``.

Semantics: the pure-torch references in ``deq_fast/ops/anderson.py`` and the small solve of
``deq_fast/ops/lstsq.py`` (this package never imports them). Ring buffers ``F, G [B, m, D]``
(state dtype), ``gram [B, m, m]`` (accumulation dtype: float32, float64 for float64 states).

Grid (:func:`launch_plan`, see ``_common.py``): ``(B, chunks)`` programs, program ``(b, c)`` owning
``chunk_d`` columns of sample ``b``, looping over them in ``BLOCK_D`` steps with the ``m`` history
rows as the other axis of a ``[M_PAD, BLOCK_D]`` register tile (``M_PAD`` = next power of two of
``m``; rows ``>= m`` / ``>= n`` are masked, so a history that is not full reads nothing for them).
Loads are coalesced along ``D`` and issued before each step's stores; all products accumulate in
the accumulation dtype. Pass 1 writes per-chunk partial Gram rows to a scratch ``[B, chunks,
M_PAD + 1]``; the last program of each sample to finish (a ticket, ``_common.last_arrival``) sums
them in chunk order and writes ``gram``'s row and column ``slot`` and ``sq`` (deterministic). Pass
2 reads the complete ``gram``: every program of a sample solves the same ``m x m`` system (O(m^3),
negligible) and mixes its own chunk.

Bytes per iteration (docs/design.md#measuring-performance), ``s`` = state element size:
    pass 1: (m + 3)·B·D·s      pass 2: (n + 1)·B·D·s  (+ n·B·D·s when beta != 1,
                                                       + 2·B·D·s for samples that improved)
    together about (2m + 4)·B·D·s once the ring is full, against about 62·B·D·4 for TorchDEQ;
    the scratch adds (M_PAD + 1)·B·chunks accumulators written and read once.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import (
    Plan,
    acc_dtype_of,
    check,
    check_state,
    device_guard,
    last_arrival,
    plan,
    sm_count,
    tickets,
    unit_inner,
)

__all__ = ["anderson_residual", "anderson_mix", "launch_plan"]

MAX_M = 16  # the in-kernel solve keeps an [M_PAD, M_PAD] float64 tile in registers


def launch_plan(B: int, D: int, m: int, elem_size: int, sms: int) -> Plan:
    """The plan both Anderson launchers use for ``[B, D]`` states of ``elem_size`` bytes and an
    ``m``-slot history on a GPU with ``sms`` SMs (two live ``[M_PAD, BLOCK_D]`` tiles)."""
    return plan(B, D, elem_size, sms, rows=m, tiles=2)


@triton.jit(do_not_specialize=["slot"])
def _anderson_residual_kernel(x_ptr, fx_ptr, F_ptr, G_ptr, gram_ptr, sq_ptr, part_ptr, ticket_ptr,
                              slot, D, m, chunk_d, chunks, stride_x, stride_fx, stride_Fb,
                              stride_Fm, stride_Gb, stride_Gm, stride_gram, stride_sq,
                              stride_part, M_PAD: tl.constexpr, BLOCK_D: tl.constexpr):
    """Pass 1 for sample ``b = program_id(0)``, chunk ``c = program_id(1)``, ring slot ``s``::

        F[b, s] = fx[b];   G[b, s] = g = fx[b] - x[b]          (g rounded to the state dtype)
        gram[b, s, j] = gram[b, j, s] = <G[b, j], g>   for j < m  (unwritten slots are zeros)
        sq[b, 0] = <g, g>;   sq[b, 1] = ||fx[b]||^2

    The other ``m - 1`` rows of ``G`` are read once; row ``s`` is taken from registers (never
    re-read after being stored). Accumulation: ``gram``'s dtype, elementwise in a
    ``[M_PAD, BLOCK_D]`` tile, reduced once per chunk into ``part[b, c]`` (``M_PAD`` dot products,
    then ``||fx||^2``); the last program of the sample sums the chunks in order.
    Bytes: read x, fx, m - 1 rows of G; write F[s], G[s] -> ``(m + 3)·B·D·size``.
    """
    ACC = gram_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * chunk_d
    end = tl.minimum(start + chunk_d, D)
    rows = tl.arange(0, M_PAD)
    cols = tl.arange(0, BLOCK_D)
    others = (rows < m) & (rows != slot)
    is_slot = rows[:, None] == slot
    acc = tl.zeros([M_PAD, BLOCK_D], dtype=ACC)
    ff = tl.zeros([BLOCK_D], dtype=ACC)
    for d0 in range(start, end, BLOCK_D):
        offs = d0 + cols
        dm = offs < end
        xv = tl.load(x_ptr + b * stride_x + offs, mask=dm, other=0.0)
        fv = tl.load(fx_ptr + b * stride_fx + offs, mask=dm, other=0.0)
        hist = tl.load(G_ptr + b * stride_Gb + rows[:, None] * stride_Gm + offs[None, :],
                       mask=others[:, None] & dm[None, :], other=0.0).to(ACC)
        # rounded to the state dtype as stored; the arithmetic itself in ACC (bf16 has none)
        g = (fv.to(ACC) - xv.to(ACC)).to(fv.dtype)
        ga = g.to(ACC)
        hist = tl.where(is_slot, ga[None, :], hist)
        acc += hist * ga[None, :]
        fa = fv.to(ACC)
        ff += fa * fa
        # the slot row is masked out of the history load: these stores race with no load
        tl.store(F_ptr + b * stride_Fb + slot * stride_Fm + offs, fv, mask=dm)
        tl.store(G_ptr + b * stride_Gb + slot * stride_Gm + offs, g, mask=dm)
    part = part_ptr + b * stride_part + tl.program_id(1) * (M_PAD + 1)
    tl.store(part + rows, tl.sum(acc, axis=1))                  # [M_PAD]: <G_j, g> over the chunk
    tl.store(part + M_PAD, tl.sum(ff, axis=0))
    if last_arrival(ticket_ptr, b, chunks):
        row = tl.zeros([M_PAD], dtype=ACC)
        fsum = tl.zeros([], dtype=ACC)
        for c in range(0, chunks):                              # fixed order: deterministic
            pc = part_ptr + b * stride_part + c * (M_PAD + 1)
            row += tl.load(pc + rows, cache_modifier=".cg")
            fsum += tl.load(pc + M_PAD, cache_modifier=".cg")
        jm = rows < m
        base = gram_ptr + b * stride_gram
        # gram is [B, m, m] contiguous per sample; the diagonal entry is stored twice (same value)
        tl.store(base + slot * m + rows, row, mask=jm)
        tl.store(base + rows * m + slot, row, mask=jm)
        tl.store(sq_ptr + b * stride_sq, tl.sum(tl.where(rows == slot, row, 0.0), axis=0))
        tl.store(sq_ptr + b * stride_sq + 1, fsum)


@triton.jit
def _anderson_weights(gram_ptr, n, newest, lam, scaled, m, ACC: tl.constexpr,
                      M_PAD: tl.constexpr):
    """``alpha [M_PAD]`` (``ACC``) of ``gram[:n, :n]`` (the pointer at the sample's matrix): the
    regularised solve ``(A + ridge·I) w = 1``, ``alpha = w / sum(w)``, one-hot fallback."""
    ri = tl.arange(0, M_PAD)
    valid = ri < n
    diag = ri[:, None] == ri[None, :]
    A = tl.load(gram_ptr + ri[:, None] * m + ri[None, :],
                mask=valid[:, None] & valid[None, :], other=0.0).to(tl.float64)
    # only the lower triangle is read, as the reference's Cholesky does (gram is symmetric)
    A = tl.where(ri[:, None] >= ri[None, :], A, tl.trans(A))
    ridge = tl.zeros([], dtype=tl.float64) + lam
    if scaled:
        ridge = ridge * tl.sum(tl.sum(tl.where(diag, A, 0.0), axis=1), axis=0) / n
    # padded rows/columns: identity with a zero right-hand side -> w = 0 there
    K = tl.where(diag, tl.where(valid[:, None], A + ridge, 1.0), A)
    r = tl.where(valid, 1.0, 0.0).to(tl.float64)
    nbad = tl.zeros([], dtype=tl.int32)
    for k in range(0, n):                                       # forward elimination
        rk = tl.sum(tl.where(ri[:, None] == k, K, 0.0), axis=0)          # row k
        ck = tl.sum(tl.where(ri[None, :] == k, K, 0.0), axis=1)          # column k
        piv = tl.sum(tl.where(ri == k, rk, 0.0), axis=0)
        nbad += tl.where((piv > 0.0) & (piv < float("inf")), 0, 1)
        rhs = tl.sum(tl.where(ri == k, r, 0.0), axis=0)
        below = ri > k
        fac = tl.where(below, ck / piv, 0.0)
        # tl.where, not masking by multiplication: a NaN/inf row must not leak upwards
        K = tl.where(below[:, None], K - fac[:, None] * rk[None, :], K)
        r = tl.where(below, r - fac * rhs, r)
    w = tl.zeros([M_PAD], dtype=tl.float64)
    for kk in range(0, n):                                      # back substitution
        k = n - 1 - kk
        rk = tl.sum(tl.where(ri[:, None] == k, K, 0.0), axis=0)
        piv = tl.sum(tl.where(ri == k, rk, 0.0), axis=0)
        rest = tl.sum(tl.where(ri > k, rk * w, 0.0), axis=0)
        rhs = tl.sum(tl.where(ri == k, r, 0.0), axis=0)
        w = tl.where(ri == k, (rhs - rest) / piv, w)
    total = tl.sum(w, axis=0)
    nbad += tl.sum(tl.where(tl.abs(w) < float("inf"), 0, 1), axis=0)
    ok = (nbad == 0) & (tl.abs(total) < float("inf")) & (tl.abs(total) >= 1e-300)
    alpha = tl.where(ok, w / total, tl.where(ri == newest, 1.0, 0.0))
    return tl.where(valid, alpha, 0.0).to(ACC)


@triton.jit(do_not_specialize=["n", "newest"])
def _anderson_mix_kernel(F_ptr, G_ptr, gram_ptr, x_ptr, best_ptr, improved_ptr, n, newest, lam,
                         scaled, beta, keep_f, D, m, chunk_d, stride_Fb, stride_Fm, stride_Gb,
                         stride_Gm, stride_gram, stride_x, stride_best, M_PAD: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """Pass 2 for sample ``b = program_id(0)`` on the columns of chunk ``program_id(1)``::

        best[b] = (F[b, newest] if keep_f else x[b])        if improved[b]
        A = gram[b, :n, :n] (lower triangle);  ridge = lam·trace(A)/n if scaled else lam
        w = (A + ridge·I)^{-1} 1  (unpivoted elimination = LDL^T, pivots are Cholesky's L_kk^2)
        alpha = w / sum(w), or one-hot at ``newest`` when a pivot is <= 0 or not finite, ``w`` or
                sum(w) is not finite, or |sum(w)| < 1e-300       (never raises, never NaN)
        x[b] = sum_{j<n} alpha_j (F[b, j] + (beta - 1)·G[b, j])          (skipped when n == 0)

    Precision: the ``n x n`` solve runs in float64 on an ``[M_PAD, M_PAD]`` register tile, as the
    reference does: it is O(m^3) per program, negligible next to the O(m·chunk_d) mix, and keeps
    the alpha of ill-conditioned histories (ridge ~1e-4 relative) as accurate as the oracle's.
    Every program of a sample reads the same ``gram`` and computes the same alpha. The scalars
    ``lam`` and ``beta`` arrive as float32 (Triton's float arguments). The mix accumulates in
    ``gram``'s dtype (float32, float64 for float64 states), whereas the reference rounds alpha
    to the state dtype for half states: half results agree to half precision. Each step loads
    the best source and the ``F``/``G`` tiles, then a barrier, then stores ``best`` and ``x``
    (``x`` may be the best source: every thread's load precedes any store).
    Bytes: read n rows of F (+ n rows of G when beta != 1), write x -> ``(n + 1)·B·D·size``;
    + read x or F[newest] and write best for improved samples.
    """
    ACC = gram_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * chunk_d
    end = tl.minimum(start + chunk_d, D)
    cols = tl.arange(0, BLOCK_D)
    ri = tl.arange(0, M_PAD)
    valid = ri < n
    imp = tl.load(improved_ptr + b) != 0
    alpha = tl.zeros([M_PAD], dtype=ACC)
    if n > 0:
        alpha = _anderson_weights(gram_ptr + b * stride_gram, n, newest, lam, scaled, m, ACC,
                                  M_PAD)
    coef = tl.where(valid, alpha * (beta - 1.0), 0.0).to(ACC)
    src = x_ptr + b * stride_x
    if keep_f:
        src = F_ptr + b * stride_Fb + newest * stride_Fm
    for d0 in range(start, end, BLOCK_D):
        offs = d0 + cols
        dm = offs < end
        bv = tl.load(src + offs, mask=dm & imp)
        tile_mask = valid[:, None] & dm[None, :]
        Ft = tl.load(F_ptr + b * stride_Fb + ri[:, None] * stride_Fm + offs[None, :],
                     mask=tile_mask, other=0.0).to(ACC)
        xn = tl.sum(alpha[:, None] * Ft, axis=0)
        if beta != 1.0:
            Gt = tl.load(G_ptr + b * stride_Gb + ri[:, None] * stride_Gm + offs[None, :],
                         mask=tile_mask, other=0.0).to(ACC)
            xn += tl.sum(coef[:, None] * Gt, axis=0)
        tl.debug_barrier()
        tl.store(best_ptr + b * stride_best + offs, bv, mask=dm & imp)
        tl.store(x_ptr + b * stride_x + offs, xn.to(x_ptr.dtype.element_ty), mask=dm & (n > 0))


def _check_rings(x: torch.Tensor, F: torch.Tensor, G: torch.Tensor, gram: torch.Tensor) -> tuple:
    check_state("x", x)
    B, D = x.shape
    if not isinstance(F, torch.Tensor) or F.dim() != 3:
        raise ValueError(f"F must be a [B, m, D] tensor, got {getattr(F, 'shape', type(F))}")
    m = F.shape[1]
    if not 1 <= m <= MAX_M:
        raise ValueError(f"F must have 1 <= m <= {MAX_M} history slots, got m={m}")
    check("F", F, (B, m, D), x.dtype, x.device)
    check("G", G, (B, m, D), x.dtype, x.device)
    check("gram", gram, (B, m, m), acc_dtype_of(x.dtype), x.device, contiguous=True)
    return B, D, m


def _plan_for(x: torch.Tensor, m: int) -> Plan:
    return launch_plan(x.shape[0], x.shape[1], m, x.element_size(), sm_count(x.device))


def anderson_residual(x: torch.Tensor, fx: torch.Tensor, F: torch.Tensor, G: torch.Tensor,
                      gram: torch.Tensor, sq: torch.Tensor, slot: int) -> None:
    """Anderson pass 1 in one launch (in place; see ``_anderson_residual_kernel``).

    Args:
        x: ``[B, D]`` iterate (float32/float64/float16/bfloat16).
        fx: ``[B, D]`` ``f(x)``, same dtype.
        F, G: ``[B, m, D]`` rings of ``f`` values and residuals, ``m <= 16``; slot ``slot`` is
            overwritten.
        gram: ``[B, m, m]`` contiguous Gram matrix (float32; float64 for float64 states); row
            and column ``slot`` are overwritten.
        sq: ``[B, 2]`` output ``[||g||^2, ||fx||^2]``, accumulation dtype.
        slot: ring slot to write, ``0 <= slot < m``.

    Returns:
        None.

    Example:
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"   # CPU: under TRITON_INTERPRET=1
        >>> B, m, D = 3, 5, 130
        >>> x, fx = torch.randn(B, D, device=dev), torch.randn(B, D, device=dev)
        >>> F, G = torch.zeros(B, m, D, device=dev), torch.zeros(B, m, D, device=dev)
        >>> gram, sq = torch.zeros(B, m, m, device=dev), torch.empty(B, 2, device=dev)
        >>> anderson_residual(x, fx, F, G, gram, sq, slot=0)     # gram[:, 0, 0] == sq[:, 0]
        >>> torch.allclose(gram[:, 0, 0], sq[:, 0]), torch.equal(F[:, 0], fx), torch.equal(G[:, 0], fx - x)
        (True, True, True)
    """
    B, D, m = _check_rings(x, F, G, gram)
    check("fx", fx, (B, D), x.dtype, x.device, unit_inner=False)
    check("sq", sq, (B, 2), gram.dtype, x.device)
    if not 0 <= slot < m:
        raise ValueError(f"slot must satisfy 0 <= slot < m = {m}, got {slot}")
    x, fx = unit_inner(x), unit_inner(fx)
    p = _plan_for(x, m)
    part = torch.empty(B, p.chunks, p.ROWS_PAD + 1, dtype=gram.dtype, device=x.device)
    with device_guard(x.device):
        _anderson_residual_kernel[p.grid](
            x, fx, F, G, gram, sq, part, tickets(x.device, B), slot, D, m, p.chunk_d, p.chunks,
            x.stride(0), fx.stride(0), F.stride(0), F.stride(1), G.stride(0), G.stride(1),
            gram.stride(0), sq.stride(0), part.stride(0),
            M_PAD=p.ROWS_PAD, BLOCK_D=p.BLOCK_D, num_warps=p.num_warps)


def anderson_mix(F: torch.Tensor, G: torch.Tensor, gram: torch.Tensor, x: torch.Tensor,
                 best: torch.Tensor, improved: torch.Tensor, n: int, newest: int, lam: float,
                 scaled: bool, beta: float, keep_f: bool) -> None:
    """Anderson pass 2 in one launch: best-so-far copy, the regularised solve, the mix.

    Args:
        F, G, gram: the rings and Gram matrix of :func:`anderson_residual`.
        x: ``[B, D]`` overwritten with the mixed iterate (unless ``n == 0``); unit inner stride.
        best: ``[B, D]`` best-so-far estimate, updated where ``improved``.
        improved: ``[B]`` bool.
        n: valid history entries, ``0 <= n <= m`` (0: only the ``best`` update).
        newest: slot of the newest entry (the fallback's one-hot), ``0 <= newest < m``.
        lam: ridge ``>= 0`` (relative to ``trace(A)/n`` when ``scaled``).
        scaled: scale the ridge by the mean diagonal of the Gram matrix.
        beta: damping; ``x = alpha·(F - (1 - beta)·G)``.
        keep_f: ``best`` takes ``F[:, newest]`` (TorchDEQ) instead of ``x``.

    Returns:
        None.

    Example:
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"   # CPU: under TRITON_INTERPRET=1
        >>> B, m, D = 3, 5, 130
        >>> x, fx = torch.randn(B, D, device=dev), torch.randn(B, D, device=dev)
        >>> F, G = torch.zeros(B, m, D, device=dev), torch.zeros(B, m, D, device=dev)
        >>> gram, sq = torch.zeros(B, m, m, device=dev), torch.empty(B, 2, device=dev)
        >>> anderson_residual(x, fx, F, G, gram, sq, slot=0)
        >>> best, x_old = torch.zeros(B, D, device=dev), x.clone()
        >>> improved = torch.ones(3, dtype=torch.bool, device=dev)
        >>> anderson_mix(F, G, gram, x, best, improved, 1, 0, 1e-4, True, 1.0, False)  # x = F[:, 0]
        >>> torch.allclose(x, F[:, 0]), torch.equal(best, x_old)
        (True, True)
    """
    B, D, m = _check_rings(x, F, G, gram)
    check("x", x, (B, D), x.dtype, x.device)
    check("best", best, (B, D), x.dtype, x.device)
    check("improved", improved, (B,), torch.bool, x.device)
    if not 0 <= n <= m:
        raise ValueError(f"n must satisfy 0 <= n <= m = {m}, got {n}")
    if not 0 <= newest < m:
        raise ValueError(f"newest must satisfy 0 <= newest < m = {m}, got {newest}")
    if not lam >= 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    p = _plan_for(x, m)
    with device_guard(x.device):
        _anderson_mix_kernel[p.grid](
            F, G, gram, x, best, improved, n, newest, float(lam), bool(scaled), float(beta),
            bool(keep_f), D, m, p.chunk_d, F.stride(0), F.stride(1), G.stride(0), G.stride(1),
            gram.stride(0), x.stride(0), best.stride(0),
            M_PAD=p.ROWS_PAD, BLOCK_D=p.BLOCK_D, num_warps=p.num_warps)
