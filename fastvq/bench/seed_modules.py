"""The seeds' modules: the code users run today, transcribed from the design documents
(``/work/shared/seeds/001_*.txt``, the RQVAE page; ``000_*.txt``, the QR embedding), as the test
oracles of :mod:`fastvq.nn` and the benchmark's seed providers. Kept as written, bugs included;
do not "fix" them here:

- VectorQuantizer: cdist + argmin; losses NOT scaled by commitment_cost inside forward.
- MultiQuantizer: each level's output is straight-through to its own input, and every level's
  input carries the gradient to ``inputs``, so ``final_quantized`` passes the gradient to
  ``inputs`` once per level (L times). Returns ``sem_ids_list`` as a Python list.
- EMAQuantizer: ``embed_avg`` starts as a copy of the weights while ``cluster_size`` starts at
  zero; the one-hot statistics are taken from ``inputs`` without detaching; returns a CPU
  ``torch.tensor(0.0)`` as the embedding loss.
- Encoder, Decoder, compute_loss, train_step, generate_semantic_ids: as written. The doc never
  shows the model class that holds them; :class:`RQVAE` below is the smallest one its code
  implies (attributes ``encoder``, ``quantizer``, ``decoder``, ``commitment_cost``; forward
  ``features -> (reconstructed, commitment_loss, embedding_loss, sem_ids)``).
- QREmbedding (seed 000): ``sqrt(num_embeddings)`` rows per table, float floor division.

A deliberate copy: :mod:`fastvq.nn` writes some of the same lines again (``rqvae.py``'s
Encoder/Decoder layers and ``compute_loss``), and must not import them from here, nor this
module from there: an oracle shares no code with what it judges.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class VectorQuantizer(nn.Module):
    """Vector quantization layer"""

    def __init__(self, num_embeddings, embedding_dim, commitment_cost=0.25):
        super().__init__()
        self.embedding_dim = embedding_dim
        self.num_embeddings = num_embeddings
        self.commitment_cost = commitment_cost
        self.embeddings = nn.Embedding(num_embeddings, embedding_dim)

    def forward(self, inputs):
        # Calculate distances
        distances = torch.cdist(inputs, self.embeddings.weight)
        # Get closest embeddings
        encoding_indices = torch.argmin(distances, dim=-1)
        quantized = self.embeddings(encoding_indices)
        # Calculate losses
        commitment_loss = F.mse_loss(quantized.detach(), inputs)
        embedding_loss = F.mse_loss(quantized, inputs.detach())
        quantized = inputs + (quantized - inputs).detach()
        return quantized, commitment_loss, embedding_loss, encoding_indices


class MultiQuantizer(nn.Module):
    """Multiple quantization layers"""

    def __init__(self, num_quantizers, num_embeddings, embedding_dim):
        super().__init__()
        self.quantizers = nn.ModuleList(
            [VectorQuantizer(num_embeddings, embedding_dim) for _ in range(num_quantizers)]
        )

    def forward(self, inputs):
        quantized_list = []
        commitment_losses = []
        embedding_losses = []
        sem_ids_list = []
        current_input = inputs
        for quantizer in self.quantizers:
            quantized, commitment_loss, embedding_loss, sem_ids = quantizer(current_input)
            quantized_list.append(quantized)
            commitment_losses.append(commitment_loss)
            embedding_losses.append(embedding_loss)
            sem_ids_list.append(sem_ids)
            # Residual connection
            current_input = current_input - quantized.detach()
        # Combine quantized representations
        final_quantized = sum(quantized_list)
        total_commitment_loss = sum(commitment_losses)
        total_embedding_loss = sum(embedding_losses)
        return final_quantized, total_commitment_loss, total_embedding_loss, sem_ids_list


class EMAQuantizer(VectorQuantizer):
    """Quantizer with exponential moving average updates"""

    def __init__(self, num_embeddings, embedding_dim, decay=0.99):
        super().__init__(num_embeddings, embedding_dim)
        self.decay = decay
        self.register_buffer("cluster_size", torch.zeros(num_embeddings))
        self.register_buffer("embed_avg", self.embeddings.weight.clone())

    def forward(self, inputs):
        quantized, commitment_loss, _, encoding_indices = super().forward(inputs)
        if self.training:
            # Update EMA
            encodings = F.one_hot(encoding_indices, self.num_embeddings).float()
            self.cluster_size.mul_(self.decay).add_(encodings.sum(0), alpha=1 - self.decay)
            embed_sum = encodings.transpose(0, 1) @ inputs
            self.embed_avg.mul_(self.decay).add_(embed_sum, alpha=1 - self.decay)
            # Normalize
            n = self.cluster_size.sum()
            cluster_size = (self.cluster_size + 1e-5) / (n + self.num_embeddings * 1e-5) * n
            embed_normalized = self.embed_avg / cluster_size.unsqueeze(1)
            self.embeddings.weight.data.copy_(embed_normalized)
        return quantized, commitment_loss, torch.tensor(0.0), encoding_indices


class Encoder(nn.Module):
    """Feature encoder network"""

    def __init__(self, input_dim, hidden_dim, latent_dim):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, latent_dim),
        )

    def forward(self, features):
        return self.layers(features)


class Decoder(nn.Module):
    """Feature reconstruction decoder"""

    def __init__(self, latent_dim, hidden_dim, output_dim):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(latent_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.ReLU(),
            nn.Linear(hidden_dim, output_dim),
        )

    def forward(self, latent):
        return self.layers(latent)


class RQVAE(nn.Module):
    """The model the doc's code implies: Encoder -> MultiQuantizer -> Decoder (not in the doc)."""

    def __init__(self, input_dim, hidden_dim, latent_dim, num_quantizers, num_embeddings, commitment_cost=0.25):
        super().__init__()
        self.commitment_cost = commitment_cost
        self.encoder = Encoder(input_dim, hidden_dim, latent_dim)
        self.quantizer = MultiQuantizer(num_quantizers, num_embeddings, latent_dim)
        self.decoder = Decoder(latent_dim, hidden_dim, input_dim)

    def forward(self, features):
        encoded = self.encoder(features)
        quantized, commitment_loss, embedding_loss, sem_ids = self.quantizer(encoded)
        return self.decoder(quantized), commitment_loss, embedding_loss, sem_ids

    def compute_loss(self, features, reconstructed, commitment_loss, embedding_loss):
        # Reconstruction loss
        recon_loss = F.mse_loss(reconstructed, features)
        # Total loss
        total_loss = recon_loss + self.commitment_cost * commitment_loss + embedding_loss
        return {
            "total_loss": total_loss,
            "reconstruction_loss": recon_loss,
            "commitment_loss": commitment_loss,
            "embedding_loss": embedding_loss,
        }

    def generate_semantic_ids(self, item_features):
        return generate_semantic_ids(self, item_features)


def train_step(model, batch, optimizer):
    optimizer.zero_grad()
    # Forward pass
    features = batch["features"]
    reconstructed, commitment_loss, embedding_loss, sem_ids = model(features)
    # Compute losses
    losses = model.compute_loss(features, reconstructed, commitment_loss, embedding_loss)
    # Backward pass
    losses["total_loss"].backward()
    optimizer.step()
    return losses, sem_ids


def generate_semantic_ids(model, item_features):
    """Generate semantic IDs for items"""
    model.eval()
    with torch.no_grad():
        encoded = model.encoder(item_features)
        _, _, _, sem_ids = model.quantizer(encoded)
    return sem_ids


class QREmbedding(nn.Module):
    """QR trick from ByteDance: https://arxiv.org/abs/2209.07663 (seed 000, as written)"""

    def __init__(self, num_embeddings: int, emb_dim: int, sparse: bool = False):
        super().__init__()
        self._div = int(math.sqrt(num_embeddings))
        self._num_embeddings = self._div * self._div
        self._emb_dim = emb_dim
        self._emb_q = nn.Embedding(self._div, self._emb_dim, sparse=sparse)
        self._emb_r = nn.Embedding(self._div, self._emb_dim, sparse=sparse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.remainder(x, self._num_embeddings)
        q = torch.div(x, self._div, rounding_mode="floor").long()
        r = torch.remainder(x, self._div).long()
        return self._emb_q(q) + self._emb_r(r)
