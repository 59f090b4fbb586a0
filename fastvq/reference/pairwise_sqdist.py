import torch

from ._chunks import row_chunk
from .nearest_code import _mul_exp2, exp2i, max_abs, pow2_exponent

TRUST_SQNORM = 2.0**125  # the expansion is used only where |a|^2 and |b|^2 are below this


def pairwise_sqdist_ref(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Reference for :func:`fastvq.pairwise_sqdist`: ``(M, D), (N, D) -> (M, N)`` float32.

    Computed in float32 as ``|a|^2 + |b|^2 - 2 a.b`` clamped at 0 (NaN kept), in row chunks of
    ``a``; where ``|a|^2`` or ``|b|^2`` is not finite or not below 2^125 the distance is computed
    directly, ``sum_d (a_d - b_d)^2`` (NaN for NaN and inf - inf, +inf where it overflows).
    (The kernel recomputes whole 64 x 64 tiles that hold such a row, so its other elements
    there may differ from this by float32 rounding.)
    """
    a32, b32 = a.float(), b.float()
    bb = (b32 * b32).sum(-1)
    b_bad = ~(bb < TRUST_SQNORM)
    out = torch.empty((a.shape[0], b.shape[0]), dtype=torch.float32, device=a.device)
    step = row_chunk(b.shape[0])
    for s in range(0, a.shape[0], step):
        ac = a32[s : s + step]
        aa = (ac * ac).sum(-1, keepdim=True)
        d = aa + bb - 2.0 * (ac @ b32.T)
        d = torch.where(d.isnan(), d, d.clamp_min(0.0))
        a_bad = ~(aa[:, 0] < TRUST_SQNORM)
        # Eagerly the reference reads two flags on the host; traced by torch.compile (only the
        # benchmark's "compiled" provider does that) it keeps the expansion everywhere.
        if not torch.compiler.is_compiling() and (bool(a_bad.any()) or bool(b_bad.any())):
            rows, cols = a_bad.nonzero().squeeze(1), b_bad.nonzero().squeeze(1)
            if rows.numel():
                d[rows] = ((ac[rows, None, :] - b32[None, :, :]) ** 2).sum(-1)
            if cols.numel():
                d[:, cols] = ((ac[:, None, :] - b32[None, cols, :]) ** 2).sum(-1)
        out[s : s + step] = d
    return out


def pairwise_sqdist_bwd(a: torch.Tensor, b: torch.Tensor, grad: torch.Tensor, need_a: bool = True,
                        need_b: bool = True) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Gradients of ``pairwise_sqdist(a, b)`` for the upstream ``grad`` (M, N): ``grad_a =
    2 (rowsum(g) a - g @ b)`` and ``grad_b = 2 (colsum(g) b - g.T @ a)``, in the inputs' dtypes
    (both backends use it: two matmuls, which torch already does at roofline).

    Computed at a safe scale (:func:`_scaled_grad`), so the products and sums stay below
    float32's limit whatever the magnitudes (unscaled, ``rowsum(g) a`` and ``g @ b`` each
    overflowed and inf - inf gave NaN where the gradient is ~5e37): +-inf only where the gradient
    itself overflows."""
    g = grad.float()
    grad_a = _scaled_grad(a, b, g).to(a.dtype) if need_a else None
    grad_b = _scaled_grad(b, a, g.T).to(b.dtype) if need_b else None
    return grad_a, grad_b


def _scaled_grad(x: torch.Tensor, y: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``2 (rowsum(g) x - g @ y)`` (float32) with power-of-two scales: ``g`` by one per row
    (``e_r``), ``y`` by one per feature column (``e_d``, its largest |entry|), and each entry of
    the result in the unit ``2^f``, ``f = max(e_d, exponent of |x_id|)``: ``rowsum(g') (x 2^-f) -
    (g' @ y') 2^(e_d - f)`` has every term below ``4 N``; it is scaled back by ``2^(1 + e_r + f)``
    in two exact halves. Power-of-two scaling is exact: where nothing underflows this is the
    unscaled computation's result; what underflows (a term below 2^-149 of the entry's unit) is
    below the rounding of the sum."""
    x32, y32 = x.float(), y.float()
    e_r = pow2_exponent(max_abs(g))  # (M,)
    g_s = g * exp2i(-e_r)[:, None]
    e_d = pow2_exponent(max_abs(y32.T))  # (D,)
    gy = g_s @ (y32 * exp2i(-e_d))  # (M, D), |.| <= 2 sum_j |g'_ij|
    f = torch.maximum(e_d[None, :], pow2_exponent(x32.abs()))  # NaN's exponent (255 - 127, clamped) is harmless
    t = g_s.sum(1, keepdim=True) * _mul_exp2(x32, -f) - _mul_exp2(gy, e_d[None, :] - f)
    return _mul_exp2(t, 1 + e_r[:, None] + f)
