"""Test helpers: one tolerance table per dtype, used everywhere; seeded random inputs."""

from __future__ import annotations

import math

import torch

# (rtol, atol) per dtype; atol is scaled by sqrt(reduction length) in assert_close.
TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float64: (1e-10, 1e-10),
}


def tol(dtype: torch.dtype, reduce_len: int = 1) -> dict:
    rtol, atol = TOL[dtype]
    return {"rtol": rtol, "atol": atol * math.sqrt(max(reduce_len, 1))}


def assert_close(actual, expected, dtype=None, reduce_len: int = 1, msg: str = "") -> None:
    """Compare with the tolerance of ``dtype`` (default: the dtype of ``actual``)."""
    dtype = dtype or actual.dtype
    torch.testing.assert_close(actual.double(), expected.double(), **tol(dtype, reduce_len), msg=msg or None)


def randn(*shape, dtype=torch.float32, device="cpu", seed: int | None = None, scale: float = 1.0,
          requires_grad: bool = False) -> torch.Tensor:
    """Fresh random normal input; a seed only where a test must be reproducible."""
    g = torch.Generator(device="cpu")
    g.manual_seed(seed if seed is not None else torch.randint(0, 2**31 - 1, ()).item())
    t = (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """Same values as ``t``, with a last-dim stride of 2 (not contiguous)."""
    big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    big[..., ::2] = t
    out = big[..., ::2]
    assert not out.is_contiguous() or t.shape[-1] <= 1
    return out


def count_kernel_launches(monkeypatch, module, *names) -> list:
    """Spy on the named ``@triton.jit`` kernels of ``module``; returns the list of names launched."""
    launched = []
    for name in names:
        kernel = getattr(module, name)

        def run(*args, _real=kernel.run, _name=name, **kwargs):
            launched.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    return launched
