"""topk_codes: the k nearest codes of every row with their distances, fused, not differentiable."""

from __future__ import annotations

import torch

from .._backend import use_triton
from ._custom_op import custom_op
from ..reference.topk_codes import order_by_distance, topk_codes_ref
from .._checks import check_int_arg
from ._search import search_inputs

MAX_K = 128  # the kernel keeps a row's k best in registers
MAX_TRITON_CODES = 2**30  # topk_codes_fwd's limit (fuzzF: an assert there)


@custom_op("fastvq::topk_codes", mutates_args=())
def _topk_codes_op(x: torch.Tensor, codebook: torch.Tensor, k: int, metric: str,
                   allow_tf32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # x (H, N, D), codebook (H, K, D) -> (H, N, k) int64, (H, N, k) float32
    if use_triton("topk_codes", x, codebook):
        from ..kernels.nearest_code import topk_codes_fwd

        if codebook.shape[1] >= MAX_TRITON_CODES:  # (the kernel packs a code index in 30 bits)
            raise ValueError(f"fastvq.topk_codes: a codebook of {codebook.shape[1]} codes is beyond the Triton "
                             f"kernel's {MAX_TRITON_CODES} (2^30); use the reference backend for it")

        return order_by_distance(x, codebook, *topk_codes_fwd(x, codebook, k, metric, allow_tf32))
    return topk_codes_ref(x, codebook, k, metric, allow_tf32=allow_tf32)


@_topk_codes_op.register_fake
def _(x, codebook, k, metric, allow_tf32):
    shape = (x.shape[0], x.shape[1], k)
    return x.new_empty(shape, dtype=torch.int64), x.new_empty(shape, dtype=torch.float32)


def topk_codes(
    x: torch.Tensor, codebook: torch.Tensor, k: int, metric: str = "l2", *, allow_tf32: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` nearest codes of every row of ``x``, nearest first, with their distances: one
    fused pass, no ``N x K`` distance matrix.

    Args:
        x: ``(..., D)`` float32/float16/bfloat16 (``(H, ..., D)`` with ``H`` codebooks), as
            for :func:`fastvq.nearest_code`.
        codebook: ``(K, D)`` or ``(H, K, D)``, as for :func:`fastvq.nearest_code`.
        k: ``1 <= k <= min(K, 128)``; an int (integral floats are taken; bools and
            non-integral floats raise).
        metric: ``"l2"``, ``"euclidean"``, ``"cosine"`` or ``"dot"`` (see :func:`fastvq.nearest_code`).
        allow_tf32: as for :func:`fastvq.nearest_code`.

    Returns:
        ``(indices, distances)`` of shape ``x.shape[:-1] + (k,)``: int64 in ``[0, K)``, all
        different within a row, in increasing distance (the returned distances never decrease
        along a row of finite codes for a finite row; non-finite codes and rows follow the order
        below, so a dot row can read ``[-1, -inf]``); float32 distances computed directly at each
        code. The k are the k
        smallest float32 scores of the search, ties to the smaller index, then ordered by their
        distances (a stable sort: equal distances keep that order), so ``indices[..., 0]`` is
        what :func:`fastvq.nearest_code` returns up to float32 rounding of near-ties (duplicate
        codes are near-ties, ``NUMERIC_CONTRACT``).

    Non-finite values follow :func:`fastvq.nearest_code`: codes with a NaN or infinite entry come
    after every finite code (by index); a row with an infinite entry lists the finite codes in
    index order (all at distance +inf for l2); a row with a NaN gets ``0, 1, ..., k-1`` at
    distance NaN. Not differentiable.

    Example::

        >>> codebook = torch.randn(512, 64)
        >>> idx, dist = fastvq.topk_codes(torch.randn(100, 64), codebook, k=8)
        >>> idx.shape, bool((dist[:, 1:] >= dist[:, :-1]).all())
        (torch.Size([100, 8]), True)
    """
    x3, c3, lead, allow_tf32 = search_inputs("topk_codes", x, codebook, metric, allow_tf32)
    K = c3.shape[1]
    k = check_int_arg("topk_codes", "k", k, minimum=1)
    if k > K:
        raise ValueError(f"fastvq.topk_codes: k = {k} is more than the codebook's K = {K} codes")
    if k > MAX_K:
        raise ValueError(f"fastvq.topk_codes: k = {k} is above the supported maximum {MAX_K}")
    indices, distances = _topk_codes_op(x3, c3, k, metric, allow_tf32)
    return indices.reshape(*lead, k), distances.reshape(*lead, k)
