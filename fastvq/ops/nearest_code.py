"""nearest_code: the nearest codebook entry of every row (l2 / euclidean / cosine / dot), one or
several codebooks in one launch, not differentiable."""

from __future__ import annotations

import torch

from .._backend import use_triton
from ._custom_op import custom_op
from ..reference.nearest_code import nearest_code_ref
from ._search import search_inputs


@custom_op("fastvq::nearest_code", mutates_args=())
def _nearest_code_op(x: torch.Tensor, codebook: torch.Tensor, metric: str, allow_tf32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # x (H, N, D), codebook (H, K, D) -> (H, N) int64, (H, N) float32
    if use_triton("nearest_code", x, codebook):
        from ..kernels.nearest_code import nearest_code_fwd

        return nearest_code_fwd(x, codebook, metric, allow_tf32)
    return nearest_code_ref(x, codebook, metric, allow_tf32=allow_tf32)


@_nearest_code_op.register_fake
def _(x, codebook, metric, allow_tf32):
    shape = x.shape[:2]
    return x.new_empty(shape, dtype=torch.int64), x.new_empty(shape, dtype=torch.float32)


def nearest_code(
    x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", *, allow_tf32: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest code of every row of ``x``: one fused pass, no ``N x K`` distance matrix.

    Args:
        x: ``(..., D)`` float32/float16/bfloat16, any strides; no rows (``N = 0``) gives
            empty outputs. float64, integer and other dtypes raise ``TypeError`` (cast first).
            With ``H`` codebooks: ``(H, ..., D)``, row ``x[h, ...]`` searched in ``codebook[h]``.
        codebook: ``(K, D)``, ``K >= 1``, or ``(H, K, D)`` for ``H`` separate codebooks (heads,
            groups of a grouped residual VQ), all searched in one launch. Same device, any
            strides; a different float dtype (float32/float16/bfloat16) is promoted with
            ``torch.promote_types``.
        metric: ``"l2"`` (squared Euclidean), ``"euclidean"`` (``|x - c|``, the same order),
            ``"cosine"`` (``1 - cos``; a zero vector has cosine 0, so distance 1) or ``"dot"``
            (``-<x, c>``, i.e. the largest inner product).
        allow_tf32: fp32 inputs only. By default the fp32 dot products keep float32 accuracy:
            on a GPU with TF32 tensor cores (sm_80 and later) each operand is split into two
            TF32 parts and three TF32 products run on the tensor cores (``"tf32x3"``: each
            product within ``3 * 2^-22`` relative, besides the float32 accumulation), elsewhere
            exact IEEE fp32 on the FMA units; either way the index is the exact nearest code
            except for near-ties (gaps below ~1e-6 relative). ``True`` runs one TF32 product:
            faster still, but codes within ~1e-3 relative may swap.
            float16/bfloat16 always use the tensor cores with float32 accumulation.

    Returns:
        ``(indices, distances)``, both of shape ``x.shape[:-1]``: ``indices`` int64 in
        ``[0, K)``; ``distances`` float32, the distance to that code, computed directly from
        the row and the chosen code (l2 and euclidean never negative, cosine in ``[0, 2]``).
        Ties of the computed float32 scores go to the smallest index, as ``torch.argmin``;
        codes equal in exact arithmetic but scored with different rounding (duplicates) are
        near-ties and may go either way (``NUMERIC_CONTRACT``).

    Numbers are never made up: a row with a NaN gets index 0 and distance NaN; a row with an
    infinite entry gets the first finite code at its true distance (l2: +inf); a finite row
    never gets a code with a NaN or infinite entry while a finite code exists (if none does:
    index 0, at its true distance, NaN or +inf); a distance that overflows float32 is +inf
    (dot: -inf); magnitudes from 1e-30 to 3e38 are searched correctly (rows and codes are
    scaled by powers of two before they are squared or normalised). The full contract is
    ``fastvq.ops._search.NUMERIC_CONTRACT``.

    Not differentiable: the outputs never require grad (inputs that do are fine). For a
    straight-through estimator gather ``codebook[indices]`` yourself.

    Example::

        >>> codebook = torch.randn(512, 64)
        >>> idx, dist = fastvq.nearest_code(torch.randn(8, 100, 64), codebook)
        >>> idx.shape, dist.dtype
        (torch.Size([8, 100]), torch.float32)
        >>> heads = torch.randn(4, 256, 32)                       # 4 codebooks of 256 codes
        >>> idx, dist = fastvq.nearest_code(torch.randn(4, 8, 100, 32), heads)
        >>> idx.shape                                              # idx[h] indexes heads[h]
        torch.Size([4, 8, 100])
    """
    x3, c3, lead, allow_tf32 = search_inputs("nearest_code", x, codebook, metric, allow_tf32)
    indices, distances = _nearest_code_op(x3, c3, metric, allow_tf32)
    return indices.reshape(lead), distances.reshape(lead)
