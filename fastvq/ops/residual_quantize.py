"""residual_quantize: greedy residual quantization over L codebooks, one kernel launch."""

from __future__ import annotations

import torch

from .._backend import use_triton
from .._checks import check_float, check_last_dim, check_same_device, check_tensor
from ..reference.residual_quantize import residual_quantize_ref


@torch.library.custom_op("fastvq::residual_quantize", mutates_args=())
def _residual_quantize_op(x: torch.Tensor, codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if use_triton("residual_quantize", x, codebooks):
        from ..kernels.residual_quantize import residual_quantize_fwd

        return residual_quantize_fwd(x, codebooks)
    return residual_quantize_ref(x, codebooks)


@_residual_quantize_op.register_fake
def _(x, codebooks):
    return x.new_empty(x.shape), x.new_empty((x.shape[0], codebooks.shape[0]), dtype=torch.int64)


def _setup_context(ctx, inputs, output):
    pass


def _backward(ctx, grad_quantized, grad_codes):
    # Straight-through: d quantized / d x is the identity, once. The codebooks get no gradient
    # here (they learn through a codebook loss on the gathered codes, or by EMA).
    return grad_quantized, None


_residual_quantize_op.register_autograd(_backward, setup_context=_setup_context)


def residual_quantize(x: torch.Tensor, codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy residual quantization of ``x`` with ``L`` codebooks, all levels in one kernel.

    Level ``l`` picks, for every row, the code of ``codebooks[l]`` nearest (squared L2) to the
    residual left by levels ``< l`` (``x`` itself at level 0); exact ties pick the smallest
    index. On the Triton path the residual stays on chip in float32 for all levels.

    Args:
        x: ``(..., D)`` float32/float16/bfloat16, any strides.
        codebooks: ``(L, K, D)`` with ``L >= 1`` levels of ``K >= 1`` codes, same device.
            A different float dtype is promoted for the search (e.g. bfloat16 ``x`` and float32
            codebooks search in float32).

    Returns:
        ``(quantized, codes)``:

        - ``quantized`` ``(..., D)``, dtype of ``x``: the sum of the chosen codes (accumulated
          in float32 in level order), with a straight-through gradient: the gradient reaching
          ``x`` is the upstream gradient of ``quantized``, exactly, once. The codebooks get
          **no** gradient through this op; train them with a codebook loss on the gathered codes
          (``codebooks[l][codes[..., l]]``) or by EMA (:func:`fastvq.code_statistics`).
        - ``codes`` ``(..., L)`` int64, not differentiable.

    Note on the gradient: the seed's ``MultiQuantizer`` (design doc 001, the RQ-VAE page) sums a
    straight-through output *per level*, ``sum_l (r_l + (q_l - r_l).detach())``, and since every
    ``r_l`` carries the identity gradient to ``x``, passes ``L`` times the upstream gradient to
    the encoder. That scaling is an accident of the construction; this op deliberately passes it
    once (``x + (quantized - x).detach()`` semantics, without the rounding of that expression).

    Precision: float32 codebooks are searched in exact float32 (IEEE dot). For bfloat16/float16
    codebooks the Triton kernel rounds the residual to the codebook dtype for the ``r.c`` dot
    (tensor cores, float32 accumulation), so near-ties may resolve differently than in float32;
    the residual, ``|c|^2`` and ``quantized`` stay float32. For ``D > 1024`` the kernel keeps the
    residual in a float32 ``(N, D)`` workspace instead of registers and streams D in chunks
    (same results, still one launch). Rows with NaN/inf give unspecified codes.

    Example::

        >>> x = torch.randn(8, 16, 32)
        >>> codebooks = torch.randn(4, 256, 32)          # 4 levels of 256 codes
        >>> quantized, codes = fastvq.residual_quantize(x, codebooks)
        >>> quantized.shape, codes.shape
        (torch.Size([8, 16, 32]), torch.Size([8, 16, 4]))
    """
    op = "residual_quantize"
    check_tensor(op, "x", x, min_ndim=1)
    check_tensor(op, "codebooks", codebooks, ndim=3)
    check_float(op, "x", x)
    check_float(op, "codebooks", codebooks)
    check_same_device(op, x=x, codebooks=codebooks)
    check_last_dim(op, "x", x, "codebooks", codebooks)
    L, K, D = codebooks.shape
    if L == 0 or K == 0 or D == 0:
        raise ValueError(
            f"fastvq.{op}: codebooks must have L >= 1 levels, K >= 1 codes and D >= 1 dims, "
            f"got shape {tuple(codebooks.shape)}"
        )
    lead = x.shape[:-1]
    dtype = torch.promote_types(x.dtype, codebooks.dtype)
    quantized, codes = _residual_quantize_op(x.reshape(-1, D).to(dtype), codebooks.to(dtype))
    return quantized.reshape(*lead, D).to(x.dtype), codes.reshape(*lead, L)
