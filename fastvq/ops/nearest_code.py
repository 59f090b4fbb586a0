"""nearest_code: the nearest codebook entry of every row (l2 / cosine / dot), not differentiable."""

from __future__ import annotations

import torch

from .._backend import use_triton
from .._checks import check_float, check_last_dim, check_metric, check_same_device, check_tensor
from ..reference.nearest_code import nearest_code_ref
from ._search import METRICS


@torch.library.custom_op("fastvq::nearest_code", mutates_args=())
def _nearest_code_op(x: torch.Tensor, codebook: torch.Tensor, metric: str, allow_tf32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton("nearest_code", x, codebook):
        from ..kernels.nearest_code import nearest_code_fwd

        return nearest_code_fwd(x, codebook, metric, allow_tf32)
    return nearest_code_ref(x, codebook, metric, allow_tf32=allow_tf32)


@_nearest_code_op.register_fake
def _(x, codebook, metric, allow_tf32):
    n = x.shape[0]
    return x.new_empty((n,), dtype=torch.int64), x.new_empty((n,), dtype=torch.float32)


def nearest_code(
    x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", *, allow_tf32: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """The nearest code of every row of ``x``: one fused pass, no ``N x K`` distance matrix.

    Args:
        x: ``(..., D)`` float32/float16/bfloat16, any strides; no rows (``N = 0``) gives
            empty outputs. float64, integer and other dtypes raise ``TypeError`` (cast first).
        codebook: ``(K, D)``, ``K >= 1``, same device, any strides; a different float dtype
            (float32/float16/bfloat16) is promoted with ``torch.promote_types``.
        metric: ``"l2"`` (squared Euclidean), ``"euclidean"`` (``|x - c|``, the same order),
            ``"cosine"`` (``1 - cos``; a zero vector has cosine 0, so distance 1) or ``"dot"``
            (``-<x, c>``, i.e. the largest inner product).
        allow_tf32: fp32 inputs only. By default the fp32 dot products are exact IEEE fp32
            ("ieee" input precision), so the index is the exact nearest code except for
            near-ties (gaps below ~1e-6 relative). ``True`` runs them as tf32 on the tensor
            cores: several times faster, but codes within ~1e-3 relative may swap.
            float16/bfloat16 always use the tensor cores with float32 accumulation.

    Returns:
        ``(indices, distances)``, both of shape ``x.shape[:-1]``: ``indices`` int64 in
        ``[0, K)``; ``distances`` float32, the distance to that code, computed directly from
        the row and the chosen code (l2 and euclidean never negative, cosine in ``[0, 2]``).
        Exact ties go to the smallest index, as ``torch.argmin``.

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
    """
    op = "nearest_code"
    check_tensor(op, "x", x, min_ndim=1)
    check_tensor(op, "codebook", codebook, ndim=2)
    check_float(op, "x", x)
    check_float(op, "codebook", codebook)
    check_same_device(op, x=x, codebook=codebook)
    check_last_dim(op, "x", x, "codebook", codebook)
    if codebook.shape[0] == 0:
        raise ValueError(f"fastvq.{op}: codebook is empty (K = 0), shape {tuple(codebook.shape)}")
    if not isinstance(metric, str):
        raise TypeError(f"fastvq.{op}: metric must be a str, got {type(metric).__name__}")
    check_metric(op, metric, METRICS)
    if not isinstance(allow_tf32, bool):
        raise TypeError(f"fastvq.{op}: allow_tf32 must be a bool, got {type(allow_tf32).__name__}")
    x, codebook = x.detach(), codebook.detach()
    if x.dtype != codebook.dtype:
        dtype = torch.promote_types(x.dtype, codebook.dtype)
        x, codebook = x.to(dtype), codebook.to(dtype)
    lead = x.shape[:-1]
    # explicit row count: reshape(-1, D) is ambiguous (and raises) when D == 0
    indices, distances = _nearest_code_op(x.reshape(lead.numel(), x.shape[-1]), codebook, metric, allow_tf32)
    return indices.reshape(lead), distances.reshape(lead)
