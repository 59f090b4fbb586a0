"""Pure-torch reference for :func:`fastvq.mine_negatives`: the test oracle and the CPU path."""

from __future__ import annotations

import torch

from .._names import STRATEGIES
from ._chunks import row_chunk
from .nearest_code import (BAND_UNITS, argmin_first, choose, distance, exp2i, prepare_codebook, row_band, row_unit,
                           scale_rows)


# "Strictly farther than the positive" leaves out the negatives within twice the round-to-nearest
# rounding bound of the comparison: score |n|^2 - 2 a.n above |a - p|^2 - |a|^2
# + (D + 8) 2^-23 (|a|^2 + |a - p|^2). It covers the float32 rounding of both sides (dots of
# length D) and of the two directly computed distances as they err in practice, so a copy of the
# positive, or an equal distance, is not "farther"; it stays below the contract's bound on the
# comparison, so a negative farther than the positive by more than that is never left out
# (the former (D + 4) 2^-19, 8x that bound, left such negatives out). A score that overflows
# float32 (|n|^2 past it in the row's unit) is farther than any finite threshold and competes
# at float32's max. The kernel (kernels/nearest_code.py) uses the same rule.
SEMI_HARD_MARGIN = 2.0**-23


def mine_negatives_ref(
    anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, strategy: str = "hardest"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`fastvq.mine_negatives`: ``(N, D), (N, D), (M, D) -> (N,) int64, (N,) float32``.

    The nearest-code search (l2) and, for "semi-hard", the same search over the negatives whose
    score ``|n|^2 - 2 a.n`` exceeds ``|a - p|^2 - |a|^2`` by more than the rounding bound
    (:data:`SEMI_HARD_MARGIN`: strictly farther than the positive; all in float32, in the
    search's scale), the hardest where none does. Exact ties go to the
    smallest index; the distance is computed directly, as in the kernel. Works in row chunks.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"fastvq.mine_negatives: unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    N, M = anchor.shape[0], negatives.shape[0]
    codes, ta, tb, first, _, c_min = prepare_codebook(negatives.unsqueeze(0), "l2")
    codes, ta, tb, first, c_min = codes[0], ta[0], tb[0], first[0], c_min[0]
    indices = torch.empty((N,), dtype=torch.int64, device=anchor.device)
    distances = torch.empty((N,), dtype=torch.float32, device=anchor.device)
    step = row_chunk(M)
    for i in range(0, N, step):
        a = anchor[i : i + step]
        xr, band = scale_rows(a, "l2", c_min)
        xc = xr @ codes.T
        sc = ta[band] + tb[band] * xc
        _, idx = argmin_first(sc)
        if strategy == "semi-hard":
            # in the unit band of max(max|a|, max|p|, c_min) (>= the row's; the kernel makes a pass
            # in it): in the row's own unit |a - p|^2 could overflow and no negative qualify. The
            # products there are the row unit's times 2^(L_row - L_c), 0 below 2^-126 (as the kernel).
            pos = positive[i : i + step]
            band_c = row_band(torch.cat([a.float(), pos.float()], -1), c_min)
            if a.dtype == torch.float16:  # rows never scaled
                band_c = band
            units = torch.tensor(BAND_UNITS, dtype=torch.int32, device=a.device)
            e_f = units[band] - units[band_c]
            f = torch.where(e_f < -126, torch.zeros_like(e_f, dtype=torch.float32), exp2i(e_f))
            sc = ta[band_c] + tb[band_c] * (xc * f[:, None])
            r = 1.0 / row_unit(band_c)[:, None]
            a_s, p_s = a.float() * r, pos.float() * r
            lb, aa = ((a_s - p_s) ** 2).sum(-1), (a_s * a_s).sum(-1)
            thr = (lb - aa) + (lb + aa) * (SEMI_HARD_MARGIN * (anchor.shape[1] + 8))
            far = sc.clamp_max(torch.finfo(torch.float32).max)  # an overflowed score is farther than any finite one
            _, idx_c = argmin_first(torch.where(sc > thr[:, None], far, torch.full_like(sc, float("inf"))))
            idx = torch.where(idx_c >= 0, idx_c, idx)
        idx = choose(a, idx, first.expand_as(idx), M)
        indices[i : i + step] = idx
        distances[i : i + step] = distance(a, negatives[idx], "l2")
    return indices, distances
