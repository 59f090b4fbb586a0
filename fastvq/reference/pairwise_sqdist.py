import torch

from ._chunks import row_chunk

TRUST_SQNORM = 2.0**125  # the expansion is used only where |a|^2 and |b|^2 are below this


def pairwise_sqdist_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`fastvq.pairwise_sqdist`: ``(M, D), (N, D) -> (M, N)`` float32.

    Computed in float32 as ``|a|^2 + |b|^2 - 2 a.b`` clamped at 0 (NaN kept), in row chunks of
    ``a``; where ``|a|^2`` or ``|b|^2`` is not finite or not below 2^125 the distance is computed
    directly, ``sum_d (a_d - b_d)^2`` (NaN for NaN and inf - inf, +inf where it overflows).
    (The kernel recomputes whole 64 x 64 tiles that hold such a row, so its other elements
    there may differ from this by float32 rounding.)
    """
    a32, b32 = a.float(), b.float()
    bb = (b32 * b32).sum(-1)
    b_bad = ~(bb < TRUST_SQNORM)
    out = torch.empty((a.shape[0], b.shape[0]), dtype=torch.float32, device=a.device)
    step = row_chunk(b.shape[0])
    for s in range(0, a.shape[0], step):
        ac = a32[s : s + step]
        aa = (ac * ac).sum(-1, keepdim=True)
        d = aa + bb - 2.0 * (ac @ b32.T)
        d = torch.where(d.isnan(), d, d.clamp_min(0.0))
        a_bad = ~(aa[:, 0] < TRUST_SQNORM)
        # Eagerly the reference reads two flags on the host; traced by torch.compile (only the
        # benchmark's "compiled" provider does that) it keeps the expansion everywhere.
        if not torch.compiler.is_compiling() and (bool(a_bad.any()) or bool(b_bad.any())):
            rows, cols = a_bad.nonzero().squeeze(1), b_bad.nonzero().squeeze(1)
            if rows.numel():
                d[rows] = ((ac[rows, None, :] - b32[None, :, :]) ** 2).sum(-1)
            if cols.numel():
                d[:, cols] = ((ac[:, None, :] - b32[None, cols, :]) ** 2).sum(-1)
        out[s : s + step] = d
    return out
