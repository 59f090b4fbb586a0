"""The seed modules, transcribed from /work/shared/seeds/001_*.txt (the RQVAE design doc users
run today), as test oracles. Kept as written, bugs included; do not "fix" them here:

- VectorQuantizer: cdist + argmin; losses NOT scaled by commitment_cost inside forward.
- MultiQuantizer: each level's output is straight-through to its own input, and every level's
  input carries the gradient to ``inputs``, so ``final_quantized`` passes the gradient to
  ``inputs`` once per level (L times). Returns ``sem_ids_list`` as a Python list.
- EMAQuantizer: ``embed_avg`` starts as a copy of the weights while ``cluster_size`` starts at
  zero; the one-hot statistics are taken from ``inputs`` without detaching; returns a CPU
  ``torch.tensor(0.0)`` as the embedding loss.
"""

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
