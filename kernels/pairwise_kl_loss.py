"""Pairwise-geometry KL loss, flash style: the B x B similarity matrices never reach memory.

Notation (as in :mod:`fastvq.reference.pairwise_kl_loss`): ``s_ij = pred_i . pred_j / T``,
``t_ij = target_i . target_j / T``; row ``i`` takes a softmax over ``j != i``.

Forward: each program owns BLOCK_M rows and streams the batch in BLOCK_N column tiles. Per
tile it forms the ``s`` and ``t`` tiles with two dots (streaming Dp and Dt in chunks), drops
the diagonal and the padding, and updates three online quantities per row: the logsumexp of
``s`` (running max + sum), the logsumexp of ``t``, and ``sum_j exp(t_ij - m_t) ((t_ij - m_t) - (s_ij - m_p))``,
rescaled and shifted whenever a running max moves. At the end

    KL_i = E_q[(t_ij - m_t) - (s_ij - m_p)] - log(l_t) + log(l_p)

(``m``: running maxima, ``l``: running sums of exponentials, ``lse = m + log(l)``)

and the program stores ``KL_i`` and each softmax's normaliser in two parts, the row's largest
logit ``m`` and ``log(l)`` (``lse = m + log(l)``; kept apart because at logits ~1e38 the sum
rounds ``log(l)`` away and the backward's probabilities would come out ``l`` times too large):
five float64 a row, ``KL_i / B`` summed in float64 by the launcher and rounded once (and the
launcher the rows' ``max |x_i|``, two more, for the backward's scaling). float64 because a wide
pair's logit (below) may lie beyond float32, and so the row's largest logit and its KL.

Scaling (as in the reference): the gram dots read row-scaled copies ``u_i = x_i 2^-e_i`` made
by the launcher from the rows' maxima (which the op reads once, with its finiteness check, and
the forward saves for the backward); forward and backward each read pred and target and write
the copies: at B = 256, D = 64, 8.1 -> 17.3 passes over pred in all (`fastvq bench --traffic`; 20.3
with the wide rows' raw-input arguments, see below, which ordinary inputs never read; 20.7 with the
float64 normalisers and row KLs, O(B)),
O(B D) against the kernels' O(B^2 D)
work, and the kernels' pipelined loads stay untouched; float16 inputs, whose products cannot
overflow float32, are read as they are), and a logit is ``((u_i . u_j) R_i) C_j`` with
``R_i = m 2^(e_i + fa)``, ``C_j = 2^(e_j + fb)`` built from the int32 exponents, both within
``2^+-62``: one more multiply per logit, no intermediate overflow. The forward keeps its logits at a scale ``c = 2^-(k+1)``,
``2^k > B + 1`` (folded into ``m``; the exponentials take ``exp2(x * log2(e) / c)``, the
multiply ``exp`` does anyway): then ``(t - m_t) - (s - m_p)`` and the running sum over B
columns cannot overflow where the logits are representable. A pair whose target weight is an
exact 0 adds 0 (not ``0 * inf``).

Wide rows (``fastvq.reference.pairwise_kl_loss.wide_rows``: pred's or target's exponent clamped
at the top, where ``|u| > 1`` and the float32 products can overflow or flush a partner's tiny
entries, or so large that ``R_i C_j`` could reach 2^110 and the scaled sum underflow): every
pair of such a row takes both logits from a float64 dot of the inputs as given (``p_xp``,
``p_xt``; float32/bf16 products are exact in float64), rounded once to float32 where float32
holds it and kept in float64 beyond (rows ~1e20: logits ~1e40). The main loop sets them to -inf
(no probability) and notes (one scalar per tile, from the O(BLOCK_N) test of the columns'
exponents it makes anyway) whether it met one; only then does a second loop, over narrow
16-column tiles, add them. That loop carries the row block's online state in float64 (converted
once per program, O(BLOCK_M)): the shifts ``x - m`` and the KL terms are float64, the
exponentials float32; the backward's takes ``x - m`` against the float64 row maxima. The main
loops read the normalisers as float32 (a row maximum beyond float32 is +inf there: probability 0,
as exactly). Ordinary inputs never enter the second loop and pay for it only in registers
(sm_90, triton 3.8: the kept fp32 configs compile within 8 registers of before, no spills).
Per row, not per tile, so the forward and the backward (tiled differently) form the same
logits; in a loop of their own, because formed inside the main loop the float64 tile spilled
registers. The raw inputs are kernel arguments read only there (the traffic meter
counts every tensor argument as read: `fastvq bench --traffic` shows them as two more passes in
the forward and one in the backward for float32/bf16, which ordinary inputs never make).

Backward: ``dL/dpred_i = g / (B T) * sum_j (G_ij + G_ji) pred_j`` with
``G_ij = exp((s_ij - m_p[i]) - log l_p[i]) - exp((t_ij - m_t[i]) - log l_t[i])`` off the diagonal
(each an ``exp2`` of one subtraction and one FMA, as ``exp(s - lse)`` was). Because ``s`` and
``t`` are symmetric, the tile that gives ``G_ij`` also gives ``G_ji`` (the same exponentials,
normalised by the column's saved logsumexps), so one kernel, one pass over column tiles per
row tile, produces ``(G + G^T) @ pred`` with no B x B matrix and no atomics. The second grid
axis splits Dp in BLOCK_DO chunks when Dp is wide (the tiles are then recomputed per chunk).
"""

import math

import torch
import triton
import triton.language as tl

from ._common import (arch_family, autotune, autotune_configs, dot_fp32, dot_nt, exp2i, flat_grid, flat_program_id,
                      launcher, next_pow2, pow2_exponent, prune_by_estimate, register_estimate, target_for,
                      tl_input_precision, words_per_thread)


def _config(m, n, w, s):
    return triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)


# Separate lists for 16-bit and float32 inputs (the early prune keeps the input's own), each
# checked to compile for sm_90 without register spills at the launcher's largest tiles (16-bit:
# BLOCK_D 64, BLOCK_DO 128; float32: BLOCK_D 32, BLOCK_DO 64). float32 dots are exact IEEE FMA
# dots with both operands in registers, so float32 takes narrower D chunks and more warps per tile.
_FWD_16 = [_config(64, 64, 4, 2), _config(64, 32, 4, 3), _config(128, 64, 8, 2), _config(128, 32, 4, 2)]
_FWD_32 = [_config(64, 64, 8, 2), _config(64, 64, 8, 3), _config(64, 32, 4, 2), _config(128, 32, 8, 2)]
_BWD_16 = [_config(64, 64, 8, 2), _config(64, 32, 4, 3), _config(32, 64, 4, 2), _config(128, 32, 8, 2)]
_BWD_32 = [_config(64, 64, 8, 2), _config(64, 64, 8, 3), _config(64, 32, 8, 2), _config(32, 32, 4, 2)]
_FP32_CONFIGS = {id(c) for c in _FWD_32 + _BWD_32}
MAX_BLOCK_D = {4: 32, 2: 64}  # by element size: D chunk of the gram dots
MAX_BLOCK_DO = {4: 64, 2: 128}  # by element size: output columns per program of the backward


# Registers per thread = base + a * T + b * O + c * G (T: words of one BLOCK_M x BLOCK_N logit
# tile; O: the dot operands' chunks, BLOCK_M x BLOCK_D and BLOCK_N x BLOCK_D; G: the backward's
# BLOCK_M x BLOCK_DO gradient accumulator), by target family and pass. Fitted to ptxas (sm_80 and
# sm_90, triton 3.6 and 3.8) at the benchmark shapes (float32), bounding it from above. The sm_90
# bases rose by 42 (fwd) and 44 (bwd) with the row-scaled logits (issue 9: per-row and per-column
# factors R_i C_j, the normalisers in two parts), refitted on triton 3.8. The wide rows' float64
# loop (issue 9) raised the sm_90 backward base 94 -> 105 (64 x 32 8-warp at Dp = 32: 190 with
# triton 3.8, 194 with 3.6) and the sm_80 forward 230 -> 231 (64 x 64 8-warp: 255), and needs
# about 168 registers whatever the tile: the floor below (the small pinned tiles compile to
# 156-168 with it). Its float64 row state and normalisers (logits beyond float32, probe5 KL1)
# raised the sm_90 backward base 105 -> 109 (64 x 32 8-warp at Dp = 32: 198 with triton 3.8).
_REGISTER_MODELS = {
    ("sm_90", "fwd"): (223, (1.0, 1.0, 1.0)), ("sm_90", "bwd"): (109, (3.5, 3.25, 2.75)),
    ("sm_80", "fwd"): (231, (1.0, 0.5, 1.0)), ("sm_80", "bwd"): (119, (4.75, 3.25, 1.0)),
}
_REGISTER_FLOOR = 168  # the float64 loop of wide rows (float32 and bf16 inputs)


def _estimate(config, named_args, **kwargs) -> dict:
    """Shared memory and registers per thread of one config on the target GPU: ``num_stages``
    operand chunks of the two gram dots (and the backward's ``BLOCK_N x BLOCK_DO`` pred tile)."""
    p_pred = named_args["p_pred"]
    elt = p_pred.element_size()
    bm, bn, w, s = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages
    bd = max(kwargs.get("BLOCK_DP", MAX_BLOCK_D[elt]), kwargs.get("BLOCK_DT", MAX_BLOCK_D[elt]))
    bdo = kwargs.get("BLOCK_DO", 0)
    shared = s * ((bm + bn) * bd + bn * bdo) * elt + 1024
    model = _REGISTER_MODELS[(arch_family(target_for(p_pred.device)), "bwd" if "BLOCK_DO" in kwargs else "fwd")]
    regs = register_estimate(model, words_per_thread(bm, bn, w), words_per_thread(bm + bn, bd, w),
                             words_per_thread(bm, bdo, w))
    if elt != 2 or p_pred.dtype == torch.bfloat16:  # row-scaled inputs run the float64 loop
        regs = max(regs, _REGISTER_FLOOR)
    return {"shared": shared, "regs": regs}


def _prune_configs(configs, named_args, **kwargs):
    """Keep the configs of the input's precision (float32 or 16-bit) that fit the target GPU by
    :func:`_estimate` (at least one)."""
    p_pred = named_args["p_pred"]
    fp32 = p_pred.element_size() == 4
    mine = [c for c in configs if (id(c) in _FP32_CONFIGS) == fp32] or list(configs)  # (the one interpreter / pinned config)
    return prune_by_estimate(mine, lambda c: _estimate(c, named_args, **kwargs), target_for(p_pred.device))


_prune_configs.estimate = _estimate


def _configs(name, configs, **pinned_options):
    return autotune_configs(
        name, configs,
        pinned=triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=8, num_stages=2, **pinned_options),
        interpreter=triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4))  # (one, with large tiles)


# pinned (FASTVQ_AUTOTUNE=0): without maxnreg ptxas spills the float32 forward (80 registers, 16 B of
# stack); with the wide rows' float64 loop, maxnreg=128 spills both (forward 24 B, backward 16 B);
# at 168 neither spills on sm_90 (158-168 registers, triton 3.8)
_FWD_CONFIGS = _configs("pairwise_kl_loss_fwd", _FWD_16 + _FWD_32, maxnreg=168)
_BWD_CONFIGS = _configs("pairwise_kl_loss_bwd", _BWD_16 + _BWD_32, maxnreg=168)


@triton.jit
def _finite(b_m):
    """A running maximum made safe to subtract: -inf (no column seen yet) becomes 0."""
    return tl.where(b_m == float("-inf"), 0.0, b_m)


@triton.jit
def _exp_prob(b_x, b_m, b_log2l):
    """``exp((x - m) - log l)`` capped at 1 (NaN kept): a probability from the logit ``x`` and the
    softmax's normaliser in two parts (``b_log2l = log2(e) log l``); rounding can push the
    exponent above 0 at logits ~1e36. ``x`` and ``m`` float32, or float64 (wide pairs, logits
    beyond float32): ``x - m`` is then formed in float64 and the rest in float32 (``-inf`` where
    ``x - m`` is below float32's range: a probability of exactly 0, as the exact one rounds to)."""
    b_y = (b_x - b_m).to(tl.float32) * 1.4426950408889634 - b_log2l
    return tl.exp2(tl.where(b_y > 0.0, 0.0, b_y))


@triton.jit
def _gram_tile(
    p_x, o_m, o_n, m_m, m_n, D, stride_b, stride_d,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    """``x[o_m] @ x[o_n].T`` in float32, streaming D in BLOCK_D chunks (padding reads 0)."""
    b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_a = tl.load(p_x + o_m[:, None] * stride_b + o_d[None, :] * stride_d,
                      mask=m_m[:, None] & m_d[None, :], other=0.0)
        b_b = tl.load(p_x + o_n[:, None] * stride_b + o_d[None, :] * stride_d,
                      mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_acc = dot_nt(b_a, b_b, b_acc, PRECISION, DOT_FP32)
    return b_acc


@triton.jit
def _gram_tile_f64(p_x, o_m, o_n, m_m, m_n, D, stride_b, stride_d, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """``x[o_m] @ x[o_n].T`` in float64 from the inputs as given (the products of float32/bf16
    entries are exact in float64; the sum is rounded in float64). The rare path. float32 inputs:
    a float64 ``tl.dot`` in 16-wide chunks (fewer registers than the loop below, whose float64
    tile spilled the float32 kernels); bf16: one coordinate at a time, through float32 (which
    holds bf16 exactly: sm_90 has no bf16 -> float64 conversion, and a float64 dot beside the
    bf16 kernels' wgmma did not lower)."""
    b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float64)
    if p_x.dtype.element_ty == tl.float32:
        for d0 in range(0, D, 16):
            o_d = d0 + tl.arange(0, 16)
            m_d = o_d < D
            b_a = tl.load(p_x + o_m[:, None] * stride_b + o_d[None, :] * stride_d,
                          mask=m_m[:, None] & m_d[None, :], other=0.0).to(tl.float64)
            b_b = tl.load(p_x + o_n[:, None] * stride_b + o_d[None, :] * stride_d,
                          mask=m_n[:, None] & m_d[None, :], other=0.0).to(tl.float64)
            b_acc = tl.dot(b_a, tl.trans(b_b), b_acc, input_precision="ieee", out_dtype=tl.float64)
    else:
        for d in range(0, D):
            b_a = tl.load(p_x + o_m * stride_b + d * stride_d, mask=m_m, other=0.0).to(tl.float32).to(tl.float64)
            b_b = tl.load(p_x + o_n * stride_b + d * stride_d, mask=m_n, other=0.0).to(tl.float32).to(tl.float64)
            b_acc += b_a[:, None] * b_b[None, :]
    return b_acc


@triton.jit
def _round24(b_x):
    """float64 ``x`` rounded to 24 significant bits (float32's precision, half away from zero) with
    its float64 exponent: an integer add and mask on the bits (no float operation a compiler could
    contract)."""
    b_bits = (b_x.to(tl.int64, bitcast=True) + 0x10000000) & -0x20000000
    return b_bits.to(tl.float64, bitcast=True)


@triton.jit
def _logit_tile_f64(p_x, o_m, o_n, m_m, m_n, D, stride_b, stride_d, scale64, lim,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The logits ``(x[o_m] @ x[o_n].T) * scale64``, formed in float64 and rounded once: to float32
    where ``|logit| <= lim`` (float32's largest at the pass's scale; the values stay float64, so
    the passes' float32 and float64 logits are one set of numbers), beyond it to float32's 24 bits
    with float64's exponent (:func:`_round24`), so that a forward and a backward whose float64 dots
    round a few ulps apart (tiled differently) still form the same logit, as float32 ones do: one
    float64 ulp of a logit ~1e40 is ~1e24, an ``exp(s - m)`` of 0 instead of 1."""
    b_x = _gram_tile_f64(p_x, o_m, o_n, m_m, m_n, D, stride_b, stride_d, BLOCK_M, BLOCK_N) * scale64
    return tl.where(tl.abs(b_x) <= lim, b_x.to(tl.float32).to(tl.float64), _round24(b_x))


@triton.jit
def _wide_rows(b_ep, b_et, m, BIG):
    """int1 per row: pred's or target's exponent is ``>= BIG``, so every pair of the row takes its
    logits from float64 (``fastvq.reference.pairwise_kl_loss.wide_rows``; masked rows: False)."""
    return (tl.maximum(b_ep, b_et) >= BIG) & m


@triton.jit
def _wide_setup(p_ep, p_et, o_m, m_m, logit_mult, FA, FB, BIG, ROW_SCALED: tl.constexpr):
    """Per program: the row block's :func:`_wide_rows` and whether it holds one, and the float64
    factor ``logit_mult 2^(FA + FB)`` of the float64 logits (``logit_mult``'s float32 ``m``, as the
    float32 factors ``R_i C_j`` hold it)."""
    if ROW_SCALED:
        b_w_m = _wide_rows(tl.load(p_ep + o_m, mask=m_m, other=0), tl.load(p_et + o_m, mask=m_m, other=0), m_m, BIG)
        b_any_m = tl.max(b_w_m.to(tl.int32), axis=0) > 0
    else:
        b_w_m = 0
        b_any_m = 0
    scale64 = logit_mult * tl.full((), 1.0, tl.float64) * exp2i(FA).to(tl.float64) * exp2i(FB).to(tl.float64)
    return b_w_m, b_any_m, scale64


@triton.jit
def _wide_tile(b_any_m, b_e_np, b_e_nt, m_n, BIG):
    """The tile's columns' :func:`_wide_rows`, and whether the tile holds a pair of a wide row or
    column: O(BLOCK_N) per tile, nothing per element."""
    b_w_n = _wide_rows(b_e_np, b_e_nt, m_n, BIG)
    return b_w_n, b_any_m | (tl.max(b_w_n.to(tl.int32), axis=0) > 0)


@triton.jit
def _row_factor(p_e, o, m, shift, mult, ROW_SCALED: tl.constexpr):
    """``mult * 2^(e[o] + shift)`` (float32) for row-scaled inputs, else ``mult``."""
    if ROW_SCALED:
        return exp2i(tl.load(p_e + o, mask=m, other=0) + shift) * mult
    else:
        return tl.full(o.shape, 1.0, dtype=tl.float32) * mult


@triton.jit
def _logit_tiles(
    p_pred, p_target, p_ep, p_et, b_rp, b_rt, o_m, m_m, n0, B, DP, DT, FB,
    stride_pb, stride_pd, stride_tb, stride_td,
    b_w_m, b_any_m, BIG, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DP: tl.constexpr, BLOCK_DT: tl.constexpr,
    PREC_P: tl.constexpr, PREC_T: tl.constexpr, DOT_FP32_P: tl.constexpr, DOT_FP32_T: tl.constexpr,
    ROW_SCALED: tl.constexpr,
):
    """For the column block at ``n0``: its int64 columns ``o_n`` and mask, the float32
    ``(BLOCK_M, BLOCK_N)`` logit tiles ``s = u_p u_p^T R_p C_p``, ``t = u_t u_t^T R_t C_t``, and
    whether the tile holds a wide pair (int32 0/1; always 0 unless ROW_SCALED)
    (``b_rp``, ``b_rt``: the rows' factors ``R``; ``C`` is 1 unless ROW_SCALED). In a
    ROW_SCALED tile, the pairs of a row or column that :func:`_wide_rows` flags (``b_w_m``: the
    rows', ``b_any_m``: any of them) get -inf (no probability): :func:`_wide_logits` forms them."""
    o_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
    m_n = o_n < B
    b_s = _gram_tile(p_pred, o_m, o_n, m_m, m_n, DP, stride_pb, stride_pd,
                     BLOCK_M, BLOCK_N, BLOCK_DP, PREC_P, DOT_FP32_P)
    b_t = _gram_tile(p_target, o_m, o_n, m_m, m_n, DT, stride_tb, stride_td,
                     BLOCK_M, BLOCK_N, BLOCK_DT, PREC_T, DOT_FP32_T)
    if ROW_SCALED:
        # R_i C_j first (both in [2^-62, 2^62] times m: no overflow), then the Gram entry: a row
        # whose exponent was clamped keeps |u| up to 2^71, and (u_i . u_j) R_i overflowed where
        # the logit (u_i . u_j) R_i C_j is representable (a huge row beside a small one)
        b_e_np = tl.load(p_ep + o_n, mask=m_n, other=0)
        b_e_nt = tl.load(p_et + o_n, mask=m_n, other=0)
        b_s = b_s * (b_rp[:, None] * exp2i(b_e_np + FB)[None, :])
        b_t = b_t * (b_rt[:, None] * exp2i(b_e_nt + FB)[None, :])
        # Rare: a clamped row (|u| > 1: products can overflow, or flush another row's tiny
        # entries) or R_i C_j >= 2^110 (a sum that underflows): its pairs come from float64,
        # in the kernels' second loop (_wide_logits)
        b_w_n, b_wide = _wide_tile(b_any_m, b_e_np, b_e_nt, m_n, BIG)
        if b_wide:
            # per pair (not per tile), so that the forward and the backward (tiled differently)
            # form the same logits: at |s| ~ 1e11 one rounding apart is a wrong exp(s - lse)
            b_need = b_w_m[:, None] | b_w_n[None, :]
            b_s = tl.where(b_need, float("-inf"), b_s)
            b_t = tl.where(b_need, float("-inf"), b_t)
        b_wide = b_wide.to(tl.int32)
    else:
        b_s = b_s * b_rp[:, None]
        b_t = b_t * b_rt[:, None]
        b_wide = 0
    return o_n, m_n, b_s, b_t, b_wide


@triton.jit
def _wide_columns(p_ep, p_et, b_any_m, n0, B, BIG, BLOCK_N: tl.constexpr):
    """For the column block at ``n0``: ``o_n``, ``m_n``, the columns' :func:`_wide_rows` and whether
    the tile holds a pair of a wide row or column (:func:`_wide_tile`)."""
    o_n = n0 + tl.arange(0, BLOCK_N).to(tl.int64)
    m_n = o_n < B
    b_w_n, b_wide = _wide_tile(b_any_m, tl.load(p_ep + o_n, mask=m_n, other=0),
                               tl.load(p_et + o_n, mask=m_n, other=0), m_n, BIG)
    return o_n, m_n, b_w_n, b_wide


@triton.jit
def _wide_logits(p_xp, p_xt, o_m, m_m, o_n, m_n, b_w_m, b_w_n, DP, DT, scale64, lim,
                 stride_xpb, stride_xpd, stride_xtb, stride_xtd, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The float64 logit tiles of the pairs of wide rows or columns formed from the inputs as given
    (:func:`_logit_tile_f64`), -inf elsewhere (:func:`_logit_tiles` has those)."""
    b_need = b_w_m[:, None] | b_w_n[None, :]
    b_s = tl.where(b_need, _logit_tile_f64(p_xp, o_m, o_n, m_m, m_n, DP, stride_xpb, stride_xpd, scale64, lim,
                                           BLOCK_M, BLOCK_N), float("-inf"))
    b_t = tl.where(b_need, _logit_tile_f64(p_xt, o_m, o_n, m_m, m_n, DT, stride_xtb, stride_xtd, scale64, lim,
                                           BLOCK_M, BLOCK_N), float("-inf"))
    return b_s, b_t


@triton.jit
def _fwd_tile_update(b_mp, b_lp, b_mt, b_lt, b_acc, b_s, b_t, m_valid, exp_mult):
    """The row block's online state (running maxima ``m``, sums ``l`` and the KL accumulator, at
    the forward's scale ``c``) after one tile of logits ``b_s``, ``b_t`` (``m_valid``: its pairs).
    All float32 (the main loop), or state and logits float64 (the wide pairs' loop: logits beyond
    float32): the shifts ``x - m`` and the KL terms are then float64, the exponentials float32
    (the casts below are no-ops in float32)."""
    b_s_m = tl.where(m_valid, b_s, float("-inf"))
    b_t_m = tl.where(m_valid, b_t, float("-inf"))

    # raw running maxima (-inf until a valid column is seen) and their safe forms for
    # subtraction: exp(-inf - safe) is an exact 0, and no (-inf) - (-inf) is ever formed
    # (the maxima's shift below is taken only once the row has seen a column)
    b_mp_new = tl.maximum(b_mp, tl.max(b_s_m, axis=1))
    b_mp_sub = _finite(b_mp_new)
    b_lp = b_lp * tl.exp2(((b_mp - b_mp_sub) * exp_mult).to(tl.float32)) + tl.sum(
        tl.exp2(((b_s_m - b_mp_sub[:, None]) * exp_mult).to(tl.float32)), axis=1)

    b_mt_new = tl.maximum(b_mt, tl.max(b_t_m, axis=1))
    b_mt_sub = _finite(b_mt_new)
    b_alpha = tl.exp2(((b_mt - b_mt_sub) * exp_mult).to(tl.float32))
    b_q = tl.exp2(((b_t_m - b_mt_sub[:, None]) * exp_mult).to(tl.float32))  # 0 where masked
    # acc = sum_j exp(t_ij - m_t) ((t_ij - m_t) - (s_ij - m_p)): shifting by the running
    # maxima keeps the terms small (an exact 0 when the rows agree); moving the maxima
    # shifts every earlier term by the same amount, hence the b_lt correction (b_lt is 0,
    # and the shift unused, while the row has seen no column). A pair of weight 0 (masked,
    # or exp underflowed) adds 0 even where s_ij - m_p overflowed to -inf (NaN weights stay).
    m_seen = b_lt > 0
    b_shift = tl.where(m_seen, b_mt - b_mt_sub, 0.0) - tl.where(m_seen, b_mp - b_mp_sub, 0.0)
    b_acc = b_alpha * (b_acc + tl.where(m_seen, b_lt * b_shift, 0.0)) + tl.sum(
        b_q * tl.where(b_q != 0.0, (b_t - b_mt_sub[:, None]) - (b_s - b_mp_sub[:, None]), 0.0), axis=1)
    b_lt = b_lt * b_alpha + tl.sum(b_q, axis=1)
    return b_mp_new, b_lp, b_mt_new, b_lt, b_acc


@autotune(configs=_FWD_CONFIGS, key=["DP", "DT"], prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _pairwise_kl_loss_fwd_kernel(
    p_pred, p_target, p_ep, p_et, p_kl, p_lse_p, p_lse_t, p_xp, p_xt,
    B, DP, DT, logit_mult, exp_mult, inv_c, FA, FB, BIG,
    stride_pb, stride_pd, stride_tb, stride_td, stride_xpb, stride_xpd, stride_xtb, stride_xtd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DP: tl.constexpr, BLOCK_DT: tl.constexpr,
    PREC_P: tl.constexpr, PREC_T: tl.constexpr, DOT_FP32_P: tl.constexpr, DOT_FP32_T: tl.constexpr,
    ROW_SCALED: tl.constexpr,
):
    # Logits at scale c (``logit_mult`` holds it); ``exp_mult = log2(e) / c`` and ``inv_c = 1 / c``
    # bring them back: ``exp(natural) = exp2(scaled * exp_mult)``.
    WIDE_N: tl.constexpr = 16  # columns per tile of the wide pairs' float64 loop
    pid = flat_program_id()
    o_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < B
    b_rp = _row_factor(p_ep, o_m, m_m, FA, logit_mult, ROW_SCALED)
    b_rt = _row_factor(p_et, o_m, m_m, FA, logit_mult, ROW_SCALED)
    b_w_m, b_any_m, scale64 = _wide_setup(p_ep, p_et, o_m, m_m, logit_mult, FA, FB, BIG, ROW_SCALED)

    # The running maxima start at -inf (not a finite sentinel: logits below it would give an
    # empty sum, log 0 = -inf), so logits of any magnitude keep an exact logsumexp.
    b_mp = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    b_mt = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    b_lp = tl.zeros((BLOCK_M,), dtype=tl.float32)
    b_lt = tl.zeros((BLOCK_M,), dtype=tl.float32)
    b_acc = tl.zeros((BLOCK_M,), dtype=tl.float32)
    b_seen = tl.full((), 0, dtype=tl.int32)  # a wide pair in some tile: the second loop has work
    for n0 in range(0, B, BLOCK_N):
        o_n, m_n, b_s, b_t, b_wide = _logit_tiles(p_pred, p_target, p_ep, p_et, b_rp, b_rt, o_m, m_m, n0, B, DP, DT, FB,
                                          stride_pb, stride_pd, stride_tb, stride_td, b_w_m, b_any_m, BIG,
                                          BLOCK_M, BLOCK_N, BLOCK_DP, BLOCK_DT, PREC_P, PREC_T, DOT_FP32_P,
                                          DOT_FP32_T, ROW_SCALED)
        m_valid = m_n[None, :] & (o_m[:, None] != o_n[None, :])
        b_mp, b_lp, b_mt, b_lt, b_acc = _fwd_tile_update(b_mp, b_lp, b_mt, b_lt, b_acc, b_s, b_t, m_valid, exp_mult)
        b_seen = tl.maximum(b_seen, b_wide)
    if ROW_SCALED:
        # the pairs of wide rows (-inf above), from float64 logits: a loop of its own over narrow
        # WIDE_N-column tiles (formed in the loop above, or over BLOCK_N columns, the float64
        # tiles spilled registers), entered only if the main loop met a wide pair (ordinary
        # inputs: never). The rows' state goes float64 here (O(BLOCK_M) per program): a wide
        # pair's logit can lie beyond float32, and so can the running maxima and the KL terms
        # it enters
        b_mp, b_lp, b_mt, b_lt, b_acc = (b_mp.to(tl.float64), b_lp.to(tl.float64), b_mt.to(tl.float64),
                                         b_lt.to(tl.float64), b_acc.to(tl.float64))
        lim = 3.4028234663852886e38 / inv_c  # float32's largest logit, at the forward's scale
        if b_seen > 0:
            for n0 in range(0, B, WIDE_N):
                o_n, m_n, b_w_n, b_wide = _wide_columns(p_ep, p_et, b_any_m, n0, B, BIG, WIDE_N)
                if b_wide:
                    b_s, b_t = _wide_logits(p_xp, p_xt, o_m, m_m, o_n, m_n, b_w_m, b_w_n, DP, DT, scale64, lim,
                                            stride_xpb, stride_xpd, stride_xtb, stride_xtd, BLOCK_M, WIDE_N)
                    m_valid = m_n[None, :] & (o_m[:, None] != o_n[None, :])
                    b_mp, b_lp, b_mt, b_lt, b_acc = _fwd_tile_update(b_mp, b_lp, b_mt, b_lt, b_acc, b_s, b_t,
                                                                     m_valid, exp_mult)

    # float64 for row-scaled inputs: a row's KL may exceed float32 where the loss (KL / B summed)
    # does not; the launcher sums in float64 and rounds once
    b_kl = (b_acc / b_lt) * inv_c - tl.log(b_lt) + tl.log(b_lp)
    # A logit that overflows float32 (float16 rows at a tiny T, or a dot product that does,
    # +inf + -inf) leaves the row's KL non-finite: that row's loss overflowed, +inf. (The op
    # tells NaN/inf inputs apart.)
    b_kl = tl.where(tl.abs(b_kl) < float("inf"), b_kl, float("inf"))
    # A KL is >= 0 exactly; rounding can leave a row whose exact KL is ~0 slightly negative
    # (-4e-8 at T = 1000): stored as 0 (a NaN would stay NaN: the comparison is false for it).
    # The value only: the backward's gradient is that of the KL (G = P - Q), not of the clamp.
    b_kl = tl.where(b_kl < 0.0, 0.0, b_kl)
    tl.store(p_kl + o_m, b_kl.to(tl.float64) / B, mask=m_m)  # KL_i / B: B rows of ~float32max / B stay finite
    # the normalisers in two parts (row max at natural scale, log of the sum): (2, B) each, float64
    # (a row's largest logit may lie beyond float32)
    tl.store(p_lse_p + o_m, b_mp.to(tl.float64) * inv_c, mask=m_m)
    tl.store(p_lse_p + B + o_m, tl.log(b_lp).to(tl.float64), mask=m_m)
    tl.store(p_lse_t + o_m, b_mt.to(tl.float64) * inv_c, mask=m_m)
    tl.store(p_lse_t + B + o_m, tl.log(b_lt).to(tl.float64), mask=m_m)


@triton.jit
def _row_max_f32(b_m64):
    """A row's largest logit (float64) for the float32 main loop: +inf beyond float32 (a float32
    logit then has probability 0, as exactly), and -float32max below it (every logit of such a row
    is a wide pair's, -inf in the main loop: probability 0, not (-inf) - (-inf) = NaN)."""
    return tl.where(b_m64 < -3.4028234663852886e38, -3.4028234663852886e38, b_m64.to(tl.float32))


@triton.jit
def _normaliser(p_lse, o, m, B, WIDE: tl.constexpr):
    """The rows' normalisers ``(m, log2(e) log l)``: ``m`` float64 for the wide loop, else float32
    (:func:`_row_max_f32`); ``log l`` (in [0, log B]) float32."""
    b_m = tl.load(p_lse + o, mask=m, other=0.0)
    if not WIDE:
        b_m = _row_max_f32(b_m)
    return b_m, tl.load(p_lse + B + o, mask=m, other=0.0).to(tl.float32) * 1.4426950408889634


@triton.jit
def _bwd_tile_update(b_dp, b_s, b_t, o_m, m_m, o_n, m_n, o_do, m_do, p_lse_p, p_lse_t, p_x, stride_xb, stride_xd,
                     b_mpm, b_lpm, b_mtm, b_ltm, B, h_scale, PREC_P: tl.constexpr, DOT_FP32_P: tl.constexpr,
                     WIDE: tl.constexpr):
    """``b_dp + (h_scale (G + G^T)[o_m, o_n]) @ pred[o_n, o_do]`` for the logit tiles ``b_s``, ``b_t``
    (``b_*pm``: the rows' normalisers, log2 parts scaled by log2(e)); ``WIDE``: float64 logits and
    row maxima (:func:`_exp_prob`), else float32."""
    b_mpn, b_lpn = _normaliser(p_lse_p, o_n, m_n, B, WIDE)
    b_mtn, b_ltn = _normaliser(p_lse_t, o_n, m_n, B, WIDE)
    # G_ij (row i's softmaxes) + G_ji (row j's softmaxes; s, t symmetric). Every valid
    # exponent is <= 0 in exact arithmetic; at logits ~1e36 the rounding of s_ij against
    # the forward's logsumexp can push it above, so it is capped at 0 (a probability is
    # at most 1). The diagonal may overflow but is dropped by the where.
    b_h = (_exp_prob(b_s, b_mpm[:, None], b_lpm[:, None]) - _exp_prob(b_t, b_mtm[:, None], b_ltm[:, None])
           + _exp_prob(b_s, b_mpn[None, :], b_lpn[None, :]) - _exp_prob(b_t, b_mtn[None, :], b_ltn[None, :]))
    m_valid = m_m[:, None] & m_n[None, :] & (o_m[:, None] != o_n[None, :])
    b_h = tl.where(m_valid, b_h, 0.0)
    # float16 operands: |h| <= 2 scaled by 2^14 stays normal down to 2^-28; others: by 2^-e
    b_h = b_h * h_scale
    b_pn = tl.load(p_x + o_n[:, None] * stride_xb + o_do[None, :] * stride_xd,
                   mask=m_n[:, None] & m_do[None, :], other=0.0)
    if DOT_FP32_P:
        b_dp = tl.dot(b_h, b_pn.to(tl.float32), b_dp, input_precision=PREC_P)
    else:
        b_dp = tl.dot(b_h.to(b_pn.dtype), b_pn, b_dp, input_precision=PREC_P)
    return b_dp


@autotune(configs=_BWD_CONFIGS, key=["DP", "DT"], prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _pairwise_kl_loss_bwd_kernel(
    p_grad, p_pred, p_target, p_ep, p_et, p_lse_p, p_lse_t, p_x, p_xt, p_dpred,
    B, DP, DT, logit_mult, grad_mult, FA, FB, BIG, N_DO_TILES,
    stride_pb, stride_pd, stride_tb, stride_td, stride_xb, stride_xd, stride_xtb, stride_xtd, stride_db, stride_dd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DP: tl.constexpr, BLOCK_DT: tl.constexpr,
    BLOCK_DO: tl.constexpr, H_SCALE: tl.constexpr,
    PREC_P: tl.constexpr, PREC_T: tl.constexpr, DOT_FP32_P: tl.constexpr, DOT_FP32_T: tl.constexpr,
    ROW_SCALED: tl.constexpr,
):
    # p_pred / p_target: the (row-scaled) operands of the logits; p_x: pred as given, the
    # operand of the gradient's dot. Logits at natural scale here (``logit_mult`` = m or 1/T).
    WIDE_N: tl.constexpr = 16  # columns per tile of the wide pairs' float64 loop
    pid = flat_program_id()
    pid_m = pid // N_DO_TILES
    pid_d = pid % N_DO_TILES
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < B
    o_do = pid_d * BLOCK_DO + tl.arange(0, BLOCK_DO)
    m_do = o_do < DP
    b_rp = _row_factor(p_ep, o_m, m_m, FA, logit_mult, ROW_SCALED)
    b_rt = _row_factor(p_et, o_m, m_m, FA, logit_mult, ROW_SCALED)
    b_w_m, b_any_m, scale64 = _wide_setup(p_ep, p_et, o_m, m_m, logit_mult, FA, FB, BIG, ROW_SCALED)

    b_mpm, b_lpm = _normaliser(p_lse_p, o_m, m_m, B, False)
    b_mtm, b_ltm = _normaliser(p_lse_t, o_m, m_m, B, False)
    b_dp = tl.zeros((BLOCK_M, BLOCK_DO), dtype=tl.float32)
    # |(G + G^T) @ pred| <= (B + 1) max|pred|: with h scaled by 2^-e, 2^e > B + 1, the float32
    # accumulator cannot overflow where the gradient does not (float16 scales up instead); the
    # result is scaled by grad_mult = 1 / (T B h_scale), formed in float64 on the host
    # (bwd_grad_mult, the same h_scale) and rounded once: a float32 1/T, or 1/T / B, falls into
    # the subnormals or overflows at extreme temperatures
    if H_SCALE != 1.0:
        h_scale = H_SCALE
    else:
        h_scale = exp2i(-(pow2_exponent((B + 1) * 1.0) + 1))
    b_seen = tl.full((), 0, dtype=tl.int32)  # a wide pair in some tile: the second loop has work
    for n0 in range(0, B, BLOCK_N):
        o_n, m_n, b_s, b_t, b_wide = _logit_tiles(p_pred, p_target, p_ep, p_et, b_rp, b_rt, o_m, m_m, n0, B, DP,
                                                  DT, FB, stride_pb, stride_pd, stride_tb, stride_td, b_w_m, b_any_m,
                                                  BIG, BLOCK_M, BLOCK_N, BLOCK_DP, BLOCK_DT, PREC_P, PREC_T,
                                                  DOT_FP32_P, DOT_FP32_T, ROW_SCALED)
        b_dp = _bwd_tile_update(b_dp, b_s, b_t, o_m, m_m, o_n, m_n, o_do, m_do, p_lse_p, p_lse_t, p_x,
                                stride_xb, stride_xd, b_mpm, b_lpm, b_mtm, b_ltm, B, h_scale,
                                PREC_P, DOT_FP32_P, False)
        b_seen = tl.maximum(b_seen, b_wide)
    if ROW_SCALED:
        # the pairs of wide rows (-inf above, no probability), from float64 logits (as the forward)
        # against the float64 row maxima, in narrow tiles, only if the main loop met one
        if b_seen > 0:
            b_mpm64 = tl.load(p_lse_p + o_m, mask=m_m, other=0.0)
            b_mtm64 = tl.load(p_lse_t + o_m, mask=m_m, other=0.0)
            for n0 in range(0, B, WIDE_N):
                o_n, m_n, b_w_n, b_wide = _wide_columns(p_ep, p_et, b_any_m, n0, B, BIG, WIDE_N)
                if b_wide:
                    b_s, b_t = _wide_logits(p_x, p_xt, o_m, m_m, o_n, m_n, b_w_m, b_w_n, DP, DT, scale64,
                                            3.4028234663852886e38, stride_xb, stride_xd, stride_xtb, stride_xtd,
                                            BLOCK_M, WIDE_N)
                    b_dp = _bwd_tile_update(b_dp, b_s, b_t, o_m, m_m, o_n, m_n, o_do, m_do, p_lse_p, p_lse_t, p_x,
                                            stride_xb, stride_xd, b_mpm64, b_lpm, b_mtm64, b_ltm, B, h_scale,
                                            PREC_P, DOT_FP32_P, True)

    b_scale = tl.load(p_grad).to(tl.float32) * grad_mult
    tl.store(p_dpred + o_m[:, None] * stride_db + o_do[None, :] * stride_dd,
             (b_dp * b_scale).to(p_dpred.dtype.element_ty), mask=m_m[:, None] & m_do[None, :])


# The backward casts G + G^T (entries in [-2, 2], ~1/B each when the softmaxes are flat) to
# float16 for the tensor-core dot with pred: unscaled, they fall below float16's normal range
# (6.1e-5) from B ~ 16K on, or at any B when the softmaxes nearly agree. Scaled by 2^14 they stay
# normal down to |h| = 2^-28 and below 2^15 at the top; the result is divided back in float32.
H_SCALE_FP16 = 16384.0


def bwd_h_scale(batch: int, dtype: torch.dtype) -> float:
    """The backward kernel's scale of ``h = G + G^T`` in its dot with pred, as it forms it:
    float16, ``H_SCALE_FP16``; else ``2^-(e + 1)`` with ``2^e <= float32(B + 1) < 2^(e + 1)``
    (tests/ops/test_pairwise_kl_loss.py checks the gradient at each side of powers of two)."""
    if dtype == torch.float16:
        return H_SCALE_FP16
    n = batch + 1
    e = n.bit_length()  # 2^(e-1) <= n < 2^e; float32 keeps 24 bits and rounds n up to 2^e from
    if e > 24 and n >= 2**e - 2 ** (e - 25):  # half an ulp below it (the tie goes to 2^e, even)
        e += 1
    return 2.0**-e


def bwd_grad_mult(temperature: float, batch: int, dtype: torch.dtype) -> float:
    """``1 / (T B h_scale)``, the backward's final scale, in float64 (one rounding to float32
    in the kernel): about ``2 / T``, a normal float32 for the temperatures the op accepts."""
    return 1.0 / float(temperature) / batch / bwd_h_scale(batch, dtype)


def _block_d(d: int, dtype: torch.dtype) -> int:
    return min(max(next_pow2(d), 16), MAX_BLOCK_D[dtype.itemsize])


def _row_scaled(x: torch.Tensor, amax: torch.Tensor, lo: int, hi: int):
    """``(u, e)``: int32 row exponents ``e`` (``amax_i = max |x_i| < 2^e_i``, clamped to ``[lo, hi]``)
    and the contiguous copy ``u_i = x_i 2^-e_i`` in x's dtype (exact: powers of two). float16 rows
    are used as given (``|x| <= 65504``: no product or sum of products overflows float32)."""
    if x.dtype == torch.float16:
        return x, None
    e = torch.frexp(amax).exponent.clamp_(lo, hi).to(torch.int32)
    one = torch.ones(e.shape, dtype=torch.float32, device=x.device)
    return (x * torch.ldexp(one, -e).to(x.dtype)[:, None]).contiguous(), e


def _launch_args(pred, target, temperature, scaling, amax_p, amax_t):
    m, fa, fb, lo, hi, _ = scaling
    up, ep = _row_scaled(pred, amax_p, lo, hi)
    ut, et = _row_scaled(target, amax_t, lo, hi)
    scaled = ep is not None
    if not scaled:  # float16: unused pointers, a plain 1/T
        ep = et = torch.zeros(1, dtype=torch.int32, device=pred.device)
    return up, ut, ep, et, (m if scaled else 1.0 / float(temperature)), fa, fb, scaled


@launcher
def pairwise_kl_loss_fwd(pred: torch.Tensor, target: torch.Tensor, temperature: float, scaling: tuple,
                         amax_p: torch.Tensor, amax_t: torch.Tensor):
    """``(B, Dp), (B, Dt), T -> (loss, lse_p, lse_t)``: 0-d float32 loss (mean over rows of
    KL(target || pred), diagonal excluded), and for the backward, ``(3, B)`` float64 each: the
    softmax's per-row normaliser in two parts (the row's largest logit, ``log`` of the sum) and
    the rows' ``max |x_i|`` (``amax_p``/``amax_t``, the scaling's input). ``scaling``: the op's
    ``(m, fa, fb, lo, hi, wide)`` for ``T`` (``fastvq.reference.pairwise_kl_loss.logit_scaling``, the
    one place it is decided; kernels import no reference)."""
    # check (the op has told the user already: fastvq/ops/pairwise_kl_loss.py)
    assert pred.dim() == 2 and target.dim() == 2 and pred.shape[0] == target.shape[0], (pred.shape, target.shape)
    assert pred.dtype == target.dtype, (pred.dtype, target.dtype)
    assert temperature > 0, temperature
    B, DP = pred.shape
    DT = target.shape[1]
    # allocate
    kl = torch.empty((B,), dtype=torch.float64, device=pred.device)
    lse_p = torch.empty((3, B), dtype=torch.float64, device=pred.device)
    lse_t = torch.empty((3, B), dtype=torch.float64, device=pred.device)
    lse_p[2] = amax_p
    lse_t[2] = amax_t
    if B <= 1:  # no off-diagonal pair: loss 0 (and nothing to normalise)
        lse_p[:2].zero_(), lse_t[:2].zero_()
        return torch.zeros((), dtype=torch.float32, device=pred.device), lse_p, lse_t
    up, ut, ep, et, mult, fa, fb, scaled = _launch_args(pred, target, temperature, scaling, lse_p[2], lse_t[2])
    # logits at scale c = 2^-(k+1), 2^k > B + 1: B terms of (t - m_t) - (s - m_p) stay below float32max
    inv_c = 2.0 ** ((B + 1).bit_length() + 1)
    # launch
    grid = lambda meta: flat_grid(triton.cdiv(B, meta["BLOCK_M"]))  # noqa: E731
    _pairwise_kl_loss_fwd_kernel[grid](
        up, ut, ep, et, kl, lse_p, lse_t, pred, target,
        B, DP, DT, mult / inv_c, math.log2(math.e) * inv_c, inv_c, fa, fb, scaling[5],
        up.stride(0), up.stride(1), ut.stride(0), ut.stride(1),
        pred.stride(0), pred.stride(1), target.stride(0), target.stride(1),
        BLOCK_DP=_block_d(DP, pred.dtype), BLOCK_DT=_block_d(DT, target.dtype),
        PREC_P=tl_input_precision(pred.dtype), PREC_T=tl_input_precision(target.dtype),
        DOT_FP32_P=dot_fp32(pred.dtype), DOT_FP32_T=dot_fp32(target.dtype), ROW_SCALED=scaled,
    )
    # the rows' KL / B summed in float64 and rounded once: +inf exactly where the loss overflows
    return kl.sum().float(), lse_p, lse_t


@launcher
def pairwise_kl_loss_bwd(
    grad: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    lse_p: torch.Tensor,
    lse_t: torch.Tensor,
    temperature: float,
    scaling: tuple,
) -> torch.Tensor:
    """Gradient in ``pred`` (``(B, Dp)``, pred's dtype) for the 0-d upstream ``grad``
    (``scaling``: as :func:`pairwise_kl_loss_fwd`)."""
    # check
    assert pred.dim() == 2 and target.dim() == 2 and pred.shape[0] == target.shape[0], (pred.shape, target.shape)
    assert grad.numel() == 1 and lse_p.shape == lse_t.shape == (3, pred.shape[0]), (grad.shape, lse_p.shape, lse_t.shape)
    B, DP = pred.shape
    DT = target.shape[1]
    # allocate
    dpred = torch.empty_like(pred, memory_format=torch.contiguous_format)
    if B <= 1 or DP == 0:
        return dpred.zero_()
    lse_p, lse_t = lse_p.double().contiguous(), lse_t.double().contiguous()
    up, ut, ep, et, mult, fa, fb, scaled = _launch_args(pred, target, temperature, scaling, lse_p[2], lse_t[2])
    # launch
    BLOCK_DO = min(max(next_pow2(DP), 16), MAX_BLOCK_DO[pred.dtype.itemsize])
    n_do = triton.cdiv(DP, BLOCK_DO)
    grid = lambda meta: flat_grid(triton.cdiv(B, meta["BLOCK_M"]) * n_do)  # noqa: E731
    _pairwise_kl_loss_bwd_kernel[grid](
        grad.float(), up, ut, ep, et, lse_p, lse_t, pred, target, dpred,
        B, DP, DT, mult, bwd_grad_mult(temperature, B, pred.dtype), fa, fb, scaling[5], n_do,
        up.stride(0), up.stride(1), ut.stride(0), ut.stride(1), pred.stride(0), pred.stride(1),
        target.stride(0), target.stride(1), dpred.stride(0), dpred.stride(1),
        BLOCK_DP=_block_d(DP, pred.dtype), BLOCK_DT=_block_d(DT, target.dtype), BLOCK_DO=BLOCK_DO,
        H_SCALE=H_SCALE_FP16 if pred.dtype == torch.float16 else 1.0,
        PREC_P=tl_input_precision(pred.dtype), PREC_T=tl_input_precision(target.dtype),
        DOT_FP32_P=dot_fp32(pred.dtype), DOT_FP32_T=dot_fp32(target.dtype), ROW_SCALED=scaled,
    )
    return dpred
