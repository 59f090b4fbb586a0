"""Greedy residual quantization, all L levels in one kernel launch, and its fused backward.

Forward. Each program owns BLOCK_M rows and keeps their residual on chip in float32 for the
whole launch. For every level it streams the K codes of that level's codebook in BLOCK_K
tiles, scoring ``|c|^2 - 2 r.c`` (``|r|^2`` is the same for every code of a row, so it is
dropped) with ``tl.dot`` and ``|c|^2`` from the same loaded tile, keeping a running
``(min, index)`` per row. It then gathers the chosen code rows, subtracts them from the
residual and goes on to the next level. No ``(N, K)`` matrix is ever written. Besides the
codes and the sum of the chosen codes, one launch can also produce what a training step needs
next, so the module computes nothing over the activations in torch:

* ``LOSS``: per program and level, ``sum_i w_i |r_{i,l+1}|^2`` (the squared residual left by
  level ``l``: the seed's commitment / codebook loss terms), written to a small float64
  ``(programs, BLOCK_L)`` buffer the op sums in a fixed order (deterministic); a row's float32
  ``|r|^2`` that overflows (|r| beyond ~1.8e19) is summed again scaled by its power of two
  (only in a block that holds one), so the loss is finite wherever its mean is representable;
* ``STATS``: per level, EMA statistics of the vectors that level quantized (``r_l``): counts
  and sums per code (float32 atomics) and the number of rows left out as not finite (in the
  dtype of the codebooks being trained: ``stat_lim``, one compare per element as before). A
  term ``w r_l`` or weight ``w`` beyond ``atomic_overflow_bound(N)`` sets a flag, and the
  launch's last program sums again, as float64 pairs rounded once, the codes whose float32 sum
  or count is not finite or reached 2^127 (``_stats_fixup``, as the backward's
  ``_dcb_fixup``): a sum or count is +-inf only where the exact one overflows (the float64
  midpoint max + 2^103 of max, 2^103, -2^60 rounds to max);
* ``CAND``: for a few chosen rows (``slot >= 0``), at every level, the midpoint ``(c_l + r_l) / 2``
  of the residual and the code it chose, rounded once (``_midpoint``: no intermediate overflow;
  dead-code revival candidates: a revived code splits a used code's cell), and whether it is
  usable (finite residual and code, nonzero weight);
* ``HAS_W``: per-row weights (a padding mask): rows of weight 0 add nothing to the loss or the
  statistics, and their ``quantized`` is their input;
* ``SEARCH=False``: the codes are given (a search with another metric ran first) and only
  gathered.

The nearest code (NaN-aware, smallest index on exact ties): a code with a NaN or infinite
element is never chosen while a finite code exists; a NaN distance (a NaN residual) and an
overflowing one compare as ``+inf``; a finite row beyond 2^48 in size, or whose scores all
compare as ``+inf`` (|c|^2 overflows), is searched again on the residual and codes scaled by
2^-96, and a finite row below 2^-48 whose best score is below 2^-90 (codes ~1e-30 near a
residual ~1e-30: |c|^2 and r.c underflow and tie at 0) on them scaled by 2^96 (exact; the
common path is unchanged, a rescue pass costs one multiply per code element per tile and runs
only for blocks that hold such a row; float16
codebooks never need it); a row still without a finite score gets the first finite code; a level whose codes are all non-finite gives index 0. Within a tile the
smallest index among the exact minima wins, and a later tile wins only when strictly smaller
(the team's ``_common.argmin_merge``, fed NaN for the codes that may not win).

Backward (``_residual_quantize_bwd_kernel``): per ``(BLOCK_M rows, BLOCK_D columns)`` block it
re-walks the levels from ``x`` and the saved codes (no search) and writes
``dx = G(g) + 2 w sum_l gc_l r_{l+1}`` (``G`` the identity, or the rotation trick when the
whole row is one block) and, with float32 atomics, ``dcb[l, k] += 2 ge_l w (c_lk - r_l)`` for the
rows that chose code ``k``. ``gc`` / ``ge`` are the per-level gradients of the loss terms. A term
beyond ``atomic_overflow_bound(N)`` (a float32 partial sum could overflow) sets a flag; the
launch's last program (an atomic count) then sums again, in float64, the codes whose float32
sum is not finite (``_dcb_fixup``), and rounds each sum once.

Two forward variants, chosen by the launcher on D (never a crash, never a silent fallback):

* ``_residual_quantize_fwd_kernel`` (``next_pow2(D) <= register_d_limit(dtype)``: 256, float32 128): the
  residual and the running sum of chosen codes are ``(BLOCK_M, BLOCK_D)`` float32 register
  blocks; each code tile is ``(BLOCK_K, BLOCK_D)``, the dot reduces over all of D at once.
* ``_residual_quantize_fwd_chunked_kernel`` (larger D: its register blocks would spill): the residual lives in a float32
  ``(N, D)`` workspace that only the owning program touches and every dot and update streams D
  in BLOCK_D chunks.

Precision: for float32 codebooks the dot is ``PRECISION`` "tf32x3" where the target has TF32
tensor cores, rows are at most ``X3_MAX_D`` (64) wide and there are at most ``X3_MAX_L`` (8)
levels (the residual split into two TF32 parts
once per level, each code tile as it loads, three exact TF32 products: ``_common.dot_split_nt``;
its tiles are listed, ``_X3_TILES``), exact IEEE float32 (``"ieee"``, FMA units) elsewhere, one
TF32 product with ``allow_tf32``.
For bfloat16/float16 codebooks the residual is rounded to the codebook dtype for the dot only
(tensor cores, float32 accumulation); ``|c|^2``, the residual, the loss terms and the quantized
sum stay float32. The quantized sum is formed in level order in float32; a block in which it is
not finite sums its chosen codes again in float64 (``_exact_code_sum``) and rounds once, so a
sum of finite codes is +-inf only where the exact sum lies beyond float32's range (the check is
one reduction per block after the level loop; blocks of ordinary values never redo). Atomics make the statistics and the codebook gradient non-bitwise-reproducible
on a GPU (the values agree to float32 rounding).
"""

import torch
import triton
import triton.language as tl

from ._common import (FIX_SCAN, TOP32, add_rows_by_index, add_rows_by_index_dd, arch_family, argmin_merge,
                      atomic_overflow_bound, autotune, autotune_configs, bf16_rne, dot_fp32, dot_nt, dot_split_nt, exp2i,
                      exp2i64, launcher, next_pow2, nonfinite_rows, pow2_exponent, prune_by_estimate,
                      register_estimate, rotation_grad_rows, round_bf16, round_dd, target_for, tf32_split,
                      tl_input_precision, words_per_thread)

MAX_REGISTER_D = None  # above register_d_limit(dtype) (256; float32: 128), the D-chunked variant with a
# float32 workspace runs: wider register blocks spill on sm_90 (see _estimate)
CHUNK_D = 64  # D chunk of the chunked variant
STATS_FIX_WORDS = 2048  # the statistics fix-up's tiles: FIX_M whole rows, at most this many words (1 row at
# least: a D-chunked launch's fix-up holds a whole row too, it runs only on the rare inputs), and FIX_R codes'
# float64 sums, at most half as many
MAX_ROTATE_D = 1024  # the fused rotation-trick gradient holds a whole row in registers
BWD_FIXUP_MAXNREG = 255  # a backward launch with the codebook gradient (its fix-up's call inside) states
# its register limit: without it ptxas held it to 128 registers with 64-232 B of stack (sm_90, job list);
# with it 128-180 registers and none (as _configs for the forward)


@triton.jit
def _scores_of_finite_codes(b_dist, b_cfin, o_k, m_k, b_first, K):
    """The scores a tile offers :func:`argmin_merge`: NaN for codes that are padding or hold a NaN
    or infinite element (never chosen), and the running first finite code (a scalar: the same
    for every row), which a row whose scores are all NaN or +inf falls back to."""
    m_ok = m_k & b_cfin
    b_first = tl.minimum(b_first, tl.min(tl.where(m_ok, o_k, K), axis=0))
    return tl.where(m_ok[None, :], b_dist, float("nan")), b_first


# A row whose residual's max-abs exceeds 2^BIG_EXP, or that found no code with a finite score, is
# searched again with the residual and the codes scaled by 2^-RESCALE_EXP (exact): |c|^2 and
# 2 r.c of codes near a residual up to the float32 maximum then neither overflow nor cancel. A
# row below 2^-BIG_EXP whose best score is below 2^-TINY_SCORE_EXP (a code within ~2^-45 of it:
# |c|^2 and r.c of codes near a residual ~1e-30 underflow to 0 and tie) is searched again scaled
# by 2^RESCALE_EXP: the codes near it are then normal numbers; the codes that overflow (|c|^2 or
# an element) are far from it and never chosen there (the row keeps its first choice if none is left).
BIG_EXP = 48
RESCALE_EXP = tl.constexpr(96)
TINY_SCORE_EXP = 90
BIG_ROW = tl.constexpr(2.0**BIG_EXP)
TINY_ROW = tl.constexpr(2.0**-BIG_EXP)
TINY_SCORE = tl.constexpr(2.0**-TINY_SCORE_EXP)
RESCALE_DOWN = tl.constexpr(2.0**-RESCALE_EXP.value)
RESCALE_UP = tl.constexpr(2.0**RESCALE_EXP.value)
# A float16 codebook's scores neither overflow nor underflow, but its dot operand (the residual
# rounded to float16) is inf once the residual leaves float16's range (|r| > 65504, e.g. x =
# 60000 after a code of -10000): such a row (max-abs > FP16_WIDE_ROW) is searched again with the residual
# scaled by 2^-FP16_WIDE_EXP and the codes as they are, its dot scaled back (exact: a power of
# two) in the score. The scaled residual's small elements lose float16 precision below 2^-6,
# ~2^-21 of the row's largest: far below the rounding of its large ones.
FP16_WIDE_EXP = 8
FP16_WIDE_ROW = tl.constexpr(65504.0)  # float16's largest finite value
FP16_WIDE_SCALE = tl.constexpr(2.0**-FP16_WIDE_EXP)
FP16_WIDE_DOT_SCALE = tl.constexpr(2.0 * 2.0**FP16_WIDE_EXP)  # the score's 2 r.c, r scaled back
# WIDE: a float32 residual r - c can overflow only where some |r| >= 2^103 (|c| <= float32's max
# 2^128 - 2^104; the sum rounds to inf from 2^128 - 2^103 on); a float16 code never makes it. Such
# a row's new residual is formed at scale 2^-E instead, r 2^-E - c 2^-E (E the bit length of L:
# x less L codes is below (L + 1) times float32's max, so a row held at that scale never overflows
# again), and held there, its codes scaled as they are subtracted, until its residual is
# representable again (then scaled back, exactly). While held, its residual is beyond float32: it
# enters no statistics or candidate (as an infinite one), its loss term is |r 2^-E|^2 2^2E in
# float64, and its search is the big rescue pass on the residual scaled by 2^(E - 96). Only a block
# holding a row beyond OVERFLOW_ROW, or a held one, checks (the D-chunked variant with one more
# read of the residual and the codes, and for every block when the codes are given).
OVERFLOW_ROW = tl.constexpr(2.0**103)


@triton.jit
def _search_level(b_rd, p_cbl, o_d, m_d, K, stride_ck, stride_cd, b_first, scale,
                  PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, SCALED: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, DOT_SCALE: tl.constexpr = 2.0):
    """Nearest code of each row of the register-resident dot operand ``b_rd`` in one level:
    running ``(min, index)`` over the tiles (index -1 where no finite score) and the first
    finite code. ``SCALED``: the codes are scaled by ``scale`` (2^-RESCALE_EXP or 2^RESCALE_EXP)
    as they are loaded (``b_rd`` already is): one multiply per code element per tile, only on
    the rescue pass; a code that overflows there has a non-finite element and is never chosen.
    The score is ``|c|^2 - DOT_SCALE (b_rd . c)``: 2, or ``2 * 2^FP16_WIDE_EXP`` for a float16
    residual scaled by ``2^-FP16_WIDE_EXP`` (the codes unscaled, see FP16_WIDE)."""
    b_min = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
    b_idx = tl.full((BLOCK_M,), -1, dtype=tl.int32)
    # a tensor before the loop: a launch with K == 1 gets K as the constant 1, and a loop-carried
    # value must keep its type (the interpreter never specialises, the compiler does)
    b_first = tl.zeros((), dtype=tl.int32) + b_first
    b_rl = b_rd
    if PRECISION == "tf32x3":  # the residual's two TF32 parts, once per level
        b_rd, b_rl = tf32_split(b_rd)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_c = tl.load(p_cbl + o_k[:, None] * stride_ck + o_d[None, :] * stride_cd,
                      mask=m_k[:, None] & m_d[None, :], other=0.0)
        b_c32 = b_c.to(tl.float32)
        if SCALED:
            b_c32 = b_c32 * scale  # a power of two: exact but for overflow
            b_c = b_c32.to(b_c.dtype)  # exact (bf16 and fp32 hold the scaled value)
        b_cc = tl.sum(b_c32 * b_c32, axis=1)
        if DOT_FP32 or PRECISION == "tf32x3":
            b_rc = dot_split_nt(b_rd, b_rl, b_c32, tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32), PRECISION)
        else:
            b_rc = tl.dot(b_rd, tl.trans(b_c), input_precision=PRECISION)
        b_s, b_first = _scores_of_finite_codes(b_cc[None, :] - DOT_SCALE * b_rc, _row_finite(b_c32), o_k, m_k,
                                               b_first, K)
        b_min, b_idx = argmin_merge(b_min, b_idx, b_s, k0, BLOCK_K)
    return b_min, b_idx, b_first


@triton.jit
def _rescue_rows(b_rm, m_fin, b_idx, b_min):
    """The rows a rescue pass searches again (see BIG_EXP), of the finite rows ``m_fin`` with
    max-abs ``b_rm`` and first choice ``(b_min, b_idx)``: ``(big, tiny)``, per row, no element
    work. Big: beyond 2^48, or no finite score. Tiny: below 2^-48 with a best score below 2^-90
    (a code so near that its scores underflow; a tiny row among ordinary codes is not redone)."""
    m_big = m_fin & ((b_rm > BIG_ROW) | (b_idx < 0))
    m_tiny = m_fin & ~m_big & (b_rm < TINY_ROW) & (b_min < TINY_SCORE)
    return m_big, m_tiny


@triton.jit
def _search_level_chunked(p_ws, o_m, m_m, stride_wn, p_cbl, K, D, stride_ck, stride_cd, scale, b_rscale,
                          PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, BF16_RNE: tl.constexpr,
                          SCALED: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
                          CODES_SCALED: tl.constexpr = True, DOT_SCALE: tl.constexpr = 2.0):
    """:func:`_search_level` for the chunked variant: the residual streamed from the workspace in
    BLOCK_D chunks; ``SCALED`` scales the residual by ``b_rscale`` (per row, ``(BLOCK_M,)``) and
    (``CODES_SCALED``) the codes by ``scale`` as they load; the score is
    ``|c|^2 - DOT_SCALE (r . c)``."""
    b_min = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
    b_idx = tl.full((BLOCK_M,), -1, dtype=tl.int32)
    b_first = tl.zeros((), dtype=tl.int32) + K  # a tensor (K may be the constant 1: see _search_level)
    for k0 in range(0, K, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        b_rc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
        b_cc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        b_cbad = tl.zeros((BLOCK_K,), dtype=tl.int32)
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m_d = o_d < D
            b_r = tl.load(p_ws + o_m[:, None] * stride_wn + o_d[None, :], mask=m_m[:, None] & m_d[None, :],
                          other=0.0)
            if SCALED:
                b_r = b_r * b_rscale[:, None]  # a power of two
            if BF16_RNE:
                b_rd = round_bf16(b_r)
            else:
                b_rd = b_r.to(p_cbl.dtype.element_ty)
            b_c = tl.load(p_cbl + o_k[:, None] * stride_ck + o_d[None, :] * stride_cd,
                          mask=m_k[:, None] & m_d[None, :], other=0.0)
            b_c32 = b_c.to(tl.float32)
            if SCALED and CODES_SCALED:
                b_c32 = b_c32 * scale
                b_c = b_c32.to(b_c.dtype)
            b_cc += tl.sum(b_c32 * b_c32, axis=1)
            b_cbad += tl.where(_row_finite(b_c32), 0, 1)
            if DOT_FP32 or PRECISION == "tf32x3":
                b_rc = dot_nt(b_rd.to(tl.float32), b_c32, b_rc, PRECISION, False)
            else:
                b_rc = tl.dot(b_rd, tl.trans(b_c), b_rc, input_precision=PRECISION)
        b_s, b_first = _scores_of_finite_codes(b_cc[None, :] - DOT_SCALE * b_rc, b_cbad == 0, o_k, m_k, b_first, K)
        b_min, b_idx = argmin_merge(b_min, b_idx, b_s, k0, BLOCK_K)
    return b_min, b_idx, b_first


@triton.jit
def _sq_rows64(b_sq, b_rm, b_q):
    """A row's ``|r|^2`` as float64: ``b_sq`` (the float32 sum) where it is finite, else
    ``b_q 2^(2e)`` with ``b_q = |r 2^-e|^2`` the sum of the row scaled by ``2^-e`` (``b_rm``'s
    power of two), exact but for float32's rounding of ``b_q``."""
    e = pow2_exponent(b_rm)
    return tl.where(b_sq < float("inf"), b_sq.to(tl.float64), b_q.to(tl.float64) * exp2i64(2 * e))


@triton.jit
def _loss_rows(b_new, b_w, m_m):
    """``w |r|^2`` per row of a register block, float64 (0 for masked rows and weight 0). The
    float32 sum overflows for ``|r|`` beyond ~1.8e19 though the loss may be representable: only a
    block holding such a row (finite) sums its rows again scaled by their power of two."""
    b_sq = tl.sum(b_new * b_new, axis=1)
    b_sq64 = b_sq.to(tl.float64)
    m_over = m_m & ~(b_sq < float("inf")) & _row_finite(b_new)
    if tl.max(m_over.to(tl.int32), axis=0) > 0:
        b_rm = tl.max(tl.abs(b_new), axis=1)
        b_s = exp2i(-pow2_exponent(b_rm))
        b_n = b_new * b_s[:, None]
        b_sq64 = tl.where(m_over, _sq_rows64(b_sq, b_rm, tl.sum(b_n * b_n, axis=1)), b_sq64)
    return tl.where(m_m & (b_w != 0), b_w.to(tl.float64) * b_sq64, 0.0)


@triton.jit
def _row_finite(b):
    """Per row of a (rows, cols) float32 block: True when every element is finite."""
    return tl.max(tl.where(tl.abs(b) < float("inf"), 0, 1), axis=1) == 0


@triton.jit
def _nan_where_input_is(p_xt, m_md, b_q):
    """``b_q`` with NaN wherever the input tile at ``p_xt`` is not finite (NaN or +-inf): the
    value the straight-through ``x + (q - x)`` has there. Only blocks holding such an input call
    it (one more read of their x tile)."""
    b_x = tl.load(p_xt, mask=m_md, other=1.0).to(tl.float32)
    return tl.where(tl.abs(b_x) < float("inf"), b_q, float("nan"))


@triton.jit
def _row_below(b, lim):
    """Per row of a (rows, cols) float32 block: True when every element's magnitude is below
    ``lim`` (``inf``: finite; a 16-bit codebook's rounding threshold: finite in its dtype)."""
    return tl.max(tl.where(tl.abs(b) < lim, 0, 1), axis=1) == 0


@triton.jit
def _midpoint(a, b):
    """``(a + b) / 2`` of float32 blocks, rounded once: ``a + b`` halved, or where that sum
    overflows (``a = -3e38, b = 3e38`` does not, ``a = b = 3e38`` does) ``a/2 + b/2`` (exact
    halves of large numbers). Never ``a + (b - a)/2``: ``b - a`` overflows where the midpoint
    does not."""
    b_s = a + b
    return tl.where(tl.abs(b_s) < float("inf"), 0.5 * b_s, 0.5 * a + 0.5 * b)


@triton.jit
def _level_outputs(
    b_r, b_sel, b_wide, b_idx, b_w, b_sw, m_m, o_d, m_d, lvl, b_slot,
    p_counts, p_sums, p_skip, p_cand, p_cand_ok, K, D, L, S, stat_lim, BIG_T,
    STATS: tl.constexpr, CAND: tl.constexpr,
):
    """The statistics and candidates of a level, for a register-resident row block ``b_r`` (the
    residual this level quantized) and its chosen code rows ``b_sel``; rows whose residual is
    not below ``stat_lim`` (not finite in the codebook's dtype) or is held at scale 2^-E
    (``b_wide``: beyond float32) are left out and counted. ``b_w``: the rows' weights (scaled
    for the losses), ``b_sw``: the weights the statistics carry (as given)."""
    b_fin = _row_below(b_r, stat_lim) & ~b_wide & (b_w == b_w) & (tl.abs(b_w) < float("inf"))
    b_use = m_m & (b_w != 0) & b_fin
    if STATS:
        o_kk = lvl * K + b_idx
        tl.atomic_add(p_counts + o_kk, b_sw, mask=b_use, sem="relaxed")
        tl.store(p_skip + L + tl.zeros(o_kk.shape, dtype=tl.int32), 1, mask=b_use & (tl.abs(b_sw) > BIG_T))
        b_t = b_sw[:, None] * b_r
        m_t = b_use[:, None] & m_d[None, :]
        tl.atomic_add(p_sums + o_kk[:, None] * D + o_d[None, :], b_t, mask=m_t, sem="relaxed")
        tl.store(p_skip + L + tl.zeros(b_t.shape, dtype=tl.int32), 1, mask=m_t & (tl.abs(b_t) > BIG_T))
        tl.atomic_add(p_skip + lvl, tl.sum((m_m & (b_w != 0) & ~b_fin).to(tl.int32), axis=0), sem="relaxed")
    if CAND:
        m_c = m_m & (b_slot >= 0)
        o_c = lvl * S + b_slot
        tl.store(p_cand + o_c[:, None] * D + o_d[None, :], _midpoint(b_sel, b_r),
                 mask=m_c[:, None] & m_d[None, :])
        # ok: finite residual and code (a level of only infinite codes gives an infinite one)
        tl.store(p_cand_ok + o_c, (b_use & _row_finite(b_sel)).to(tl.int8), mask=m_c)


def _configs(name, maxnreg=None):
    # maxnreg (8 warps only): the register forward states 255. With the statistics fix-up's call
    # in its last program (_stats_fixup) and no stated limit, ptxas held 8-warp launches to 128
    # registers (two blocks per SM) and spilled 120-160 B in the fp32 step (sm_90, inlined or
    # called); with it, no kept launch spills (some did 8-16 B at 128 before), and those that fit
    # 128 exactly before take 138-156 (one block per SM). 4-warp configs and the D-chunked
    # kernel keep ptxas's own choice (a stated limit made the chunked one spill)
    gpu = [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s,
                      maxnreg=maxnreg if w == 8 else None)
        for bm in (16, 32, 64, 128)
        for bk in (16, 32, 64, 128)
        for w in (4, 8)
        for s in (2, 3)
    ]
    return autotune_configs(name, gpu,
                            pinned=triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=8, num_stages=2,
                                                 maxnreg=maxnreg),
                            # the interpreter runs one config: a large one (it runs fast)
                            interpreter=triton.Config({"BLOCK_M": 32, "BLOCK_K": 32}, num_warps=4))


# Registers per thread = base + a * R + b * C + c * S + e * BLOCK_L (R: words of the float32 row
# blocks, residual / running sum / chosen codes, BLOCK_M x BLOCK_D; C: the code tile, BLOCK_K x
# BLOCK_D; S: the score tile, BLOCK_M x BLOCK_K; BLOCK_L: the loss partials when LOSS), by target
# family, variant (register / D-chunked) and dot (tensor cores, or float32 "ieee" FMA dots, which
# expand in registers). Fitted to ptxas (sm_80 and sm_90, triton 3.6 and 3.8) at the benchmark
# shapes, bounding it from above.
_REGISTER_MODELS = {
    ("sm_90", False, False): (106, (3.0, 1.25, 3.25, 0)), ("sm_90", False, True): (186, (8.75, 2.5, 3.75, 2)),
    ("sm_90", True, False): (133, (3.25, 1.75, 2.5, 0)), ("sm_90", True, True): (133, (3.25, 1.75, 2.5, 0)),
    ("sm_80", False, False): (106, (3.25, 1.5, 1.0, 0)), ("sm_80", False, True): (173, (6.75, 3.0, 3.5, 12)),
    ("sm_80", True, False): (67, (9.25, 3.25, 3.75, 0)), ("sm_80", True, True): (67, (9.25, 3.25, 3.75, 0)),
}
# (refitted when the forward learned NaN outputs for non-finite inputs: the tensor-core register
# launches grew by up to 3 registers (bases 104 -> 106 sm_90, 103 -> 106 sm_80); with triton 3.6
# the sm_80 chunked 32x16 4-warp launch went from 168 registers to 255 with a 16 B spill, which
# the chunked row-block term, 6.75 -> 9.25, now prunes, and no other launch)
# An 8-warp config that states maxnreg (see _configs) takes more registers than the fit above (ptxas
# no longer holds it near 128), by target family and dot (tensor cores: up to 22 more on sm_80,
# 10 on sm_90; float32 FMA dots: 1)
_STATED_LIMIT_EXTRA = {("sm_90", False): 10, ("sm_80", False): 22, ("sm_90", True): 1, ("sm_80", True): 1}
_SCRATCH = 2048  # shared memory besides the code tiles (reductions; measured <= 1 KiB)


# float32 searched as three TF32 products ("tf32x3", the register variant at BLOCK_D <= X3_MAX_D):
# the residual's split parts and the code tile's stay beside the register blocks, more than a
# linear model tells apart, so its tiles are listed with ptxas's registers, 8 warps stating maxnreg
# 255 (BLOCK_D 64: the benchmark step's launches, benchmarks/results/sm90-static.json, the most of
# triton 3.6 and 3.8 and of sm_80 and sm_90, plus 8 for drift, at most 255; BLOCK_D <= 32: probed on
# sm_90 only, 2026-12-04, plus 20). Every other tile spilled at BLOCK_D = 64 (16 x 16 at 4 warps;
# 64-row tiles 240-384 B with triton 3.6), and at BLOCK_D = 128 all but one: wider rows keep the
# exact "ieee" dot. 16 x 16, 2 stages, is the pinned config (FASTVQ_AUTOTUNE=0): 255 registers, no
# spill; autotuning prunes it (the estimate keeps a margin below 255).
X3_MAX_D = 64
X3_MAX_L = 8  # (BLOCK_L 8: more levels hold more loss partials and codes than the table budgets)
_X3_TILES = {  # BLOCK_D -> {(BLOCK_M, BLOCK_K, num_warps, num_stages): registers}
    64: {(16, 16, 8, 2): 255, (16, 32, 8, 2): 227, (16, 32, 8, 3): 242, (16, 64, 8, 2): 244, (16, 64, 8, 3): 249,
         (32, 64, 8, 2): 255},
    32: {(16, 16, 8, 2): 226, (16, 16, 8, 3): 236, (16, 32, 8, 2): 215, (16, 32, 8, 3): 226, (16, 64, 8, 2): 223,
         (16, 64, 8, 3): 243, (32, 64, 8, 2): 255, (64, 16, 8, 2): 242, (64, 16, 8, 3): 248, (64, 32, 8, 2): 251},
}


def _estimate_x3(config, block_d: int, family: str) -> dict:
    """:func:`_estimate` for a "tf32x3" launch (at most X3_MAX_L levels: the table holds L = 8's
    registers, the loss partials and codes grow with BLOCK_L): the listed registers (256, pruned,
    for a tile not listed; sm_80 reads BLOCK_D 64's list at every width, the narrower one was
    probed on sm_90 only), shared memory for the row block's two split parts and
    ``num_stages + 1`` code tiles (the tiles in flight and the current one's two parts)."""
    bm, bk, w, s = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_K"], config.num_warps, config.num_stages
    table = _X3_TILES[64 if block_d > 32 or family != "sm_90" else 32]
    regs = table.get((bm, bk, w, s), 256)
    return {"shared": (s + 1) * bk * block_d * 4 + 2 * bm * block_d * 4 + _SCRATCH, "regs": regs}


def _fma_budget(named_args, kwargs) -> bool:
    """Whether a launch is budgeted as the float32 FMA dot: exact ("ieee") dots, and float32
    operands on TF32 tensor cores too (allow_tf32: operands of four bytes; the tensor-core fit,
    made on 16-bit ones, kept TF32 launches that spill up to 80 bytes)."""
    p_x = named_args.get("p_x")
    return kwargs.get("PRECISION", named_args.get("PRECISION")) == "ieee" or (
        p_x is not None and p_x.element_size() == 4)


def _estimate(config, named_args, chunked: bool = False, **kwargs) -> dict:
    """Shared memory and registers per thread of one config on the target GPU: ``num_stages``
    code tiles (``BLOCK_K x BLOCK_D``) in flight and the float32 row block staged through shared
    memory (D-chunked: three times, the residual chunk, its update and the rescue pass's copy)."""
    p_x = named_args.get("p_x")
    if not chunked and kwargs.get("PRECISION", named_args.get("PRECISION")) == "tf32x3":
        return _estimate_x3(config, kwargs.get("BLOCK_D", named_args.get("BLOCK_D")),
                            arch_family(target_for(p_x.device if p_x is not None else None)))
    fma = _fma_budget(named_args, kwargs)
    elt = p_x.element_size() if p_x is not None else 4 if fma else 2
    tgt = target_for(p_x.device if p_x is not None else None)
    block_d = CHUNK_D if chunked else kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    block_l = kwargs.get("BLOCK_L", 8) if kwargs.get("LOSS", True) else 0
    bm, bk, w, s = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_K"], config.num_warps, config.num_stages
    shared = s * bk * block_d * elt + (3 if chunked else 1) * bm * block_d * 4 + _SCRATCH
    regs = register_estimate(_REGISTER_MODELS[(arch_family(tgt), chunked, fma)], words_per_thread(bm, block_d, w),
                             words_per_thread(bk, block_d, w), words_per_thread(bm, bk, w), block_l)
    if config.maxnreg is not None:
        regs += _STATED_LIMIT_EXTRA[(arch_family(tgt), fma)]
    return {"shared": shared, "regs": regs}


def _estimate_chunked(config, named_args, **kwargs) -> dict:
    return _estimate(config, named_args, chunked=True, **kwargs)


def register_d_limit(dtype: torch.dtype) -> int:
    """The widest BLOCK_D the register variant runs with: some config of :func:`_configs` fits
    by :func:`_estimate` (16 rows at 8 warps); float32's FMA dots take twice the registers."""
    return 128 if dtype == torch.float32 else 256


def _prune(configs, named_args, estimate, **kwargs):
    p_x = named_args.get("p_x")
    return prune_by_estimate(configs, lambda c: estimate(c, named_args, **kwargs),
                             target_for(p_x.device if p_x is not None else None))


def _prune_register_configs(configs, named_args, **kwargs):
    """Keep the configs whose estimated shared memory and registers fit the target GPU (at
    least one); :func:`register_d_limit` keeps some for every BLOCK_D the register variant runs with."""
    return _prune(configs, named_args, _estimate, **kwargs)


def _prune_chunked_configs(configs, named_args, **kwargs):
    """As :func:`_prune_register_configs`; float32 (FMA dots) keeps no 64-row tile: with triton
    3.6 they compile to 186-255 registers and spill on sm_80 and sm_90 (the model, linear in the
    block sizes, cannot tell them from the 32-row tiles at 4 warps that fit)."""
    if _fma_budget(named_args, kwargs):
        configs = [c for c in configs if c.kwargs["BLOCK_M"] <= 32] or configs
    return _prune(configs, named_args, _estimate_chunked, **kwargs)


_prune_register_configs.estimate = _estimate
_prune_chunked_configs.estimate = _estimate_chunked


_FLAGS = ["SEARCH", "HAS_W", "LOSS", "STATS", "CAND"]
# (the tuning key holds PRECISION too: float32's "tf32x3", "ieee" and "tf32" launches prune to
# different tiles, and a config tuned for one must not run the other)
# the forward's atomic outputs (STATS; without it they stand for the quantized output, which the
# launch writes whole): the autotuner zeroes them around its timed launches
_ATOMIC_OUTPUTS = ["p_counts", "p_sums", "p_skip"]


@triton.jit
def _dot_operand(b_r, p_cb, DOT_FP32: tl.constexpr, BF16_RNE: tl.constexpr):
    """The residual as the search's dot operand: rounded to the codebook dtype (a no-op for
    float32; ``BF16_RNE``: to nearest even), then upcast to float32 with ``DOT_FP32``."""
    if BF16_RNE:
        b_rd = round_bf16(b_r)
    else:
        b_rd = b_r.to(p_cb.dtype.element_ty)
    if DOT_FP32:
        b_rd = b_rd.to(tl.float32)
    return b_rd


@triton.jit
def _exact_code_sum(p_cb, b_codes, b_q, o_l, o_d, m_md, L, stride_cl, stride_ck, stride_cd):
    """``b_q`` (the float32 level-order sum of the chosen codes) where it is finite; elsewhere the
    same codes summed in float64 and rounded once: finite codes whose float32 partial sums
    overflow (3e38 + 3e38 - 3e38) give their finite sum, codes that hold NaN or inf the same
    NaN / inf as before. Called only for a block that holds a non-finite element of ``b_q``."""
    b_q64 = tl.zeros_like(b_q).to(tl.float64)
    for lvl in range(L):
        b_idx = tl.sum(tl.where(o_l[None, :] == lvl, b_codes, 0), axis=1)
        b_sel = tl.load(p_cb + lvl * stride_cl + b_idx[:, None] * stride_ck + o_d[None, :] * stride_cd,
                        mask=m_md, other=0.0)
        b_q64 += b_sel.to(tl.float32).to(tl.float64)
    return tl.where(b_q - b_q == 0, b_q, b_q64.to(tl.float32))


@triton.jit
def _wide_exp(L):
    """``E``, the bit length of ``L`` (``2^E >= L + 1``): ``x`` less ``L`` codes, every partial
    sum scaled by ``2^-E``, never overflows float32."""
    n = tl.full((), 0, tl.int32) + L  # (L = 1 arrives as a constexpr)
    return pow2_exponent(n.to(tl.float32)) + 1


@triton.jit
def _held_wide(b_r, b_sel, b_wide, s_wide, s_up):
    """The new residual of a register block that may hold a row at scale ``2^-E`` (see WIDE)
    and which rows are held after it: ``b_r - b_sel``, a held row's ``b_r - b_sel 2^-E``; a row
    whose ``b_r - b_sel`` overflows (a finite residual and code) ``b_r 2^-E - b_sel 2^-E``, held;
    a held row whose residual is representable again goes back to scale 1. Returns
    ``(new residual, b_wide)``."""
    b_cs = tl.where(b_wide, s_wide, 1.0)
    m_over = ~_row_finite(b_r - b_sel * b_cs[:, None]) & _row_finite(b_r) & _row_finite(b_sel)
    b_wide = b_wide | m_over
    b_new = b_r * tl.where(m_over, s_wide, 1.0)[:, None] - b_sel * tl.where(b_wide, s_wide, 1.0)[:, None]
    b_up = b_new * s_up  # (s_up = 2^E: exact, or inf)
    m_back = b_wide & _row_finite(b_up)
    return tl.where(m_back[:, None], b_up, b_new), b_wide & ~m_back


@triton.jit
def _group_in_rows(p_codes, s0, N, lvl, stride_on, stride_ol, k0, FIX_R: tl.constexpr, FIX_SCAN: tl.constexpr):
    """Whether any of rows ``s0 .. s0 + FIX_SCAN`` chose, at level ``lvl``, one of the codes
    ``k0 .. k0 + FIX_R``: a fix-up walks only the row blocks of such a span (one wide read of the
    codes per span, so a group of codes costs ``N / FIX_SCAN`` steps, not ``N / FIX_M``)."""
    o_s = s0 + tl.arange(0, FIX_SCAN).to(tl.int64)
    b_i = tl.load(p_codes + o_s * stride_on + lvl * stride_ol, mask=o_s < N, other=-1, cache_modifier=".cg")
    return tl.max(((b_i >= k0) & (b_i < k0 + FIX_R)).to(tl.int32), axis=0) > 0


@triton.jit
def _stats_fix_codes(
    p_x, p_cb, p_codes, p_w, p_sw, p_out, N, K, D, L, lvl, k0, m_fix, stat_lim,
    stride_xn, stride_xd, stride_cl, stride_ck, stride_cd, stride_on, stride_ol,
    HAS_W: tl.constexpr, COUNTS: tl.constexpr, FIX_M: tl.constexpr, FIX_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The statistics' sums (``p_out = p_sums``; ``COUNTS``: the counts, ``p_out = p_counts``) of
    codes ``k0 + j`` of level ``lvl`` (``m_fix``) again, in float64: every row walked to that
    level as the forward forms its residual (float32; a row whose ``r - c`` overflows held at
    scale ``2^-E``, :func:`_held_wide`), ``FIX_M`` whole rows at a time (``BLOCK_D >= D``), the
    terms ``w r_l`` (``COUNTS``: ``w``) of the rows that level counts (nonzero weight, residual
    below ``stat_lim``, not held; ``w`` the statistics' weights, ``p_sw``) exact in float64 and
    summed in three float64 parts (:func:`add_rows_by_index_dd`), each sum rounded once to
    float32 (:func:`round_dd`): +-inf only where the exact sum overflows (a float64 sum of max,
    2^103, -2^60 lands on the overflow midpoint), and every column at its own precision. (The
    counts in a walk of their own: summed beside the sums, their tiles cost the forward kernels
    up to 68 more sm_90 registers and 104 B of stack.)"""
    e_wide = _wide_exp(L)
    s_wide, s_up = exp2i(-e_wide), exp2i(e_wide)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    if COUNTS:
        o_c = tl.arange(0, 1)
    else:
        o_c = o_d
    b_acc = tl.zeros((FIX_R, o_c.shape[0]), dtype=tl.float64)
    b_err = tl.zeros((FIX_R, o_c.shape[0]), dtype=tl.float64)
    b_tail = tl.zeros((FIX_R, o_c.shape[0]), dtype=tl.float64)
    for s0 in range(0, N, FIX_SCAN):  # (spans of rows, each read once for the group's codes)
        if _group_in_rows(p_codes, s0, N, lvl, stride_on, stride_ol, k0, FIX_R, FIX_SCAN):
            for m0 in range(s0, tl.minimum(s0 + FIX_SCAN, N), FIX_M):  # (the last span: to N)
                o_m = m0 + tl.arange(0, FIX_M).to(tl.int64)
                m_m = o_m < N
                # (the codes: other programs searched and stored them) only a block that holds a row of
                # the group walks its rows to the level
                b_idx = tl.load(p_codes + o_m * stride_on + lvl * stride_ol, mask=m_m, other=0, cache_modifier=".cg")
                m_grp = m_m & (b_idx >= k0) & (b_idx < k0 + FIX_R)
                if tl.max(m_grp.to(tl.int32), axis=0) > 0:
                    m_md = m_m[:, None] & m_d[None, :]
                    if HAS_W:
                        b_w = tl.load(p_w + o_m, mask=m_m, other=0.0).to(tl.float32)
                        b_sw = tl.load(p_sw + o_m, mask=m_m, other=0.0).to(tl.float32)
                    else:
                        b_w = tl.where(m_m, 1.0, 0.0)
                        b_sw = b_w
                    m_live = m_grp & (b_w != 0) & (b_w == b_w) & (tl.abs(b_w) < float("inf"))
                    b_r = tl.load(p_x + o_m[:, None] * stride_xn + o_d[None, :] * stride_xd, mask=m_md, other=0.0)
                    b_r = b_r.to(tl.float32)
                    b_wide = o_m < 0
                    for l2 in range(0, lvl):
                        b_i2 = tl.load(p_codes + o_m * stride_on + l2 * stride_ol, mask=m_m, other=0,
                                       cache_modifier=".cg")
                        b_sel = tl.load(p_cb + l2 * stride_cl + b_i2[:, None] * stride_ck + o_d[None, :] * stride_cd,
                                        mask=m_md, other=0.0).to(tl.float32)
                        b_r, b_wide = _held_wide(b_r, b_sel, b_wide, s_wide, s_up)
                    m_use = m_live & _row_below(b_r, stat_lim) & ~b_wide
                    if COUNTS:
                        b_t = tl.where(m_use, b_sw.to(tl.float64), 0.0)[:, None]
                    else:
                        b_t = tl.where(m_use[:, None] & m_md, b_sw.to(tl.float64)[:, None] * b_r.to(tl.float64), 0.0)
                    b_acc, b_err, b_tail = add_rows_by_index_dd(b_acc, b_err, b_tail, b_t, b_idx, k0, FIX_R)
    o_k = (k0 + tl.arange(0, FIX_R) + lvl * K).to(tl.int64)
    n_c = 1 if COUNTS else D
    tl.store(p_out + o_k[:, None] * n_c + o_c[None, :], round_dd(b_acc, b_err, b_tail, False),
             mask=m_fix[:, None] & (o_c < n_c)[None, :])


@triton.jit(noinline=True)
def _stats_fixup(
    p_x, p_cb, p_codes, p_w, p_sw, p_counts, p_sums, N, K, D, L, stat_lim,
    stride_xn, stride_xd, stride_cl, stride_ck, stride_cd, stride_on, stride_ol,
    HAS_W: tl.constexpr, FIX_M: tl.constexpr, FIX_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Run by the last program of a forward launch with statistics in which some term ``w r_l``
    or weight ``w`` exceeded ``BIG_T`` (rare: inputs within a factor ~N of float32's range): the
    codes whose float32 sum or count is not finite (it overflowed on the way) or reached 2^127
    (it could stay at max where the exact sum overflows: max, 2^102, 2^102) summed again in float64
    (:func:`_stats_fix_codes`), ``FIX_R`` codes of a level at a time. One program reads every
    row's code at the level once per such group of codes, and walks to the level the row blocks
    that hold one of them: milliseconds at a million rows for a few codes, longer for many
    (inputs within a factor ~N of float32's range on many codes), only for such inputs."""
    o_r = tl.arange(0, FIX_R)
    for lvl in range(L):
        for k0 in range(0, K, FIX_R):
            m_k = k0 + o_r < K
            m_fix = nonfinite_rows(p_sums + (lvl * K + k0).to(tl.int64) * D, m_k, D, FIX_R, BLOCK_D, TOP32)
            if tl.max(m_fix.to(tl.int32), axis=0) > 0:
                _stats_fix_codes(p_x, p_cb, p_codes, p_w, p_sw, p_sums, N, K, D, L, lvl, k0, m_fix, stat_lim,
                                 stride_xn, stride_xd, stride_cl, stride_ck, stride_cd, stride_on, stride_ol,
                                 HAS_W, False, FIX_M, FIX_R, BLOCK_D)
            m_fix = nonfinite_rows(p_counts + lvl * K + k0, m_k, 1, FIX_R, 1, TOP32)
            if tl.max(m_fix.to(tl.int32), axis=0) > 0:
                _stats_fix_codes(p_x, p_cb, p_codes, p_w, p_sw, p_counts, N, K, D, L, lvl, k0, m_fix, stat_lim,
                                 stride_xn, stride_xd, stride_cl, stride_ck, stride_cd, stride_on, stride_ol,
                                 HAS_W, True, FIX_M, FIX_R, BLOCK_D)


@triton.jit
def _last_program_flagged(p_flag):
    """At the end of every program of an atomic launch with a fix-up (``p_flag``: the flag a
    term beyond ``BIG_T`` set, then the count of programs done, zero-filled): count this one,
    and return whether it is the last and the flag is set. Every thread's atomics and flag
    stores come before the count (a block barrier, then acq_rel: as a grid barrier orders
    them), so the program that counts last sees every other program's sums, flag and codes; the
    others' flag load is predicated off."""
    tl.debug_barrier()
    n_done = tl.atomic_add(p_flag + 1, 1, sem="acq_rel", scope="gpu")
    last = n_done == tl.num_programs(0) * tl.num_programs(1) - 1
    return tl.load(p_flag, mask=last, other=0, cache_modifier=".cg") > 0


@triton.jit
def _stats_fixup_if_last(
    p_x, p_cb, p_codes, p_w, p_sw, p_counts, p_sums, p_state, N, K, D, L, stat_lim,
    stride_xn, stride_xd, stride_cl, stride_ck, stride_cd, stride_on, stride_ol,
    HAS_W: tl.constexpr, FIX_M: tl.constexpr, FIX_R: tl.constexpr, FIX_D: tl.constexpr,
):
    """The end of every program of a forward launch with statistics (``p_state``: skipped
    ``(L,)``, then the flag and the count): the last one, if some term or weight beyond ``BIG_T``
    set the flag, runs :func:`_stats_fixup` (:func:`_last_program_flagged`)."""
    if _last_program_flagged(p_state + L):
        _stats_fixup(p_x, p_cb, p_codes, p_w, p_sw, p_counts, p_sums, N, K, D, L, stat_lim,
                     stride_xn, stride_xd, stride_cl, stride_ck, stride_cd, stride_on, stride_ol,
                     HAS_W, FIX_M, FIX_R, FIX_D)


@autotune(configs=_configs("residual_quantize", maxnreg=255), key=["D", "K", "L", "PRECISION", *_FLAGS],
          prune_configs_by={"early_config_prune": _prune_register_configs}, reset_to_zero=_ATOMIC_OUTPUTS)
@triton.jit
def _residual_quantize_fwd_kernel(
    p_x, p_cb, p_q, p_codes, p_w, p_sw, p_loss, p_counts, p_sums, p_skip, p_slot, p_cand, p_cand_ok,
    N, K, D, L, S, stat_lim, BIG_T,
    stride_xn, stride_xd, stride_cl, stride_ck, stride_cd,
    stride_qn, stride_qd, stride_on, stride_ol,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    SEARCH: tl.constexpr, HAS_W: tl.constexpr, LOSS: tl.constexpr, STATS: tl.constexpr, CAND: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, BF16_RNE: tl.constexpr,
    FIX_M: tl.constexpr, FIX_R: tl.constexpr, FIX_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    o_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < N
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    m_md = m_m[:, None] & m_d[None, :]
    o_l = tl.arange(0, BLOCK_L)
    m_ml = m_m[:, None] & (o_l[None, :] < L)
    p_xt = p_x + o_m[:, None] * stride_xn + o_d[None, :] * stride_xd

    b_r = tl.load(p_xt, mask=m_md, other=0.0).to(tl.float32)
    x_bad = tl.max(tl.where(_row_finite(b_r), 0, 1), axis=0)  # a block holding a non-finite input
    b_q = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if SEARCH:
        b_codes = tl.zeros((BLOCK_M, BLOCK_L), dtype=tl.int64)
    else:
        b_codes = tl.load(p_codes + o_m[:, None] * stride_on + o_l[None, :] * stride_ol, mask=m_ml, other=0)
    if HAS_W:
        b_w = tl.load(p_w + o_m, mask=m_m, other=0.0).to(tl.float32)
        b_sw = b_w
        if STATS:  # (the statistics carry the weights as given)
            b_sw = tl.load(p_sw + o_m, mask=m_m, other=0.0).to(tl.float32)
    else:
        b_w = tl.where(m_m, 1.0, 0.0)
        b_sw = b_w
    if CAND:
        b_slot = tl.load(p_slot + o_m, mask=m_m, other=-1)
    else:
        b_slot = tl.full((BLOCK_M,), -1, dtype=tl.int32)
    b_loss = tl.zeros((BLOCK_L,), dtype=tl.float64)
    # rows whose float32 residual overflowed are held at scale 2^-E (WIDE; none in ordinary blocks)
    e_wide = _wide_exp(L)
    s_wide, s_up = exp2i(-e_wide), exp2i(e_wide)
    b_wide = o_m < 0
    for lvl in range(L):
        p_cbl = p_cb + lvl * stride_cl
        m_huge = b_wide  # a row that a code can make overflow (beyond 2^103), or held scaled
        if SEARCH:
            # the dot operand: the residual in the codebook dtype (a no-op for float32)
            b_rd = _dot_operand(b_r, p_cb, DOT_FP32, BF16_RNE)
            b_min, b_idx, b_first = _search_level(b_rd, p_cbl, o_d, m_d, K, stride_ck, stride_cd, K, 1.0,
                                                  PRECISION, DOT_FP32, False, BLOCK_M, BLOCK_K)
            m_rfin = _row_finite(b_r)
            if p_cb.dtype.element_ty == tl.float16:  # (its scores neither overflow nor underflow)
                m_wide = m_m & m_rfin & ((tl.max(tl.abs(b_r), axis=1) > FP16_WIDE_ROW) | (b_idx < 0))
                if tl.max(m_wide.to(tl.int32), axis=0) > 0:
                    b_rd = _dot_operand(b_r * FP16_WIDE_SCALE, p_cb, DOT_FP32, BF16_RNE)
                    _, b_idx1, _ = _search_level(b_rd, p_cbl, o_d, m_d, K, stride_ck, stride_cd, K, 1.0,
                                                 PRECISION, DOT_FP32, False, BLOCK_M, BLOCK_K, FP16_WIDE_DOT_SCALE)
                    b_idx = tl.where(m_wide & (b_idx1 >= 0), b_idx1, b_idx)
            else:
                b_rm = tl.max(tl.abs(b_r), axis=1)
                m_huge = m_huge | (m_m & (b_rm >= OVERFLOW_ROW))
                m_big, m_tiny = _rescue_rows(b_rm, m_m & m_rfin, b_idx, b_min)
                # the rescue passes, each only for a block that holds such a row: the big rows on
                # operands scaled by 2^-96 (a held row's by 2^(E - 96)), the tiny ones by 2^96
                if tl.max(m_big.to(tl.int32), axis=0) > 0:
                    b_rs = exp2i(tl.where(b_wide, e_wide - RESCALE_EXP, -RESCALE_EXP))
                    b_rd = _dot_operand(b_r * b_rs[:, None], p_cb, DOT_FP32, BF16_RNE)
                    _, b_idx1, _ = _search_level(b_rd, p_cbl, o_d, m_d, K, stride_ck, stride_cd, K,
                                                 RESCALE_DOWN, PRECISION, DOT_FP32, True, BLOCK_M, BLOCK_K)
                    b_idx = tl.where(m_big, b_idx1, b_idx)
                if tl.max(m_tiny.to(tl.int32), axis=0) > 0:
                    b_rd = _dot_operand(b_r * RESCALE_UP, p_cb, DOT_FP32, BF16_RNE)
                    _, b_idx1, _ = _search_level(b_rd, p_cbl, o_d, m_d, K, stride_ck, stride_cd, K,
                                                 RESCALE_UP, PRECISION, DOT_FP32, True, BLOCK_M, BLOCK_K)
                    b_idx = tl.where(m_tiny & (b_idx1 >= 0), b_idx1, b_idx)
            # nothing chosen (scores all NaN or +inf), or a residual that is not finite (an infinite
            # entry: every distance is +inf, though a score may come out -inf or NaN by the order
            # of the dot's sums): the first finite code (none: 0)
            b_idx = tl.where((b_idx < 0) | ~m_rfin, b_first % K, b_idx).to(tl.int64)
            b_codes = tl.where(o_l[None, :] == lvl, b_idx[:, None], b_codes)
        else:
            b_idx = tl.sum(tl.where(o_l[None, :] == lvl, b_codes, 0), axis=1)
            if p_cb.dtype.element_ty != tl.float16:
                m_huge = m_huge | (m_m & (tl.max(tl.abs(b_r), axis=1) >= OVERFLOW_ROW))
        b_sel = tl.load(p_cbl + b_idx[:, None] * stride_ck + o_d[None, :] * stride_cd, mask=m_md, other=0.0)
        b_sel = b_sel.to(tl.float32)
        if STATS or CAND:
            _level_outputs(b_r, b_sel, b_wide, b_idx, b_w, b_sw, m_m, o_d, m_d, lvl, b_slot, p_counts, p_sums, p_skip,
                           p_cand, p_cand_ok, K, D, L, S, stat_lim, BIG_T, STATS, CAND)
        # r - c overflows only where |r| >= 2^103 (|c| <= float32's max; a float16 code never does)
        if tl.max(m_huge.to(tl.int32), axis=0) > 0:
            b_r, b_wide = _held_wide(b_r, b_sel, b_wide, s_wide, s_up)
        else:
            b_r = b_r - b_sel
        b_q += b_sel
        if LOSS:  # (a held row's |r|^2 at scale 1: times 2^2E)
            b_sq = _loss_rows(b_r, b_w, m_m)
            b_sq = tl.where(b_wide, b_sq * (s_up.to(tl.float64) * s_up.to(tl.float64)), b_sq)
            b_loss = tl.where(o_l == lvl, b_loss + tl.sum(b_sq, axis=0), b_loss)
    # the exact range: only a block whose float32 sum is not finite sums its codes again in float64
    if tl.max(tl.max((b_q - b_q != 0).to(tl.int32), axis=1), axis=0) > 0:
        b_q = _exact_code_sum(p_cb, b_codes, b_q, o_l, o_d, m_md, L, stride_cl, stride_ck, stride_cd)
    if x_bad > 0:  # NaN where the input is not finite, as the straight-through x + (q - x) gives
        b_q = _nan_where_input_is(p_xt, m_md, b_q)

    if HAS_W:  # rows of weight 0 pass their input through
        b_q = tl.where((b_w != 0)[:, None], b_q, tl.load(p_xt, mask=m_md, other=0.0).to(tl.float32))
    if BF16_RNE:
        b_q = round_bf16(b_q)
    tl.store(p_q + o_m[:, None] * stride_qn + o_d[None, :] * stride_qd, b_q.to(p_q.dtype.element_ty), mask=m_md)
    if SEARCH:
        tl.store(p_codes + o_m[:, None] * stride_on + o_l[None, :] * stride_ol, b_codes, mask=m_ml)
    if LOSS:
        tl.store(p_loss + pid * BLOCK_L + o_l, b_loss)
    if STATS:
        _stats_fixup_if_last(p_x, p_cb, p_codes, p_w, p_sw, p_counts, p_sums, p_skip, N, K, D, L, stat_lim,
                             stride_xn, stride_xd, stride_cl, stride_ck, stride_cd, stride_on, stride_ol,
                             HAS_W, FIX_M, FIX_R, FIX_D)


@autotune(configs=_configs("residual_quantize_chunked"), key=["D", "K", "L", "PRECISION", *_FLAGS],
          prune_configs_by={"early_config_prune": _prune_chunked_configs}, reset_to_zero=_ATOMIC_OUTPUTS)
@triton.jit
def _residual_quantize_fwd_chunked_kernel(
    p_x, p_cb, p_q, p_codes, p_w, p_sw, p_loss, p_counts, p_sums, p_skip, p_slot, p_cand, p_cand_ok, p_ws,
    N, K, D, L, S, stat_lim, BIG_T,
    stride_xn, stride_xd, stride_cl, stride_ck, stride_cd,
    stride_qn, stride_qd, stride_on, stride_ol, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    SEARCH: tl.constexpr, HAS_W: tl.constexpr, LOSS: tl.constexpr, STATS: tl.constexpr, CAND: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, BF16_RNE: tl.constexpr,
    FIX_M: tl.constexpr, FIX_R: tl.constexpr, FIX_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    o_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < N
    o_l = tl.arange(0, BLOCK_L)
    m_ml = m_m[:, None] & (o_l[None, :] < L)
    if HAS_W:
        b_w = tl.load(p_w + o_m, mask=m_m, other=0.0).to(tl.float32)
        b_sw = b_w
        if STATS:  # (the statistics carry the weights as given)
            b_sw = tl.load(p_sw + o_m, mask=m_m, other=0.0).to(tl.float32)
    else:
        b_w = tl.where(m_m, 1.0, 0.0)
        b_sw = b_w
    if CAND:
        b_slot = tl.load(p_slot + o_m, mask=m_m, other=-1)
    else:
        b_slot = tl.full((BLOCK_M,), -1, dtype=tl.int32)

    # residual <- x, in this program's rows of the float32 workspace
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_md = m_m[:, None] & (o_d < D)[None, :]
        b_x = tl.load(p_x + o_m[:, None] * stride_xn + o_d[None, :] * stride_xd, mask=m_md, other=0.0)
        tl.store(p_ws + o_m[:, None] * stride_wn + o_d[None, :], b_x.to(tl.float32), mask=m_md)
    tl.debug_barrier()

    if SEARCH:
        b_codes = tl.zeros((BLOCK_M, BLOCK_L), dtype=tl.int64)
    else:
        b_codes = tl.load(p_codes + o_m[:, None] * stride_on + o_l[None, :] * stride_ol, mask=m_ml, other=0)
    b_loss = tl.zeros((BLOCK_L,), dtype=tl.float64)
    # rows whose float32 residual overflowed are held at scale 2^-E, as in the register variant
    e_wide = _wide_exp(L)
    s_wide, s_up = exp2i(-e_wide), exp2i(e_wide)
    b_wide = o_m < 0
    for lvl in range(L):
        p_cbl = p_cb + lvl * stride_cl
        m_huge = b_wide  # a row that a code can make overflow (beyond 2^103), or held scaled
        if SEARCH:
            b_min, b_idx, b_first = _search_level_chunked(p_ws, o_m, m_m, stride_wn, p_cbl, K, D, stride_ck,
                                                          stride_cd, 1.0, 1.0, PRECISION, DOT_FP32, BF16_RNE, False,
                                                          BLOCK_M, BLOCK_K, BLOCK_D)
            # the rescue passes, as in the register variant
            b_rm = tl.zeros((BLOCK_M,), dtype=tl.float32)
            b_rbad = tl.zeros((BLOCK_M,), dtype=tl.int32)
            for d0 in range(0, D, BLOCK_D):
                o_d = d0 + tl.arange(0, BLOCK_D)
                b_r = tl.load(p_ws + o_m[:, None] * stride_wn + o_d[None, :],
                              mask=m_m[:, None] & (o_d < D)[None, :], other=0.0)
                b_rm = tl.maximum(b_rm, tl.max(tl.where(tl.abs(b_r) < float("inf"), tl.abs(b_r), 0.0), axis=1))
                b_rbad += tl.where(_row_finite(b_r), 0, 1)
            if p_cb.dtype.element_ty == tl.float16:
                m_wide = m_m & (b_rbad == 0) & ((b_rm > FP16_WIDE_ROW) | (b_idx < 0))
                if tl.max(m_wide.to(tl.int32), axis=0) > 0:
                    _, b_idx1, _ = _search_level_chunked(p_ws, o_m, m_m, stride_wn, p_cbl, K, D, stride_ck,
                                                         stride_cd, 1.0,
                                                         tl.full((BLOCK_M,), FP16_WIDE_SCALE, tl.float32), PRECISION,
                                                         DOT_FP32, BF16_RNE, True, BLOCK_M, BLOCK_K, BLOCK_D, False,
                                                         FP16_WIDE_DOT_SCALE)
                    b_idx = tl.where(m_wide & (b_idx1 >= 0), b_idx1, b_idx)
            else:
                m_huge = m_huge | (m_m & (b_rm >= OVERFLOW_ROW))
                m_big, m_tiny = _rescue_rows(b_rm, m_m & (b_rbad == 0), b_idx, b_min)
                if tl.max(m_big.to(tl.int32), axis=0) > 0:  # (a held row: its residual by 2^(E - 96))
                    _, b_idx1, _ = _search_level_chunked(p_ws, o_m, m_m, stride_wn, p_cbl, K, D, stride_ck,
                                                         stride_cd, RESCALE_DOWN,
                                                         exp2i(tl.where(b_wide, e_wide - RESCALE_EXP, -RESCALE_EXP)),
                                                         PRECISION, DOT_FP32, BF16_RNE, True, BLOCK_M, BLOCK_K, BLOCK_D)
                    b_idx = tl.where(m_big, b_idx1, b_idx)
                if tl.max(m_tiny.to(tl.int32), axis=0) > 0:
                    _, b_idx1, _ = _search_level_chunked(p_ws, o_m, m_m, stride_wn, p_cbl, K, D, stride_ck,
                                                         stride_cd, RESCALE_UP,
                                                         tl.full((BLOCK_M,), RESCALE_UP, tl.float32),
                                                         PRECISION, DOT_FP32, BF16_RNE, True, BLOCK_M, BLOCK_K,
                                                         BLOCK_D)
                    b_idx = tl.where(m_tiny & (b_idx1 >= 0), b_idx1, b_idx)
            b_idx = tl.where((b_idx < 0) | (b_rbad > 0), b_first % K, b_idx).to(tl.int64)  # (as above)
            b_codes = tl.where(o_l[None, :] == lvl, b_idx[:, None], b_codes)
        else:
            b_idx = tl.sum(tl.where(o_l[None, :] == lvl, b_codes, 0), axis=1)
            if p_cb.dtype.element_ty != tl.float16:  # (no row max at hand: every block checks)
                m_huge = m_m
        if STATS or CAND:  # a first sweep: is this level's residual finite (row by row)?
            b_bad = tl.zeros((BLOCK_M,), dtype=tl.int32)
            b_cbad = tl.zeros((BLOCK_M,), dtype=tl.int32)
            for d0 in range(0, D, BLOCK_D):
                o_d = d0 + tl.arange(0, BLOCK_D)
                m_md = m_m[:, None] & (o_d < D)[None, :]
                b_r = tl.load(p_ws + o_m[:, None] * stride_wn + o_d[None, :], mask=m_md, other=0.0)
                b_bad += tl.where(_row_below(b_r, stat_lim), 0, 1)
                if CAND:  # and the chosen code of a candidate row (its midpoint is finite only then)
                    b_sel = tl.load(p_cbl + b_idx[:, None] * stride_ck + o_d[None, :] * stride_cd,
                                    mask=m_md & (b_slot >= 0)[:, None], other=0.0)
                    b_cbad += tl.where(_row_finite(b_sel.to(tl.float32)), 0, 1)
            b_fin = (b_bad == 0) & ~b_wide & (b_w == b_w) & (tl.abs(b_w) < float("inf"))
            b_use = m_m & (b_w != 0) & b_fin
            if STATS:  # (a weight beyond BIG_T sets the flag: the counts, as in _level_outputs)
                tl.atomic_add(p_counts + lvl * K + b_idx, b_sw, mask=b_use, sem="relaxed")
                tl.store(p_skip + L + tl.zeros(b_idx.shape, dtype=tl.int32), 1, mask=b_use & (tl.abs(b_sw) > BIG_T))
                tl.atomic_add(p_skip + lvl, tl.sum((m_m & (b_w != 0) & ~b_fin).to(tl.int32), axis=0), sem="relaxed")
            if CAND:
                m_c = m_m & (b_slot >= 0)
                tl.store(p_cand_ok + lvl * S + b_slot, (b_use & (b_cbad == 0)).to(tl.int8), mask=m_c)
        # residual -= chosen code, chunk by chunk (statistics, candidates and loss on the way),
        # in one loop of up to three sweeps over the residual (one loop body: the rare sweeps add
        # no registers): 0, only in a block holding a row beyond 2^103 or a held row (or given
        # codes): which rows' r - c overflows (a finite residual and code), to be formed at scale
        # 2^-E instead, r 2^-E - c 2^-E, and held (see WIDE); 1: the update (a held row subtracts
        # its code at its scale); 2, only when a held row's residual is representable again: it
        # goes back to scale 1 (exact)
        b_cs = tl.where(b_wide, s_wide, 1.0)
        b_rs = tl.where(b_wide, 1.0, 1.0)
        run_check = tl.max(m_huge.to(tl.int32), axis=0) > 0
        run_back = run_check & False
        b_ovf = tl.zeros((BLOCK_M,), dtype=tl.int32)  # elements of r - c that are not finite
        b_inbad = tl.zeros((BLOCK_M,), dtype=tl.int32)  # of r and c that are not
        b_ubad = tl.zeros((BLOCK_M,), dtype=tl.int32)  # of a held row's r 2^E that are not
        m_back = o_m < 0
        m_moved = o_m < 0  # rows whose |r|^2 below is not at the scale they end the level with
        b_sq = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for sweep in range(3):
            if (sweep == 1) | ((sweep == 0) & run_check) | ((sweep == 2) & run_back):
                any_wide = tl.max(b_wide.to(tl.int32), axis=0) > 0
                for d0 in range(0, D, BLOCK_D):
                    o_d = d0 + tl.arange(0, BLOCK_D)
                    m_d = o_d < D
                    m_md = m_m[:, None] & m_d[None, :]
                    p_r = p_ws + o_m[:, None] * stride_wn + o_d[None, :]
                    b_r = tl.load(p_r, mask=m_md, other=0.0)
                    if sweep == 2:
                        tl.store(p_r, b_r * s_up, mask=m_md & m_back[:, None])
                    else:
                        b_sel = tl.load(p_cbl + b_idx[:, None] * stride_ck + o_d[None, :] * stride_cd, mask=m_md,
                                        other=0.0).to(tl.float32)
                        b_new = b_r * b_rs[:, None] - b_sel * b_cs[:, None]
                        if sweep == 0:
                            b_ovf += tl.where(_row_finite(b_new), 0, 1)
                            b_inbad += tl.where(_row_finite(b_r) & _row_finite(b_sel), 0, 1)
                        else:
                            if STATS:  # (a term beyond BIG_T sets the flag, as in _level_outputs)
                                b_t = b_sw[:, None] * b_r
                                m_t = b_use[:, None] & m_d[None, :]
                                tl.atomic_add(p_sums + (lvl * K + b_idx)[:, None] * D + o_d[None, :], b_t,
                                              mask=m_t, sem="relaxed")
                                tl.store(p_skip + L + tl.zeros(b_t.shape, dtype=tl.int32), 1,
                                         mask=m_t & (tl.abs(b_t) > BIG_T))
                            if CAND:
                                o_c = lvl * S + b_slot
                                tl.store(p_cand + o_c[:, None] * D + o_d[None, :], _midpoint(b_sel, b_r),
                                         mask=(m_m & (b_slot >= 0))[:, None] & m_d[None, :])
                            if LOSS:
                                b_sq += tl.sum(b_new * b_new, axis=1)
                            if any_wide:
                                b_ubad += tl.where(_row_finite(b_new * s_up), 0, 1)
                            tl.store(p_r, b_new, mask=m_md)
                tl.debug_barrier()
            if sweep == 0:
                m_over = m_m & (b_ovf > 0) & (b_inbad == 0)
                b_rs = tl.where(m_over, s_wide, 1.0)
                b_cs = tl.where(m_over, s_wide, b_cs)
                b_wide = b_wide | m_over
                m_moved = m_over
            if sweep == 1:
                m_back = b_wide & (b_ubad == 0)
                run_back = tl.max(m_back.to(tl.int32), axis=0) > 0
                b_wide = b_wide & ~m_back
                m_moved = m_moved | m_back
        if LOSS:
            # (a row formed again or scaled back: its |r|^2 again, below; a held row's times 2^2E)
            b_sq = tl.where(m_moved, float("inf"), b_sq)
            b_sq64 = b_sq.to(tl.float64)
            m_over = m_m & ~(b_sq < float("inf"))
            if tl.max(m_over.to(tl.int32), axis=0) > 0:  # |r|^2 overflowed float32: again, scaled
                b_rm = tl.zeros((BLOCK_M,), dtype=tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    o_d = d0 + tl.arange(0, BLOCK_D)
                    b_r = tl.load(p_ws + o_m[:, None] * stride_wn + o_d[None, :],
                                  mask=m_m[:, None] & (o_d < D)[None, :], other=0.0)
                    b_rm = tl.maximum(b_rm, tl.max(tl.abs(b_r), axis=1))
                b_s = exp2i(-pow2_exponent(b_rm))
                b_q = tl.zeros((BLOCK_M,), dtype=tl.float32)
                for d0 in range(0, D, BLOCK_D):
                    o_d = d0 + tl.arange(0, BLOCK_D)
                    b_r = tl.load(p_ws + o_m[:, None] * stride_wn + o_d[None, :],
                                  mask=m_m[:, None] & (o_d < D)[None, :], other=0.0) * b_s[:, None]
                    b_q += tl.sum(b_r * b_r, axis=1)
                m_over = m_over & (b_rm < float("inf"))  # (an infinite residual's loss is +inf)
                b_sq64 = tl.where(m_over, _sq_rows64(b_sq, b_rm, b_q), b_sq64)
            b_sq64 = tl.where(b_wide, b_sq64 * (s_up.to(tl.float64) * s_up.to(tl.float64)), b_sq64)
            b_sq64 = tl.where(m_m & (b_w != 0), b_w.to(tl.float64) * b_sq64, 0.0)
            b_loss = tl.where(o_l == lvl, b_loss + tl.sum(b_sq64, axis=0), b_loss)

    # quantized = sum of the chosen codes, in level order, float32 (float64 where that is not finite)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_md = m_m[:, None] & (o_d < D)[None, :]
        b_q = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for lvl in range(L):
            b_idx = tl.sum(tl.where(o_l[None, :] == lvl, b_codes, 0), axis=1)
            b_sel = tl.load(p_cb + lvl * stride_cl + b_idx[:, None] * stride_ck + o_d[None, :] * stride_cd,
                            mask=m_md, other=0.0)
            b_q += b_sel.to(tl.float32)
        if tl.max(tl.max((b_q - b_q != 0).to(tl.int32), axis=1), axis=0) > 0:  # the exact range, as above
            b_q = _exact_code_sum(p_cb, b_codes, b_q, o_l, o_d, m_md, L, stride_cl, stride_ck, stride_cd)
        # NaN where the input is not finite, as in the register variant; x is read again here
        # for every block (a flag carried from the first sweep cost ptxas registers it spilled)
        b_x = tl.load(p_x + o_m[:, None] * stride_xn + o_d[None, :] * stride_xd, mask=m_md, other=0.0)
        b_q = tl.where(tl.abs(b_x.to(tl.float32)) < float("inf"), b_q, float("nan"))
        if HAS_W:
            b_q = tl.where((b_w != 0)[:, None], b_q, b_x.to(tl.float32))
        if BF16_RNE:
            b_q = round_bf16(b_q)
        tl.store(p_q + o_m[:, None] * stride_qn + o_d[None, :] * stride_qd, b_q.to(p_q.dtype.element_ty), mask=m_md)
    if SEARCH:
        tl.store(p_codes + o_m[:, None] * stride_on + o_l[None, :] * stride_ol, b_codes, mask=m_ml)
    if LOSS:
        tl.store(p_loss + pid * BLOCK_L + o_l, b_loss)
    if STATS:
        _stats_fixup_if_last(p_x, p_cb, p_codes, p_w, p_sw, p_counts, p_sums, p_skip, N, K, D, L, stat_lim,
                             stride_xn, stride_xd, stride_cl, stride_ck, stride_cd, stride_on, stride_ol,
                             HAS_W, FIX_M, FIX_R, FIX_D)


@triton.jit
def _bwd_rows(
    o_m, m_m, o_d, m_d,
    p_x, p_cb, p_codes, p_w, p_g, p_gc, p_ge, p_dx, p_dcb, p_state,
    N, K, D, L,
    stride_xn, stride_xd, stride_cl, stride_ck, stride_cd, stride_on, stride_ol,
    stride_gn, stride_gd, stride_dn, stride_dd,
    HAS_W: tl.constexpr, HAS_G: tl.constexpr, HAS_GC: tl.constexpr, HAS_GE: tl.constexpr, HAS_DX: tl.constexpr,
    ROTATE: tl.constexpr, EPS_N: tl.constexpr, EPS_S: tl.constexpr, BIG_T, WIDE: tl.constexpr,
):
    """The backward of the rows ``o_m`` (columns ``o_d``): codebook terms added, ``dx`` stored.

    ``WIDE=False``, float32: the residual ``r_{l+1} = r_l - c_l``, ``dx = 2 w sum_l gc_l r_{l+1}``
    (plus ``g``, rotated with ``ROTATE``), codebook terms ``2 ge_l w (c_l - r_l)``. Where a float32
    residual, commitment term or sum of codes is not finite (x ~ -3e38 quantized to a code ~
    3e38) the exact gradient may still be representable: such a row is left out of the store
    (and its non-finite codebook terms out of the atomics) and flagged. Returns the flags.

    ``WIDE=True`` (a flagged row, one at a time): the same again, and in float64, where the
    residuals of float32 values are exact (but for exponents more than 29 apart); each element
    float32 could not give is the float64 value rounded once (finite wherever the exact one
    is): ``dx``'s commitment part, the sum of the codes, and the codebook terms left out.

    A codebook term beyond ``BIG_T`` (only such terms can make a float32 partial sum overflow,
    see ``atomic_overflow_bound``) sets the flag ``p_state[0]``: :func:`_dcb_fixup` then sums
    again the codes whose float32 sum is not finite. (A predicated store per element, off in the
    ordinary case: nothing is carried across the levels.)"""
    m_md = m_m[:, None] & m_d[None, :]
    b_x = tl.load(p_x + o_m[:, None] * stride_xn + o_d[None, :] * stride_xd, mask=m_md, other=0.0).to(tl.float32)
    if HAS_W:
        b_w = tl.load(p_w + o_m, mask=m_m, other=0.0).to(tl.float32)
    else:
        b_w = tl.where(m_m, 1.0, 0.0)
    m_live = m_m & (b_w != 0)
    m_lmd = m_live[:, None] & m_d[None, :]
    b_r = b_x
    b_acc = tl.zeros(b_x.shape, dtype=tl.float32)
    b_q = tl.zeros(b_x.shape, dtype=tl.float32)
    if WIDE:
        b_r64 = b_x.to(tl.float64)
        b_acc64 = tl.zeros(b_x.shape, dtype=tl.float64)
        b_q64 = tl.zeros(b_x.shape, dtype=tl.float64)
    for lvl in range(L):
        b_idx = tl.load(p_codes + o_m * stride_on + lvl * stride_ol, mask=m_m, other=0)
        p_c = p_cb + lvl * stride_cl + b_idx[:, None] * stride_ck + o_d[None, :] * stride_cd
        b_c = tl.load(p_c, mask=m_md, other=0.0).to(tl.float32)
        b_new = b_r - b_c
        # (c - r = -(r - c) exactly: where the new residual is not finite neither is this term)
        m_fin = tl.abs(b_new) < float("inf")
        if WIDE:
            b_c64 = b_c.to(tl.float64)
            if HAS_GE:
                b_ge = tl.load(p_ge + lvl)
                b_t64 = (2.0 * b_ge).to(tl.float64) * (b_w.to(tl.float64)[:, None] * (b_c64 - b_r64))
                b_t = tl.where(m_fin, 0.0, b_t64.to(tl.float32))
                # (a finite term only: an infinite one, from an infinite x, makes its code's sum
                # +-inf or NaN as the exact sum is, and needs no fix-up)
                tl.store(p_state + tl.zeros(b_t.shape, dtype=tl.int32), 1,
                         mask=m_lmd & (tl.abs(b_t) > BIG_T) & (tl.abs(b_t64) < float("inf")))
                tl.atomic_add(p_dcb + (lvl * K + b_idx)[:, None] * D + o_d[None, :], b_t, mask=m_lmd, sem="relaxed")
            b_r64 = b_r64 - b_c64
            if HAS_GC:
                b_acc64 += tl.load(p_gc + lvl).to(tl.float64) * b_r64
            if ROTATE:
                b_q64 += b_c64
        elif HAS_GE:
            b_ge = tl.load(p_ge + lvl)
            # (+0.0 added for the terms the float64 row adds: no per-element mask, which costs
            # registers. A term beyond BIG_T sets the flag: a predicated store, off in the
            # ordinary case)
            b_t = tl.where(m_fin, (2.0 * b_ge) * (b_w[:, None] * (b_c - b_r)), 0.0)
            tl.store(p_state + tl.zeros(b_t.shape, dtype=tl.int32), 1, mask=m_lmd & (tl.abs(b_t) > BIG_T))
            tl.atomic_add(p_dcb + (lvl * K + b_idx)[:, None] * D + o_d[None, :], b_t, mask=m_lmd, sem="relaxed")
        b_r = b_new
        if HAS_GC:
            b_acc += tl.load(p_gc + lvl) * b_r
        if ROTATE:
            b_q += b_c
    b_dx = tl.where(m_live[:, None], (2.0 * b_w)[:, None] * b_acc, 0.0)
    if WIDE:
        b_dx = tl.where(m_lmd & ~(tl.abs(b_dx) < float("inf")),
                        ((2.0 * b_w).to(tl.float64)[:, None] * b_acc64).to(tl.float32), b_dx)
        if ROTATE:
            b_q = tl.where(b_q - b_q == 0, b_q, b_q64.to(tl.float32))
    if HAS_DX and HAS_G:
        b_g = tl.load(p_g + o_m[:, None] * stride_gn + o_d[None, :] * stride_gd, mask=m_md, other=0.0).to(tl.float32)
        if ROTATE:  # (the whole row in this block; rows of weight 0 pass g through)
            b_g = tl.where(m_live[:, None], rotation_grad_rows(b_x, b_q, b_g, EPS_N, EPS_S), b_g)
        b_dx += b_g
    # The rows to do again: a non-finite residual stays non-finite through the later levels and
    # makes the commitment term (gc r: inf or NaN) non-finite, a non-finite sum of the codes the
    # rotated gradient: a row whose dx is not finite is flagged (rows holding NaN or inf too,
    # and keep their NaN / inf); without a commitment gradient, the last residual tells
    if HAS_DX:
        m_wide = ~(tl.abs(b_dx) < float("inf"))
        if HAS_GE and not HAS_GC:
            m_wide = m_wide | ~(tl.abs(b_r) < float("inf"))
    else:
        m_wide = ~(tl.abs(b_r) < float("inf"))
    m_row = m_live & (tl.max((m_wide & m_d[None, :]).to(tl.int32), axis=1) > 0)
    if HAS_DX:
        m_st = m_md
        if not WIDE:
            m_st = m_md & ~m_row[:, None]
        tl.store(p_dx + o_m[:, None] * stride_dn + o_d[None, :] * stride_dd, b_dx.to(p_dx.dtype.element_ty), mask=m_st)
    return m_row


@triton.jit
def _dcb_fix_codes(
    p_x, p_cb, p_codes, p_w, p_ge, p_dcb, N, K, D, lvl, k0, m_fix,
    stride_xn, stride_xd, stride_cl, stride_ck, stride_cd, stride_on, stride_ol,
    HAS_W: tl.constexpr, FIX_M: tl.constexpr, FIX_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """The codebook gradient of codes ``k0 + j`` of level ``lvl`` (``m_fix``) again, in float64:
    ``BLOCK_D`` columns at a time, every row (``FIX_M`` at a time) walked to that level in
    float64 (the residuals of float32 values are exact there, but for exponents more than 29
    apart), the terms ``2 ge_l w (c - r_l)`` in float64 and summed in float64, each sum rounded
    once to float32 (+-inf only where the exact sum overflows, NaN where a term is NaN)."""
    o_r = tl.arange(0, FIX_R)
    b_ge = (2.0 * tl.load(p_ge + lvl)).to(tl.float64)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_acc = tl.zeros((FIX_R, BLOCK_D), dtype=tl.float64)
        for s0 in range(0, N, FIX_SCAN):  # (spans of rows, each read once for the group's codes)
            if _group_in_rows(p_codes, s0, N, lvl, stride_on, stride_ol, k0, FIX_R, FIX_SCAN):
                for m0 in range(s0, tl.minimum(s0 + FIX_SCAN, N), FIX_M):  # (the last span: to N)
                    o_m = m0 + tl.arange(0, FIX_M).to(tl.int64)
                    m_m = o_m < N
                    m_md = m_m[:, None] & m_d[None, :]
                    if HAS_W:
                        b_w = tl.load(p_w + o_m, mask=m_m, other=0.0).to(tl.float64)
                    else:
                        b_w = tl.where(m_m, 1.0, 0.0).to(tl.float64)
                    b_idx = tl.load(p_codes + o_m * stride_on + lvl * stride_ol, mask=m_m, other=0)
                    m_use = m_m & (b_w != 0) & (b_idx >= k0) & (b_idx < k0 + FIX_R)
                    if tl.max(m_use.to(tl.int32), axis=0) > 0:
                        b_r = tl.load(p_x + o_m[:, None] * stride_xn + o_d[None, :] * stride_xd, mask=m_md, other=0.0)
                        b_r = b_r.to(tl.float32).to(tl.float64)
                        for l2 in range(0, lvl):
                            b_i2 = tl.load(p_codes + o_m * stride_on + l2 * stride_ol, mask=m_m, other=0)
                            b_r -= tl.load(p_cb + l2 * stride_cl + b_i2[:, None] * stride_ck + o_d[None, :] * stride_cd,
                                           mask=m_md, other=0.0).to(tl.float32).to(tl.float64)
                        b_c = tl.load(p_cb + lvl * stride_cl + b_idx[:, None] * stride_ck + o_d[None, :] * stride_cd,
                                      mask=m_md, other=0.0).to(tl.float32).to(tl.float64)
                        b_t = tl.where(m_use[:, None] & m_md, b_ge * (b_w[:, None] * (b_c - b_r)), 0.0)
                        b_acc = add_rows_by_index(b_acc, b_t, b_idx, k0, FIX_R)
        tl.store(p_dcb + (k0 + o_r + lvl * K).to(tl.int64)[:, None] * D + o_d[None, :], b_acc.to(tl.float32),
                 mask=m_fix[:, None] & m_d[None, :])


@triton.jit(noinline=True)
def _dcb_fixup(
    p_x, p_cb, p_codes, p_w, p_ge, p_dcb, N, K, D, L,
    stride_xn, stride_xd, stride_cl, stride_ck, stride_cd, stride_on, stride_ol,
    HAS_W: tl.constexpr, FIX_M: tl.constexpr, FIX_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Run by the last program of a backward launch in which some codebook term exceeded
    ``BIG_T`` (rare: inputs within a factor ~N of float32's range): the codes whose float32 sum
    is not finite (it overflowed on the way) or reached 2^127 summed again in float64 (:func:`_dcb_fix_codes`),
    ``FIX_R`` codes of a level at a time. The other codes keep their float32 sums (no partial
    sum of theirs overflowed)."""
    o_r = tl.arange(0, FIX_R)
    for lvl in range(L):
        for k0 in range(0, K, FIX_R):
            m_fix = nonfinite_rows(p_dcb + (lvl * K + k0).to(tl.int64) * D, k0 + o_r < K, D, FIX_R, BLOCK_D,
                                   TOP32)
            if tl.max(m_fix.to(tl.int32), axis=0) > 0:
                _dcb_fix_codes(p_x, p_cb, p_codes, p_w, p_ge, p_dcb, N, K, D, lvl, k0, m_fix,
                               stride_xn, stride_xd, stride_cl, stride_ck, stride_cd, stride_on, stride_ol,
                               HAS_W, FIX_M, FIX_R, BLOCK_D)


@triton.jit
def _residual_quantize_bwd_kernel(
    p_x, p_cb, p_codes, p_w, p_g, p_gc, p_ge, p_dx, p_dcb, p_state,
    N, K, D, L, BIG_T,
    stride_xn, stride_xd, stride_cl, stride_ck, stride_cd, stride_on, stride_ol,
    stride_gn, stride_gd, stride_dn, stride_dd,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_W: tl.constexpr, HAS_G: tl.constexpr, HAS_GC: tl.constexpr, HAS_GE: tl.constexpr, HAS_DX: tl.constexpr,
    ROTATE: tl.constexpr, EPS_N: tl.constexpr, EPS_S: tl.constexpr, FIX_M: tl.constexpr, FIX_R: tl.constexpr,
    FIX_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    o_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    args = (p_x, p_cb, p_codes, p_w, p_g, p_gc, p_ge, p_dx, p_dcb, p_state, N, K, D, L,
            stride_xn, stride_xd, stride_cl, stride_ck, stride_cd, stride_on, stride_ol,
            stride_gn, stride_gd, stride_dn, stride_dd)
    m_row = _bwd_rows(o_m, o_m < N, o_d, o_d < D, *args,
                      HAS_W, HAS_G, HAS_GC, HAS_GE, HAS_DX, ROTATE, EPS_N, EPS_S, BIG_T, False)
    # the rows float32 could not give, one at a time in float64 after the block is done (rare:
    # nothing of the block's tiles is live here, so the float64 path costs the common one no
    # registers)
    if tl.max(m_row.to(tl.int32), axis=0) > 0:
        o_1 = tl.arange(0, 1)
        for i in range(BLOCK_M):
            if tl.sum(tl.where(tl.arange(0, BLOCK_M) == i, m_row.to(tl.int32), 0), axis=0) > 0:
                o_i = pid * BLOCK_M + i + o_1
                _bwd_rows(o_i, o_i < N, o_d, o_d < D, *args,
                          HAS_W, HAS_G, HAS_GC, HAS_GE, HAS_DX, ROTATE, EPS_N, EPS_S, BIG_T, True)
    if HAS_GE:  # (p_state: the flag, the count)
        if _last_program_flagged(p_state):
            _dcb_fixup(p_x, p_cb, p_codes, p_w, p_ge, p_dcb, N, K, D, L,
                       stride_xn, stride_xd, stride_cl, stride_ck, stride_cd, stride_on, stride_ol,
                       HAS_W, FIX_M, FIX_R, FIX_D)


def _x_rows_for_compiler(x: torch.Tensor) -> torch.Tensor:
    """``x (N, D)`` as the forward kernel can be compiled for it by triton 3.6 (the GPU image's):
    its layout pass fails ("operand does not dominate this use") where the rows of ``x`` are not
    unit-stride (``stride(1) != 1``: read from a contiguous copy) or where Triton specialises the
    row stride to the constant 1 (``D == 1`` and contiguous, or, found by the edge compile sweep,
    ``D == 1`` with a column stride other than 1: read from a copy whose rows are two elements
    apart). Both copies are small or rare; triton 3.8 compiles every case."""
    N, D = x.shape
    if D > 1 and x.stride(1) != 1:
        return x.contiguous()
    if D == 1 and (x.stride(0) == 1 or x.stride(1) != 1):  # (and the column stride, D == 1 too)
        return torch.empty((N, 2), dtype=x.dtype, device=x.device)[:, :1].copy_(x)
    return x


def _codebooks_for_compiler(codebooks: torch.Tensor) -> torch.Tensor:
    """``codebooks (L, K, D)`` as the forward kernel can be compiled for them by triton 3.6: the
    same layout-pass failure as :func:`_x_rows_for_compiler` where the codes are not unit-stride
    (``stride(2) != 1``: a transposed or strided view, ``D == 1`` too; float32's exact search,
    found by the edge compile sweep, ``tests/_cuda_compile_worker.py --edges``). Read from a
    contiguous copy (``L K D`` elements, small next to ``x``; modules pass contiguous codebooks:
    no copy). (``clone``: ``contiguous()`` keeps a size-1 dimension's stride.)"""
    if codebooks.stride(2) != 1:
        return codebooks.clone(memory_format=torch.contiguous_format)
    return codebooks


@launcher
def residual_quantize_fwd(
    x: torch.Tensor,
    codebooks: torch.Tensor,
    max_register_d: int = MAX_REGISTER_D,
    *,
    weights: torch.Tensor | None = None,
    codes: torch.Tensor | None = None,
    loss: bool = False,
    stats: bool = False,
    slots: torch.Tensor | None = None,
    num_slots: int = 0,
    stat_limit: float = float("inf"),
    stat_weights: torch.Tensor | None = None,
    allow_tf32: bool = False,
):
    """``(N, D), (L, K, D) -> quantized (N, D) in x's dtype, codes (N, L) int64`` and, by request:

    * ``weights`` ``(N,)`` float32: per-row weights (rows of weight 0: ``quantized`` is ``x``);
      ``stat_weights`` ``(N,)`` float32, zero where ``weights`` are: the weights the
      statistics carry instead (the op scales ``weights`` for the losses and passes the given
      ones here; default ``weights``);
    * ``codes`` ``(N, L)`` int64 given: no search, they are gathered (and returned as is);
    * ``loss``: ``level_sq (L,)`` float64, ``sum_i w_i |r_{i,l+1}|^2`` per level (float64: the
      sum may overflow float32 where the mean is representable);
    * ``stats``: ``counts (L, K)``, ``sums (L, K, D)`` float32 of the residuals each level
      quantized (rows of nonzero weight whose max-abs is below ``stat_limit``: finite, or finite
      in the dtype of the codebooks being trained; no partial sum overflows: ``_stats_fixup``),
      ``skipped (L,)`` int32 rows left out (a view of the zero-filled state the fix-up uses);
    * ``slots`` ``(N,)`` int32 (``-1`` or a slot in ``[0, num_slots)``, each slot used by at most
      one row): ``cand (L, num_slots, D)`` float32, at every level the midpoint
      ``(r + c) / 2`` (``_midpoint``) of those rows' residual ``r`` and chosen code ``c``, and
      ``cand_ok (L, num_slots)`` int8 (residual below ``stat_limit``, finite code, nonzero
      weight). Every slot must be filled.

    ``allow_tf32``: float32 codebooks searched with TF32 dot products (tensor cores) instead of
    exact float32 ones.

    Returns a dict with the keys ``quantized``, ``codes`` and those asked for. Same dtype and
    device for ``x`` and ``codebooks``; any strides. ``max_register_d`` picks the variant (see
    the module docstring); tests lower it to run the D-chunked variant on small shapes.
    """
    # check
    assert x.dim() == 2 and codebooks.dim() == 3 and x.shape[1] == codebooks.shape[2], (x.shape, codebooks.shape)
    assert x.dtype == codebooks.dtype, (x.dtype, codebooks.dtype)
    N, D = x.shape
    L, K, _ = codebooks.shape
    assert L > 0 and K > 0 and D > 0, codebooks.shape
    assert weights is None or (weights.shape == (N,) and weights.dtype == torch.float32)
    assert stat_weights is None or (weights is not None and stat_weights.shape == weights.shape
                                    and stat_weights.dtype == torch.float32)
    if weights is not None:  # (read as p_w + row: f2probe K1, a strided view read wrongly)
        weights = weights.contiguous()
        stat_weights = weights if stat_weights is None else stat_weights.contiguous()
    assert codes is None or (codes.shape == (N, L) and codes.dtype == torch.int64)
    assert slots is None or (slots.shape == (N,) and slots.dtype == torch.int32 and 0 <= num_slots <= N)
    x, codebooks = _x_rows_for_compiler(x), _codebooks_for_compiler(codebooks)
    span = sum((n - 1) * abs(s) for n, s in zip(codebooks.shape, codebooks.stride()))
    if span >= 2**31 > codebooks.numel():
        # the kernels form code offsets in int32: a view spread that wide (syncprobe Y9) is read
        # from a contiguous copy (the op refuses codebooks of 2^31 elements or more)
        codebooks = codebooks.contiguous()
        span = codebooks.numel() - 1
    assert span < 2**31, codebooks.shape  # (the op refuses codebooks of 2^31 elements or more)
    dev = x.device
    # allocate
    out = {"quantized": torch.empty((N, D), dtype=x.dtype, device=dev)}
    search = codes is None
    out["codes"] = torch.empty((N, L), dtype=torch.int64, device=dev) if search else codes
    if stats:
        out["counts"] = torch.zeros((L, K), dtype=torch.float32, device=dev)
        out["sums"] = torch.zeros((L, K, D), dtype=torch.float32, device=dev)
        # skipped, then the fix-up's state (see _stats_fixup_if_last): flag, count; one zero fill
        state = torch.zeros((L + 2,), dtype=torch.int32, device=dev)
        out["skipped"] = state[:L]
    if slots is not None:
        # (every slot has its row: written by the kernel, no zero fill)
        out["cand"] = torch.empty((L, num_slots, D), dtype=torch.float32, device=dev)
        out["cand_ok"] = torch.empty((L, num_slots), dtype=torch.int8, device=dev)
    if N == 0:
        if loss:
            out["level_sq"] = torch.zeros((L,), dtype=torch.float64, device=dev)
        return out
    # launch
    block_l = max(next_pow2(L), 2)
    block_d = max(next_pow2(D), 16)
    chunked = block_d > (max_register_d if max_register_d is not None else register_d_limit(x.dtype))
    # float32: three TF32 products of split operands where the target has TF32 tensor cores and the
    # split fits the registers (register variant, BLOCK_D <= X3_MAX_D, BLOCK_L <= X3_MAX_L); else
    # exact "ieee"
    split = not chunked and block_d <= X3_MAX_D and block_l <= X3_MAX_L
    # the loss partials: one row per program of the smallest BLOCK_M any config uses; float64 (a
    # level's sum of squared residuals may overflow float32 where the mean does not); not filled:
    # only the rows of the launched programs are summed
    min_bm = min(c.kwargs["BLOCK_M"] for c in _residual_quantize_fwd_kernel.configs)
    loss_part = torch.empty((triton.cdiv(N, min_bm), block_l), dtype=torch.float64, device=dev) if loss else None
    q, c = out["quantized"], out["codes"]
    big_t = atomic_overflow_bound(N)  # a code's statistics sum at most N terms
    placeholder = q  # stands for the tensors a flag switches off (never read or written)
    tensors = [x, codebooks, q, c,
               weights if weights is not None else placeholder,
               stat_weights if weights is not None and stats else placeholder,
               loss_part if loss else placeholder,
               out.get("counts", placeholder), out.get("sums", placeholder), state if stats else placeholder,
               slots if slots is not None else placeholder,
               out.get("cand", placeholder), out.get("cand_ok", placeholder)]
    common = dict(SEARCH=search, HAS_W=weights is not None, LOSS=loss, STATS=stats, CAND=slots is not None,
                  PRECISION=tl_input_precision(codebooks.dtype, allow_tf32, split_on=dev if split else None), DOT_FP32=dot_fp32(codebooks.dtype),
                  BLOCK_L=block_l, BF16_RNE=bf16_rne(codebooks.dtype),
                  **stats_fix_tiles(block_d))
    strides = (x.stride(0), x.stride(1), codebooks.stride(0), codebooks.stride(1), codebooks.stride(2),
               q.stride(0), q.stride(1), c.stride(0), c.stride(1))

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]),)

    if not chunked:
        kernel = _residual_quantize_fwd_kernel
        kernel[grid](*tensors, N, K, D, L, num_slots, float(stat_limit), big_t, *strides, BLOCK_D=block_d,
                     **common)
    else:
        kernel = _residual_quantize_fwd_chunked_kernel
        workspace = torch.empty((N, D), dtype=torch.float32, device=dev)
        kernel[grid](*tensors, workspace, N, K, D, L, num_slots, float(stat_limit), big_t, *strides,
                     workspace.stride(0),
                     BLOCK_D=CHUNK_D,
                     **common)
    if loss:  # (the config the launch ran: set by the autotuner on every launch, no device read)
        out["level_sq"] = loss_part[: triton.cdiv(N, kernel.best_config.kwargs["BLOCK_M"]), :L].sum(0)
    return out


def stats_fix_tiles(block_d: int) -> dict:
    """The forward statistics fix-up's tiles for rows of ``block_d`` (``next_pow2(D)``): ``FIX_M``
    whole rows and ``FIX_R`` codes' float64 sums, within ``STATS_FIX_WORDS`` and half of it."""
    return dict(FIX_M=max(1, min(8, STATS_FIX_WORDS // block_d)),
                FIX_R=max(1, min(4, STATS_FIX_WORDS // (2 * block_d))), FIX_D=block_d)


def bwd_fix_tiles(block_d: int) -> dict:
    """The backward codebook-gradient fix-up's tiles for a launch of ``BLOCK_D = block_d``:
    ``FIX_D`` columns at a time (at most 128), ``FIX_M`` rows and ``FIX_R`` codes."""
    fix_d = min(block_d, 128)
    return dict(FIX_M=max(1, 128 // fix_d), FIX_R=max(1, 256 // fix_d), FIX_D=fix_d)


def bwd_num_warps(block_d: int) -> int:
    """Warps of a backward launch: 8 for the whole-row blocks of the rotation trick at
    ``BLOCK_D >= 512`` (4 warps spill there, sm_90), else 4."""
    return 8 if block_d >= 512 else 4


@launcher
def residual_quantize_bwd(
    x: torch.Tensor,
    codebooks: torch.Tensor,
    codes: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
    grad_commit: torch.Tensor | None = None,
    grad_embed: torch.Tensor | None = None,
    rotate: bool = False,
    need_dx: bool = True,
    eps_norm: float | None = None,
    eps_antipodal: float | None = None,
):
    """The gradients of :func:`residual_quantize_fwd`'s ``quantized`` and ``level_sq``.

    ``grad (N, D)`` flows to ``x`` straight through (or rotated, ``rotate``: the rotation trick
    between ``x`` and ``quantized``, with the thresholds ``eps_norm`` and ``eps_antipodal`` of
    :func:`rotation_trick_bwd`, required with ``rotate``; rows of weight 0 pass it straight through). ``level_sq`` is
    used twice by a training step: its gradient ``grad_commit (L,)`` reaches ``x`` (through every
    residual), ``grad_embed (L,)`` reaches the codebooks (through the chosen codes); both float32.
    Returns ``(dx (N, D) in x's dtype or None, dcb (L, K, D) float32 or None)``.
    """
    assert x.dim() == 2 and codebooks.dim() == 3 and x.shape[1] == codebooks.shape[2]
    N, D = x.shape
    L, K, _ = codebooks.shape
    assert codes.shape == (N, L) and codes.dtype == torch.int64
    if weights is not None:  # (read as p_w + row: f2probe K1, a strided view read wrongly)
        assert weights.shape == (N,), weights.shape
        weights = weights.contiguous()
    assert not rotate or next_pow2(D) <= MAX_ROTATE_D, "the fused rotation gradient needs D <= MAX_ROTATE_D"
    dev = x.device
    has_g = grad is not None and need_dx
    rotate_g = rotate and has_g  # (the thresholds are constexprs: 0 when no rotation runs, one variant)
    assert not rotate_g or (eps_norm is not None and eps_antipodal is not None), "rotate needs eps_norm, eps_antipodal"
    has_gc = grad_commit is not None and need_dx
    has_ge = grad_embed is not None
    dx = torch.empty((N, D), dtype=x.dtype, device=dev) if need_dx else None
    dcb = state = None
    if has_ge:  # one zero fill: dcb, then int32 state (flag, programs done)
        buf = torch.zeros((L * K * D + 2,), dtype=torch.float32, device=dev)
        dcb, state = buf[: L * K * D].view(L, K, D), buf[L * K * D :].view(torch.int32)
    if N == 0 or not (need_dx or has_ge):
        return dx, dcb
    block_d = max(next_pow2(D), 16) if rotate and has_g else min(max(next_pow2(D), 16), 128)
    block_m = max(1, min(64, 2048 // block_d, next_pow2(N)))  # 16 elements a thread per block at 4 warps: no spills
    placeholder = x
    grid = (triton.cdiv(N, block_m), triton.cdiv(D, block_d))
    big_t = atomic_overflow_bound(N)  # a codebook code sums at most N terms
    _residual_quantize_bwd_kernel[grid](
        x, codebooks, codes, weights if weights is not None else placeholder,
        grad if has_g else placeholder, grad_commit if has_gc else placeholder,
        grad_embed if has_ge else placeholder, dx if need_dx else placeholder, dcb if has_ge else placeholder,
        state if has_ge else placeholder, N, K, D, L, big_t,
        x.stride(0), x.stride(1), codebooks.stride(0), codebooks.stride(1), codebooks.stride(2),
        codes.stride(0), codes.stride(1),
        grad.stride(0) if has_g else 0, grad.stride(1) if has_g else 0,
        dx.stride(0) if need_dx else 0, dx.stride(1) if need_dx else 0,
        BLOCK_M=block_m, BLOCK_D=block_d, HAS_W=weights is not None, HAS_G=has_g, HAS_GC=has_gc, HAS_GE=has_ge,
        HAS_DX=need_dx, ROTATE=rotate_g, EPS_N=float(eps_norm) if rotate_g else 0.0,
        EPS_S=float(eps_antipodal) if rotate_g else 0.0,
        **bwd_fix_tiles(block_d), num_warps=bwd_num_warps(block_d),
        **({"maxnreg": BWD_FIXUP_MAXNREG} if has_ge else {}),
    )
    return dx, dcb
