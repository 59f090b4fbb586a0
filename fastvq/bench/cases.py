"""The op rows of `python -m fastvq bench`: per op, its shapes, providers and ceiling.

Each op registers one group (its name is the ``--ops`` name) with :func:`fastvq.bench.registry.register`
at weight ``OP_ROWS``; training-step rows live in :mod:`fastvq.bench.steps`, rows of other packages
in their own modules (see :mod:`fastvq.bench.registry`).

Providers: ``reference`` (the eager pure-torch reference in :mod:`fastvq.reference`),
``compiled`` (``torch.compile`` of that reference), ``fastvq`` (the Triton kernels), and where
users run something else today, that code as a peer (the seeds' ``cdist + argmin``, one-hot
EMA statistics, the Householder rotation, the dense pairwise KL loss).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import fastvq
from fastvq.reference.code_statistics import code_statistics_ref
from fastvq.reference.mine_negatives import mine_negatives_ref
from fastvq.reference.nearest_code import nearest_code_ref
from fastvq.reference.pairwise_kl_loss import pairwise_kl_loss_ref
from fastvq.reference.pairwise_sqdist import pairwise_sqdist_ref
from fastvq.reference.qr_lookup import qr_lookup_ref
from fastvq.reference.residual_quantize import residual_quantize_ref
from fastvq.reference.rotation_trick import rotation_trick_ref
from fastvq.reference.sample_code import sample_code_ref
from fastvq.reference.topk_codes import topk_codes_ref

from .registry import (OP_ROWS, Case, compiled as _compiled, exact_fp32 as _exact_fp32, fits as _fits,
                       on_triton as _triton, register)
from .peers import (seed_cdist_argmin, seed_householder, seed_onehot_stats, seed_pairwise_kl_loss,
                    vqpt_rotate_to)

M = 1 << 20  # 1,048,576


def _esize(dtype):
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------- nearest_code


def nearest_code_cases(device, quick):
    shapes = [(4096, 64, 256, torch.float32)] if quick else [
        (M, 256, 4096, torch.bfloat16), (M, 256, 4096, torch.float32),
        (M, 256, 8192, torch.bfloat16), (M, 256, 8192, torch.float32),
        (M, 64, 1024, torch.bfloat16), (M, 64, 1024, torch.float32),
        (256, 256, M, torch.bfloat16),  # small N, huge K: the split-codebook path
    ]
    out = []
    for n, d, k, dt in shapes:
        skip = {}
        if not _fits(4.0 * n * k * 2, device):
            skip["torch cdist+argmin"] = f"needs {8.0 * n * k / 2**30:.0f} GiB for the N x K matrix"
        providers = {"reference": nearest_code_ref, "compiled": _compiled(nearest_code_ref),
                     "fastvq": _triton(fastvq.nearest_code)}
        if dt == torch.float32:  # float32 accuracy: three TF32 products ("tf32x3"); the exact dot; one TF32 product
            providers["fastvq ieee"] = _triton(_exact_fp32(fastvq.nearest_code))
            providers["fastvq tf32"] = _triton(functools.partial(fastvq.nearest_code, allow_tf32=True))
        out.append(Case(
            op="nearest_code", shape={"N": n, "D": d, "K": k}, dtype=dt,
            make=lambda dev, n=n, d=d, k=k, dt=dt: (torch.randn(n, d, device=dev, dtype=dt),
                                                    torch.randn(k, d, device=dev, dtype=dt)),
            providers=providers,
            peers={"torch cdist+argmin": seed_cdist_argmin},
            skip=skip, flops=2.0 * n * k * d, ceiling="matmul", matmul_shape=(n, d, k)))
    return out


def _cdist_topk(x, c, k):
    """The dense way: the (H,) N x K distance matrix, then torch.topk."""
    return torch.cdist(x.float(), c.float()).topk(k, dim=-1, largest=False)


def _cdist_gumbel(x, c, t):
    """vector-quantize-pytorch's sampling as written there: -cdist / T + Gumbel noise, argmax."""
    logits = -torch.cdist(x.float(), c.float()) / t
    u = torch.rand_like(logits).clamp(1e-20, 1.0)
    return (logits - torch.log(-torch.log(u))).argmax(-1)


def nearest_code_multi_cases(device, quick):
    """H separate codebooks in one launch (vector-quantize-pytorch's heads / separate codebooks)."""
    shapes = [(4, 1024, 32, 256, torch.float32)] if quick else [
        (8, 131072, 32, 1024, torch.bfloat16), (8, 131072, 32, 1024, torch.float32),
        (4, 262144, 64, 4096, torch.bfloat16)]
    out = []
    for h, n, d, k, dt in shapes:
        skip = {}
        if not _fits(4.0 * h * n * k * 2, device):
            skip["torch cdist+argmin (batched)"] = f"needs {8.0 * h * n * k / 2**30:.0f} GiB for the H x N x K matrix"
        out.append(Case(
            op="nearest_code (H codebooks)", shape={"H": h, "N": n, "D": d, "K": k}, dtype=dt,
            make=lambda dev, h=h, n=n, d=d, k=k, dt=dt: (torch.randn(h, n, d, device=dev, dtype=dt),
                                                         torch.randn(h, k, d, device=dev, dtype=dt)),
            providers={"reference": nearest_code_ref, "compiled": _compiled(nearest_code_ref),
                       "fastvq": _triton(fastvq.nearest_code)},
            peers={"torch cdist+argmin (batched)": seed_cdist_argmin},
            skip=skip, flops=2.0 * h * n * k * d, ceiling="matmul", matmul_shape=(h * n, d, k)))
    return out


def topk_codes_cases(device, quick):
    shapes = [(2048, 64, 256, 8, torch.float32)] if quick else [
        (262144, 256, 4096, 8, torch.bfloat16), (262144, 256, 4096, 16, torch.bfloat16),
        (262144, 256, 4096, 16, torch.float32)]
    out = []
    for n, d, k_codes, k, dt in shapes:
        skip = {}
        if not _fits(4.0 * n * k_codes * 2, device):
            skip["torch cdist+topk"] = f"needs {8.0 * n * k_codes / 2**30:.0f} GiB for the N x K matrix"
        out.append(Case(
            op="topk_codes", shape={"N": n, "D": d, "K": k_codes, "k": k}, dtype=dt,
            make=lambda dev, n=n, d=d, kc=k_codes, dt=dt: (torch.randn(n, d, device=dev, dtype=dt),
                                                           torch.randn(kc, d, device=dev, dtype=dt)),
            providers={"reference": functools.partial(topk_codes_ref, k=k),
                       "compiled": _compiled(functools.partial(topk_codes_ref, k=k)),
                       "fastvq": _triton(functools.partial(fastvq.topk_codes, k=k))},
            peers={"torch cdist+topk": functools.partial(_cdist_topk, k=k)},
            skip=skip, flops=2.0 * n * k_codes * d, ceiling="matmul", matmul_shape=(n, d, k_codes)))
    return out


def sample_code_cases(device, quick):
    shapes = [(4096, 64, 256, torch.float32)] if quick else [
        (M, 256, 4096, torch.bfloat16), (M, 256, 4096, torch.float32), (M, 64, 1024, torch.bfloat16)]
    out = []
    for n, d, k, dt in shapes:
        skip = {}
        if not _fits(4.0 * n * k * 3, device):
            skip["VQP gumbel (cdist)"] = f"needs {12.0 * n * k / 2**30:.0f} GiB for the N x K logits and noise"
        seed = torch.tensor(1234)
        out.append(Case(
            op="sample_code (euclidean, T=1)", shape={"N": n, "D": d, "K": k}, dtype=dt,
            make=lambda dev, n=n, d=d, k=k, dt=dt: (torch.randn(n, d, device=dev, dtype=dt),
                                                    torch.randn(k, d, device=dev, dtype=dt)),
            providers={"reference": functools.partial(sample_code_ref, temperature=1.0, metric="euclidean", seed=seed),
                       "fastvq": _triton(functools.partial(fastvq.sample_code, temperature=1.0, metric="euclidean",
                                                           seed=1234))},
            peers={"VQP gumbel (cdist)": functools.partial(_cdist_gumbel, t=1.0)},
            skip=skip, flops=2.0 * n * k * d, ceiling="matmul", matmul_shape=(n, d, k)))
    return out


def pairwise_sqdist_cases(device, quick):
    shapes = [(1024, 512, 64, torch.float32)] if quick else [
        (16384, 16384, 256, torch.bfloat16), (16384, 16384, 256, torch.float32)]
    return [Case(
        op="pairwise_sqdist", shape={"M": m, "N": n, "D": d}, dtype=dt,
        make=lambda dev, m=m, n=n, d=d, dt=dt: (torch.randn(m, d, device=dev, dtype=dt),
                                                torch.randn(n, d, device=dev, dtype=dt)),
        providers={"reference": pairwise_sqdist_ref, "compiled": _compiled(pairwise_sqdist_ref),
                   "fastvq": _triton(fastvq.pairwise_sqdist),
                   **({"fastvq ieee": _triton(_exact_fp32(fastvq.pairwise_sqdist))} if dt == torch.float32 else {})},
        flops=2.0 * m * n * d, ceiling="matmul", matmul_shape=(m, d, n)) for m, n, d, dt in shapes]


def mine_negatives_cases(device, quick):
    shapes = [(1024, 2048, 64, torch.float32)] if quick else [
        (65536, 65536, 256, torch.bfloat16), (65536, 65536, 256, torch.float32)]
    return [Case(
        op="mine_negatives", shape={"N": n, "M": m, "D": d, "strategy": "semi-hard"}, dtype=dt,
        make=lambda dev, n=n, m=m, d=d, dt=dt: (torch.randn(n, d, device=dev, dtype=dt),
                                                torch.randn(n, d, device=dev, dtype=dt),
                                                torch.randn(m, d, device=dev, dtype=dt)),
        providers={"reference": functools.partial(mine_negatives_ref, strategy="semi-hard"),
                   "compiled": _compiled(functools.partial(mine_negatives_ref, strategy="semi-hard")),
                   "fastvq": _triton(functools.partial(fastvq.mine_negatives, strategy="semi-hard"))},
        flops=2.0 * n * m * d, ceiling="matmul", matmul_shape=(n, d, m)) for n, m, d, dt in shapes]


# ---------------------------------------------------------------- residual quantization, EMA statistics


def residual_quantize_cases(device, quick):
    shapes = [(4, 4096, 64, 64, torch.float32)] if quick else [
        (8, 262144, 256, 256, torch.bfloat16), (8, 262144, 256, 256, torch.float32)]
    return [Case(
        op="residual_quantize", shape={"L": L, "N": n, "D": d, "K": k}, dtype=dt,
        make=lambda dev, L=L, n=n, d=d, k=k, dt=dt: (torch.randn(n, d, device=dev, dtype=dt),
                                                     torch.randn(L, k, d, device=dev, dtype=dt) / (L ** 0.5)),
        providers={"reference": residual_quantize_ref, "compiled": _compiled(residual_quantize_ref),
                   "fastvq": _triton(fastvq.residual_quantize)},
        flops=2.0 * n * k * d * L, ceiling="matmul", matmul_shape=(n, d, k * L)) for L, n, d, k, dt in shapes]


def code_statistics_cases(device, quick):
    shapes = [(16384, 128, 256, torch.float32)] if quick else [
        (M, 256, 8192, torch.float32), (M, 256, 8192, torch.bfloat16)]
    out = []
    for n, d, k, dt in shapes:
        skip = {} if _fits(4.0 * n * k, device) else {"one-hot (seed)": f"needs {4.0 * n * k / 2**30:.0f} GiB one-hot"}
        out.append(Case(
            op="code_statistics", shape={"N": n, "D": d, "K": k}, dtype=dt,
            make=lambda dev, n=n, d=d, k=k, dt=dt: (torch.randn(n, d, device=dev, dtype=dt),
                                                    torch.randint(0, k, (n,), device=dev), k),
            providers={"reference": code_statistics_ref, "compiled": _compiled(code_statistics_ref),
                       "fastvq": _triton(fastvq.code_statistics)},
            peers={"fastvq atomic": _triton(functools.partial(fastvq.code_statistics, deterministic=False)),
                   "one-hot (seed)": seed_onehot_stats},
            skip=skip, bytes=n * d * _esize(dt) + n * 8 + k * d * 4 + k * 4, ceiling="copy"))
    return out


# ---------------------------------------------------------------- rotation trick


def _fwd_bwd(fn):
    def run(e, q, g):
        out = fn(e, q)
        out.backward(g)
        return out

    return run


def rotation_trick_cases(device, quick):
    shapes = [(16384, 64, torch.float32)] if quick else [(M, 256, torch.float32), (M, 256, torch.bfloat16)]
    return [Case(
        op="rotation_trick fwd+bwd", shape={"N": n, "D": d}, dtype=dt,
        make=lambda dev, n=n, d=d, dt=dt: (torch.randn(n, d, device=dev, dtype=dt, requires_grad=True),
                                           torch.randn(n, d, device=dev, dtype=dt),
                                           torch.randn(n, d, device=dev, dtype=dt)),
        providers={"reference": _fwd_bwd(rotation_trick_ref), "compiled": _fwd_bwd(_compiled(rotation_trick_ref)),
                   "fastvq": _triton(_fwd_bwd(fastvq.rotation_trick))},
        peers={"rotate_to (vq-pytorch)": _fwd_bwd(vqpt_rotate_to),
               "householder (seed 004)": _fwd_bwd(seed_householder)},
        # forward reads q, writes out; backward reads e, q, g and writes grad_e
        bytes=6.0 * n * d * _esize(dt), ceiling="copy") for n, d, dt in shapes]


# ---------------------------------------------------------------- QR embeddings


def _qr_bwd(fn):
    def run(ids, qw, rw, g):
        out = fn(ids, qw, rw)
        out.backward(g)
        return out

    return run


def qr_lookup_cases(device, quick):
    b, dim, rows = (65536, 64, 256) if quick else (M, 128, 3163)
    dt = torch.float32

    def make(dev):
        ids = torch.randint(-(2**40), 2**40, (b,), device=dev)
        qw = torch.randn(rows, dim, device=dev, dtype=dt, requires_grad=True)
        rw = torch.randn(rows, dim, device=dev, dtype=dt, requires_grad=True)
        return ids, qw, rw, torch.randn(b, dim, device=dev, dtype=dt)

    fwd = {"reference": lambda i, q, r, g: qr_lookup_ref(i, q.detach(), r.detach()),
           "compiled": (lambda c: lambda i, q, r, g: c(i, q.detach(), r.detach()))(_compiled(qr_lookup_ref)),
           "fastvq": _triton(lambda i, q, r, g: fastvq.qr_lookup(i, q.detach(), r.detach()))}
    bwd = {"reference": _qr_bwd(qr_lookup_ref), "compiled": _qr_bwd(_compiled(qr_lookup_ref)),
           "fastvq": _triton(_qr_bwd(fastvq.qr_lookup))}
    es = _esize(dt)
    return [
        Case(op="qr_lookup fwd", shape={"B": b, "dim": dim, "rows": rows}, dtype=dt, make=make, providers=fwd,
             bytes=b * 8 + b * dim * es + 2 * rows * dim * es, ceiling="copy"),
        Case(op="qr_lookup fwd+bwd", shape={"B": b, "dim": dim, "rows": rows}, dtype=dt, make=make, providers=bwd,
             bytes=2 * (b * 8 + b * dim * es + 2 * rows * dim * es), ceiling="copy"),
    ]


# ---------------------------------------------------------------- pairwise KL loss


def _kl_fwd_bwd(fn):
    def run(pred, target, t):
        loss = fn(pred, target, t)
        loss.backward()
        return loss

    return run


def pairwise_kl_cases(device, quick):
    shapes = [(512, 64)] if quick else [(4096, 128), (65536, 128)]
    out = []
    for b, d in shapes:
        dense = 4.0 * b * b * 8  # the seed's loss keeps several B x B float32 matrices alive
        skip = {} if _fits(dense, device) else {
            p: f"cannot run: its dense B x B matrices need ~{dense / 2**30:.0f} GiB"
            for p in ("seed loss (eager)", "compiled")}
        out.append(Case(
            op="pairwise_kl_loss fwd+bwd", shape={"B": b, "D": d}, dtype=torch.float32,
            make=lambda dev, b=b, d=d: (F.normalize(torch.randn(b, d, device=dev), dim=1).requires_grad_(),
                                        F.normalize(torch.randn(b, d, device=dev), dim=1), 0.1),
            providers={"reference": _kl_fwd_bwd(pairwise_kl_loss_ref),
                       "compiled": _kl_fwd_bwd(_compiled(pairwise_kl_loss_ref)),
                       "fastvq": _triton(_kl_fwd_bwd(fastvq.pairwise_kl_loss))},
            peers={"seed loss (eager)": _kl_fwd_bwd(seed_pairwise_kl_loss)},
            skip=skip, flops=2.0 * b * b * d * 4, ceiling="matmul", matmul_shape=(b, d, b)))
    return out


for _name, _build in {
    "nearest_code": nearest_code_cases,
    "nearest_code_multi": nearest_code_multi_cases,
    "topk_codes": topk_codes_cases,
    "sample_code": sample_code_cases,
    "pairwise_sqdist": pairwise_sqdist_cases,
    "mine_negatives": mine_negatives_cases,
    "residual_quantize": residual_quantize_cases,
    "code_statistics": code_statistics_cases,
    "rotation_trick": rotation_trick_cases,
    "qr_lookup": qr_lookup_cases,
    "pairwise_kl_loss": pairwise_kl_cases,
}.items():
    register(_name, _build, weight=OP_ROWS)
