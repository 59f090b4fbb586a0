"""Greedy residual quantization, all L levels in one kernel launch.

Each program owns BLOCK_M rows and keeps their residual on chip in float32 for the whole
launch. For every level it streams the K codes of that level's codebook in BLOCK_K tiles,
scoring ``|c|^2 - 2 r.c`` (``|r|^2`` is the same for every code of a row, so it is dropped)
with ``tl.dot`` on the tensor cores and ``|c|^2`` from the same loaded tile, keeping a running
``(min, index)`` per row (smallest index on exact ties: the smallest within a tile, and a later
tile wins only when strictly smaller). It then gathers the chosen code rows, subtracts them
from the residual and goes on to the next level. No ``(N, K)`` matrix is ever written.

Two variants, chosen by the launcher on D (never a crash, never a silent fallback):

* ``_residual_quantize_fwd_kernel`` (``next_pow2(D) <= max_register_d``, 1024 by default): the
  residual and the running sum of chosen codes are ``(BLOCK_M, BLOCK_D)`` float32 register
  blocks; each code tile is ``(BLOCK_K, BLOCK_D)``, the dot reduces over all of D at once.
* ``_residual_quantize_fwd_chunked_kernel`` (larger D): a register block of all of D would not
  fit, so the residual lives in a float32 ``(N, D)`` workspace that only the owning program
  touches (it stays in L2 at these sizes) and every dot and update streams D in BLOCK_D chunks.
  The chosen indices are kept in a ``(BLOCK_M, BLOCK_L)`` register block and the quantized sum is
  gathered from them at the end.

Precision: for float32 codebooks the dot is exact IEEE float32 (``input_precision="ieee"``).
For bfloat16/float16 codebooks the residual is rounded to the codebook dtype for the dot only
(tensor cores, float32 accumulation); ``|c|^2``, the residual and the quantized sum stay float32.
So for low-precision codebooks near-ties may resolve differently than an all-float32 search.
"""

import torch
import triton
import triton.language as tl

from . import INTERPRETED
from ._common import autotune_configs, dot_fp32, launcher, next_pow2, tl_input_precision

MAX_REGISTER_D = 1024  # above this, the D-chunked variant with a float32 workspace runs
CHUNK_D = 64  # D chunk of the chunked variant


@triton.jit
def _round_bf16(b):
    # fp32 -> bf16, round to nearest even, with integer ops. Only used under the interpreter
    # (BF16_RNE), whose fp32 -> bf16 cast truncates; a GPU's cast already rounds to nearest even.
    u = b.to(tl.uint32, bitcast=True)
    u = u + 0x7FFF + ((u >> 16) & 1)
    return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


def _configs(name):
    gpu = [
        triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bm in (16, 32, 64, 128)
        for bk in (16, 32, 64, 128)
        for w in (4, 8)
        for s in (2, 3)
    ]
    return autotune_configs(name, gpu,
                            pinned=triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=8, num_stages=2),
                            interpreter=triton.Config({"BLOCK_M": 16, "BLOCK_K": 16}, num_warps=4))


def _prune_register_configs(configs, named_args, **kwargs):
    # The residual, the quantized sum and a code tile are (rows, BLOCK_D) register blocks:
    # drop configs whose blocks would not fit in the registers of one program.
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    kept = [c for c in configs if max(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_K"]) * block_d <= 16384]
    return kept or [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"], c.num_warps))]


@triton.autotune(configs=_configs("residual_quantize"), key=["D", "K", "L"], prune_configs_by={"early_config_prune": _prune_register_configs})
@triton.jit
def _residual_quantize_fwd_kernel(
    p_x, p_cb, p_q, p_codes,
    N, K, D, L,
    stride_xn, stride_xd, stride_cl, stride_ck, stride_cd,
    stride_qn, stride_qd, stride_on, stride_ol,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, BF16_RNE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    o_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < N
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    m_md = m_m[:, None] & m_d[None, :]
    o_l = tl.arange(0, BLOCK_L)

    b_r = tl.load(p_x + o_m[:, None] * stride_xn + o_d[None, :] * stride_xd, mask=m_md, other=0.0).to(tl.float32)
    b_q = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    b_codes = tl.zeros((BLOCK_M, BLOCK_L), dtype=tl.int64)
    for lvl in range(L):
        p_cbl = p_cb + lvl * stride_cl
        # the dot operand: the residual in the codebook dtype (a no-op for float32)
        if BF16_RNE:
            b_rd = _round_bf16(b_r)
        else:
            b_rd = b_r.to(p_cb.dtype.element_ty)
        if DOT_FP32:
            b_rd = b_rd.to(tl.float32)
        b_min = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
        b_idx = tl.zeros((BLOCK_M,), dtype=tl.int64)
        for k0 in range(0, K, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < K
            b_c = tl.load(p_cbl + o_k[:, None] * stride_ck + o_d[None, :] * stride_cd,
                          mask=m_k[:, None] & m_d[None, :], other=0.0)
            b_c32 = b_c.to(tl.float32)
            b_cc = tl.sum(b_c32 * b_c32, axis=1)
            if DOT_FP32:
                b_rc = tl.dot(b_rd, tl.trans(b_c32), input_precision=PRECISION)
            else:
                b_rc = tl.dot(b_rd, tl.trans(b_c), input_precision=PRECISION)
            b_dist = tl.where(m_k[None, :], b_cc[None, :] - 2.0 * b_rc, float("inf"))
            b_tmin = tl.min(b_dist, axis=1)
            # smallest index among the exact minima of this tile
            b_targ = tl.min(tl.where(b_dist == b_tmin[:, None], o_k[None, :], K + BLOCK_K), axis=1).to(tl.int64)
            b_better = b_tmin < b_min
            b_idx = tl.where(b_better, b_targ, b_idx)
            b_min = tl.where(b_better, b_tmin, b_min)
        b_sel = tl.load(p_cbl + b_idx[:, None] * stride_ck + o_d[None, :] * stride_cd, mask=m_md, other=0.0)
        b_sel = b_sel.to(tl.float32)
        b_r -= b_sel
        b_q += b_sel
        b_codes = tl.where(o_l[None, :] == lvl, b_idx[:, None], b_codes)

    if BF16_RNE:
        b_q = _round_bf16(b_q)
    tl.store(p_q + o_m[:, None] * stride_qn + o_d[None, :] * stride_qd, b_q.to(p_q.dtype.element_ty), mask=m_md)
    tl.store(p_codes + o_m[:, None] * stride_on + o_l[None, :] * stride_ol, b_codes,
             mask=m_m[:, None] & (o_l[None, :] < L))


@triton.autotune(configs=_configs("residual_quantize_chunked"), key=["D", "K", "L"])
@triton.jit
def _residual_quantize_fwd_chunked_kernel(
    p_x, p_cb, p_q, p_codes, p_ws,
    N, K, D, L,
    stride_xn, stride_xd, stride_cl, stride_ck, stride_cd,
    stride_qn, stride_qd, stride_on, stride_ol, stride_wn,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr, BF16_RNE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    o_m = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < N
    o_l = tl.arange(0, BLOCK_L)

    # residual <- x, in this program's rows of the float32 workspace
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_md = m_m[:, None] & (o_d < D)[None, :]
        b_x = tl.load(p_x + o_m[:, None] * stride_xn + o_d[None, :] * stride_xd, mask=m_md, other=0.0)
        tl.store(p_ws + o_m[:, None] * stride_wn + o_d[None, :], b_x.to(tl.float32), mask=m_md)
    tl.debug_barrier()

    b_codes = tl.zeros((BLOCK_M, BLOCK_L), dtype=tl.int64)
    for lvl in range(L):
        p_cbl = p_cb + lvl * stride_cl
        b_min = tl.full((BLOCK_M,), float("inf"), dtype=tl.float32)
        b_idx = tl.zeros((BLOCK_M,), dtype=tl.int64)
        for k0 in range(0, K, BLOCK_K):
            o_k = k0 + tl.arange(0, BLOCK_K)
            m_k = o_k < K
            b_rc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
            b_cc = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                o_d = d0 + tl.arange(0, BLOCK_D)
                m_d = o_d < D
                b_r = tl.load(p_ws + o_m[:, None] * stride_wn + o_d[None, :], mask=m_m[:, None] & m_d[None, :], other=0.0)
                if BF16_RNE:
                    b_rd = _round_bf16(b_r)
                else:
                    b_rd = b_r.to(p_cb.dtype.element_ty)
                b_c = tl.load(p_cbl + o_k[:, None] * stride_ck + o_d[None, :] * stride_cd,
                              mask=m_k[:, None] & m_d[None, :], other=0.0)
                b_c32 = b_c.to(tl.float32)
                b_cc += tl.sum(b_c32 * b_c32, axis=1)
                if DOT_FP32:
                    b_rc = tl.dot(b_rd.to(tl.float32), tl.trans(b_c32), b_rc, input_precision=PRECISION)
                else:
                    b_rc = tl.dot(b_rd, tl.trans(b_c), b_rc, input_precision=PRECISION)
            b_dist = tl.where(m_k[None, :], b_cc[None, :] - 2.0 * b_rc, float("inf"))
            b_tmin = tl.min(b_dist, axis=1)
            b_targ = tl.min(tl.where(b_dist == b_tmin[:, None], o_k[None, :], K + BLOCK_K), axis=1).to(tl.int64)
            b_better = b_tmin < b_min
            b_idx = tl.where(b_better, b_targ, b_idx)
            b_min = tl.where(b_better, b_tmin, b_min)
        # residual -= chosen code, chunk by chunk
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m_md = m_m[:, None] & (o_d < D)[None, :]
            p_r = p_ws + o_m[:, None] * stride_wn + o_d[None, :]
            b_sel = tl.load(p_cbl + b_idx[:, None] * stride_ck + o_d[None, :] * stride_cd, mask=m_md, other=0.0)
            tl.store(p_r, tl.load(p_r, mask=m_md, other=0.0) - b_sel.to(tl.float32), mask=m_md)
        tl.debug_barrier()
        b_codes = tl.where(o_l[None, :] == lvl, b_idx[:, None], b_codes)

    # quantized = sum of the chosen codes, in level order, float32
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_md = m_m[:, None] & (o_d < D)[None, :]
        b_q = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for lvl in range(L):
            b_idx = tl.sum(tl.where(o_l[None, :] == lvl, b_codes, 0), axis=1)
            b_sel = tl.load(p_cb + lvl * stride_cl + b_idx[:, None] * stride_ck + o_d[None, :] * stride_cd,
                            mask=m_md, other=0.0)
            b_q += b_sel.to(tl.float32)
        if BF16_RNE:
            b_q = _round_bf16(b_q)
        tl.store(p_q + o_m[:, None] * stride_qn + o_d[None, :] * stride_qd, b_q.to(p_q.dtype.element_ty), mask=m_md)
    tl.store(p_codes + o_m[:, None] * stride_on + o_l[None, :] * stride_ol, b_codes,
             mask=m_m[:, None] & (o_l[None, :] < L))


@launcher
def residual_quantize_fwd(
    x: torch.Tensor, codebooks: torch.Tensor, max_register_d: int = MAX_REGISTER_D
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, D), (L, K, D) -> quantized (N, D) in x's dtype, codes (N, L) int64``.

    Same dtype and device; any strides. ``max_register_d`` picks the variant (see the module
    docstring); tests lower it to run the D-chunked variant on small shapes.
    """
    # check
    if x.dim() != 2 or codebooks.dim() != 3 or x.shape[1] != codebooks.shape[2]:
        raise ValueError(
            f"residual_quantize_fwd: expected (N, D) and (L, K, D), got {tuple(x.shape)} and {tuple(codebooks.shape)}"
        )
    if x.dtype != codebooks.dtype:
        raise TypeError(f"residual_quantize_fwd: dtypes differ: {x.dtype} and {codebooks.dtype}")
    N, D = x.shape
    L, K, _ = codebooks.shape
    if L == 0 or K == 0 or D == 0:
        raise ValueError(f"residual_quantize_fwd: empty codebooks {tuple(codebooks.shape)}")
    # allocate
    quantized = torch.empty((N, D), dtype=x.dtype, device=x.device)
    codes = torch.empty((N, L), dtype=torch.int64, device=x.device)
    if N == 0:
        return quantized, codes
    # launch
    common = dict(PRECISION=tl_input_precision(codebooks.dtype), DOT_FP32=dot_fp32(codebooks.dtype),
                  BLOCK_L=max(next_pow2(L), 2), BF16_RNE=INTERPRETED and codebooks.dtype == torch.bfloat16)

    def grid(meta):
        return (triton.cdiv(N, meta["BLOCK_M"]),)

    block_d = max(next_pow2(D), 16)
    if block_d <= max_register_d:
        _residual_quantize_fwd_kernel[grid](
            x, codebooks, quantized, codes, N, K, D, L,
            x.stride(0), x.stride(1), codebooks.stride(0), codebooks.stride(1), codebooks.stride(2),
            quantized.stride(0), quantized.stride(1), codes.stride(0), codes.stride(1),
            BLOCK_D=block_d, **common,
        )
    else:
        workspace = torch.empty((N, D), dtype=torch.float32, device=x.device)
        _residual_quantize_fwd_chunked_kernel[grid](
            x, codebooks, quantized, codes, workspace, N, K, D, L,
            x.stride(0), x.stride(1), codebooks.stride(0), codebooks.stride(1), codebooks.stride(2),
            quantized.stride(0), quantized.stride(1), codes.stride(0), codes.stride(1), workspace.stride(0),
            BLOCK_D=CHUNK_D, **common,
        )
    return quantized, codes
