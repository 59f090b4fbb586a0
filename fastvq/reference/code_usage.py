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
        counts: ``(K,)`` int64, how often each code occurs.
        perplexity: 0-d float32, ``exp(entropy)``: the effective number of codes in use
            (1 for an empty input).
        active_codes: 0-d int64, number of codes with a nonzero count.
        entropy: 0-d float32, ``-sum p log(p + 1e-10)`` in nats with ``p = counts / counts.sum()``
            (0 for an empty input).

    All fields are tensors on the device of the indices; nothing is copied to the host.
    """

    counts: torch.Tensor
    perplexity: torch.Tensor
    active_codes: torch.Tensor
    entropy: torch.Tensor

    @property
    def codebook_size(self) -> int:
        return self.counts.shape[0]

    @property
    def usage(self) -> torch.Tensor:
        """0-d float32: fraction of the codebook in use, ``active_codes / K``."""
        return self.active_codes.float() / max(self.codebook_size, 1)

    def to_dict(self) -> dict:
        """Python numbers (one host sync): ``perplexity``, ``active_codes``, ``entropy``, ``usage``."""
        return {
            "perplexity": self.perplexity.item(),
            "active_codes": int(self.active_codes.item()),
            "entropy": self.entropy.item(),
            "usage": self.usage.item(),
        }


def code_usage_counts_ref(indices: torch.Tensor, codebook_size: int) -> torch.Tensor:
    """``(N,)`` integer ids -> ``(K + 1,)`` int64 counts; bin ``K`` counts ids outside ``[0, K)``."""
    idx = indices.reshape(-1).long()
    bad = (idx < 0) | (idx >= codebook_size)
    idx = torch.where(bad, torch.full_like(idx, codebook_size), idx)
    return torch.bincount(idx, minlength=codebook_size + 1)


def usage_from_counts(counts: torch.Tensor) -> CodeUsage:
    """The seed's formulas on a ``(K,)`` count vector, in float32 (as the seed computes them)."""
    probs = counts.float()
    probs = probs / probs.sum().clamp_min(1.0)  # an empty input gives p = 0, not 0/0
    entropy = -(probs * torch.log(probs + EPS)).sum()
    return CodeUsage(
        counts=counts,
        perplexity=torch.exp(entropy),
        active_codes=(counts > 0).sum(),
        entropy=entropy,
    )


def code_usage_ref(indices: torch.Tensor, codebook_size: int) -> CodeUsage:
    """Reference for :func:`fastvq.code_usage` (no input checks; out-of-range ids are dropped)."""
    return usage_from_counts(code_usage_counts_ref(indices, codebook_size)[:codebook_size])
