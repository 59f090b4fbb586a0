"""Bitcodes: vector quantization with binary codes (a drop-in for bitcodes-pytorch's module)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._backend import without_autocast
from .._checks import FLOAT_DTYPES, check_int_arg, check_real_arg, check_size_product, check_tensor
from ..ops.bitcodes import checked_bits


def _row_scale(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``(..., 1)`` powers of two, float32 for 16-bit ``x`` (else ``x``'s dtype): 1 for every row
    whose scores ``x.c`` cannot overflow (bound: ``max|x| * max_j |c_j|_1`` below a quarter of the
    dtype's range, bitwise the unscaled product), else the one that brings that bound there.
    The scale may be far below the dtype's normals (fp16 ``x = 65504`` with ``|c|_1 = 131008``:
    ``2^-19``; it was clamped at ``2^-14``, both scores overflowed and the tie picked bit 0):
    hence the float32 scale; the scaled row's largest entry is ``>= 1 / (4 D)``, a normal
    number. The scale itself may be subnormal (fp32 ``x = 3e38`` against a codebook near the
    range needs ``2^-130`` and more; clamped at ``2^-126`` it left both scores +inf): a product
    with a power of two is exact, rounded only where the result is subnormal. Non-finite rows: 1."""
    acc = torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype
    finfo = torch.finfo(x.dtype)
    bound = x.detach().abs().amax(-1, keepdim=True).double() * codebook.detach().abs().double().sum(-1).amax()
    tiny = torch.finfo(acc).smallest_normal * torch.finfo(acc).eps  # the smallest subnormal of acc
    k = torch.log2(bound / (finfo.max / 4)).ceil().clamp(0, -math.log2(tiny))
    k = torch.where(bound.isfinite(), k, 0.0)
    return torch.exp2(-k).to(acc)


def _col_scale(codebook: torch.Tensor) -> torch.Tensor:
    """``(D,)`` powers of two in the codebook's dtype, for a sum of one row per bit (and the
    straight-through's near-0/1 weights) without an intermediate overflow: 1 for every column
    whose ``sum_j |c_jd|`` stays below a quarter of the accumulation's range (bitwise the
    unscaled product: ordinary codebooks), else the one that brings it there (a sum such as
    3e38 + 3e38 - 3e38 then gives its finite 3e38, not inf; below the subnormals such a column
    rounds at ``2^-149`` times its scale). float16 accumulates in float32: never scaled.
    Takes a finite codebook (:func:`_code_sum` zeroes the non-finite entries first).
    Codebook-sized work, no host read."""
    acc = torch.float32 if codebook.dtype == torch.float16 else codebook.dtype
    bound = codebook.detach().abs().double().sum(0)
    k = torch.log2(bound / (torch.finfo(acc).max / 4)).ceil().clamp(0, -math.log2(torch.finfo(acc).smallest_normal))
    k = torch.where(bound.isfinite(), k, 0.0)
    return torch.exp2(-k).to(codebook.dtype)


def _code_sum(attn: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``attn (..., 2 * num_bits) @ codebook``: the sum of the rows the (near-)0/1 weights select.

    - Column-scaled (:func:`_col_scale`) so that the sum is +-inf only where the exact one is
      beyond the dtype's range (scaling by powers of two is exact).
    - float16 is summed in float32 (explicitly: the CPU's fp16 product flushed a subnormal term,
      -65504 + 65504 - 7.3e-6 gave 0) and rounded once.
    - Non-finite entries reach only the sums that select them: the product runs on the codebook
      with them zeroed (``0 * inf`` in an unselected row made the whole column NaN), and a second,
      exact float32 product of the 0/1 selection counts the selected +inf / -inf / NaN entries
      per output (+inf, -inf, NaN where both infinities or a NaN are selected). Cost: one more
      ``(..., 2 * num_bits) @ (2 * num_bits, D)`` product and a few elementwise passes over
      the output; no host read. A non-finite entry gets no gradient (0)."""
    acc = torch.float32 if codebook.dtype == torch.float16 else codebook.dtype
    finite = codebook.isfinite()
    fin = torch.where(finite, codebook, 0.0)
    scale = _col_scale(fin).to(acc)
    out = (attn.to(acc) @ (fin.to(acc) * scale)) / scale
    # selection counts, each <= num_bits < b (b = num_bits + 1): +inf 1, -inf b, NaN b^2, summed
    # exactly (float32 while the largest sum, below b^3, fits its 24 bits; else float64)
    b = codebook.shape[0] // 2 + 1
    cdt = torch.float32 if b**3 <= 2**24 else torch.float64
    tag = torch.where(codebook.isnan(), float(b * b), torch.where(codebook > 0, 1.0, float(b)))
    tag = torch.where(finite, 0.0, tag).to(cdt)
    count = attn.detach().round().to(cdt) @ tag
    pos, neg, nan = count.remainder(b), (count / b).floor().remainder(b), (count / (b * b)).floor()
    special = torch.where(pos > 0, float("inf"), 0.0) + torch.where(neg > 0, float("-inf"), 0.0)
    special = torch.where(nan > 0, float("nan"), special)
    return torch.where(count > 0, special.to(acc), out).to(codebook.dtype)


def _one_hot2(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``(...)`` bits 0/1 -> ``(..., 2)`` one-hot in ``dtype``; ``F.one_hot`` reads the values'
    range on the host (two syncs per call), which a training step must not."""
    return (bits.unsqueeze(-1) == torch.arange(2, device=bits.device)).to(dtype)


_F32_TINY = torch.finfo(torch.float32).tiny  # 2^-126: below it a temperature is subnormal in float32


def _hard_gumbel(pairs: torch.Tensor, temperature: float, scaled: torch.Tensor | None = None,
                 scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``F.gumbel_softmax(pairs, temperature, hard=True)`` (the same noise draw, so the same
    samples and values as bitcodes-pytorch's module) without its overflow: ``(bits, attn)``.

    The sample is ``argmax(score + g)``, which does not depend on the temperature; it is taken
    in float32 before anything is divided by it. The straight-through part, ``softmax((score +
    g) / T)``, is float32 with the pair's largest entry subtracted before the division (the
    softmax is shift-invariant; ``inf - inf`` where a score overflowed counts as 0), so a
    finite score never gives NaN, at any dtype and temperature. Returns float32 ``attn``.

    ``scaled = pairs * scale`` (``scale (..., 1, 1)`` powers of two, :func:`_row_scale`): the
    sample is then ``argmax(scaled + g * scale)``, the same decision where ``pairs`` overflowed."""
    # F.gumbel_softmax's draw: the same random stream (the scores' dtype and shape)
    gumbels = -torch.empty_like(pairs, memory_format=torch.legacy_contiguous_format).exponential_().log()
    z = pairs.float() + gumbels.float()
    if scaled is None:
        bits = z.argmax(dim=-1)  # ties pick 0; a NaN score picks a bit all the same (its row is NaN)
    else:  # (scale 1: bitwise the line above)
        bits = (scaled.detach().float() + gumbels.float() * scale.float()).argmax(dim=-1)
    shift = z.detach().amax(dim=-1, keepdim=True)
    if temperature >= _F32_TINY:
        scaled = (z - shift) / temperature
    else:
        # a subnormal temperature: divided in float64 and rounded once (the float32 quotient,
        # bitwise). torch's CUDA division by a host scalar multiplies by its reciprocal, inf in
        # float32 below 2^-126, and the backward's 0 * inf made every gradient NaN on the H200 run
        # (the CPU divides). Only there: float64 costs two passes more (the traffic targets), and a
        # 0-d tensor made torch.compile specialise on every temperature of a schedule.
        scaled = ((z - shift).double() / temperature).float()
    scaled = torch.where(scaled.isnan() & ~z.isnan(), 0.0, scaled)  # +-inf - +-inf: an overflowed score
    soft = scaled.softmax(dim=-1)
    hard = _one_hot2(bits, torch.float32)
    return bits, hard - soft.detach() + soft  # value: the hard sample; gradient: the soft one


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
        # rows whose scores could overflow the dtype (fp16 x = 60000, fp32 x = 1e38) are scaled
        # by a power of two first (the bits are scale-invariant); every other row by 1, bitwise
        # the unscaled product. The scores of 16-bit x are float32 products, as in every search
        # op: rounded to bf16, 256.5 and 256.75 would tie. ``pairs`` (the gradient's path) is the
        # unscaled score in x's dtype: +-inf where it overflows, never NaN for a finite x
        scale = _row_scale(x, codebook)  # (float32 for 16-bit x: the same as x's dtype otherwise)
        scaled = F.linear(x.to(scale.dtype) * scale, codebook.to(scale.dtype))
        # (a reshape, not Tensor.unflatten: torch 2.11's Dynamo cannot trace unflatten's super()
        # call under torch.set_default_device, a graph break that failed fullgraph compiles on the GPU)
        scaled = scaled.reshape(*scaled.shape[:-1], self.num_bits, 2)
        scale = scale.unsqueeze(-1)
        pairs = (scaled / scale).to(x.dtype)
        if self.training:
            # (an attribute: a schedule may set it between steps; checked here, on the host)
            temperature = check_real_arg("Bitcodes", "temperature", self.temperature, positive=True, float32=True)
            bits, attn = _hard_gumbel(pairs, temperature, scaled, scale)
            attn = attn.to(codebook.dtype)
        else:
            bits = scaled.argmax(dim=-1)  # ties pick 0, as torch.argmax picks the first
            attn = _one_hot2(bits, codebook.dtype)
        out = _code_sum(attn.flatten(-2), codebook)
        # A NaN score (a NaN in x, or inf * 0 / inf - inf from an infinite x) picks a bit all the
        # same (bits stay 0/1); its output row is NaN, not a made-up sum of codebook rows.
        nan_row = pairs.isnan().flatten(-2).any(-1, keepdim=True)
        return out.masked_fill(nan_row, float("nan")), bits

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
        attn = _one_hot2(checked_bits("Bitcodes", bits), self.codebook.dtype)
        return _code_sum(attn.flatten(-2), self.codebook)
