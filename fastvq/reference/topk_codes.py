"""Pure-torch reference for :func:`fastvq.topk_codes`: the test oracle and the CPU path."""

from __future__ import annotations

import torch

from .nearest_code import distance, prepare_codebook, row_chunks, scale_rows, scores, search_setup


def topk_order(s: torch.Tensor, bad_code: torch.Tensor, special_row: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` first codes of each row of scores ``s`` (n, K) in the search's order: score
    ascending (NaN as +inf), then finite codes before codes with a non-finite entry
    (``bad_code`` (K,)), then index. Rows with a non-finite entry (``special_row``) rank every
    code at +inf: the finite codes in index order, then the others."""
    K = s.shape[1]
    key = s.nan_to_num(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    key = torch.where(special_row[:, None], torch.full_like(key, float("inf")), key)
    # stable sorts, least significant key first: index (as is), finite-code class, score
    cls = bad_code.to(torch.int64).expand_as(key)
    order = torch.argsort(cls, dim=1, stable=True)
    order = order.gather(1, torch.argsort(key.gather(1, order), dim=1, stable=True))
    return order[:, :k] if k <= K else order


def ranked_scores(x32: torch.Tensor, codes: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  band: torch.Tensor) -> torch.Tensor:
    """The kernel's top-k values: :func:`scores`, in float64, with l2 scores that overflow the
    row's unit (+inf) recomputed in the next units up (band 2 -> 0 -> 1, ``x'`` times 2^-96 per
    step) and scaled back to the row's unit, so that far codes keep their order."""
    s = scores(x32, codes, a, b, band).double()
    if a.shape[0] != 3:
        return s
    xc = (x32 @ codes.T).double()
    a64, b64 = a.double(), b.double()
    U = 2.0**96
    inf = float("inf")

    def up(v, u, steps):
        w = (a64[u] + (b64[u] / U**steps) * xc) * U ** (2 * steps)
        return torch.where(v == inf, w, v)

    r2, r0 = (band == 2)[:, None], (band == 0)[:, None]
    s = torch.where(r2, up(up(s, 0, 1), 1, 2), s)
    return torch.where(r0, up(s, 1, 1), s)


def topk_codes_ref(
    x: torch.Tensor, codebook: torch.Tensor, k: int, metric: str = "l2", *, allow_tf32: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`fastvq.topk_codes`: ``(..., D), (K, D)`` -> ``(..., k)`` int64 indices
    and float32 distances, nearest first (or ``(H, ..., D), (H, K, D)`` -> ``(H, ..., k)``).

    Same scaling and scores as :func:`fastvq.reference.nearest_code_ref`; the k smallest scores,
    exact ties to the smaller index, codes with a non-finite entry after the finite ones; a row
    with a NaN gets ``0, 1, ..., k-1``. Distances are computed directly at each chosen code,
    and the k are then ordered by them (:func:`order_by_distance`). In row chunks (an
    ``(n, K)`` score block at a time), float32.
    """
    x3, cb, lead, indices, distances = search_setup(x, codebook, metric, k)
    (H, N, D), K = x3.shape, cb.shape[1]
    codes, a, b, _, _, c_min = prepare_codebook(cb, metric)
    bad_code = a[:, 0].isnan()
    for h, s, e in row_chunks(H, N, K):
        rows = x3[h, s:e]
        special = ~torch.isfinite(rows).all(-1)
        xr, band = scale_rows(rows, metric, c_min[h])
        idx = topk_order(ranked_scores(xr, codes[h], a[h], b[h], band), bad_code[h], special, k)
        nan_row = rows.isnan().any(-1)
        idx = torch.where(nan_row[:, None], torch.arange(k, device=x.device).expand_as(idx), idx)
        indices[h, s:e] = idx
        n = rows.shape[0]
        distances[h, s:e] = distance(rows[:, None, :].expand(n, k, D), cb[h][idx], metric)
    indices, distances = order_by_distance(x3, cb, indices, distances)
    return indices.reshape(lead + (k,)), distances.reshape(lead + (k,))


def order_by_distance(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor,
                      distances: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``x (H, N, D)``, ``codebook (H, K, D)``: the ``(H, N, k)`` codes found and their
    distances, ordered by the distances along a finite row. The search ranks by float32 scores,
    which near-ties (codes a hair apart, far from the origin) can order against the directly
    computed distances. The sort is stable (equal distances keep the search's order) and
    leaves the non-finite rules as they were: codes with a non-finite entry stay after the
    finite ones, by index, and a row with a non-finite entry keeps its order. Such a row has no
    finite distance (NaN or +-inf at every code), so the rows sorted are those with a finite
    distance (a finite row whose every distance overflowed is in the search's order already:
    its scores are exact there); only the codebook is read, not ``x`` again."""
    code_ok = torch.isfinite(codebook).all(-1).gather(1, indices.flatten(1)).reshape(indices.shape)
    key = torch.where(code_ok & ~distances.isnan(), distances, float("inf"))
    key = torch.where(distances.isfinite().any(-1, keepdim=True), key, 0.0)
    order = key.sort(dim=-1, stable=True).indices
    return indices.gather(-1, order), distances.gather(-1, order)
