"""Reference for :func:`fastvq.code_usage`: a bincount and the seed's usage formulas.

Also home of the :class:`CodeUsage` result type (re-exported as ``fastvq.CodeUsage``), so
that the op module can import the reference without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

EPS = 1e-10  # the seed's log(p + 1e-10)


@dataclass(frozen=True)
class CodeUsage:
    """How a codebook is used by a set of code indices.

    Attributes:
        counts: ``(K,)`` int64, how often each code occurs (indices outside ``[0, K)`` left out).
        perplexity: 0-d float32, ``exp(entropy)``: the effective number of codes in use
            (1 for an empty input; NaN when ``out_of_range > 0``).
        active_codes: 0-d int64, number of codes with a nonzero count.
        entropy: 0-d float32, ``-sum p log(p + 1e-10)`` in nats with ``p = counts / counts.sum()``
            (0 for an empty input; NaN when ``out_of_range > 0``).
        out_of_range: 0-d int64, how many indices lay outside ``[0, K)``: 0 from
            :func:`fastvq.code_usage` (which rejects such input); a batch usage of
            :class:`fastvq.CodeUsageMeter` counts them here (with NaN entropy and perplexity)
            and :meth:`to_dict` raises for them.

    All fields are tensors on the device of the indices; nothing is copied to the host.
    """

    counts: torch.Tensor
    perplexity: torch.Tensor
    active_codes: torch.Tensor
    entropy: torch.Tensor
    out_of_range: torch.Tensor | None = None

    @property
    def codebook_size(self) -> int:
        """``K``, the length of ``counts`` (a Python int)."""
        return self.counts.shape[0]

    @property
    def usage(self) -> torch.Tensor:
        """0-d float32: fraction of the codebook in use, ``active_codes / K``."""
        return self.active_codes.float() / max(self.codebook_size, 1)

    def to_dict(self) -> dict:
        """Python numbers (one host sync): ``perplexity``, ``active_codes``, ``entropy``, ``usage``.

        Raises ``ValueError`` when some index was outside ``[0, K)``.
        """
        values = [self.perplexity, self.active_codes.double(), self.entropy, self.usage]
        if self.out_of_range is not None:
            values.append(self.out_of_range.double())
        values = torch.stack([v.double() for v in values]).tolist()
        if self.out_of_range is not None and values[4]:
            raise ValueError(f"fastvq.CodeUsage: {out_of_range_detail(int(values[4]), self.codebook_size)}")
        return {"perplexity": values[0], "active_codes": int(values[1]), "entropy": values[2], "usage": values[3]}


def out_of_range_detail(n_bad: int, codebook_size: int) -> str:
    return f"{n_bad} indices are outside [0, {codebook_size}) (codebook_size={codebook_size})"


def code_usage_counts_ref(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """``(N,)`` integer ids -> ``(K + 1,)`` int64 counts; bin ``K`` counts ids outside ``[0, K)``."""
    idx = indices.reshape(-1).long()
    bad = (idx < 0) | (idx >= codebook_size)
    idx = torch.where(bad, torch.full_like(idx, codebook_size), idx)
    counts = torch.zeros(codebook_size + 1, dtype=torch.int64, device=idx.device)
    # (not bincount: its output size depends on the largest value, a host sync on CUDA)
    return counts.index_add_(0, idx, torch.ones_like(idx))


def usage_from_counts(counts: torch.Tensor, out_of_range: torch.Tensor | None = None) -> CodeUsage:
    """The seed's formulas on a ``(K,)`` count vector, in float32 (as the seed computes them).

    ``out_of_range`` (0-d int64, optional): indices that fell outside ``[0, K)``; when nonzero the
    entropy and perplexity are NaN (the statistics of invalid input are not made up).
    """
    probs = counts.float()
    probs = probs / probs.sum().clamp_min(1.0)  # an empty input gives p = 0, not 0/0
    # 0 - s, not -s: one code in use (or none) gives +0.0, not -0.0
    entropy = 0.0 - (probs * torch.log(probs + EPS)).sum()
    if out_of_range is not None:
        entropy = torch.where(out_of_range > 0, float("nan"), entropy)
    return CodeUsage(
        counts=counts,
        perplexity=torch.exp(entropy),
        active_codes=(counts > 0).sum(),
        entropy=entropy,
        out_of_range=out_of_range,
    )


def code_usage_ref(indices: torch.Tensor, codebook_size: int) -> CodeUsage:
    """Reference for :func:`fastvq.code_usage`: ``indices`` any shape, integer;
    ``codebook_size`` ``K`` -> :class:`CodeUsage` (``counts (K,)`` int64, 0-d statistics). No
    input checks; out-of-range ids are counted in ``out_of_range`` and make the entropy and
    perplexity NaN."""
    counts = code_usage_counts_ref(indices, codebook_size)
    return usage_from_counts(counts[:codebook_size], counts[codebook_size])
