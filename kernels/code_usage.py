"""Histogram of code indices (a bincount) with one overflow bin, by atomic adds.

Each program loads BLOCK_N indices, sends ids outside ``[0, K)`` to bin ``K`` and adds 1 to
each one's bin with ``tl.atomic_add``. Memory-bound: a fixed block size, no autotune.
"""

import torch
import triton
import triton.language as tl

from ._common import flat_grid, flat_program_id, launcher


@triton.jit
def _code_usage_fwd_kernel(p_idx, p_counts, N, K, stride_n, BLOCK_N: tl.constexpr):
    pid = flat_program_id()
    o_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_idx = tl.load(p_idx + o_n * stride_n, mask=m_n, other=0).to(tl.int64)
    b_bin = tl.where((b_idx >= 0) & (b_idx < K), b_idx, K)
    b_one = tl.full((BLOCK_N,), 1, dtype=tl.int64)
    tl.atomic_add(p_counts + b_bin, b_one, mask=m_n, sem="relaxed")


@launcher
def code_usage_fwd(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """``(N,)`` integer ids -> ``(K + 1,)`` int64 counts; bin ``K`` counts ids outside ``[0, K)``."""
    assert indices.dim() == 1 and not indices.is_floating_point() and codebook_size >= 1
    N = indices.shape[0]
    # allocate
    counts = torch.zeros(codebook_size + 1, dtype=torch.int64, device=indices.device)
    if N == 0:
        return counts
    # launch
    BLOCK_N = 1024
    _code_usage_fwd_kernel[flat_grid(triton.cdiv(N, BLOCK_N))](
        indices, counts, N, codebook_size, indices.stride(0), BLOCK_N=BLOCK_N,
    )
    return counts
