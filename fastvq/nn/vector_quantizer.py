"""VectorQuantizer: the seed RQVAE VectorQuantizer / EMAQuantizer, on fastvq's ops."""

from __future__ import annotations

import torch
import torch.nn as nn

from .._checks import check_choice, check_int_arg, check_real_arg, check_size_product
from .._names import MODULE_METRICS
from . import _checkpoint
from ._codebook import DEFAULT_DECAY, DEFAULT_EPS, CodebookState, search
from ._step import _check_mask, _quantize_step


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
            else ``code_usage``, an EMA of batch counts) drops below this is revived: moved to
            the midpoint between a random (finite) vector of the current batch and the code
            that vector chose, splitting a used code's cell. No host sync. 0 (default)
            disables it. With ``ema``, since ``cluster_size`` starts at 0, the first training
            step revives every code picked fewer than ``threshold / (1 - decay)`` times: in
            effect it initialises the codebook from that batch. Keep it below the rows per
            code of a batch (N / K); 1.0 works for the README's set-ups.
        kmeans_init: on the first training forward that has a finite row (on any rank),
            replace the codebook by ``kmeans_iters`` (default 10, an int >= 0; an attribute,
            settable later) steps of k-means on that batch. That
            batch reads the host: run it eagerly, then ``torch.compile(fullgraph=True)``
            (compiled before, it raises saying so).
        process_group: the ``torch.distributed`` group whose ranks share the codebook (EMA
            statistics, revival and k-means candidates are summed / exchanged over it);
            ``None`` (default): the default group, every rank. Pass the group a
            ``DistributedDataParallel(..., process_group=g)`` replica set uses, or a one-rank
            group to train each rank's codebook alone. Also an attribute, settable later.

    Settings that train well (``fastvq.nn._codebook.RECOMMENDED``): ``kmeans_init=True,
    dead_code_threshold=1.0``, with ``ema=True``: 98.8% of 512 codes in use after 100 steps
    where the defaults keep 1. In training the module warns once when fewer than 1/8 of its
    codes are in use. Rows that are not finite in the codebook's dtype (NaN, inf, or beyond
    float16's range for a ``.half()`` module fed bfloat16/float32 inputs) never reach the
    codebook; they are counted in
    the ``nonfinite_rows`` buffer (and revivals in ``codes_revived``).

    Forward:
        ``inputs (..., D)`` float32/float16/bfloat16, any strides (a different float dtype from
        the codebook's is fine: the search promotes, ``quantized`` and the losses take the
        inputs' dtype), optional ``mask (...)`` (bool, ``False`` = padding; or float per-row
        weights) -> ``(quantized (..., D), commitment_loss, embedding_loss,
        indices (...) int64)``. A masked row adds nothing to the losses or to the codebook's
        statistics (EMA, dead codes, k-means init), gets no loss gradient, and its ``quantized``
        is its input unchanged (identity gradient); its index is still its nearest code; the
        losses are means over the unmasked rows (0 when there are none). Float weights are
        data, not parameters: they are detached (no gradient reaches a learnable mask); the
        losses use only their ratios, but the EMA counts and ``dead_code_threshold`` are in units
        of weight, so weights that sum to 1 over a batch make every code look dead (keep them
        near 1 per row, or use a bool mask). Activation checkpointing
        (``torch.utils.checkpoint``, either ``use_reentrant``) gives the plain step's outputs,
        gradients and state: the rerun of a call in the backward searches the codebook that
        call searched, updates nothing (EMA, revival, counters, k-means init) and leaves the
        random stream where the call did; each checkpointed call of a quantizer with EMA,
        revival or k-means init keeps a copy of its codebook until the region's graph is freed.
        Compiled, a rerun raises ``RuntimeError`` instead (the quantizer compiled on its own in
        an eagerly checkpointed region, or a compiled step that checkpoints it). float64 inputs
        or a ``.double()`` module raise ``TypeError`` (the seed accepted them; cast with
        ``.float()``). ``quantized`` has the code's value (NaN in the
        elements where ``inputs`` is not finite, as the seed's ``x + (q - x).detach()``)
        and passes the gradient to ``inputs`` (straight through, or rotated);
        ``commitment_loss = mse(code.detach(), inputs)`` (gradient to the inputs),
        ``embedding_loss = mse(code, inputs.detach())`` (gradient to the codebook). In
        training with ``ema``/``dead_code_threshold``/``kmeans_init`` the codebook buffers are updated after the codes are chosen (the
        returned values use the codebook as it was), statistics all-reduced across ranks when
        ``torch.distributed`` is initialised.

    The state_dict is the seed's (``embeddings.weight``; with ``ema`` also ``cluster_size``
    and ``embed_avg``), so a seed checkpoint loads with ``strict=True``.

    What a training step costs (Triton backend): the l2 search, the gathered codes and both
    losses are one kernel launch (:func:`fastvq.residual_quantize_step` with one level; another
    metric runs :func:`fastvq.nearest_code` first), every gradient (straight-through or rotated,
    and the codebook's) one more, the EMA update a third; no host sync, no ``N x K`` buffer.
    About 5.6 passes over the inputs for a straight-through or rotation step, 6.4 with EMA (the
    seed module: 22.6 and 19.0; ``python -m fastvq bench --traffic``).

    Example::

        >>> vq = fastvq.nn.VectorQuantizer(512, 64, ema=True, kmeans_init=True, dead_code_threshold=1.0)
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
        decay: float = DEFAULT_DECAY,
        eps: float = DEFAULT_EPS,
        dead_code_threshold: float = 0.0,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        process_group=None,
    ):
        super().__init__()
        owner = "VectorQuantizer"
        self.num_embeddings = check_int_arg(owner, "num_embeddings", num_embeddings, 1)
        self.embedding_dim = check_int_arg(owner, "embedding_dim", embedding_dim, 1)
        self.commitment_cost = check_real_arg(owner, "commitment_cost", commitment_cost, minimum=0.0, float32=True)
        self.metric = check_choice(owner, "metric", metric, MODULE_METRICS)
        check_size_product(owner, "num_embeddings * embedding_dim", self.num_embeddings, self.embedding_dim)
        self.embeddings = nn.Embedding(self.num_embeddings, self.embedding_dim)
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
            self.embeddings.weight.requires_grad_(False)

    _codebook_name = "the codebook (embeddings.weight)"

    def _codebook_parameter(self) -> torch.Tensor:
        return self.embeddings.weight

    def forward(self, inputs: torch.Tensor, mask: torch.Tensor | None = None):
        """``inputs (..., D)`` float32/float16/bfloat16, optional ``mask (...)`` (bool, ``False`` =
        padding, or float row weights) -> ``(quantized (..., D) in the inputs' dtype,
        commitment_loss (), embedding_loss (), indices (...) int64)``. In training this also
        updates the codebook state (EMA, dead-code revival, k-means init). The class docstring's
        "Forward" section has the details (masks, gradients, checkpointing)."""
        self._check_inputs(inputs)
        mask = _check_mask("VectorQuantizer", mask, inputs)
        call = _checkpoint.begin(self, inputs.device)  # None unless inside torch.utils.checkpoint
        if call is not None and call.replay:  # a checkpoint's rerun: the codebook the first run searched
            codebook = call.codebook(self.embeddings.weight.unsqueeze(0))
        else:  # (reads the host only until k-means has initialised the codebook)
            self._maybe_kmeans_init_(inputs.detach(), self.metric, mask)
            codebook = self.embeddings.weight.unsqueeze(0)

        # One launch: the code, its value, the losses and (training) the EMA statistics and
        # dead-code candidates; one launch back. The l2 search runs inside it; another metric
        # searches first and hands it the codes.
        codes = None
        if self.metric != "l2":
            codes = search(inputs, codebook[0].detach(), self.metric).unsqueeze(-1)
        quantized, commitment_loss, embedding_loss, codes = _quantize_step(self, inputs, codebook, mask, codes, call)
        return quantized, commitment_loss, embedding_loss, codes.squeeze(-1)

    def extra_repr(self) -> str:
        return (
            f"num_embeddings={self.num_embeddings}, embedding_dim={self.embedding_dim}, "
            f"commitment_cost={self.commitment_cost}, metric={self.metric!r}, {self._codebook_extra_repr()}"
        )
