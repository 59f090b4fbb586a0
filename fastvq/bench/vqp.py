"""vector-quantize-pytorch rows of `python -m fastvq bench` (weight ``PEER_ROWS``).

One training step (forward, VQP's commitment loss plus a random linear loss on the output,
backward, VQP's EMA update) of an unchanged vector-quantize-pytorch model, three ways:

- ``vqp``: VQP as it is (its ``N x K`` distance matrix and one-hot matmuls);
- ``vqp patched (reference)``: the same model after
  :func:`fastvq.integrations.vector_quantize_pytorch.patch`, fastvq's pure-torch reference ops
  (runs and is timed on a CPU too);
- ``fastvq: vqp patched``: patched, fastvq's Triton kernels (timed on CUDA only);

and the same step in fastvq's own module (``reference`` / ``fastvq`` providers):
``fastvq.nn.VectorQuantizer`` / ``ResidualQuantizer`` with EMA (decay 0.8, VQP's default) and
the rotation trick. Shapes: ``VectorQuantize(dim=256, codebook_size=4096 | 8192)`` on N = 16K to
1M vectors, and ``ResidualVQ`` with 8 levels of 1024 codes; small shapes for ``--quick`` (and on
a CPU). The rows are skipped with a note where VQP or its dependencies are not installed (the GPU
image has none of them).

``python -m fastvq.bench.vqp`` measures, on this machine, the step time (wall and process CPU)
and peak extra host memory of ``VectorQuantize(dim=256, codebook_size=4096)`` on 16,384 vectors, unpatched and
patched (reference backend), each in a fresh process (``--help`` for the options).
"""

from __future__ import annotations

import contextlib

import torch

import fastvq

from .registry import PEER_ROWS, Case, fits, on_reference, on_triton, register

M = 1 << 20
REQUIRES = ("vector_quantize_pytorch", "einops", "einx", "loguru")


def _patched(fn):
    """Run ``fn`` with the VQP integration patched in (and restore VQP after)."""

    def run(*args):
        from fastvq.integrations import vector_quantize_pytorch as fastvq_vqp

        with fastvq_vqp.patched():
            return fn(*args)

    run.__name__ = getattr(fn, "__name__", "run")
    return run


def _vqp_step(model, x, g):
    """One VQP training step: forward (EMA update inside), ``(q * g).sum() + loss``, backward."""
    x.grad = None
    q, _, loss = model(x)
    (q * g).sum().add(loss.sum()).backward()
    return q


def _own_step(model, x, g):
    """The same step in fastvq's own module (its commitment loss at VQP's weight 1)."""
    x.grad = None
    model.zero_grad(set_to_none=True)
    q, commit, emb, _ = model(x)
    (q * g).sum().add(commit + emb).backward()
    return q


def _providers(step_vqp, step_own):
    return {
        "vqp": on_reference(step_vqp),  # the backend does not matter unpatched
        "vqp patched (reference)": on_reference(_patched(step_vqp)),
        "fastvq: vqp patched": on_triton(_patched(step_vqp)),
        "reference": on_reference(step_own),
        "fastvq": on_triton(step_own),
    }


def _vq_make(n, d, k, dt):
    def make(dev):
        from vector_quantize_pytorch import VectorQuantize

        vqp = VectorQuantize(dim=d, codebook_size=k).to(dev).train()
        own = fastvq.nn.VectorQuantizer(k, d, ema=True, decay=0.8, grad="rotation").to(dev).train()
        x = torch.randn(1, n, d, device=dev, dtype=dt, requires_grad=True)
        g = torch.randn(1, n, d, device=dev, dtype=dt)
        return vqp, own, x, g

    return make


def _rvq_make(n, d, k, levels, dt):
    def make(dev):
        from vector_quantize_pytorch import ResidualVQ

        vqp = ResidualVQ(dim=d, num_quantizers=levels, codebook_size=k).to(dev).train()
        own = fastvq.nn.ResidualQuantizer(levels, k, d, ema=True, decay=0.8, grad="rotation").to(dev).train()
        x = torch.randn(1, n, d, device=dev, dtype=dt, requires_grad=True)
        g = torch.randn(1, n, d, device=dev, dtype=dt)
        return vqp, own, x, g

    return make


def _split(step_vqp, step_own):
    """Providers taking the shared inputs ``(vqp model, own model, x, g)``."""
    return _providers(lambda vqp, own, x, g: step_vqp(vqp, x, g),
                      lambda vqp, own, x, g: step_own(own, x.squeeze(0), g.squeeze(0)))


def _skip_large(n, k, device):
    """Providers that cannot run at this shape: unpatched VQP's float32 ``N x K`` matrices
    (distances, one-hot, their gradients: about five live at once in a training step, per level)
    beyond the memory at hand."""
    need = 5 * 4.0 * n * k
    if fits(need, device):
        return {}
    return {"vqp": f"needs ~{need / 2**30:.0f} GiB for its N x K matrices"}


def vqp_vector_quantize_cases(device, quick):
    d = 256
    shapes = [(2048, 64, 512)] if quick else [(16384, d, 4096), (16384, d, 8192), (262144, d, 4096),
                                                (262144, d, 8192), (M, d, 4096), (M, d, 8192)]
    out = []
    for n, dim, k in shapes:
        out.append(Case(
            op="vqp VectorQuantize step", shape={"N": n, "D": dim, "K": k}, dtype=torch.float32,
            make=_vq_make(n, dim, k, torch.float32), providers=_split(_vqp_step, _own_step),
            flops=2.0 * n * k * dim, ceiling="matmul", matmul_shape=(n, dim, k),
            skip=_skip_large(n, k, device)))
    return out


def vqp_residual_vq_cases(device, quick):
    levels = 8
    shapes = [(2048, 64, 256)] if quick else [(16384, 256, 1024), (262144, 256, 1024)]
    out = []
    for n, dim, k in shapes:
        out.append(Case(
            op="vqp ResidualVQ step", shape={"N": n, "D": dim, "K": k, "L": levels}, dtype=torch.float32,
            make=_rvq_make(n, dim, k, levels, torch.float32), providers=_split(_vqp_step, _own_step),
            flops=2.0 * n * k * dim * levels, ceiling="matmul", matmul_shape=(n, dim, k * levels),
            skip=_skip_large(n, k, device)))
    return out


register("vqp_vector_quantize", vqp_vector_quantize_cases, weight=PEER_ROWS, requires=REQUIRES)
register("vqp_residual_vq", vqp_residual_vq_cases, weight=PEER_ROWS, requires=REQUIRES)


# ------------------------------------------------------- host memory and time, one process each


def _one_run(variant: str, n: int, dim: int, k: int, steps: int) -> dict:
    """Build ``VectorQuantize(dim, k)``, run one warm-up step and ``steps`` timed steps of
    ``variant`` (``"vqp"`` or ``"patched"``, reference backend); report the median step time and
    the peak resident memory the steps added (``ru_maxrss`` after minus before: run it in a fresh
    process, so that nothing earlier set the high-water mark)."""
    import resource
    import statistics
    import time

    from vector_quantize_pytorch import VectorQuantize

    from fastvq.integrations import vector_quantize_pytorch as fastvq_vqp

    torch.manual_seed(0)
    model = VectorQuantize(dim=dim, codebook_size=k).train()
    x = torch.randn(1, n, dim, requires_grad=True)
    g = torch.randn(1, n, dim)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    ctx = fastvq_vqp.patched() if variant == "patched" else contextlib.nullcontext()
    times, cpu = [], []
    with ctx, fastvq.backend("reference"):
        for i in range(steps + 1):
            t0, c0 = time.perf_counter(), time.process_time()
            _vqp_step(model, x, g)
            if i:
                times.append((time.perf_counter() - t0) * 1e3)
                cpu.append((time.process_time() - c0) * 1e3)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "N": n, "D": dim, "K": k, "ms": statistics.median(times), "times_ms": times,
            "cpu_ms": statistics.median(cpu), "threads": torch.get_num_threads(),
            "peak_extra_mib": (after - before) / 1024}


def main(argv=None) -> int:
    import argparse
    import json
    import subprocess
    import sys

    p = argparse.ArgumentParser(prog="python -m fastvq.bench.vqp", description=(
        "Step time and peak extra host memory of VQP's VectorQuantize, unpatched vs patched "
        "(fastvq reference backend), each variant in a fresh process."))
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--k", type=int, default=4096)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=1, help="processes per variant (alternating)")
    p.add_argument("--one", choices=["vqp", "patched"], help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    small = [f"--{name}" for name in ("n", "dim", "k", "steps", "repeats") if getattr(a, name) < 1]
    if small:
        p.error(f"{', '.join(small)} must be at least 1")
    if a.one:
        print(json.dumps(_one_run(a.one, a.n, a.dim, a.k, a.steps)))
        return 0
    rows = []
    for _ in range(a.repeats):
        for variant in ("vqp", "patched"):
            cmd = [sys.executable, "-m", "fastvq.bench.vqp", "--one", variant, "--n", str(a.n), "--dim", str(a.dim),
                   "--k", str(a.k), "--steps", str(a.steps)]
            run = subprocess.run(cmd, capture_output=True, text=True)
            if run.returncode != 0:  # (its own error, not a bare CalledProcessError)
                print(f"the {variant} run failed (exit {run.returncode}):\n{run.stderr[-4000:]}", file=sys.stderr)
                return 1
            rows.append(json.loads(run.stdout.strip().splitlines()[-1]))
            r = rows[-1]
            print(f"{variant:8s} N={a.n} D={a.dim} K={a.k}: step {r['ms']:.0f} ms wall (median of {a.steps}: "
                  f"{', '.join(f'{t:.0f}' for t in r['times_ms'])}), {r['cpu_ms']:.0f} ms CPU over "
                  f"{r['threads']} threads, peak extra memory {r['peak_extra_mib']:.0f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
