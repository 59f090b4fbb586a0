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

Every helper takes ``group``: the process group to sync over, ``None`` for the default
(``WORLD``), as ``torch.distributed`` does. The modules pass their ``process_group`` (a
``DistributedDataParallel(..., process_group=g)`` replica group, or a one-rank group to train
each rank's codebook alone), so ranks outside the group are never waited on.

When ``torch.distributed`` is unavailable, not initialised, or the group has one rank, the
helpers return at once without touching their arguments.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed(group=None) -> bool:
    """True inside an initialised process group whose ``group`` (default: ``WORLD``) has more
    than one rank."""
    return dist.is_available() and dist.is_initialized() and get_world_size(group) > 1


def get_rank(group=None) -> int:
    """This process's rank in ``group`` (0 outside a process group)."""
    return _ask(dist.get_rank, group, 0)


def get_world_size(group=None) -> int:
    """The number of ranks in ``group`` (1 outside a process group)."""
    return _ask(dist.get_world_size, group, 1)


def _ask(query, group, outside: int) -> int:
    """``query(group)``, or ``outside`` without an initialised process group; a process outside
    ``group`` (torch answers -1) is a ``ValueError``."""
    if not (dist.is_available() and dist.is_initialized()):
        return outside
    answer = query(group)
    if answer < 0:
        _not_a_member()
    return answer


def _not_a_member():
    raise ValueError(f"fastvq.distributed: this process (global rank {dist.get_rank()}) is not a member of the "
                     f"process group it was asked to sync over")


class GroupHandle:
    """A module's process group (``None``: the default group): ``copy.deepcopy`` of the module
    shares it (a group is a handle of this process), pickling refuses it, naming the fix.
    ``owner``: the name errors start with (``fastvq.<owner>: ...``), the module's class name."""

    __slots__ = ("group",)

    def __init__(self, group, owner: str = "distributed"):
        if dist.is_available() and isinstance(group, int) and group == dist.GroupMember.NON_GROUP_MEMBER:
            raise ValueError(f"fastvq.{owner}: process_group is torch.distributed's NON_GROUP_MEMBER: "
                             f"dist.new_group returns it on ranks outside the group; give each rank a group it "
                             f"belongs to")
        if group is not None and not (dist.is_available() and isinstance(group, dist.ProcessGroup)):
            raise TypeError(f"fastvq.{owner}: process_group must be a torch.distributed ProcessGroup (e.g. from "
                            f"dist.new_group) or None (the default group), got {type(group).__name__}")
        self.group = group

    def __deepcopy__(self, memo):
        return self

    def __reduce__(self):
        if self.group is None:
            return (GroupHandle, (None,))
        raise TypeError("fastvq: a quantizer whose process_group is set cannot be pickled (a process group belongs "
                        "to one process): save its state_dict, or set module.process_group = None before "
                        "torch.save(module) and set it again after loading")


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


def all_reduce_sum_(*tensors: torch.Tensor, group=None) -> None:
    """Sum each tensor over the ranks of ``group``, in place. No-op outside a multi-rank group.

    ``tensors``: any shapes and dtypes (the same shape and dtype at each position on every rank,
    on the group's device: CPU for gloo, CUDA for nccl); packed into one buffer per dtype, so a
    call is one collective per dtype.

    Example::

        counts, sums = fastvq.code_statistics(x, idx, K)
        fastvq.distributed.all_reduce_sum_(counts, sums)   # now the global statistics
    """
    if not tensors or not is_distributed(group):
        return
    _flat_apply(tensors, lambda t: dist.all_reduce(t, op=dist.ReduceOp.SUM, group=group))


def all_gather(t: torch.Tensor, group=None) -> torch.Tensor:
    """Every rank's ``t`` (the same shape and dtype on every rank of ``group``), stacked in the
    group's rank order: ``(world_size, *t.shape)``. Outside a multi-rank group, ``t.unsqueeze(0)``.

    Example::

        offers = fastvq.distributed.all_gather(candidates)   # (W, C, D) on every rank
    """
    if not is_distributed(group):
        return t.unsqueeze(0)
    parts = [torch.empty_like(t) for _ in range(get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.stack(parts)


def broadcast_(*tensors: torch.Tensor, src: int = 0, group=None) -> None:
    """Overwrite each tensor, in place, with the copy of ``group``'s rank ``src`` (a rank of the
    group, not a global rank). No-op outside a multi-rank group. ``tensors``: any shapes and
    dtypes, the same on every rank, packed as :func:`all_reduce_sum_` packs them."""
    if not tensors or not is_distributed(group):
        return
    root = src if group is None else dist.get_global_rank(group, src)
    _flat_apply(tensors, lambda t: dist.broadcast(t, src=root, group=group))


__all__ = ["is_distributed", "get_rank", "get_world_size", "all_reduce_sum_", "all_gather", "broadcast_",
           "GroupHandle"]
