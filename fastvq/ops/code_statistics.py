"""code_statistics: per-code row counts and sums for EMA codebook updates, no one-hot matrix."""

from __future__ import annotations

import torch

from .._backend import use_triton
from .._checks import check_float, check_index_range, check_int, check_same_device, check_tensor
from ..reference.code_statistics import code_statistics_ref


@torch.library.custom_op("fastvq::code_statistics", mutates_args=())
def _code_statistics_op(
    x: torch.Tensor, indices: torch.Tensor, num_codes: int, deterministic: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    # here, not in the wrapper: the op body runs eagerly under torch.compile too
    check_index_range("code_statistics", f"indices (num_codes={num_codes})", indices, num_codes)
    if use_triton("code_statistics", x, indices):
        from ..kernels.code_statistics import code_statistics_fwd

        if indices.dim() == 2:  # levels: code k of level l is segment l * num_codes + k
            L, N = indices.shape
            D = x.shape[-1]
            levels = torch.arange(L, device=indices.device, dtype=torch.int64) * num_codes
            seg = (indices.long() + levels[:, None]).reshape(L * N)
            counts, sums = code_statistics_fwd(x.reshape(L * N, D), seg, L * num_codes, deterministic)
            return counts.reshape(L, num_codes), sums.reshape(L, num_codes, D)
        return code_statistics_fwd(x, indices, num_codes, deterministic)
    return code_statistics_ref(x, indices, num_codes, deterministic=deterministic)


@_code_statistics_op.register_fake
def _(x, indices, num_codes, deterministic):
    lead = indices.shape[:-1]
    return (
        x.new_empty((*lead, num_codes), dtype=torch.float32),
        x.new_empty((*lead, num_codes, x.shape[-1]), dtype=torch.float32),
    )


def code_statistics(
    x: torch.Tensor, indices: torch.Tensor, num_codes: int, *, deterministic: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """How many rows chose each code, and the sum of those rows: the statistics of an EMA update.

    ``counts[k] = #{i : indices[i] == k}`` and ``sums[k] = sum_{i : indices[i] == k} x[i]``,
    computed without the ``(N, K)`` one-hot matrix (and its ``one_hot.T @ x`` matmul) that the
    usual EMA code builds. An EMA codebook then updates with, e.g.,
    ``cluster_size.lerp_(counts, 1 - decay)`` and ``embed_avg.lerp_(sums, 1 - decay)``.

    Args:
        x: ``(N, D)`` float32/float16/bfloat16, or ``(L, N, D)`` for ``L`` residual levels at once.
        indices: ``(N,)`` (or ``(L, N)``) int64/int32 codes in ``[0, num_codes)``, same device.
        num_codes: ``K``, the codebook size (an ``int >= 0``).
        deterministic: ``True`` (the default) sorts the indices (stable sort) and sums each code's
            rows in a fixed order, so the result is bitwise reproducible from run to run. ``False``
            accumulates with float32 atomics: one pass and no sort, so faster, but the low bits of
            ``sums`` may differ between runs (``counts`` are exact integers either way while
            below 2**24).

    Returns:
        ``(counts, sums)``: float32 ``(K,)`` and ``(K, D)``, or ``(L, K)`` and ``(L, K, D)`` for
        the batched form. Codes nobody chose get 0. Not differentiable (``x`` is detached).

    Raises:
        ValueError: shapes that do not match, or any index outside ``[0, num_codes)`` (this check
            reads the indices on the host, also inside compiled graphs).
        TypeError: non-float ``x``, non-integer ``indices``, non-int ``num_codes``.

    Example::

        >>> x = torch.randn(1000, 64)
        >>> idx = torch.randint(0, 512, (1000,))
        >>> counts, sums = fastvq.code_statistics(x, idx, 512)
        >>> counts.shape, sums.shape, int(counts.sum())
        (torch.Size([512]), torch.Size([512, 64]), 1000)
    """
    op = "code_statistics"
    check_tensor(op, "x", x)
    check_tensor(op, "indices", indices)
    check_float(op, "x", x)
    check_int(op, "indices", indices)
    check_same_device(op, x=x, indices=indices)
    if isinstance(num_codes, bool) or not isinstance(num_codes, int):
        raise TypeError(f"fastvq.{op}: num_codes must be an int, got {type(num_codes).__name__}")
    if num_codes < 0:
        raise ValueError(f"fastvq.{op}: num_codes must be >= 0, got {num_codes}")
    if not isinstance(deterministic, bool):
        raise TypeError(f"fastvq.{op}: deterministic must be a bool, got {type(deterministic).__name__}")
    if not ((x.dim() == 2 and indices.dim() == 1) or (x.dim() == 3 and indices.dim() == 2)):
        raise ValueError(
            f"fastvq.{op}: expected x (N, D) with indices (N,), or x (L, N, D) with indices (L, N); "
            f"got x {tuple(x.shape)} and indices {tuple(indices.shape)}"
        )
    if x.shape[:-1] != indices.shape:
        raise ValueError(
            f"fastvq.{op}: x {tuple(x.shape)} and indices {tuple(indices.shape)} disagree on the row count"
        )
    return _code_statistics_op(x.detach(), indices, num_codes, deterministic)
