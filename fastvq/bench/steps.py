"""Training-step rows of `python -m fastvq bench` (weight ``STEP_ROWS``: after the op rows).

One group per module: a whole training step (forward, the losses, backward; the codebook update
where the module makes one) at the README's shapes. Providers: ``reference`` (the same module
under the pure-torch reference backend, eager) and ``fastvq`` (Triton kernels); the modules' own
work adds the seeds' modules, ``torch.compile`` of them and vector-quantize-pytorch (peer rows go
in :mod:`fastvq.bench.vqp`). ``bytes`` is the fewest bytes a fused step must move (so GB/s says
how close the step is to moving its data once); see :mod:`fastvq.bench.registry` to add a group.
"""

from __future__ import annotations

import torch

import fastvq

from .registry import STEP_ROWS, Case, on_reference, on_triton, register


def _vq_step(vq, x, g):
    """One straight-through training step: forward, both losses, backward."""
    vq.zero_grad(set_to_none=True)
    q, commit, emb, _ = vq(x)
    (q * g).sum().add(0.25 * commit + emb).backward()
    return q


def vector_quantizer_cases(device, quick):
    shapes = [(4096, 64, 512, torch.float32)] if quick else [(262144, 64, 512, torch.float32),
                                                            (262144, 256, 4096, torch.float32)]
    out = []
    for n, d, k, dt in shapes:
        def make(dev, n=n, d=d, k=k, dt=dt):
            vq = fastvq.nn.VectorQuantizer(k, d).to(device=dev, dtype=dt).train()
            x = torch.randn(n, d, device=dev, dtype=dt, requires_grad=True)
            return vq, x, torch.randn(n, d, device=dev, dtype=dt)

        es = torch.finfo(dt).bits // 8
        out.append(Case(
            op="VectorQuantizer step (ste)", shape={"N": n, "D": d, "K": k}, dtype=dt, make=make,
            providers={"reference": on_reference(_vq_step), "fastvq": on_triton(_vq_step)},
            # read x and g, write q and grad_x (and the codebook and its gradient once each)
            bytes=4.0 * n * d * es + 2.0 * k * d * es, flops=2.0 * n * k * d, ceiling="copy"))
    return out


register("vector_quantizer_step", vector_quantizer_cases, weight=STEP_ROWS)
