import torch

from ._chunks import row_chunk


@torch.no_grad()
def residual_quantize_ref(x: torch.Tensor, codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`fastvq.residual_quantize`: ``(..., D), (L, K, D) -> (quantized, codes)``.

    Greedy residual quantization, values only (no straight-through gradient: the public op adds
    it). The residual starts as ``x`` in float32; level ``l`` picks ``argmin_k |c_lk|^2 - 2 r.c_lk``
    (the smallest index on exact ties, as ``torch.argmin``) and subtracts the chosen code in
    float32. ``quantized`` is the float32 sum of the chosen codes in level order, cast to the
    dtype of ``x``; ``codes`` is int64 ``(..., L)``. Works in row chunks, so its extra memory is
    a ``(chunk, K)`` float32 scratch plus the float32 residual of the chunk.
    """
    L, K, D = codebooks.shape
    lead = x.shape[:-1]
    xf = x.reshape(-1, D)
    n = xf.shape[0]
    cb = codebooks.float()
    cc = (cb * cb).sum(-1)  # (L, K)
    quantized = torch.empty((n, D), dtype=x.dtype, device=x.device)
    codes = torch.empty((n, L), dtype=torch.int64, device=x.device)
    step = row_chunk(max(K, D))
    for s in range(0, n, step):
        r = xf[s : s + step].float()
        q = torch.zeros_like(r)
        for lvl in range(L):
            idx = (cc[lvl] - 2.0 * (r @ cb[lvl].T)).argmin(-1)
            c = cb[lvl].index_select(0, idx)
            r = r - c
            q = q + c
            codes[s : s + step, lvl] = idx
        quantized[s : s + step] = q.to(x.dtype)
    return quantized.reshape(*lead, D), codes.reshape(*lead, L)
