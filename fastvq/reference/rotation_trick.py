"""Pure-torch reference of :func:`fastvq.rotation_trick` (Fifty et al. 2024, sec. 4.2).

Forward: the value is ``q`` exactly. Backward (to ``e`` only)::

    lambda = |q| / |e|,  e^ = e / |e|,  q^ = q / |q|,  w = (e^ + q^) / |e^ + q^|
    grad_e = lambda * (g - 2 (g.w) w + 2 (g.q^) e^)        # lambda R^T g, all factors constant

computed in float32 (float64 for float64 inputs). Rows where the rotation is undefined fall
back to the straight-through gradient ``g``:

    |e| < EPS_NORM or |q| < EPS_NORM             (no direction to rotate from / to)
    |e^ + q^| < EPS_ANTIPODAL                    (e points against q: any half-turn works)
"""

from __future__ import annotations

import torch

from ._chunks import row_chunk

EPS_NORM = 1e-6
"""Rows with ``|e|`` or ``|q|`` below this (absolute, in the math dtype) take the plain
straight-through gradient. The same scale vector-quantize-pytorch clamps its norms at, so on
rows above it the two agree."""

EPS_ANTIPODAL = 1e-3
"""Rows with ``|e^ + q^|`` below this (``e`` within ~1e-3 rad of ``-q``) take the plain
straight-through gradient: there ``w`` is dominated by rounding error (float32 ``e^ + q^``
carries an absolute error of ~1e-7 * sqrt(D))."""


def _math_dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def rotation_trick_bwd_ref(e: torch.Tensor, q: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient to ``e`` of :func:`fastvq.rotation_trick`: ``(N, D)`` x3 -> ``(N, D)`` in ``e.dtype``."""
    D = e.shape[-1]
    e2, q2, g2 = e.reshape(-1, D), q.reshape(-1, D), grad.reshape(-1, D)
    mdt = _math_dtype(e, q, grad)
    out = torch.empty(e2.shape, dtype=e.dtype, device=e.device)
    step = row_chunk(4 * max(D, 1))
    for s in range(0, e2.shape[0], step):
        ec, qc, gc = e2[s : s + step].to(mdt), q2[s : s + step].to(mdt), g2[s : s + step].to(mdt)
        a = ec.square().sum(-1, keepdim=True).sqrt()
        b = qc.square().sum(-1, keepdim=True).sqrt()
        ok = (a >= EPS_NORM) & (b >= EPS_NORM)
        one = torch.ones_like(a)
        a_, b_ = torch.where(ok, a, one), torch.where(ok, b, one)
        eh, qh = ec / a_, qc / b_
        sv = eh + qh
        ns = sv.square().sum(-1, keepdim=True).sqrt()
        ok = ok & (ns >= EPS_ANTIPODAL)
        w = sv / torch.where(ok, ns, one)
        gw = (gc * w).sum(-1, keepdim=True)
        gq = (gc * qh).sum(-1, keepdim=True)
        rot = (b_ / a_) * (gc - 2.0 * gw * w + 2.0 * gq * eh)
        out[s : s + step] = torch.where(ok, rot, gc).to(e.dtype)
    return out.reshape(e.shape)


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
