"""Bitcodes: vector quantization with binary codes (a drop-in for bitcodes-pytorch's module)."""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import check_tensor
from ..ops.bitcodes import check_bit_values


@torch.library.custom_op("fastvq::bitcodes_checked_bits", mutates_args=())
def _checked_bits(bits: torch.Tensor) -> torch.Tensor:
    """``bits`` as int64 after checking they are 0 or 1: a custom op, so the check runs (eagerly)
    inside torch.compile'd graphs too and fullgraph tracing needs no data-dependent guard."""
    check_bit_values("Bitcodes", bits)
    return bits.to(torch.int64, copy=True)


@_checked_bits.register_fake
def _(bits):
    return torch.empty_like(bits, dtype=torch.int64)


class Bitcodes(nn.Module):
    """Quantize vectors to ``num_bits`` binary codes; the output is the sum of one codebook
    row per bit.

    The codebook holds two rows per bit: bit ``k`` set to 0 selects row ``2k``, set to 1 row
    ``2k + 1``. A vector ``x`` takes, for each bit, the row of the pair with the larger inner
    product with ``x`` (a tie picks 0), and quantizes to the sum of the ``num_bits`` rows picked.
    During training the choice per bit is a hard Gumbel-softmax sample at ``temperature``
    (straight-through: gradients reach ``x`` and the codebook); in eval mode it is the argmax.

    Same parameter (``codebook``, ``(2 * num_bits, features)``, standard-normal init) and the
    same outputs as ``bitcodes_pytorch.Bitcodes``, so state dicts load either way. Differences:

    - any number of leading dims (bitcodes-pytorch takes only ``(b, m, d)``);
    - in training, the returned ``bits`` are the Gumbel-sampled bits that produced ``y``, so
      ``from_bits(bits) == y`` in training too. bitcodes-pytorch returns the argmax bits of
      the noiseless similarities there while ``y`` uses the sampled ones, so its ``bits`` and
      ``y`` disagree wherever the noise flipped a bit;
    - the bit values passed to :meth:`from_bits` are checked (0 or 1), and inputs of another
      float dtype than the codebook are promoted.

    Args:
        features: size ``D`` of the vectors.
        num_bits: bits per vector (1 to 63 for :func:`fastvq.to_decimal` to hold them).
        temperature: Gumbel-softmax temperature used in training, ``> 0``.

    Shapes:
        ``forward(x)``: ``x (..., D)`` float -> ``(y (..., D), bits (..., num_bits) int64)``.
        ``from_bits(bits)``: ``(..., num_bits)`` 0/1 -> ``(..., D)``.

    Example::

        >>> bitcodes = fastvq.nn.Bitcodes(features=8, num_bits=4, temperature=10).eval()
        >>> y, bits = bitcodes(torch.randn(2, 6, 8))       # y (2, 6, 8), bits (2, 6, 4)
        >>> torch.equal(bitcodes.from_bits(bits), y)
        True
        >>> codes = fastvq.to_decimal(bits)                 # (2, 6) int64 in [0, 16)
    """

    def __init__(self, features: int, num_bits: int, temperature: float):
        super().__init__()
        for name, value in (("features", features), ("num_bits", num_bits)):
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise TypeError(f"fastvq.Bitcodes: {name} must be an int, got {type(value).__name__}")
            if value < 1:
                raise ValueError(f"fastvq.Bitcodes: {name} must be >= 1, got {value}")
        if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
            raise TypeError(f"fastvq.Bitcodes: temperature must be a real number, got {type(temperature).__name__}")
        if not temperature > 0:
            raise ValueError(f"fastvq.Bitcodes: temperature must be > 0, got {temperature}")
        self.features = int(features)
        self.num_bits = int(num_bits)
        self.temperature = temperature
        self.codebook = nn.Parameter(torch.randn(2 * self.num_bits, self.features))

    def extra_repr(self) -> str:
        return f"features={self.features}, num_bits={self.num_bits}, temperature={self.temperature}"

    def _check_x(self, x: torch.Tensor) -> None:
        check_tensor("Bitcodes", "x", x, min_ndim=1)
        if not x.is_floating_point():
            raise TypeError(f"fastvq.Bitcodes: x must be a floating-point tensor, got {x.dtype}")
        if x.device != self.codebook.device:
            raise ValueError(f"fastvq.Bitcodes: x is on {x.device}, the codebook on {self.codebook.device}")
        if x.shape[-1] != self.features:
            raise ValueError(
                f"fastvq.Bitcodes: x must have features={self.features} in its last dim, got shape {tuple(x.shape)}"
            )

    def _codebook_like(self, x: torch.Tensor):
        dtype = torch.promote_types(x.dtype, self.codebook.dtype)
        return x.to(dtype), self.codebook.to(dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (..., D) -> (y (..., D), bits (..., num_bits) int64)``; ``y == from_bits(bits)``."""
        self._check_x(x)
        x, codebook = self._codebook_like(x)
        pairs = F.linear(x, codebook).unflatten(-1, (self.num_bits, 2))  # (..., num_bits, 2)
        if self.training:
            # Hard sample, straight-through gradient; the cold entry is exactly 0, the hot ~1.
            attn = F.gumbel_softmax(pairs, tau=self.temperature, hard=True, dim=-1)
            bits = attn.argmax(dim=-1)
        else:
            bits = pairs.argmax(dim=-1)  # ties pick 0, as torch.argmax picks the first
            attn = F.one_hot(bits, num_classes=2).to(codebook.dtype)
        out = attn.flatten(-2) @ codebook
        return out, bits

    def from_bits(self, bits: torch.Tensor) -> torch.Tensor:
        """``(..., num_bits)`` of 0/1 (integer, bool or float) -> ``(..., D)``, the codebook's
        dtype: the sum of the codebook rows the bits select. Differentiable in the codebook."""
        check_tensor("Bitcodes", "bits", bits, min_ndim=1)
        if bits.is_complex():
            raise TypeError(f"fastvq.Bitcodes: bits must be an integer, bool or float tensor, got {bits.dtype}")
        if bits.shape[-1] != self.num_bits:
            raise ValueError(
                f"fastvq.Bitcodes: bits must have num_bits={self.num_bits} in its last dim, got shape {tuple(bits.shape)}"
            )
        if bits.device != self.codebook.device:
            raise ValueError(f"fastvq.Bitcodes: bits are on {bits.device}, the codebook on {self.codebook.device}")
        attn = F.one_hot(_checked_bits(bits), num_classes=2).to(self.codebook.dtype)
        return attn.flatten(-2) @ self.codebook
