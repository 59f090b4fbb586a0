"""Pure-torch reference for :func:`fastvq.nearest_code`: the test oracle and the CPU path."""

from __future__ import annotations

import torch

from ._chunks import row_chunk

METRICS = ("l2", "cosine", "dot")


def _inv_norm(sq: torch.Tensor) -> torch.Tensor:
    """``1 / sqrt(sq)``, and 0 where ``sq == 0`` (a zero vector has cosine 0 with anything)."""
    return torch.where(sq > 0, sq.rsqrt(), torch.zeros_like(sq))


def code_terms(codebook: torch.Tensor, metric: str) -> torch.Tensor | None:
    """The per-code term computed once per call: ``|c|^2`` (l2), ``1/|c|`` (cosine), none (dot)."""
    if metric == "dot":
        return None
    c32 = codebook.float()
    cc = (c32 * c32).sum(-1)
    return cc if metric == "l2" else _inv_norm(cc)


def scores(x32: torch.Tensor, c32: torch.Tensor, cterm: torch.Tensor | None, metric: str) -> torch.Tensor:
    """``(n, K)`` float32 scores whose row argmin is the nearest code.

    l2: ``|c|^2 - 2 x.c``; cosine: ``-(x.c) / |c|``; dot: ``-(x.c)``. The row-constant
    ``|x|`` terms are left out of the argmin and added back by :func:`finish`. NaN scores
    become +inf, so a NaN never wins and a row with no finite score gets index 0.
    """
    xc = x32 @ c32.T
    if metric == "l2":
        s = cterm - 2.0 * xc
    elif metric == "cosine":
        s = -xc * cterm
    else:
        s = xc.neg_()
    return s.masked_fill_(s.isnan(), float("inf"))  # NaN never wins (as in the kernel)


def finish(best: torch.Tensor, x32: torch.Tensor, metric: str) -> torch.Tensor:
    """Turn the best score of each row into its distance (float32)."""
    if metric == "dot":
        return best
    xx = (x32 * x32).sum(-1)
    if metric == "l2":
        return (xx + best).clamp_min(0.0)
    return (1.0 + best * _inv_norm(xx)).clamp(0.0, 2.0)


def argmin_first(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``(min, argmin)``; exact ties go to the smallest index (torch.argmin's rule)."""
    idx = s.argmin(dim=1)
    return s.gather(1, idx[:, None]).squeeze(1), idx


def nearest_code_ref(
    x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", *, allow_tf32: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`fastvq.nearest_code`: ``(..., D), (K, D) -> (indices, distances)``.

    Computed in float32 (``allow_tf32`` is accepted for signature parity and ignored: the
    reference is always exact fp32), in row chunks so that the scratch stays bounded; never
    a full ``N x K`` matrix. Exact ties go to the smallest index; NaN scores are skipped.
    """
    if metric not in METRICS:
        raise ValueError(f"fastvq.nearest_code: unknown metric {metric!r}; expected one of {METRICS}")
    lead = x.shape[:-1]
    x2 = x.reshape(lead.numel(), x.shape[-1])  # not reshape(-1, D): ambiguous when D == 0
    N, K = x2.shape[0], codebook.shape[0]
    c32 = codebook.float()
    cterm = code_terms(codebook, metric)
    indices = torch.empty((N,), dtype=torch.int64, device=x.device)
    distances = torch.empty((N,), dtype=torch.float32, device=x.device)
    step = row_chunk(K)
    for s in range(0, N, step):
        xc = x2[s : s + step].float()
        best, idx = argmin_first(scores(xc, c32, cterm, metric))
        indices[s : s + step] = idx
        distances[s : s + step] = finish(best, xc, metric)
    return indices.reshape(lead), distances.reshape(lead)
