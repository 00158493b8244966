"""Broyden's method (the "good" inverse update) in two fused passes (Triton): ``broyden_dots`` and
``broyden_update``.

Semantics: the pure-torch references in ``deq_fast/ops/broyden.py`` (this package never imports
them; the formula, ``u = (dx - H dg) / <v, dg>`` with ``dg = g - g_old`` formed elementwise, is
derived there). ``H = -I + sum_l U[:, l] V[:, l]^T`` with rings ``U, V [B, L, D]`` (state dtype,
any ``L >= 1``) of which ``n_valid`` slots are written; rows ``>= n_valid`` of ``U``/``V`` and
entries ``>= n_valid`` of ``abc`` are zero (the engine's invariant), so the kernels read only
``n_valid`` rows.

Grid (:func:`launch_plan`, see ``_common.py``): ``(B, chunks)`` programs, program ``(b, c)``
owning ``chunk_d`` columns of sample ``b``, looping over them in ``BLOCK_D`` steps. The ring is
the other axis of ``[L_BLOCK, BLOCK_D]`` register tiles, taken in blocks of ``L_BLOCK`` slots
(:func:`ring_block`: the next power of two of ``L``, at most ``RING_BLOCK``), so any ring length
runs with the same tiles, registers and grid; the register budget of the five live tiles of
pass 1 sets ``BLOCK_D`` (8 warps from ``L_BLOCK = 32``). All products accumulate in ``abc``'s
dtype (float32, float64 for float64 states).

Pass 1 needs a ``[L_BLOCK, BLOCK_D]`` accumulator per product and ring block, so it takes the
ring blocks one after the other, each in one sweep over the program's columns (the first sweep
also forms and stores ``g`` and the four scalars; the next ones reload ``g``, ``g_old``, ``dx``),
and writes per-chunk partial dots to a scratch ``[B, chunks, 3·L_CEIL + 4]`` (``L_CEIL`` = ``L``
rounded up to whole blocks); the last program of each sample to finish sums them, per slot, in
chunk order (deterministic) and writes ``abc`` and ``scal``. Pass 2 sums over the ring into
``[BLOCK_D]`` vectors, so it loops over the ring blocks inside each column step and needs no
reduction. Each step issues its loads before its stores. A ring of one block (``L <= L_BLOCK``,
the constexpr ``MANY_BLOCKS`` false) compiles without the block loops, as a single-tile kernel:
pass 2 keeps the coefficients in registers (sm_90, ``L = 30``: 80 registers in both passes for
float32; the block loops would take 99 and 119, one block of 8 warps fewer per SM).

Bytes per iteration (DESIGN.md §4), ``s`` = state element size, ``n = n_valid``,
``k = max(1, cdiv(n, L_BLOCK))`` ring blocks:
    pass 1: (2n + 5 + 3·(k - 1))·B·D·s    pass 2: (2n + 8)·B·D·s (+ B·D·s for improved samples)
    together (4n + 13 + 3·(k - 1))·B·D·s: (4L + 13)·B·D·s for a full ring of ``L <= L_BLOCK``
    slots, 3 more state rows per further block (1.2 % of its ``4·L_BLOCK`` ring rows); the
    scratch adds ``(3·L_CEIL + 4)·B·chunks`` accumulators written and read once. Round trips:
    ``k`` per column step in both passes (one per ring block).
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
    rows_pad,
    sm_count,
    tickets,
    unit_inner,
)

__all__ = ["broyden_dots", "broyden_update", "launch_plan", "ring_block", "RING_BLOCK"]


# ring slots per register tile: longer rings are looped over in blocks of this many. One tile
# of L_PAD = 512 slots spilled in float64 on sm_90 (ptxas: 216-272 B of stack); 64 slots leave
# BLOCK_D (16 float64 = one 128-byte line per slot and step) and the registers as for L = 64
RING_BLOCK = 64


def ring_block(L: int) -> int:
    """Ring slots per tile of an ``L``-slot ring: the power of two ``>= L``, at most
    :data:`RING_BLOCK`."""
    return min(rows_pad(L), RING_BLOCK)


def launch_plan(B: int, D: int, L: int, elem_size: int, sms: int) -> Plan:
    """The plan both Broyden launchers use for ``[B, D]`` states of ``elem_size`` bytes and an
    ``L``-slot ring on a GPU with ``sms`` SMs (pass 1 holds five ``[L_BLOCK, BLOCK_D]`` tiles;
    ``Plan.ROWS_PAD`` is ``L_BLOCK = ring_block(L)``)."""
    return plan(B, D, elem_size, sms, rows=ring_block(L), tiles=5)


@triton.jit
def _ring_tiles(U_ptr, V_ptr, b, stride_Ub, stride_Ul, stride_Vb, stride_Vl, rows, offs, mask):
    """The ``[L_BLOCK, BLOCK_D]`` tiles of ``U`` and ``V`` at ring slots ``rows`` and columns
    ``offs`` (zero outside ``mask``), in the state dtype."""
    Ut = tl.load(U_ptr + b * stride_Ub + rows[:, None] * stride_Ul + offs[None, :], mask=mask,
                 other=0.0)
    Vt = tl.load(V_ptr + b * stride_Vb + rows[:, None] * stride_Vl + offs[None, :], mask=mask,
                 other=0.0)
    return Ut, Vt


@triton.jit
def _ring_products(acc_a, acc_b, acc_c, Ut, Vt, da, ga, dga, ACC: tl.constexpr):
    """Pass 1's elementwise products of one column step, added to the ``[L_BLOCK, BLOCK_D]``
    accumulators: ``U·dx``, ``V·g``, ``V·dg``."""
    acc_a += Ut.to(ACC) * da[None, :]
    acc_b += Vt.to(ACC) * ga[None, :]
    acc_c += Vt.to(ACC) * dga[None, :]
    return acc_a, acc_b, acc_c


@triton.jit
def _further_ring_blocks(g_ptr, g_old_ptr, dx_ptr, U_ptr, V_ptr, part, b, n_valid, start, end,
                         L_CEIL, stride_g, stride_go, stride_dx, stride_Ub, stride_Ul, stride_Vb,
                         stride_Vl, ACC: tl.constexpr, L_BLOCK: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    """Pass 1 for the ring blocks after the first: one sweep over the chunk per block, reloading
    ``g`` (stored by the first sweep, so the caller's barrier must come first), ``g_old`` and
    ``dx``; each block's partial ``a, b, c`` stored into ``part``."""
    rows = tl.arange(0, L_BLOCK)
    cols = tl.arange(0, BLOCK_D)
    for l0 in range(L_BLOCK, n_valid, L_BLOCK):
        slots = l0 + rows
        rm = slots < n_valid
        acc_a = tl.zeros([L_BLOCK, BLOCK_D], dtype=ACC)
        acc_b = tl.zeros([L_BLOCK, BLOCK_D], dtype=ACC)
        acc_c = tl.zeros([L_BLOCK, BLOCK_D], dtype=ACC)
        for d0 in range(start, end, BLOCK_D):
            offs = d0 + cols
            dm = offs < end
            ga = tl.load(g_ptr + b * stride_g + offs, mask=dm, other=0.0).to(ACC)
            dga = ga - tl.load(g_old_ptr + b * stride_go + offs, mask=dm, other=0.0).to(ACC)
            da = tl.load(dx_ptr + b * stride_dx + offs, mask=dm, other=0.0).to(ACC)
            Ut, Vt = _ring_tiles(U_ptr, V_ptr, b, stride_Ub, stride_Ul, stride_Vb, stride_Vl,
                                 slots, offs, rm[:, None] & dm[None, :])
            acc_a, acc_b, acc_c = _ring_products(acc_a, acc_b, acc_c, Ut, Vt, da, ga, dga, ACC)
        _store_ring_partials(part, slots, L_CEIL, acc_a, acc_b, acc_c)


@triton.jit
def _store_ring_partials(part, rows, L_CEIL, acc_a, acc_b, acc_c):
    """A chunk's partial ``a, b, c`` of ring slots ``rows``: its tiles summed over the columns."""
    tl.store(part + rows, tl.sum(acc_a, axis=1))
    tl.store(part + L_CEIL + rows, tl.sum(acc_b, axis=1))
    tl.store(part + 2 * L_CEIL + rows, tl.sum(acc_c, axis=1))


@triton.jit(do_not_specialize=["n_valid"])
def _broyden_dots_kernel(x_ptr, fx_ptr, g_old_ptr, g_ptr, dx_ptr, U_ptr, V_ptr, abc_ptr, scal_ptr,
                         part_ptr, ticket_ptr, n_valid, D, L, chunk_d, chunks, stride_x,
                         stride_fx, stride_go, stride_g, stride_dx, stride_Ub, stride_Ul,
                         stride_Vb, stride_Vl, stride_abc, stride_scal, stride_part,
                         L_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr, MANY_BLOCKS: tl.constexpr):
    """Pass 1 for sample ``b = program_id(0)``, chunk ``program_id(1)``::

        g[b] = fx[b] - x[b]                                  (stored, state dtype)
        dg = g[b] - g_old[b]                                 (not stored)
        abc[b, 0, l] = <U[b, l], dx[b]>;  abc[b, 1, l] = <V[b, l], g[b]>;  abc[b, 2, l] = <V[b, l], dg>
                                                             (zero for l >= n_valid)
        scal[b] = [<dx, g>, <dx, dg>, ||g||^2, ||fx||^2]

    Ring blocks of ``L_BLOCK`` slots one after the other, each in one sweep over the chunk
    (module docstring). Accumulation: ``scal``'s dtype, elementwise in ``[L_BLOCK, BLOCK_D]``
    tiles reduced once per block and chunk into ``part[b, c] = [a (L_CEIL), b (L_CEIL),
    c (L_CEIL), scal (4)]``; the last program of the sample sums the chunks in order, per slot.
    Bytes: read x, fx, g_old, dx, n_valid rows of U and V, and g, g_old, dx again for each ring
    block after the first; write g -> ``(2·n_valid + 5 + 3·(blocks - 1))·B·D·size``.
    """
    ACC = scal_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * chunk_d
    end = tl.minimum(start + chunk_d, D)
    rows = tl.arange(0, L_BLOCK)
    cols = tl.arange(0, BLOCK_D)
    L_CEIL = tl.cdiv(L, L_BLOCK) * L_BLOCK
    part = part_ptr + b * stride_part + tl.program_id(1) * (3 * L_CEIL + 4)
    # the first ring block, with g and the scalars
    rm = rows < n_valid
    acc_a = tl.zeros([L_BLOCK, BLOCK_D], dtype=ACC)
    acc_b = tl.zeros([L_BLOCK, BLOCK_D], dtype=ACC)
    acc_c = tl.zeros([L_BLOCK, BLOCK_D], dtype=ACC)
    s_dg = tl.zeros([BLOCK_D], dtype=ACC)
    s_ddg = tl.zeros([BLOCK_D], dtype=ACC)
    gg = tl.zeros([BLOCK_D], dtype=ACC)
    ff = tl.zeros([BLOCK_D], dtype=ACC)
    for d0 in range(start, end, BLOCK_D):
        offs = d0 + cols
        dm = offs < end
        xv = tl.load(x_ptr + b * stride_x + offs, mask=dm, other=0.0)
        fv = tl.load(fx_ptr + b * stride_fx + offs, mask=dm, other=0.0)
        gov = tl.load(g_old_ptr + b * stride_go + offs, mask=dm, other=0.0)
        da = tl.load(dx_ptr + b * stride_dx + offs, mask=dm, other=0.0).to(ACC)
        Ut, Vt = _ring_tiles(U_ptr, V_ptr, b, stride_Ub, stride_Ul, stride_Vb, stride_Vl, rows,
                             offs, rm[:, None] & dm[None, :])
        # rounded to the state dtype as stored; the arithmetic itself in ACC (bf16 has none)
        g = (fv.to(ACC) - xv.to(ACC)).to(fv.dtype)
        ga = g.to(ACC)
        dga = ga - gov.to(ACC)
        fa = fv.to(ACC)
        acc_a, acc_b, acc_c = _ring_products(acc_a, acc_b, acc_c, Ut, Vt, da, ga, dga, ACC)
        s_dg += da * ga
        s_ddg += da * dga
        gg += ga * ga
        ff += fa * fa
        tl.store(g_ptr + b * stride_g + offs, g, mask=dm)
    _store_ring_partials(part, rows, L_CEIL, acc_a, acc_b, acc_c)
    tl.store(part + 3 * L_CEIL, tl.sum(s_dg, axis=0))
    tl.store(part + 3 * L_CEIL + 1, tl.sum(s_ddg, axis=0))
    tl.store(part + 3 * L_CEIL + 2, tl.sum(gg, axis=0))
    tl.store(part + 3 * L_CEIL + 3, tl.sum(ff, axis=0))
    # the further ring blocks reload g (stored above by other threads of this program: the
    # barrier makes those stores visible), g_old and dx
    if MANY_BLOCKS:
        tl.debug_barrier()
        _further_ring_blocks(g_ptr, g_old_ptr, dx_ptr, U_ptr, V_ptr, part, b, n_valid, start, end,
                             L_CEIL, stride_g, stride_go, stride_dx, stride_Ub, stride_Ul,
                             stride_Vb, stride_Vl, ACC, L_BLOCK, BLOCK_D)
    if last_arrival(ticket_ptr, b, chunks):
        _reduce_chunks(part_ptr + b * stride_part, abc_ptr + b * stride_abc,
                       scal_ptr + b * stride_scal, n_valid, L, L_CEIL, chunks, L_BLOCK)


@triton.jit
def _reduce_chunks(part, abc, scal, n_valid, L, L_CEIL, chunks, L_BLOCK: tl.constexpr):
    """The last program of a sample: ``abc`` (all ``L`` slots; zero from ``n_valid``) and
    ``scal`` as sums of the chunks' partials in chunk order (deterministic)."""
    ACC = scal.dtype.element_ty
    rows = tl.arange(0, L_BLOCK)
    width = 3 * L_CEIL + 4
    four = tl.arange(0, 4)
    rs = tl.zeros([4], dtype=ACC)
    for c in range(0, chunks):
        rs += tl.load(part + c * width + 3 * L_CEIL + four, cache_modifier=".cg")
    tl.store(scal + four, rs)
    for l0 in range(0, L, L_BLOCK):
        slots = l0 + rows
        rm = slots < n_valid
        ra = tl.zeros([L_BLOCK], dtype=ACC)
        rb = tl.zeros([L_BLOCK], dtype=ACC)
        rc = tl.zeros([L_BLOCK], dtype=ACC)
        for c in range(0, chunks):                      # fixed order: deterministic
            pc = part + c * width
            # .cg: through L2, never a stale L1 line (_common's module docstring)
            ra += tl.load(pc + slots, mask=rm, other=0.0, cache_modifier=".cg")
            rb += tl.load(pc + L_CEIL + slots, mask=rm, other=0.0, cache_modifier=".cg")
            rc += tl.load(pc + 2 * L_CEIL + slots, mask=rm, other=0.0, cache_modifier=".cg")
        lm = slots < L
        tl.store(abc + slots, ra, mask=lm)
        tl.store(abc + L + slots, rb, mask=lm)
        tl.store(abc + 2 * L + slots, rc, mask=lm)


@triton.jit
def _ring_coefficients(abc, L, slots, n_valid):
    """``a, b, c`` of the ring slots ``slots`` (zero from ``n_valid``), ``abc``'s dtype."""
    rm = slots < n_valid
    return (tl.load(abc + slots, mask=rm, other=0.0), tl.load(abc + L + slots, mask=rm, other=0.0),
            tl.load(abc + 2 * L + slots, mask=rm, other=0.0))


@triton.jit
def _blocked_coefficient_dots(abc, L, n_valid, ACC: tl.constexpr, L_BLOCK: tl.constexpr):
    """``<a, b>`` and ``<a, c>`` over a ring of several blocks (slots from ``n_valid`` are zero)."""
    rows = tl.arange(0, L_BLOCK)
    ab = tl.zeros([L_BLOCK], dtype=ACC)
    ac = tl.zeros([L_BLOCK], dtype=ACC)
    for l0 in range(0, n_valid, L_BLOCK):
        a, bb, cc = _ring_coefficients(abc, L, l0 + rows, n_valid)
        ab += a * bb
        ac += a * cc
    return tl.sum(ab, axis=0), tl.sum(ac, axis=0)


@triton.jit
def _blocked_ring_sums(U_ptr, V_ptr, abc, b, L, n_valid, slot, offs, dm, stride_Ub, stride_Ul,
                       stride_Vb, stride_Vl, ACC: tl.constexpr, L_BLOCK: tl.constexpr,
                       BLOCK_D: tl.constexpr):
    """Pass 2's sums over a ring of several blocks at columns ``offs``: ``sum_l b_l U_l``,
    ``sum_l c_l U_l``, ``sum_l a_l V_l`` and ``U[slot]`` (0 unless ``slot < n_valid``)."""
    rows = tl.arange(0, L_BLOCK)
    bU = tl.zeros([BLOCK_D], dtype=ACC)
    cU = tl.zeros([BLOCK_D], dtype=ACC)
    aV = tl.zeros([BLOCK_D], dtype=ACC)
    u_old = tl.zeros([BLOCK_D], dtype=ACC)
    for l0 in range(0, n_valid, L_BLOCK):
        slots = l0 + rows
        a, bb, cc = _ring_coefficients(abc, L, slots, n_valid)
        Ut, Vt = _ring_tiles(U_ptr, V_ptr, b, stride_Ub, stride_Ul, stride_Vb, stride_Vl, slots,
                             offs, (slots < n_valid)[:, None] & dm[None, :])
        Ut = Ut.to(ACC)
        bU += tl.sum(bb[:, None] * Ut, axis=0)
        cU += tl.sum(cc[:, None] * Ut, axis=0)
        aV += tl.sum(a[:, None] * Vt.to(ACC), axis=0)
        u_old += tl.sum(tl.where(slots[:, None] == slot, Ut, 0.0), axis=0)
    return bU, cU, aV, u_old


@triton.jit(do_not_specialize=["slot", "n_valid"])
def _broyden_update_kernel(x_ptr, g_ptr, g_old_ptr, dx_ptr, U_ptr, V_ptr, abc_ptr, scal_ptr,
                           best_ptr, improved_ptr, active_ptr, slot, n_valid, D, L, chunk_d,
                           stride_x, stride_g, stride_go, stride_dx, stride_Ub, stride_Ul,
                           stride_Vb, stride_Vl, stride_abc, stride_scal, stride_best,
                           L_BLOCK: tl.constexpr, BLOCK_D: tl.constexpr,
                           MANY_BLOCKS: tl.constexpr):
    """Pass 2 for sample ``b = program_id(0)`` on the columns of chunk ``program_id(1)`` (``a, b,
    c`` from ``abc``, ``s = slot``)::

        best[b] = x[b]                                       if improved[b]
        <v, g> = <a, b> - <dx, g>;   den = <v, dg> = <a, c> - <dx, dg>
        nhg = -H g = g - sum_l b_l U_l;   v = sum_l a_l V_l - dx
        u = (dx + dg - sum_l c_l U_l) / den   (= (dx - H dg) / den; NaN, inf -> 0)
        upd = nhg - <v, g>·u + b_s·U_s(old)                  (= -H' g; the evicted term)
        if active[b]:  U[b, s] = u;  V[b, s] = v;  x_new = x[b] + upd      else: x_new = x[b]
        dx[b] = x_new - x[b] (the step as taken, after rounding);  x[b] = x_new

    The sums over the ring run over blocks of ``L_BLOCK`` slots inside each column step.
    Accumulation: ``abc``'s dtype (the reference rounds intermediate products to the state dtype
    for half states: half results agree to half precision). ``x += dx`` adds the stored
    (state-dtype) ``dx``, as the reference does. Each step loads everything first; a barrier
    orders its stores after every thread's loads of ``x``/``dx``/``U[s]``/``V[s]`` (the new ``dx``
    does not depend on the old one, so no data dependency orders them otherwise).
    Bytes: read x, g, g_old, dx, n_valid rows of U and V (U once for both sums); write U[s], V[s],
    dx, x -> ``(2·n_valid + 8)·B·D·size`` (+ B·D·size for the best copy of improved samples).
    """
    ACC = scal_ptr.dtype.element_ty
    DT = x_ptr.dtype.element_ty
    b = tl.program_id(0).to(tl.int64)
    start = tl.program_id(1) * chunk_d
    end = tl.minimum(start + chunk_d, D)
    rows = tl.arange(0, L_BLOCK)
    cols = tl.arange(0, BLOCK_D)
    abc = abc_ptr + b * stride_abc
    if MANY_BLOCKS:
        ab, ac = _blocked_coefficient_dots(abc, L, n_valid, ACC, L_BLOCK)
        vg = ab - tl.load(scal_ptr + b * stride_scal)
        den = ac - tl.load(scal_ptr + b * stride_scal + 1)
        b_s = tl.load(abc + L + slot, mask=slot < n_valid, other=0.0)   # 0 until the ring wraps
    else:       # one block: its coefficients stay in registers (the same code as one tile)
        rm = rows < n_valid
        a, bb, cc = _ring_coefficients(abc, L, rows, n_valid)
        vg = tl.sum(a * bb, axis=0) - tl.load(scal_ptr + b * stride_scal)
        den = tl.sum(a * cc, axis=0) - tl.load(scal_ptr + b * stride_scal + 1)
        is_slot = rows[:, None] == slot
        b_s = tl.sum(tl.where(rows == slot, bb, 0.0), axis=0)
    imp = tl.load(improved_ptr + b) != 0
    act = tl.load(active_ptr + b) != 0
    for d0 in range(start, end, BLOCK_D):
        offs = d0 + cols
        dm = offs < end
        xv = tl.load(x_ptr + b * stride_x + offs, mask=dm, other=0.0)
        ga = tl.load(g_ptr + b * stride_g + offs, mask=dm, other=0.0).to(ACC)
        dga = ga - tl.load(g_old_ptr + b * stride_go + offs, mask=dm, other=0.0).to(ACC)
        da = tl.load(dx_ptr + b * stride_dx + offs, mask=dm, other=0.0).to(ACC)
        if MANY_BLOCKS:
            bU, cU, aV, u_old = _blocked_ring_sums(U_ptr, V_ptr, abc, b, L, n_valid, slot, offs, dm,
                                                   stride_Ub, stride_Ul, stride_Vb, stride_Vl,
                                                   ACC, L_BLOCK, BLOCK_D)
            nhg = ga - bU
            num = (da + dga) - cU
            v = aV - da
        else:
            Ut, Vt = _ring_tiles(U_ptr, V_ptr, b, stride_Ub, stride_Ul, stride_Vb, stride_Vl, rows,
                                 offs, rm[:, None] & dm[None, :])
            Ut = Ut.to(ACC)
            nhg = ga - tl.sum(bb[:, None] * Ut, axis=0)
            num = (da + dga) - tl.sum(cc[:, None] * Ut, axis=0)
            v = tl.sum(a[:, None] * Vt.to(ACC), axis=0) - da
        if ACC == tl.float64:
            u = num / den
        else:                       # IEEE division as torch's (Triton's fp32 '/' is approximate)
            u = tl.div_rn(num, tl.zeros_like(num) + den)
        u = tl.where(tl.abs(u) < float("inf"), u, 0.0)              # NaN and +-inf -> 0
        if not MANY_BLOCKS:         # after u: ptxas then needs 80 registers, not 98-104 (fp16)
            u_old = tl.sum(tl.where(is_slot, Ut, 0.0), axis=0)
        upd = nhg - vg * u + b_s * u_old
        dxn = tl.where(act, upd, 0.0).to(DT)
        tl.debug_barrier()
        tl.store(best_ptr + b * stride_best + offs, xv, mask=dm & imp)
        # a stopped sample keeps its factors (returned for the backward pass) and stays put
        tl.store(U_ptr + b * stride_Ub + slot * stride_Ul + offs, u.to(DT), mask=dm & act)
        tl.store(V_ptr + b * stride_Vb + slot * stride_Vl + offs, v.to(DT), mask=dm & act)
        xn = (xv.to(ACC) + dxn.to(ACC)).to(DT)
        # dx = the step actually taken (x_new - x as rounded), the original's x_est - prev_x
        tl.store(dx_ptr + b * stride_dx + offs, (xn.to(ACC) - xv.to(ACC)).to(DT), mask=dm)
        tl.store(x_ptr + b * stride_x + offs, xn, mask=dm)


def _check_rings(x: torch.Tensor, U: torch.Tensor, V: torch.Tensor, abc: torch.Tensor,
                 scal: torch.Tensor) -> tuple:
    check_state("x", x)
    B, D = x.shape
    if not isinstance(U, torch.Tensor) or U.dim() != 3 or U.shape[1] < 1:
        raise ValueError(f"U must be a [B, L, D] tensor with L >= 1, got {getattr(U, 'shape', U)}")
    L = U.shape[1]
    acc = acc_dtype_of(x.dtype)
    check("x", x, (B, D), x.dtype, x.device)
    check("U", U, (B, L, D), x.dtype, x.device)
    check("V", V, (B, L, D), x.dtype, x.device)
    check("abc", abc, (B, 3, L), acc, x.device)
    if abc.stride(1) != L:
        raise ValueError(f"abc must be contiguous per sample (stride(1) == L), got {abc.stride()}")
    check("scal", scal, (B, 4), acc, x.device)
    return B, D, L


def _plan_for(x: torch.Tensor, L: int) -> Plan:
    return launch_plan(x.shape[0], x.shape[1], L, x.element_size(), sm_count(x.device))


def broyden_dots(x: torch.Tensor, fx: torch.Tensor, g_old: torch.Tensor, g: torch.Tensor,
                 dx: torch.Tensor, U: torch.Tensor, V: torch.Tensor, abc: torch.Tensor,
                 scal: torch.Tensor, n_valid: int) -> None:
    """Broyden pass 1 in one launch (in place; see ``_broyden_dots_kernel``).

    Args:
        x, fx: ``[B, D]`` iterate and ``f(x)`` (float32/float64/float16/bfloat16).
        g_old: ``[B, D]`` the previous residual (read; a different buffer from ``g``).
        g: ``[B, D]`` output residual ``fx - x``.
        dx: ``[B, D]`` the previous step (the one taken, after any line search).
        U, V: ``[B, L, D]`` rings of the rank-1 factors (any ``L``); rows ``>= n_valid`` are
            zero.
        abc: ``[B, 3, L]`` output ``a = U dx``, ``b = V g``, ``c = V (g - g_old)`` (float32;
            float64 for float64 states).
        scal: ``[B, 4]`` output ``[<dx, g>, <dx, g - g_old>, ||g||^2, ||fx||^2]``.
        n_valid: written ring slots, ``0 <= n_valid <= L``.

    Returns:
        None.

    Example:
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"    # cpu: TRITON_INTERPRET=1
        >>> B, L, D = 3, 4, 37
        >>> x, fx, dx = (torch.randn(B, D, device=dev) for _ in range(3))
        >>> g, g_old = torch.empty_like(x), torch.zeros_like(x)
        >>> U, V = torch.zeros(2, B, L, D, device=dev)
        >>> abc, scal = torch.zeros(B, 3, L, device=dev), torch.empty(B, 4, device=dev)
        >>> broyden_dots(x, fx, g_old, g, dx, U, V, abc, scal, n_valid=0)
        >>> bool((abc == 0).all()), torch.allclose(g, fx - x)
        (True, True)
    """
    B, D, L = _check_rings(x, U, V, abc, scal)
    check("fx", fx, (B, D), x.dtype, x.device, unit_inner=False)
    check("g_old", g_old, (B, D), x.dtype, x.device)
    check("g", g, (B, D), x.dtype, x.device)
    check("dx", dx, (B, D), x.dtype, x.device)
    if not 0 <= n_valid <= L:
        raise ValueError(f"n_valid must satisfy 0 <= n_valid <= L = {L}, got {n_valid}")
    fx = unit_inner(fx)
    p = _plan_for(x, L)
    l_ceil = triton.cdiv(L, p.ROWS_PAD) * p.ROWS_PAD           # the kernel's L_CEIL
    part = torch.empty(B, p.chunks, 3 * l_ceil + 4, dtype=abc.dtype, device=x.device)
    with device_guard(x.device):
        _broyden_dots_kernel[p.grid](
            x, fx, g_old, g, dx, U, V, abc, scal, part, tickets(x.device, B), n_valid, D, L,
            p.chunk_d, p.chunks, x.stride(0), fx.stride(0), g_old.stride(0), g.stride(0),
            dx.stride(0), U.stride(0), U.stride(1), V.stride(0), V.stride(1), abc.stride(0),
            scal.stride(0), part.stride(0),
            L_BLOCK=p.ROWS_PAD, BLOCK_D=p.BLOCK_D, MANY_BLOCKS=L > p.ROWS_PAD,
            num_warps=p.num_warps)


def broyden_update(x: torch.Tensor, g: torch.Tensor, g_old: torch.Tensor, dx: torch.Tensor,
                   U: torch.Tensor, V: torch.Tensor, abc: torch.Tensor, scal: torch.Tensor,
                   best: torch.Tensor, improved: torch.Tensor, active: torch.Tensor, slot: int,
                   n_valid: int) -> None:
    """Broyden pass 2 in one launch: best copy, rank-1 update into slot ``slot``, the step.

    Args:
        x: ``[B, D]`` iterate, advanced in place by the new ``dx``.
        g, g_old: ``[B, D]`` residuals as passed to :func:`broyden_dots` (``dg = g - g_old``).
        dx: ``[B, D]`` previous step in, new step out (zero for inactive samples).
        U, V: ``[B, L, D]`` rings; slot ``slot`` is overwritten with ``u``, ``v``.
        abc, scal: outputs of :func:`broyden_dots`.
        best: ``[B, D]`` best-so-far estimate, set to ``x`` (before the step) where ``improved``.
        improved, active: ``[B]`` bool.
        slot: ring slot to write, ``0 <= slot < L``.
        n_valid: written slots before this update, ``0 <= n_valid <= L``.

    Returns:
        None.

    Example:
        >>> dev = "cuda" if torch.cuda.is_available() else "cpu"    # cpu: TRITON_INTERPRET=1
        >>> B, L, D = 3, 4, 37
        >>> x, fx, dx = (torch.randn(B, D, device=dev) for _ in range(3))
        >>> g, g_old = torch.empty_like(x), torch.zeros_like(x)
        >>> U, V = torch.zeros(2, B, L, D, device=dev)
        >>> abc, scal = torch.zeros(B, 3, L, device=dev), torch.empty(B, 4, device=dev)
        >>> broyden_dots(x, fx, g_old, g, dx, U, V, abc, scal, n_valid=0)
        >>> best, x_old = torch.zeros(B, D, device=dev), x.clone()
        >>> flags = torch.ones(B, dtype=torch.bool, device=dev)
        >>> broyden_update(x, g, g_old, dx, U, V, abc, scal, best, flags, flags, slot=0, n_valid=0)
        >>> torch.equal(best, x_old), tuple(U[:, 0].shape)
        (True, (3, 37))
    """
    B, D, L = _check_rings(x, U, V, abc, scal)
    check("g", g, (B, D), x.dtype, x.device)
    check("g_old", g_old, (B, D), x.dtype, x.device)
    check("dx", dx, (B, D), x.dtype, x.device)
    check("best", best, (B, D), x.dtype, x.device)
    check("improved", improved, (B,), torch.bool, x.device)
    check("active", active, (B,), torch.bool, x.device)
    if not 0 <= slot < L:
        raise ValueError(f"slot must satisfy 0 <= slot < L = {L}, got {slot}")
    if not 0 <= n_valid <= L:
        raise ValueError(f"n_valid must satisfy 0 <= n_valid <= L = {L}, got {n_valid}")
    p = _plan_for(x, L)
    with device_guard(x.device):
        _broyden_update_kernel[p.grid](
            x, g, g_old, dx, U, V, abc, scal, best, improved, active, slot, n_valid, D, L,
            p.chunk_d, x.stride(0), g.stride(0), g_old.stride(0), dx.stride(0), U.stride(0),
            U.stride(1), V.stride(0), V.stride(1), abc.stride(0), scal.stride(0), best.stride(0),
            L_BLOCK=p.ROWS_PAD, BLOCK_D=p.BLOCK_D, MANY_BLOCKS=L > p.ROWS_PAD,
            num_warps=p.num_warps)
