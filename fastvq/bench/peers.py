"""What users run today, re-written in torch as the benchmark's peer providers.

Each is the seeds' code (``../shared/seeds``) or a peer library's formula as read, not
imported: the benchmark compares against it, and tests use ``vqpt_rotate_to`` as an oracle.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def seed_cdist_argmin(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Seed 001's nearest code: materialises the N x K distance matrix."""
    return torch.cdist(x.float(), c.float()).argmin(-1)


def seed_onehot_stats(x: torch.Tensor, idx: torch.Tensor, k: int):
    """Seed 001's EMAQuantizer statistics: a dense N x K one-hot matrix and its matmul."""
    enc = F.one_hot(idx, k).float()
    return enc.sum(0), enc.T @ x.float()


def seed_householder(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Seed 004's rotation: a Householder reflection with bmm and eps-guarded norms."""
    en, qn = e.norm(dim=-1, keepdim=True), q.norm(dim=-1, keepdim=True)
    e_hat, q_hat = (e / (en + 1e-6)).detach(), (q / (qn + 1e-6)).detach()
    r = ((e_hat + q_hat) / torch.norm(e_hat + q_hat, dim=1, keepdim=True)).detach()
    ee = e.unsqueeze(1)
    out = ee - 2 * torch.bmm(torch.bmm(ee, r.unsqueeze(-1)), r.unsqueeze(1)) + 2 * torch.bmm(
        torch.bmm(ee, e_hat.unsqueeze(-1)), q_hat.unsqueeze(1))
    return out.squeeze(1) * (qn / (en + 1e-6)).detach()


def vqpt_rotate_to(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """vector-quantize-pytorch's ``rotate_to`` as read (rotation trick, sec. 4.2), re-written:
    norms clamped at 1e-6, ``w = normalize(u + q^, eps=1e-6)`` detached, ``u`` and ``q^``
    detached in the last term, the scale ``|q| / |e|`` detached. Its *value* is ~q, not q."""
    D = src.shape[-1]
    s, t = src.reshape(-1, D), tgt.reshape(-1, D)
    ns, nt = s.norm(dim=-1, keepdim=True), t.norm(dim=-1, keepdim=True)
    u, qh = s / ns.clamp(min=1e-6), t / nt.clamp(min=1e-6)
    w = F.normalize(u + qh, p=2, dim=1, eps=1e-6).detach()
    rotated = s - 2 * (s * w).sum(-1, keepdim=True) * w + 2 * (s * u.detach()).sum(-1, keepdim=True) * qh.detach()
    out = rotated * (nt / ns.clamp(min=1e-6)).detach()
    return out.reshape(src.shape)


def seed_pairwise_kl_loss(pred: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Seed 000's training loss (its identity mask made on the inputs' device)."""
    eye = torch.eye(pred.size(0), device=pred.device) > 0
    p = pred.matmul(pred.transpose(0, 1))
    p = F.log_softmax(torch.where(eye, -1000 * torch.ones_like(p), p) / temperature, dim=1)
    t = target.matmul(target.transpose(0, 1))
    t = F.log_softmax(torch.where(eye, -1000 * torch.ones_like(t), t) / temperature, dim=1)
    return torch.nn.KLDivLoss(reduction="batchmean", log_target=True)(p, t)
