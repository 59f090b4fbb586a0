import contextlib

import torch

from ._chunks import row_chunk


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
def code_statistics_ref(
    x: torch.Tensor, indices: torch.Tensor, num_codes: int, *, deterministic: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`fastvq.code_statistics`: per-code row counts and row sums.

    ``x (N, D), indices (N,) -> counts (K,), sums (K, D)``, or batched over levels
    ``x (L, N, D), indices (L, N) -> counts (L, K), sums (L, K, D)``; both float32,
    ``K = num_codes``. Indices must lie in ``[0, num_codes)`` (not checked here). Uses
    ``bincount`` and ``index_add_`` in float32, never a one-hot matrix, converting ``x`` to
    float32 rows a chunk at a time (``row_chunk``). ``deterministic`` matters on CUDA only (CPU
    ``index_add_`` is sequential): it runs ``index_add_`` under PyTorch's deterministic mode.
    """
    batched = indices.dim() == 2
    D = x.shape[-1]
    L = indices.shape[0] if batched else 1
    K = int(num_codes)
    n = indices.shape[-1]
    idx = indices.reshape(L, n).long()
    xs = x.reshape(L, n, D)
    # one flat segment id per (level, code): level l's codes are l*K .. l*K+K-1
    flat = idx + (torch.arange(L, device=idx.device) * K)[:, None]
    counts = torch.bincount(flat.reshape(-1), minlength=L * K).float()
    sums = torch.zeros((L * K, D), dtype=torch.float32, device=x.device)
    with _deterministic_algorithms(deterministic and x.is_cuda):
        for lvl in range(L):
            step = row_chunk(D)
            for s in range(0, n, step):
                sums.index_add_(0, flat[lvl, s : s + step], xs[lvl, s : s + step].float())
    if batched:
        return counts.reshape(L, K), sums.reshape(L, K, D)
    return counts.reshape(K), sums.reshape(K, D)
