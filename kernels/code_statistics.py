"""Per-code row counts and row sums (the statistics of an EMA codebook update), two paths.

Rows are addressed by a flat segment id ``level * K + code`` in ``[0, S)``, ``S = L * K``.
Neither path builds a one-hot matrix, and neither reads a value on the host.

What every path does with each row ``r`` (weight ``w_r``, 1 without weights):

* ``w_r == 0`` (a masked-out row): ignored entirely, its index and values are not looked at;
* index outside ``[0, K)``: left out, counted in ``bad[level, 1]`` (the op turns that into an
  error); never read or written out of bounds;
* ``w_r`` or any element of the row not finite: left out, counted in ``bad[level, 0]``;
* otherwise ``counts[seg] += w_r`` and ``sums[seg] += w_r * x_r`` (each product exact in
  float64). The deterministic path carries each sum in three float64 parts (``_common.dd_sum``
  per tile of rows, ``dd_add`` across tiles and pieces) and rounds it once to float32
  (``round_dd``): a sum is the exact one rounded to nearest unless it lies within about
  ``n^2 2^-136`` of its largest term (``n`` rows per tile) plus ``2^-159`` of its largest
  partial sum from a rounding midpoint, is ``+-inf`` exactly when the exact
  sum rounds beyond float32's range (terms ``max``, ``2^103``, ``-2^60``: ``max``, where a float64
  sum lands on the overflow midpoint and gave +inf), and is never NaN. The atomic path adds
  plain float64 terms: its sums round each addition, so one within about ``n 2^-53`` of a
  midpoint may round either way.

Row finiteness needs the whole row: a program owns ``BLOCK_D`` columns but checks every column
of its rows (one load when ``D <= BLOCK_D``, the common case; otherwise a second sweep, from
cache).

* ``_code_statistics_atomic_kernel``: a program per ``(BLOCK_N rows, BLOCK_D columns)`` tile
  ``tl.atomic_add``s its weighted rows into float64 scratch. One pass over ``x``, no sort;
  the float64 atomics commit in whatever order the hardware serves them, so the low bits of a
  float64 sum vary, and so, rarely, does the float32 rounding of ``sums``.
* Deterministic (two kernels): the launcher sorts int32 keys (stable), finds each segment's
  ``[start, end)`` and cuts it into *pieces* of at most ``P`` sorted rows (``P`` grows as
  ``sqrt(M / D)``, at least 256). ``_code_statistics_segment_kernel`` gives each piece its own
  program, which sums its rows in sorted order; a segment of one piece is written out at once,
  a longer one writes float64 partials, which ``_code_statistics_merge_kernel`` sums, in piece
  order, per segment and 16 columns. Every order is fixed, so the result is bitwise reproducible. No program
  walks more than ``P`` rows or ``M / P`` partials, so a code that takes every row (a
  collapsed codebook) no longer runs on one program: see :func:`segment_plan` for the count.
"""

import math

import torch
import triton
import triton.language as tl

from ._common import dd_add, dd_sum, launcher, next_pow2, round_dd, rows_vectorise

MAX_BLOCK_D = 256
TILE_ELEMENTS = 4096  # BLOCK_N * BLOCK_D of one loaded tile (float64 products: 64 registers a thread)
MIN_PIECE = 256
MERGE_BLOCK_D = 16  # the merge kernel's column block: narrow, so one segment's merge spreads over D / 16 programs
MERGE_BLOCK_Q = 64  # partials per iteration of the merge kernel (128: 255 registers, 16 B spilled, sm_90)


@triton.jit
def _row_finite(p_x, b_rows, m_r, b_tile, D, stride_xn, stride_xd,
                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE_D: tl.constexpr):
    """Per row of the tile, whether all D elements are finite (``b_tile`` holds this program's
    column block; with several column blocks every block is swept)."""
    if SINGLE_D:
        b_bad = tl.sum((~(tl.abs(b_tile) < float("inf"))).to(tl.int32), axis=1)
    else:
        b_bad = tl.zeros([BLOCK_N], dtype=tl.int32)
        for d0 in range(0, D, BLOCK_D):
            o_c = d0 + tl.arange(0, BLOCK_D)
            m_c = o_c < D
            b_c = tl.load(p_x + b_rows[:, None] * stride_xn + o_c[None, :] * stride_xd,
                          mask=m_r[:, None] & m_c[None, :], other=0.0).to(tl.float32)
            b_bad += tl.sum((~(tl.abs(b_c) < float("inf"))).to(tl.int32), axis=1)
    return b_bad == 0


@triton.jit
def _code_statistics_atomic_kernel(
    p_x, p_idx, p_w, p_counts, p_sums, p_bad,
    M, D, NL, K, NW,
    stride_xn, stride_xd, stride_idx, stride_w, stride_sk,
    HAS_W: tl.constexpr, SINGLE_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < M
    o_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    b_idx = tl.load(p_idx + o_n * stride_idx, mask=m_n, other=0).to(tl.int64)
    level = o_n // NL
    if HAS_W:
        b_w = tl.load(p_w + (o_n % NW) * stride_w, mask=m_n, other=0).to(tl.float64)
        m_live = m_n & (b_w != 0.0)
        m_wok = tl.abs(b_w) < float("inf")
    else:
        b_w = tl.full([BLOCK_N], 1.0, dtype=tl.float64)
        m_live = m_n
        m_wok = m_n
    m_in = (b_idx >= 0) & (b_idx < K)
    b_x = tl.load(p_x + o_n[:, None] * stride_xn + o_d[None, :] * stride_xd,
                  mask=(m_live & m_in)[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    m_ok = _row_finite(p_x, o_n, m_live & m_in, b_x, D, stride_xn, stride_xd, BLOCK_N, BLOCK_D, SINGLE_D) & m_wok
    m_use = m_live & m_in & m_ok
    b_seg = level * K + tl.where(m_in, b_idx, 0)
    b_val = b_x.to(tl.float64) * b_w[:, None]
    tl.atomic_add(p_sums + b_seg[:, None] * stride_sk + o_d[None, :], b_val, mask=m_use[:, None] & m_d[None, :],
                  sem="relaxed")
    if pid_d == 0:
        tl.atomic_add(p_counts + b_seg, b_w, mask=m_use, sem="relaxed")
        one = tl.full([BLOCK_N], 1, dtype=tl.int32)
        tl.atomic_add(p_bad + level * 2, one, mask=m_live & m_in & ~m_ok, sem="relaxed")
        tl.atomic_add(p_bad + level * 2 + 1, one, mask=m_live & ~m_in, sem="relaxed")


@triton.jit
def _code_statistics_segment_kernel(
    p_x, p_w, p_perm, p_offsets, p_item_end, p_pieces, p_multi_first, p_seg_of_item,
    p_counts, p_sums, p_pcounts, p_psums, p_bad,
    D, K, S, NW, P, N_PART,
    stride_xn, stride_xd, stride_w, stride_sk, stride_pk,
    HAS_W: tl.constexpr, SINGLE_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One piece (at most P sorted rows of one segment) x BLOCK_D columns."""
    pid_w = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    s = tl.load(p_seg_of_item + pid_w).to(tl.int64)
    if s < S:  # programs past the last piece have nothing to do
        o_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        end = tl.load(p_offsets + s + 1).to(tl.int64)
        n_pieces = tl.load(p_pieces + s).to(tl.int64)
        j = pid_w - (tl.load(p_item_end + s).to(tl.int64) - n_pieces)  # which piece of segment s
        r0 = tl.load(p_offsets + s).to(tl.int64) + j * P
        r1 = tl.minimum(r0 + P, end)
        b_acc = tl.zeros([BLOCK_D], dtype=tl.float64)  # the sums in three parts b_acc + b_err + b_tail (dd_add)
        b_err = tl.zeros([BLOCK_D], dtype=tl.float64)
        b_tail = tl.zeros([BLOCK_D], dtype=tl.float64)
        cnt = tl.zeros([1], dtype=tl.float64)
        cnt_err = tl.zeros([1], dtype=tl.float64)
        cnt_tail = tl.zeros([1], dtype=tl.float64)
        b_nbad = tl.zeros([BLOCK_N], dtype=tl.int32)
        for r in range(r0, r1, BLOCK_N):
            o_r = r + tl.arange(0, BLOCK_N)
            m_r = o_r < r1
            b_rows = tl.load(p_perm + o_r, mask=m_r, other=0).to(tl.int64)
            b_x = tl.load(p_x + b_rows[:, None] * stride_xn + o_d[None, :] * stride_xd,
                          mask=m_r[:, None] & m_d[None, :], other=0.0).to(tl.float32)
            m_ok = _row_finite(p_x, b_rows, m_r, b_x, D, stride_xn, stride_xd, BLOCK_N, BLOCK_D, SINGLE_D)
            m_use = m_r & m_ok
            if HAS_W:
                b_w = tl.load(p_w + (b_rows % NW) * stride_w, mask=m_use, other=0).to(tl.float64)
            else:
                b_w = m_use.to(tl.float64)
            # (products of two float32 values, up to 48 bits: the remainders extracted again, or
            # their low bits were lost where the rest cancelled, [3e38, 1, -3e38] weighted
            # [1e38, 1, 1e38] gave 0, not 1; fuzzM D1)
            b_hi, b_mid, b_lo = dd_sum(tl.where(m_use[:, None], b_x.to(tl.float64) * b_w[:, None], 0.0), 0)
            b_acc, b_err, b_tail = dd_add(b_acc, b_err, b_tail, b_hi, b_mid, b_lo)
            c_hi, c_mid, c_lo = dd_sum(b_w[:, None], 0)
            cnt, cnt_err, cnt_tail = dd_add(cnt, cnt_err, cnt_tail, c_hi, c_mid, c_lo)
            b_nbad += (m_r & ~m_ok).to(tl.int32)
        o_1 = tl.arange(0, 1)
        if n_pieces == 1:
            tl.store(p_sums + s * stride_sk + o_d, round_dd(b_acc, b_err, b_tail, False), mask=m_d)
            if pid_d == 0:
                tl.store(p_counts + s + o_1, round_dd(cnt, cnt_err, cnt_tail, False))
        else:
            q = tl.load(p_multi_first + s).to(tl.int64) + j
            tl.store(p_psums + q * stride_pk + o_d, b_acc, mask=m_d)
            tl.store(p_psums + (q + N_PART) * stride_pk + o_d, b_err, mask=m_d)
            tl.store(p_psums + (q + 2 * N_PART) * stride_pk + o_d, b_tail, mask=m_d)
            if pid_d == 0:
                tl.store(p_pcounts + q + o_1, cnt)
                tl.store(p_pcounts + q + N_PART + o_1, cnt_err)
                tl.store(p_pcounts + q + 2 * N_PART + o_1, cnt_tail)
        if pid_d == 0:
            nbad = tl.sum(b_nbad, axis=0)
            if nbad > 0:
                tl.atomic_add(p_bad + (s // K) * 2, nbad, sem="relaxed")


@triton.jit
def _merge_parts(p_parts, o_q, o_d, m_qd, N_PART, stride_pk, b_s, b_e, b_f):
    """The running sum ``(b_s, b_e, b_f)`` plus the pieces ``o_q``' three parts (rows ``o_q``,
    ``o_q + N_PART``, ``o_q + 2 N_PART`` of ``p_parts``): the first two each summed by
    :func:`dd_sum`, the third, below both, plainly."""
    p_q = p_parts + o_q[:, None] * stride_pk + o_d[None, :]
    b_hi, b_mid, b_lo = dd_sum(tl.load(p_q, mask=m_qd, other=0.0), 0)
    b_s, b_e, b_f = dd_add(b_s, b_e, b_f, b_hi, b_mid, b_lo)
    b_hi, b_mid, b_lo = dd_sum(tl.load(p_q + N_PART * stride_pk, mask=m_qd, other=0.0), 0)
    b_lo += tl.sum(tl.load(p_q + 2 * N_PART * stride_pk, mask=m_qd, other=0.0), axis=0)
    return dd_add(b_s, b_e, b_f, b_hi, b_mid, b_lo)


@triton.jit
def _code_statistics_merge_kernel(
    p_multi_seg, p_multi_first, p_pieces, p_pcounts, p_psums, p_counts, p_sums,
    D, S, N_PART,
    stride_sk, stride_pk,
    BLOCK_Q: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One segment of several pieces x BLOCK_D columns: its pieces' running sums (three parts:
    rows ``[0, N_PART)`` of the partials, then N_PART and 2 N_PART rows below), summed in order
    and rounded once."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    s = tl.load(p_multi_seg + pid_m).to(tl.int64)
    if s < S:
        o_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        q0 = tl.load(p_multi_first + s).to(tl.int64)
        q1 = q0 + tl.load(p_pieces + s).to(tl.int64)
        b_acc = tl.zeros([BLOCK_D], dtype=tl.float64)
        b_err = tl.zeros([BLOCK_D], dtype=tl.float64)
        b_tail = tl.zeros([BLOCK_D], dtype=tl.float64)
        cnt = tl.zeros([1], dtype=tl.float64)
        cnt_err = tl.zeros([1], dtype=tl.float64)
        cnt_tail = tl.zeros([1], dtype=tl.float64)
        o_0 = tl.arange(0, 1)
        for q in range(q0, q1, BLOCK_Q):
            o_q = q + tl.arange(0, BLOCK_Q)
            m_q = o_q < q1
            b_acc, b_err, b_tail = _merge_parts(p_psums, o_q, o_d, m_q[:, None] & m_d[None, :], N_PART, stride_pk,
                                               b_acc, b_err, b_tail)
            cnt, cnt_err, cnt_tail = _merge_parts(p_pcounts, o_q, o_0, m_q[:, None], N_PART, 1, cnt, cnt_err, cnt_tail)
        tl.store(p_sums + s * stride_sk + o_d, round_dd(b_acc, b_err, b_tail, False), mask=m_d)
        if pid_d == 0:
            tl.store(p_counts + s + o_0, round_dd(cnt, cnt_err, cnt_tail, False))


def _blocks(D: int) -> tuple[int, int, int, bool]:
    """(BLOCK_N, BLOCK_D, number of column blocks, SINGLE_D) for rows of D elements."""
    BLOCK_D = min(max(next_pow2(D), 16), MAX_BLOCK_D)
    BLOCK_N = min(max(TILE_ELEMENTS // BLOCK_D, 16), 64)
    n_dblocks = max(triton.cdiv(D, BLOCK_D), 1)  # D = 0 still launches one block (the counts)
    return BLOCK_N, BLOCK_D, n_dblocks, n_dblocks == 1


def piece_rows(M: int, D: int) -> int:
    """``P``: rows per piece of the deterministic path, the power of two nearest
    ``sqrt(64 M / max(D, 16))``, at least 256 (512 at a million rows of 256). A code that takes
    every row then costs ``M / P`` programs of ``P * D`` elements and a merge of ``M / P``
    float64 partials spread over ``D / 16`` programs of ``32 M / P`` elements each: the two
    balance, and both stay near what evenly spread codes cost (counted per program in
    ``tests/ops/test_code_statistics.py::test_hot_code_is_balanced``). From shapes only, so no
    launch waits on a value."""
    return max(MIN_PIECE, 1 << round(math.log2(math.sqrt(64 * max(M, 1) / max(D, 16)))))


def segment_plan(keys: torch.Tensor, S: int, D: int) -> dict:
    """The deterministic path's work list, from the segment id of every row (``S`` = invalid).

    All shapes follow from ``M``, ``S`` and ``P``; nothing is read on the host. Returns the
    stable sort's ``perm``; per segment ``offsets (S+1)`` into the sorted rows, ``pieces``
    (``ceil(len / P)``), ``item_end`` (inclusive cumsum of pieces) and ``multi_first`` (where a
    multi-piece segment's partials start); per program of the first kernel ``seg_of_item``
    (``S``: idle); per program of the merge kernel ``multi_seg`` (``S``: idle); and the grid
    sizes ``n_items`` (``min(M, S) + ceil(M / P)`` pieces at most) and ``n_multi``
    (``ceil(M / P)``: a segment of two or more pieces has more than ``P`` rows).
    """
    M = keys.shape[0]
    P = piece_rows(M, D)
    dev = keys.device
    seg_sorted, perm = torch.sort(keys, stable=True)
    offsets = torch.searchsorted(seg_sorted, torch.arange(S + 1, device=dev, dtype=keys.dtype), out_int32=True)
    lengths = offsets[1:] - offsets[:-1]
    pieces = (lengths + (P - 1)) // P
    item_end = torch.cumsum(pieces, 0, dtype=torch.int32)
    n_items = min(M, S) + triton.cdiv(M, P)
    seg_of_item = torch.searchsorted(item_end, torch.arange(n_items, device=dev, dtype=torch.int32), right=True,
                                     out_int32=True)
    multi = pieces > 1
    multi_pieces = torch.where(multi, pieces, 0)
    multi_first = torch.cumsum(multi_pieces, 0, dtype=torch.int32) - multi_pieces
    n_multi = triton.cdiv(M, P)
    rank = torch.cumsum(multi.to(torch.int32), 0, dtype=torch.int32) - 1
    multi_seg = torch.full((n_multi + 1,), S, dtype=torch.int32, device=dev)
    multi_seg.scatter_(0, torch.where(multi, rank, n_multi).long(), torch.arange(S, device=dev, dtype=torch.int32))
    return dict(perm=perm, offsets=offsets, pieces=pieces, item_end=item_end, multi_first=multi_first,
                seg_of_item=seg_of_item, multi_seg=multi_seg[:n_multi], n_items=n_items, n_multi=n_multi, P=P,
                n_partials=2 * n_multi)


def _keys(indices, weights, K: int, NL: int, L: int, S: int):
    """int32 segment id per row (``S``: left out) and the per-level counts of rows left out for
    a non-finite weight and for an index out of range (the kernels count non-finite rows)."""
    M = indices.shape[0]
    idx = indices.view(L, NL)
    m_in = (idx >= 0) & (idx < K)
    level_base = (torch.arange(L, device=indices.device, dtype=torch.int32) * K)[:, None]
    keys = idx.to(torch.int32) + level_base
    bad = torch.zeros((L, 2), dtype=torch.int32, device=indices.device)
    if weights is None:
        valid = m_in
        bad[:, 1] = (~m_in).sum(1, dtype=torch.int32)
    else:
        w = weights.view(1, -1).expand(M // weights.shape[0], weights.shape[0]).reshape(L, NL)
        live = w != 0
        w_ok = torch.isfinite(w)
        valid = m_in & live & w_ok
        bad[:, 0] = (m_in & live & ~w_ok).sum(1, dtype=torch.int32)
        bad[:, 1] = (live & ~m_in).sum(1, dtype=torch.int32)
    return torch.where(valid, keys, S).reshape(M), bad


@launcher
def code_statistics_fwd(
    x: torch.Tensor,
    indices: torch.Tensor,
    num_codes: int,
    rows_per_level: int,
    weights: torch.Tensor | None = None,
    deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x (M, D) float``, ``indices (M,) int`` (level ``r // rows_per_level``'s codes, any
    values), ``weights (NW,)`` float or bool (row ``r`` has weight ``weights[r % NW]``) or None
    -> ``counts (S,)`` float32, ``sums (S, D)`` float32, ``bad (L, 2)`` int32 with
    ``S = L * num_codes``, ``L = M // rows_per_level``: per level, rows left out as not finite
    and rows whose index is out of range. Same device, any strides. Never syncs with the host.
    """
    # check (internal preconditions; users are checked by the op)
    assert x.dim() == 2 and indices.dim() == 1 and indices.shape[0] == x.shape[0], (x.shape, indices.shape)
    M, D = x.shape
    K, NL = int(num_codes), int(rows_per_level)
    assert NL > 0 and M % NL == 0, (M, NL)
    L = M // NL
    S = L * K
    assert S + 1 < 2**31 and M < 2**31, "int32 keys and offsets"
    if weights is not None:
        assert weights.dim() == 1 and weights.shape[0] > 0 and M % weights.shape[0] == 0, weights.shape
        if weights.dtype == torch.bool:
            weights = weights.view(torch.uint8)
    dev = x.device
    BLOCK_N, BLOCK_D, n_dblocks, single_d = _blocks(D)
    has_w = weights is not None
    w_arg = weights if has_w else x
    NW = weights.shape[0] if has_w else 1
    stride_w = weights.stride(0) if has_w else 0
    # allocate + launch
    if not deterministic:
        counts = torch.zeros((S,), dtype=torch.float64, device=dev)
        sums = torch.zeros((S, D), dtype=torch.float64, device=dev)
        bad = torch.zeros((L, 2), dtype=torch.int32, device=dev)
        if M > 0:
            grid = (triton.cdiv(M, BLOCK_N), n_dblocks)
            _code_statistics_atomic_kernel[grid](
                x, indices, w_arg, counts, sums, bad, M, D, NL, K, NW,
                x.stride(0), x.stride(1), indices.stride(0), stride_w, sums.stride(0),
                HAS_W=has_w, SINGLE_D=single_d, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=4,
            )
        return counts.float(), sums.float(), bad
    counts = torch.zeros((S,), dtype=torch.float32, device=dev)
    sums = torch.zeros((S, D), dtype=torch.float32, device=dev)
    if M == 0:
        return counts, sums, torch.zeros((L, 2), dtype=torch.int32, device=dev)
    keys, bad = _keys(indices, weights, K, NL, L, S)
    if S == 0:  # K = 0: every row is out of range (counted by _keys), nothing to sum
        return counts, sums, bad
    plan = segment_plan(keys, S, D)
    n_part = plan["n_partials"]
    psums = torch.empty((3 * n_part, D), dtype=torch.float64, device=dev)  # each piece's three parts (dd_add)
    pcounts = torch.empty((3 * n_part,), dtype=torch.float64, device=dev)
    _code_statistics_segment_kernel[(plan["n_items"], n_dblocks)](
        x, w_arg, plan["perm"], plan["offsets"], plan["item_end"], plan["pieces"], plan["multi_first"],
        plan["seg_of_item"], counts, sums, pcounts, psums, bad,
        D, K, S, NW, plan["P"], n_part,
        x.stride(0), x.stride(1), stride_w, sums.stride(0), psums.stride(0),
        HAS_W=has_w, SINGLE_D=single_d, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        num_warps=4 if rows_vectorise(x) else 8,  # (rows of D = 300 16-bit values: 255 registers, 64 B spilled)
    )
    _code_statistics_merge_kernel[(plan["n_multi"], max(triton.cdiv(D, MERGE_BLOCK_D), 1))](
        plan["multi_seg"], plan["multi_first"], plan["pieces"], pcounts, psums, counts, sums,
        D, S, n_part, sums.stride(0), psums.stride(0),
        BLOCK_Q=MERGE_BLOCK_Q, BLOCK_D=MERGE_BLOCK_D, num_warps=4,
    )
    return counts, sums, bad
