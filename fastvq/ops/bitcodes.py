"""Binary codes: ``to_bits`` / ``to_decimal`` (integer <-> binary-code conversion, most
significant bit first) and the computation of :class:`fastvq.nn.Bitcodes` (``bitcode_quantize``,
``bitcode_decode``).

The helpers of bitcodes-pytorch, on any device: their bit masks are made on the input's
device (bitcodes-pytorch builds them on the CPU, so CUDA inputs fail there), and out-of-range
input raises instead of being silently truncated. The quantizer is pure torch (three matmuls
with ``2 * num_bits`` columns per call): it has no kernel of its own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .._checks import assert_async, check_int_arg, check_tensor
from ._custom_op import custom_op

MAX_BITS = 63  # the codes are int64


def _check_num_bits(op: str, num_bits) -> int:
    num_bits = check_int_arg(op, "num_bits", num_bits)
    if not 1 <= num_bits <= MAX_BITS:
        raise ValueError(f"fastvq.{op}: num_bits must be in [1, {MAX_BITS}], got {num_bits}")
    return num_bits


def _bit_weights(num_bits: int, device: torch.device) -> torch.Tensor:
    """``[2**(num_bits-1), ..., 2, 1]`` as int64 on ``device``."""
    return torch.bitwise_left_shift(
        torch.ones((), dtype=torch.int64, device=device),
        torch.arange(num_bits - 1, -1, -1, dtype=torch.int64, device=device),
    )


def check_bit_values(op: str, bits: torch.Tensor) -> None:
    """ValueError unless every element of ``bits`` is 0 or 1, without a host sync
    (:func:`fastvq._checks.assert_async`: at once on the CPU, a device-side assert on CUDA).
    Call it inside a custom op's body, which runs eagerly under torch.compile too."""
    if bits.numel():
        assert_async(op, ((bits == 0) | (bits == 1)).all(),
                     lambda: f"bits must be 0 or 1, got other values (shape {tuple(bits.shape)})")


# The value checks live in custom-op bodies: those run eagerly even inside a compiled graph,
# so torch.compile(fullgraph=True) traces these helpers and the checks still run.
@custom_op("fastvq::to_bits", mutates_args=())
def _to_bits_op(indices: torch.Tensor, num_bits: int) -> torch.Tensor:
    idx = indices.long()
    if idx.numel():
        def detail():
            lo, hi = (int(v) for v in torch.aminmax(idx))
            if indices.dtype == torch.uint64 and lo < 0:  # unsigned values >= 2**63 read back wrapped
                small, big = idx[idx >= 0], idx[idx < 0]
                lo = int(small.min()) if small.numel() else int(big.min()) % 2**64
                hi = int(big.max()) % 2**64
            return (f"indices must lie in [0, 2**{num_bits}) = [0, {1 << num_bits}), got values in "
                    f"[{lo}, {hi}] (shape {tuple(indices.shape)})")

        assert_async("to_bits", ((idx >= 0) & (idx >> num_bits == 0)).all(), detail)
    weights = _bit_weights(num_bits, idx.device)
    return idx.unsqueeze(-1).bitwise_and(weights).ne(0).long()


@_to_bits_op.register_fake
def _(indices, num_bits):
    return indices.new_empty((*indices.shape, num_bits), dtype=torch.int64)


@custom_op("fastvq::to_decimal", mutates_args=())
def _to_decimal_op(bits: torch.Tensor) -> torch.Tensor:
    check_bit_values("to_decimal", bits)
    weights = _bit_weights(bits.shape[-1], bits.device)
    return (bits.long() * weights).sum(-1)


@_to_decimal_op.register_fake
def _(bits):
    return bits.new_empty(bits.shape[:-1], dtype=torch.int64)


@custom_op("fastvq::checked_bits", mutates_args=())
def _checked_bits_op(bits: torch.Tensor, owner: str) -> torch.Tensor:
    """``bits`` as int64 after checking they are 0 or 1 (``ValueError`` naming ``owner``
    otherwise). A custom op, so the check runs (eagerly) inside torch.compile'd graphs too and
    fullgraph tracing needs no data-dependent guard (:func:`bitcode_decode`)."""
    check_bit_values(owner, bits)
    return bits.to(torch.int64, copy=True)


@_checked_bits_op.register_fake
def _(bits, owner):
    return torch.empty_like(bits, dtype=torch.int64)


def to_bits(indices: torch.Tensor, num_bits: int) -> torch.Tensor:
    """Binary codes of integers, most significant bit first.

    Args:
        indices: ``(...)`` integer tensor (any integer dtype), every value in ``[0, 2**num_bits)``.
        num_bits: bits per code, ``1 <= num_bits <= 63``.

    Returns:
        ``(..., num_bits)`` int64 tensor of 0/1 on ``indices``' device;
        ``to_decimal(to_bits(i, n)) == i``. Not differentiable (integers).

    Raises ``ValueError`` for values outside ``[0, 2**num_bits)`` (bitcodes-pytorch keeps the
    low bits of those silently), without a host sync (on CUDA: a device-side assert).

    Example::

        >>> fastvq.to_bits(torch.tensor([0, 11, 9]), num_bits=4)
        tensor([[0, 0, 0, 0],
                [1, 0, 1, 1],
                [1, 0, 0, 1]])
    """
    op = "to_bits"
    check_tensor(op, "indices", indices)
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"fastvq.{op}: indices must be an integer tensor, got {indices.dtype}")
    num_bits = _check_num_bits(op, num_bits)
    return _to_bits_op(indices, num_bits)


def to_decimal(bits: torch.Tensor) -> torch.Tensor:
    """Integers from binary codes, most significant bit first (the inverse of :func:`to_bits`).

    Args:
        bits: ``(..., num_bits)`` tensor of 0/1 values (any integer, bool or float dtype),
            ``1 <= num_bits <= 63``.

    Returns:
        ``(...)`` int64 tensor on ``bits``' device. Not differentiable.

    Raises ``ValueError`` for any value other than 0 or 1 (NaN, inf and 0.5 included: no bit is
    made up from them), without a host sync (on CUDA: a device-side assert).

    Example::

        >>> fastvq.to_decimal(torch.tensor([[1, 0, 1, 1], [0, 0, 1, 0]]))
        tensor([11,  2])
    """
    op = "to_decimal"
    check_tensor(op, "bits", bits, min_ndim=1)
    if bits.is_complex():
        raise TypeError(f"fastvq.{op}: bits must be an integer, bool or float tensor, got {bits.dtype}")
    if bits.shape[-1] < 1 or bits.shape[-1] > MAX_BITS:
        raise ValueError(f"fastvq.{op}: bits must have 1 to {MAX_BITS} bits in the last dim, got shape {tuple(bits.shape)}")
    return _to_decimal_op(bits)


# ------------------------------------------------------- the Bitcodes quantizer
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


def bitcode_quantize(x: torch.Tensor, codebook: torch.Tensor,
                     temperature: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """:class:`fastvq.nn.Bitcodes`' forward on checked inputs: ``x (..., D)`` and ``codebook
    (2 * num_bits, D)`` of one float dtype -> ``(y (..., D), bits (..., num_bits) int64)``, ``y``
    the sum of the codebook rows the bits select (row ``2k + bit_k``). ``temperature=None``: each
    bit is the argmax of its pair of scores ``x . c`` (a tie picks 0); a float ``> 0``: a hard
    Gumbel-softmax sample at that temperature, straight-through (gradients reach ``x`` and the
    codebook through the soft scores). Pure torch (matmul-bound); no host read."""
    num_bits = codebook.shape[0] // 2
    # rows whose scores could overflow the dtype (fp16 x = 60000, fp32 x = 1e38) are scaled
    # by a power of two first (the bits are scale-invariant); every other row by 1, bitwise
    # the unscaled product. The scores of 16-bit x are float32 products, as in every search
    # op: rounded to bf16, 256.5 and 256.75 would tie. ``pairs`` (the gradient's path) is the
    # unscaled score in x's dtype: +-inf where it overflows, never NaN for a finite x
    scale = _row_scale(x, codebook)  # (float32 for 16-bit x: the same as x's dtype otherwise)
    scaled = F.linear(x.to(scale.dtype) * scale, codebook.to(scale.dtype))
    # (a reshape, not Tensor.unflatten: torch 2.11's Dynamo cannot trace unflatten's super()
    # call under torch.set_default_device, a graph break that failed fullgraph compiles on the GPU)
    scaled = scaled.reshape(*scaled.shape[:-1], num_bits, 2)
    scale = scale.unsqueeze(-1)
    pairs = (scaled / scale).to(x.dtype)
    if temperature is not None:
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


def bitcode_decode(owner: str, bits: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """``bits (..., num_bits)`` of 0/1 (checked: a ``ValueError`` naming ``owner`` otherwise, no
    host read) -> ``(..., D)`` in the codebook's dtype, the sum of the rows of ``codebook (2 *
    num_bits, D)`` they select; differentiable in the codebook."""
    attn = _one_hot2(_checked_bits_op(bits, owner), codebook.dtype)
    return _code_sum(attn.flatten(-2), codebook)
