"""Nearest code search (l2 / euclidean / cosine / dot) and fused negative mining, one streaming kernel.

Design
------
* Pre-pass 1, ``_code_terms_kernel``: once per call, per code, its max-abs, whether it is finite,
  and its score terms ``a``, ``b`` (score = ``a + b * (x' . c')``, one FMA per element): l2
  ``a = |c|^2 2^-2L``, ``b = -2^(1-L)`` for each of three units ``2^2L`` (L = 0, 96, -96),
  cosine ``a = 0``, ``b = -1/|c|``, dot ``a = 0``, ``b = -1``; ``a`` is NaN for a code with a NaN
  or infinite entry. Norms are taken after scaling the code by a power of two, so they only
  overflow or underflow when the true norm does. Per block of codes: the largest and smallest
  max-abs of its finite codes and its first finite code.
* Pre-pass 2, ``_code_rescale_kernel``: reduces those partials per codebook. If the codebook's
  magnitudes are outside [2^-20, 2^20] (only for float32/bfloat16: float16 can neither
  overflow nor underflow a float32 sum of its products), it writes a power-of-two scaled copy
  of the codebook, one power of two per code (so no code underflows in the dot product), and the
  ``b`` terms that go with it (dot: ``b = -2^(e - E)``, each code's own power of two in a common
  unit ``2^E`` set by the largest code, so that codes ~1e-20 beside one ~3e38 are still compared
  exactly). Power-of-two scaling is
  exact, so the scaled search rounds exactly like the plain one wherever the plain one does not
  overflow; a codebook inside the range is neither copied nor rescaled.
* Main ``_nearest_code_fwd_kernel``: a program owns ``BLOCK_N`` rows of one codebook (a grid
  axis walks the ``H`` codebooks of a multi-codebook search). When ``D <= RESIDENT_MAX_D`` the
  ``(BLOCK_N, D)`` x tile is loaded once and stays on chip, each row scaled by a power of two
  first (cosine and dot: to [1, 2), their argmin ignores a row's scale; l2: by its unit ``2^-L``,
  the band of max(max|x|, smallest code) among [2^-48, 2^48] (L = 0), above (96) or below (-96),
  so that the scores that decide a row's code neither underflow nor overflow whatever the spread
  of the code sizes; a block makes one pass over the codebook per band its rows hold: one unless
  its rows differ by more than 2^48 in size). Codebook tiles of ``BLOCK_K`` codes stream past:
  ``x @ c.T`` on the tensor cores (fp32 accumulation; float32 inputs as three TF32 products of
  their two-part splits, ``PRECISION`` "tf32x3", a resident x tile split once per program, streamed
  chunks as they load: ``_common.dot_split_nt``;
  mining and sampling, and GPUs without TF32, keep the exact "ieee" FMA dot), the score ``a + b * (x.c)`` (the per-code
  terms of the pass's unit: two vector loads per tile, one FMA per element, as the former
  ``|c|^2 - 2 x.c``), and a running ``(min, index)`` per row in registers is updated. The
  ``N x K`` matrix never exists. A code whose ``a`` is NaN (not finite, or past ``K``) scores
  NaN and never wins.
* The epilogue, once per row: a row with a NaN takes index 0; a row with an infinite entry, or a
  row with no finite score (all codes non-finite, or a row so far from the codebook that
  its scores overflow: every code is then equally near within float32) takes the first finite
  code. The distance is then computed directly from ``x`` and the chosen code (not from the
  expansion), so it is the chosen code's true distance (a float32 sum; dot: rounded once, from
  a compensated float64 pair): NaN where that distance is NaN, +inf where it overflows, exact
  for l2 at 0 and for integer data.
* Ties: ``tl.min(..., return_indices=True)`` breaks ties to the left inside a tile, and
  tiles (and splits) are merged with a strict ``<`` in increasing code order, so the
  smallest index wins, as ``torch.argmin`` does.
* Small ``N`` with large ``K``: the codebook is split over a second grid axis; each split
  writes a partial ``(min, index)`` and ``_nearest_code_reduce_kernel`` merges them in
  split order (strict ``<``) and runs the same epilogue.
* ``HAS_LOWER_BOUND`` (negative mining, semi-hard): the same pass also tracks the
  minimum over the codes with ``score > |x - p|^2 - |x|^2`` (strictly farther than the
  positive) and falls back to the unconstrained minimum where no code qualifies.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._common import (arch_family, argmin_merge, argmin_merge_pair, autotune, autotune_configs, dd_add, dd_sum,
                      dot_fp32, dot_nt, dot_split_nt, exp2i, interpreter_or, launcher, nan_clamp, nan_max0,
                      next_pow2, pow2_exponent, prune_by_estimate, rcp_rn, register_estimate, round_dd,
                      rows_vectorise, sm_count, target_for, tf32_split, tl_input_precision, words_per_thread)

# Internal ids; the public metric and strategy names and their documentation live in
# fastvq/_names.py (tests/test_layering.py holds these keys to them).
METRIC_IDS = {"l2": 0, "cosine": 1, "dot": 2, "euclidean": 3}
_STRATEGY_BOUND = {"hardest": False, "semi-hard": True}

# D up to this many features keeps the whole x tile on chip; larger D streams it in 64-wide chunks.
RESIDENT_MAX_D = 256
# The float32 "tf32x3" search (two TF32 parts per operand) keeps x resident up to 64 features and
# streams wider rows in 32-wide chunks: a resident 256-wide split tile spilled on sm_90 (ptxas,
# benchmarks/results/fp32-precision-sm90.txt).
RESIDENT_MAX_D_X3 = 64
STREAM_D_X3 = 32
# Codebook split: only when the row blocks alone cannot fill the GPU; each split gets at
# least SPLIT_MIN_CODES codes; at most MAX_SPLITS splits.
SPLIT_MIN_CODES = 512
MAX_SPLITS = 128
_SPLIT_BLOCK_N = 64  # row-block size assumed when choosing the split count
# Pre-passes: codes per block, and at most this many blocks of partials per codebook.
PREP_BLOCK_K = 64
PREP_MAX_BLOCKS = 256
# A codebook whose finite codes' max-abs values lie in [2^-TAME, 2^TAME] is searched as is.
TAME_EXP = 20
META_COLS = 4  # per codebook: first finite code, scaled copy in use, the dot unit's exponent E and the
# float32 bits of the smallest nonzero finite code max-abs
# Unit bands of the l2 search (see _row_band): 0, 2^96 and 2^-96; cosine and dot have one.
NBANDS = {"l2": 3, "euclidean": 3, "cosine": 1, "dot": 1}


# --------------------------------------------------------------------------- helpers


@triton.jit
def _scores(b_xc, p_ca, p_cb, o_k, m_k, EVEN_K: tl.constexpr = False):
    """Scores whose row argmin is the nearest code, ``a + b * (x' . c')`` with the per-code terms
    of the row's unit (one FMA per element: l2 ``2^-2L (|c|^2 - 2 x.c)``, cosine ``-(x.c)/|c|``,
    dot ``-(x.c)``); NaN for codes past the tile's end and for codes with a non-finite entry
    (their ``a`` is NaN): the argmin needs no mask."""
    if EVEN_K:
        b_a = tl.load(p_ca + o_k)
        b_b = tl.load(p_cb + o_k)
    else:
        b_a = tl.load(p_ca + o_k, mask=m_k, other=float("nan"))
        b_b = tl.load(p_cb + o_k, mask=m_k, other=0.0)
    return b_a[None, :] + b_b[None, :] * b_xc


@triton.jit
def _band_unit(band):
    """The exponent ``L`` of an l2 unit band (0, 1, 2 -> 0, 96, -96): scores in units of 2^2L."""
    return tl.where(band == 1, 96, tl.where(band == 2, -96, 0))


@triton.jit
def _row_band(b_xm, c_min):
    """Each row's l2 unit band from its max-abs: that of max(max|x|, c_min), the codebook's
    smallest nonzero code max-abs; 0 within [2^-48, 2^48] and for non-finite rows."""
    b_m = tl.maximum(b_xm, c_min)
    e = pow2_exponent(b_m)
    band = tl.where(e > 48, 1, tl.where(e < -48, 2, 0))
    return tl.where(b_m < float("inf"), band, 0)


@triton.jit
def _mul_exp2(v, e):
    """``v * 2**e`` for an int32 ``e`` in [-252, 254] (2**e itself need not be a float32),
    rounded once: two exact half steps (each half a normal power of two)."""
    lo = e >> 1
    return (v * exp2i(lo)) * exp2i(e - lo)


@triton.jit
def _gumbel(seed, o_n, k0, h, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Gumbel(0, 1) noise for rows ``o_n`` x codes ``k0 .. k0 + BLOCK_K - 1`` of codebook ``h``:
    one Philox4x32-10 call per 4 codes (keyed by ``seed``, counter (code // 4, row, codebook,
    row >> 32); code ``k`` takes word ``k % 4``), each word -> u in (0, 1) -> -log(-log(u))."""
    o_g = k0 // 4 + tl.arange(0, BLOCK_K // 4)
    zero = (o_n[:, None] * 0 + o_g[None, :] * 0)
    c0 = (o_g[None, :] + zero).to(tl.uint32)
    c1 = (o_n[:, None] + zero).to(tl.uint32)
    c2 = (zero + h).to(tl.uint32)
    c3 = ((o_n >> 32)[:, None] + zero).to(tl.uint32)
    r0, r1, r2, r3 = tl.philox(seed, c0, c1, c2, c3)
    r = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_N, BLOCK_K))  # code 4g + j: word j
    u = ((r >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08
    # (2^24 - 1) + 0.5 rounds to 2^24 in float32: u = 1 would be noise +inf, that code taken
    # whatever its distance (mutB F1); the largest float32 below 1 instead
    u = tl.minimum(u, 0.99999994039535522)
    return -tl.log(-tl.log(u))


@triton.jit
def _x_tile(p_x, o_xrow, m_n, b_rs, D, stride_xd, ONE_D_BLOCK: tl.constexpr, SCALE_ROWS: tl.constexpr,
            PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The resident x tile (rows scaled by ``b_rs``), loaded once per program, and its low part:
    ``(hi, lo)``, its :func:`tf32_split` for ``PRECISION == "tf32x3"``, else ``(x, x)``."""
    o_d = tl.arange(0, BLOCK_D)
    if ONE_D_BLOCK:
        b_xt = tl.load(p_x + o_xrow[:, None] + o_d[None, :] * stride_xd, mask=m_n[:, None] & (o_d < D)[None, :],
                       other=0.0)
        if SCALE_ROWS:
            b_xt = (b_xt.to(tl.float32) * b_rs[:, None]).to(p_x.dtype.element_ty)
        if DOT_FP32:
            b_xt = b_xt.to(tl.float32)
    else:  # streamed: nothing resident
        b_xt = tl.zeros((BLOCK_N, BLOCK_D), dtype=p_x.dtype.element_ty)
    b_xl = b_xt
    if ONE_D_BLOCK and PRECISION == "tf32x3":
        b_xt, b_xl = tf32_split(b_xt)
    return b_xt, b_xl


@triton.jit
def _tile_xc(b_xt, b_xl, p_x, o_xrow, m_n, p_cb, o_k, m_k, b_rs, D, stride_xd, stride_ck, stride_cd,
             ONE_D_BLOCK: tl.constexpr, SCALE_ROWS: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
             EVEN_K: tl.constexpr = False, EVEN_D: tl.constexpr = False):
    """``x @ c.T`` for one codebook tile, float32: the resident x tile ``(b_xt, b_xl)``, see
    :func:`_x_tile`) against the codes, or D streamed in BLOCK_D chunks of both. ``EVEN_K``/``EVEN_D``:
    whole tiles, unmasked loads."""
    o_d = tl.arange(0, BLOCK_D)
    if ONE_D_BLOCK:
        p_tile = p_cb + o_k.to(tl.int64)[:, None] * stride_ck + o_d[None, :] * stride_cd  # (K D may pass 2^31)
        if EVEN_K and EVEN_D:
            b_c = tl.load(p_tile)
        elif EVEN_K:
            b_c = tl.load(p_tile, mask=(o_d < D)[None, :], other=0.0)
        elif EVEN_D:
            b_c = tl.load(p_tile, mask=m_k[:, None], other=0.0)
        else:
            b_c = tl.load(p_tile, mask=m_k[:, None] & (o_d < D)[None, :], other=0.0)
        if DOT_FP32:
            b_c = b_c.to(tl.float32)
        b_xc = dot_split_nt(b_xt, b_xl, b_c, tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32), PRECISION)
    else:
        b_xc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            o_dd = d0 + o_d
            m_dd = o_dd < D
            b_xd = tl.load(p_x + o_xrow[:, None] + o_dd[None, :] * stride_xd, mask=m_n[:, None] & m_dd[None, :],
                           other=0.0)
            b_cd = tl.load(p_cb + o_k.to(tl.int64)[:, None] * stride_ck + o_dd[None, :] * stride_cd,
                           mask=m_k[:, None] & m_dd[None, :], other=0.0)
            if SCALE_ROWS:
                b_xd = (b_xd.to(tl.float32) * b_rs[:, None]).to(p_x.dtype.element_ty)
            b_xc = dot_nt(b_xd, b_cd, b_xc, PRECISION, DOT_FP32)
    return b_xc


@triton.jit
def _row_scale(p_x, o_xrow, m_n, D, stride_xd, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per row: max-abs and the power of two that brings it into [1, 2) (cosine and dot scale
    rows by it: their argmin does not depend on a row's scale)."""
    o_d = tl.arange(0, BLOCK_D)
    b_xm = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        m_xd = m_n[:, None] & ((d0 + o_d) < D)[None, :]
        b_x = tl.load(p_x + o_xrow[:, None] + (d0 + o_d)[None, :] * stride_xd, mask=m_xd, other=0.0)
        b_xm = tl.maximum(b_xm, tl.max(tl.abs(b_x.to(tl.float32)), axis=1))
    return b_xm, exp2i(-pow2_exponent(b_xm))


@triton.jit
def _row_flags(p_x, o_xrow, m_n, D, stride_xd, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per row: max-abs (NaN ignored), a NaN entry, a non-finite entry."""
    b_xm = tl.zeros((BLOCK_N,), dtype=tl.float32)
    b_z = tl.zeros((BLOCK_N,), dtype=tl.float32)
    b_nan = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m = m_n[:, None] & (o_d < D)[None, :]
        b_x = tl.load(p_x + o_xrow[:, None] + o_d[None, :] * stride_xd, mask=m, other=0.0).to(tl.float32)
        b_xm = tl.maximum(b_xm, tl.max(tl.abs(b_x), axis=1))
        b_z += tl.sum(b_x * 0.0, axis=1)  # NaN iff an entry is NaN or infinite
        b_nan = tl.maximum(b_nan, tl.max((b_x != b_x).to(tl.int32), axis=1))
    return b_xm, b_nan > 0, b_z != b_z


@triton.jit
def _distance(p_x, o_xrow, m_n, p_row, b_xm, D, stride_xd, stride_cd,
              METRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The distance from each row (at ``o_xrow``, max-abs ``b_xm``) to its code (at ``p_row``),
    computed directly (dot: rounded once): NaN where it is NaN, +inf where it overflows (dot:
    -inf), scaled by powers of two before squaring or normalising."""
    if METRIC == 3:  # euclidean: the largest |x - c|, to scale before squaring
        b_dm = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m = m_n[:, None] & (o_d < D)[None, :]
            b_x = tl.load(p_x + o_xrow[:, None] + o_d[None, :] * stride_xd, mask=m, other=0.0).to(tl.float32)
            b_c = tl.load(p_row[:, None] + o_d[None, :] * stride_cd, mask=m, other=0.0).to(tl.float32)
            b_dm = tl.maximum(b_dm, tl.max(tl.abs(b_x - b_c), axis=1))
        e_d = pow2_exponent(b_dm)
        s_d = exp2i(-e_d)
    if METRIC == 1:  # cosine: the codes' max-abs
        b_cm = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m = m_n[:, None] & (o_d < D)[None, :]
            b_c = tl.load(p_row[:, None] + o_d[None, :] * stride_cd, mask=m, other=0.0).to(tl.float32)
            b_cm = tl.maximum(b_cm, tl.max(tl.abs(b_c), axis=1))
        e_x = pow2_exponent(b_xm)
        e_c = pow2_exponent(b_cm)
        s_x = exp2i(-e_x)
        s_c = exp2i(-e_c)
    b_t = tl.zeros((BLOCK_N,), dtype=tl.float32)
    b_t64 = tl.zeros((BLOCK_N,), dtype=tl.float64)  # dot: the running sum b_t64 + b_e64 + b_f64
    b_e64 = tl.zeros((BLOCK_N,), dtype=tl.float64)
    b_f64 = tl.zeros((BLOCK_N,), dtype=tl.float64)
    b_qx = tl.zeros((BLOCK_N,), dtype=tl.float32)
    b_qc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m = m_n[:, None] & (o_d < D)[None, :]
        b_x = tl.load(p_x + o_xrow[:, None] + o_d[None, :] * stride_xd, mask=m, other=0.0).to(tl.float32)
        b_c = tl.load(p_row[:, None] + o_d[None, :] * stride_cd, mask=m, other=0.0).to(tl.float32)
        if METRIC == 2:  # -(x.c) from float64 products (each exact, nothing scaled), summed in
            # three parts (dd_sum, dd_add across tiles): a plain float64 sum lost the products below 2^-53 of the largest
            # ([1, 1, 1] . [2^100, 1, -2^100] gave 0, not -1; fuzzJ)
            b_hi, b_mid, b_lo = dd_sum(b_x.to(tl.float64) * b_c.to(tl.float64), 1)
            b_t64, b_e64, b_f64 = dd_add(b_t64, b_e64, b_f64, b_hi, b_mid, b_lo)
        elif METRIC == 1:
            b_x = b_x * s_x[:, None]
            b_c = b_c * s_c[:, None]
            b_t += tl.sum(b_x * b_c, axis=1)
            b_qx += tl.sum(b_x * b_x, axis=1)
            b_qc += tl.sum(b_c * b_c, axis=1)
        else:
            b_diff = b_x - b_c
            if METRIC == 3:
                b_diff = b_diff * s_d[:, None]
            b_t += tl.sum(b_diff * b_diff, axis=1)
    if METRIC == 1:  # 1 - cos; a zero vector has cosine 0 with anything
        b_den = tl.sqrt_rn(b_qx) * tl.sqrt_rn(b_qc)
        b_cos = tl.where(b_den == 0.0, 0.0, tl.math.div_rn(b_t, tl.where(b_den == 0.0, 1.0, b_den)))
        b_dist = nan_clamp(1.0 - b_cos, 0.0, 2.0)
    elif METRIC == 2:  # (scaled by the rows' powers of two in float32, an entry far below its row's
        # largest flushed to 0, or kept as the smallest normal counted 2^(e_x + e_c - 126): fuzzA)
        b_dist = round_dd(-b_t64, -b_e64, -b_f64, False)
    elif METRIC == 3:  # |x - c| = sqrt(t) * 2^e_d
        b_dist = tl.sqrt_rn(b_t) * exp2i(e_d)
    else:
        b_dist = b_t
    return b_dist


@triton.jit
def _finish(p_x, o_xrow, m_n, p_c, o_crow, b_idx, b_first, p_idx, p_dist, o_out, K, D, stride_xd, stride_ck,
            stride_cd, METRIC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """The per-row epilogue: pick the index (NaN row: 0; infinite row or no finite score: the
    first finite code), then compute the distance to it directly and store both.

    ``o_xrow``/``o_crow``: element offsets of each row's x and of its codebook's code 0.
    ``b_idx``: the search's index, -1 where no code had a finite score.
    """
    b_xm, m_nan, m_bad = _row_flags(p_x, o_xrow, m_n, D, stride_xd, BLOCK_N, BLOCK_D)
    b_first = tl.where(b_first < K, b_first, 0)
    b_idx = tl.where(m_nan, 0, tl.where(m_bad | (b_idx < 0), b_first, b_idx))
    p_row = p_c + o_crow + b_idx.to(tl.int64) * stride_ck  # the chosen code of each row
    b_dist = _distance(p_x, o_xrow, m_n, p_row, b_xm, D, stride_xd, stride_cd, METRIC, BLOCK_N, BLOCK_D)
    tl.store(p_idx + o_out, b_idx.to(tl.int64), mask=m_n)
    tl.store(p_dist + o_out, b_dist, mask=m_n)


# --------------------------------------------------------------------------- pre-passes


@triton.jit
def _code_terms_kernel(p_c, p_cterm, p_pmax, p_pmin, p_pfirst, K, D, NB, stride_ch, stride_ck, stride_cd,
                       METRIC: tl.constexpr, NBANDS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Per code, for each unit band ``j`` (l2: 3, else 1), its score terms ``a``, ``b`` (score =
    ``a + b * (x' . c)`` for the codes as they are): l2 ``a = |c|^2 2^-2L``, ``b = -2^(1-L)``;
    cosine ``a = 0``, ``b = -1/|c|``; dot ``a = 0``, ``b = -1``; ``a`` NaN if not finite. Per
    block of partials (``NB`` per codebook, strided over the code blocks): the largest max-abs of
    a finite code, the smallest nonzero one, and the first finite code (``K`` if none)."""
    pid = tl.program_id(0)
    h = (pid // NB).to(tl.int64)
    pid_b = pid % NB
    p_c += h * stride_ch
    p_cterm += h * (2 * NBANDS * K)
    r_max = tl.zeros((BLOCK_K,), dtype=tl.float32)
    r_min = tl.full((BLOCK_K,), float("inf"), dtype=tl.float32)
    r_first = tl.zeros((BLOCK_K,), dtype=tl.int32) + K
    for k0 in range(pid_b * BLOCK_K, K, NB * BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        p_row = p_c + o_k.to(tl.int64) * stride_ck
        b_m = tl.zeros((BLOCK_K,), dtype=tl.float32)
        b_z = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            b_c = tl.load(p_row[:, None] + o_d[None, :] * stride_cd, mask=m_k[:, None] & (o_d < D)[None, :],
                          other=0.0).to(tl.float32)
            b_m = tl.maximum(b_m, tl.max(tl.abs(b_c), axis=1))
            b_z += tl.sum(b_c * 0.0, axis=1)  # NaN iff an entry is NaN or infinite
        e = pow2_exponent(b_m)
        b_s = exp2i(-e)
        b_q = tl.zeros((BLOCK_K,), dtype=tl.float32)  # |c * s|^2, in [1, 4 D] for a nonzero finite code
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            b_c = tl.load(p_row[:, None] + o_d[None, :] * stride_cd, mask=m_k[:, None] & (o_d < D)[None, :],
                          other=0.0).to(tl.float32) * b_s[:, None]
            b_q += tl.sum(b_c * b_c, axis=1)
        m_bad = b_z != b_z
        for j in tl.static_range(NBANDS):
            if METRIC == 1:
                b_a = tl.zeros((BLOCK_K,), dtype=tl.float32)
                b_b = -tl.where(b_q > 0, tl.math.div_rn(b_s, tl.sqrt_rn(tl.where(b_q > 0, b_q, 1.0))), 0.0)
            elif METRIC == 2:
                b_a = tl.zeros((BLOCK_K,), dtype=tl.float32)
                b_b = tl.zeros((BLOCK_K,), dtype=tl.float32) - 1.0
            else:  # |c|^2 2^-2L = (q 2^(e-L)) 2^(e-L): one rounding (q >= 1 for a nonzero code)
                e_l = e - _band_unit(j)
                b_a = (b_q * exp2i(e_l)) * exp2i(e_l)
                b_b = tl.zeros((BLOCK_K,), dtype=tl.float32) - 2.0 * exp2i(0 * e - _band_unit(j))
            tl.store(p_cterm + j * K + o_k, tl.where(m_bad, float("nan"), b_a), mask=m_k)
            tl.store(p_cterm + (NBANDS + j) * K + o_k, b_b, mask=m_k)
        m_good = m_k & ~m_bad
        r_max = tl.maximum(r_max, tl.where(m_good, b_m, 0.0))
        r_min = tl.minimum(r_min, tl.where(m_good & (b_m > 0), b_m, float("inf")))
        r_first = tl.minimum(r_first, tl.where(m_good, o_k, K))
    tl.store(p_pmax + pid, tl.max(r_max, axis=0))
    tl.store(p_pmin + pid, tl.min(r_min, axis=0))
    tl.store(p_pfirst + pid, tl.min(r_first, axis=0))


@triton.jit
def _code_rescale_kernel(p_c, p_chat, p_cterm, p_pmax, p_pmin, p_pfirst, p_meta, K, D, NB, KB, LOG2D,
                         stride_ch, stride_ck, stride_cd,
                         METRIC: tl.constexpr, NBANDS: tl.constexpr, CAN_SCALE: tl.constexpr, TAME: tl.constexpr,
                         BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_B: tl.constexpr):
    """Reduce the partials of one codebook; where its magnitudes leave [2^-TAME, 2^TAME], write a
    power-of-two scaled copy (``KB`` blocks of ``BLOCK_K`` codes per codebook; one scale per
    code) and the ``b`` terms that go with it. Program 0 of each
    codebook writes its meta row: first finite code, copy in use, dot unit exponent, smallest nonzero
    finite code max-abs (0 if none)."""
    pid = tl.program_id(0)
    h = (pid // KB).to(tl.int64)
    pid_k = pid % KB
    o_b = tl.arange(0, BLOCK_B)
    m_b = o_b < NB
    c_max = tl.max(tl.load(p_pmax + h * NB + o_b, mask=m_b, other=0.0), axis=0)
    c_min = tl.min(tl.load(p_pmin + h * NB + o_b, mask=m_b, other=float("inf")), axis=0)
    first = tl.min(tl.load(p_pfirst + h * NB + o_b, mask=m_b, other=K), axis=0)
    hi = exp2i(TAME + 0 * first)
    lo = exp2i(-TAME + 0 * first)
    need = (c_max > hi) | (c_min < lo)
    if not CAN_SCALE:
        need = need & False
    # dot's common unit 2^E: the largest code's score, |x' . c'| 2^(e_max - E) < 4 D 2^(124 - LOG2D),
    # cannot overflow, and every code down to 2^(E - 149) keeps its own power of two in its b term
    e_unit = tl.where(need, pow2_exponent(c_max) + LOG2D - 124, 0)
    c_low = tl.where(c_min < float("inf"), c_min, 0.0)
    o_m = tl.arange(0, 4)
    meta = tl.where(o_m == 0, first, tl.where(o_m == 1, need.to(tl.int32), e_unit))
    meta = tl.where(o_m == 3, c_low.to(tl.int32, bitcast=True), meta)
    tl.store(p_meta + h * 4 + o_m, meta, mask=(o_m < 4) & (pid_k == 0))
    if need:
        o_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        m_k = o_k < K
        o_row = h * stride_ch + o_k.to(tl.int64) * stride_ck
        b_m = tl.zeros((BLOCK_K,), dtype=tl.float32)  # one scale per code
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            b_c = tl.load(p_c + o_row[:, None] + o_d[None, :] * stride_cd,
                          mask=m_k[:, None] & (o_d < D)[None, :], other=0.0).to(tl.float32)
            b_m = tl.maximum(b_m, tl.max(tl.abs(b_c), axis=1))
        b_e = pow2_exponent(b_m)
        b_s = exp2i(-b_e)
        b_q = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m = m_k[:, None] & (o_d < D)[None, :]
            b_c = tl.load(p_c + o_row[:, None] + o_d[None, :] * stride_cd, mask=m, other=0.0).to(tl.float32)
            b_c = b_c * b_s[:, None]
            b_q += tl.sum(b_c * b_c, axis=1)
            tl.store(p_chat + o_row[:, None] + o_d[None, :] * stride_cd, b_c.to(p_chat.dtype.element_ty), mask=m)
        p_cb = p_cterm + h * (2 * NBANDS * K) + NBANDS * K + o_k  # the b terms (a does not change)
        if METRIC == 1:
            tl.store(p_cb, -tl.where(b_q > 0, rcp_rn(tl.sqrt_rn(tl.where(b_q > 0, b_q, 1.0))), 0.0), mask=m_k)
        elif METRIC == 2:  # dot: x.c = 2^e x.c', in the codebook's unit 2^E: b = -2^(e - E)
            tl.store(p_cb, _mul_exp2(tl.zeros((BLOCK_K,), dtype=tl.float32) - 1.0, b_e - e_unit), mask=m_k)
        elif METRIC == 0 or METRIC == 3:  # l2: x.c = 2^e x.c', so b = -2^(1 + e - L)
            # (0 where |c|^2 overflows the unit, a = +inf: |x'| < 2^50 sqrt(D) in any row's unit,
            # so the score is +inf, not inf - inf = NaN as with b = -2^128)
            for j in tl.static_range(NBANDS):
                b_aj = tl.load(p_cb - NBANDS * K + j * K, mask=m_k, other=0.0)
                b_bj = _mul_exp2(tl.zeros((BLOCK_K,), dtype=tl.float32) - 2.0, b_e - _band_unit(j))
                tl.store(p_cb + j * K, tl.where(b_aj == float("inf"), 0.0, b_bj), mask=m_k)


# --------------------------------------------------------------------------- main kernels


# GPU configs, (BLOCK_N, BLOCK_K, num_warps, num_stages). 16-bit inputs run wgmma: 64/128-row
# tiles; at D <= 256 the 64 x 64 two-stage tile leaves room for two blocks per SM (98 KiB shared
# memory at D = 256), so one block's argmin epilogue overlaps the other's MMA. fp32 has its own
# list: its exact ("ieee") dot runs on the FMA units and holds operand fragments in registers.
# The early prune keeps the input's own list and, of it, what fits the target GPU by the
# estimates below (checked against ptxas by tests/test_resource_estimates.py).
CONFIGS_16BIT = [(bn, bk, w, s) for bn in (64, 128) for bk in (64, 128) for w in (4, 8) for s in (2, 3)]
CONFIGS_16BIT += [(64, 32, 8, 2)]  # the narrowest wgmma tile
# Gumbel sampling holds the Philox words and the scaled scores beside the x tile: at D = 256 no
# 64-row tile fits in 255 registers (64 x 32 at 8 warps spilled 24-32 B with triton 3.6), so
# sampling's own list adds 32-row tiles (mma.sync-sized, 164-168 registers there, no spill).
CONFIGS_16BIT_SAMPLE = CONFIGS_16BIT + [(32, 32, 8, 2)]
CONFIGS_FP32 = [(32, 32, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2), (64, 64, 8, 2), (32, 32, 8, 2)]
# float32 as three TF32 products ("tf32x3"): wgmma tiles (64 rows and more); the split x tile is
# resident up to D = 64 (RESIDENT_MAX_D_X3), wider rows stream 32-wide chunks. Their registers do
# not follow a linear model (sm_80: 64 x 64 at 8 warps spills at D = 64 where 64 x 32 at 4 warps,
# with twice the x tile per thread, does not), so each tile's registers are listed as ptxas gave
# them (the most of triton 3.6 and 3.8, plus 8 for drift), per target family and layout ("r32":
# resident, BLOCK_D <= 32; "r64": resident, 64; "s": streamed, BLOCK_D 32; a "u" suffix: an
# unaligned launch, :func:`_aligned`). Aligned: the benchmark shapes
# (benchmarks/results/sm90-static.json), and D = 48 (masked), dot, cosine and split launches,
# which stay within them. Unaligned (loads no longer vectorise, so more registers hold addresses):
# D = 24, 40, 60 and 100 (row strides not divisible by 16), D = 32 and 64 with padded rows, D = 64
# one element into its storage; l2, cosine and split launches (benchmarks/results/
# fp32-precision-sm90.txt). A tile not listed is pruned, and so is the one mma.sync tile
# (X3_FALLBACK, the pinned FASTVQ_AUTOTUNE=0 one) unless no wgmma tile fits. Left out: every
# tile at D = 128 resident and 64 x 128 at 64 (spilled on sm_90), 64 x 64 on sm_80 at D <= 64
# (255 registers; spilled 56-368 B at 64), 128 x 64 (245-255 on sm_90), on sm_80 streamed every
# tile but 64 x 32 at 8 warps (247-255 registers), and unaligned: on sm_90 at D = 64 all but
# 64 x 32 at 8 warps (64 x 64 spilled 8-104 B, 128 x 32 24-80 B), on sm_80 every wgmma-sized
# tile (255 registers, spilling up to 704 B). sm_80's unaligned D = 64 keeps the fallback tile
# although ptxas gives it 252 registers (no spill): the least overshoot.
CONFIGS_X3 = [(64, 64, 8, 2), (64, 64, 8, 3), (64, 32, 4, 2), (64, 32, 8, 2), (128, 32, 8, 2)]
X3_FALLBACK = (32, 32, 8, 2)
_X3_REGS = {
    ("sm_90", "r32"): {(128, 32, 8, 2): 138, (64, 32, 4, 2): 124, (64, 32, 8, 2): 132, (64, 64, 8, 2): 138,
                       (64, 64, 8, 3): 134, (32, 32, 8, 2): 202},
    ("sm_90", "r64"): {(128, 32, 8, 2): 174, (64, 32, 4, 2): 196, (64, 32, 8, 2): 186, (64, 64, 8, 2): 216,
                       (64, 64, 8, 3): 234, (32, 32, 8, 2): 226},
    ("sm_90", "s"): {(128, 32, 8, 2): 169, (64, 32, 4, 2): 168, (64, 32, 8, 2): 128, (64, 64, 8, 2): 140,
                     (64, 64, 8, 3): 136, (32, 32, 8, 2): 180},
    ("sm_90", "r32u"): {(128, 32, 8, 2): 244, (64, 32, 4, 2): 240, (64, 32, 8, 2): 144, (64, 64, 8, 2): 207,
                        (64, 64, 8, 3): 225, (32, 32, 8, 2): 243},
    ("sm_90", "r64u"): {(64, 32, 8, 2): 232, (32, 32, 8, 2): 242},
    ("sm_90", "su"): {(128, 32, 8, 2): 253, (64, 32, 8, 2): 199, (64, 64, 8, 2): 210, (64, 64, 8, 3): 216,
                      (32, 32, 8, 2): 223},
    ("sm_80", "r32"): {(128, 32, 8, 2): 216, (64, 32, 4, 2): 176, (64, 32, 8, 2): 206, (32, 32, 8, 2): 200},
    ("sm_80", "r64"): {(128, 32, 8, 2): 249, (64, 32, 8, 2): 238, (32, 32, 8, 2): 234},
    ("sm_80", "s"): {(64, 32, 8, 2): 213, (32, 32, 8, 2): 174},
    ("sm_80", "r32u"): {(32, 32, 8, 2): 227},
    ("sm_80", "r64u"): {(32, 32, 8, 2): 260},
    ("sm_80", "su"): {(32, 32, 8, 2): 227},
}
_X3_UNLISTED = 1 << 16  # registers "estimated" for a tile not listed: pruned, never the least overshoot


def _aligned(named_args) -> bool:
    """Whether Triton specialises this launch's x and codebook addresses as 16-element aligned
    (base pointers at 16 bytes, row and head strides divisible by 16), so that its loads vectorise."""
    return all(named_args[p].data_ptr() % 16 == 0 for p in ("p_x", "p_c")) and \
        all(named_args[s] % 16 == 0 for s in ("stride_xh", "stride_xn", "stride_ch", "stride_ck"))


# Registers per thread = base + a * (x tile words) + b * (score tile words), by target family,
# element size and variant (plain search, mining's lower bound, Gumbel sampling); fitted to
# ptxas (sm_80 and sm_90, triton 3.6 and 3.8) at the benchmark shapes, bounding it from above.
_REGISTER_MODELS = {
    ("sm_90", 2, "plain"): (196, (0.25, 1.75)), ("sm_90", 2, "bound"): (206, (1.0, 1.0)),
    ("sm_90", 2, "sample"): (233, (0.5, 1.75)),
    ("sm_90", 4, "plain"): (159, (0.25, 5.75)), ("sm_90", 4, "bound"): (231, (0.25, 1.0)),
    ("sm_90", 4, "sample"): (135, (1.0, 7.0)),
    ("sm_80", 2, "plain"): (176, (0.25, 1.75)), ("sm_80", 2, "bound"): (195, (1.0, 1.75)),
    ("sm_80", 2, "sample"): (239, (0.5, 1.0)),
    ("sm_80", 4, "plain"): (123, (0.25, 8.0)), ("sm_80", 4, "bound"): (231, (0.25, 1.0)),
    ("sm_80", 4, "sample"): (137, (1.0, 6.75)),
}
_SCRATCH = 4096  # shared memory for the row reductions' layout conversions (measured <= 4 KiB)


def _estimate(config, named_args, **kwargs) -> dict:
    """Shared memory and registers per thread of one config of ``_nearest_code_fwd_kernel`` on
    the target GPU (:func:`kernels._common.target_for` the input's device).

    Shared memory: resident x (``ONE_D_BLOCK``): one ``BLOCK_N x D`` x tile plus the codebook
    tiles in flight, ``num_stages`` of them where the 16-bit dot is a wgmma (sm_90: every stage
    is a shared-memory buffer), ``num_stages - 1`` elsewhere (mma.sync and FMA dots load the
    current tile into registers). Streamed D: x and codebook chunks, ``num_stages`` of each.
    Sampling interleaves the 4 Philox words of a score tile through shared memory. "tf32x3": the
    split x tile (two parts) when resident, ``num_stages - 1`` loaded tiles in flight and the two
    split parts of the current one (matches ptxas's figures for sm_90)."""
    p_x = named_args["p_x"]
    elt = p_x.element_size()
    tgt = target_for(p_x.device)
    fam = arch_family(tgt)
    d = kwargs.get("BLOCK_D", 64)
    bn, bk, w, s = config.kwargs["BLOCK_N"], config.kwargs["BLOCK_K"], config.num_warps, config.num_stages
    sample = kwargs.get("SAMPLE", False)
    extra = bn * bk * 4 if sample else 0
    x3 = kwargs.get("PRECISION") == "tf32x3"
    if x3:  # the loaded tiles in flight (num_stages - 1) and the split parts the MMA reads (two of each)
        if kwargs.get("ONE_D_BLOCK", True):
            shared = (2 * bn + (s + 1) * bk) * d * 4 + _SCRATCH
        else:
            shared = (s + 1) * (bn + bk) * d * 4 + _SCRATCH
    elif kwargs.get("ONE_D_BLOCK", True):
        code_stages = s if (fam == "sm_90" and elt == 2) else s - 1
        shared = (bn + bk * code_stages) * d * elt + extra + _SCRATCH
    else:
        shared = (bn + bk) * s * d * elt + extra + _SCRATCH
    if x3:  # the listed registers (see _X3_REGS), _X3_UNLISTED (pruned) for a tile not listed
        layout = ("r32" if d <= 32 else "r64") if kwargs.get("ONE_D_BLOCK", True) else "s"
        layout += "" if _aligned(named_args) else "u"
        return {"shared": shared, "regs": _X3_REGS[(fam, layout)].get((bn, bk, w, s), _X3_UNLISTED)}
    variant = "bound" if kwargs.get("HAS_LOWER_BOUND", False) else "sample" if sample else "plain"
    model = _REGISTER_MODELS[(fam, 4 if elt == 4 else 2, variant)]
    regs = register_estimate(model, words_per_thread(bn, d, w, elt), words_per_thread(bn, bk, w))
    return {"shared": shared, "regs": regs}


def _prune_configs(configs, named_args, **kwargs):
    """Keep the configs of the input's own list (fp32 "tf32x3", other fp32, 16-bit, 16-bit sampling) that fit the
    target GPU's shared memory and registers by :func:`_estimate`; keep at least one. "tf32x3"
    weighs its mma.sync tile (``X3_FALLBACK``) only where none of its wgmma tiles fits."""
    p_x = named_args["p_x"]
    sample = kwargs.get("SAMPLE", False)
    x3 = kwargs.get("PRECISION") == "tf32x3"
    own = set(CONFIGS_X3 + [X3_FALLBACK] if x3 else CONFIGS_FP32 if p_x.element_size() == 4
              else CONFIGS_16BIT_SAMPLE if sample else CONFIGS_16BIT)

    def key(c):
        return (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)

    mine = [c for c in configs if key(c) in own] or list(configs)
    kept = prune_by_estimate(mine, lambda c: _estimate(c, named_args, **kwargs), target_for(p_x.device))
    return [c for c in kept if key(c) != X3_FALLBACK] or kept if x3 else kept


_prune_configs.estimate = _estimate


def _configs():
    seen = dict.fromkeys(CONFIGS_16BIT_SAMPLE + CONFIGS_FP32 + CONFIGS_X3)
    gpu = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s) for bn, bk, w, s in seen]
    return autotune_configs("nearest_code", gpu,
                            pinned=triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=8, num_stages=2),
                            interpreter=triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1))


# Keyed on D and K (never N); SPLITS, the precision (ieee vs tf32 fp32 dots differ several-fold)
# and the mining bound change the best tile too. The autotuner adds the tensors' dtypes itself.
# Tuned per (D, K rounded up to a power of two, ...): a new batch of negatives (mining) or a
# slightly different codebook size reuses the tuning instead of re-running every config.
@autotune(configs=_configs(), key=["D", "K_BUCKET", "SPLITS", "PRECISION", "HAS_LOWER_BOUND"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0, "EVEN_D": lambda a: a["D"] == a["BLOCK_D"]})
@triton.jit
def _nearest_code_fwd_kernel(
    p_x, p_c, p_chat, p_cterm, p_meta, p_pos, p_seed, p_idx, p_dist, p_pscore, p_pidx,
    N, K, D, H, SPLITS, K_BUCKET, temperature, temperature_exp,
    stride_xh, stride_xn, stride_xd, stride_ch, stride_ck, stride_cd, stride_pn, stride_pd,
    METRIC: tl.constexpr, HAS_LOWER_BOUND: tl.constexpr, SAMPLE: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
    ONE_D_BLOCK: tl.constexpr, SCALE_ROWS: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    NBANDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    EVEN_K: tl.constexpr, EVEN_D: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_s = tl.program_id(1).to(tl.int64)
    row_blocks = tl.cdiv(N, BLOCK_N)
    h = (pid // row_blocks).to(tl.int64)
    pid_n = (pid % row_blocks).to(tl.int64)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_xrow = h * stride_xh + o_n * stride_xn

    # This codebook's meta row: first finite code, whether the scaled copy is in use, dot unit 2^E,
    # smallest nonzero code max-abs.
    first = tl.load(p_meta + h * 4)
    use_hat = tl.load(p_meta + h * 4 + 1)
    e_unit = tl.load(p_meta + h * 4 + 2)
    c_min = tl.load(p_meta + h * 4 + 3).to(tl.float32, bitcast=True)
    p_cb = tl.where(use_hat != 0, p_chat, p_c) + h * stride_ch
    p_ct = p_cterm + h * (2 * NBANDS * K)

    # Row terms, once: cosine/dot scale each row by a power of two (their argmin ignores it);
    # l2 by its unit band's 2^-L (one unit per row, so that a codebook of any spread keeps the
    # scores that decide the row's code in range; a block of rows makes one pass over the
    # codebook per band it holds, one in practice); mining needs |x|^2 and the bound |x - p|^2,
    # in the row's unit.
    o_d = tl.arange(0, BLOCK_D)
    b_rs = tl.zeros((BLOCK_N,), dtype=tl.float32) + 1.0
    b_band = tl.zeros((BLOCK_N,), dtype=tl.int32)
    if SCALE_ROWS:
        b_xm, b_rs = _row_scale(p_x, o_xrow, m_n, D, stride_xd, BLOCK_N, BLOCK_D)
        if METRIC == 0 or METRIC == 3:
            b_band = tl.where(m_n, _row_band(b_xm, c_min), 0)
            b_rs = exp2i(-_band_unit(b_band))
    if HAS_LOWER_BOUND:
        # The constrained search (codes farther than the positive) runs in the unit band of
        # max(max|x|, max|p|, c_min), b_band_c (>= the row's band): in the row's own band |x - p|^2
        # could overflow (a row ~0 or ~1e-30 with its positive at ~10: the tiny unit 2^-96) and no
        # code would qualify. In practice b_band_c == b_band: no extra pass.
        b_band_c = b_band
        if SCALE_ROWS:
            b_pm = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                m_xd = m_n[:, None] & ((d0 + o_d) < D)[None, :]
                b_p = tl.load(p_pos + o_n[:, None] * stride_pn + (d0 + o_d)[None, :] * stride_pd, mask=m_xd,
                              other=0.0).to(tl.float32)
                b_pm = tl.maximum(b_pm, tl.max(tl.abs(b_p), axis=1))
            b_band_c = tl.where(m_n, _row_band(tl.maximum(b_xm, b_pm), c_min), 0)
        b_rs_c = exp2i(-_band_unit(b_band_c))
        b_xx = tl.zeros((BLOCK_N,), dtype=tl.float32)
        b_lb = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            m_xd = m_n[:, None] & ((d0 + o_d) < D)[None, :]
            b_x = tl.load(p_x + o_xrow[:, None] + (d0 + o_d)[None, :] * stride_xd, mask=m_xd,
                          other=0.0).to(tl.float32) * b_rs_c[:, None]
            b_p = tl.load(p_pos + o_n[:, None] * stride_pn + (d0 + o_d)[None, :] * stride_pd, mask=m_xd,
                          other=0.0).to(tl.float32) * b_rs_c[:, None]
            b_xx += tl.sum(b_x * b_x, axis=1)
            b_lb += tl.sum((b_x - b_p) * (b_x - b_p), axis=1)
        # a negative strictly farther than the positive scores above b_lb - b_xx; one within
        # twice the round-to-nearest bound of that comparison, (D + 8) 2^-23 (|x|^2 + |x - p|^2),
        # ties with the positive (a copy of it included) and is not "farther" (as in
        # mine_negatives_ref). (The former 32 D 2^-24, a worst case for truncating tensor-core
        # sums, rejected negatives farther than the positive by 8x the contract's rounding bound.)
        b_thr = (b_lb - b_xx) + (b_lb + b_xx) * ((D + 8) * 1.1920928955078125e-07)
    if SAMPLE:
        # distance / temperature = a * score + (row constant); Gumbel-max over -that. The
        # temperature arrives as its float32 mantissa in [1, 2) and its exponent (a float: no
        # specialisation per value), so 1 / T never overflows (T below 2^-126 took the nearest
        # code where softmax of tiny distances does not; fuzzA)
        t_e = (tl.zeros((BLOCK_N,), dtype=tl.float32) + temperature_exp).to(tl.int32)
        inv_s = rcp_rn(b_rs)  # l2: the row's unit 2^L, exactly
        if METRIC == 1:  # 1 - cos = 1 + score / |x'|
            b_q = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                m_xd = m_n[:, None] & ((d0 + o_d) < D)[None, :]
                b_x = tl.load(p_x + o_xrow[:, None] + (d0 + o_d)[None, :] * stride_xd, mask=m_xd, other=0.0)
                b_x = (b_x.to(tl.float32) * b_rs[:, None]).to(p_x.dtype.element_ty).to(tl.float32)
                b_q += tl.sum(b_x * b_x, axis=1)
            b_nx = tl.sqrt_rn(b_q)
            b_a = tl.where(b_nx > 0, _mul_exp2(rcp_rn(tl.where(b_nx > 0, b_nx, 1.0) * temperature), -t_e), 0.0)
        elif METRIC == 2:  # -(x.c) = score * 2^(e_x + E)
            if SCALE_ROWS:
                b_a = _mul_exp2(rcp_rn(tl.zeros((BLOCK_N,), dtype=tl.float32) + temperature),
                                pow2_exponent(b_xm) + e_unit - t_e)
            else:
                b_a = _mul_exp2(rcp_rn(tl.zeros((BLOCK_N,), dtype=tl.float32) + temperature), e_unit - t_e)
        elif METRIC == 3:  # |x - c| = sqrt(|x s|^2 + score) / s
            b_xx = tl.zeros((BLOCK_N,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                m_xd = m_n[:, None] & ((d0 + o_d) < D)[None, :]
                b_x = tl.load(p_x + o_xrow[:, None] + (d0 + o_d)[None, :] * stride_xd, mask=m_xd,
                              other=0.0).to(tl.float32) * b_rs[:, None]
                b_xx += tl.sum(b_x * b_x, axis=1)
            b_a = _mul_exp2(tl.math.div_rn(inv_s, tl.zeros_like(inv_s) + temperature), -t_e)
        else:  # |x - c|^2 = (|x s|^2 + score) / s^2
            b_a = _mul_exp2(tl.math.div_rn(inv_s, tl.zeros_like(inv_s) + temperature), -t_e) * inv_s
        b_w = (b_a <= 2.1267647932558654e37).to(tl.float32)  # 2^124 (NOISE_LIMIT): beyond, the nearest code
        b_a = tl.where(b_w > 0, b_a, 1.0)
        # both terms times 2^-sh (a' < 1/2): score * a' cannot overflow (|score| < 2^128) and the
        # Gumbel-max is unchanged (a power of two commutes with the rounding); the noise's factor
        # 2^-sh >= 2^-126 stays a normal float32 up to the limit
        b_sh = exp2i(-tl.maximum(pow2_exponent(b_a) + 2, 0))
        b_a = b_a * b_sh
        b_w = b_w * b_sh
        seed = tl.load(p_seed)

    # The x tile stays on chip while the codebook streams past.
    b_xt, b_xl = _x_tile(p_x, o_xrow, m_n, b_rs, D, stride_xd, ONE_D_BLOCK, SCALE_ROWS, PRECISION, DOT_FP32,
                         BLOCK_N, BLOCK_D)

    # This program's share of the codebook: whole BLOCK_K tiles, in increasing order.
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLITS)
    k_start = pid_s * tiles_per_split * BLOCK_K
    k_end = tl.minimum(k_start + tiles_per_split * BLOCK_K, K)

    b_best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    b_idx = tl.full((BLOCK_N,), -1, dtype=tl.int32)
    b_best_c = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    b_idx_c = tl.full((BLOCK_N,), -1, dtype=tl.int32)
    for band in range(0, NBANDS):  # one pass per unit band the block's rows hold (l2; else one)
        m_band = b_band == band
        m_pass = m_band
        if HAS_LOWER_BOUND:
            m_band_c = b_band_c == band
            m_pass = m_band | m_band_c
        if tl.max(m_pass.to(tl.int32), axis=0) > 0:
            b_rs_p = b_rs
            if HAS_LOWER_BOUND:
                # x.c in this pass's unit. Resident x: the row unit's times 2^(L_row - L_band) (1 for
                # the rows of this band; below 2^-126, only a row < 2^-48 with a positive > 2^49, 0:
                # x.c is then far below the rounding of |c|^2 for the codes near the positive).
                # Streamed x: its chunks are loaded in this band's unit (no multiply; registers:
                # the multiply spilled there, fp32 at 255).
                e_f = _band_unit(b_band) - _band_unit(b_band * 0 + band)
                b_f = tl.where(e_f < -126, 0.0, exp2i(e_f))
                b_rs_p = exp2i(-_band_unit(b_band * 0 + band))
            p_ca = p_ct + band * K  # this band's per-code terms a, b
            p_cf = p_ct + (NBANDS + band) * K
            r_best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
            r_idx = tl.full((BLOCK_N,), -1, dtype=tl.int32)
            r_best_c = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
            r_idx_c = tl.full((BLOCK_N,), -1, dtype=tl.int32)
            for k0 in range(k_start, k_end, BLOCK_K):
                o_k = k0 + tl.arange(0, BLOCK_K)
                m_k = o_k < k_end
                b_xc = _tile_xc(b_xt, b_xl, p_x, o_xrow, m_n, p_cb, o_k, m_k, b_rs_p, D, stride_xd, stride_ck, stride_cd,
                                ONE_D_BLOCK, SCALE_ROWS, PRECISION, DOT_FP32, BLOCK_N, BLOCK_K, BLOCK_D,
                                EVEN_K, EVEN_D and ONE_D_BLOCK)
                if HAS_LOWER_BOUND and ONE_D_BLOCK and SCALE_ROWS:  # (float16: one unit, f = 1)
                    b_xc = b_xc * b_f[:, None]
                b_s = _scores(b_xc, p_ca, p_cf, o_k, m_k, EVEN_K)
                if SAMPLE:
                    if METRIC == 3:
                        b_s = tl.sqrt(nan_max0(b_xx[:, None] + b_s))
                    b_s = b_s * b_a[:, None] - b_w[:, None] * _gumbel(seed, o_n, k0, h, BLOCK_N, BLOCK_K)
                r_best, r_idx = argmin_merge(r_best, r_idx, b_s, k0, BLOCK_K)
                if HAS_LOWER_BOUND:  # only codes strictly farther than the positive
                    # (one fused min-with-index here: +inf, not NaN, marks the codes left out, so the
                    # comparison-based combine needs no NaN handling; measured cheaper than two mins)
                    # (a score that overflowed to +inf, |c|^2 past float32 in the row's unit, is a
                    # code farther than any finite threshold: it competes at float32's max)
                    b_mc, b_jc = tl.min(tl.where(b_s > b_thr[:, None], tl.minimum(b_s, 3.4028234663852886e38),
                                                 float("inf")), axis=1,
                                        return_indices=True, return_indices_tie_break_left=True)
                    r_best_c, r_idx_c = argmin_merge_pair(r_best_c, r_idx_c, b_mc, (k0 + b_jc).to(tl.int32))
            b_best = tl.where(m_band, r_best, b_best)
            b_idx = tl.where(m_band, r_idx, b_idx)
            if HAS_LOWER_BOUND:
                b_best_c = tl.where(m_band_c, r_best_c, b_best_c)
                b_idx_c = tl.where(m_band_c, r_idx_c, b_idx_c)

    o_out = h * N + o_n
    if WRITE_PARTIAL:  # partials laid out [track][split][codebook, row]
        o_p = pid_s * H * N + o_out
        tl.store(p_pscore + o_p, b_best, mask=m_n)
        tl.store(p_pidx + o_p, b_idx, mask=m_n)
        if HAS_LOWER_BOUND:
            o_pc = (pid_s + SPLITS) * H * N + o_out
            tl.store(p_pscore + o_pc, b_best_c, mask=m_n)
            tl.store(p_pidx + o_pc, b_idx_c, mask=m_n)
    else:
        if HAS_LOWER_BOUND:
            b_idx = tl.where(b_idx_c >= 0, b_idx_c, b_idx)
        # (D in chunks of at most 32: the epilogue's tiles are not the loop's, registers stay free)
        _finish(p_x, o_xrow, m_n, p_c, o_n * 0 + h * stride_ch, b_idx, tl.zeros((BLOCK_N,), dtype=tl.int32) + first,
                p_idx, p_dist, o_out, K, D, stride_xd, stride_ck, stride_cd, METRIC, BLOCK_N,
                BLOCK_D if BLOCK_D < 32 else 32)


@triton.jit
def _nearest_code_reduce_kernel(p_x, p_c, p_meta, p_pscore, p_pidx, p_idx, p_dist, N, K, D, H, SPLITS,
                                stride_xh, stride_xn, stride_xd, stride_ch, stride_ck, stride_cd,
                                METRIC: tl.constexpr, HAS_LOWER_BOUND: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the per-split partial (min, index) pairs in split order (strict <: smallest index
    wins), then the per-row epilogue. Rows of all codebooks, flattened."""
    pid = tl.program_id(0).to(tl.int64)
    o = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    HN = H * N
    m = o < HN
    b_best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    b_idx = tl.full((BLOCK_N,), -1, dtype=tl.int32)
    b_best_c = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    b_idx_c = tl.full((BLOCK_N,), -1, dtype=tl.int32)
    for split in range(0, SPLITS):
        o_p = split * HN + o
        b_best, b_idx = argmin_merge_pair(b_best, b_idx, tl.load(p_pscore + o_p, mask=m, other=float("inf")),
                                          tl.load(p_pidx + o_p, mask=m, other=-1))
        if HAS_LOWER_BOUND:
            o_pc = (split + SPLITS) * HN + o
            b_best_c, b_idx_c = argmin_merge_pair(b_best_c, b_idx_c,
                                                  tl.load(p_pscore + o_pc, mask=m, other=float("inf")),
                                                  tl.load(p_pidx + o_pc, mask=m, other=-1))
    if HAS_LOWER_BOUND:
        b_idx = tl.where(b_idx_c >= 0, b_idx_c, b_idx)
    h = o // N
    n = o % N
    b_first = tl.load(p_meta + h * 4, mask=m, other=0)
    _finish(p_x, h * stride_xh + n * stride_xn, m, p_c, h * stride_ch, b_idx, b_first, p_idx, p_dist, o, K, D,
            stride_xd, stride_ck, stride_cd, METRIC, BLOCK_N, BLOCK_D)


@triton.jit
def _overflow_scores(b_v, b_xc, p_ct, K, band, o_k, m_k):
    """float64 l2 top-k values: the scores (row unit 2^2L, float32) where they overflow to +inf
    recomputed from the next units up (band 2 -> 0 -> 1, 2^96 apart: x' 2^-96 per step) and scaled
    back to the row's unit exactly, so far codes keep their order instead of tying at +inf."""
    U: tl.constexpr = 79228162514264337593543950336.0  # 2^96
    b_v = b_v.to(tl.float64)
    x64 = b_xc.to(tl.float64)
    a1 = tl.load(p_ct + 1 * K + o_k, mask=m_k, other=float("nan")).to(tl.float64)
    b1 = tl.load(p_ct + 4 * K + o_k, mask=m_k, other=0.0).to(tl.float64)
    if band == 2:
        a0 = tl.load(p_ct + 0 * K + o_k, mask=m_k, other=float("nan")).to(tl.float64)
        b0 = tl.load(p_ct + 3 * K + o_k, mask=m_k, other=0.0).to(tl.float64)
        s0 = (a0[None, :] + (b0 / U)[None, :] * x64) * U * U
        b_v = tl.where(b_v == float("inf"), s0, b_v)
        s1 = (a1[None, :] + (b1 / U / U)[None, :] * x64) * U * U * U * U
        b_v = tl.where(b_v == float("inf"), s1, b_v)
    else:
        s1 = (a1[None, :] + (b1 / U)[None, :] * x64) * U * U
        b_v = tl.where(b_v == float("inf"), s1, b_v)
    return b_v


@triton.jit
def _topk_codes_fwd_kernel(
    p_x, p_c, p_chat, p_cterm, p_meta, p_idx, p_dist,
    N, K, D, KK,
    stride_xh, stride_xn, stride_xd, stride_ch, stride_ck, stride_cd,
    METRIC: tl.constexpr, ONE_D_BLOCK: tl.constexpr, SCALE_ROWS: tl.constexpr, PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr, NBANDS: tl.constexpr, KP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, FIN_D: tl.constexpr,
):
    """The ``KK`` nearest codes of each row: the nearest-code search's scores (float64 values:
    l2 scores past the row's unit recomputed in the units above, ``_overflow_scores``), kept in a
    running set of ``KK`` (value, key) slots per row. A tile is merged by extracting its best remaining
    element while it beats some row's worst slot (all rows at once; a tile that improves no row
    costs one min), so late tiles cost little. Key = code index, plus 2^30 for a code with a
    non-finite entry: those rank after every finite code; a row with a non-finite entry ranks
    every code at +inf (by key); a row with a NaN is given 0..KK-1 at the end."""
    pid = tl.program_id(0)
    row_blocks = tl.cdiv(N, BLOCK_N)
    h = (pid // row_blocks).to(tl.int64)
    pid_n = (pid % row_blocks).to(tl.int64)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_xrow = h * stride_xh + o_n * stride_xn
    use_hat = tl.load(p_meta + h * 4 + 1)
    c_min = tl.load(p_meta + h * 4 + 3).to(tl.float32, bitcast=True)
    p_cb = tl.where(use_hat != 0, p_chat, p_c) + h * stride_ch
    p_ct = p_cterm + h * (2 * NBANDS * K)

    b_xm, m_nan, m_bad = _row_flags(p_x, o_xrow, m_n, D, stride_xd, BLOCK_N, FIN_D)
    b_rs = tl.zeros((BLOCK_N,), dtype=tl.float32) + 1.0
    b_band = tl.zeros((BLOCK_N,), dtype=tl.int32)
    if SCALE_ROWS:
        if METRIC == 0 or METRIC == 3:  # the row's l2 unit band (see the nearest-code kernel)
            b_band = tl.where(m_n, _row_band(b_xm, c_min), 0)
            b_rs = exp2i(-_band_unit(b_band))
        else:
            b_rs = exp2i(-pow2_exponent(b_xm))
    b_xt, b_xl = _x_tile(p_x, o_xrow, m_n, b_rs, D, stride_xd, ONE_D_BLOCK, SCALE_ROWS, PRECISION, DOT_FP32,
                         BLOCK_N, BLOCK_D)

    BIG: tl.constexpr = 2147483647
    o_slot = tl.arange(0, KP)
    m_slot = (o_slot < KK)[None, :] & (o_n >= 0)[:, None]
    b_tv = tl.where(m_slot, float("inf"), float("-inf")).to(tl.float64)  # slots past KK are never the worst
    b_ti = tl.where(m_slot, BIG, -1)
    b_wv = tl.full((BLOCK_N,), float("inf"), dtype=tl.float64)  # the worst slot: value, key, position
    b_wi = tl.full((BLOCK_N,), BIG, dtype=tl.int32)
    b_wp = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for band in range(0, NBANDS):  # one pass per unit band the block's rows hold (l2; else one)
        m_band = b_band == band
        if tl.max(m_band.to(tl.int32), axis=0) > 0:
            p_ca = p_ct + band * K
            p_cf = p_ct + (NBANDS + band) * K
            for k0 in range(0, K, BLOCK_K):
                o_k = k0 + tl.arange(0, BLOCK_K)
                m_k = o_k < K
                b_xc = _tile_xc(b_xt, b_xl, p_x, o_xrow, m_n, p_cb, o_k, m_k, b_rs, D, stride_xd, stride_ck, stride_cd,
                                ONE_D_BLOCK, SCALE_ROWS, PRECISION, DOT_FP32, BLOCK_N, BLOCK_K, BLOCK_D)
                b_s = _scores(b_xc, p_ca, p_cf, o_k, m_k)
                b_s64 = b_s.to(tl.float64)
                if NBANDS == 3:  # l2: scores past the row's unit ordered in the units above
                    if band != 1:
                        if tl.max(tl.max(((b_s == float("inf")) & m_band[:, None]).to(tl.int32), axis=1), axis=0) > 0:
                            b_s64 = _overflow_scores(b_s, b_xc, p_ct, K, band, o_k, m_k)
                b_ct = tl.load(p_ca + o_k, mask=m_k, other=0.0)
                b_key = (o_k + tl.where(b_ct == b_ct, 0, 1073741824)).to(tl.int32)
                b_v = tl.where((b_s == b_s) & ~m_bad[:, None], b_s64, float("inf"))
                b_v = tl.where(m_k[None, :], b_v, float("nan"))  # past K: never extracted
                b_m = tl.min(b_v, axis=1)
                b_j = tl.min(tl.where(b_v == b_m[:, None], b_key[None, :], BIG), axis=1)
                m_better = ((b_m < b_wv) | ((b_m == b_wv) & (b_j < b_wi))) & m_band
                while tl.max(m_better.to(tl.int32), axis=0) > 0:
                    m_ins = m_better[:, None] & (o_slot[None, :] == b_wp[:, None])
                    b_tv = tl.where(m_ins, b_m[:, None], b_tv)
                    b_ti = tl.where(m_ins, b_j[:, None], b_ti)
                    b_wv = tl.max(b_tv, axis=1)
                    b_wi = tl.max(tl.where(b_tv == b_wv[:, None], b_ti, -2), axis=1)
                    b_wp = tl.min(tl.where((b_tv == b_wv[:, None]) & (b_ti == b_wi[:, None]), o_slot[None, :], KP),
                                  axis=1)
                    b_v = tl.where(b_key[None, :] == b_j[:, None], float("nan"), b_v)
                    b_m = tl.min(b_v, axis=1)
                    b_j = tl.min(tl.where(b_v == b_m[:, None], b_key[None, :], BIG), axis=1)
                    m_better = ((b_m < b_wv) | ((b_m == b_wv) & (b_j < b_wi))) & m_band

    # out: the slots in increasing (value, key), each with its distance computed directly
    o_out = (h * N + o_n) * KK
    b_tv = tl.where(m_slot, b_tv, float("nan"))  # slots past KK: out of the sort
    b_ti = tl.where(m_slot, b_ti, BIG)
    for r in range(0, KK):
        b_mv = tl.min(b_tv, axis=1)
        b_mk = tl.min(tl.where(b_tv == b_mv[:, None], b_ti, BIG), axis=1)
        b_tv = tl.where(b_ti == b_mk[:, None], float("nan"), b_tv)
        b_ti = tl.where(b_ti == b_mk[:, None], BIG, b_ti)
        b_idx = tl.minimum(tl.where(m_nan, r, b_mk & 1073741823), K - 1)  # (every slot is filled: K >= KK)
        p_row = p_c + h * stride_ch + b_idx.to(tl.int64) * stride_ck
        b_dist = _distance(p_x, o_xrow, m_n, p_row, b_xm, D, stride_xd, stride_cd, METRIC, BLOCK_N, FIN_D)
        tl.store(p_idx + o_out + r, b_idx.to(tl.int64), mask=m_n)
        tl.store(p_dist + o_out + r, b_dist, mask=m_n)


# --------------------------------------------------------------------------- launchers


def num_splits(N: int, K: int, device: torch.device) -> int:
    """Codebook splits: 1 when the row blocks fill the GPU (2 programs per SM), else enough
    splits to fill it, each with at least ``SPLIT_MIN_CODES`` codes, at most ``MAX_SPLITS``.
    ``N`` counts the rows of all codebooks."""
    row_blocks = triton.cdiv(N, _SPLIT_BLOCK_N)
    want = 2 * sm_count(device)
    if row_blocks >= want:
        return 1
    return max(1, min(triton.cdiv(want, row_blocks), triton.cdiv(K, SPLIT_MIN_CODES), MAX_SPLITS))


def _dense(t: torch.Tensor) -> bool:
    """A dense, non-overlapping layout (then ``torch.empty_like(t)`` has ``t``'s strides)."""
    expected = 1
    for size, stride in sorted(((sz, st) for sz, st in zip(t.shape, t.stride()) if sz > 1), key=lambda p: p[1]):
        if stride != expected:
            return False
        expected *= size
    return True


def prepare_codebook(codebook: torch.Tensor, metric: str):
    """The two pre-passes: ``(codebook, scaled copy, (H, K) terms, (H, 4) int32 meta)``.

    ``codebook`` (H, K, D) is returned made dense when a scaled copy might be needed (the copy
    shares its strides, so the main kernel switches between them by pointer only).
    """
    H, K, D = codebook.shape
    dev = codebook.device
    m = METRIC_IDS[metric]
    can_scale = codebook.dtype != torch.float16
    if can_scale and not _dense(codebook):
        codebook = codebook.contiguous()
    NB = min(triton.cdiv(K, PREP_BLOCK_K), PREP_MAX_BLOCKS)
    KB = triton.cdiv(K, PREP_BLOCK_K)
    cterm = torch.empty((H, 2, NBANDS[metric], K), dtype=torch.float32, device=dev)  # a, b per unit band
    pmax = torch.empty((H, NB), dtype=torch.float32, device=dev)
    pmin = torch.empty((H, NB), dtype=torch.float32, device=dev)
    pfirst = torch.empty((H, NB), dtype=torch.int32, device=dev)
    meta = torch.empty((H, META_COLS), dtype=torch.int32, device=dev)
    chat = torch.empty_like(codebook) if can_scale else codebook
    # A codebook whose rows are not 16-element aligned loads element by element, one 64-bit
    # address each: at 64-wide chunks and 4 warps the l2 terms pass spilled 600-816 B (sm_90 and
    # sm_80, D = 60 and 100); 32-wide chunks at 8 warps compile to 62-128 registers there.
    aligned = codebook.data_ptr() % 16 == 0 and codebook.stride(0) % 16 == 0 and codebook.stride(1) % 16 == 0
    BLOCK_DP = min(max(next_pow2(D), 16), 64 if aligned else 32)
    PREP_WARPS = 4 if aligned else 8
    _code_terms_kernel[(H * NB,)](
        codebook, cterm, pmax, pmin, pfirst, K, D, NB, codebook.stride(0), codebook.stride(1), codebook.stride(2),
        METRIC=m, NBANDS=NBANDS[metric], BLOCK_K=PREP_BLOCK_K, BLOCK_D=BLOCK_DP, num_warps=PREP_WARPS,
    )
    _code_rescale_kernel[(H * KB,)](
        codebook, chat, cterm, pmax, pmin, pfirst, meta, K, D, NB, KB, max(D - 1, 0).bit_length(),
        codebook.stride(0), codebook.stride(1), codebook.stride(2),
        METRIC=m, NBANDS=NBANDS[metric], CAN_SCALE=can_scale, TAME=TAME_EXP, BLOCK_K=PREP_BLOCK_K,
        BLOCK_D=BLOCK_DP, BLOCK_B=PREP_MAX_BLOCKS, num_warps=PREP_WARPS,
    )
    return codebook, chat, cterm, meta


def temperature_parts(temperature: float) -> tuple[float, float]:
    """``(m, e)`` with ``temperature = m 2^e``, ``m`` in [1, 2) (rounded to float32 by the launch)
    and ``e`` an integer held in a float, within [-1000, 1000] (beyond, every factor it scales
    saturates to 0 or +inf either way); ``(0, 0)`` for 0."""
    if not temperature > 0:
        return 0.0, 0.0
    m, e = math.frexp(temperature)
    return 2.0 * m, float(min(max(e - 1, -1000), 1000))


def _launch(x, codebook, metric, allow_tf32, positive, splits, seed=None, temperature=0.0):
    """``x`` (H, N, D), ``codebook`` (H, K, D) -> (H, N) int64 indices, (H, N) float32 distances.
    ``positive``: mining's bound; ``seed`` (0-d int64) and ``temperature > 0``: Gumbel-max sampling."""
    H, N, D = x.shape
    K = codebook.shape[1]
    dev = x.device
    m = METRIC_IDS[metric]
    has_lb = positive is not None
    # allocate
    indices = torch.empty((H, N), dtype=torch.int64, device=dev)
    distances = torch.empty((H, N), dtype=torch.float32, device=dev)
    if N == 0 or H == 0:
        return indices, distances
    # launch: the pre-passes (per-code terms, scaled copy where needed) ...
    codebook, chat, cterm, meta = prepare_codebook(codebook, metric)
    # ... the streaming kernel ...
    assert splits is None or (isinstance(splits, int) and not isinstance(splits, bool) and splits >= 1), \
        f"splits must be a positive int, got {splits!r}"
    S = num_splits(H * N, K, dev) if splits is None else splits
    # float32: the plain search splits its operands for three TF32 products ("tf32x3", where the
    # GPU has TF32 tensor cores); mining and sampling keep the exact FMA dot
    precision = tl_input_precision(x.dtype, allow_tf32, split_on=dev if not has_lb and seed is None else None)
    one_d = D <= (RESIDENT_MAX_D_X3 if precision == "tf32x3" else RESIDENT_MAX_D)
    BLOCK_D = max(next_pow2(D), 16) if one_d else (STREAM_D_X3 if precision == "tf32x3" else 64)
    tracks = 2 if has_lb else 1
    if S > 1:
        pscore = torch.empty((tracks, S, H * N), dtype=torch.float32, device=dev)
        pidx = torch.empty((tracks, S, H * N), dtype=torch.int32, device=dev)
    else:
        pscore, pidx = distances, indices  # unused
    pos = positive if has_lb else x[0]
    sample = seed is not None
    _nearest_code_fwd_kernel[lambda meta_: (H * triton.cdiv(N, meta_["BLOCK_N"]), S)](
        x, codebook, chat, cterm, meta, pos, seed if sample else meta, indices, distances, pscore, pidx,
        N, K, D, H, S, next_pow2(K), *temperature_parts(temperature),
        x.stride(0), x.stride(1), x.stride(2), codebook.stride(0), codebook.stride(1), codebook.stride(2),
        pos.stride(0), pos.stride(1),
        METRIC=m, HAS_LOWER_BOUND=has_lb, SAMPLE=sample, WRITE_PARTIAL=S > 1, ONE_D_BLOCK=one_d,
        SCALE_ROWS=x.dtype != torch.float16, NBANDS=NBANDS[metric],
        PRECISION=precision, DOT_FP32=dot_fp32(x.dtype), BLOCK_D=BLOCK_D,
    )
    # ... and, when the codebook was split, the merge of the partials and the epilogue.
    if S > 1:
        BLOCK_NR = 64
        _nearest_code_reduce_kernel[(triton.cdiv(H * N, BLOCK_NR),)](
            x, codebook, meta, pscore, pidx, indices, distances, N, K, D, H, S,
            x.stride(0), x.stride(1), x.stride(2), codebook.stride(0), codebook.stride(1), codebook.stride(2),
            METRIC=m, HAS_LOWER_BOUND=has_lb, BLOCK_N=BLOCK_NR,
            # (rows whose loads do not vectorise, D = 300 in 16 bits: 64-wide chunks spilled 120-216 B)
            BLOCK_D=min(BLOCK_D, 64 if rows_vectorise(x, codebook) else 32),
        )
    return indices, distances


def _check(fn, x, codebook, metric):
    assert x.dim() == 3 and codebook.dim() == 3 and x.shape[0] == codebook.shape[0] \
        and x.shape[2] == codebook.shape[2], f"{fn}: shapes {tuple(x.shape)} and {tuple(codebook.shape)}"
    assert codebook.shape[1] > 0, f"{fn}: empty codebook"
    assert x.dtype == codebook.dtype, f"{fn}: dtypes differ: {x.dtype} and {codebook.dtype}"
    assert metric in METRIC_IDS, f"{fn}: unknown metric {metric!r}"


@launcher
def nearest_code_fwd(x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", allow_tf32: bool = False,
                     splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, D), (K, D) -> (N,), (N,)`` or, for H codebooks, ``(H, N, D), (H, K, D) -> (H, N), (H, N)``:
    int64 indices and float32 distances. Same dtype and device (checked by the op).

    ``splits`` forces the number of codebook splits (default: :func:`num_splits`).
    """
    two_d = x.dim() == 2
    if two_d:
        x, codebook = x.unsqueeze(0), codebook.unsqueeze(0)
    _check("nearest_code_fwd", x, codebook, metric)
    indices, distances = _launch(x, codebook, metric, allow_tf32, None, splits)
    return (indices[0], distances[0]) if two_d else (indices, distances)


@launcher
def mine_negatives_fwd(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                       strategy: str = "hardest", splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, D), (N, D), (M, D) -> (N,) int64, (N,) float32`` squared distances. Same dtype and device.

    The nearest-code kernel (l2) with a per-row lower bound ``|a - p|^2`` for "semi-hard".
    """
    _check("mine_negatives_fwd", anchor.unsqueeze(0), negatives.unsqueeze(0), "l2")
    assert positive.shape == anchor.shape and positive.dtype == anchor.dtype, "mine_negatives_fwd: positive"
    assert strategy in _STRATEGY_BOUND, f"mine_negatives_fwd: unknown strategy {strategy!r}"
    indices, distances = _launch(anchor.unsqueeze(0), negatives.unsqueeze(0), "l2", False,
                                 positive if _STRATEGY_BOUND[strategy] else None, splits)
    return indices[0], distances[0]


@launcher
def topk_codes_fwd(x: torch.Tensor, codebook: torch.Tensor, k: int, metric: str = "l2",
                   allow_tf32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H, N, D), (H, K, D) -> (H, N, k) int64, (H, N, k) float32``: the k nearest codes, nearest first."""
    _check("topk_codes_fwd", x, codebook, metric)
    H, N, D = x.shape
    K = codebook.shape[1]
    assert 1 <= k <= K and K < 2**30, f"topk_codes_fwd: k = {k}, K = {K}"
    dev = x.device
    indices = torch.empty((H, N, k), dtype=torch.int64, device=dev)
    distances = torch.empty((H, N, k), dtype=torch.float32, device=dev)
    if N == 0 or H == 0:
        return indices, distances
    codebook, chat, cterm, meta = prepare_codebook(codebook, metric)
    m = METRIC_IDS[metric]
    precision = tl_input_precision(x.dtype, allow_tf32)
    # Fixed tiles, compiled for sm_90 and sm_80 and checked for spills (sm90-static.json).
    # fp32's exact dot runs on the FMA units, where Triton holds both operands for the whole
    # reduction (D) in registers: against a resident 64 x 256 x tile ptxas spilled ~10 KB per
    # thread, so D is streamed in chunks of at most 32, on 32 x 32 tiles at 8 warps. 16-bit (and
    # tf32) keeps x resident; sm_80 (mma.sync) takes 32-code tiles (64 spilled at 255 registers).
    one_d = D <= RESIDENT_MAX_D and precision != "ieee"
    BLOCK_D = max(next_pow2(D), 16) if one_d else min(max(next_pow2(D), 16), 64 if precision != "ieee" else 32)
    KP = max(next_pow2(k), 2)
    if x.dtype == torch.float32:
        gpu = 32, 32, 8  # 64 x 32 reached 255 registers and spilled 8-16 B with triton 3.6 (float64 top-k values)
    else:
        block_k = 64 if arch_family(target_for(x.device)) == "sm_90" else 32
        # 64-row tiles spilled (float64 top-k values: the l2 scale tiers); rows whose loads do not
        # vectorise (D = 300) spilled 24-112 B at 4 warps on sm_90, none at 8 (207-211 registers)
        gpu = (32, block_k, 4 if rows_vectorise(x, codebook) else 8)
    BLOCK_N, BLOCK_K, num_warps = interpreter_or((32, 32, 4), gpu)
    _topk_codes_fwd_kernel[(H * triton.cdiv(N, BLOCK_N),)](
        x, codebook, chat, cterm, meta, indices, distances, N, K, D, k,
        x.stride(0), x.stride(1), x.stride(2), codebook.stride(0), codebook.stride(1), codebook.stride(2),
        METRIC=m, ONE_D_BLOCK=one_d, SCALE_ROWS=x.dtype != torch.float16,
        PRECISION=precision, DOT_FP32=dot_fp32(x.dtype), NBANDS=NBANDS[metric], KP=KP,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D, FIN_D=min(BLOCK_D, 32), num_warps=num_warps,
    )
    return indices, distances


@launcher
def sample_code_fwd(x: torch.Tensor, codebook: torch.Tensor, seed: torch.Tensor, temperature: float,
                    metric: str = "l2", allow_tf32: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """``(H, N, D), (H, K, D), () int64 seed -> (H, N) int64, (H, N) float32``: Gumbel-max sampling
    with probability ``softmax(-distance / temperature)``, ``temperature > 0`` (the op routes 0 to
    the plain search)."""
    _check("sample_code_fwd", x, codebook, metric)
    assert temperature > 0 and seed.dim() == 0 and seed.dtype == torch.int64, "sample_code_fwd: temperature/seed"
    return _launch(x, codebook, metric, allow_tf32, None, None, seed=seed.to(x.device), temperature=temperature)
