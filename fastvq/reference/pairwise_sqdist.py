import torch

from ._chunks import row_chunk


def pairwise_sqdist_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`fastvq.pairwise_sqdist`: ``(M, D), (N, D) -> (M, N)`` float32.

    Computed in float32 as ``|a|^2 + |b|^2 - 2 a.b`` clamped at 0, in row chunks of ``a``.
    """
    a32, b32 = a.float(), b.float()
    bb = (b32 * b32).sum(-1)
    out = torch.empty((a.shape[0], b.shape[0]), dtype=torch.float32, device=a.device)
    step = row_chunk(b.shape[0])
    for s in range(0, a.shape[0], step):
        ac = a32[s : s + step]
        d = (ac * ac).sum(-1, keepdim=True) + bb - 2.0 * (ac @ b32.T)
        out[s : s + step] = d.clamp_min_(0.0)
    return out
