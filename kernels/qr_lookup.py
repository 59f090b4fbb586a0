"""Quotient-remainder compositional embeddings: fused lookup (plain and bag) and table gradients.

Every kernel hashes its own ids: ``h = id mod (Q*R)`` (non-negative, exact int64 arithmetic),
quotient row ``h // R``, remainder row ``h % R``; and finds an item's bag in ``offsets`` itself
(binary search), so no index or bag array is built outside the kernels.

Forward: ``_qr_lookup_fwd_kernel`` gathers and composes ("add", "mult" or "concat") in float32
and stores one tile of rows; ``_qr_lookup_bag_fwd_kernel`` owns one bag x one D tile and sums
its composed items (each times its per-sample weight, or ``1 / len`` for "mean") before the
single store.

Exact range: a bag sum, a gradient row or a weight's gradient multiplies up to three table,
weight or gradient values and sums them: in float32 an intermediate can overflow (``g * w`` at
``w`` = 3e38, ``q * r`` = 1e40, partial sums of +-3e38) or underflow into the subnormals before
a large factor multiplies it up, where the exact result is representable. Every such sum runs
twice at most: a float32 pass (the hot loop, unchanged: each item's composed row times its
factor, in the order ``(q op r) * f`` / ``(g * other) * f`` so that no factor > 1 follows an
underflow but a weight), and, only where its result is not finite or a "mult" weight above 1
multiplies a product that underflowed (``q * r`` or ``g * q`` nonzero factors, below 2^-126:
its rounding error would be multiplied up; qrprobe QP1), or where a result lies in its dtype's
top binade (``_at_top``: a float32 sum could stay at max where the exact sum reaches the
overflow midpoint, and the store's second rounding of a bfloat16 / float16 one could give
+-inf below it; QP3), a float64 pass over the same items (float64 holds every product of
three float32 values in range; an "add" item's q and r rows are separate terms, as q + r
rounds in float64 where they lie far apart), compensated (``_common.dd_sum``: two exact
parts and a remainder per block of items; ``dd_add``: a running sum in three parts) and
rounded once (``_common.round_dd``: to odd first, so that a sum within 2^-54 of a rounding
midpoint does not round twice; QP5). A "mean" redo takes each ``x / len`` as two terms within
about 2^-101 of it (``_mean_terms``) and rounds once unless the sum lies within 2^-100 of its
terms' magnitudes of a point of float32's half-ulp grid, where it is that point (exact ties
are frequent there: rounding to nearest twice instead gave +-inf below the overflow midpoint,
fuzzS). The redo is decided per
program (one bag or table row x one D tile) after its loop: no extra launch, no host read; bags
and rows of ordinary values never take it.

Backward, deterministic (default), both tables in one pass:

1. ``_qr_keys_kernel`` writes one sort key per (item, table): ``q row`` for the quotient table,
   ``Q + r row`` for the remainder table.
2. ONE stable ``torch.sort`` of those keys lists, for every table row, its items in item order.
3. ``_qr_rows_kernel``: one program per (table row, D tile) finds the row's run in the sorted
   keys by binary search, sums its items' contributions in that order in float32 and stores the
   row once; an untouched row stores zeros. Every gradient element is written exactly once (no
   zero fill), nothing is read on the host, and the result is bitwise reproducible.

``sparse=True`` runs the same sort and row kernel over the touched rows only: their number sizes
the output, so it is read on the host (one sync). ``deterministic=False``: ``_qr_atomic_kernel``
adds each item's contribution to both tables with relaxed float32 atomics (no sort). Where a
row's float32 partial sums could overflow (a term beyond ``2^t`` ~ 3.4e38 / N, see
``atomic_overflow_bound``: nothing else can overflow) it marks the row, and
``_qr_atomic_fixup_kernel``, one program launched after it, sums again the marked rows whose
float32 sum is not finite (an overflowed partial sum never comes back) or lies in float32's top
binade (it could stay at max where the exact sum overflows): each term in float64,
summed in a register tile of three-part running sums, rounded once (+-inf only where the
exact sum overflows). It returns at once when nothing was marked: ordinary inputs pay one launch, no host
read. bfloat16 / float16 tables then round the float32 accumulators with
``_qr_atomic_narrow_kernel`` (in place of torch's conversion), which sums again the rows that
reach the dtype's top binade.
``_qr_psw_grad_kernel``: gradient of the per-sample weights (composed item . bag gradient).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ._common import (FIX_SCAN, TOP32, add_rows_by_index, add_rows_by_index_dd, atomic_overflow_bound, dd_add, dd_sum,
                      flat_grid, flat_program_id, launcher, next_pow2, nonfinite_rows, rcp_rn, round_dd,
                      rows_vectorise, tile_offsets, two_prod)

OP_CODES = {"add": 0, "mult": 1, "concat": 2}
KEYS_BLOCK = 1024  # ids per program of the sort-key kernel
# |weight| (mult) beyond which a float32 q * r (or g * q) that underflowed (below float32's
# smallest normal, absolute error up to 2^-150) would be multiplied past the result's own
# rounding: such a bag or row is summed in float64 (see the module docstring). Only factors of
# an underflowed product count (_underflowed), so ordinary weights > 1 never redo.
BIG_W = tl.constexpr(1.0)
FP32_MAX = tl.constexpr(3.4028234663852886e38)
FP32_TINY = tl.constexpr(1.1754943508222875e-38)  # float32's smallest normal, 2^-126
# "mean"'s float64 redo: each quotient x / len is two terms within about 2^-101 of it
# (_mean_terms), so a sum within 2^-100 of its quotients' magnitudes of a rounding point is
# taken to be that point (round_dd's SNAP): exact ties are frequent there (bfloat16 means).
MEAN_TOL = tl.constexpr(7.888609052210118e-31)  # 2^-100


def _search_iters(n: int) -> int:
    """Binary-search steps that narrow ``[0, n]`` to one point."""
    return max(1, int(n).bit_length())


@triton.jit
def _qr_hash(b_ids, M, R):
    b_ids = b_ids.to(tl.int64)
    b_h = b_ids % M
    b_h = tl.where(b_h < 0, b_h + M, b_h)  # C-style remainder on the GPU; floor mod is already >= 0
    b_qi = b_h // R
    return b_qi, b_h - b_qi * R


@triton.jit
def _bag_of(p_offsets, B, b_item, m_l, N_BAG_ITERS):
    """Bag of each item: the last ``b`` with ``offsets[b] <= item`` (offsets start at 0, sorted)."""
    b_lo = tl.zeros_like(b_item)
    b_hi = tl.zeros_like(b_item) + B
    for _ in range(N_BAG_ITERS):
        b_open = b_lo < b_hi
        b_mid = (b_lo + b_hi) // 2
        b_v = tl.load(p_offsets + b_mid, mask=m_l & b_open, other=0)
        b_right = b_v <= b_item
        b_lo = tl.where(b_open & b_right, b_mid + 1, b_lo)
        b_hi = tl.where(b_open & ~b_right, b_mid, b_hi)
    return b_lo - 1


@triton.jit
def _bag_bounds(p_offsets, b_bag, m, N, B):
    b_start = tl.load(p_offsets + b_bag, mask=m, other=0).to(tl.int64)
    b_end = tl.load(p_offsets + b_bag + 1, mask=m & (b_bag + 1 < B), other=N).to(tl.int64)
    return b_start, b_end


@triton.jit
def _not_finite(b):
    """Scalar: whether any element of ``b`` is NaN or +-inf."""
    return tl.max(((b != b) | (tl.abs(b) > FP32_MAX)).to(tl.int32)) > 0


@triton.jit
def _at_top(b_a, p_out):
    """Where ``b_a`` (``|result|``, float32) lies in the top binade of ``p_out``'s dtype (at or
    above 2^127 for float32 and bfloat16, 2^15 for float16; +inf included). Such a float32 result
    is summed again: its own rounding could stay at float32's max where the exact sum reaches the
    overflow midpoint (max, 2^102, 2^102), and the store's second rounding of a bfloat16 /
    float16 one could give +-inf below it (qrprobe QP3). Below the top binade a float32 sum
    would be off by more than 2^126 (about 2^23 terms) before either could happen."""
    if p_out.dtype.element_ty == tl.float16:
        return b_a >= 32768.0
    else:
        return b_a >= TOP32


@triton.jit
def _near_top(b, p_out):
    """Scalar: whether any element of the float32 result ``b`` bound for ``p_out`` lies in its
    dtype's top binade (:func:`_at_top`)."""
    return tl.max(_at_top(tl.abs(b), p_out).to(tl.int32)) > 0


@triton.jit
def _beyond(b, bound):
    """Scalar: whether any element of ``b`` is NaN or exceeds ``bound`` in magnitude."""
    return tl.max(((b != b) | (tl.abs(b) > bound)).to(tl.int32)) > 0


@triton.jit
def _to_math(b, EXACT: tl.constexpr):
    """float64 (``EXACT``) or float32."""
    if EXACT:
        return b.to(tl.float64)
    else:
        return b.to(tl.float32)


@triton.jit
def _inv_len(start, end):
    """``1 / max(end - start, 1)``: a float32 reciprocal (rounded once: a plain / is div.full, up
    to 2 ulp, on a GPU); :func:`_inv_len_dd` is the float64 redo's."""
    return rcp_rn(tl.maximum(end - start, 1).to(tl.float32))


@triton.jit
def _inv_len_dd(start, end):
    """``(hi, lo)`` float64, ``hi + lo`` within about 2^-102 of ``1 / n`` (``n = max(end - start,
    1)``, exact in float64): the float32 reciprocal, two Newton steps in float64 (``hi`` within
    ~2^-52; a float64 division would be a called subroutine on the GPU), then ``lo = hi r`` with
    ``r = 1 - n hi`` formed exactly (:func:`two_prod`): ``1 / n = hi (1 + r + r^2 ...)``."""
    b_n = tl.maximum(end - start, 1).to(tl.float64)
    b_inv = rcp_rn(b_n.to(tl.float32)).to(tl.float64)
    b_inv = b_inv + b_inv * (1.0 - b_n * b_inv)
    b_inv = b_inv + b_inv * (1.0 - b_n * b_inv)
    b_p, b_e = two_prod(b_n, b_inv)
    return b_inv, b_inv * ((1.0 - b_p) - b_e)  # (1 - p is exact: p lies within 2^-50 of 1)


@triton.jit
def _mean_terms(b_x, b_ih, b_il):
    """``(p, e)``: ``x / n`` for exact float64 terms ``x`` as two float64 terms, ``p = fl(x hi)``
    and ``e`` the rest (:func:`two_prod`'s error plus ``x lo``), within about 2^-101 of ``x / n``
    (``(hi, lo)`` from :func:`_inv_len_dd`, broadcast to ``x``). A "mean" redo sums both and
    rounds the sum once where it is not within 2^-100 of its terms' magnitudes (``sum |p|``)
    of a rounding point (:func:`round_dd` ``SNAP``). Rounding each ``x hi`` alone carried 1/len's
    error into the sum, and rounding the sum twice instead (to nearest float32, then to the
    dtype) gave +-inf where the exact mean rounds to the dtype's max (fuzzS)."""
    b_p, b_e = two_prod(b_x, b_ih)
    return b_p, tl.where(tl.abs(b_x) < float("inf"), b_e + b_x * b_il, 0.0)  # (+-inf, NaN: p carries it)


@triton.jit
def _underflowed(b_p, b_a, b_b):
    """Where the float32 product ``b_p = b_a * b_b`` of nonzero factors fell below float32's
    smallest normal (subnormal or 0: absolute error up to 2^-150)."""
    return (tl.abs(b_p) < FP32_TINY) & (b_a != 0) & (b_b != 0)


@triton.jit
def _qr_compose(
    p_qw, p_rw, b_qi, b_ri, m_n, o_d, DQ, DR,
    stride_qn, stride_qd, stride_rn, stride_rd, OP: tl.constexpr, EXACT: tl.constexpr = False,
    SPLIT: tl.constexpr = False,
):
    """``(composed (BLOCK, BLOCK_D), underflowed)``: the composed rows, float32 (float64 with
    ``EXACT``), zeros where ``m_n`` or the column is masked; and where a "mult" product of
    nonzero factors underflowed (:func:`_underflowed`; all False for the other ops). ``SPLIT``
    ("add" only): ``(q rows, r rows)`` apart, for a float64 redo that sums them as separate
    terms (``q + r`` rounds in float64 where they lie more than 53 bits apart: items (2^60, 1)
    and (-2^60, 0) summed to 0, exact 1; fuzzR)."""
    if OP == 2:  # concat: columns [0, DQ) from q, [DQ, DQ + DR) from r
        o_r = o_d - DQ
        m_q = m_n[:, None] & (o_d < DQ)[None, :]
        m_r = m_n[:, None] & ((o_r >= 0) & (o_r < DR))[None, :]
    else:
        o_r = o_d
        m_q = m_n[:, None] & (o_d < DQ)[None, :]
        m_r = m_q
    b_q = _to_math(tl.load(p_qw + b_qi[:, None] * stride_qn + o_d[None, :] * stride_qd, mask=m_q, other=0.0), EXACT)
    b_r = _to_math(tl.load(p_rw + b_ri[:, None] * stride_rn + o_r[None, :] * stride_rd, mask=m_r, other=0.0), EXACT)
    if OP == 1:
        b_c = b_q * b_r
        return b_c, _underflowed(b_c, b_q, b_r)
    elif SPLIT:
        return b_q, b_r
    else:
        b_c = b_q + b_r
        return b_c, b_c < float("-inf")  # (all False)


@triton.jit
def _qr_lookup_fwd_kernel(
    p_ids, p_qw, p_rw, p_out,
    N, M, R, DQ, DR, DOUT, N_D_TILES,
    stride_qn, stride_qd, stride_rn, stride_rd, stride_on, stride_od,
    OP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    o_n, o_d = tile_offsets(N_D_TILES, BLOCK_N, BLOCK_D)
    m_n = o_n < N
    b_qi, b_ri = _qr_hash(tl.load(p_ids + o_n, mask=m_n, other=0), M, R)
    b_c, _ = _qr_compose(p_qw, p_rw, b_qi, b_ri, m_n, o_d, DQ, DR, stride_qn, stride_qd, stride_rn, stride_rd, OP)
    m = m_n[:, None] & (o_d < DOUT)[None, :]
    tl.store(p_out + o_n[:, None] * stride_on + o_d[None, :] * stride_od, b_c.to(p_out.dtype.element_ty), mask=m)


@triton.jit
def _qr_bag_sum(
    p_ids, p_psw, p_qw, p_rw, start, end, o_d, M, R, DQ, DR,
    stride_qn, stride_qd, stride_rn, stride_rd,
    OP: tl.constexpr, HAS_W: tl.constexpr, MEAN: tl.constexpr, EXACT: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``(pooled (BLOCK_D,), max |weight|)`` of items ``[start, end)``: each composed row times its
    factor (weight, or 1 / len for "mean"), summed in float32 (float64 with ``EXACT``). The max
    |weight| is taken for "mult" only, over the items whose product underflowed somewhere (0
    otherwise): above ``BIG_W`` the float32 sum is redone. With ``EXACT``: ``(s, e, f, max
    |weight|, a)``, the pooled sum in three float64 parts (:func:`dd_add`; :func:`round_dd`
    rounds it once) and, for "mean", ``a = sum |p|`` over its quotients' leading terms
    (:func:`_mean_terms`; zeros otherwise)."""
    if EXACT:  # the redo sums each block of items at once (dd_sum): no float64 tile carried over
        b_acc = tl.zeros((BLOCK_D,), dtype=tl.float64)
        b_err = tl.zeros((BLOCK_D,), dtype=tl.float64)
        b_tail = tl.zeros((BLOCK_D,), dtype=tl.float64)
        b_abs = tl.zeros((BLOCK_D,), dtype=tl.float64)
        if MEAN:
            inv_hi, inv_lo = _inv_len_dd(start, end)
    else:
        b_acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
        if MEAN:
            inv_len = _inv_len(start, end)
    b_wmax = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for l0 in range(start, end, BLOCK_L):
        o_l = l0 + tl.arange(0, BLOCK_L)
        m_l = o_l < end
        b_qi, b_ri = _qr_hash(tl.load(p_ids + o_l, mask=m_l, other=0), M, R)
        # (the float64 redo of "add": q and r rows as separate terms, b_c and b_c2)
        b_c, b_low = _qr_compose(p_qw, p_rw, b_qi, b_ri, m_l, o_d, DQ, DR, stride_qn, stride_qd, stride_rn,
                                 stride_rd, OP, EXACT, EXACT and OP == 0)
        if EXACT and OP == 0:
            b_c2 = b_low  # (the r rows)
        if HAS_W:
            b_w = tl.load(p_psw + o_l, mask=m_l, other=0.0).to(tl.float32)
            b_c = b_c * _to_math(b_w, EXACT)[:, None]
            if EXACT and OP == 0:
                b_c2 = b_c2 * _to_math(b_w, EXACT)[:, None]
            if OP == 1:  # (the weights of items with an underflowed product)
                b_wmax = tl.maximum(b_wmax, tl.where(tl.max(b_low.to(tl.int32), axis=1) > 0, tl.abs(b_w), 0.0))
        if EXACT:
            if MEAN:  # each x / len as two terms (its quotient rounded once, and the rest)
                b_c, b_cl = _mean_terms(b_c, inv_hi, inv_lo)
                b_acc, b_err, b_tail = _dd_add_block(b_acc, b_err, b_tail, b_cl)
                b_abs += tl.sum(tl.abs(b_c), axis=0)
                if OP == 0:
                    b_c2, b_cl = _mean_terms(b_c2, inv_hi, inv_lo)
                    b_acc, b_err, b_tail = _dd_add_block(b_acc, b_err, b_tail, b_cl)
                    b_abs += tl.sum(tl.abs(b_c2), axis=0)
            b_acc, b_err, b_tail = _dd_add_block(b_acc, b_err, b_tail, b_c)
            if OP == 0:
                b_acc, b_err, b_tail = _dd_add_block(b_acc, b_err, b_tail, b_c2)
        else:
            if MEAN:
                b_c = b_c * inv_len
            b_acc += b_c
    if EXACT:
        return b_acc, b_err, b_tail, tl.max(b_wmax, axis=0), b_abs
    else:
        return tl.sum(b_acc, axis=0), tl.max(b_wmax, axis=0)


@triton.jit
def _redo_rows(BLOCK_L: tl.constexpr, MEAN: tl.constexpr):
    """Items per block of a float64 redo: half the float32 loop's (a quarter for "mean", whose
    quotients are two float64 tiles each: sm_90 registers), at least one."""
    return tl.constexpr(max(1, BLOCK_L // (4 if MEAN else 2)))


@triton.jit
def _dd_add_block(b_s, b_e, b_f, b_t):
    """The running sum ``(s, e, f)`` plus the block ``b_t (rows, BLOCK_D)`` summed along its rows
    (:func:`dd_sum`, then :func:`dd_add`)."""
    b_hi, b_mid, b_lo = dd_sum(b_t, 0)
    return dd_add(b_s, b_e, b_f, b_hi, b_mid, b_lo)


@triton.jit
def _qr_lookup_bag_fwd_kernel(
    p_ids, p_offsets, p_psw, p_qw, p_rw, p_out,
    N, B, M, R, DQ, DR, DOUT, N_D_TILES,
    stride_qn, stride_qd, stride_rn, stride_rd, stride_on, stride_od,
    OP: tl.constexpr, HAS_W: tl.constexpr, MEAN: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = flat_program_id()
    pid_b = pid // N_D_TILES
    pid_d = pid % N_D_TILES
    if pid_b >= B:
        return
    o_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    start, end = _bag_bounds(p_offsets, pid_b, pid_b < B, N, B)
    b_out, w_max = _qr_bag_sum(p_ids, p_psw, p_qw, p_rw, start, end, o_d, M, R, DQ, DR,
                               stride_qn, stride_qd, stride_rn, stride_rd, OP, HAS_W, MEAN, False, BLOCK_L, BLOCK_D)
    if _not_finite(b_out) | (w_max > BIG_W) | _near_top(b_out, p_out):  # the exact range: this bag's
        b_s, b_e, b_f, _, b_a = _qr_bag_sum(p_ids, p_psw, p_qw, p_rw, start, end, o_d, M, R, DQ, DR,  # items
                                            stride_qn, stride_qd, stride_rn, stride_rd, OP, HAS_W, MEAN, True,  # again
                                            _redo_rows(BLOCK_L, MEAN), BLOCK_D)  # in float64, fewer at once
        b_out = round_dd(b_s, b_e, b_f, p_out.dtype.element_ty != tl.float32, b_a * MEAN_TOL, MEAN)  # rounded once
    tl.store(p_out + pid_b * stride_on + o_d * stride_od, b_out.to(p_out.dtype.element_ty), mask=o_d < DOUT)


@triton.jit
def _qr_item_grad(
    p_g, p_ids, p_offsets, p_psw, p_ow, b_item, m_l, o_d, D, COL_OFF,
    N, B, M, R, N_BAG_ITERS,
    stride_gn, stride_gd, stride_own, stride_owd,
    IS_Q: tl.constexpr, OP: tl.constexpr, BAGS: tl.constexpr, MEAN: tl.constexpr, HAS_W: tl.constexpr,
    EXACT: tl.constexpr = False,
):
    """``(contribution (BLOCK_L, BLOCK_D), |weight| (BLOCK_L,), rest)`` of items ``b_item`` to their
    rows of one table: the output gradient of the item's row (its bag's), times the other table's
    row for "mult", times 1/len or its weight (last: the only factor > 1 after a possible
    underflow is a weight, whose |w| is returned for "mult" items with an underflowed ``g *
    other`` (:func:`_underflowed`), 0 otherwise); concat tables read their own columns. float32,
    float64 with ``EXACT``; "mean" with ``EXACT``: the contribution is ``x / len`` as two terms,
    the quotient rounded once and ``rest`` (:func:`_mean_terms`; ``rest`` is zeros otherwise)."""
    m = m_l[:, None] & (o_d < D)[None, :]
    if BAGS:
        b_row = _bag_of(p_offsets, B, b_item, m_l, N_BAG_ITERS)
    else:
        b_row = b_item
    b_g = tl.load(p_g + b_row[:, None] * stride_gn + (COL_OFF + o_d)[None, :] * stride_gd, mask=m, other=0.0)
    b_g = _to_math(b_g, EXACT)
    b_wabs = tl.zeros_like(m_l.to(tl.float32))
    b_rest = tl.zeros_like(b_g)
    if OP == 1:
        b_qi, b_ri = _qr_hash(tl.load(p_ids + b_item, mask=m_l, other=0), M, R)
        if IS_Q:
            b_oi = b_ri
        else:
            b_oi = b_qi
        b_o = _to_math(tl.load(p_ow + b_oi[:, None] * stride_own + o_d[None, :] * stride_owd, mask=m, other=0.0),
                       EXACT)
        b_go = b_g * b_o
        b_low = _underflowed(b_go, b_g, b_o)
        b_g = b_go
    if MEAN:
        b_start, b_end = _bag_bounds(p_offsets, b_row, m_l, N, B)
        if EXACT:
            b_ih, b_il = _inv_len_dd(b_start, b_end)
            b_g, b_rest = _mean_terms(b_g, b_ih[:, None], b_il[:, None])
        else:
            b_g = b_g * _inv_len(b_start, b_end)[:, None]
    if HAS_W:
        b_w = tl.load(p_psw + b_item, mask=m_l, other=0.0).to(tl.float32)
        b_g = b_g * _to_math(b_w, EXACT)[:, None]
        if OP == 1:  # (items whose product underflowed somewhere)
            b_wabs = tl.where(tl.max(b_low.to(tl.int32), axis=1) > 0, tl.abs(b_w), 0.0)
    return b_g, b_wabs, b_rest


@triton.jit
def _qr_keys_kernel(
    p_ids, p_keys, N, M, R, Q, R_BASE,
    NEED_Q: tl.constexpr, NEED_R: tl.constexpr, BLOCK: tl.constexpr,
):
    """Sort keys: ``keys[i] = q row of item i`` and ``keys[R_BASE + i] = Q + r row of item i``."""
    o_n = flat_program_id() * BLOCK + tl.arange(0, BLOCK)
    m_n = o_n < N
    b_qi, b_ri = _qr_hash(tl.load(p_ids + o_n, mask=m_n, other=0), M, R)
    if NEED_Q:
        tl.store(p_keys + o_n, b_qi.to(p_keys.dtype.element_ty), mask=m_n)
    if NEED_R:
        tl.store(p_keys + R_BASE + o_n, (Q + b_ri).to(p_keys.dtype.element_ty), mask=m_n)


@triton.jit
def _lower_bound(p_sorted, n, key, N_ITERS):
    """First position in ``p_sorted[:n]`` (ascending) holding a value >= ``key``."""
    lo = key * 0
    hi = key * 0 + n
    for _ in range(N_ITERS):
        is_open = lo < hi
        mid = (lo + hi) // 2
        v = tl.load(p_sorted + mid, mask=is_open, other=0).to(tl.int64)
        below = v < key
        lo = tl.where(is_open & below, mid + 1, lo)
        hi = tl.where(is_open & ~below, mid, hi)
    return lo


@triton.jit
def _qr_row_sum(
    p_g, p_ids, p_offsets, p_psw, p_ow, p_perm, start, end, o_d, POS_BASE, D, COL_OFF,
    N, B, M, R, N_BAG_ITERS,
    stride_gn, stride_gd, stride_own, stride_owd,
    IS_Q: tl.constexpr, OP: tl.constexpr, BAGS: tl.constexpr, MEAN: tl.constexpr, HAS_W: tl.constexpr,
    EXACT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``(sum (BLOCK_D,), max |weight|)`` of the items at sorted positions ``[start, end)``; with
    ``EXACT`` ``(s, e, f, max |weight|, a)``, the sum in three float64 parts and ("mean") the
    sum of its quotients' |leading terms| (as :func:`_qr_bag_sum`)."""
    if EXACT:  # as in _qr_bag_sum
        b_acc = tl.zeros((BLOCK_D,), dtype=tl.float64)
        b_err = tl.zeros((BLOCK_D,), dtype=tl.float64)
        b_tail = tl.zeros((BLOCK_D,), dtype=tl.float64)
        b_abs = tl.zeros((BLOCK_D,), dtype=tl.float64)
    else:
        b_acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    b_wmax = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for p0 in range(start, end, BLOCK_L):
        o_p = p0 + tl.arange(0, BLOCK_L)
        m_l = o_p < end
        b_item = tl.load(p_perm + o_p, mask=m_l, other=POS_BASE).to(tl.int64) - POS_BASE
        b_t, b_wabs, b_rest = _qr_item_grad(p_g, p_ids, p_offsets, p_psw, p_ow, b_item, m_l, o_d, D, COL_OFF,
                                            N, B, M, R, N_BAG_ITERS, stride_gn, stride_gd, stride_own, stride_owd,
                                            IS_Q, OP, BAGS, MEAN, HAS_W, EXACT)
        if EXACT:
            if MEAN:
                b_acc, b_err, b_tail = _dd_add_block(b_acc, b_err, b_tail, b_rest)
                b_abs += tl.sum(tl.abs(b_t), axis=0)
            b_acc, b_err, b_tail = _dd_add_block(b_acc, b_err, b_tail, b_t)
        else:
            b_acc += b_t
        b_wmax = tl.maximum(b_wmax, b_wabs)
    if EXACT:
        return b_acc, b_err, b_tail, tl.max(b_wmax, axis=0), b_abs
    else:
        return tl.sum(b_acc, axis=0), tl.max(b_wmax, axis=0)


@triton.jit
def _qr_row_grad(
    p_g, p_ids, p_offsets, p_psw, p_ow, p_perm, p_dw, start, end, out_row, pid_d, POS_BASE, D, COL_OFF,
    N, B, M, R, N_BAG_ITERS,
    stride_gn, stride_gd, stride_own, stride_owd, stride_dn, stride_dd,
    IS_Q: tl.constexpr, OP: tl.constexpr, BAGS: tl.constexpr, MEAN: tl.constexpr, HAS_W: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Sum the items at sorted positions ``[start, end)`` into row ``out_row`` of ``p_dw``: in
    float32, and again in float64 (compensated, rounded once: :func:`round_dd`) where that sum is
    not finite, a "mult" weight exceeds BIG_W, or it lies in its dtype's top binade
    (:func:`_at_top`)."""
    o_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    b_dw, w_max = _qr_row_sum(p_g, p_ids, p_offsets, p_psw, p_ow, p_perm, start, end, o_d, POS_BASE, D, COL_OFF,
                              N, B, M, R, N_BAG_ITERS, stride_gn, stride_gd, stride_own, stride_owd,
                              IS_Q, OP, BAGS, MEAN, HAS_W, False, BLOCK_L, BLOCK_D)
    if _not_finite(b_dw) | (w_max > BIG_W) | _near_top(b_dw, p_dw):  # float64, fewer items at once
        b_s, b_e, b_f, _, b_a = _qr_row_sum(p_g, p_ids, p_offsets, p_psw, p_ow, p_perm, start, end, o_d, POS_BASE,
                                            D, COL_OFF, N, B, M, R, N_BAG_ITERS, stride_gn, stride_gd, stride_own,
                                            stride_owd, IS_Q, OP, BAGS, MEAN, HAS_W, True, _redo_rows(BLOCK_L, MEAN),
                                            BLOCK_D)
        b_dw = round_dd(b_s, b_e, b_f, p_dw.dtype.element_ty != tl.float32, b_a * MEAN_TOL, MEAN)
    tl.store(p_dw + out_row * stride_dn + o_d * stride_dd, b_dw.to(p_dw.dtype.element_ty), mask=o_d < D)


@triton.jit
def _qr_rows_kernel(
    p_g, p_ids, p_offsets, p_psw, p_qw, p_rw, p_sorted, p_perm, p_rows, p_dq, p_dr,
    N, B, M, Q, R, DQ, DR, N_KEYS, KEY0, R_BASE, UQ, N_ROWS, N_D_TILES, N_ITERS, N_BAG_ITERS,
    stride_gn, stride_gd, stride_qn, stride_qd, stride_rn, stride_rd,
    stride_dqn, stride_dqd, stride_drn, stride_drd,
    OP: tl.constexpr, BAGS: tl.constexpr, MEAN: tl.constexpr, HAS_W: tl.constexpr, SPARSE: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (table row, D tile) per program. Dense: program ``r`` owns key ``KEY0 + r`` (every
    row of the needed tables, in table order) and writes that table row. Sparse: program ``r``
    owns the ``r``-th touched key ``rows[r]`` and writes row ``r`` (q keys) or ``r - UQ``."""
    pid = flat_program_id()
    pid_r = pid // N_D_TILES
    pid_d = pid % N_D_TILES
    if pid_r >= N_ROWS:
        return
    if SPARSE:
        key = tl.load(p_rows + pid_r).to(tl.int64)
    else:
        key = pid_r + KEY0
    start = _lower_bound(p_sorted, N_KEYS, key, N_ITERS)
    end = _lower_bound(p_sorted, N_KEYS, key + 1, N_ITERS)
    if key < Q:
        if SPARSE:
            out_row = pid_r
        else:
            out_row = key
        _qr_row_grad(p_g, p_ids, p_offsets, p_psw, p_rw, p_perm, p_dq, start, end, out_row, pid_d, 0, DQ, 0,
                     N, B, M, R, N_BAG_ITERS, stride_gn, stride_gd, stride_rn, stride_rd, stride_dqn, stride_dqd,
                     True, OP, BAGS, MEAN, HAS_W, BLOCK_L, BLOCK_D)
    else:
        if SPARSE:
            out_row = pid_r - UQ
        else:
            out_row = key - Q
        col_off = DQ if OP == 2 else 0
        _qr_row_grad(p_g, p_ids, p_offsets, p_psw, p_qw, p_perm, p_dr, start, end, out_row, pid_d, R_BASE, DR,
                     col_off, N, B, M, R, N_BAG_ITERS, stride_gn, stride_gd, stride_qn, stride_qd,
                     stride_drn, stride_drd, False, OP, BAGS, MEAN, HAS_W, BLOCK_L, BLOCK_D)


@triton.jit
def _qr_atomic_add(
    p_g, p_ids, p_offsets, p_psw, p_ow, p_dw, p_flag, p_marks, o_l, m_l, b_row, o_d, D, COL_OFF, N, B, M, R,
    N_BAG_ITERS, BIG_T, stride_gn, stride_gd, stride_own, stride_owd, stride_dn, stride_dd,
    IS_Q: tl.constexpr, OP: tl.constexpr, BAGS: tl.constexpr, MEAN: tl.constexpr, HAS_W: tl.constexpr,
):
    """Add the items' terms to their rows of one table (relaxed float32 atomics). A term is formed
    in float32, and again in float64 where it is not finite or a "mult" weight exceeds BIG_W. A
    row that receives a finite term beyond ``BIG_T`` (only such terms can make a float32 partial
    sum overflow) is marked in ``p_marks`` and ``p_flag`` is set: if its float32 sum is not
    finite, :func:`_qr_atomic_fixup_kernel` sums it again. A NaN or infinite term marks nothing
    (the row's exact sum is NaN or +-inf, and so is its float32 sum unless a finite term overflowed
    it, which marks it), so a backward of NaN or inf gradients costs no fix-up. In the ordinary
    case that costs nothing: the one test ``_beyond(b_g, BIG_T)`` replaces the finiteness test
    (``BIG_T`` < float32's max, so it is the stronger one)."""
    b_g, b_wabs, _ = _qr_item_grad(p_g, p_ids, p_offsets, p_psw, p_ow, o_l, m_l, o_d, D, COL_OFF, N, B, M, R,
                                   N_BAG_ITERS, stride_gn, stride_gd, stride_own, stride_owd, IS_Q, OP, BAGS, MEAN,
                                   HAS_W)
    w_max = tl.max(b_wabs)
    if _beyond(b_g, BIG_T) | (w_max > BIG_W):  # rare: inputs near the float32 range
        if _not_finite(b_g) | (w_max > BIG_W):
            b_g64, _w64, _rest64 = _qr_item_grad(p_g, p_ids, p_offsets, p_psw, p_ow, o_l, m_l, o_d, D, COL_OFF, N, B,
                                                 M, R, N_BAG_ITERS, stride_gn, stride_gd, stride_own, stride_owd, IS_Q,
                                                 OP, BAGS, MEAN, HAS_W, True)  # (a float32 term: its rest is dropped)
            b_g = b_g64.to(tl.float32)
            b_a = tl.abs(b_g64)
            m_big = tl.max(((b_a > BIG_T) & (b_a < float("inf"))).to(tl.int32), axis=1) > 0  # finite terms only
        else:  # (every term finite)
            m_big = tl.max((tl.abs(b_g) > BIG_T).to(tl.int32), axis=1) > 0
        m_big = m_l & m_big
        tl.store(p_marks + b_row, 1, mask=m_big)
        tl.store(p_flag + 0 * b_row, 1, mask=m_big)
    tl.atomic_add(p_dw + b_row[:, None] * stride_dn + o_d[None, :] * stride_dd, b_g,
                  mask=m_l[:, None] & (o_d < D)[None, :], sem="relaxed")


@triton.jit
def _qr_atomic_kernel(
    p_g, p_ids, p_offsets, p_psw, p_qw, p_rw, p_dq, p_dr, p_state,
    N, B, M, Q, R, DQ, DR, N_D_TILES, N_BAG_ITERS, BIG_T,
    stride_gn, stride_gd, stride_qn, stride_qd, stride_rn, stride_rd,
    stride_dqn, stride_dqd, stride_drn, stride_drd,
    NEED_Q: tl.constexpr, NEED_R: tl.constexpr,
    OP: tl.constexpr, BAGS: tl.constexpr, MEAN: tl.constexpr, HAS_W: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """BLOCK_L items x one D tile per program: relaxed float32 atomic adds into both tables
    (:func:`_qr_atomic_add`); ``p_state`` (int32, ``1 + Q + R``): the flag, then one mark per
    q row and per r row, for :func:`_qr_atomic_fixup_kernel`."""
    o_l, o_d = tile_offsets(N_D_TILES, BLOCK_L, BLOCK_D)
    m_l = o_l < N
    b_qi, b_ri = _qr_hash(tl.load(p_ids + o_l, mask=m_l, other=0), M, R)
    if NEED_Q:
        _qr_atomic_add(p_g, p_ids, p_offsets, p_psw, p_rw, p_dq, p_state, p_state + 1, o_l, m_l, b_qi, o_d, DQ, 0, N, B, M,
                       R, N_BAG_ITERS, BIG_T, stride_gn, stride_gd, stride_rn, stride_rd, stride_dqn, stride_dqd,
                       True, OP, BAGS, MEAN, HAS_W)
    if NEED_R:
        col_off = DQ if OP == 2 else 0
        _qr_atomic_add(p_g, p_ids, p_offsets, p_psw, p_qw, p_dr, p_state, p_state + 1 + Q, o_l, m_l, b_ri, o_d, DR, col_off,
                       N, B, M, R, N_BAG_ITERS, BIG_T, stride_gn, stride_gd, stride_qn, stride_qd, stride_drn,
                       stride_drd, False, OP, BAGS, MEAN, HAS_W)


@triton.jit
def _qr_item_rows(p_ids, o_l, m_l, M, R, IS_Q: tl.constexpr):
    """The rows of one table (quotient with ``IS_Q``, else remainder) that items ``o_l`` add to."""
    b_qi, b_ri = _qr_hash(tl.load(p_ids + o_l, mask=m_l, other=0), M, R)
    if IS_Q:
        return b_qi
    else:
        return b_ri


@triton.jit
def _qr_fix_rows(
    p_g, p_ids, p_offsets, p_psw, p_ow, p_dw, r0, m_fix, D, COL_OFF, N, B, M, R, N_BAG_ITERS,
    stride_gn, stride_gd, stride_own, stride_owd,
    IS_Q: tl.constexpr, OP: tl.constexpr, BAGS: tl.constexpr, MEAN: tl.constexpr, HAS_W: tl.constexpr,
    ODD32: tl.constexpr, FIX_L: tl.constexpr, FIX_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows ``r0 + j`` (``m_fix``) of one table's gradient (contiguous: the float32 accumulator,
    or the bfloat16 / float16 table) summed again: each item's term formed in float64 (a
    product of at most three float32 values; for "mean" two terms, :func:`_mean_terms`) and summed
    in a register tile of three-part running sums, each sum rounded once (:func:`round_dd`;
    ``ODD32``: to odd at float32, for a bfloat16 / float16 table rounded after it; "mean": within
    2^-100 of its quotients' magnitudes, summed in a fourth tile): +-inf only where the exact sum
    overflows, every column at its own precision. ``BLOCK_D`` columns at a time; per column tile, one read of
    every item's id per ``FIX_SCAN`` span, and a walk of the
    ``FIX_L``-item blocks of the spans that hold an item of these rows."""
    o_r = tl.arange(0, FIX_R)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        b_acc = tl.zeros((FIX_R, BLOCK_D), dtype=tl.float64)
        b_err = tl.zeros((FIX_R, BLOCK_D), dtype=tl.float64)
        b_tail = tl.zeros((FIX_R, BLOCK_D), dtype=tl.float64)
        if MEAN:
            b_abs = tl.zeros((FIX_R, BLOCK_D), dtype=tl.float64)
        for s0 in range(0, N, FIX_SCAN):
            o_s = s0 + tl.arange(0, FIX_SCAN).to(tl.int64)
            b_rs = _qr_item_rows(p_ids, o_s, o_s < N, M, R, IS_Q)
            if tl.max(((o_s < N) & (b_rs >= r0) & (b_rs < r0 + FIX_R)).to(tl.int32), axis=0) > 0:
                for l0 in range(s0, tl.minimum(s0 + FIX_SCAN, N), FIX_L):  # (the last span: to N)
                    o_l = l0 + tl.arange(0, FIX_L).to(tl.int64)
                    m_l = o_l < N
                    b_row = _qr_item_rows(p_ids, o_l, m_l, M, R, IS_Q)
                    m_grp = m_l & (b_row >= r0) & (b_row < r0 + FIX_R)
                    if tl.max(m_grp.to(tl.int32), axis=0) > 0:
                        b_t, _, b_rest = _qr_item_grad(p_g, p_ids, p_offsets, p_psw, p_ow, o_l, m_grp, o_d, D,
                                                       COL_OFF, N, B, M, R, N_BAG_ITERS, stride_gn, stride_gd,
                                                       stride_own, stride_owd, IS_Q, OP, BAGS, MEAN, HAS_W, True)
                        b_idx = tl.where(m_grp, b_row, -1)
                        if MEAN:
                            b_acc, b_err, b_tail = add_rows_by_index_dd(b_acc, b_err, b_tail, b_rest, b_idx, r0, FIX_R)
                            b_abs = add_rows_by_index(b_abs, tl.abs(b_t), b_idx, r0, FIX_R)
                        b_acc, b_err, b_tail = add_rows_by_index_dd(b_acc, b_err, b_tail, b_t, b_idx, r0, FIX_R)
        if MEAN:
            b_out = round_dd(b_acc, b_err, b_tail, ODD32, b_abs * MEAN_TOL, True)
        else:
            b_out = round_dd(b_acc, b_err, b_tail, ODD32)
        tl.store(p_dw + (r0 + o_r).to(tl.int64)[:, None] * D + o_d[None, :], b_out.to(p_dw.dtype.element_ty),
                 mask=m_fix[:, None] & (o_d < D)[None, :])


@triton.jit
def _qr_fix_table(
    p_g, p_ids, p_offsets, p_psw, p_ow, p_dw, p_marks, ROWS, D, COL_OFF, N, B, M, R, N_BAG_ITERS,
    stride_gn, stride_gd, stride_own, stride_owd,
    IS_Q: tl.constexpr, OP: tl.constexpr, BAGS: tl.constexpr, MEAN: tl.constexpr, HAS_W: tl.constexpr,
    ODD32: tl.constexpr, FIX_L: tl.constexpr, FIX_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The marked rows of one table whose float32 sum is not finite (a partial sum overflowed on
    the way: it never comes back) or lies in float32's top binade (:func:`_at_top`), ``FIX_R`` rows
    at a time, summed again (:func:`_qr_fix_rows`)."""
    o_r = tl.arange(0, FIX_R)
    for r0 in range(0, ROWS, FIX_R):
        m_k = r0 + o_r < ROWS
        m_k = m_k & (tl.load(p_marks + r0 + o_r, mask=m_k, other=0) > 0)
        if tl.max(m_k.to(tl.int32), axis=0) > 0:
            m_fix = nonfinite_rows(p_dw + tl.cast(r0, tl.int64) * D, m_k, D, FIX_R, BLOCK_D, TOP32)
            if tl.max(m_fix.to(tl.int32), axis=0) > 0:
                _qr_fix_rows(p_g, p_ids, p_offsets, p_psw, p_ow, p_dw, r0, m_fix, D, COL_OFF, N, B, M, R,
                             N_BAG_ITERS, stride_gn, stride_gd, stride_own, stride_owd,
                             IS_Q, OP, BAGS, MEAN, HAS_W, ODD32, FIX_L, FIX_R, BLOCK_D)


@triton.jit
def _qr_atomic_fixup_kernel(
    p_g, p_ids, p_offsets, p_psw, p_qw, p_rw, p_dq, p_dr, p_state,
    N, B, M, Q, R, DQ, DR, N_BAG_ITERS,
    stride_gn, stride_gd, stride_qn, stride_qd, stride_rn, stride_rd,
    NEED_Q: tl.constexpr, NEED_R: tl.constexpr,
    OP: tl.constexpr, BAGS: tl.constexpr, MEAN: tl.constexpr, HAS_W: tl.constexpr, NARROW: tl.constexpr,
    FIX_L: tl.constexpr, FIX_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One program, launched after :func:`_qr_atomic_kernel` (stream order: it sees every sum,
    mark and the flag): returns at once unless the flag ``p_state[0]`` is set. Else, in each
    needed table, the rows that took a term beyond ``BIG_T`` (marked) and whose float32 sum is
    not finite or at least 2^127 are summed again in float64 (:func:`_qr_fix_table`); every
    other row keeps its float32 sum, in which no partial sum overflowed (a row that took no such
    term stays below 2^127 in any order: ``atomic_overflow_bound``). The gradients are contiguous float32
    (the launcher's accumulators); ``NARROW``: the tables are bfloat16 / float16, so the sums
    summed again are rounded to odd (:func:`_qr_atomic_narrow_kernel` rounds them to nearest). Cost, only for such inputs: per group of ``FIX_R`` such rows
    and ``BLOCK_D`` columns, one read of every id and a walk of the item blocks that hold one."""
    if tl.load(p_state) == 0:
        return
    if NEED_Q:
        _qr_fix_table(p_g, p_ids, p_offsets, p_psw, p_rw, p_dq, p_state + 1, Q, DQ, 0, N, B, M, R, N_BAG_ITERS,
                      stride_gn, stride_gd, stride_rn, stride_rd, True, OP, BAGS, MEAN, HAS_W, NARROW,
                      FIX_L, FIX_R, BLOCK_D)
    if NEED_R:
        col_off = DQ if OP == 2 else 0
        _qr_fix_table(p_g, p_ids, p_offsets, p_psw, p_qw, p_dr, p_state + 1 + Q, R, DR, col_off, N, B, M, R,
                      N_BAG_ITERS, stride_gn, stride_gd, stride_qn, stride_qd, False, OP, BAGS, MEAN, HAS_W, NARROW,
                      FIX_L, FIX_R, BLOCK_D)


@triton.jit
def _qr_narrow_rows(
    p_g, p_ids, p_offsets, p_psw, p_ow, p_acc, p_out, r0, ROWS, D, COL_OFF, N, B, M, R, N_BAG_ITERS,
    stride_gn, stride_gd, stride_own, stride_owd,
    IS_Q: tl.constexpr, OP: tl.constexpr, BAGS: tl.constexpr, MEAN: tl.constexpr, HAS_W: tl.constexpr,
    FIX_L: tl.constexpr, FIX_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Rows ``[r0, r0 + FIX_R)`` of one float32 accumulator ``p_acc`` rounded to the table's dtype
    into ``p_out`` (both contiguous ``(ROWS, D)``); a row with a finite value in the dtype's top
    binade (:func:`_at_top`) is summed again instead (:func:`_qr_fix_rows`, to odd at float32,
    then to nearest): its float32 sum, rounded twice, could be +-inf where the exact sum is
    below the overflow midpoint (qrprobe QP3). The rows are read twice (find, then convert):
    no element is stored twice."""
    o_r = tl.arange(0, FIX_R)
    m_k = r0 + o_r < ROWS
    o_row = (r0 + o_r).to(tl.int64)[:, None] * D
    b_fix = tl.zeros((FIX_R,), dtype=tl.int32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        b_a = tl.abs(tl.load(p_acc + o_row + o_d[None, :], mask=m_k[:, None] & (o_d < D)[None, :], other=0.0))
        b_big = _at_top(b_a, p_out) & (b_a < float("inf"))
        b_fix = tl.maximum(b_fix, tl.max(b_big.to(tl.int32), axis=1))
    m_fix = m_k & (b_fix > 0)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m = (m_k & ~m_fix)[:, None] & (o_d < D)[None, :]
        b_v = tl.load(p_acc + o_row + o_d[None, :], mask=m, other=0.0)
        tl.store(p_out + o_row + o_d[None, :], b_v.to(p_out.dtype.element_ty), mask=m)
    if tl.max(m_fix.to(tl.int32), axis=0) > 0:
        _qr_fix_rows(p_g, p_ids, p_offsets, p_psw, p_ow, p_out, r0, m_fix, D, COL_OFF, N, B, M, R, N_BAG_ITERS,
                     stride_gn, stride_gd, stride_own, stride_owd, IS_Q, OP, BAGS, MEAN, HAS_W, True,
                     FIX_L, FIX_R, BLOCK_D)


@triton.jit
def _qr_atomic_narrow_kernel(
    p_g, p_ids, p_offsets, p_psw, p_qw, p_rw, p_dq, p_dr, p_oq, p_or,
    N, B, M, Q, R, DQ, DR, N_BAG_ITERS, QB,
    stride_gn, stride_gd, stride_qn, stride_qd, stride_rn, stride_rd,
    NEED_Q: tl.constexpr, NEED_R: tl.constexpr,
    OP: tl.constexpr, BAGS: tl.constexpr, MEAN: tl.constexpr, HAS_W: tl.constexpr,
    FIX_L: tl.constexpr, FIX_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """bfloat16 / float16 tables with ``deterministic=False``: after :func:`_qr_atomic_fixup_kernel`,
    ``FIX_R`` rows of one table per program (the first ``QB`` programs the quotient table's, the
    others the remainder table's), each float32 accumulator row rounded to the table
    (:func:`_qr_narrow_rows`). In place of torch's conversion: the same one launch."""
    pid = tl.program_id(0)
    if NEED_Q:
        if pid < QB:
            _qr_narrow_rows(p_g, p_ids, p_offsets, p_psw, p_rw, p_dq, p_oq, pid * FIX_R, Q, DQ, 0, N, B, M, R,
                            N_BAG_ITERS, stride_gn, stride_gd, stride_rn, stride_rd, True, OP, BAGS, MEAN, HAS_W,
                            FIX_L, FIX_R, BLOCK_D)
    if NEED_R:
        if pid >= QB:
            col_off = DQ if OP == 2 else 0
            _qr_narrow_rows(p_g, p_ids, p_offsets, p_psw, p_qw, p_dr, p_or, (pid - QB) * FIX_R, R, DR, col_off,
                            N, B, M, R, N_BAG_ITERS, stride_gn, stride_gd, stride_qn, stride_qd, False, OP, BAGS,
                            MEAN, HAS_W, FIX_L, FIX_R, BLOCK_D)


@triton.jit
def _qr_psw_dot(
    p_g, p_qw, p_rw, b_qi, b_ri, b_bag, m_l, DQ, DR, DOUT,
    stride_gn, stride_gd, stride_qn, stride_qd, stride_rn, stride_rd,
    OP: tl.constexpr, EXACT: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``(composed item . bag gradient (BLOCK_L,), max |g|)``: the max over the columns whose
    "mult" product underflowed (:func:`_underflowed`; 0 for the other ops). With ``EXACT``:
    ``(s, e, f, max |g|)``, the dot in three float64 parts."""
    if EXACT:
        b_dot = tl.zeros((BLOCK_L,), dtype=tl.float64)
        b_err = tl.zeros((BLOCK_L,), dtype=tl.float64)
        b_tail = tl.zeros((BLOCK_L,), dtype=tl.float64)
    else:
        b_dot = tl.zeros((BLOCK_L,), dtype=tl.float32)
    b_gmax = tl.zeros((BLOCK_L,), dtype=tl.float32)
    for d0 in range(0, DOUT, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        b_c, b_low = _qr_compose(p_qw, p_rw, b_qi, b_ri, m_l, o_d, DQ, DR, stride_qn, stride_qd, stride_rn,
                                 stride_rd, OP, EXACT, EXACT and OP == 0)  # ("add" redo: q . g + r . g)
        if EXACT and OP == 0:
            b_c2 = b_low  # (the r rows)
        m = m_l[:, None] & (o_d < DOUT)[None, :]
        b_g = tl.load(p_g + b_bag[:, None] * stride_gn + o_d[None, :] * stride_gd, mask=m, other=0.0).to(tl.float32)
        if EXACT:
            b_hi, b_mid, b_lo = dd_sum(b_c * _to_math(b_g, EXACT), 1)
            b_dot, b_err, b_tail = dd_add(b_dot, b_err, b_tail, b_hi, b_mid, b_lo)
            if OP == 0:
                b_hi, b_mid, b_lo = dd_sum(b_c2 * _to_math(b_g, EXACT), 1)
                b_dot, b_err, b_tail = dd_add(b_dot, b_err, b_tail, b_hi, b_mid, b_lo)
        else:
            b_dot += tl.sum(b_c * _to_math(b_g, EXACT), axis=1)
        if OP == 1:
            b_gmax = tl.maximum(b_gmax, tl.max(tl.where(b_low, tl.abs(b_g), 0.0), axis=1))
    if EXACT:
        return b_dot, b_err, b_tail, tl.max(b_gmax, axis=0)
    else:
        return b_dot, tl.max(b_gmax, axis=0)


@triton.jit
def _qr_psw_grad_kernel(
    p_g, p_ids, p_offsets, p_qw, p_rw, p_dw,
    N, B, M, R, DQ, DR, DOUT, N_BAG_ITERS,
    stride_gn, stride_gd, stride_qn, stride_qd, stride_rn, stride_rd,
    OP: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``dw[i] = composed item i . grad[bag of i]``, BLOCK_L items per program, D in tiles: in
    float32, and again in float64 where a dot is not finite, lies in its dtype's top binade
    (:func:`_at_top`) or ("mult": ``(q * r) * g``) some |g| exceeds BIG_W."""
    o_l = flat_program_id() * BLOCK_L + tl.arange(0, BLOCK_L)
    m_l = o_l < N
    b_qi, b_ri = _qr_hash(tl.load(p_ids + o_l, mask=m_l, other=0), M, R)
    b_bag = _bag_of(p_offsets, B, o_l, m_l, N_BAG_ITERS)
    b_dot, g_max = _qr_psw_dot(p_g, p_qw, p_rw, b_qi, b_ri, b_bag, m_l, DQ, DR, DOUT,
                               stride_gn, stride_gd, stride_qn, stride_qd, stride_rn, stride_rd,
                               OP, False, BLOCK_L, BLOCK_D)
    if _not_finite(b_dot) | (g_max > BIG_W) | _near_top(b_dot, p_dw):  # half-width D tiles: float64
        b_s, b_e, b_f, _ = _qr_psw_dot(p_g, p_qw, p_rw, b_qi, b_ri, b_bag, m_l, DQ, DR, DOUT,  # in the registers
                                       stride_gn, stride_gd, stride_qn, stride_qd, stride_rn, stride_rd,  # of float32
                                       OP, True, BLOCK_L, BLOCK_D // 2 + BLOCK_D % 2)
        b_dot = round_dd(b_s, b_e, b_f, p_dw.dtype.element_ty != tl.float32)
    tl.store(p_dw + o_l, b_dot.to(p_dw.dtype.element_ty), mask=m_l)


# ----------------------------------------------------------------------------- launchers


# Warps of the kernels that sum rows again (the fix-up, the half-precision rounding): their
# running-sum tiles (FIX_R x BLOCK_D, then two float64 each) took 255 registers and spilled
# 48-168 B at 4 warps on sm_90. Their item blocks (FIX_L x BLOCK_D float64 terms, split twice
# by dd_sum) are 8 items of 128 columns: at 16, the second split took them to 255 registers
# with 8-16 B of stack (bfloat16 tables, sm_90).
FIX_WARPS = 8


def atomic_fix_tiles(block_d: int) -> dict:
    """The atomic backward's fix-up tiles for ``BLOCK_D = block_d`` columns: ``FIX_L`` items
    (their float64 terms) and ``FIX_R`` rows' float64 sums."""
    return dict(FIX_L=max(1, min(8, 1024 // block_d)), FIX_R=max(1, min(4, 512 // block_d)))


def _block_d(D: int) -> int:
    return min(next_pow2(max(D, 1)), 128)


def _tile_elements(*tensors) -> int:
    """Items x columns per program of the weights' gradient and the atomic backward: 4,096, or
    1,024 where the rows' loads do not vectorise (:func:`rows_vectorise`: D = 300 spilled 320-848
    B at 255 registers on sm_90 with 4,096, none with 1,024, at 96-146 registers)."""
    return 4096 if rows_vectorise(*tensors) else 1024


def _out_dim(op: str, q_weight: torch.Tensor, r_weight: torch.Tensor) -> int:
    return q_weight.shape[1] + r_weight.shape[1] if op == "concat" else q_weight.shape[1]


def _packed(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` as a packed vector: the kernels index ids, offsets and per-sample weights as
    ``p + i``. A strided or expanded (stride 0) view is copied (N indices or weights, small next
    to the tables); a contiguous one, as on the training path, is passed as is (no copy)."""
    return None if t is None else t.contiguous()


def _assert_args(ids, q_weight, r_weight, op, offsets):
    assert ids.dim() == 1 and ids.dtype in (torch.int32, torch.int64), (ids.shape, ids.dtype)
    assert q_weight.dim() == 2 and r_weight.dim() == 2 and q_weight.dtype == r_weight.dtype
    assert op in OP_CODES and (op == "concat" or q_weight.shape[1] == r_weight.shape[1])
    assert offsets is None or (offsets.dim() == 1 and offsets.dtype in (torch.int32, torch.int64))


@launcher
def qr_lookup_fwd(
    ids: torch.Tensor,
    q_weight: torch.Tensor,
    r_weight: torch.Tensor,
    op: str,
    offsets: torch.Tensor | None = None,
    mode: str = "sum",
    per_sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``ids (N,)`` -> ``(N, dim)``, or with ``offsets (B,)`` -> ``(B, dim)``, in the tables' dtype.
    ``offsets`` must be valid (start at 0, non-decreasing, at most N): the op checks them."""
    _assert_args(ids, q_weight, r_weight, op, offsets)
    ids, offsets, per_sample_weights = _packed(ids), _packed(offsets), _packed(per_sample_weights)
    N = ids.shape[0]
    Q, R = q_weight.shape[0], r_weight.shape[0]
    DQ, DR = q_weight.shape[1], r_weight.shape[1]
    DOUT = _out_dim(op, q_weight, r_weight)
    BLOCK_D = _block_d(DOUT)
    n_d = triton.cdiv(DOUT, BLOCK_D)
    rows = N if offsets is None else offsets.shape[0]
    out = torch.empty((rows, DOUT), dtype=q_weight.dtype, device=q_weight.device)
    if rows == 0 or DOUT == 0:
        return out
    strides = (q_weight.stride(0), q_weight.stride(1), r_weight.stride(0), r_weight.stride(1),
               out.stride(0), out.stride(1))
    if offsets is None:
        BLOCK_N = max(1, min(4096 // BLOCK_D, 64, next_pow2(N)))
        _qr_lookup_fwd_kernel[flat_grid(triton.cdiv(N, BLOCK_N) * n_d)](
            ids, q_weight, r_weight, out, N, Q * R, R, DQ, DR, DOUT, n_d, *strides,
            OP=OP_CODES[op], BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        )
        return out
    psw = per_sample_weights if per_sample_weights is not None else out
    _qr_lookup_bag_fwd_kernel[flat_grid(rows * n_d)](
        ids, offsets, psw, q_weight, r_weight, out, N, rows, Q * R, R, DQ, DR, DOUT, n_d, *strides,
        OP=OP_CODES[op], HAS_W=per_sample_weights is not None, MEAN=mode == "mean",
        BLOCK_L=max(1, min(16, 4096 // BLOCK_D)), BLOCK_D=BLOCK_D,
    )
    return out


class _Bwd(NamedTuple):
    """What every part of :func:`qr_lookup_bwd` reads: the arguments, packed, and their sizes."""

    grad: torch.Tensor
    ids: torch.Tensor
    offsets: torch.Tensor | None
    per_sample_weights: torch.Tensor | None
    q_weight: torch.Tensor
    r_weight: torch.Tensor
    op: str
    need_q: bool
    need_r: bool
    N: int  # items that reach the output (0 with bags and no bag)
    B: int  # bags (0 without)
    Q: int
    R: int
    DQ: int
    DR: int
    n_bag_iters: int
    offsets_arg: torch.Tensor  # unused pointers get a tensor already passed
    psw_arg: torch.Tensor
    qw_arg: torch.Tensor  # the tables are read only for "mult"
    rw_arg: torch.Tensor
    flags: dict
    BLOCK_D: int

    @property
    def M(self) -> int:
        return self.Q * self.R

    def table_strides(self) -> tuple:
        return (self.grad.stride(0), self.grad.stride(1), self.q_weight.stride(0), self.q_weight.stride(1),
                self.r_weight.stride(0), self.r_weight.stride(1))


@launcher
def qr_lookup_bwd(
    grad: torch.Tensor,
    ids: torch.Tensor,
    q_weight: torch.Tensor,
    r_weight: torch.Tensor,
    op: str,
    offsets: torch.Tensor | None = None,
    mode: str = "sum",
    per_sample_weights: torch.Tensor | None = None,
    deterministic: bool = True,
    sparse: bool = False,
    needs: tuple[bool, bool, bool] = (True, True, False),
) -> tuple:
    """Gradients of :func:`qr_lookup_fwd` for the upstream ``grad`` (its output's shape).

    Returns ``(q_rows, q_grad, r_rows, r_grad, w_grad)``, ``None`` where ``needs`` (quotient
    table, remainder table, per-sample weights) is False. Dense (``sparse=False``): ``q_grad``
    has the table's shape and dtype and ``q_rows`` is None. Sparse: ``q_rows`` (U,) int64 are
    the touched rows in ascending order and ``q_grad`` (U, dq) their gradients (always the
    sorted path; U is read on the host, one sync). ``w_grad``: ``ids``-shaped, the weights' dtype.
    Three parts: the weights' gradient (:func:`_psw_grad`), then the tables' by float32 atomics
    (:func:`_atomic_grads`, ``deterministic=False``, dense) or by rows sorted by table row
    (:func:`_sorted_grads`).
    """
    _assert_args(ids, q_weight, r_weight, op, offsets)
    ids, offsets, per_sample_weights = _packed(ids), _packed(offsets), _packed(per_sample_weights)
    assert grad.dim() == 2 and grad.shape[1] == _out_dim(op, q_weight, r_weight)
    need_q, need_r, need_w = needs
    bags = offsets is not None
    B = offsets.shape[0] if bags else 0
    a = _Bwd(
        grad, ids, offsets, per_sample_weights, q_weight, r_weight, op, need_q, need_r,
        N=0 if (bags and B == 0) else ids.shape[0],  # no bags: no item reaches the output
        B=B, Q=q_weight.shape[0], R=r_weight.shape[0], DQ=q_weight.shape[1], DR=r_weight.shape[1],
        n_bag_iters=_search_iters(B),
        offsets_arg=offsets if bags else ids,
        psw_arg=per_sample_weights if per_sample_weights is not None else grad,
        qw_arg=q_weight if op == "mult" else grad, rw_arg=r_weight if op == "mult" else grad,
        flags=dict(OP=OP_CODES[op], BAGS=bags, MEAN=bags and mode == "mean", HAS_W=per_sample_weights is not None),
        BLOCK_D=_block_d(max(q_weight.shape[1] if need_q else 0, r_weight.shape[1] if need_r else 0)),
    )
    w_grad = _psw_grad(a) if need_w else None
    if not (need_q or need_r):
        return None, None, None, None, w_grad
    if not deterministic and not sparse:
        dq, dr = _atomic_grads(a)
        return None, dq, None, dr, w_grad
    return (*_sorted_grads(a, sparse), w_grad)


def _psw_grad(a: _Bwd) -> torch.Tensor:
    """The per-sample weights' gradient, ``ids``-shaped in the weights' dtype: each item's
    output row dotted with ``grad``'s row of its bag."""
    w_grad = torch.empty(a.ids.shape, dtype=a.per_sample_weights.dtype, device=a.q_weight.device)
    DOUT = a.grad.shape[1]
    if a.N == 0 or DOUT == 0:  # no bag, or nothing to dot: every weight's gradient is 0
        return w_grad.zero_()
    BLOCK_L = max(1, min(64, _tile_elements(a.grad, a.q_weight, a.r_weight) // _block_d(DOUT)))
    _qr_psw_grad_kernel[flat_grid(triton.cdiv(a.N, BLOCK_L))](
        a.grad, a.ids, a.offsets, a.q_weight, a.r_weight, w_grad, a.N, a.B, a.M, a.R, a.DQ, a.DR, DOUT,
        a.n_bag_iters, *a.table_strides(),
        OP=OP_CODES[a.op], BLOCK_L=BLOCK_L, BLOCK_D=_block_d(DOUT),
    )
    return w_grad


def _atomic_grads(a: _Bwd) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The dense tables' gradients ``(dq, dr)`` (``None`` where not needed) by float32 atomics
    (not bitwise reproducible from run to run), with the fix-ups for rows whose float32
    partial sums could overflow."""
    dev = a.q_weight.device
    Q, R, DQ, DR, N, need_q, need_r = a.Q, a.R, a.DQ, a.DR, a.N, a.need_q, a.need_r
    # float32 accumulators: the gradients themselves when the tables are float32
    dq = torch.zeros((Q, DQ), dtype=torch.float32, device=dev) if need_q else None
    dr = torch.zeros((R, DR), dtype=torch.float32, device=dev) if need_r else None
    if N > 0 and a.BLOCK_D > 0 and max(DQ, DR) > 0:
        dq_arg, dr_arg = (dq if dq is not None else dr), (dr if dr is not None else dq)
        BLOCK_L = max(1, min(64, _tile_elements(a.grad, a.q_weight, a.r_weight, dq_arg, dr_arg) // a.BLOCK_D))
        n_d = triton.cdiv(max(DQ, DR), a.BLOCK_D)
        state = torch.zeros((1 + Q + R,), dtype=torch.int32, device=dev)  # the flag, then a mark per row
        big_t = atomic_overflow_bound(N)
        args = (a.grad, a.ids, a.offsets_arg, a.psw_arg, a.qw_arg, a.rw_arg, dq_arg, dr_arg, state)
        strides = (*a.table_strides(), dq_arg.stride(0), dq_arg.stride(1), dr_arg.stride(0), dr_arg.stride(1))
        _qr_atomic_kernel[flat_grid(triton.cdiv(N, BLOCK_L) * n_d)](
            *args, N, a.B, a.M, Q, R, DQ, DR, n_d, a.n_bag_iters, big_t, *strides,
            NEED_Q=need_q, NEED_R=need_r, **a.flags, BLOCK_L=BLOCK_L, BLOCK_D=a.BLOCK_D,
        )
        # one program that returns at once unless a row's float32 partial sums could overflow
        narrow = a.q_weight.dtype != torch.float32
        _qr_atomic_fixup_kernel[(1,)](
            *args, N, a.B, a.M, Q, R, DQ, DR, a.n_bag_iters, *strides[:6],
            NEED_Q=need_q, NEED_R=need_r, **a.flags, NARROW=narrow, **atomic_fix_tiles(a.BLOCK_D),
            BLOCK_D=a.BLOCK_D, num_warps=FIX_WARPS,
        )
        if narrow:  # the accumulators rounded to the tables' dtype, rows near its maximum summed again
            tiles = atomic_fix_tiles(a.BLOCK_D)
            oq = torch.empty((Q, DQ), dtype=a.q_weight.dtype, device=dev) if need_q else None
            orr = torch.empty((R, DR), dtype=a.r_weight.dtype, device=dev) if need_r else None
            qb = triton.cdiv(Q, tiles["FIX_R"]) if need_q else 0
            rb = triton.cdiv(R, tiles["FIX_R"]) if need_r else 0
            _qr_atomic_narrow_kernel[(qb + rb,)](
                *args[:6], dq_arg, dr_arg, oq if oq is not None else orr, orr if orr is not None else oq,
                N, a.B, a.M, Q, R, DQ, DR, a.n_bag_iters, qb, *strides[:6],
                NEED_Q=need_q, NEED_R=need_r, **a.flags, **tiles, BLOCK_D=a.BLOCK_D, num_warps=FIX_WARPS,
            )
            return oq, orr
    dq = None if dq is None else dq.to(a.q_weight.dtype)
    dr = None if dr is None else dr.to(a.r_weight.dtype)
    return dq, dr


def _sorted_grads(a: _Bwd, sparse: bool) -> tuple:
    """The tables' gradients ``(q_rows, dq, r_rows, dr)`` from the items sorted by table row:
    one program per (row, D tile) sums its items in a fixed order (deterministic). Dense:
    the tables' shapes, ``q_rows = r_rows = None``; sparse: the touched rows only, ascending
    (their count is read on the host, one sync)."""
    dev = a.q_weight.device
    Q, R, DQ, DR, N, need_q, need_r = a.Q, a.R, a.DQ, a.DR, a.N, a.need_q, a.need_r
    # one sort key per (item, needed table): q rows, then Q + r rows
    R_BASE = N if need_q else 0
    n_keys = N * (int(need_q) + int(need_r))
    key_dtype = torch.int32 if Q + R < 2**31 else torch.int64
    keys = torch.empty((n_keys,), dtype=key_dtype, device=dev)
    if N > 0:
        _qr_keys_kernel[flat_grid(triton.cdiv(N, KEYS_BLOCK))](
            a.ids, keys, N, a.M, R, Q, R_BASE, NEED_Q=need_q, NEED_R=need_r, BLOCK=KEYS_BLOCK,
        )
    sorted_keys, perm = torch.sort(keys, stable=True)

    if sparse:
        is_start = torch.ones((n_keys,), dtype=torch.bool, device=dev)
        is_start[1:] = sorted_keys[1:] != sorted_keys[:-1]
        uq, ur = (int(v) for v in torch.stack([is_start[:R_BASE].sum(), is_start[R_BASE:].sum()]).tolist())
        rows = sorted_keys[torch.nonzero_static(is_start, size=uq + ur).reshape(-1)].long()
        dq = torch.empty((uq, DQ), dtype=a.q_weight.dtype, device=dev) if need_q else None
        dr = torch.empty((ur, DR), dtype=a.r_weight.dtype, device=dev) if need_r else None
        n_rows, key0 = uq + ur, 0
    else:
        dq = torch.empty((Q, DQ), dtype=a.q_weight.dtype, device=dev) if need_q else None
        dr = torch.empty((R, DR), dtype=a.r_weight.dtype, device=dev) if need_r else None
        rows, uq = perm, 0
        n_rows, key0 = (Q if need_q else 0) + (R if need_r else 0), (0 if need_q else Q)

    if n_rows > 0 and max(DQ, DR) > 0:
        n_d = triton.cdiv(max(DQ if need_q else 0, DR if need_r else 0), a.BLOCK_D)
        dq_arg, dr_arg = (dq if dq is not None else dr), (dr if dr is not None else dq)
        _qr_rows_kernel[flat_grid(n_rows * n_d)](
            a.grad, a.ids, a.offsets_arg, a.psw_arg, a.qw_arg, a.rw_arg, sorted_keys, perm, rows, dq_arg, dr_arg,
            N, a.B, a.M, Q, R, DQ, DR, n_keys, key0, R_BASE, uq, n_rows, n_d, _search_iters(n_keys), a.n_bag_iters,
            *a.table_strides(), dq_arg.stride(0), dq_arg.stride(1), dr_arg.stride(0), dr_arg.stride(1),
            **a.flags, SPARSE=sparse, BLOCK_L=max(1, min(16, 4096 // a.BLOCK_D)), BLOCK_D=a.BLOCK_D,
        )
    if not sparse:
        return None, dq, None, dr
    q_rows = rows[:uq] if need_q else None
    r_rows = rows[uq:] - Q if need_r else None
    return q_rows, dq, r_rows, dr
