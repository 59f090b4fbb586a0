"""Pure-torch reference of :func:`fastvq.rotation_trick` (Fifty et al. 2024, sec. 4.2).

Forward: the value is ``q`` exactly. Backward (to ``e`` only)::

    lambda = |q| / |e|,  e^ = e / |e|,  q^ = q / |q|,  w = (e^ + q^) / |e^ + q^|
    grad_e = lambda * (g - 2 (g.w) w + 2 (g.q^) e^)        # lambda R^T g, all factors constant

computed in float64 on rows scaled by their largest entry before any norm. Rows where the
rotation is degenerate fall back to the straight-through gradient ``g``:

    |e| < EPS_NORM or |q| < EPS_NORM             (no direction to rotate from / to)
    |e^ + q^| < EPS_ANTIPODAL                    (e points against q: any half-turn works)

and rows with a NaN or infinite entry in ``e`` or ``q`` get NaN (the rotation is undefined).
"""

from __future__ import annotations

import math

import torch

from ._chunks import row_chunk

EPS_NORM = 9.999999974752427e-07
"""Rows with ``|e|`` or ``|q|`` below this (absolute) take the plain straight-through gradient:
``float32(1e-6)``, so that the float32 kernel and this float64 reference compare against the
same number (a row at exactly ``float32(1e-6)`` rotates on both). The scale
vector-quantize-pytorch clamps its norms at, so on rows above it the two agree."""

EPS_ANTIPODAL = 1e-3
"""Rows with ``|e^ + q^|`` below this (``e`` within ~1e-3 rad of ``-q``) take the plain
straight-through gradient: there ``w`` is dominated by rounding error (float32 ``e^ + q^``
carries an absolute error of ~1e-7 * sqrt(D))."""


def rotation_trick_bwd_ref(e: torch.Tensor, q: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient to ``e`` of :func:`fastvq.rotation_trick`: ``(..., D)`` x3 -> ``(..., D)`` in ``e.dtype``.

    Computed in float64 on rows scaled by their largest entry (``x / max|x|``) before any norm,
    so no square overflows or underflows; ``lambda |g|`` is applied last. Rows with a NaN or
    infinite entry in ``e`` or ``q`` get NaN (the rotation is undefined there); a non-finite
    ``g`` passes through the straight-through rows as it is and makes a rotated row NaN.
    """
    D = e.shape[-1]
    N = e.numel() // D if D else math.prod(e.shape[:-1])
    out = torch.empty((N, D), dtype=e.dtype, device=e.device)
    if N == 0 or D == 0:
        return out.reshape(e.shape)
    e2, q2, g2 = e.reshape(N, D), q.reshape(N, D), grad.reshape(N, D)
    f64 = torch.float64
    step = row_chunk(4 * D)
    for s in range(0, N, step):
        ec, qc, gc = e2[s : s + step].to(f64), q2[s : s + step].to(f64), g2[s : s + step].to(f64)
        bad = ~(torch.isfinite(ec).all(-1, keepdim=True) & torch.isfinite(qc).all(-1, keepdim=True))
        me, mq, mg = (_safe_scale(x.abs().amax(-1, keepdim=True)) for x in (ec, qc, gc))
        e1, q1, g1 = ec / me, qc / mq, gc / mg
        a1, b1 = e1.norm(dim=-1, keepdim=True), q1.norm(dim=-1, keepdim=True)
        # the EPS_NORM test on the unscaled sums of squares (exact squares in float64, as the kernel
        # decides it), not on me * a1: rows within a rounding of the threshold take one branch on both
        eps2 = EPS_NORM * EPS_NORM
        ok = ((ec * ec).sum(-1, keepdim=True) >= eps2) & ((qc * qc).sum(-1, keepdim=True) >= eps2)
        one = torch.ones_like(a1)
        a1_, b1_ = torch.where(ok, a1, one), torch.where(ok, b1, one)
        eh, qh = e1 / a1_, q1 / b1_
        sv = eh + qh
        ns = sv.norm(dim=-1, keepdim=True)
        ok = ok & (ns >= EPS_ANTIPODAL)
        w = sv / torch.where(ok, ns, one)
        gw, gq = (g1 * w).sum(-1, keepdim=True), (g1 * qh).sum(-1, keepdim=True)
        rot = (g1 - 2.0 * gw * w + 2.0 * gq * eh) * ((mq / me) * (b1_ / a1_) * mg)
        rot = rot.masked_fill(~torch.isfinite(gc).all(-1, keepdim=True), float("nan"))
        res = torch.where(ok, rot, gc).masked_fill(bad, float("nan"))
        out[s : s + step] = res.to(e.dtype)
    return out.reshape(e.shape)


def _safe_scale(m: torch.Tensor) -> torch.Tensor:
    """``m`` where it is positive and finite, else 1 (rows of zeros, NaN or inf stay as they are)."""
    return torch.where((m > 0) & torch.isfinite(m), m, torch.ones_like(m))


class _RotationTrickRef(torch.autograd.Function):
    @staticmethod
    def forward(ctx, e, q):
        ctx.save_for_backward(e, q)
        return q.clone()

    @staticmethod
    def backward(ctx, grad):
        e, q = ctx.saved_tensors
        grad_e = rotation_trick_bwd_ref(e, q, grad) if ctx.needs_input_grad[0] else None
        return grad_e, None


def rotation_trick_ref(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`fastvq.rotation_trick`: ``e, q (..., D) -> (..., D)``.

    The value is ``q`` (in the promoted dtype of ``e`` and ``q``), bit for bit; the gradient
    to ``e`` is :func:`rotation_trick_bwd_ref`; ``q`` gets none.
    """
    dtype = torch.promote_types(e.dtype, q.dtype)
    return _RotationTrickRef.apply(e.to(dtype), q.detach().to(dtype))
