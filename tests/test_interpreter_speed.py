"""tests/_interpreter_speed.py changes how fast Triton's interpreter runs, never what it computes."""

from __future__ import annotations

import pytest
import torch
import triton

import fastvq
from tests import _interpreter_speed
from tests.utils import generator

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs only without CUDA")

TRITON_MINOR = ".".join(triton.__version__.split(".")[:2])


def _kernels_run():
    """Outputs of kernels that call ``@triton.jit`` helpers (float32 and bfloat16), forward and backward."""
    g = generator(5)
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        x = (torch.randn(37, 24, generator=g) * 3).to(dtype).requires_grad_()
        cb = torch.randn(3, 40, 24, generator=g).to(dtype).requires_grad_()
        with fastvq.backend("triton"):
            step = fastvq.residual_quantize_step(x, cb, grad="rotation", statistics=True)
            (step.commitment_loss + step.embedding_loss + step.quantized.square().sum()).backward()
            idx, dist = fastvq.nearest_code(x.detach(), cb[0].detach(), metric="cosine")
        out += [step.codes, step.quantized, step.counts, step.sums, x.grad, cb.grad, idx, dist]
    return [t.detach().clone() for t in out]


def test_installed_on_the_pinned_tritons():
    if TRITON_MINOR not in ("3.6", "3.8"):
        pytest.skip(f"written against triton 3.6 and 3.8's interpreter; this is {triton.__version__}")
    assert _interpreter_speed.install(), "the interpreter's internals changed: update tests/_interpreter_speed.py"


def test_same_bits_with_and_without(monkeypatch):
    if not _interpreter_speed.install():
        pytest.skip("not installed on this triton")
    try:
        fast = _kernels_run()
        _interpreter_speed.uninstall()
        slow = _kernels_run()
    finally:
        _interpreter_speed.install()
    assert len(fast) == len(slow)
    for i, (a, b) in enumerate(zip(fast, slow)):
        assert a.dtype == b.dtype and a.shape == b.shape, i
        assert torch.equal(a.view(torch.uint8) if a.is_floating_point() else a,
                           b.view(torch.uint8) if b.is_floating_point() else b), f"output {i} differs"


def test_helpers_no_longer_repatch_the_language(monkeypatch):
    """One ``_patch_lang`` walk per launch, not one per helper call (the time it saves)."""
    if not _interpreter_speed.install():
        pytest.skip("not installed on this triton")
    from triton.runtime import interpreter as itp

    calls = []
    original = itp._patch_lang
    monkeypatch.setattr(itp, "_patch_lang", lambda fn: calls.append(fn.__name__) or original(fn))
    x = torch.randn(40, 8)
    with fastvq.backend("triton"):
        fastvq.residual_quantize_step(x, torch.randn(2, 5, 8))
    assert calls == ["_residual_quantize_fwd_kernel"], calls
    calls.clear()
    _interpreter_speed.uninstall()
    try:
        with fastvq.backend("triton"):
            fastvq.residual_quantize_step(x, torch.randn(2, 5, 8))
    finally:
        _interpreter_speed.install()
    assert calls[0] == "_residual_quantize_fwd_kernel" and len(calls) > 1, calls
