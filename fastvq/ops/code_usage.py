"""code_usage: how a codebook is used (counts, perplexity, active codes, entropy), and a meter
that accumulates it over many batches on the device without host syncs."""

from __future__ import annotations

import torch

from .._backend import use_triton
from ._custom_op import custom_op
from .._checks import assert_async, check_int_arg, check_tensor
from ..reference.code_usage import CodeUsage, code_usage_counts_ref, out_of_range_detail, usage_from_counts

__all__ = ["CodeUsage", "CodeUsageMeter", "code_usage"]

INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)

#: The largest ``codebook_size`` (the int32 index range; the histogram is ``codebook_size + 1`` int64).
MAX_CODEBOOK_SIZE = 2**31 - 1


@custom_op("fastvq::code_usage_counts", mutates_args=())
def _code_usage_counts_op(indices: torch.Tensor, codebook_size: int, check: bool) -> torch.Tensor:
    """``(K + 1,)`` int64 counts; bin ``K`` counts ids outside ``[0, K)``. ``check=True`` rejects
    such ids without a host sync (:func:`fastvq._checks.assert_async`: a ``ValueError`` on the
    CPU, an asynchronous device-side assert on CUDA). The check lives in the op body, which runs
    eagerly even inside a torch.compile'd graph, so compiled code is checked too."""
    if use_triton("code_usage", indices):
        from ..kernels.code_usage import code_usage_fwd

        counts = code_usage_fwd(indices, codebook_size)
    else:
        counts = code_usage_counts_ref(indices, codebook_size)
    if check:
        assert_async("code_usage", counts[codebook_size] == 0,
                     lambda: out_of_range_detail(int(counts[codebook_size]), codebook_size))
    return counts


@_code_usage_counts_op.register_fake
def _(indices, codebook_size, check):
    return indices.new_empty((codebook_size + 1,), dtype=torch.int64)


def _check(op: str, indices, codebook_size) -> tuple[torch.Tensor, int]:
    check_tensor(op, "indices", indices)
    if indices.dtype not in INT_DTYPES:
        raise TypeError(f"fastvq.{op}: indices must be an integer tensor (int8/uint8/int16/int32/int64), got {indices.dtype}")
    return indices.reshape(-1), check_int_arg(op, "codebook_size", codebook_size, minimum=1, maximum=MAX_CODEBOOK_SIZE)


def code_usage(indices: torch.Tensor, codebook_size: int) -> CodeUsage:
    """Codebook usage of a set of code indices: counts, perplexity, active codes, entropy.

    Args:
        indices: integer tensor (int8/uint8/int16/int32/int64) of any shape, values in
            ``[0, codebook_size)``. All elements count, whatever the shape: residual codes
            ``(..., L)`` are pooled over levels (pass ``codes[..., l]`` for one level's usage).
        codebook_size: ``K``, the number of codes, ``1 <= K <= 2**31 - 1``.

    Returns:
        :class:`CodeUsage` with ``counts (K,)`` int64 (a bincount: an atomic histogram kernel
        on the Triton backend), and the seed's formulas with ``p = counts / counts.sum()``:
        ``entropy = -sum p log(p + 1e-10)`` (0-d float32), ``perplexity = exp(entropy)``
        (0-d float32), ``active_codes = (counts > 0).sum()`` (0-d int64) and ``out_of_range``
        (0-d int64, 0). An empty input gives zero counts, entropy 0 and perplexity 1; counts of
        any size (up to int64) give finite statistics. Nothing is differentiable, and nothing
        is read on the host.

    Raises:
        ValueError: an index outside ``[0, codebook_size)``, checked without a host sync: on
            the CPU right away; on CUDA as an asynchronous device-side assert (reported at the
            next synchronisation), as torch's own index ops do. Also inside
            ``torch.compile(fullgraph=True)`` code. :class:`CodeUsageMeter` defers it to
            ``compute()``.

    Example::

        >>> u = fastvq.code_usage(torch.tensor([0, 1, 1, 3]), 4)
        >>> u.counts, u.active_codes
        (tensor([1, 2, 0, 1]), tensor(3))
    """
    op = "code_usage"
    flat, codebook_size = _check(op, indices, codebook_size)
    counts = _code_usage_counts_op(flat, codebook_size, True)
    return usage_from_counts(counts[:codebook_size], counts[codebook_size])


class CodeUsageMeter:
    """Accumulates :func:`code_usage` over many batches without keeping them.

    ``update(indices)`` adds a batch's counts on the indices' device (no host sync);
    ``compute()`` gives the :class:`CodeUsage` of every index seen so far, as if
    :func:`code_usage` ran on their concatenation; ``mean_batch_perplexity`` is the mean of the
    per-batch perplexities, the ``perplexity`` of the seed's ``compute_quantization_metrics``.

    The seed's ``usage_entropy`` is the entropy formula applied to the *sum* of the per-batch
    probability vectors, which is not a distribution for more than one batch (it grows with the
    number of batches); ``compute().entropy`` is the entropy of the pooled counts. They agree for
    one batch. ``active_codes`` agrees always.

    Example::

        meter = fastvq.CodeUsageMeter(num_embeddings)
        for batch in loader:
            _, _, _, codes = model(batch["features"])
            meter.update(codes)
        usage = meter.compute()          # usage.perplexity, usage.active_codes, usage.entropy
        meter.mean_batch_perplexity      # the seed's 'perplexity'
    """

    def __init__(self, codebook_size: int):
        self.codebook_size = check_int_arg("CodeUsageMeter", "codebook_size", codebook_size, minimum=1,
                                           maximum=MAX_CODEBOOK_SIZE)
        self.reset()

    def reset(self) -> None:
        """Forget every batch seen."""
        self._counts: torch.Tensor | None = None  # (K + 1,): last bin counts out-of-range ids
        self._perplexity_sum: torch.Tensor | None = None
        self.num_batches = 0

    @property
    def device(self) -> torch.device | None:
        """Device of the accumulated state (that of the first batch), or None before any."""
        return None if self._counts is None else self._counts.device

    def update(self, indices: torch.Tensor) -> CodeUsage:
        """Add one batch of indices (any shape, integer dtype, on the device of the batches
        before it). Returns that batch's :class:`CodeUsage` (``counts (K,)`` int64, 0-d
        statistics), computed on the device.

        Out-of-range ids are not checked here (that would sync with the device): they are
        counted aside (the batch usage's ``out_of_range``, with NaN entropy and perplexity),
        left out of the counts, and make ``compute()`` raise.
        """
        op = "CodeUsageMeter"
        flat, _ = _check(op, indices, self.codebook_size)
        if self._counts is not None and flat.device != self._counts.device:
            raise ValueError(f"fastvq.{op}: indices on {flat.device}, but the meter accumulates on {self._counts.device}")
        counts = _code_usage_counts_op(flat, self.codebook_size, False)  # checked in compute()
        batch = usage_from_counts(counts[: self.codebook_size], counts[self.codebook_size])
        if self._counts is None:
            self._counts = counts.clone()  # (the batch usage returned is the caller's)
            self._perplexity_sum = batch.perplexity.clone()
        else:
            self._counts = self._counts + counts
            self._perplexity_sum = self._perplexity_sum + batch.perplexity
        self.num_batches += 1
        return batch

    def compute(self) -> CodeUsage:
        """:class:`CodeUsage` (``counts (K,)`` int64, 0-d statistics) over every index seen since
        the last ``reset()`` (zero counts on the CPU before any batch).

        Raises:
            ValueError: some batch held an index outside ``[0, codebook_size)`` (one host sync).
        """
        if self._counts is None:
            return usage_from_counts(torch.zeros(self.codebook_size, dtype=torch.int64), torch.zeros((), dtype=torch.int64))
        n_bad = int(self._counts[self.codebook_size].item())
        if n_bad:
            raise ValueError(f"fastvq.CodeUsageMeter: {out_of_range_detail(n_bad, self.codebook_size)}")
        return usage_from_counts(self._counts[: self.codebook_size].clone(), self._counts[self.codebook_size])

    @property
    def mean_batch_perplexity(self) -> torch.Tensor:
        """0-d float32 on the batches' device: the mean of the per-batch perplexities (the seed's
        ``perplexity``). NaN once a batch held an index outside ``[0, codebook_size)`` (that
        batch's perplexity is NaN: reading it here costs no host sync; ``compute()`` raises for
        it). ``RuntimeError`` before any batch."""
        if self.num_batches == 0:
            raise RuntimeError("fastvq.CodeUsageMeter: no batches seen yet")
        return self._perplexity_sum / self.num_batches

    def __repr__(self) -> str:
        return f"CodeUsageMeter(codebook_size={self.codebook_size}, num_batches={self.num_batches})"
