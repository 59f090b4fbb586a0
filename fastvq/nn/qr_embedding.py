"""QREmbedding: quotient-remainder compositional embedding, a drop-in for the seed's module."""

from __future__ import annotations

import math

import torch
from torch import nn

from .._checks import check_bool_arg, check_choice, check_int_arg, check_size_product
from ..ops.qr_lookup import qr_lookup
from .._names import QR_MODES, QR_OPS

__all__ = ["QREmbedding"]

_NARROW_IDS = (torch.int8, torch.int16, torch.uint8, torch.bool)  # the seed's torch.remainder takes them


class QREmbedding(nn.Module):
    """Embeds ``num_embeddings`` ids with two small tables (Shi et al. 2020, "QR trick").

    The positional arguments are the seed's, ``(num_embeddings, embedding_dim, sparse)``; the
    others are keyword-only.

    Args:
        num_embeddings: the id space being compressed.
        embedding_dim: output width. For ``op="concat"`` an int is split into
            ``(embedding_dim // 2, embedding_dim - embedding_dim // 2)`` table widths; a pair
            ``(dq, dr)`` gives them explicitly (output width ``dq + dr``).
        num_collisions: ``None`` (default) is the seed's split: two tables of
            ``int(sqrt(num_embeddings))`` rows each, ids wrapped modulo their product.
            ``c`` gives DLRM's split: ``ceil(num_embeddings / c)`` quotient rows and ``c``
            remainder rows (ids wrapped modulo their product, which is ``>= num_embeddings``).
        op: ``"add"`` | ``"mult"`` | ``"concat"``.
        sparse: gradients of the two tables as ``torch.sparse_coo`` tensors holding each touched
            row once, in sorted order (use ``torch.optim.SparseAdam`` or ``Adagrad``). Autograd's
            hand-over into ``.grad`` drops the coalesced *flag* (see :func:`fastvq.qr_lookup`).
        mode: pooling of the bag form (``forward(ids, offsets)``), ``"sum"`` | ``"mean"``.
        deterministic: sorted-segment (default, bitwise reproducible) or atomic backward.

    Sizes are ints (an integral float such as ``1e6`` is taken as one); a bool, a string or a
    non-integral float (``QREmbedding(100, 4.5)``) raises ``TypeError``/``ValueError`` naming
    the argument, as do an unknown ``op``/``mode`` and a non-bool ``sparse``/``deterministic``.

    Parameters live in ``_emb_q.weight`` and ``_emb_r.weight`` (``nn.Embedding`` modules, so
    the seed's checkpoints load), initialised like ``nn.Embedding`` (standard normal).

    Example::

        >>> emb = fastvq.nn.QREmbedding(10**6, 64)          # two 1000 x 64 tables
        >>> emb(torch.tensor([[1, 2**40]])).shape
        torch.Size([1, 2, 64])
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int | tuple[int, int],
        sparse: bool = False,
        *,
        num_collisions: int | None = None,
        op: str = "add",
        mode: str = "sum",
        deterministic: bool = True,
    ):
        super().__init__()
        name = "QREmbedding"
        num_embeddings = check_int_arg(name, "num_embeddings", num_embeddings, minimum=1)
        check_choice(name, "op", op, QR_OPS)
        check_choice(name, "mode", mode, QR_MODES)
        sparse = check_bool_arg(name, "sparse", sparse)
        deterministic = check_bool_arg(name, "deterministic", deterministic)
        if isinstance(embedding_dim, (tuple, list)):
            if len(embedding_dim) != 2:
                raise ValueError(f"fastvq.{name}: embedding_dim as a sequence is the pair of widths (q, r) for "
                                 f"op='concat', so it needs 2 entries, got {len(embedding_dim)}: {embedding_dim!r}")
            if op != "concat":
                raise ValueError(
                    f"fastvq.{name}: a pair of widths needs op='concat', got embedding_dim={embedding_dim!r} with op={op!r}"
                )
            dq, dr = (check_int_arg(name, "embedding_dim", d, minimum=1) for d in embedding_dim)
        else:
            embedding_dim = check_int_arg(name, "embedding_dim", embedding_dim, minimum=1)
            if op == "concat":
                dq, dr = embedding_dim // 2, embedding_dim - embedding_dim // 2
                if dq < 1:
                    raise ValueError(f"fastvq.{name}: op='concat' splits embedding_dim in two halves, "
                                     f"so it must be >= 2, got {embedding_dim}")
            else:
                dq = dr = embedding_dim
        if num_collisions is None:
            div = max(1, int(math.sqrt(num_embeddings)))  # the seed's split, float sqrt included
            n_q, n_r = div, div
        else:
            num_collisions = check_int_arg(name, "num_collisions", num_collisions, minimum=1)
            n_q, n_r = -(-num_embeddings // num_collisions), num_collisions
        check_size_product(name, "embedding_dim (with num_embeddings, num_collisions)", n_q, dq)  # the two tables
        check_size_product(name, "embedding_dim (with num_embeddings, num_collisions)", n_r, dr)
        self.num_embeddings = num_embeddings
        self.embedding_dim = dq + dr if op == "concat" else dq
        self.num_collisions = num_collisions
        self.op, self.mode, self.sparse, self.deterministic = op, mode, sparse, deterministic
        self._emb_q = nn.Embedding(n_q, dq, sparse=sparse)
        self._emb_r = nn.Embedding(n_r, dr, sparse=sparse)

    def forward(
        self,
        ids: torch.Tensor,
        offsets: torch.Tensor | None = None,
        per_sample_weights: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``ids.shape + (embedding_dim,)``, or ``(len(offsets), embedding_dim)`` in the bag form.
        ``ids``: int64 or int32, or (as the seed takes them) int8, int16, uint8 or bool, read as
        int32; 1-D in the bag form. ``offsets (B,)``: each bag's first position in ``ids``
        (``mode`` sums or averages a bag). ``per_sample_weights (len(ids),)``: a float weight per id,
        with ``offsets`` and ``mode="sum"`` only, as
        ``torch.nn.functional.embedding_bag`` takes it (see :func:`fastvq.qr_lookup`)."""
        if isinstance(ids, torch.Tensor) and ids.dtype in _NARROW_IDS:
            ids = ids.to(torch.int32)
        return qr_lookup(
            ids, self._emb_q.weight, self._emb_r.weight, self.op,
            offsets=offsets, mode=self.mode, per_sample_weights=per_sample_weights,
            deterministic=self.deterministic, sparse=self.sparse,
        )

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, tables=({self._emb_q.num_embeddings}, "
                f"{self._emb_r.num_embeddings}), op={self.op!r}, sparse={self.sparse}")
