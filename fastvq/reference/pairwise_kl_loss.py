"""Pure-torch reference for :func:`fastvq.pairwise_kl_loss`, in row chunks.

Notation (the kernels use the same): for rows ``i != j`` of a batch of ``B``,
``s_ij = pred_i . pred_j / T`` and ``t_ij = target_i . target_j / T``. Row ``i`` takes a
softmax over ``j != i`` (its own diagonal excluded exactly), giving ``p_ij`` and ``q_ij`` with
log-normalisers ``lse_p[i]`` and ``lse_t[i]``, and

    loss = (1 / B) * sum_i sum_{j != i} q_ij * (log q_ij - log p_ij)

which is ``KL(target || pred)`` averaged over rows (``nn.KLDivLoss(reduction="batchmean",
log_target=True)``). A batch with ``B <= 1`` has no off-diagonal pair: its loss is 0. A row
whose logits overflow float32 contributes +inf (the op turns the loss NaN for NaN/inf inputs).

The gradient is ``dL/dpred = (H @ pred) / (B * T)`` with ``H = G + G^T`` and
``G_ij = p_ij - q_ij`` off the diagonal, 0 on it. Only ``(chunk, B)`` blocks are ever held.

Scaling (the kernels do the same): a dot product ``x_i . x_j`` can overflow float32 where the
logit ``x_i . x_j / T`` does not (``T > 1``), and rows of very different magnitudes lose their
small products to underflow. So each row is scaled by its own power of two first,
``u_i = x_i 2^-e_i`` (``|u_i| < 1``; ``e_i`` clamped so that the factors below stay normal),
and the logit is ``(u_i . u_j) * R_i * C_j`` with ``R_i = m 2^(e_i + fa)``, ``C_j = 2^(e_j + fb)``
and ``1 / T = m 2^(fa + fb)``: exact powers of two, so the logit is rounded once, and
``R_i C_j`` is a normal float32 at every magnitude. The KL terms
``q_ij ((t_ij - lse_t) - (s_ij - lse_p))`` are formed at half scale (each bracket can reach
``-2 * float32max`` where the logits are representable) and the rows' KLs are divided by B
before they are summed, so a representable loss is never +inf.

Each row's KL is >= 0 in exact arithmetic, so a row whose computed KL rounds below 0 (its
exact KL is then within its rounding bound of 0: -4e-8 at T = 1000) counts as 0, and the loss is
never negative (NaN stays NaN). The clamp corrects the value, not the function: the gradient
stays that of the KL, ``G = P - Q``. The exact KL is smooth there and its slope is what training
follows; the gradient of ``max(KL, 0)`` would be 0 exactly where the rounding happened to fall
below 0, stopping the row at random, and the clamp would then decide a gradient that the exact
loss does not have.
"""

from __future__ import annotations

import math

import torch

from ._chunks import row_chunk


def logit_scaling(temperature: float):
    """``(m, fa, fb, lo, hi)``: ``1 / T = m 2^(fa + fb)`` (``m`` in [0.5, 1), ``fb - fa`` in {0, 1})
    and the clamp ``[lo, hi]`` of the row exponents that keeps ``2^(e + fa)``, ``2^(e + fb)`` in
    ``[2^-62, 2^62]`` (so ``R_i C_j`` is normal) and ``2^-e`` a normal float32."""
    m, f = math.frexp(1.0 / float(temperature))
    fa = f // 2
    fb = f - fa
    return m, fa, fb, max(-126, -62 - fa), min(126, 62 - fb)


def row_max(x: torch.Tensor) -> torch.Tensor:
    """``max_d |x_id|`` per row, float32 (0 for D = 0; NaN for a row with a NaN, inf for one with
    an inf): one read of ``x``. The op computes it once, for its finiteness check and the scaling."""
    if x.shape[1] == 0:  # D = 0: every logit is 0
        return torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    return torch.linalg.vector_norm(x, float("inf"), dim=1, dtype=torch.float32)


def row_exponents(amax: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """int32 ``e_i`` with ``amax_i < 2^e_i`` (``>= 2^(e_i - 1)``), clamped to ``[lo, hi]`` (0 for
    a zero row; anything in range for a row that is not finite)."""
    return torch.frexp(amax).exponent.clamp(lo, hi).to(torch.int32)


def _scaled(x32: torch.Tensor, amax: torch.Tensor, temperature: float):
    """``(u, R, C)`` for the rows of ``x32`` (float32; ``amax``: their :func:`row_max`):
    ``x_i . x_j / T = (u_i . u_j) R_i C_j``."""
    m, fa, fb, lo, hi = logit_scaling(temperature)
    e = row_exponents(amax, lo, hi)
    one = torch.ones(e.shape, dtype=torch.float32, device=x32.device)
    u = x32 * torch.ldexp(one, -e)[:, None]
    return u, torch.ldexp(one, e + fa) * m, torch.ldexp(one, e + fb)


def _masked_sims(scaled, s: int, e: int) -> torch.Tensor:
    """Rows ``s:e`` of ``x x^T / T`` with the diagonal set to -inf (float32), from :func:`_scaled`."""
    u, r, c = scaled
    sim = (u[s:e] @ u.T) * (r[s:e, None] * c[None, :])
    rows = torch.arange(e - s, device=u.device)
    sim[rows, rows + s] = float("-inf")
    return sim


def _normalisers(sim: torch.Tensor) -> torch.Tensor:
    """``(2, rows)``: each row's largest entry ``m`` and ``log sum exp(sim - m)`` (-inf rows: m -inf)."""
    m = sim.amax(1)
    m_safe = torch.where(m == float("-inf"), 0.0, m)
    return torch.stack((m, (sim - m_safe[:, None]).exp().sum(1).log()))


def _probs(sim: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``exp((sim - m) - log l)`` for the normalisers ``norm = (m, log l)`` of the rows."""
    return ((sim - norm[0, :, None]) - norm[1, :, None]).exp()


def pairwise_kl_loss_fwd_ref(pred: torch.Tensor, target: torch.Tensor, temperature: float,
                             amax_p: torch.Tensor | None = None, amax_t: torch.Tensor | None = None):
    """``(B, Dp), (B, Dt), T -> (loss, lse_p, lse_t)``: a 0-d float32 loss and the per-row
    log-normalisers the backward reuses, in two parts, and the rows' :func:`row_max` (``(3, B)``
    float32: the row's largest logit ``m``, ``log sum_j exp(s_ij - m)`` (at logits ~1e38
    ``m + log(...)`` would round it away), and ``max |x_i|``, which the backward's scaling reuses).
    ``amax_p``/``amax_t``: the rows' :func:`row_max`, if the caller has them. Not differentiable;
    no checks."""
    B = pred.shape[0]
    lse_p = torch.zeros(3, B, dtype=torch.float32, device=pred.device)
    lse_t = torch.zeros(3, B, dtype=torch.float32, device=pred.device)
    lse_p[2] = row_max(pred.detach()) if amax_p is None else amax_p
    lse_t[2] = row_max(target.detach()) if amax_t is None else amax_t
    if B <= 1:
        return torch.zeros((), dtype=torch.float32, device=pred.device), lse_p, lse_t
    sp_all = _scaled(pred.detach().float(), lse_p[2], temperature)
    st_all = _scaled(target.detach().float(), lse_t[2], temperature)
    kl_sum = torch.zeros((), dtype=torch.float32, device=pred.device)
    step = row_chunk(B)
    for s in range(0, B, step):
        e = min(s + step, B)
        sp = _masked_sims(sp_all, s, e)
        st = _masked_sims(st_all, s, e)
        lse_p[:2, s:e], lse_t[:2, s:e] = _normalisers(sp), _normalisers(st)
        q = _probs(st, lse_t[:, s:e])  # exactly 0 on the diagonal
        # log q - log p at half scale: each bracket lies in [-float32max, 0] where the logits are
        # representable, so their difference cannot overflow (at full scale it can)
        mp, lp = lse_p[0, s:e, None] * 0.5, lse_p[1, s:e, None] * 0.5
        mt, lt = lse_t[0, s:e, None] * 0.5, lse_t[1, s:e, None] * 0.5
        half = ((st * 0.5 - mt) - lt) - ((sp * 0.5 - mp) - lp)
        kl_row = torch.where(q == 0, 0.0, q * half).sum(1) * 2.0  # NaN q stays NaN; 0 weight is 0
        # a row whose logits overflowed float32 has a non-finite KL: it overflowed, +inf
        kl_row = torch.where(kl_row.abs() < float("inf"), kl_row, float("inf"))
        # a KL is >= 0 exactly: a row whose exact KL is ~0 can round slightly negative; 0 then
        # (NaN stays NaN). The value only: see the module docstring on the gradient at the clamp
        kl_row = torch.where(kl_row < 0, 0.0, kl_row)
        kl_sum += (kl_row / B).sum()  # divided first: B rows of ~float32max / B stay finite
    return kl_sum, lse_p, lse_t


def pairwise_kl_loss_bwd_ref(
    grad: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    lse_p: torch.Tensor,
    lse_t: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Gradient of the loss in ``pred`` (``(B, Dp)``, pred's dtype), given the upstream 0-d
    ``grad`` and the forward's ``lse_p``/``lse_t``."""
    B = pred.shape[0]
    if B <= 1:
        return torch.zeros_like(pred)
    inv_t = 1.0 / float(temperature)
    p32, t32 = pred.detach().float(), target.detach().float()
    sp_all, st_all = _scaled(p32, lse_p[2], temperature), _scaled(t32, lse_t[2], temperature)
    out = torch.zeros(p32.shape, dtype=torch.float32, device=pred.device)
    # |(G + G^T) @ pred| <= (B + 1) max|pred|: G scaled by 2^-k, 2^k > B + 1 (exact), so the float32
    # sums cannot overflow where the gradient does not
    k = (B + 1).bit_length()
    step = row_chunk(B)
    for s in range(0, B, step):
        e = min(s + step, B)
        sp = _masked_sims(sp_all, s, e)
        st = _masked_sims(st_all, s, e)
        g = (_probs(sp, lse_p[:, s:e]) - _probs(st, lse_t[:, s:e])) * 2.0**-k  # G[s:e], 0 on the diagonal
        out[s:e] += g @ p32  # G @ pred
        out += g.T @ p32[s:e]  # G^T @ pred
    return (out * (grad.float() * inv_t / B / 2.0**-k)).to(pred.dtype)


def pairwise_kl_loss_ref(pred: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Reference for :func:`fastvq.pairwise_kl_loss`: a 0-d float32 loss, differentiable in
    ``pred`` through a chunked forward and :func:`pairwise_kl_loss_bwd_ref`."""
    return _RefLoss.apply(pred, target, float(temperature))


class _RefLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, temperature):
        loss, lse_p, lse_t = pairwise_kl_loss_fwd_ref(pred, target, temperature)
        ctx.save_for_backward(pred, target, lse_p, lse_t)
        ctx.temperature = temperature
        return loss

    @staticmethod
    def backward(ctx, grad):
        pred, target, lse_p, lse_t = ctx.saved_tensors
        return pairwise_kl_loss_bwd_ref(grad, pred, target, lse_p, lse_t, ctx.temperature), None, None
