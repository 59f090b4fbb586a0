"""Collision level of semantic ids: rank within runs of equal rows, scattered to input order.

The op sorts first (in torch): ``group[i]`` numbers the distinct code rows, ``order`` is a
*stable* sort of ``group`` (so equal rows keep input order) and ``offsets[g]`` is where group
``g``'s run starts in that order. Then one pass, each program owning BLOCK_N sorted positions
``s``: the row ``r = order[s]`` has level ``s - offsets[group[r]]``; the program writes
``out[r, :L] = codes[r]`` and ``out[r, L] = level``. Memory-bound: no autotune.
"""

import torch
import triton
import triton.language as tl

from ._common import flat_grid, flat_program_id, launcher, next_pow2


@triton.jit
def _semantic_ids_fwd_kernel(
    p_codes, p_order, p_group, p_offsets, p_out,
    N, L,
    stride_cn, stride_cl, stride_on, stride_ol,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid = flat_program_id()
    o_s = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m_s = o_s < N
    b_row = tl.load(p_order + o_s, mask=m_s, other=0).to(tl.int64)
    b_group = tl.load(p_group + b_row, mask=m_s, other=0).to(tl.int64)
    b_start = tl.load(p_offsets + b_group, mask=m_s, other=0).to(tl.int64)
    b_level = o_s - b_start
    tl.store(p_out + b_row * stride_on + L * stride_ol, b_level, mask=m_s)
    for l0 in range(0, L, BLOCK_L):
        o_l = l0 + tl.arange(0, BLOCK_L)
        m = m_s[:, None] & (o_l < L)[None, :]
        b_codes = tl.load(p_codes + b_row[:, None] * stride_cn + o_l[None, :] * stride_cl, mask=m, other=0)
        tl.store(p_out + b_row[:, None] * stride_on + o_l[None, :] * stride_ol, b_codes.to(tl.int64), mask=m)


@launcher
def semantic_ids_fwd(codes: torch.Tensor) -> torch.Tensor:
    """``(N, L)`` integer codes -> ``(N, L + 1)`` int64: the codes and their collision level."""
    assert codes.dim() == 2 and not (codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool)
    N, L = codes.shape
    # allocate
    out = torch.empty((N, L + 1), dtype=torch.int64, device=codes.device)
    if N == 0:
        return out
    if L == 0:  # every row is the empty tuple: one group
        group = torch.zeros(N, dtype=torch.int64, device=codes.device)
        counts = group.new_full((1,), N)
    else:
        _, group, counts = torch.unique(codes, dim=0, return_inverse=True, return_counts=True)
    order = torch.sort(group, stable=True).indices
    offsets = torch.cumsum(counts, 0) - counts
    # launch
    BLOCK_N = 256
    BLOCK_L = min(next_pow2(max(L, 1)), 16)
    _semantic_ids_fwd_kernel[flat_grid(triton.cdiv(N, BLOCK_N))](
        codes, order, group, offsets, out, N, L,
        codes.stride(0), codes.stride(1), out.stride(0), out.stride(1),
        BLOCK_N=BLOCK_N, BLOCK_L=BLOCK_L,
    )
    return out
