import contextlib

import torch

from ._chunks import row_chunk
from ._exact_sum import pair_index_sum, round_pair


@contextlib.contextmanager
def _deterministic_algorithms(on: bool):
    # On CUDA, index_add_ is atomic (not bitwise reproducible) unless PyTorch's deterministic
    # mode is on, in which case it accumulates in a sorted, fixed order.
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if on and not before:
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        if on and not before:
            torch.use_deterministic_algorithms(False, warn_only=warn_only)


@torch.no_grad()
def code_statistics_full_ref(
    x: torch.Tensor,
    indices: torch.Tensor,
    num_codes: int,
    weights: torch.Tensor | None = None,
    *,
    deterministic: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The reference's whole result: ``counts``, ``sums`` and ``bad (L, 2)`` int32, per level the
    rows left out as not finite and the rows whose index is out of range.

    Shapes as :func:`code_statistics_ref`; for the batched form ``weights`` may be ``(N,)``
    (the same weight at every level) or ``(L, N)``. Never reads a value on the host.
    """
    batched = indices.dim() == 2
    D = x.shape[-1]
    L = indices.shape[0] if batched else 1
    K = int(num_codes)
    n = indices.shape[-1]
    dev = x.device
    idx = indices.reshape(L, n)
    xs = x.reshape(L, n, D)
    m_in = (idx >= 0) & (idx < K)
    if weights is None:
        w = torch.ones((1, n), dtype=torch.float64, device=dev)
    else:
        w = weights.reshape(weights.shape[0] if weights.dim() == 2 else 1, n).to(torch.float64)  # (1, n) or (L, n); 0/1 masks
    live = w != 0
    w_ok = torch.isfinite(w)
    # one flat segment id per (level, code): level l's codes are l*K .. l*K+K-1; S = L*K is where
    # every row that is left out goes (sliced off at the end)
    S = L * K
    flat = torch.where(m_in, idx.long(), 0) + (torch.arange(L, device=dev) * K)[:, None]
    bad = torch.zeros((L, 2), dtype=torch.int32, device=dev)
    bad[:, 1] = (live & ~m_in).sum(1, dtype=torch.int32)
    step = row_chunk(D + 1)

    passes = []

    def chunks():
        """Per level and chunk of rows: ``(segment (n,), terms (n, D + 1))``, the weighted rows
        and their weights (exact in float64), 0 in the rows left out; the first of the two
        passes counts the rows left out as not finite."""
        count_bad = not passes
        passes.append(1)
        for lvl in range(L):
            wl = w[lvl if w.shape[0] > 1 else 0]
            for s in range(0, n, step):
                xc = xs[lvl, s : s + step].double()
                wc = wl[s : s + step]
                candidate = m_in[lvl, s : s + step] & live[lvl if live.shape[0] > 1 else 0, s : s + step]
                ok = torch.isfinite(xc).all(-1) & w_ok[lvl if w_ok.shape[0] > 1 else 0, s : s + step]
                if count_bad:
                    bad[lvl, 0] += (candidate & ~ok).sum(dtype=torch.int32)
                use = candidate & ok
                wc = torch.where(use, wc, 0.0)
                t = torch.cat([torch.where(use[:, None], xc * wc[:, None], 0.0), wc[:, None]], 1)
                yield torch.where(use, flat[lvl, s : s + step], S), t

    # each segment's sums and count as an exact pair, rounded once (a float64 sum of terms max,
    # 2^103, -2^60 is the float32 overflow midpoint and rounded to +inf; the exact sum gives max)
    hi, lo = pair_index_sum((S + 1, D + 1), chunks, dev,
                            summing=lambda: _deterministic_algorithms(deterministic and x.is_cuda))
    out = round_pair(hi[:S], lo[:S], torch.float32)
    counts, sums = out[:, D].clone(), out[:, :D].clone()  # (separate storage: the op returns both)
    if batched:
        return counts.reshape(L, K), sums.reshape(L, K, D), bad
    return counts.reshape(K), sums.reshape(K, D), bad


@torch.no_grad()
def code_statistics_ref(
    x: torch.Tensor,
    indices: torch.Tensor,
    num_codes: int,
    *,
    weights: torch.Tensor | None = None,
    deterministic: bool = True,
    return_skipped: bool = False,
):
    """Reference for :func:`fastvq.code_statistics`: per-code (weighted) row counts and row sums.

    ``x (N, D), indices (N,) -> counts (K,), sums (K, D)``, or batched over levels
    ``x (L, N, D), indices (L, N) -> counts (L, K), sums (L, K, D)``; both float32,
    ``K = num_codes``; ``weights`` ``(N,)`` (or ``(L, N)``) float or bool, row ``i`` counting
    ``weights[i]`` times. A row of weight 0 is ignored; a row whose weight or any element is not
    finite is left out (and counted: ``skipped``, int64 ``()`` or ``(L,)``, returned as a third
    value with ``return_skipped=True``); a row whose index is outside ``[0, num_codes)`` is left
    out too (not checked here: the op raises). Accumulates in float64 with ``index_add_`` a
    chunk of rows at a time (``row_chunk``), never a one-hot matrix, and rounds once to float32.
    ``deterministic`` matters on CUDA only (CPU ``index_add_`` is sequential): it runs
    ``index_add_`` under PyTorch's deterministic mode.
    """
    counts, sums, bad = code_statistics_full_ref(x, indices, num_codes, weights, deterministic=deterministic)
    if not return_skipped:
        return counts, sums
    skipped = bad[:, 0].long()
    return counts, sums, (skipped if indices.dim() == 2 else skipped[0])
