"""Pairwise squared Euclidean distances between the rows of two matrices, one fused kernel.

Each program owns a (BLOCK_M, BLOCK_N) tile of the output (a 1-D grid, tiles grouped
``GROUP_M`` row blocks at a time so neighbouring programs share rows of ``a`` in L2; no grid
axis can exceed its limit). It streams D in BLOCK_D chunks, accumulating ``a @ b.T`` on the
tensor cores and ``|a|^2``, ``|b|^2`` from the same loaded blocks, and writes
``|a|^2 + |b|^2 - 2 a.b`` in float32, clamped at 0 without losing NaN.

The expansion is only trusted where ``|a|^2`` and ``|b|^2`` are finite and below 2^125: a tile
with any other row (an infinite entry, or a norm whose square overflows) is recomputed
directly, ``sum_d (a_d - b_d)^2``, so every element gets the true distance rounded once (NaN for
NaN and inf - inf, +inf where it overflows). Ordinary tiles pay one scalar branch.

float32 inputs: ``a.b`` as three TF32 products of each chunk's two-part split (``PRECISION``
"tf32x3", ``_common.dot_nt``; each product within ``3 * 2^-22``) where the GPU has TF32 tensor
cores, else the exact dot; ``|a|^2`` and ``|b|^2`` are always exact float32 sums.
"""

import torch
import triton
import triton.language as tl

from ._common import dot_fp32, dot_nt, launcher, nan_max0, next_pow2, rows_vectorise, tl_input_precision

GROUP_M = 8
TRUST_SQNORM = 2.0**125  # |a|^2 + |b|^2 - 2 a.b cannot overflow in its intermediates below this


@triton.jit
def _pairwise_sqdist_fwd_kernel(
    p_a, p_b, p_out,
    M, N, D,
    stride_am, stride_ad, stride_bn, stride_bd, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr,
    PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
):
    pid = tl.program_id(0)
    blocks_m = tl.cdiv(M, BLOCK_M)
    blocks_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP * blocks_n
    group = pid // per_group
    first_m = group * GROUP
    rows = tl.minimum(blocks_m - first_m, GROUP)
    pid_m = (first_m + (pid % per_group) % rows).to(tl.int64)
    pid_n = ((pid % per_group) // rows).to(tl.int64)
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
        b_ab = dot_nt(b_a, b_b, b_ab, PRECISION, DOT_FP32)

    b_out = nan_max0(b_aa[:, None] + b_bb[None, :] - 2.0 * b_ab)
    # one scalar test per tile: any norm the expansion cannot be trusted with (NaN, inf, huge)
    n_untrusted = tl.sum((~(b_aa < 4.253529586511731e37)).to(tl.int32), axis=0) \
        + tl.sum((~(b_bb < 4.253529586511731e37)).to(tl.int32), axis=0)
    if n_untrusted > 0:
        b_out = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for d in range(0, D):
            b_ac = tl.load(p_a + o_m * stride_am + d * stride_ad, mask=m_m, other=0.0).to(tl.float32)
            b_bc = tl.load(p_b + o_n * stride_bn + d * stride_bd, mask=m_n, other=0.0).to(tl.float32)
            b_diff = b_ac[:, None] - b_bc[None, :]
            b_out += b_diff * b_diff
    tl.store(p_out + o_m[:, None] * stride_om + o_n[None, :] * stride_on, b_out,
             mask=m_m[:, None] & m_n[None, :])


def grid(M: int, N: int, BLOCK_M: int, BLOCK_N: int) -> tuple[int]:
    """The launch grid: one axis (up to 2^31 - 1 programs), never a y/z axis (65,535)."""
    return (triton.cdiv(M, BLOCK_M) * triton.cdiv(N, BLOCK_N),)


@launcher
def pairwise_sqdist_fwd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(M, D), (N, D) -> (M, N)`` float32 squared distances. Same dtype and device."""
    assert a.dim() == 2 and b.dim() == 2 and a.shape[1] == b.shape[1], \
        f"pairwise_sqdist_fwd: shapes {tuple(a.shape)} and {tuple(b.shape)}"
    assert a.dtype == b.dtype, f"pairwise_sqdist_fwd: dtypes differ: {a.dtype} and {b.dtype}"
    M, D = a.shape
    N = b.shape[0]
    # allocate
    out = torch.empty((M, N), dtype=torch.float32, device=a.device)
    if M == 0 or N == 0:
        return out
    # launch
    BLOCK_M, BLOCK_N = 64, 64
    # float32: three TF32 products of split chunks ("tf32x3") where the GPU has TF32 tensor cores,
    # else the exact dot, which runs on the FMA units, where Triton holds both operands for the
    # whole chunk in registers: 64-wide chunks spilled on sm_80 (255 registers + 656 B); 32-wide
    # at 8 warps compile without spills on sm_80 and sm_90, either way (sm90-static.json).
    precision = tl_input_precision(a.dtype, split_on=a.device)
    exact = a.dtype == torch.float32
    BLOCK_D = min(max(next_pow2(D), 16), 32 if exact else 64)
    num_warps = 8 if exact else 4
    if not exact and not rows_vectorise(a, b):  # (64-wide chunks at 4 warps spilled 384-504 B at D = 100)
        BLOCK_D, num_warps = min(BLOCK_D, 32), 8
    _pairwise_sqdist_fwd_kernel[grid(M, N, BLOCK_M, BLOCK_N)](
        a, b, out, M, N, D,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, GROUP=GROUP_M,
        PRECISION=precision, DOT_FP32=dot_fp32(a.dtype), num_warps=num_warps,
    )
    return out
