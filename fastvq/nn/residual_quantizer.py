"""ResidualQuantizer: the seed RQVAE MultiQuantizer, one (L, K, D) codebook, one search launch."""

from __future__ import annotations

import re

import torch
import torch.nn as nn

from .._checks import check_int_arg, check_real_arg, check_size_product
from ..ops.residual_quantize import _residual_decode, residual_quantize_step
from . import _checkpoint
from ._codebook import DEFAULT_DECAY, DEFAULT_EPS, CodebookState
from ._step import _check_mask, _quantize_step

_SEED_KEY = re.compile(r"quantizers\.(\d+)\.(embeddings\.weight|cluster_size|embed_avg)$")


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
        ema, decay, eps, grad, dead_code_threshold, kmeans_init, kmeans_iters, process_group: as in
            :class:`fastvq.nn.VectorQuantizer`, applied to every level (EMA statistics, dead
            codes and k-means of level ``l`` are taken over the residuals ``r_l``).

    Parameters and buffers:
        ``codebooks (L, K, D)``: one parameter (initialised N(0, 1) as the seed's
        ``nn.Embedding``\\ s); with ``ema`` it does not require grad and the buffers
        ``cluster_size (L, K)``, ``embed_avg (L, K, D)`` hold the per-level EMA state.

    Forward:
        ``inputs (..., D)``, optional ``mask (...)`` (padding, float weights and activation
        checkpointing: as in :class:`fastvq.nn.VectorQuantizer`) -> ``(quantized (..., D), commitment_loss, embedding_loss,
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

    What a training step costs (Triton backend): one forward launch for every level (codes, their
    sum, each level's loss terms, the EMA statistics and revival candidates of every level), one
    backward launch (every gradient, from the saved codes: no level is searched again), no host
    sync, no ``N x K`` buffer: about 7.5 passes over the inputs at L = 8, K = 256, D = 64,
    N = 4096 (the seed MultiQuantizer: 179.5), growing with L only by the codebooks and codes.

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
        decay: float = DEFAULT_DECAY,
        *,
        eps: float = DEFAULT_EPS,
        grad: str = "ste",
        dead_code_threshold: float = 0.0,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        process_group=None,
        _owner: str = "ResidualQuantizer",
    ):
        super().__init__()
        owner = _owner  # (RQVAE builds its quantizer with its own name, so messages name what the user built)
        self.num_quantizers = check_int_arg(owner, "num_quantizers", num_quantizers, 1)
        self.num_embeddings = check_int_arg(owner, "num_embeddings", num_embeddings, 1)
        self.embedding_dim = check_int_arg(owner, "embedding_dim", embedding_dim, 1)
        self.commitment_cost = check_real_arg(owner, "commitment_cost", commitment_cost, minimum=0.0, float32=True)
        check_size_product(owner, "num_quantizers * num_embeddings * embedding_dim", self.num_quantizers,
                     self.num_embeddings, self.embedding_dim)
        # one (K, D) standard-normal draw per level, as the seed's L nn.Embedding: the same weights
        # and random stream after torch.manual_seed (one (L, K, D) draw differs where K D is not a
        # multiple of 16, the CPU generator's block; seedprobe S1)
        self.codebooks = nn.Parameter(torch.stack(
            [torch.randn(self.num_embeddings, self.embedding_dim) for _ in range(self.num_quantizers)]))
        self._init_codebook_state(
            owner,
            ema=ema,
            decay=decay,
            eps=eps,
            grad=grad,
            dead_code_threshold=dead_code_threshold,
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            process_group=process_group,
        )
        if ema:
            self.codebooks.requires_grad_(False)

    _codebook_name = "the codebooks (codebooks)"

    def _codebook_parameter(self) -> torch.Tensor:
        return self.codebooks

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor | None = None):
        """``inputs (..., D)`` float32/float16/bfloat16, optional ``mask (...)`` (bool, ``False`` =
        padding, or float row weights) -> ``(quantized (..., D) in the inputs' dtype,
        commitment_loss (), embedding_loss (), codes (..., L) int64)``. In training this also
        updates every level's codebook state. The class docstring's "Forward" section has the
        details (the losses, the gradient to ``inputs``, masks)."""
        self._check_inputs(inputs)
        mask = _check_mask("ResidualQuantizer", mask, inputs)
        call = _checkpoint.begin(self, inputs.device)  # None unless inside torch.utils.checkpoint
        codebooks = self.codebooks
        if call is not None and call.replay:  # a checkpoint's rerun: the codebooks the first run searched
            codebooks = call.codebook(codebooks)
        else:  # (reads the host only until k-means has initialised the codebooks)
            self._maybe_kmeans_init_(inputs.detach(), mask=mask)

        # One launch for all levels: codes, their sum (straight-through to inputs, once), the
        # seed's losses and (training) EMA statistics and dead-code candidates of every level;
        # one launch back for every gradient.
        return _quantize_step(self, inputs, codebooks, mask, call=call)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Vectors from codes: ``codes (..., L')`` int, ``L' <= L`` (the first ``L'`` levels)
        -> ``(..., D)`` = ``sum_l codebooks[l, codes[..., l]]``. Differentiable in the codebooks
        (:func:`fastvq.residual_decode`; codes outside ``[0, K)`` raise ``ValueError``).

        Example::

            >>> coarse = rq.decode(codes[..., :1])   # the first level only
        """
        return _residual_decode(codes, self.codebooks, "ResidualQuantizer.decode")

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
