"""ResidualQuantizer: the seed RQVAE MultiQuantizer, one (L, K, D) codebook, one search launch."""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import check_index_range
from ..ops.residual_quantize import residual_quantize
from ..ops.rotation_trick import rotation_trick
from ._codebook import CodebookState, _check_float, _check_int

_SEED_KEY = re.compile(r"quantizers\.(\d+)\.(embeddings\.weight|cluster_size|embed_avg)$")


@torch.library.custom_op("fastvq::residual_decode_rows", mutates_args=())
def _decode_rows(codes: torch.Tensor, num_embeddings: int) -> torch.Tensor:
    """``codes (M, L')`` -> rows ``codes[:, l] + l * K`` of the flattened ``(L * K, D)`` codebooks.

    The range check reads the codes on the host; it lives in this op body, which runs eagerly
    even inside a ``torch.compile``'d graph, so compiled models are checked too (and
    ``fullgraph=True`` traces without a data-dependent branch)."""
    check_index_range("ResidualQuantizer.decode", "codes", codes, num_embeddings)
    offsets = torch.arange(codes.shape[-1], device=codes.device, dtype=torch.int64) * num_embeddings
    return codes.long() + offsets


@_decode_rows.register_fake
def _(codes, num_embeddings):
    return codes.new_empty(codes.shape, dtype=torch.int64)


class ResidualQuantizer(CodebookState):
    """Residual vector quantization; a drop-in for the seed's ``MultiQuantizer``.

    Level ``l`` quantizes the residual ``r_l = x - (q_0 + ... + q_{l-1})`` with its own codebook
    of ``K`` codes; the greedy search over all levels is one :func:`fastvq.residual_quantize`
    call.

    Args:
        num_quantizers: number of levels ``L``.
        num_embeddings: codes per level ``K``.
        embedding_dim: vector size ``D``.
        commitment_cost: kept as an attribute for the training loop; not applied in ``forward``.
        ema, decay, eps, grad, dead_code_threshold, kmeans_init, kmeans_iters: as in
            :class:`fastvq.nn.VectorQuantizer`, applied to every level (EMA statistics, dead
            codes and k-means of level ``l`` are taken over the residuals ``r_l``).

    Parameters and buffers:
        ``codebooks (L, K, D)``: one parameter (initialised N(0, 1) as the seed's
        ``nn.Embedding``\\ s); with ``ema`` it does not require grad and the buffers
        ``cluster_size (L, K)``, ``embed_avg (L, K, D)`` hold the per-level EMA state.

    Forward:
        ``inputs (..., D)`` -> ``(quantized (..., D), commitment_loss, embedding_loss,
        codes (..., L) int64)``; ``codes[..., l]`` is the seed's ``sem_ids_list[l]``. The losses
        are the seed's: ``sum_l mse(q_l.detach(), r_l)`` and ``sum_l mse(q_l, r_l.detach())``,
        where ``r_l`` carries the gradient to ``inputs`` (the seed subtracts detached codes).
        ``embedding_loss`` is a zero tensor with ``ema``.

    Deliberate difference from the seed: ``quantized`` passes the gradient to ``inputs`` ONCE
    (identity Jacobian, as a straight-through estimator should). The seed sums ``L``
    straight-through outputs, each of which passes the gradient to ``inputs``, so its
    ``quantized`` hands ``inputs`` ``L`` times the upstream gradient. The losses' gradients
    are the seed's. With ``grad="rotation"`` the rotation trick is applied between ``inputs``
    and the total quantized vector.

    Checkpoints: a seed MultiQuantizer state_dict (``quantizers.{l}.embeddings.weight``, and
    ``quantizers.{l}.cluster_size`` / ``embed_avg`` for EMA levels) loads directly with
    ``load_state_dict(..., strict=True)``: the levels are stacked into ``codebooks``.

    Example::

        >>> rq = fastvq.nn.ResidualQuantizer(3, 256, 32)
        >>> q, commit, emb, codes = rq(torch.randn(10, 32))
        >>> codes.shape
        torch.Size([10, 3])
        >>> torch.allclose(rq.decode(codes), q)
        True
    """

    _single_codebook = False

    def __init__(
        self,
        num_quantizers: int,
        num_embeddings: int,
        embedding_dim: int,
        commitment_cost: float = 0.25,
        ema: bool = False,
        decay: float = 0.99,
        *,
        eps: float = 1e-5,
        grad: str = "ste",
        dead_code_threshold: float = 0.0,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
    ):
        super().__init__()
        owner = "ResidualQuantizer"
        self.num_quantizers = _check_int("num_quantizers", owner, num_quantizers, 1)
        self.num_embeddings = _check_int("num_embeddings", owner, num_embeddings, 1)
        self.embedding_dim = _check_int("embedding_dim", owner, embedding_dim, 1)
        self.commitment_cost = _check_float("commitment_cost", owner, commitment_cost, 0.0)
        self.codebooks = nn.Parameter(torch.randn(num_quantizers, num_embeddings, embedding_dim))
        self._init_codebook_state(
            owner,
            ema=ema,
            decay=decay,
            eps=eps,
            grad=grad,
            dead_code_threshold=dead_code_threshold,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
        )
        if ema:
            self.codebooks.requires_grad_(False)

    def _codebook_levels(self) -> torch.Tensor:
        return self.codebooks.data

    def _check_inputs(self, inputs) -> None:
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"fastvq.ResidualQuantizer: inputs must be a torch.Tensor, got {type(inputs).__name__}")
        if inputs.dim() < 1 or inputs.shape[-1] != self.embedding_dim:
            raise ValueError(
                f"fastvq.ResidualQuantizer: inputs must be (..., {self.embedding_dim}), got shape {tuple(inputs.shape)}"
            )

    def forward(self, inputs: torch.Tensor):
        self._check_inputs(inputs)
        L, D = self.num_quantizers, self.embedding_dim
        self._maybe_kmeans_init_(inputs.detach().reshape(-1, D))

        codebooks = self.codebooks
        # One launch for all levels; `total` is the sum of the codes, straight-through to inputs.
        total, codes = residual_quantize(inputs, codebooks.detach())
        flat_codes = codes.reshape(-1, L)

        # The seed's losses, level by level (L is small; each step is elementwise on (N, D)).
        residual = inputs.reshape(-1, D)
        commitment_loss = embedding_loss = 0.0
        residuals = []
        for level in range(L):
            q = F.embedding(flat_codes[:, level], codebooks[level]).to(inputs.dtype)
            commitment_loss = commitment_loss + F.mse_loss(q.detach(), residual)
            if not self.ema:
                embedding_loss = embedding_loss + F.mse_loss(q, residual.detach())
            residuals.append(residual.detach())
            residual = residual - q.detach()
        if self.ema:
            embedding_loss = torch.zeros((), dtype=commitment_loss.dtype, device=inputs.device)

        if self.grad == "rotation":
            quantized = rotation_trick(inputs, total.detach())
        else:
            quantized = total  # straight-through to inputs, once (see the class docstring)

        if self.training:
            self._update_codebook_(torch.stack(residuals), flat_codes.T)
        return quantized, commitment_loss, embedding_loss, codes

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Vectors from codes: ``codes (..., L')`` int, ``L' <= L`` (the first ``L'`` levels)
        -> ``(..., D)`` = ``sum_l codebooks[l, codes[..., l]]``. Differentiable in the codebooks.

        Example::

            >>> coarse = rq.decode(codes[..., :1])   # the first level only
        """
        if not isinstance(codes, torch.Tensor):
            raise TypeError(f"fastvq.ResidualQuantizer.decode: codes must be a torch.Tensor, got {type(codes).__name__}")
        if codes.dtype not in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"fastvq.ResidualQuantizer.decode: codes must be an integer tensor, got {codes.dtype}")
        if codes.dim() < 1 or not 1 <= codes.shape[-1] <= self.num_quantizers:
            raise ValueError(
                f"fastvq.ResidualQuantizer.decode: codes must be (..., L') with 1 <= L' <= {self.num_quantizers}, "
                f"got shape {tuple(codes.shape)}"
            )
        levels = codes.shape[-1]
        # level l's code k is row l*K + k of the flattened codebooks: one gather for all levels
        # (ValueError for codes outside [0, K), also when compiled: see _decode_rows)
        rows = _decode_rows(codes.reshape(-1, levels), self.num_embeddings)
        rows = F.embedding(rows, self.codebooks[:levels].reshape(-1, self.embedding_dim))
        return rows.sum(1).reshape(*codes.shape[:-1], self.embedding_dim)

    def _convert_state_dict_(self, state_dict, prefix) -> None:
        """Stack a seed MultiQuantizer's per-level entries into ``codebooks`` (and the EMA buffers)."""
        if prefix + "codebooks" in state_dict:
            return
        found: dict[str, dict[int, torch.Tensor]] = {}
        for key in list(state_dict):
            if not key.startswith(prefix):
                continue
            m = _SEED_KEY.match(key[len(prefix):])
            if m:
                found.setdefault(m.group(2), {})[int(m.group(1))] = state_dict.pop(key)
        names = {"embeddings.weight": "codebooks", "cluster_size": "cluster_size", "embed_avg": "embed_avg"}
        for seed_name, levels in found.items():
            if sorted(levels) != list(range(len(levels))):
                raise ValueError(f"fastvq.ResidualQuantizer: seed state_dict has levels {sorted(levels)} of {seed_name}")
            state_dict[prefix + names[seed_name]] = torch.stack([levels[i] for i in range(len(levels))])

    def extra_repr(self) -> str:
        return (
            f"num_quantizers={self.num_quantizers}, num_embeddings={self.num_embeddings}, "
            f"embedding_dim={self.embedding_dim}, commitment_cost={self.commitment_cost}, "
            f"{self._codebook_extra_repr()}"
        )
