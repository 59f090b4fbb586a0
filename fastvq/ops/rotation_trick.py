"""rotation_trick: the value is ``q``; the gradient to ``e`` is ``lambda * R^T g`` (Fifty et al. 2024)."""

from __future__ import annotations

import math

import torch

from .._backend import use_triton
from ._custom_op import custom_op, first_order_only
from .._checks import check_float, check_same_device, check_tensor
from ..reference.rotation_trick import EPS_ANTIPODAL, EPS_NORM, rotation_trick_bwd_ref

__all__ = ["rotation_trick", "EPS_NORM", "EPS_ANTIPODAL"]


@custom_op("fastvq::rotation_trick", mutates_args=())
def _rotation_trick_op(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    if use_triton("rotation_trick", e, q):
        from ..kernels.rotation_trick import rotation_trick_fwd

        return rotation_trick_fwd(e, q)
    return q.clone(memory_format=torch.contiguous_format)


@_rotation_trick_op.register_fake
def _(e, q):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@custom_op("fastvq::rotation_trick_bwd", mutates_args=())
def _rotation_trick_bwd_op(e: torch.Tensor, q: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    if use_triton("rotation_trick", e, q, grad):
        from ..kernels.rotation_trick import rotation_trick_bwd

        return rotation_trick_bwd(e, q, grad, EPS_NORM, EPS_ANTIPODAL)
    return rotation_trick_bwd_ref(e, q, grad)


@_rotation_trick_bwd_op.register_fake
def _(e, q, grad):
    return torch.empty_like(e, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    e, q = ctx.saved_tensors
    grad_e = _rotation_trick_bwd_op(e, q, grad) if ctx.needs_input_grad[0] else None
    return grad_e, None


_rotation_trick_op.register_autograd(_backward, setup_context=_setup_context)
first_order_only(_rotation_trick_bwd_op, "rotation_trick")


def rotation_trick(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Rotation-trick straight-through estimator for vector quantization (Fifty et al. 2024, sec. 4.2).

    Args:
        e: ``(..., D)`` encoder outputs, float32/float16/bfloat16 (``D = 0`` and ``D = 1`` work).
        q: ``(..., D)`` their quantized codes, same shape and device; a different float dtype
           is promoted.

    Returns:
        ``(..., D)`` equal to ``q`` bit for bit (in the promoted dtype) for every input,
        ``e = 0`` included.

    Gradient: only ``e`` receives one, ``lambda * R^T g`` with ``lambda = |q|/|e|``,
    ``e^ = e/|e|``, ``q^ = q/|q|``, ``w = (e^ + q^)/|e^ + q^|`` and
    ``R^T g = g - 2 (g.w) w + 2 (g.q^) e^``, every factor a constant, computed in float32
    (the kernel) or float64 (the reference) with the factor ``lambda |g|`` applied in float64.
    ``q`` receives no gradient (feed the codebook through a commitment/codebook loss).
    Rows where the rotation is degenerate take the plain straight-through gradient ``g``:
    ``|e| < EPS_NORM`` or ``|q| < EPS_NORM`` (``EPS_NORM = float32(1e-6)``: the same number
    on both backends, tested on the sums of squares in float64, where every square is exact, so
    a row within a float32 rounding of the threshold takes the same branch on both), or
    ``|e^ + q^| < EPS_ANTIPODAL`` (``1e-3``: ``e`` points within ~1e-3 rad of ``-q``).

    Numbers: every row is scaled by its largest entry before it is normalised, so the gradient
    is finite wherever the inputs are finite and the true gradient is representable in the
    output dtype (``|q| = 1e20``, ``|e| = 1e-30`` and subnormal rows of ``e``, ``q`` or ``g``
    included); a gradient beyond the dtype's
    range is ``+-inf``. Except where ``(|q| / |e|) max|g|`` itself overflows float32 (such a row's
    gradient holds +-inf already): its three terms, each that large, cancel in float32, so an
    element far below them (an exact 0, or 1e30 beside 3e38 * 1e35) can read 0 or +-inf, and
    the backends can differ there (fuzzM M1). A row with a NaN or infinite entry in ``e`` or ``q`` gets a NaN
    gradient (its rotation is undefined). A NaN or infinite ``g`` passes through a
    straight-through row unchanged and makes a rotated row NaN. Identical on both backends.

    Example::

        >>> e = encoder(x)                                   # (B, T, D)
        >>> idx, _ = fastvq.nearest_code(e.reshape(-1, D), codebook)
        >>> q = codebook[idx].reshape(e.shape)
        >>> z = fastvq.rotation_trick(e, q)                  # == q; gradients reach the encoder
    """
    op = "rotation_trick"
    check_tensor(op, "e", e, min_ndim=1)
    check_tensor(op, "q", q, min_ndim=1)
    check_float(op, "e", e)
    check_float(op, "q", q)
    check_same_device(op, e=e, q=q)
    if e.shape != q.shape:
        raise ValueError(f"fastvq.{op}: e and q must have one shape, got e {tuple(e.shape)} and q {tuple(q.shape)}")
    if e.dtype != q.dtype:
        dtype = torch.promote_types(e.dtype, q.dtype)
        e, q = e.to(dtype), q.to(dtype)
    shape = e.shape
    N, D = math.prod(shape[:-1]), shape[-1]
    out = _rotation_trick_op(e.reshape(N, D), q.reshape(N, D))
    return out.reshape(shape)
