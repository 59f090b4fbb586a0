"""torch's default dtype is a training script's global state: fastvq's results must not depend on it.

fuzzN: under ``torch.set_default_dtype(torch.float64)`` the reference residual path built a
float64 scale from two Python scalars and failed (``double != float``) in every quantizer's l2
step on the CPU path, k-means init built float64 row weights that ``code_statistics`` refused,
and the random scores that pick k-means-init and revival rows were drawn in the default dtype:
under ``bfloat16`` hundreds of scores tied and ``topk`` took the first rows of the batch (64 of
64 initial codes from the first half of a batch). Every internal tensor now names its dtype.

Each case runs once under torch's float32 default and once under another default, from the same
seeds, with modules built under the float32 default; outputs, gradients and state must be equal
bit for bit.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import fastvq
from tests.utils import randn


@contextlib.contextmanager
def _default_dtype(dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def _modules():
    nn = fastvq.nn
    return {
        "vq-ema-kmeans-revival": lambda: nn.VectorQuantizer(8, 4, ema=True, kmeans_init=True, kmeans_iters=2,
                                                            dead_code_threshold=1.0),
        "vq-rotation-revival": lambda: nn.VectorQuantizer(8, 4, grad="rotation", dead_code_threshold=1.0),
        "vq-cosine-kmeans": lambda: nn.VectorQuantizer(8, 4, metric="cosine", kmeans_init=True, kmeans_iters=1),
        "rq-ema-kmeans-revival": lambda: nn.ResidualQuantizer(2, 8, 4, ema=True, kmeans_init=True, kmeans_iters=2,
                                                              dead_code_threshold=1.0),
        "rq-half": lambda: nn.ResidualQuantizer(2, 8, 4).half(),
    }


def _train(make, device, steps=2):
    """Two SGD steps of a module built under the float32 default; everything it produced."""
    torch.manual_seed(0)
    with _default_dtype(torch.float32):
        m = make().to(device)
    out = []
    params = [p for p in m.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.1) if params else None
    for step in range(steps):
        x = randn(40, 4, seed=step, device=device).to(next(m.parameters()).dtype).requires_grad_()
        q, commit, embed, codes = m(x)
        (q.float().square().mean() + commit.float() + embed.float()).backward()
        out += [q, commit, embed, codes, x.grad]
        if opt is not None:
            opt.step()
            opt.zero_grad()
    return out + list(m.state_dict().values())


def _ops(device):
    """The ops whose reference builds scalars or weights internally, forward and backward."""
    x = randn(30, 6, seed=1, device=device).requires_grad_()
    cb = randn(2, 5, 6, seed=2, device=device)
    cb[0, 0, 0] = 3e38  # a rescue pass: the scaled search of a residual beyond 2^48
    x64 = x.detach().clone()
    x64[0] = 1e30
    q, codes = fastvq.residual_quantize(x64, cb)
    step = fastvq.residual_quantize_step(x, cb.clone().requires_grad_(), grad="rotation")
    (step.quantized.sum() + step.commitment_loss).backward()
    idx, dist = fastvq.nearest_code(x.detach(), cb[1])
    counts, sums = fastvq.code_statistics(x.detach(), idx, 5)
    return [q, codes, step.quantized, step.codes, x.grad, idx, dist, counts, sums]


@pytest.mark.parametrize("default", [torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["ops", *_modules()])
def test_results_do_not_depend_on_torchs_default_dtype(backend, device, default, case):
    run = (lambda: _ops(device)) if case == "ops" else (lambda: _train(_modules()[case], device))
    with _default_dtype(torch.float32):
        torch.manual_seed(0)
        want = run()
    with _default_dtype(default):
        torch.manual_seed(0)
        got = run()
    assert torch.get_default_dtype() == torch.float32
    assert len(got) == len(want)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype and torch.equal(a.nan_to_num(), b.nan_to_num()), (case, i, a, b)
