"""pairwise_sqdist: (M, D), (N, D) -> (M, N) squared Euclidean distances, differentiable."""

from __future__ import annotations

import torch

from .._backend import use_triton
from .._checks import check_float, check_last_dim, check_same_device, check_tensor
from ..reference.pairwise_sqdist import pairwise_sqdist_ref


@torch.library.custom_op("fastvq::pairwise_sqdist", mutates_args=())
def _pairwise_sqdist_op(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if use_triton("pairwise_sqdist", a, b):
        from ..kernels.pairwise_sqdist import pairwise_sqdist_fwd

        return pairwise_sqdist_fwd(a, b)
    return pairwise_sqdist_ref(a, b)


@_pairwise_sqdist_op.register_fake
def _(a, b):
    return a.new_empty((a.shape[0], b.shape[0]), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _backward(ctx, grad):
    # d/da |a_i - b_j|^2 = 2 (a_i - b_j): two matmuls, which torch already does at roofline.
    a, b = ctx.saved_tensors
    g = grad.float()
    grad_a = grad_b = None
    if ctx.needs_input_grad[0]:
        grad_a = (2.0 * (g.sum(1, keepdim=True) * a.float() - g @ b.float())).to(a.dtype)
    if ctx.needs_input_grad[1]:
        grad_b = (2.0 * (g.sum(0).unsqueeze(1) * b.float() - g.T @ a.float())).to(b.dtype)
    return grad_a, grad_b


_pairwise_sqdist_op.register_autograd(_backward, setup_context=_setup_context)


def pairwise_sqdist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances between every row of ``a`` and every row of ``b``.

    Args:
        a: ``(M, D)`` float32/float16/bfloat16.
        b: ``(N, D)``, same device; a different float dtype is promoted.

    Returns:
        ``(M, N)`` float32, ``out[i, j] = |a[i] - b[j]|^2`` (never negative).
        Differentiable in ``a`` and ``b``.

    This is the anchor x negative distance matrix of triplet mining, right for any inputs
    (the repeat-and-reshape construction it replaces is right only when D divides evenly).

    Example::

        >>> d = fastvq.pairwise_sqdist(torch.randn(5, 2), torch.randn(7, 2))
        >>> d.shape
        torch.Size([5, 7])
    """
    op = "pairwise_sqdist"
    check_tensor(op, "a", a, ndim=2)
    check_tensor(op, "b", b, ndim=2)
    check_float(op, "a", a)
    check_float(op, "b", b)
    check_same_device(op, a=a, b=b)
    check_last_dim(op, "a", a, "b", b)
    if a.dtype != b.dtype:
        dtype = torch.promote_types(a.dtype, b.dtype)
        a, b = a.to(dtype), b.to(dtype)
    return _pairwise_sqdist_op(a, b)
