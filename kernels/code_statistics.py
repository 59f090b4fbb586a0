"""Per-code row counts and row sums (the statistics of an EMA codebook update), two paths.

Rows are addressed by a flat segment id ``seg`` in ``[0, S)`` (the op maps level ``l``, code
``k`` of the batched form to ``l * K + k``). Neither path builds a one-hot matrix.

* ``_code_statistics_atomic_kernel``: a program per ``(BLOCK_N rows, BLOCK_D columns)`` tile
  loads the rows and ``tl.atomic_add``s them into ``sums[seg]`` (and 1 into ``counts[seg]``,
  from the first column block only). One pass over ``x``, no sort; float32 atomics commit in
  whatever order the hardware serves them, so the low bits vary from run to run.
* ``_code_statistics_segment_kernel`` (deterministic): the launcher sorts ``seg`` with a stable
  torch sort and finds each segment's ``[start, end)`` with ``searchsorted``; a program per
  ``(segment, BLOCK_D columns)`` walks its rows in sorted order, BLOCK_N gathered rows at a
  time, into a ``(BLOCK_N, BLOCK_D)`` float32 accumulator reduced once at the end: a fixed
  order, so the result is bitwise reproducible. The cost is the sort, and load imbalance when a
  few codes take most rows (one program then walks all of them).
"""

import torch
import triton
import triton.language as tl

from ._common import launcher, next_pow2


@triton.jit
def _code_statistics_atomic_kernel(
    p_x, p_seg, p_counts, p_sums,
    M, D,
    stride_xn, stride_xd, stride_seg, stride_sk, stride_sd,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < M
    o_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    m_nd = m_n[:, None] & m_d[None, :]
    b_seg = tl.load(p_seg + o_n * stride_seg, mask=m_n, other=0).to(tl.int64)
    b_x = tl.load(p_x + o_n[:, None] * stride_xn + o_d[None, :] * stride_xd, mask=m_nd, other=0.0).to(tl.float32)
    tl.atomic_add(p_sums + b_seg[:, None] * stride_sk + o_d[None, :] * stride_sd, b_x, mask=m_nd, sem="relaxed")
    b_one = tl.full((BLOCK_N,), 1.0, dtype=tl.float32)
    tl.atomic_add(p_counts + b_seg, b_one, mask=m_n & (pid_d == 0), sem="relaxed")


@triton.jit
def _code_statistics_segment_kernel(
    p_x, p_perm, p_offsets, p_counts, p_sums,
    D,
    stride_xn, stride_xd, stride_sk, stride_sd,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_s = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    o_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_d = o_d < D
    start = tl.load(p_offsets + pid_s)
    end = tl.load(p_offsets + pid_s + 1)
    b_acc = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_N):
        o_r = r0 + tl.arange(0, BLOCK_N)
        m_r = o_r < end
        b_rows = tl.load(p_perm + o_r, mask=m_r, other=0)
        b_x = tl.load(p_x + b_rows[:, None] * stride_xn + o_d[None, :] * stride_xd,
                      mask=m_r[:, None] & m_d[None, :], other=0.0)
        b_acc += b_x.to(tl.float32)
    tl.store(p_sums + pid_s * stride_sk + o_d * stride_sd, tl.sum(b_acc, axis=0), mask=m_d)
    if pid_d == 0:
        tl.store(p_counts + pid_s, (end - start).to(tl.float32))


@launcher
def code_statistics_fwd(
    x: torch.Tensor, seg: torch.Tensor, num_segments: int, deterministic: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (M, D) float, seg (M,) int in [0, S) -> counts (S,), sums (S, D)``, float32.

    Same device, any strides; ``seg`` is not range-checked here (the op does it).
    """
    # check
    if x.dim() != 2 or seg.dim() != 1 or seg.shape[0] != x.shape[0]:
        raise ValueError(f"code_statistics_fwd: expected (M, D) and (M,), got {tuple(x.shape)} and {tuple(seg.shape)}")
    if seg.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"code_statistics_fwd: seg must be int32/int64, got {seg.dtype}")
    M, D = x.shape
    S = int(num_segments)
    BLOCK_D = min(max(next_pow2(D), 16), 128)
    # allocate + launch
    if not deterministic:
        counts = torch.zeros((S,), dtype=torch.float32, device=x.device)
        sums = torch.zeros((S, D), dtype=torch.float32, device=x.device)
        if M == 0 or S == 0:
            return counts, sums
        if D == 0:  # no column block would launch, so the counts must come from elsewhere
            return torch.bincount(seg.long(), minlength=S).float(), sums
        BLOCK_N = 64
        grid = (triton.cdiv(M, BLOCK_N), triton.cdiv(D, BLOCK_D))
        _code_statistics_atomic_kernel[grid](
            x, seg, counts, sums, M, D,
            x.stride(0), x.stride(1), seg.stride(0), sums.stride(0), sums.stride(1),
            BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=4,
        )
        return counts, sums
    counts = torch.empty((S,), dtype=torch.float32, device=x.device)
    sums = torch.empty((S, D), dtype=torch.float32, device=x.device)
    if S == 0:
        return counts, sums
    if D == 0:
        return torch.bincount(seg.long(), minlength=S).float(), sums
    seg_sorted, perm = torch.sort(seg.long(), stable=True)
    offsets = torch.searchsorted(seg_sorted, torch.arange(S + 1, device=x.device, dtype=torch.int64))
    BLOCK_N = 32
    grid = (S, triton.cdiv(D, BLOCK_D))
    _code_statistics_segment_kernel[grid](
        x, perm, offsets, counts, sums, D,
        x.stride(0), x.stride(1), sums.stride(0), sums.stride(1),
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, num_warps=4,
    )
    return counts, sums
