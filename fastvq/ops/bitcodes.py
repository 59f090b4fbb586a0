"""to_bits / to_decimal: integer <-> binary-code conversion (most significant bit first).

The helpers of bitcodes-pytorch, on any device: their bit masks are made on the input's
device (bitcodes-pytorch builds them on the CPU, so CUDA inputs fail there), and out-of-range
input raises instead of being silently truncated.
"""

from __future__ import annotations

import torch

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
    check_bit_values(owner, bits)
    return bits.to(torch.int64, copy=True)


@_checked_bits_op.register_fake
def _(bits, owner):
    return torch.empty_like(bits, dtype=torch.int64)


def checked_bits(owner: str, bits: torch.Tensor) -> torch.Tensor:
    """``bits`` as int64 after checking they are 0 or 1 (``ValueError`` naming ``owner``
    otherwise). A custom op, so the check runs (eagerly) inside torch.compile'd graphs too and
    fullgraph tracing needs no data-dependent guard; used by ``fastvq.nn.Bitcodes.from_bits``."""
    return _checked_bits_op(bits, owner)


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
