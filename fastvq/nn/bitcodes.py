"""Bitcodes: vector quantization with binary codes (a drop-in for bitcodes-pytorch's module)."""

from __future__ import annotations

import torch
from torch import nn

from .._backend import without_autocast
from .._checks import FLOAT_DTYPES, check_int_arg, check_real_arg, check_size_product, check_tensor
from ..ops.bitcodes import bitcode_decode, bitcode_quantize


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
      ``from_bits(bits) == y`` in training too (for ``x`` of the codebook's dtype: ``y`` has the
      promoted dtype, ``from_bits`` the codebook's). bitcodes-pytorch returns the argmax bits of
      the noiseless similarities there while ``y`` uses the sampled ones, so its ``bits`` and
      ``y`` disagree wherever the noise flipped a bit;
    - the bit values passed to :meth:`from_bits` are checked (0 or 1), and inputs of another
      float dtype than the codebook are promoted;
    - bf16/fp16 inputs pick their bits on float32 inner products, as the search ops do
      (bitcodes-pytorch compares scores rounded to the 16-bit dtype, where 256.5 and 256.75
      tie in bf16); fp32 bits are the same as its own;
    - ``torch.autocast`` changes nothing in the forward (its matmuls run with autocast off, in
      the inputs' dtype). Its gradients come from autograd through those matmuls, whose
      backward follows the autocast state of the ``backward()`` call: call it outside the
      autocast region, as torch advises (inside it, bf16 gradients; probe6 A2).

    Args:
        features: size ``D`` of the vectors, an int ``>= 1``.
        num_bits: bits per vector, an int ``>= 1`` (at most 63 for :func:`fastvq.to_decimal`
            to hold them).
        temperature: Gumbel-softmax temperature used in training, finite and ``> 0`` (also when set
            later, as a schedule does: checked at each training forward).

    Bad arguments raise ``TypeError`` (bools, strings, ...) or ``ValueError`` (sizes below 1,
    non-integral sizes, a NaN, infinite or non-positive temperature). A vector whose scores
    are NaN (a NaN entry, or an infinite one meeting a zero) quantizes to a NaN row; its bits
    are still 0 or 1. A finite vector whose scores overflow the dtype (fp16 ``x = 60000``, fp32
    ``x = 1e38``) is scaled by a power of two before the product, so its bits are the exact
    comparison's and ``y`` (a sum of codebook rows) stays finite; in training its soft
    (straight-through) scores are then +-inf and their gradient to ``x`` is 0 or finite, not
    NaN (one extra pass over ``x``: its row max, and the scaling).

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
        self.features = check_int_arg("Bitcodes", "features", features, minimum=1)
        self.num_bits = check_int_arg("Bitcodes", "num_bits", num_bits, minimum=1)
        self.temperature = check_real_arg("Bitcodes", "temperature", temperature, positive=True, float32=True)
        check_size_product("Bitcodes", "num_bits * features", 2 * self.num_bits, self.features)  # (2 rows per bit)
        self.codebook = nn.Parameter(torch.randn(2 * self.num_bits, self.features))

    def extra_repr(self) -> str:
        return f"features={self.features}, num_bits={self.num_bits}, temperature={self.temperature}"

    def _check_x(self, x: torch.Tensor) -> None:
        check_tensor("Bitcodes", "x", x, min_ndim=1)
        if x.dtype not in (torch.float64, *FLOAT_DTYPES):  # (float8 does not promote: torch's error named no argument)
            raise TypeError(f"fastvq.Bitcodes: x must be float64, float32, float16 or bfloat16, got {x.dtype}")
        if x.device != self.codebook.device:
            raise ValueError(f"fastvq.Bitcodes: x is on {x.device}, the codebook on {self.codebook.device}")
        if x.shape[-1] != self.features:
            raise ValueError(
                f"fastvq.Bitcodes: x must have features={self.features} in its last dim, got shape {tuple(x.shape)}"
            )

    def _codebook_like(self, x: torch.Tensor):
        dtype = torch.promote_types(x.dtype, self.codebook.dtype)
        return x.to(dtype), self.codebook.to(dtype)

    @without_autocast  # as every fastvq op: x's dtype decides, not autocast
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (..., D) -> (y (..., D), bits (..., num_bits) int64)``; ``y == from_bits(bits)`` when ``x``
        has the codebook's dtype. ``y`` has the promoted dtype of ``x`` and the codebook, and
        :meth:`from_bits` the codebook's: a float16 module fed float32 sums ``y`` in float32."""
        self._check_x(x)
        x, codebook = self._codebook_like(x)
        temperature = None
        if self.training:
            # (an attribute: a schedule may set it between steps; checked here, on the host)
            temperature = check_real_arg("Bitcodes", "temperature", self.temperature, positive=True, float32=True)
        return bitcode_quantize(x, codebook, temperature)

    @without_autocast
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
        return bitcode_decode("Bitcodes", bits, self.codebook)
