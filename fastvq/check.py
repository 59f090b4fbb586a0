"""`python -m fastvq check`: every op's Triton kernels against float64, here, with fastvq.testing's bounds.

On a CUDA machine the kernels run compiled on the GPU; without one they run under the Triton
interpreter on small shapes. Each check computes the op with the Triton backend, the same
computation in float64 on the same (rounded) inputs, and the worst ratio of error to the
rounding bound of :mod:`fastvq.testing` (unit roundoff, reduction length, sum of ``|terms|``):
a row PASSes at a ratio <= 1. Nearest-code choices are judged row by row (a code is right when
its distance is within the rounding bound of the true minimum), gradients must also be
non-degenerate, and exact results (indices, counts, semantic ids, rotation-trick forward) must
match exactly (ratio 0, else inf). Prints a table and returns non-zero if any check fails. This is
how a user validates fastvq on their GPU.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

import fastvq
import fastvq.testing as ft


def _triton(fn: Callable[[], object]):
    with fastvq.backend("triton"):
        return fn()


def _exact(ok) -> float:
    return 0.0 if bool(ok) else math.inf


def _randn(*shape, device, dtype, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def check_nearest_code(device, dtype):
    worst = 0.0
    for metric in ("l2", "cosine", "dot"):
        x, cb = _randn(3, 67, 60, device=device, dtype=dtype), _randn(133, 60, device=device, dtype=dtype)
        idx, dist = _triton(lambda: fastvq.nearest_code(x, cb, metric=metric))
        worst = max(worst, _exact(((idx >= 0) & (idx < 133)).all()))
        ratio, *_ = ft.argmin_ratio(x.reshape(-1, 60), cb, idx.reshape(-1), metric)
        d, mag, n = ft.distances64(x.reshape(-1, 60), cb, metric)
        pick = idx.reshape(-1, 1).clamp(0, 132)
        # the reported distance is float32 (l2 adds the row's |x|^2 back: one more rounding)
        err = ft.error_ratio(dist.reshape(-1), d.gather(1, pick).squeeze(1), dtype=dtype, reduce_len=n + 1,
                             magnitude=mag.gather(1, pick).squeeze(1), out_dtype=torch.float32)
        worst = max(worst, float(ratio.max()), err)
    return worst


def check_pairwise_sqdist(device, dtype):
    a, b = _randn(70, 33, device=device, dtype=dtype), _randn(45, 33, device=device, dtype=dtype)
    out = _triton(lambda: fastvq.pairwise_sqdist(a, b))
    a64, b64 = a.double(), b.double()
    exact = (a64 * a64).sum(1, keepdim=True) - 2 * a64 @ b64.T + (b64 * b64).sum(1)
    mag = (a64 * a64).sum(1, keepdim=True) + 2 * a64.abs() @ b64.abs().T + (b64 * b64).sum(1)
    return ft.error_ratio(out, exact.clamp_min(0), dtype=dtype, reduce_len=33 + 2, magnitude=mag, out_dtype=out.dtype)


def check_mine_negatives(device, dtype):
    a, p = _randn(50, 24, device=device, dtype=dtype), _randn(50, 24, device=device, dtype=dtype)
    n = _randn(301, 24, device=device, dtype=dtype)
    worst = 0.0
    d, mag, nn = ft.distances64(a, n, "l2")
    for strategy in ("hardest", "semi-hard"):
        idx, dist = _triton(lambda: fastvq.mine_negatives(a, p, n, strategy=strategy))
        worst = max(worst, _exact(((idx >= 0) & (idx < 301)).all()))
        pick = idx.reshape(-1, 1).clamp(0, 300)
        worst = max(worst, ft.error_ratio(dist, d.gather(1, pick).squeeze(1), dtype=dtype, reduce_len=nn + 1,
                                          magnitude=mag.gather(1, pick).squeeze(1), out_dtype=torch.float32))
        if strategy == "hardest":
            worst = max(worst, float(ft.argmin_ratio(a, n, idx, "l2")[0].max()))
    return worst


def check_residual_quantize(device, dtype):
    x = _randn(97, 40, device=device, dtype=dtype)
    cbs = _randn(3, 37, 40, device=device, dtype=dtype, scale=0.5)
    q, codes = _triton(lambda: fastvq.residual_quantize(x, cbs))
    worst, r, total = 0.0, x.float(), torch.zeros_like(x, dtype=torch.float32)
    for lvl in range(3):  # each level: a nearest code to the residual the kernel searched with
        idx = codes[:, lvl]
        worst = max(worst, _exact(((idx >= 0) & (idx < 37)).all()))
        worst = max(worst, float(ft.argmin_ratio(r.to(dtype), cbs[lvl], idx.clamp(0, 36), "l2")[0].max()))
        r = r - cbs[lvl].float()[idx.clamp(0, 36)]
        total = total + cbs[lvl].float()[idx.clamp(0, 36)]
    return max(worst, _exact(torch.equal(q, total.to(dtype))))  # the float32 sum of the codes, one rounding


def check_code_statistics(device, dtype):
    x = _randn(500, 24, device=device, dtype=dtype)
    idx = torch.randint(0, 37, (500,), device=device)
    counts64 = torch.zeros(37, dtype=torch.float64, device=device).index_add_(0, idx, torch.ones(500, dtype=torch.float64, device=device))
    sums64 = torch.zeros(37, 24, dtype=torch.float64, device=device).index_add_(0, idx, x.double())
    mag = torch.zeros(37, 24, dtype=torch.float64, device=device).index_add_(0, idx, x.double().abs())
    worst = 0.0
    for det in (True, False):
        counts, sums = _triton(lambda: fastvq.code_statistics(x, idx, 37, deterministic=det))
        worst = max(worst, _exact(torch.equal(counts.double(), counts64)),
                    ft.error_ratio(sums, sums64, dtype=dtype, reduce_len=int(counts64.max()), magnitude=mag,
                                   out_dtype=sums.dtype))
    return worst


def check_code_usage(device, dtype):
    idx = torch.randint(0, 50, (1000,), device=device)
    u = _triton(lambda: fastvq.code_usage(idx, 50))
    counts = torch.bincount(idx, minlength=50).double()
    p = counts / counts.sum()
    terms = p * torch.log(p + 1e-10)
    entropy = -terms.sum()
    # entropy: 50 float32 terms (a log each); perplexity = exp(entropy): its relative error is the
    # entropy's absolute error
    mag = terms.abs().sum() + 1.0
    return max(_exact(torch.equal(u.counts.double(), counts)),
               ft.error_ratio(u.entropy, entropy, dtype=torch.float32, reduce_len=50 + 8, magnitude=mag),
               ft.error_ratio(u.perplexity, entropy.exp(), dtype=torch.float32, reduce_len=50 + 8,
                              magnitude=mag * entropy.exp()))


def check_semantic_ids(device, dtype):
    codes = torch.randint(0, 3, (400, 3), device=device)
    got = _triton(lambda: fastvq.semantic_ids(codes))
    with fastvq.backend("reference"):
        want = fastvq.semantic_ids(codes)
    return _exact(torch.equal(got, want))


def check_rotation_trick(device, dtype):
    e = _randn(90, 33, device=device, dtype=dtype).requires_grad_()
    q, g = _randn(90, 33, device=device, dtype=dtype), _randn(90, 33, device=device, dtype=dtype)

    def run():
        out = fastvq.rotation_trick(e, q)
        out.backward(g)
        return out.detach(), e.grad.clone()

    out, grad = _triton(run)
    e64, q64, g64 = e.detach().double(), q.double(), g.double()
    a, b = e64.norm(dim=-1, keepdim=True), q64.norm(dim=-1, keepdim=True)
    eh, qh = e64 / a, q64 / b
    w = (eh + qh) / (eh + qh).norm(dim=-1, keepdim=True)
    exact = (b / a) * (g64 - 2 * (g64 * w).sum(-1, keepdim=True) * w + 2 * (g64 * qh).sum(-1, keepdim=True) * eh)
    cond = 1 + 1 / (eh + qh).norm(dim=-1, keepdim=True)  # w = s/|s| amplifies rounding near the antipode
    n = 4 * 33 + 8  # chained length-D reductions: |e|, |q|, |e^ + q^|, g.w, g.q^
    elem = ft.error_ratio(grad, exact, dtype=dtype, reduce_len=n, magnitude=(b / a) * g64.norm(dim=-1, keepdim=True) * cond)
    nondeg = ft.grad_ratio(grad, exact, dtype=dtype, reduce_len=n, condition=2 * float(cond.max()))["ratio"]
    return max(_exact(torch.equal(out, q)), elem, nondeg)


def check_qr_lookup(device, dtype):
    from fastvq.reference.qr_lookup import qr_indices, qr_lookup_ref

    ids = torch.randint(-(2**40), 2**40, (300,), device=device)
    qw, rw = _randn(17, 16, device=device, dtype=dtype), _randn(19, 16, device=device, dtype=dtype)
    g = _randn(300, 16, device=device, dtype=dtype)
    qi, ri = qr_indices(ids, 17, 19)
    n = int(max(torch.bincount(qi).max(), torch.bincount(ri).max())) + 2
    worst = 0.0

    def grads(fn, a, b, gg):
        a, b = a.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
        out = fn(a, b)
        out.backward(gg)
        return out.detach(), a.grad, b.grad

    for op in ("add", "mult", "concat"):
        gg = torch.cat([g, g], -1) if op == "concat" else g
        got = _triton(lambda: grads(lambda a, b: fastvq.qr_lookup(ids, a, b, op=op), qw, rw, gg))
        ref = lambda a, b: qr_lookup_ref(ids, a, b, op)  # noqa: E731
        exact = grads(ref, qw.double(), rw.double(), gg.double())
        mag = grads(ref, qw.double().abs(), rw.double().abs(), gg.double().abs())
        for t, e, m in zip(got, exact, mag):
            worst = max(worst, ft.error_ratio(t, e, dtype=dtype, reduce_len=n, magnitude=m))
    return worst


def check_pairwise_kl_loss(device, dtype):
    B, T = 77, 0.2
    pred = F.normalize(torch.randn(B, 24, device=device), dim=1).to(dtype).requires_grad_()
    target = F.normalize(torch.randn(B, 16, device=device), dim=1).to(dtype)

    def run():
        loss = fastvq.pairwise_kl_loss(pred, target, T)
        loss.backward()
        return loss.detach(), pred.grad.clone()

    loss, grad = _triton(run)
    p64 = pred.detach().double().requires_grad_()
    t64 = target.double()
    eye = torch.eye(B, dtype=torch.bool, device=device)
    log_p = (p64 @ p64.T / T).masked_fill(eye, float("-inf")).log_softmax(1)
    log_q = (t64 @ t64.T / T).masked_fill(eye, float("-inf")).log_softmax(1)
    kl = torch.where(eye, 0.0, log_q.exp() * (log_q - log_p)).sum() / B
    (exact_grad,) = torch.autograd.grad(kl, p64)
    P, Q = log_p.detach().exp().masked_fill(eye, 0.0), log_q.exp().masked_fill(eye, 0.0)
    # each log-ratio carries two dot products' errors (|x_i||x_j| / T each, directly and through the
    # row's log-sum-exp) and two log-sum-exps over B positive terms; the loss sums B^2 weighted terms
    dots = 2 * (p64.detach().norm(dim=1).max() ** 2 + t64.norm(dim=1).max() ** 2) / T
    terms = torch.where(eye, 0.0, Q * (log_q - log_p.detach()).abs()).sum() / B
    G = ((P + Q) + (P + Q).T) @ p64.detach().abs() / (B * T)
    loss_r = ft.error_ratio(loss, kl.detach(), dtype=torch.float32, reduce_len=[24, B, 2 * B + 8],
                            magnitude=[dots, 2.0, terms])
    grad_r = ft.error_ratio(grad, exact_grad, dtype=dtype, reduce_len=[24, B, B + 8], magnitude=[G * dots, 2 * G, G])
    return max(loss_r, grad_r, ft.grad_ratio(grad, exact_grad, dtype=dtype, reduce_len=B + 24 + 8,
                                             condition=float(dots) + 2)["ratio"])


CHECKS = {
    "nearest_code": check_nearest_code,
    "pairwise_sqdist": check_pairwise_sqdist,
    "mine_negatives": check_mine_negatives,
    "residual_quantize": check_residual_quantize,
    "code_statistics": check_code_statistics,
    "code_usage": check_code_usage,
    "semantic_ids": check_semantic_ids,
    "rotation_trick": check_rotation_trick,
    "qr_lookup": check_qr_lookup,
    "pairwise_kl_loss": check_pairwise_kl_loss,
}


def run_check(ops=None, dtypes=None) -> int:
    """Run every check; print a table; return 0 if all pass, 1 otherwise.

    ``ops``: names from :data:`CHECKS` (default all); ``dtypes``: torch dtypes (default float32,
    bfloat16, float16). A check that raises is a FAIL with its reason.
    """
    unknown = [o for o in (ops or ()) if o not in CHECKS]
    if unknown:
        raise ValueError(f"unknown op(s) {', '.join(map(repr, unknown))}; valid names: {', '.join(CHECKS)}")
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if dtypes is None:
        dtypes = [torch.float32, torch.bfloat16, torch.float16]
    where = torch.cuda.get_device_name() if cuda else "CPU, Triton interpreter"
    print(f"fastvq check: Triton kernels vs float64 on {where}; PASS when error / rounding bound <= 1")
    print(ft.describe() + "\n")
    print(f"{'op':20} {'dtype':9} {'result':6} {'err/bound':>10} {'s':>6}")
    failed = 0
    for name, fn in CHECKS.items():
        if ops and name not in ops:
            continue
        for dtype in dtypes:
            torch.manual_seed(0)
            t0 = time.perf_counter()
            try:
                ratio = float(fn(device, dtype))
                ok = ratio <= 1.0
                shown = f"{ratio:10.3g}"
            except Exception as exc:  # noqa: BLE001  (a crash is a FAIL with its reason)
                ok, shown = False, f"{type(exc).__name__}: {exc}"[:80]
            failed += not ok
            print(f"{name:20} {str(dtype).replace('torch.', ''):9} {'PASS' if ok else 'FAIL':6} {shown:>10} "
                  f"{time.perf_counter() - t0:6.1f}", flush=True)
    print(f"\n{'all checks passed' if not failed else f'{failed} check(s) FAILED'}")
    return 1 if failed else 0
