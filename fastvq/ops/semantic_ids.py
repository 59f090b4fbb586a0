"""semantic_ids: append a collision level to residual codes so every item gets a unique id
(TIGER-style semantic ids for generative recommenders), and collision statistics."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._backend import use_triton
from ._custom_op import custom_op
from .._checks import check_bool_arg, check_tensor
from ..reference.semantic_ids import semantic_ids_ref

__all__ = ["SemanticIdStats", "semantic_id_stats", "semantic_ids"]

INT_DTYPES = (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64)


@custom_op("fastvq::semantic_ids", mutates_args=())
def _semantic_ids_op(codes: torch.Tensor) -> torch.Tensor:
    if use_triton("semantic_ids", codes):
        from ..kernels.semantic_ids import semantic_ids_fwd

        return semantic_ids_fwd(codes)
    return semantic_ids_ref(codes)


@_semantic_ids_op.register_fake
def _(codes):
    return codes.new_empty((codes.shape[0], codes.shape[1] + 1), dtype=torch.int64)


def _check(op: str, codes) -> None:
    check_tensor(op, "codes", codes, ndim=2)
    if codes.dtype not in INT_DTYPES:
        raise TypeError(f"fastvq.{op}: codes must be an integer tensor (int8/uint8/int16/int32/int64), got {codes.dtype}")


def semantic_ids(codes: torch.Tensor) -> torch.Tensor:
    """Make item ids unique by appending a collision level to their codes.

    Args:
        codes: ``(N, L)`` integer tensor, one row of residual codes per item (any values,
            any strides; ``L = 0`` is allowed and gives every row one shared group).

    Returns:
        ``(N, L + 1)`` int64: ``out[:, :L] = codes`` and ``out[i, L]`` is the number of earlier
        rows ``j < i`` (input order) with ``codes[j] == codes[i]``: 0 for the first item with
        given codes, 1 for the second, ... So the rows of ``out`` are all distinct. Not
        differentiable. Sort-based, O(N log N) time and O(N) memory, never pairwise: rows are
        grouped (``torch.unique``), stably sorted by group, and a kernel ranks each row within
        its group's run and scatters the rank back to input order. ``torch.unique`` gives a
        data-dependent size, so a call reads the device once (one host sync on CUDA): call it
        when exporting IDs, not inside a training step.

    Example::

        >>> fastvq.semantic_ids(torch.tensor([[1, 2], [0, 2], [1, 2], [1, 2]]))
        tensor([[1, 2, 0],
                [0, 2, 0],
                [1, 2, 1],
                [1, 2, 2]])
    """
    _check("semantic_ids", codes)
    return _semantic_ids_op(codes)


@dataclass(frozen=True)
class SemanticIdStats:
    """Collisions among items' codes (python numbers).

    Attributes:
        num_items: ``N``.
        num_unique: number of distinct code rows.
        collision_rate: fraction of items whose codes equal an earlier item's,
            ``(N - num_unique) / N`` (0.0 for ``N = 0``).
        max_group_size: most items sharing one code row (0 for ``N = 0``).
        max_collisions: the largest collision level, ``max_group_size - 1`` (0 for ``N = 0``):
            the extra level of :func:`semantic_ids` takes values ``0 .. max_collisions``, so it
            needs ``max_collisions + 1`` codes.
        has_collision_level: True when the input's last column was taken as the collision
            level of :func:`semantic_ids` and left out, so the statistics are those of the codes
            before it.
    """

    num_items: int
    num_unique: int
    collision_rate: float
    max_group_size: int
    max_collisions: int
    has_collision_level: bool = False


def semantic_id_stats(codes: torch.Tensor, *, collision_level: bool | None = None) -> SemanticIdStats:
    """Collision statistics of ``(N, L)`` integer codes (see :class:`SemanticIdStats`).

    The output of :func:`semantic_ids` (and of ``RQVAE.semantic_ids``) ends with a collision
    level that makes every row unique; its statistics are those of the codes before that column.

    Args:
        codes: ``(N, L)`` integer codes, with or without the collision level.
        collision_level: ``True``: the last column is the collision level of :func:`semantic_ids`
            (of the whole table, or of a subset or reordering of its rows, e.g. a split or a
            shuffled loader); checked: ``ValueError`` unless it is ``>= 0`` and makes every row
            distinct. ``False``: every column is a code. ``None`` (default): the last column is
            taken as the collision level when ``L >= 2`` and, within every group of rows whose
            other columns are equal, it holds each of ``0 .. size - 1`` once: true of every
            output of :func:`semantic_ids` in any row order, but not always of a subset (a
            split holding the second of two colliding items only): pass ``True`` there. Raw
            codes meet that test only if their last level numbers the rows of every group
            ``0, 1, 2, ...`` (every item that shares no other column with another item must
            have last code 0); pass ``False`` to rule that out. The result says which reading
            was used (``has_collision_level``).

    Sort-based (:func:`semantic_ids` and ``torch.unique``), a few host syncs.

    Example::

        >>> fastvq.semantic_id_stats(torch.tensor([[1, 2], [0, 2], [1, 2], [1, 2]]))
        SemanticIdStats(num_items=4, num_unique=2, collision_rate=0.5, max_group_size=3, max_collisions=2, has_collision_level=False)
        >>> fastvq.semantic_id_stats(fastvq.semantic_ids(torch.tensor([[1, 2], [0, 2], [1, 2]]))).num_unique
        2
    """
    op = "semantic_id_stats"
    _check(op, codes)
    if collision_level is not None:
        collision_level = check_bool_arg(op, "collision_level", collision_level)
    n, width = codes.shape
    if collision_level and width < 1:
        raise ValueError(f"fastvq.{op}: collision_level=True needs a last column, got shape {tuple(codes.shape)}")
    level = full_level = None
    has_level = False
    if collision_level or (collision_level is None and width >= 2):
        prefix, last = codes[:, :-1], codes[:, -1].long()
        full_level = _semantic_ids_op(codes)[:, -1]  # all 0 iff the rows are distinct
        valid = not bool(full_level.any()) and not bool((last < 0).any())
        if valid and collision_level is None and n > 0:  # and each group of equal prefixes holds 0 .. size - 1
            _, group, sizes = torch.unique(prefix, dim=0, return_inverse=True, return_counts=True)  # (L >= 2 here)
            valid = bool((last < sizes[group]).all())
        if collision_level and not valid:
            raise ValueError(
                f"fastvq.{op}: collision_level=True, but the last column of codes (shape {tuple(codes.shape)}) is "
                "not a collision level of semantic_ids: it must be >= 0 and make every row distinct"
            )
        has_level = valid
        if has_level:
            level = _semantic_ids_op(prefix)[:, -1]
    if n == 0:
        return SemanticIdStats(num_items=0, num_unique=0, collision_rate=0.0, max_group_size=0, max_collisions=0,
                               has_collision_level=has_level)
    if level is None:
        level = full_level if full_level is not None else _semantic_ids_op(codes)[:, -1]
    num_unique, max_level = torch.stack([(level == 0).sum(), level.max()]).tolist()
    return SemanticIdStats(
        num_items=n,
        num_unique=num_unique,
        collision_rate=(n - num_unique) / n,
        max_group_size=max_level + 1,
        max_collisions=max_level,
        has_collision_level=has_level,
    )
