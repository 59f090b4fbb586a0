"""code_statistics: per-code (weighted) row counts and sums for EMA codebook updates, no one-hot
matrix, no host sync."""

from __future__ import annotations

from typing import Optional

import torch

from .._backend import deterministic_requested, use_triton
from ._custom_op import custom_op
from .._checks import (assert_async, check_bool_arg, check_float, check_int, check_int_arg, check_row_weights,
                       check_same_device, check_tensor)
from ..reference.code_statistics import code_statistics_full_ref

OP = "code_statistics"
MAX_KEYS = 2**31 - 2  # L * num_codes + 1 keys (the last: out of range) must fit int32


@custom_op("fastvq::code_statistics", mutates_args=())
def _code_statistics_op(
    x: torch.Tensor,
    indices: torch.Tensor,
    num_codes: int,
    deterministic: bool,
    weights: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> ``counts``, ``sums``, ``skipped`` (int64 ``(L,)``: rows left out as not finite).
    Raises (without a host sync) when a row of nonzero weight has an index out of range."""
    lead = indices.shape[:-1]
    if use_triton(OP, x, indices, *(() if weights is None else (weights,))):
        from ..kernels.code_statistics import code_statistics_fwd

        L, N = (indices.shape[0], indices.shape[1]) if indices.dim() == 2 else (1, indices.shape[0])
        D = x.shape[-1]
        w = None if weights is None else weights.reshape(-1)
        if N == 0 or L == 0:
            counts = torch.zeros((L * num_codes,), dtype=torch.float32, device=x.device)
            sums = torch.zeros((L * num_codes, D), dtype=torch.float32, device=x.device)
            bad = torch.zeros((L, 2), dtype=torch.int32, device=x.device)
        else:
            counts, sums, bad = code_statistics_fwd(x.reshape(L * N, D), indices.reshape(L * N), num_codes, N, w,
                                                    deterministic_requested(deterministic))
        counts, sums = counts.reshape(*lead, num_codes), sums.reshape(*lead, num_codes, D)
    else:
        counts, sums, bad = code_statistics_full_ref(x, indices, num_codes, weights,
                                                     deterministic=deterministic_requested(deterministic))
    # Bad input is still caught, without reading anything on the host while all is well: on CUDA
    # an asynchronous device-side assert (as torch's own index ops), on CPU a ValueError now.
    assert_async(OP, bad[:, 1].sum() == 0, lambda: _range_error(indices, weights, num_codes))
    return counts, sums, bad[:, 0].long()


@_code_statistics_op.register_fake
def _(x, indices, num_codes, deterministic, weights=None):
    lead = indices.shape[:-1]
    L = indices.shape[0] if indices.dim() == 2 else 1
    return (
        x.new_empty((*lead, num_codes), dtype=torch.float32),
        x.new_empty((*lead, num_codes, x.shape[-1]), dtype=torch.float32),
        x.new_empty((L,), dtype=torch.int64),
    )


def _range_error(indices, weights, num_codes) -> str:
    """The message for indices out of range (built only once the check has failed)."""
    live = torch.ones_like(indices, dtype=torch.bool) if weights is None else (weights != 0).expand(indices.shape)
    out = live & ((indices < 0) | (indices >= num_codes))
    values = indices[out]
    found = f": {values.numel()} rows, values in [{int(values.min())}, {int(values.max())}]" if values.numel() else ""
    return f"indices (num_codes={num_codes}) must lie in [0, {num_codes}) where the weight is nonzero{found}"


def code_statistics(
    x: torch.Tensor,
    indices: torch.Tensor,
    num_codes: int,
    *,
    weights: torch.Tensor | None = None,
    deterministic: bool = True,
    return_skipped: bool = False,
):
    """How many rows chose each code, and the sum of those rows: the statistics of an EMA update.

    ``counts[k] = sum_{i : indices[i] == k} w_i`` and ``sums[k] = sum_{i : indices[i] == k} w_i x_i``
    (``w_i = 1`` without ``weights``), computed without the ``(N, K)`` one-hot matrix (and its
    ``one_hot.T @ x`` matmul) that the usual EMA code builds, and without reading anything on the
    host (no ``.item()``, no data-dependent shape: safe on a training step and in CUDA graphs).
    An EMA codebook then updates with, e.g., ``cluster_size.lerp_(counts, 1 - decay)`` and
    ``embed_avg.lerp_(sums, 1 - decay)``.

    Numeric contract (both backends, every input dtype):

    - a row whose weight is 0 (``False`` in a mask) is ignored: its index and values are never
      looked at (padding may hold anything);
    - a row whose weight or any element is NaN or infinite is **left out** of ``counts`` and
      ``sums`` and **counted** (``skipped``), so one bad row cannot poison a code;
    - sums and counts are accumulated in float64 and rounded once to float32, are never NaN, and
      codes nobody chose get exactly 0. With ``deterministic=True`` (and on the reference) each
      sum is carried as exact parts and a remainder, so it is the exact value rounded to
      nearest even (``+inf``/``-inf`` exactly when that lies beyond float32's range) unless the
      exact value lies within about ``n^2 2^-136`` of its largest term plus ``2^-159`` of its
      largest partial sum (kernels, ``n`` rows per tile), or ``2^-106``
      of itself plus ``n^4 2^-156`` of its largest term (reference), from a rounding midpoint:
      a plain float64 sum of ``max``, ``2^103``, ``-2^60`` lands on the overflow midpoint and
      rounds to ``+inf``, the exact sum to ``max``.
      With ``deterministic=False`` the float64 atomics round each addition: a sum is within
      about ``n 2^-53`` times the sum of its terms' magnitudes of the exact one (terms that
      cancel lose what lies below that: ``2^100, 1, -2^100`` gives 0);
    - counts without weights are exact integers (below 2**24).

    Args:
        x: ``(N, D)`` float32/float16/bfloat16, or ``(L, N, D)`` for ``L`` residual levels at once.
        indices: ``(N,)`` (or ``(L, N)``) int64/int32 codes in ``[0, num_codes)``, same device.
        num_codes: ``K``, the codebook size (an ``int >= 0``; ``L * K <= 2**31 - 2``, the int32
            sort keys, on both backends).
        weights: optional per-row weights, ``(N,)`` float (float32/float16/bfloat16) or bool (a
            padding mask: ``True`` = use the row); for the batched form ``(N,)`` (one weight per
            row at every level) or ``(L, N)``. ``None``: every row weighs 1.
        deterministic: ``True`` (the default) sorts the indices (a stable sort of int32 keys) and
            sums each code's rows in a fixed order, so the result is bitwise reproducible from
            run to run, and balances the work (a code that takes every row costs about what
            evenly spread codes cost). ``False`` accumulates with atomics: one pass and no sort,
            but the float32 rounding of ``sums`` may differ between runs in rare cases. Under
            ``torch.use_deterministic_algorithms(True)`` the deterministic path runs either way.
        return_skipped: also return ``skipped``, int64 ``()`` (or ``(L,)``): the number of rows
            (per level) left out because they were not finite.

    Returns:
        ``(counts, sums)``, or ``(counts, sums, skipped)``: float32 ``(K,)`` and ``(K, D)``, or
        ``(L, K)`` and ``(L, K, D)`` for the batched form. Not differentiable (``x`` is detached).

    Raises:
        ValueError: shapes that do not match; ``L * num_codes > 2**31 - 2`` or ``L * N >= 2**31``
            (int32 keys and offsets); an index outside ``[0, num_codes)`` in a row of nonzero weight (found without a host sync: on CPU at once; on CUDA the check is an
            asynchronous device-side assert, like torch's own index ops, reported at the next
            synchronisation as a CUDA error; out-of-range rows never touch memory out of bounds).
        TypeError: non-float ``x``, non-integer ``indices``, non-int ``num_codes``, weights of
            another dtype.

    Example::

        >>> x = torch.randn(1000, 64)
        >>> idx = torch.randint(0, 512, (1000,))
        >>> counts, sums = fastvq.code_statistics(x, idx, 512)
        >>> counts.shape, sums.shape, int(counts.sum())
        (torch.Size([512]), torch.Size([512, 64]), 1000)
        >>> x[3] = float("nan")                      # a bad row is left out, and counted
        >>> mask = torch.arange(1000) < 900           # padding: the last 100 rows do not count
        >>> counts, sums, skipped = fastvq.code_statistics(x, idx, 512, weights=mask, return_skipped=True)
        >>> int(counts.sum()), int(skipped)
        (899, 1)
    """
    check_tensor(OP, "x", x)
    check_tensor(OP, "indices", indices)
    check_float(OP, "x", x)
    check_int(OP, "indices", indices)
    check_same_device(OP, x=x, indices=indices)
    num_codes = check_int_arg(OP, "num_codes", num_codes, minimum=0)
    deterministic = check_bool_arg(OP, "deterministic", deterministic)
    return_skipped = check_bool_arg(OP, "return_skipped", return_skipped)
    if not ((x.dim() == 2 and indices.dim() == 1) or (x.dim() == 3 and indices.dim() == 2)):
        raise ValueError(
            f"fastvq.{OP}: expected x (N, D) with indices (N,), or x (L, N, D) with indices (L, N); "
            f"got x {tuple(x.shape)} and indices {tuple(indices.shape)}"
        )
    if x.shape[:-1] != indices.shape:
        raise ValueError(
            f"fastvq.{OP}: x {tuple(x.shape)} and indices {tuple(indices.shape)} disagree on the row count"
        )
    levels = x.shape[0] if x.dim() == 3 else 1
    if levels * num_codes > MAX_KEYS:  # the Triton path's int32 sort keys (one per level and code)
        raise ValueError(f"fastvq.{OP}: num_codes must be <= {MAX_KEYS // max(levels, 1)} (L * num_codes <= "
                         f"2**31 - 2, int32 keys), got {num_codes} with L = {levels}")
    if indices.numel() >= 2**31:
        raise ValueError(f"fastvq.{OP}: x must have fewer than 2**31 rows (L * N, int32 offsets), got shape "
                         f"{tuple(x.shape)}")
    if weights is not None:
        shapes = (indices.shape, indices.shape[-1:]) if indices.dim() == 2 else (indices.shape,)
        weights = check_row_weights(OP, "weights", weights, x, shapes)
    counts, sums, skipped = _code_statistics_op(x.detach(), indices, num_codes, deterministic, weights)
    if not return_skipped:
        return counts, sums
    return counts, sums, (skipped if indices.dim() == 2 else skipped.reshape(()))
