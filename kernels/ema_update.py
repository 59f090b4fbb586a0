"""The EMA codebook update, fused: one pass over the ``(L, K, D)`` state.

Per code row ``r`` (of ``L * K``), with the per-row decisions made beforehand on the small
``(L, K)`` tensors (``keep``: take this batch's sums; ``live``: the level saw rows;
``smoothed``: the Laplace-smoothed count)::

    embed_avg[r] = keep ? decay * embed_avg[r] + (1 - decay) * sums[r] : embed_avg[r]
    code         = embed_avg[r] / smoothed[r]          (in the codebook's dtype)
    codebook[r]  = code       if live and every element of code is finite, else unchanged

Each program owns BLOCK_R rows. A row that fits one BLOCK_D block is read once; a wider row
is swept twice (the update and the finiteness of the new code, then the codebook write).
The codebook is only written (never read), and only on the rows that change.
"""

import torch
import triton
import triton.language as tl

from ._common import bf16_rne, flat_grid, flat_program_id, launcher, next_pow2, round_bf16

MAX_BLOCK_D = 1024


@triton.jit
def _ema_update_kernel(
    p_ea, p_sums, p_cb, p_keep, p_live, p_smoothed,
    R, K, D, decay, one_minus_decay,
    stride_cl, stride_ck, stride_cd,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, BF16_RNE: tl.constexpr,
):
    pid = flat_program_id()
    o_r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    m_r = o_r < R
    b_keep = tl.load(p_keep + o_r, mask=m_r, other=0) != 0
    b_live = tl.load(p_live + o_r // K, mask=m_r, other=0) != 0
    b_sm = tl.load(p_smoothed + o_r, mask=m_r, other=1.0)
    p_cbr = p_cb + (o_r // K) * stride_cl + (o_r % K) * stride_ck
    # sweep 1: the new embed_avg (stored) and whether the new code is finite
    b_bad = tl.zeros((BLOCK_R,), dtype=tl.int32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m = m_r[:, None] & (o_d < D)[None, :]
        p_e = p_ea + o_r[:, None] * D + o_d[None, :]
        b_ea = tl.load(p_e, mask=m, other=0.0)
        b_s = tl.load(p_sums + o_r[:, None] * D + o_d[None, :], mask=m, other=0.0)
        b_ea = tl.where(b_keep[:, None], b_ea * decay + b_s * one_minus_decay, b_ea)
        tl.store(p_e, b_ea, mask=m & b_keep[:, None])
        if BF16_RNE:
            b_c = round_bf16(tl.math.div_rn(b_ea, b_sm[:, None] + tl.zeros_like(b_ea))).to(tl.float32)
        else:
            b_c = tl.math.div_rn(b_ea, b_sm[:, None] + tl.zeros_like(b_ea)).to(p_cb.dtype.element_ty).to(tl.float32)
        b_bad += tl.sum(tl.where(m & ~(tl.abs(b_c) < float("inf")), 1, 0), axis=1)
    b_ok = b_live & (b_bad == 0)
    # sweep 2 (the same block again when a row fits one): the codebook, where it changes
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m = m_r[:, None] & (o_d < D)[None, :]
        b_ea = tl.load(p_ea + o_r[:, None] * D + o_d[None, :], mask=m & b_ok[:, None], other=0.0)
        b_c = tl.math.div_rn(b_ea, b_sm[:, None] + tl.zeros_like(b_ea))  # rounded once, as the seed: not div.full
        if BF16_RNE:
            b_c = round_bf16(b_c)
        tl.store(p_cbr[:, None] + o_d[None, :] * stride_cd, b_c.to(p_cb.dtype.element_ty), mask=m & b_ok[:, None])


@launcher
def ema_update_fwd(codebook, embed_avg, sums, keep, live, smoothed, decay: float) -> None:
    """In place: ``embed_avg (L, K, D)`` float32 contiguous and ``codebook (L, K, D)`` (any float
    dtype, any strides) from ``sums (L, K, D)`` float32 contiguous, ``keep (L, K)`` int8,
    ``live (L,)`` int8, ``smoothed (L, K)`` float32 contiguous (see the module docstring)."""
    L, K, D = codebook.shape
    assert embed_avg.shape == sums.shape == (L, K, D) and embed_avg.is_contiguous() and sums.is_contiguous()
    assert embed_avg.dtype == sums.dtype == smoothed.dtype == torch.float32
    assert keep.shape == smoothed.shape == (L, K) and live.shape == (L,) and keep.is_contiguous()
    R = L * K
    if R == 0 or D == 0:
        return
    block_d = min(max(next_pow2(D), 16), MAX_BLOCK_D)
    block_r = max(1, min(64, 4096 // block_d))
    _ema_update_kernel[flat_grid(triton.cdiv(R, block_r))](
        embed_avg, sums, codebook, keep, live, smoothed.contiguous(),
        R, K, D, float(decay), float(1.0 - decay),
        codebook.stride(0), codebook.stride(1), codebook.stride(2),
        BLOCK_R=block_r, BLOCK_D=block_d, BF16_RNE=bf16_rne(codebook.dtype),
    )
