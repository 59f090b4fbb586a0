"""Collective helpers for the quantizer modules; every one is a no-op in a single process.

The EMA codebooks must stay identical on every rank of a data-parallel job: DDP averages
gradients but knows nothing of buffers updated in ``forward``. The modules therefore

- sum their per-batch statistics (code counts and sums) over ranks before the EMA update
  (:func:`all_reduce_sum_`), so each rank applies the update a single process would apply to
  the concatenation of all ranks' batches;
- exchange candidate rows for anything random (dead-code revival, k-means starting points) in
  a fixed-size :func:`all_gather`: each rank offers the same number of rows, with a validity
  flag, and every rank then makes the same choice from the same gathered rows. No rank ever
  waits on a size another rank must first read on the host, so ranks whose batches differ in
  size, are empty, or hold only non-finite rows still run the same collectives, in the same
  order, and cannot hang.

When ``torch.distributed`` is unavailable, not initialised, or the world has one rank, the
helpers return at once without touching their arguments.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    """The number of ranks (1 outside a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _flat_apply(tensors: tuple[torch.Tensor, ...], collective) -> None:
    """Run ``collective`` once on all ``tensors`` packed into one buffer per dtype,
    then unpack in place (one launch instead of one per tensor)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for group in by_dtype.values():
        if len(group) == 1 and group[0].is_contiguous():
            collective(group[0])
            continue
        flat = torch.cat([t.reshape(-1) for t in group])
        collective(flat)
        offset = 0
        for t in group:
            n = t.numel()
            t.copy_(flat[offset : offset + n].view_as(t))
            offset += n


def all_reduce_sum_(*tensors: torch.Tensor) -> None:
    """Sum each tensor over all ranks, in place. No-op outside a multi-rank process group.

    Example::

        counts, sums = fastvq.code_statistics(x, idx, K)
        fastvq.distributed.all_reduce_sum_(counts, sums)   # now the global statistics
    """
    if not tensors or not is_distributed():
        return
    _flat_apply(tensors, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM))


def all_gather(t: torch.Tensor) -> torch.Tensor:
    """Every rank's ``t`` (the same shape and dtype on every rank), stacked: ``(world_size, *t.shape)``.
    Outside a multi-rank process group, ``t.unsqueeze(0)``.

    Example::

        offers = fastvq.distributed.all_gather(candidates)   # (W, C, D) on every rank
    """
    if not is_distributed():
        return t.unsqueeze(0)
    parts = [torch.empty_like(t) for _ in range(get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.stack(parts)


def broadcast_(*tensors: torch.Tensor, src: int = 0) -> None:
    """Overwrite each tensor, in place, with rank ``src``'s copy. No-op outside a multi-rank
    process group."""
    if not tensors or not is_distributed():
        return
    _flat_apply(tensors, lambda t: dist.broadcast(t, src=src))


__all__ = ["is_distributed", "get_rank", "get_world_size", "all_reduce_sum_", "all_gather", "broadcast_"]
