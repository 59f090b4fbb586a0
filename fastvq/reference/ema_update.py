"""Pure-torch reference of :func:`fastvq.ops.ema_update.ema_update_` (the EMA codebook update)."""

from __future__ import annotations

import torch


@torch.no_grad()
def ema_update_ref_(codebook, cluster_size, embed_avg, counts, sums, decay: float, eps: float) -> None:
    """In place; see :func:`fastvq.ops.ema_update.ema_update_` for the arithmetic and its guards."""
    live, keep, new_cs, smoothed = ema_decisions(cluster_size, counts, sums, decay, eps)
    cluster_size.copy_(new_cs)
    ema_update_rows_ref_(codebook, embed_avg, sums, keep, live, smoothed, decay)


@torch.no_grad()
def ema_update_rows_ref_(codebook, embed_avg, sums, keep, live, smoothed, decay: float) -> None:
    """The ``(L, K, D)`` part of the update, in place, given the decisions of :func:`ema_decisions`."""
    new_ea = embed_avg.mul(decay).add_(sums.to(embed_avg.dtype), alpha=1 - decay)
    embed_avg.copy_(torch.where(keep.unsqueeze(-1), new_ea, embed_avg))
    new_code = (embed_avg / smoothed.unsqueeze(-1)).to(codebook.dtype)
    ok = live.view(-1, 1) & torch.isfinite(new_code).all(-1)
    codebook.copy_(torch.where(ok.unsqueeze(-1), new_code, codebook))


def ema_decisions(cluster_size, counts, sums, decay: float, eps: float):
    """The per-code decisions of an EMA update, on ``(L, K)`` tensors (and one read of ``sums``):
    ``live (L,)`` (the level's batch had rows), ``keep (L, K)`` (this code takes the batch:
    live, and its new count and sums are finite), the new ``cluster_size (L, K)`` and the
    Laplace-smoothed counts ``smoothed (L, K)``."""
    K = cluster_size.shape[-1]
    live = counts.sum(-1) > 0
    new_cs = cluster_size.mul(decay).add_(counts.to(cluster_size.dtype), alpha=1 - decay)
    # a convex combination of the (finite) old sums and this batch's is finite iff the batch's
    # row is: one max-abs read of `sums` decides it (NaN propagates through the max)
    if sums.shape[-1] == 0:  # (codes of no features: nothing to be non-finite; the inf norm of nothing raises)
        sums_ok = torch.ones(sums.shape[:-1], dtype=torch.bool, device=sums.device)
    else:
        sums_ok = torch.linalg.vector_norm(sums, ord=float("inf"), dim=-1) < float("inf")
    keep = live.unsqueeze(-1) & torch.isfinite(new_cs) & sums_ok
    new_cs = torch.where(keep, new_cs, cluster_size)
    n = new_cs.sum(-1, keepdim=True)
    total = n + K * eps
    quotient = (new_cs + eps) / total
    smoothed = quotient * n  # the seed's float32 arithmetic, bit for bit
    # where it fails, (cs + eps) * (n / (n + K eps)) with the sums and the ratio (at most 1) in
    # float64 and the product rounded once. It fails where a level's total is beyond float32
    # (codes counting 2e38 each: every code kept its old value), or a code ~2^126 below the
    # total has a subnormal quotient (1e-4 off; fuzzP). Each part in float64 because each
    # failed in float32: the ratio (subnormal where K eps overflows: 4.5e-3 off at eps = 1e38,
    # K = 1024; review14) and cs + eps (+inf for a count near float32's largest beside
    # eps >= ~1e31: the code became its sums / inf = 0; mutG B-1)
    n64 = new_cs.sum(-1, keepdim=True, dtype=torch.float64)
    careful = ((new_cs.double() + eps) * (n64 / (n64 + K * eps))).float()
    fails = ~total.isfinite() | (quotient < torch.finfo(torch.float32).tiny)  # (quotient >= 0)
    smoothed = torch.where(fails, careful, smoothed)
    return live, keep, new_cs, smoothed
