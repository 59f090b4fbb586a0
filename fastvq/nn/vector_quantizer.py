"""VectorQuantizer: the seed RQVAE VectorQuantizer / EMAQuantizer, on fastvq's ops."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .._checks import FLOAT_DTYPES
from ..ops.nearest_code import nearest_code
from ..ops.rotation_trick import rotation_trick
from ._codebook import METRICS, CodebookState, _check_float, _check_int


class VectorQuantizer(CodebookState):
    """Vector quantization layer; a drop-in for the seed's ``VectorQuantizer`` and ``EMAQuantizer``.

    Args:
        num_embeddings: codebook size ``K``.
        embedding_dim: vector size ``D``.
        commitment_cost: kept as an attribute for the training loop to use (the seed's
            ``compute_loss`` multiplies it in); ``forward`` does NOT scale the loss by it.
        metric: ``"l2"`` (the seed's cdist), ``"cosine"`` or ``"dot"``; how the nearest code
            is chosen (:func:`fastvq.nearest_code`). The losses are squared errors either way.
        grad: ``"ste"`` (straight-through estimator, the seed) or ``"rotation"``
            (:func:`fastvq.rotation_trick` between the input and its code).
        ema: update the codebook by exponential moving averages (the seed ``EMAQuantizer``)
            instead of gradients; ``embedding_loss`` is then a zero tensor and the codebook
            parameter does not require grad.
        decay, eps: EMA decay and Laplace-smoothing epsilon (the seed's 0.99 and 1e-5).
            As in the seed, ``embed_avg`` starts as a copy of the codebook and ``cluster_size``
            at zero, so a code no vector picks in the first steps is divided by a smoothed count
            near ``eps`` and is thrown far out (about ``1/eps`` times its size), never to be
            picked again; ``kmeans_init`` or ``dead_code_threshold`` avoid that.
        dead_code_threshold: in training, a code whose EMA count (``cluster_size`` with EMA,
            else ``code_usage``, an EMA of batch counts) drops below this is re-seeded from a
            random vector of the current batch. 0 (default) disables it. With ``ema``, since
            ``cluster_size`` starts at 0, the first training step re-seeds every code picked
            fewer than ``threshold / (1 - decay)`` times: in effect it initialises the codebook
            from that batch.
        kmeans_init: on the first training forward, replace the codebook by ``kmeans_iters``
            steps of k-means on that batch.

    Forward:
        ``inputs (..., D)`` float32/float16/bfloat16, any strides (a different float dtype from
        the codebook's is fine: the search promotes, ``quantized`` and the losses take the
        inputs' dtype) -> ``(quantized (..., D), commitment_loss, embedding_loss,
        indices (...) int64)``. float64 inputs or a ``.double()`` module raise ``TypeError``
        (the seed accepted them; cast with ``.float()``). ``quantized`` has the code's value
        and passes the gradient to ``inputs`` (straight through, or rotated);
        ``commitment_loss = mse(code.detach(), inputs)`` (gradient to the inputs),
        ``embedding_loss = mse(code, inputs.detach())`` (gradient to the codebook). In
        training with ``ema``/``dead_code_threshold``/``kmeans_init`` the codebook buffers are updated after the codes are chosen (the
        returned values use the codebook as it was), statistics all-reduced across ranks when
        ``torch.distributed`` is initialised.

    The state_dict is the seed's (``embeddings.weight``; with ``ema`` also ``cluster_size``
    and ``embed_avg``), so a seed checkpoint loads with ``strict=True``.

    Example::

        >>> vq = fastvq.nn.VectorQuantizer(512, 64, ema=True, dead_code_threshold=1.0)
        >>> q, commit, emb, idx = vq(torch.randn(8, 16, 64))
        >>> q.shape, idx.shape
        (torch.Size([8, 16, 64]), torch.Size([8, 16]))
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        commitment_cost: float = 0.25,
        metric: str = "l2",
        *,
        grad: str = "ste",
        ema: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
        dead_code_threshold: float = 0.0,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
    ):
        super().__init__()
        owner = "VectorQuantizer"
        self.num_embeddings = _check_int("num_embeddings", owner, num_embeddings, 1)
        self.embedding_dim = _check_int("embedding_dim", owner, embedding_dim, 1)
        self.commitment_cost = _check_float("commitment_cost", owner, commitment_cost, 0.0)
        if metric not in METRICS:
            raise ValueError(f"fastvq.{owner}: unknown metric {metric!r}; expected one of {METRICS}")
        self.metric = metric
        self.embeddings = nn.Embedding(num_embeddings, embedding_dim)
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
            self.embeddings.weight.requires_grad_(False)

    def _codebook_levels(self) -> torch.Tensor:
        return self.embeddings.weight.data.unsqueeze(0)

    def forward(self, inputs: torch.Tensor):
        if not isinstance(inputs, torch.Tensor):
            raise TypeError(f"fastvq.VectorQuantizer: inputs must be a torch.Tensor, got {type(inputs).__name__}")
        if inputs.dim() < 1 or inputs.shape[-1] != self.embedding_dim:
            raise ValueError(
                f"fastvq.VectorQuantizer: inputs must be (..., {self.embedding_dim}), got shape {tuple(inputs.shape)}"
            )
        weight = self.embeddings.weight
        for name, t in (("inputs", inputs), ("the codebook (embeddings.weight)", weight)):
            if t.dtype not in FLOAT_DTYPES:
                raise TypeError(
                    f"fastvq.VectorQuantizer: {name} must be float32, float16 or bfloat16, got {t.dtype} "
                    "(float64 is not supported: cast the inputs and the module, e.g. .float())"
                )
        self._maybe_kmeans_init_(inputs.detach().reshape(-1, self.embedding_dim), self.metric)

        indices, _ = nearest_code(inputs, weight.detach(), metric=self.metric)
        codes = F.embedding(indices, weight).to(inputs.dtype)
        commitment_loss = F.mse_loss(codes.detach(), inputs)
        if self.ema:
            embedding_loss = torch.zeros((), dtype=commitment_loss.dtype, device=inputs.device)
        else:
            embedding_loss = F.mse_loss(codes, inputs.detach())
        if self.grad == "rotation":
            quantized = rotation_trick(inputs, codes.detach())
        else:
            quantized = inputs + (codes - inputs).detach()

        if self.training:
            self._update_codebook_(
                inputs.detach().reshape(1, -1, self.embedding_dim), indices.reshape(1, -1)
            )
        return quantized, commitment_loss, embedding_loss, indices

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
            f"commitment_cost={self.commitment_cost}, metric={self.metric!r}, {self._codebook_extra_repr()}"
        )
