"""Pairwise squared Euclidean distances between the rows of two matrices, one fused kernel.

Each program owns a (BLOCK_M, BLOCK_N) tile of the output. It streams D in BLOCK_D
chunks, accumulating ``a @ b.T`` on the tensor cores and ``|a|^2``, ``|b|^2`` from the same
loaded blocks, and writes ``max(|a|^2 + |b|^2 - 2 a.b, 0)`` in float32.
"""


import torch
import triton
import triton.language as tl

from ._common import dot_fp32, launcher, next_pow2, tl_input_precision


@triton.jit
def _pairwise_sqdist_fwd_kernel(
    p_a, p_b, p_out,
    M, N, D,
    stride_am, stride_ad, stride_bn, stride_bd, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid_m = tl.program_id(0).to(tl.int64)
    pid_n = tl.program_id(1).to(tl.int64)
    o_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_m = o_m < M
    m_n = o_n < N

    b_ab = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    b_aa = tl.zeros((BLOCK_M,), dtype=tl.float32)
    b_bb = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_d = o_d < D
        b_a = tl.load(p_a + o_m[:, None] * stride_am + o_d[None, :] * stride_ad,
                      mask=m_m[:, None] & m_d[None, :], other=0.0)
        b_b = tl.load(p_b + o_n[:, None] * stride_bn + o_d[None, :] * stride_bd,
                      mask=m_n[:, None] & m_d[None, :], other=0.0)
        b_a32 = b_a.to(tl.float32)
        b_b32 = b_b.to(tl.float32)
        b_aa += tl.sum(b_a32 * b_a32, axis=1)
        b_bb += tl.sum(b_b32 * b_b32, axis=1)
        if DOT_FP32:
            b_ab = tl.dot(b_a32, tl.trans(b_b32), b_ab, input_precision=PRECISION)
        else:
            b_ab = tl.dot(b_a, tl.trans(b_b), b_ab, input_precision=PRECISION)

    b_out = tl.maximum(b_aa[:, None] + b_bb[None, :] - 2.0 * b_ab, 0.0)
    tl.store(p_out + o_m[:, None] * stride_om + o_n[None, :] * stride_on, b_out,
             mask=m_m[:, None] & m_n[None, :])


@launcher
def pairwise_sqdist_fwd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(M, D), (N, D) -> (M, N)`` float32 squared distances. Same dtype and device."""
    # check
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"pairwise_sqdist_fwd: expected (M, D) and (N, D), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"pairwise_sqdist_fwd: dtypes differ: {a.dtype} and {b.dtype}")
    M, D = a.shape
    N = b.shape[0]
    # allocate
    out = torch.empty((M, N), dtype=torch.float32, device=a.device)
    if M == 0 or N == 0:
        return out
    # launch
    BLOCK_M, BLOCK_N = 64, 64
    BLOCK_D = min(max(next_pow2(D), 16), 64)
    grid = (triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))
    _pairwise_sqdist_fwd_kernel[grid](
        a, b, out, M, N, D,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        PRECISION=tl_input_precision(a.dtype), DOT_FP32=dot_fp32(a.dtype),
    )
    return out
