"""Pure-torch reference for :func:`fastvq.mine_negatives`: the test oracle and the CPU path."""

from __future__ import annotations

import torch

from ._chunks import row_chunk
from .nearest_code import argmin_first, code_terms, scores

STRATEGIES = ("hardest", "semi-hard")


def mine_negatives_ref(
    anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, strategy: str = "hardest"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`fastvq.mine_negatives`: ``(N, D), (N, D), (M, D) -> (N,) int64, (N,) float32``.

    ``d = |a|^2 + (|n|^2 - 2 a.n)`` in float32 (the kernel's formula). "hardest": the argmin
    of ``d``. "semi-hard": the argmin of ``d`` over the negatives with ``d > |a - p|^2``
    (strictly; ``|a - p|^2`` summed directly in float32), the hardest where there is none.
    Exact ties go to the smallest index. Works in row chunks of the anchors.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"fastvq.mine_negatives: unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    N, M = anchor.shape[0], negatives.shape[0]
    n32 = negatives.float()
    cterm = code_terms(negatives, "l2")
    indices = torch.empty((N,), dtype=torch.int64, device=anchor.device)
    distances = torch.empty((N,), dtype=torch.float32, device=anchor.device)
    step = row_chunk(M)
    for s in range(0, N, step):
        a32 = anchor[s : s + step].float()
        sc = scores(a32, n32, cterm, "l2")
        aa = (a32 * a32).sum(-1)
        best, idx = argmin_first(sc)
        if strategy == "semi-hard":
            bound = ((a32 - positive[s : s + step].float()) ** 2).sum(-1)
            farther = (aa[:, None] + sc) > bound[:, None]
            best_c, idx_c = argmin_first(torch.where(farther, sc, torch.full_like(sc, float("inf"))))
            found = best_c < float("inf")  # some finite score qualified (NaN scores are +inf)
            best = torch.where(found, best_c, best)
            idx = torch.where(found, idx_c, idx)
        indices[s : s + step] = idx
        distances[s : s + step] = (aa + best).clamp_min(0.0)
    return indices, distances
