"""`python -m fastvq check`: every op's Triton kernels against its reference, here.

On a CUDA machine the kernels run compiled on the GPU; without one they run under the Triton
interpreter on small shapes. Prints a PASS/FAIL table with the largest error of each check and
returns non-zero if any fails. This is how a user validates fastvq on their GPU.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import torch
import torch.nn.functional as F

import fastvq

# (rtol-ish) tolerance per dtype for errors relative to the output's scale
TOL = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def _both(fn: Callable[[], object]):
    with fastvq.backend("triton"):
        fast = fn()
    with fastvq.backend("reference"):
        ref = fn()
    return fast, ref


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    if a.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _chosen_gap(x, cb, idx, metric="l2"):
    """Largest excess of the chosen code's distance over the true (float64) minimum, relative."""
    x64, c64 = x.double().reshape(-1, x.shape[-1]), cb.double()
    if metric == "l2":
        d = torch.cdist(x64, c64) ** 2
    elif metric == "cosine":
        d = 1 - F.normalize(x64, dim=-1) @ F.normalize(c64, dim=-1).T
    else:
        d = -(x64 @ c64.T)
    chosen = d.gather(1, idx.reshape(-1, 1)).squeeze(1)
    scale = d.abs().max().clamp_min(1e-12)
    return float(((chosen - d.min(1).values) / scale).max())


def check_nearest_code(device, dtype):
    errs = []
    for metric in ("l2", "cosine", "dot"):
        x = torch.randn(3, 67, 60, device=device, dtype=dtype)
        cb = torch.randn(133, 60, device=device, dtype=dtype)
        (fi, fd), (ri, rd) = _both(lambda: fastvq.nearest_code(x, cb, metric=metric))
        errs += [_chosen_gap(x, cb, fi, metric), _rel(fd, rd) if dtype == torch.float32 else _rel(fd, rd) / 10]
        if not ((fi >= 0) & (fi < 133)).all():
            return math.inf
    return max(errs)


def check_pairwise_sqdist(device, dtype):
    a, b = torch.randn(70, 33, device=device, dtype=dtype), torch.randn(45, 33, device=device, dtype=dtype)
    f, r = _both(lambda: fastvq.pairwise_sqdist(a, b))
    return _rel(f, r)


def check_mine_negatives(device, dtype):
    a, p = torch.randn(50, 24, device=device, dtype=dtype), torch.randn(50, 24, device=device, dtype=dtype)
    n = torch.randn(301, 24, device=device, dtype=dtype)
    errs = []
    for strategy in ("hardest", "semi-hard"):
        (fi, fd), (ri, rd) = _both(lambda: fastvq.mine_negatives(a, p, n, strategy=strategy))
        errs.append(_rel(fd, rd))
    return max(errs)


def check_residual_quantize(device, dtype):
    x = torch.randn(97, 40, device=device, dtype=dtype)
    cbs = torch.randn(3, 37, 40, device=device, dtype=dtype) * 0.5
    (fq, fc), (rq, rc) = _both(lambda: fastvq.residual_quantize(x, cbs))
    # codes may legitimately differ on near-ties; the residual norm reached must agree
    fres = (x.double() - fq.double()).norm(dim=-1)
    rres = (x.double() - rq.double()).norm(dim=-1)
    return float(((fres - rres).abs() / rres.clamp_min(1e-6)).mean())


def check_code_statistics(device, dtype):
    x = torch.randn(500, 24, device=device, dtype=dtype)
    idx = torch.randint(0, 37, (500,), device=device)
    errs = []
    for det in (True, False):
        (fc, fs), (rc, rs) = _both(lambda: fastvq.code_statistics(x, idx, 37, deterministic=det))
        errs += [_rel(fc, rc), _rel(fs, rs)]
    return max(errs)


def check_code_usage(device, dtype):
    idx = torch.randint(0, 50, (1000,), device=device)
    f, r = _both(lambda: fastvq.code_usage(idx, 50))
    return _rel(f.counts, r.counts) + abs(f.perplexity - r.perplexity) / r.perplexity


def check_semantic_ids(device, dtype):
    codes = torch.randint(0, 3, (400, 3), device=device)
    f, r = _both(lambda: fastvq.semantic_ids(codes))
    return float((f != r).any())


def check_rotation_trick(device, dtype):
    e = torch.randn(90, 33, device=device, dtype=dtype, requires_grad=True)
    q = torch.randn(90, 33, device=device, dtype=dtype)
    g = torch.randn(90, 33, device=device, dtype=dtype)

    def run():
        e.grad = None
        out = fastvq.rotation_trick(e, q)
        out.backward(g)
        return out.detach(), e.grad.clone()

    (fo, fg), (ro, rg) = _both(run)
    return max(float((fo != q).any()) * math.inf if (fo != q).any() else 0.0, _rel(fg, rg))


def check_qr_lookup(device, dtype):
    ids = torch.randint(-(2**40), 2**40, (300,), device=device)
    qw = torch.randn(17, 16, device=device, dtype=dtype, requires_grad=True)
    rw = torch.randn(19, 16, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn(300, 16, device=device, dtype=dtype)
    errs = []
    for op in ("add", "mult", "concat"):
        gg = torch.cat([g, g], -1) if op == "concat" else g

        def run():
            qw.grad = rw.grad = None
            out = fastvq.qr_lookup(ids, qw, rw, op=op)
            out.backward(gg)
            return out.detach(), qw.grad.clone(), rw.grad.clone()

        f, r = _both(run)
        errs += [_rel(a, b) for a, b in zip(f, r)]
    return max(errs)


def check_pairwise_kl_loss(device, dtype):
    pred = F.normalize(torch.randn(77, 24, device=device), dim=1).to(dtype).requires_grad_()
    target = F.normalize(torch.randn(77, 16, device=device), dim=1).to(dtype)

    def run():
        pred.grad = None
        loss = fastvq.pairwise_kl_loss(pred, target, 0.2)
        loss.backward()
        return loss.detach(), pred.grad.clone()

    (fl, fg), (rl, rg) = _both(run)
    return max(_rel(fl, rl), _rel(fg, rg))


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
    """Run every check; print a table; return 0 if all pass, 1 otherwise."""
    unknown = set(ops or ()) - set(CHECKS)
    if unknown:
        raise ValueError(f"unknown op(s) {', '.join(map(repr, sorted(unknown)))}; valid names: {', '.join(CHECKS)}")
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    if dtypes is None:
        dtypes = [torch.float32, torch.bfloat16, torch.float16]
    where = torch.cuda.get_device_name() if cuda else "CPU, Triton interpreter"
    print(f"fastvq check: Triton kernels vs reference on {where}")
    print(f"{'op':20} {'dtype':9} {'result':6} {'max error':>10} {'tolerance':>10} {'s':>6}")
    failed = 0
    for name, fn in CHECKS.items():
        if ops and name not in ops:
            continue
        for dtype in dtypes:
            torch.manual_seed(0)
            t0 = time.perf_counter()
            try:
                err = fn(device, dtype)
                ok = err <= TOL[dtype]
                shown = f"{err:10.2e}"
            except Exception as exc:  # noqa: BLE001  (a crash is a FAIL with its reason)
                ok, shown = False, f"{type(exc).__name__}: {exc}"[:60]
            failed += not ok
            print(f"{name:20} {str(dtype).replace('torch.', ''):9} {'PASS' if ok else 'FAIL':6} {shown:>10} "
                  f"{TOL[dtype]:10.0e} {time.perf_counter() - t0:6.1f}", flush=True)
    print(f"\n{'all checks passed' if not failed else f'{failed} check(s) FAILED'}")
    return 1 if failed else 0
