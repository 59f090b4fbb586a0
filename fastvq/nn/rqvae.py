"""RQVAE: encoder -> residual quantizer -> decoder, for semantic ids of recommender items."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.semantic_ids import semantic_ids as _semantic_ids
from .._checks import check_bool_arg, check_int_arg, check_real_arg, check_size_product
from .residual_quantizer import ResidualQuantizer
from ._step import _check_mask

__all__ = ["RQVAE", "Encoder", "Decoder"]


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """The seed's ``Linear-ReLU-Linear-ReLU-Linear`` (parameter names ``0.*``, ``2.*``, ``4.*``)."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, d_out))


class Encoder(nn.Module):
    """``Linear-ReLU-Linear-ReLU-Linear``: ``(..., input_dim) -> (..., latent_dim)`` (the seed's)."""

    def __init__(self, input_dim: int, hidden_dim: int, latent_dim: int):
        super().__init__()
        self.layers = _mlp(input_dim, hidden_dim, latent_dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features)


class Decoder(nn.Module):
    """``Linear-ReLU-Linear-ReLU-Linear``: ``(..., latent_dim) -> (..., output_dim)`` (the seed's)."""

    def __init__(self, latent_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        self.layers = _mlp(latent_dim, hidden_dim, output_dim)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.layers(latent)


class RQVAE(nn.Module):
    """Residual-quantized VAE that maps item features to discrete semantic ids.

    The seed's model: ``encoder`` (an MLP, parameters ``encoder.layers.*``), ``quantizer``
    (:class:`fastvq.nn.ResidualQuantizer` with ``num_quantizers`` levels of ``num_embeddings``
    codes of size ``latent_dim``) and ``decoder`` (``decoder.layers.*``), so a seed checkpoint's
    encoder/decoder weights load by name.

    Args:
        input_dim, hidden_dim, latent_dim: MLP sizes.
        num_quantizers: ``L``, residual levels.
        num_embeddings: ``K``, codes per level.
        commitment_cost: weight of the commitment loss in :meth:`compute_loss` (also passed on
            to the quantizer).
        **quantizer_kwargs: passed on to :class:`fastvq.nn.ResidualQuantizer`.

    Shapes: ``features (..., input_dim)`` float; ``forward`` returns
    ``(reconstructed (..., input_dim), commitment_loss (), embedding_loss (), codes (..., L) int64)``.

    Example::

        model = fastvq.nn.RQVAE(768, 512, 64, num_quantizers=3, num_embeddings=256)
        reconstructed, commitment_loss, embedding_loss, codes = model(features)
        losses = model.compute_loss(features, reconstructed, commitment_loss, embedding_loss)
        losses["total_loss"].backward()
        ids = model.semantic_ids(all_item_features, batch_size=4096)  # (N, 4), unique rows
    """

    def __init__(
        self,
        input_dim: int,
        hidden_dim: int,
        latent_dim: int,
        num_quantizers: int,
        num_embeddings: int,
        commitment_cost: float = 0.25,
        **quantizer_kwargs,
    ):
        super().__init__()
        owner = "RQVAE"
        input_dim = check_int_arg(owner, "input_dim", input_dim, 1)
        hidden_dim = check_int_arg(owner, "hidden_dim", hidden_dim, 1)
        latent_dim = check_int_arg(owner, "latent_dim", latent_dim, 1)
        check_size_product(owner, "input_dim * hidden_dim", input_dim, hidden_dim)  # the encoder's/decoder's weights
        check_size_product(owner, "hidden_dim * latent_dim", hidden_dim, latent_dim)
        self.input_dim = input_dim
        self.latent_dim = latent_dim
        self.num_quantizers = num_quantizers = check_int_arg(owner, "num_quantizers", num_quantizers, 1)
        self.num_embeddings = num_embeddings = check_int_arg(owner, "num_embeddings", num_embeddings, 1)
        self.commitment_cost = commitment_cost = check_real_arg(owner, "commitment_cost", commitment_cost, minimum=0.0, float32=True)
        params = inspect.signature(ResidualQuantizer).parameters
        takes = {name for name in params if not name.startswith("_")} - {
            "num_quantizers", "num_embeddings", "embedding_dim", "commitment_cost"}
        open_ended = any(q.kind is inspect.Parameter.VAR_KEYWORD for q in params.values())
        unknown = [] if open_ended else sorted(set(quantizer_kwargs) - takes)
        if unknown:
            raise TypeError(f"fastvq.{owner}: unexpected keyword argument(s) {', '.join(map(repr, unknown))}; the "
                            f"keywords beyond the seed's go to ResidualQuantizer: {', '.join(sorted(takes))}")
        self.encoder = Encoder(input_dim, hidden_dim, latent_dim)
        # (messages name RQVAE; a class put in ResidualQuantizer's place gets only the user's keywords)
        named = {"_owner": owner} if "_owner" in params else {}
        self.quantizer = ResidualQuantizer(num_quantizers, num_embeddings, latent_dim, commitment_cost,
                                           **quantizer_kwargs, **named)
        self.decoder = Decoder(latent_dim, hidden_dim, input_dim)

    def forward(self, features: torch.Tensor, mask: torch.Tensor | None = None):
        """``(..., input_dim)`` -> ``(reconstructed, commitment_loss, embedding_loss, codes (..., L))``.

        ``mask (...)``: optional, bool (``False`` = padding) or float row weights, as the
        quantizer takes it: a masked-out row enters the encoder as zeros (its values, NaN
        included, reach no output or gradient of a real row), updates no codebook and adds
        nothing to the quantizer's losses (pass the same mask to :meth:`compute_loss` for the
        reconstruction)."""
        features = self._check_features("RQVAE", features)
        mask = _check_mask("RQVAE", mask, features)
        if mask is not None:  # padding rows enter the layers as zeros: NaN there reaches no gradient
            features = torch.where(_real_rows(mask)[..., None], features, 0.0)
        encoded = self.encoder(features)
        # (without a mask, the seed's call: a seed quantizer put in its place still works)
        step = self.quantizer(encoded) if mask is None else self.quantizer(encoded, mask)
        quantized, commitment_loss, embedding_loss, codes = step
        reconstructed = self.decoder(quantized)
        return reconstructed, commitment_loss, embedding_loss, codes

    def _check_features(self, op: str, features) -> torch.Tensor:
        """``features (..., input_dim)``, a floating tensor on the model's device, in the
        parameters' dtype (floating ``features`` of another dtype are cast, as the quantizers
        promote; under autocast the layers cast themselves). ``TypeError``/``ValueError`` naming
        ``op`` and ``features`` otherwise (integer or bool features, which the linear layers cannot
        take; another device)."""
        if not isinstance(features, torch.Tensor):
            raise TypeError(f"fastvq.{op}: features must be a torch.Tensor, got {type(features).__name__}")
        if features.dim() < 1 or features.shape[-1] != self.input_dim:
            raise ValueError(f"fastvq.{op}: features must be (..., {self.input_dim}), got shape {tuple(features.shape)}")
        if not features.is_floating_point():
            raise TypeError(f"fastvq.{op}: features must be a floating-point tensor, got {features.dtype} "
                            f"(cast it, or use semantic_ids, which casts its batches)")
        weight = self.encoder.layers[0].weight
        if features.device != weight.device:
            raise ValueError(f"fastvq.{op}: features are on {features.device}, the model on {weight.device} "
                             f"(move them, e.g. features.to({str(weight.device)!r}), or use semantic_ids, which "
                             f"moves its batches)")
        dtype = weight.dtype
        if features.dtype != dtype and not torch.is_autocast_enabled(features.device.type):
            features = features.to(dtype)
        return features

    def compute_loss(self, features, reconstructed, commitment_loss, embedding_loss, mask=None) -> dict:
        """The seed's losses: ``total = mse(reconstructed, features) + commitment_cost *
        commitment_loss + embedding_loss``; returns ``total_loss``, ``reconstruction_loss``,
        ``commitment_loss`` and ``embedding_loss``. On an empty batch every loss is 0 (the
        quantizer's losses are 0 there, and a mean over no elements would be NaN), still
        differentiable (zero gradients). With the ``mask (...)`` given to :meth:`forward`, the
        reconstruction loss is the weighted mean over the real rows, ``sum_i w_i |x_i - y_i|^2 /
        (input_dim sum_i w_i)`` (0 when no row is real; a padding row's values, NaN included, add
        nothing), as the quantizer weights its losses."""
        if mask is not None:
            mask = _check_mask("RQVAE.compute_loss", mask, reconstructed)
            real = _real_rows(mask)
            w = torch.where(real, mask.to(torch.float32), 0.0)
            w = w / w.amax().clamp_min(torch.finfo(torch.float32).tiny) if w.numel() else w  # (scale-free)
            diff = torch.where(real[..., None], reconstructed.float() - features.float(), 0.0)
            num = (w * diff.square().sum(-1)).sum()
            den = w.sum() * reconstructed.shape[-1]
            recon_loss = torch.where(den > 0, num / den.clamp_min(1.0e-30), 0.0).to(reconstructed.dtype)
        elif reconstructed.numel() == 0:  # (a shape, read on the host: no sync)
            recon_loss = F.mse_loss(reconstructed, features, reduction="sum")  # 0
        else:
            recon_loss = F.mse_loss(reconstructed, features)
        total_loss = recon_loss + self.commitment_cost * commitment_loss + embedding_loss
        return {
            "total_loss": total_loss,
            "reconstruction_loss": recon_loss,
            "commitment_loss": commitment_loss,
            "embedding_loss": embedding_loss,
        }

    def encode_codes(self, features: torch.Tensor) -> torch.Tensor:
        """``(..., input_dim) -> (..., L)`` int64 codes of the residual quantizer (runs as is:
        no mode change, gradients off only where the caller turned them off)."""
        return self._encode_codes("RQVAE.encode_codes", features)

    def _encode_codes(self, op: str, features) -> torch.Tensor:
        return self.quantizer(self.encoder(self._check_features(op, features)))[3]

    def generate_semantic_ids(self, features: torch.Tensor) -> torch.Tensor:
        """The seed's ``generate_semantic_ids``: codes ``(..., L)`` of one batch, in eval mode
        without gradients (each submodule's previous mode is restored). For a whole item set with the
        collision level, use :meth:`semantic_ids`."""
        with _eval_mode(self), torch.no_grad():
            return self._encode_codes("RQVAE.generate_semantic_ids", features)

    def semantic_ids(
        self,
        features,
        batch_size: int = 4096,
        progress: bool = True,
        with_collision_level: bool = True,
    ) -> torch.Tensor:
        """Semantic ids of an item set far larger than fits on the device at once.

        Args:
            features: a tensor ``(N, input_dim)`` (or ``(..., input_dim)``, rows flattened) on
                any device, typically the CPU, cut into ``batch_size`` rows (a dict with a
                ``"features"`` entry is read as that tensor); or any iterable of
                batches (a ``DataLoader``, a list), each a tensor, a dict with a ``"features"``
                entry, a tuple/list whose first element is the features (a 2-D tensor or
                array; a list of 1-D row vectors is refused: stack it), or a nested list of
                rows of numbers.
            batch_size: rows per batch when ``features`` is a tensor.
            progress: show a tqdm progress bar.
            with_collision_level: append the collision level (:func:`fastvq.semantic_ids`,
                over the whole set in input order) so every row is unique.

        Returns:
            int64 on the model's device: ``(N, L + 1)``, or the raw codes ``(N, L)`` when
            ``with_collision_level=False``.

        Each batch moves to the model's device (and parameter dtype), runs without gradients in
        eval mode; each submodule's previous train/eval mode is restored afterwards.
        """
        op = "RQVAE.semantic_ids"
        batch_size = check_int_arg(op, "batch_size", batch_size, minimum=1)
        progress = check_bool_arg(op, "progress", progress)
        with_collision_level = check_bool_arg(op, "with_collision_level", with_collision_level)
        if isinstance(features, (str, bytes)):
            raise TypeError(f"fastvq.{op}: features must be a tensor or an iterable of batches, got "
                            f"{type(features).__name__}")
        param = next(self.parameters())
        device, dtype = param.device, param.dtype

        if hasattr(features, "__array__") and not isinstance(features, torch.Tensor):
            features = torch.as_tensor(features)
        if isinstance(features, Mapping):  # one batch given as a dict: its "features" entry
            features = _batch_features(op, features, self.input_dim)
        if isinstance(features, torch.Tensor):
            if features.dim() < 1 or features.shape[-1] != self.input_dim:
                raise ValueError(f"fastvq.{op}: features must be (N, {self.input_dim}), got shape {tuple(features.shape)}")
            rows = features.reshape(-1, self.input_dim)
            batches: Iterable = (rows[s : s + batch_size] for s in range(0, rows.shape[0], batch_size))
            total, unit = rows.shape[0], "item"
        elif isinstance(features, Iterable):
            batches = features
            total, unit = (len(features) if hasattr(features, "__len__") else None), "batch"
        else:
            raise TypeError(f"fastvq.{op}: features must be a tensor or an iterable of batches, got {type(features).__name__}")

        from tqdm.auto import tqdm

        codes = []
        with _eval_mode(self), torch.no_grad(), tqdm(total=total, disable=not progress, desc="semantic ids",
                                                     unit=unit) as bar:
            for batch in batches:
                x = _batch_features(op, batch, self.input_dim)
                x = x.to(device=device, dtype=dtype, non_blocking=True)  # integer and bool features too
                c = self._encode_codes(op, x.reshape(-1, self.input_dim))
                codes.append(c.reshape(-1, c.shape[-1]))
                bar.update(x.shape[0] if unit == "item" else 1)
        codes = torch.cat(codes) if codes else torch.zeros((0, self.num_quantizers), dtype=torch.int64, device=device)
        codes = codes.long()
        return _semantic_ids(codes) if with_collision_level else codes


def _real_rows(mask: torch.Tensor) -> torch.Tensor:
    """The rows a checked mask keeps: True / a weight above 0."""
    return mask if mask.dtype == torch.bool else mask > 0


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """``model.eval()`` for the block; then every submodule gets its own mode back (``train()``
    would set them all: a quantizer frozen with ``.eval()`` inside a training model stays frozen)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def _batch_features(op: str, batch, input_dim: int) -> torch.Tensor:
    if isinstance(batch, Mapping):
        if "features" not in batch:
            raise ValueError(f"fastvq.{op}: a dict batch needs a 'features' entry, got keys {list(batch)}")
        batch = batch["features"]
    elif isinstance(batch, (tuple, list)) and batch and (isinstance(batch[0], torch.Tensor) or hasattr(batch[0], "__array__")):
        # (features, labels, ...); a list of rows of numbers is itself the batch. A first element
        # of one dimension is ambiguous (a list of row vectors reads as (first row, ...)): refused
        if len(getattr(batch[0], "shape", ())) == 1:
            raise ValueError(f"fastvq.{op}: features: a list/tuple batch is read as (features, labels, ...), and its "
                             f"first element has shape {tuple(batch[0].shape)}, one row: stack a list of rows into a "
                             f"(B, {input_dim}) tensor (torch.stack / numpy.stack), or give (B, {input_dim}) features")
        batch = batch[0]
    if not isinstance(batch, torch.Tensor):
        try:
            batch = torch.as_tensor(batch)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"fastvq.{op}: features: a batch must be a tensor or array-like of numbers, got "
                            f"{type(batch).__name__} ({e})") from None
    if batch.dim() < 1 or batch.shape[-1] != input_dim:
        raise ValueError(f"fastvq.{op}: each batch must be (B, {input_dim}), got shape {tuple(batch.shape)}")
    return batch
