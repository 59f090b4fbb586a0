"""Training-step rows of `python -m fastvq bench` (weight ``STEP_ROWS``: after the op rows).

One group per module: a whole training step (forward, the losses, backward; the codebook update
where the module makes one) at the README's shapes (``--quick``, and any CPU run: 4,096 rows).
Providers: ``reference`` (the module under the pure-torch reference backend, eager) and
``fastvq`` (Triton kernels); peers: ``seed`` (the seeds' modules, :mod:`fastvq.bench.seed_modules`,
eager), ``seed compiled`` (``torch.compile`` of the seed's step) and ``vqp`` (vector-quantize-pytorch's
``VectorQuantize`` / ``ResidualVQ`` at the same settings; skipped with a note where it is not
installed). ``bytes`` is the fewest bytes a fused step must move (so GB/s says how close the step
is to moving its data once). Every case sets ``unit_bytes`` (the activation), so that on a CPU
each provider's passes over it, launches and host syncs are counted
(:mod:`fastvq.bench.traffic`); see :mod:`fastvq.bench.registry` to add a group.
"""

from __future__ import annotations

import importlib.util

import torch
import torch.nn.functional as F

import fastvq

from . import seed_modules as seeds
from .peers import seed_householder, seed_pairwise_kl_loss
from .registry import STEP_ROWS, Case, compiled, exact_fp32, on_reference, on_triton, register

M = 1 << 20
HAVE_VQP = all(importlib.util.find_spec(p) is not None for p in ("vector_quantize_pytorch", "einops", "einx"))
NO_VQP = "vector-quantize-pytorch is not installed"


def _step(model, x, g, w_commit=0.25):
    """One training step of a quantizer returning ``(q, commit, emb, codes)``: forward (the
    codebook update inside), ``(q * g).sum() + w_commit * commit + emb``, backward."""
    x.grad = None
    model.zero_grad(set_to_none=True)
    q, commit, emb, _ = model(x)
    loss = (q * g).sum() + w_commit * commit
    if emb.requires_grad:
        loss = loss + emb
    loss.backward()
    return q


def _seed_rotation_step(model, x, g):
    """The seed VectorQuantizer with seed 004's Householder rotation in place of its straight-through
    output (the seeds' way to the rotation trick)."""
    x.grad = None
    model.zero_grad(set_to_none=True)
    _, commit, emb, idx = model(x)
    q = seed_householder(x, model.embeddings.weight[idx].detach())
    ((q * g).sum() + 0.25 * commit + emb).backward()
    return q


def _vqp_step(model, x, g):
    """A vector-quantize-pytorch step: its forward (EMA inside when on), ``(q * g).sum() + loss``."""
    x.grad = None
    model.zero_grad(set_to_none=True)
    q, _, loss = model(x.unsqueeze(0))
    ((q.squeeze(0) * g).sum() + loss.sum()).backward()
    return q


def _vqp_model(kind: str, d: int, k: int, levels: int):
    from vector_quantize_pytorch import ResidualVQ, VectorQuantize

    ema = kind == "ema"
    kw = dict(commitment_weight=0.25, rotation_trick=kind == "rotation", kmeans_init=False, threshold_ema_dead_code=0)
    if ema:
        kw.update(decay=0.99)
    else:  # a codebook learned by gradients, as the seed's (codebook loss included)
        kw.update(ema_update=False, learnable_codebook=True)
    if levels:
        return ResidualVQ(dim=d, num_quantizers=levels, codebook_size=k, **kw)
    return VectorQuantize(dim=d, codebook_size=k, **kw)


def _quantizer_case(kind, n, d, k, levels, dt, device):
    """A VectorQuantizer (``levels = 0``) or ResidualQuantizer step: ``kind`` is ``"ste"``,
    ``"rotation"`` or ``"ema"``."""

    def make(dev):
        if levels:
            own = fastvq.nn.ResidualQuantizer(levels, k, d, ema=kind == "ema", grad="rotation" if kind == "rotation"
                                              else "ste")
            seed = seeds.MultiQuantizer(levels, k, d)
        else:
            own = fastvq.nn.VectorQuantizer(k, d, ema=kind == "ema", grad="rotation" if kind == "rotation" else "ste")
            seed = seeds.EMAQuantizer(k, d) if kind == "ema" else seeds.VectorQuantizer(k, d)
        vqp = _vqp_model(kind, d, k, levels).to(dev).train() if HAVE_VQP else None
        x = torch.randn(n, d, device=dev, dtype=dt, requires_grad=True)
        return (own.to(device=dev, dtype=dt).train(), seed.to(device=dev, dtype=dt).train(), vqp, x,
                torch.randn(n, d, device=dev, dtype=dt))

    seed_step = _seed_rotation_step if kind == "rotation" else _step
    seed_compiled = compiled(seed_step)
    es = torch.finfo(dt).bits // 8
    nl = max(levels, 1)
    name = f"{'ResidualQuantizer' if levels else 'VectorQuantizer'} step ({kind})"
    shape = {"N": n, "D": d, "K": k, **({"L": levels} if levels else {})}
    skip = {} if HAVE_VQP else {"vqp": NO_VQP}
    if kind == "rotation" and levels:
        skip["seed"] = skip["seed compiled"] = "the seed has no rotation trick for residual levels"
    providers = {"reference": on_reference(lambda own, seed, vqp, x, g: _step(own, x, g)),
                 "fastvq": on_triton(lambda own, seed, vqp, x, g: _step(own, x, g))}
    if dt == torch.float32:  # the step with the exact float32 dot (before the TF32 split)
        providers["fastvq ieee"] = on_triton(exact_fp32(lambda own, seed, vqp, x, g: _step(own, x, g)))
    return Case(
        op=name, shape=shape, dtype=dt, make=make,
        providers=providers,
        peers={"seed": lambda own, seed, vqp, x, g: seed_step(seed, x, g),
               "seed compiled": lambda own, seed, vqp, x, g: seed_compiled(seed, x, g),
               "vqp": lambda own, seed, vqp, x, g: _vqp_step(vqp, x, g)},
        skip=skip,
        # read x and g, write q and grad_x; the codebooks and their gradient (or EMA state) once
        bytes=4.0 * n * d * es + 3.0 * nl * k * d * 4, flops=2.0 * n * k * d * nl, ceiling="copy",
        unit_bytes=n * d * es)


def vector_quantizer_cases(device, quick):
    n, d, k = (4096, 64, 512) if quick else (262144, 64, 512)
    return [_quantizer_case(kind, n, d, k, 0, torch.float32, device) for kind in ("ste", "rotation", "ema")]


def residual_quantizer_cases(device, quick):
    n, d, k, levels = (4096, 64, 256, 8) if quick else (262144, 64, 256, 8)
    return [_quantizer_case("ste", n, d, k, levels, torch.float32, device)]


def _embedding_step(emb, ids, g):
    emb.zero_grad(set_to_none=True)
    out = emb(ids)
    (out * g).sum().backward()
    return out


def qr_embedding_cases(device, quick):
    """QREmbedding(1M, 32): a lookup of B hashed ids and its backward (dense gradients)."""
    b, dim, rows = (4096 if quick else 65536), 32, 1_000_000

    def make(dev):
        ids = torch.randint(0, 2**40, (b,), device=dev)
        own = fastvq.nn.QREmbedding(rows, dim).to(dev).train()
        seed = seeds.QREmbedding(rows, dim).to(dev).train()
        return own, seed, ids, torch.randn(b, dim, device=dev)

    seed_compiled = compiled(_embedding_step)
    return [Case(
        op="QREmbedding step", shape={"B": b, "dim": dim, "rows": rows}, dtype=torch.float32, make=make,
        providers={"reference": on_reference(lambda own, seed, ids, g: _embedding_step(own, ids, g)),
                   "fastvq": on_triton(lambda own, seed, ids, g: _embedding_step(own, ids, g))},
        peers={"seed": lambda own, seed, ids, g: _embedding_step(seed, ids, g),
               "seed compiled": lambda own, seed, ids, g: seed_compiled(seed, ids, g)},
        # ids in, rows out and their gradient back; the two tables once each way
        bytes=b * 8 + 2.0 * b * dim * 4 + 4.0 * 1000 * dim * 4, ceiling="copy", unit_bytes=b * dim * 4)]


def _geometry_step(emb, ids, target, loss_fn):
    """The QR example's step: QR embeddings of hashed ids, normalised, against normalised
    targets by the pairwise KL loss at temperature 0.5; backward."""
    emb.zero_grad(set_to_none=True)
    pred = F.normalize(emb(ids), dim=1)
    loss = loss_fn(pred, target, 0.5)
    loss.backward()
    return loss


def pairwise_geometry_cases(device, quick):
    b, dim, tdim = (1024 if quick else 4096), 32, 128  # the seed's batch is 2**10

    def make(dev):
        ids = torch.randint(0, 2**40, (b,), device=dev)
        own = fastvq.nn.QREmbedding(1_000_000, dim).to(dev).train()
        seed = seeds.QREmbedding(1_000_000, dim).to(dev).train()
        return own, seed, ids, F.normalize(torch.randn(b, tdim, device=dev), dim=1)

    seed_compiled = compiled(_geometry_step)
    return [Case(
        op="pairwise-geometry step (QR + pairwise KL)", shape={"B": b, "dim": dim, "target_dim": tdim},
        dtype=torch.float32, make=make,
        providers={"reference": on_reference(lambda own, seed, ids, t: _geometry_step(own, ids, t,
                                                                                   fastvq.pairwise_kl_loss)),
                   "fastvq": on_triton(lambda own, seed, ids, t: _geometry_step(own, ids, t, fastvq.pairwise_kl_loss))},
        peers={"seed": lambda own, seed, ids, t: _geometry_step(seed, ids, t, seed_pairwise_kl_loss),
               "seed compiled": lambda own, seed, ids, t: seed_compiled(seed, ids, t, seed_pairwise_kl_loss)},
        flops=2.0 * b * b * (dim + tdim) * 2, ceiling="matmul", matmul_shape=(b, dim, b),
        unit_bytes=b * dim * 4)]


register("vector_quantizer_step", vector_quantizer_cases, weight=STEP_ROWS)
register("residual_quantizer_step", residual_quantizer_cases, weight=STEP_ROWS)
register("qr_embedding_step", qr_embedding_cases, weight=STEP_ROWS)
register("pairwise_geometry_step", pairwise_geometry_cases, weight=STEP_ROWS)
