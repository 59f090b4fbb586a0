"""`python -m fastvq check`: every op's Triton kernels against float64, here, with fastvq.testing's bounds.

On a CUDA machine the kernels run compiled on the GPU; without one they run under the Triton
interpreter on small shapes. Each check computes the op with the Triton backend, the same
computation in float64 on the same (rounded) inputs, and the worst ratio of error to the
rounding bound of :mod:`fastvq.testing` (unit roundoff, reduction length, sum of ``|terms|``):
a row PASSes at a ratio <= 1. Nearest-code choices are judged row by row (a code is right when
its distance is within the rounding bound of the true minimum; a top-k list rank by rank; a
sampled code against the kernel's documented Gumbel noise), gradients must also be
non-degenerate, and exact results (indices, counts, semantic ids, rotation-trick forward) must
match exactly (ratio 0, else inf). Every launcher in ``fastvq.kernels`` runs at least once
(tests/test_cli.py holds that). Prints a table and returns non-zero if any check fails. This is
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
from ._checks import UsageError


def _triton(fn: Callable[[], object]):
    with fastvq.backend("triton"):
        return fn()


def _exact(ok) -> float:
    return 0.0 if bool(ok) else math.inf


def _randn(*shape, device, dtype, scale=1.0):
    return (torch.randn(*shape, device=device) * scale).to(dtype)


def _ranked_ratio(key, bound, idx):
    """Per row and rank, ``(N, k)``: the ratio of :func:`fastvq.testing.argmin_ratio` for the code
    chosen at rank ``j`` among the codes not chosen at ranks ``< j``. ``key (N, K)`` float64 is the
    exact quantity the kernel minimises, ``bound (N, K)`` the rounding bound of its float32 value:
    a choice is consistent with rounding iff ``key_j - bound_j <= min_k (key_k + bound_k)`` over the
    codes still open. An index outside ``[0, K)`` or repeated within its row gets ``inf``."""
    N, K = key.shape
    safe = idx.clamp(0, K - 1)
    taken = torch.zeros_like(key, dtype=torch.bool)
    out = []
    for j in range(idx.shape[1]):
        open_key = torch.where(taken, math.inf, key)
        lo = open_key.min(1).values
        upper = torch.where(taken, math.inf, key + bound).min(1).values
        pick = safe[:, j : j + 1]
        kj, bj = key.gather(1, pick).squeeze(1), bound.gather(1, pick).squeeze(1)
        gap = kj - lo
        ratio = torch.where(gap <= 0, 0.0, gap / (bj + upper - lo))
        bad = (idx[:, j] < 0) | (idx[:, j] >= K) | taken.gather(1, pick).squeeze(1)
        out.append(torch.where(bad, math.inf, ratio))
        taken = taken.scatter(1, pick, True)
    return torch.stack(out, 1)


def _search_bound(d, mag, n, dtype):
    """The rounding bound of a search kernel's float32 distance (fp32 accumulation; e_ops = 0: exact
    fp32 products or 16-bit products exact in fp32, no tf32): :func:`fastvq.testing.error_bound`."""
    return ft.error_bound(d, dtype=dtype, reduce_len=n, magnitude=mag, out_dtype=torch.float32)


def _rotation64(e64, q64, g64):
    """The rotation trick's gradient to ``e`` in float64 (:func:`fastvq.rotation_trick`), the
    elementwise magnitude of its float32 computation and the row's conditioning ``1 + 1/|e^ + q^|``."""
    a, b = e64.norm(dim=-1, keepdim=True), q64.norm(dim=-1, keepdim=True)
    eh, qh = e64 / a, q64 / b
    w = (eh + qh) / (eh + qh).norm(dim=-1, keepdim=True)
    exact = (b / a) * (g64 - 2 * (g64 * w).sum(-1, keepdim=True) * w + 2 * (g64 * qh).sum(-1, keepdim=True) * eh)
    cond = 1 + 1 / (eh + qh).norm(dim=-1, keepdim=True)  # w = s/|s| amplifies rounding near the antipode
    return exact, (b / a) * g64.norm(dim=-1, keepdim=True) * cond, cond


def check_nearest_code(device, dtype):
    worst = 0.0
    for metric in ("l2", "euclidean", "cosine", "dot"):
        x, cb = _randn(3, 67, 60, device=device, dtype=dtype), _randn(133, 60, device=device, dtype=dtype)
        idx, dist = _triton(lambda: fastvq.nearest_code(x, cb, metric=metric))
        worst = max(worst, _exact(((idx >= 0) & (idx < 133)).all()))
        pick = idx.reshape(-1, 1).clamp(0, 132)
        if metric == "euclidean":
            # the order of l2 (its sqrt adds three roundings: the l2 bound of a reduction 3 longer),
            # and |x - c| computed directly: its square against float64 |x - c|^2 (D + 5 roundings)
            n = 60 + 2
            ratio, *_ = ft.argmin_ratio(x.reshape(-1, 60), cb, idx.reshape(-1), "l2", ft.search_precision(dtype),
                                        factor=ft.ACCUMULATION_FACTOR * (n + 3) / n)
            d = ft.distances64(x.reshape(-1, 60), cb, "l2")[0].gather(1, pick).squeeze(1)
            err = ft.error_ratio(dist.reshape(-1).double() ** 2, d, dtype=dtype, reduce_len=60 + 5, magnitude=d,
                                 out_dtype=torch.float32)
            worst = max(worst, float(ratio.max()), err)
            continue
        ratio, *_ = ft.argmin_ratio(x.reshape(-1, 60), cb, idx.reshape(-1), metric, ft.search_precision(dtype))
        d, mag, n = ft.distances64(x.reshape(-1, 60), cb, metric)
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
    return ft.error_ratio(out, exact.clamp_min(0), dtype=dtype, reduce_len=33 + 2, magnitude=mag, out_dtype=out.dtype,
                          precision=ft.search_precision(dtype))


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
        worst = max(worst, float(ft.argmin_ratio(r.to(dtype), cbs[lvl], idx.clamp(0, 36), "l2",
                                                 ft.search_precision(dtype))[0].max()))
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
    # 3,000 ids: several of the kernel's 1,024-id programs and a partial last one
    idx = torch.randint(0, 50, (3000,), device=device)
    u = _triton(lambda: fastvq.code_usage(idx, 50))
    counts = torch.bincount(idx, minlength=50).double()
    # out-of-range ids: counted aside by a meter's batch usage, refused by code_usage
    bad = idx.clone()
    bad[::7], bad[3::11] = 50, -1
    n_bad = int(((bad < 0) | (bad >= 50)).sum())
    batch = _triton(lambda: fastvq.CodeUsageMeter(50).update(bad))
    good = bad[(bad >= 0) & (bad < 50)]
    aside = int(batch.out_of_range) == n_bad and torch.equal(batch.counts, torch.bincount(good, minlength=50))
    if bad.device.type == "cpu":
        try:
            _triton(lambda: fastvq.code_usage(bad, 50))
            refused = False
        except ValueError:
            refused = True
    else:  # on CUDA the refusal is a device-side assert: it would end this process's CUDA context and
        refused = True  # every check after this one (the suite's tests/test_device_asserts.py checks it)
    p = counts / counts.sum()
    terms = p * torch.log(p + 1e-10)
    entropy = -terms.sum()
    # entropy: 50 float32 terms (a log each); perplexity = exp(entropy): its relative error is the
    # entropy's absolute error
    mag = terms.abs().sum() + 1.0
    return max(_exact(torch.equal(u.counts.double(), counts)), _exact(aside and refused),
               ft.error_ratio(u.entropy, entropy, dtype=torch.float32, reduce_len=50 + 8, magnitude=mag),
               ft.error_ratio(u.perplexity, entropy.exp(), dtype=torch.float32, reduce_len=50 + 8,
                              magnitude=mag * entropy.exp()))


def check_semantic_ids(device, dtype):
    worst = 0.0
    # contiguous, and column-major (the kernel reads the codes through their strides)
    for codes in (torch.randint(0, 3, (400, 3), device=device), torch.randint(0, 3, (3, 400), device=device).T):
        got = _triton(lambda: fastvq.semantic_ids(codes))
        with fastvq.backend("reference"):
            want = fastvq.semantic_ids(codes)
        worst = max(worst, _exact(torch.equal(got, want)))
    return worst


def check_rotation_trick(device, dtype):
    e = _randn(90, 33, device=device, dtype=dtype).requires_grad_()
    q, g = _randn(90, 33, device=device, dtype=dtype), _randn(90, 33, device=device, dtype=dtype)

    def run():
        out = fastvq.rotation_trick(e, q)
        out.backward(g)
        return out.detach(), e.grad.clone()

    out, grad = _triton(run)
    exact, mag, cond = _rotation64(e.detach().double(), q.double(), g.double())
    n = 4 * 33 + 8  # chained length-D reductions: |e|, |q|, |e^ + q^|, g.w, g.q^
    elem = ft.error_ratio(grad, exact, dtype=dtype, reduce_len=n, magnitude=mag)
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


def check_topk_codes(device, dtype):
    worst = 0.0
    for metric, k in (("l2", 5), ("euclidean", 3), ("cosine", 4), ("dot", 2)):
        x, cb = _randn(61, 40, device=device, dtype=dtype), _randn(97, 40, device=device, dtype=dtype)
        idx, dist = _triton(lambda: fastvq.topk_codes(x, cb, k, metric=metric))
        # euclidean sorts as l2 does: judged on l2 (sqrt adds three roundings: a longer reduction)
        d, mag, n = ft.distances64(x, cb, "l2" if metric == "euclidean" else metric)
        n += 3 if metric == "euclidean" else 0
        worst = max(worst, float(_ranked_ratio(d, _search_bound(d, mag, n, dtype), idx).max()))
        pick = idx.clamp(0, 96)
        want, m = d.gather(1, pick), mag.gather(1, pick)
        if metric == "euclidean":  # |x - c| computed directly: its square against float64 |x - c|^2
            worst = max(worst, ft.error_ratio(dist.double() ** 2, want, dtype=dtype, reduce_len=40 + 5,
                                              magnitude=want, out_dtype=torch.float32))
        else:
            worst = max(worst, ft.error_ratio(dist, want, dtype=dtype, reduce_len=n + 1, magnitude=m,
                                              out_dtype=torch.float32))
    return worst


def check_sample_code(device, dtype):
    """Gumbel-max: the sampled code minimises ``distance - temperature * g`` over the codebook, ``g``
    the kernel's noise (Philox, fastvq.reference.sample_code.gumbel: the documented stream), to
    within the distances' rounding bound plus that of the noise term; at a tiny temperature
    that is the nearest code."""
    from fastvq.reference.sample_code import gumbel

    x, cb = _randn(83, 40, device=device, dtype=dtype), _randn(71, 40, device=device, dtype=dtype)
    u = torch.finfo(torch.float32).eps / 2
    worst = 0.0
    for metric in ("l2", "cosine", "dot"):
        d, mag, n = ft.distances64(x, cb, metric)
        for temperature, seed in ((1e-7, 11), (2.0, 12)):
            idx, dist = _triton(lambda: fastvq.sample_code(x, cb, temperature, metric=metric, seed=seed))
            g = gumbel(torch.tensor(seed, device=device), torch.arange(83, device=device), 71, 0).double()
            # float32 key distance / T - g: the scale 1/T, the product and the difference round
            # (3u of |score| + T|g|), and the kernel's log may differ from torch's by a few ulps
            # (T (1 + |g|)). At T = 1e-7 the noise term (|T g| < 2e-6) is under a quarter of the
            # smallest distance bound here: the sample is the nearest code up to rounding.
            bound = _search_bound(d, mag, n, dtype) + 8 * u * (mag + temperature * (2 + g.abs()))
            ratio = _ranked_ratio(d - temperature * g, bound, idx[:, None])
            pick = idx.clamp(0, 70)[:, None]
            worst = max(worst, float(ratio.max()),
                        ft.error_ratio(dist, d.gather(1, pick).squeeze(1), dtype=dtype, reduce_len=n + 1,
                                       magnitude=mag.gather(1, pick).squeeze(1), out_dtype=torch.float32))
    return worst


def check_residual_quantize_step(device, dtype):
    """The training step with row weights (some 0), statistics and dead-code candidates: codes,
    quantized, losses, statistics and candidates of the forward, and x.grad and codebooks.grad of
    the fused backward (ste and rotation) against float64 formulas of the op's docstring, given
    the codes it returned."""
    N, D, L, K = 89, 36, 3, 29
    x0 = _randn(N, D, device=device, dtype=dtype)
    cbs0 = _randn(L, K, D, device=device, dtype=dtype, scale=0.5)
    w = torch.rand(N, device=device) * 3  # as given (the op normalises them; only ratios matter)
    w[::7] = 0.0  # padding rows: identity gradient, nothing in the losses or statistics
    G = _randn(N, D, device=device, dtype=dtype)  # upstream gradient of quantized
    a, b = 0.25, 1.0  # upstream gradients of the commitment and embedding losses
    # dead-code candidate rows (distinct), padding row 0 among them
    rows = torch.cat([torch.zeros(1, dtype=torch.int64, device=device),
                      1 + torch.randperm(N - 1, device=device)[:10]])
    x64, w64, G64 = x0.double(), w.double()[:, None], G.double()
    live = w64 != 0
    W = w64.sum()
    worst = 0.0
    for mode in ("ste", "rotation"):
        x, cbs = x0.clone().requires_grad_(), cbs0.clone().requires_grad_()

        def run():
            out = fastvq.residual_quantize_step(x, cbs, weights=w, grad=mode, statistics=True, candidate_rows=rows)
            torch.autograd.backward([out.quantized, out.commitment_loss, out.embedding_loss],
                                    [G, torch.tensor(a, dtype=dtype, device=device),
                                     torch.tensor(b, dtype=dtype, device=device)])
            return out

        out = _triton(run)
        codes = out.codes
        worst = max(worst, _exact(((codes >= 0) & (codes < K)).all()))
        codes = codes.clamp(0, K - 1)
        r32, q32 = x0.float(), torch.zeros(N, D, device=device)
        r64, A = x64.clone(), x64.abs()  # A: |x| + sum of the |codes| so far (the float32 residual's magnitude)
        sq64 = sqmag = torch.zeros((), dtype=torch.float64, device=device)
        commit64, commit_mag = torch.zeros_like(x64), torch.zeros_like(x64)
        dcb64 = torch.zeros(L, K, D, dtype=torch.float64, device=device)
        dcb_mag = torch.zeros_like(dcb64)
        n_stat = 0
        for lvl in range(L):
            idx, cb64 = codes[:, lvl], cbs0[lvl].double()
            # the codes: each level's nearest code to the float32 residual the kernel searched with
            worst = max(worst, float(ft.argmin_ratio(r32.to(dtype), cbs0[lvl], idx, "l2",
                                                     ft.search_precision(dtype))[0].max()))
            c64 = cb64[idx]
            # candidates: the midpoint (r_l + c_l) / 2 of each candidate row's residual and code,
            # flagged ok where the row has nonzero weight (every residual and code here is finite)
            worst = max(worst, _exact(torch.equal(out.candidates_ok[lvl], live.squeeze(1)[rows])),
                        ft.error_ratio(out.candidates[lvl], ((r64 + c64) / 2)[rows], dtype=dtype, reduce_len=L + 2,
                                       magnitude=((A + c64.abs()) / 2)[rows], out_dtype=torch.float32))
            # statistics of the residual this level quantized, rows of nonzero weight, as given
            wl = torch.where(live, w64, 0.0)
            counts64 = torch.zeros(K, dtype=torch.float64, device=device).index_add_(0, idx, wl.squeeze(1))
            sums64 = torch.zeros(K, D, dtype=torch.float64, device=device).index_add_(0, idx, wl * r64)
            smag = torch.zeros(K, D, dtype=torch.float64, device=device).index_add_(0, idx, wl * A)
            n_stat = max(n_stat, int(torch.bincount(idx, minlength=K).max()) + L + 2)
            worst = max(worst, ft.error_ratio(out.counts[lvl], counts64, dtype=torch.float32, reduce_len=n_stat),
                        ft.error_ratio(out.sums[lvl], sums64, dtype=dtype, reduce_len=n_stat, magnitude=smag,
                                       out_dtype=torch.float32))
            # d embedding / d c_lk = 2 sum_{i: code k} w_i (c_lk - r_il) / (D W)
            dcb64[lvl].index_add_(0, idx, 2 * b * wl * (c64 - r64) / (D * W))
            dcb_mag[lvl].index_add_(0, idx, 2 * abs(b) * wl * (c64.abs() + A) / (D * W))
            r64, A = r64 - c64, A + c64.abs()
            r32, q32 = r32 - cbs0[lvl].float()[idx], q32 + cbs0[lvl].float()[idx]
            sq64 = sq64 + (wl * r64 * r64).sum()
            sqmag = sqmag + (wl * A * A).sum()
            # d commitment / d x_i = 2 w_i sum_l r_{i,l+1} / (D W)
            commit64, commit_mag = commit64 + 2 * a * wl * r64 / (D * W), commit_mag + 2 * abs(a) * wl * A / (D * W)
        # quantized: the float32 sum of the codes in level order; x itself on rows of weight 0
        worst = max(worst, _exact(torch.equal(out.quantized, torch.where(live, q32, x0.float()).to(dtype))))
        n_loss = D + N + 2 * L + 8
        for lossv in (out.commitment_loss, out.embedding_loss):
            worst = max(worst, ft.error_ratio(lossv.double()[None], (sq64 / (D * W))[None], dtype=dtype,
                                              reduce_len=n_loss, magnitude=(sqmag / (D * W))[None]))
        # x.grad: the upstream gradient (ste) or its rotation onto x (rotation, rows of nonzero
        # weight; e = x, q = the float32 sum of the codes the forward formed), plus the commitment term
        if mode == "rotation":
            rot, rot_mag, cond = _rotation64(x64, q32.double(), G64)
            g_x = torch.where(live, rot, G64)
            g_mag = torch.where(live, rot_mag.expand(-1, D), G64.abs())
            n_x, cond_x = max(4 * D + 8, n_loss), 2 * float(cond[live.squeeze(1)].max())
        else:
            g_x, g_mag, n_x, cond_x = G64, G64.abs(), n_loss, 1.0
        dx64, dx_mag = g_x + commit64, g_mag + commit_mag
        n_cb = n_stat + N + 8
        for got, exact, mag, n, cond in ((x.grad, dx64, dx_mag, n_x, cond_x),
                                          (cbs.grad, dcb64, dcb_mag, n_cb, 1.0)):
            cond = max(cond, float(mag.norm() / exact.norm()))
            worst = max(worst, ft.error_ratio(got, exact, dtype=dtype, reduce_len=n, magnitude=mag),
                        ft.grad_ratio(got, exact, dtype=dtype, reduce_len=n, condition=cond)["ratio"])
    return worst


def check_ema_update(device, dtype):
    """ema_update_ against the float64 EMA update with its guards: one level whose batch had no
    rows (nothing changes) and one code whose batch sums are not finite (it keeps its EMA state)."""
    L, K, D, decay, eps = 2, 37, 24, 0.99, 1e-5
    codebook = _randn(L, K, D, device=device, dtype=dtype)
    cluster_size = torch.rand(L, K, device=device) * 5 + 0.1
    embed_avg = torch.randn(L, K, D, device=device) * cluster_size[..., None]
    counts = torch.randint(0, 9, (L, K), device=device).float()
    counts[1] = 0.0  # a level whose batch had no rows
    sums = torch.randn(L, K, D, device=device) * counts[..., None]
    sums[0, 3, 5] = float("inf")  # a code whose batch sums are not finite
    cs64, ea64, cb64 = cluster_size.double(), embed_avg.double(), codebook.double()
    n64, s64 = counts.double(), sums.double()
    live = (n64.sum(-1) > 0)[:, None]
    new_cs = decay * cs64 + (1 - decay) * n64
    keep = live & new_cs.isfinite() & s64.isfinite().all(-1)
    new_cs = torch.where(keep, new_cs, cs64)
    tot = new_cs.sum(-1, keepdim=True)
    smoothed = (new_cs + eps) / (tot + K * eps) * tot
    new_ea = torch.where(keep[..., None], decay * ea64 + (1 - decay) * s64, ea64)
    ea_mag = torch.where(keep[..., None], decay * ea64.abs() + (1 - decay) * s64.abs(), ea64.abs())
    new_cb = torch.where(live[..., None], new_ea / smoothed[..., None], cb64)
    cb_mag = torch.where(live[..., None], ea_mag / smoothed[..., None], cb64.abs())
    cs_mag = torch.where(keep, decay * cs64 + (1 - decay) * n64, cs64)
    # decay and 1 - decay are rounded to float32 too: two more roundings in every term; the new
    # code divides by the smoothed count, a sum over K codes and four more operations
    from fastvq.ops.ema_update import ema_update_

    _triton(lambda: ema_update_(codebook, cluster_size, embed_avg, counts, sums, decay, eps))
    return max(ft.error_ratio(cluster_size, new_cs, dtype=torch.float32, reduce_len=6, magnitude=cs_mag),
               ft.error_ratio(embed_avg, new_ea, dtype=torch.float32, reduce_len=6, magnitude=ea_mag),
               ft.error_ratio(codebook, new_cb, dtype=dtype, reduce_len=K + 16, magnitude=cb_mag, out_dtype=dtype))


CHECKS = {
    "nearest_code": check_nearest_code,
    "topk_codes": check_topk_codes,
    "sample_code": check_sample_code,
    "pairwise_sqdist": check_pairwise_sqdist,
    "mine_negatives": check_mine_negatives,
    "residual_quantize": check_residual_quantize,
    "residual_quantize_step": check_residual_quantize_step,
    "ema_update": check_ema_update,
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
        raise UsageError(f"unknown op(s) {', '.join(map(repr, unknown))}; valid names: {', '.join(CHECKS)}")
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if dtypes is None:
        dtypes = [torch.float32, torch.bfloat16, torch.float16]
    dtypes = list(dict.fromkeys(dtypes))  # (each once, in the order given)
    where = torch.cuda.get_device_name() if cuda else "CPU, Triton interpreter"
    print(f"fastvq check: Triton kernels vs float64 on {where}; PASS when error / rounding bound <= 1")
    print(ft.describe() + "\n")
    print(f"{'op':22} {'dtype':9} {'result':6} {'err/bound':>10} {'s':>6}")
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
            print(f"{name:22} {str(dtype).replace('torch.', ''):9} {'PASS' if ok else 'FAIL':6} {shown:>10} "
                  f"{time.perf_counter() - t0:6.1f}", flush=True)
    print(f"\n{'all checks passed' if not failed else f'{failed} check(s) FAILED'}")
    return 1 if failed else 0
