"""mine_negatives: the hardest / semi-hard negative of every anchor, fused, not differentiable."""

from __future__ import annotations

import torch

from .._backend import use_triton
from ._custom_op import custom_op
from .._checks import check_choice, check_float, check_last_dim, check_same_device, check_tensor
from ..reference.mine_negatives import mine_negatives_ref
from .._names import STRATEGIES


@custom_op("fastvq::mine_negatives", mutates_args=())
def _mine_negatives_op(
    anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, strategy: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton("mine_negatives", anchor, positive, negatives):
        from ..kernels.nearest_code import mine_negatives_fwd

        return mine_negatives_fwd(anchor, positive, negatives, strategy)
    return mine_negatives_ref(anchor, positive, negatives, strategy)


@_mine_negatives_op.register_fake
def _(anchor, positive, negatives, strategy):
    n = anchor.shape[0]
    return anchor.new_empty((n,), dtype=torch.int64), anchor.new_empty((n,), dtype=torch.float32)


def mine_negatives(
    anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor, strategy: str = "hardest"
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each anchor, the index of its hardest (or semi-hard) negative, without ever
    building the ``N x M`` anchor-negative distance matrix.

    Args:
        anchor: ``(N, D)`` float32/float16/bfloat16, any strides; ``N = 0`` gives empty
            outputs. float64, integer and other dtypes raise ``TypeError`` (cast first).
        positive: ``(N, D)``, the positive of each anchor.
        negatives: ``(M, D)``, ``M >= 1``, the shared pool of negatives. Same device for all
            three; different float dtypes are promoted.
        strategy: ``"hardest"``: the nearest negative (squared L2). ``"semi-hard"``: the
            nearest negative strictly farther than the anchor's positive
            (``|a - n|^2 > |a - p|^2``), falling back to the hardest negative for anchors
            where no negative is farther. A negative within twice the round-to-nearest rounding
            bound of that float32 comparison, ``(D + 8) 2^-23 (|a|^2 + |a - p|^2)``, ties with
            the positive and is not farther, so a copy of the positive (or an equally far
            negative) is not returned as "farther"; a negative farther by more than that is
            never passed over. A negative whose distance overflows float32 is farther than any
            positive at a finite distance.

    Returns:
        ``(indices, distances)``: int64 ``(N,)`` in ``[0, M)`` and float32 ``(N,)``
        squared distances ``|a - n|^2`` to the chosen negative, computed directly. Exact ties
        go to the smallest index. Not differentiable (the outputs never require grad); gather
        ``negatives[indices]`` and compute the triplet loss on it to train.

    Non-finite values follow :func:`fastvq.nearest_code` (l2): an anchor with a NaN gets index
    0 and distance NaN, an anchor with an infinite entry the first finite negative (+inf), a
    negative with a NaN or infinite entry is never chosen for a finite anchor while a finite
    one exists, overflow is +inf. A positive with a NaN makes no negative "farther", so
    "semi-hard" falls back to the hardest negative for that anchor.

    Example::

        >>> a, p, n = torch.randn(32, 16), torch.randn(32, 16), torch.randn(100, 16)
        >>> idx, d = fastvq.mine_negatives(a, p, n, strategy="semi-hard")
        >>> loss = torch.relu((a - p).pow(2).sum(-1) - (a - n[idx]).pow(2).sum(-1) + 0.2).mean()
    """
    op = "mine_negatives"
    check_tensor(op, "anchor", anchor, ndim=2)
    check_tensor(op, "positive", positive, ndim=2)
    check_tensor(op, "negatives", negatives, ndim=2)
    check_float(op, "anchor", anchor)
    check_float(op, "positive", positive)
    check_float(op, "negatives", negatives)
    check_same_device(op, anchor=anchor, positive=positive, negatives=negatives)
    if positive.shape != anchor.shape:
        raise ValueError(
            f"fastvq.{op}: positive must have the shape of anchor, got {tuple(positive.shape)} and {tuple(anchor.shape)}"
        )
    check_last_dim(op, "anchor", anchor, "negatives", negatives)
    if negatives.shape[0] == 0:
        raise ValueError(f"fastvq.{op}: negatives is empty (M = 0), shape {tuple(negatives.shape)}")
    check_choice(op, "strategy", strategy, STRATEGIES)
    anchor, positive, negatives = anchor.detach(), positive.detach(), negatives.detach()
    dtype = torch.promote_types(torch.promote_types(anchor.dtype, positive.dtype), negatives.dtype)
    anchor, positive, negatives = anchor.to(dtype), positive.to(dtype), negatives.to(dtype)
    return _mine_negatives_op(anchor, positive, negatives, strategy)
