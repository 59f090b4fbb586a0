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
"""

from __future__ import annotations

import torch

from ._chunks import row_chunk


def _masked_sims(x32: torch.Tensor, s: int, e: int, inv_t: float) -> torch.Tensor:
    """Rows ``s:e`` of ``x x^T / T`` with the diagonal set to -inf (float32)."""
    sim = (x32[s:e] @ x32.T) * inv_t
    rows = torch.arange(e - s, device=x32.device)
    sim[rows, rows + s] = float("-inf")
    return sim


def pairwise_kl_loss_fwd_ref(pred: torch.Tensor, target: torch.Tensor, temperature: float):
    """``(B, Dp), (B, Dt), T -> (loss, lse_p, lse_t)``: a 0-d float32 loss and the per-row
    log-normalisers (``(B,)`` float32) the backward reuses. Not differentiable; no checks."""
    B = pred.shape[0]
    lse_p = torch.zeros(B, dtype=torch.float32, device=pred.device)
    lse_t = torch.zeros(B, dtype=torch.float32, device=pred.device)
    if B <= 1:
        return torch.zeros((), dtype=torch.float32, device=pred.device), lse_p, lse_t
    inv_t = 1.0 / float(temperature)
    p32, t32 = pred.detach().float(), target.detach().float()
    kl_sum = torch.zeros((), dtype=torch.float32, device=pred.device)
    step = row_chunk(B)
    for s in range(0, B, step):
        e = min(s + step, B)
        sp = _masked_sims(p32, s, e, inv_t)
        st = _masked_sims(t32, s, e, inv_t)
        lp, lt = torch.logsumexp(sp, 1), torch.logsumexp(st, 1)
        lse_p[s:e], lse_t[s:e] = lp, lt
        log_p, log_q = sp - lp[:, None], st - lt[:, None]
        q = log_q.exp()  # exactly 0 on the diagonal
        kl_row = torch.where(q == 0, 0.0, q * (log_q - log_p)).sum(1)  # NaN q stays NaN
        # a row whose logits overflowed float32 has a non-finite KL: it overflowed, +inf
        kl_sum += torch.where(kl_row.abs() < float("inf"), kl_row, float("inf")).sum()
    return kl_sum / B, lse_p, lse_t


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
    out = torch.zeros(p32.shape, dtype=torch.float32, device=pred.device)
    # |(G + G^T) @ pred| <= (B + 1) max|pred|: G scaled by 2^-k, 2^k > B + 1 (exact), so the float32
    # sums cannot overflow where the gradient does not
    k = (B + 1).bit_length()
    step = row_chunk(B)
    for s in range(0, B, step):
        e = min(s + step, B)
        sp = _masked_sims(p32, s, e, inv_t)
        st = _masked_sims(t32, s, e, inv_t)
        g = ((sp - lse_p[s:e, None]).exp() - (st - lse_t[s:e, None]).exp()) * 2.0**-k  # G[s:e], 0 on the diagonal
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
