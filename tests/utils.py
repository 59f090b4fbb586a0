"""Test helpers: seeded random inputs on the suite's device, the tolerance helper, a launch spy.

``DEVICE`` is where the suite runs: ``"cuda"`` on a machine with CUDA (the Triton kernels run
compiled there), else ``"cpu"`` (the kernels run under the Triton interpreter). Every helper
defaults to it, and tests/conftest.py makes it torch's default device on CUDA, so a test that
names no device runs on the right one (tests/test_suite_rules.py forbids naming one).
"""

from __future__ import annotations

import math

import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

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


def _seed(seed: int | None) -> int:
    """``seed``, or the next draw of torch's global stream (which conftest seeds per test)."""
    return int(seed) if seed is not None else int(torch.randint(0, 2**31 - 1, (), device="cpu"))


def generator(seed: int | None = None, device: str | None = None) -> torch.Generator:
    """A ``torch.Generator`` on the suite's device (for ``torch.randint(..., generator=g)`` and friends)."""
    return torch.Generator(device=device or DEVICE).manual_seed(_seed(seed))


def randn(*shape, dtype=torch.float32, device: str | None = None, seed: int | None = None, scale: float = 1.0,
          requires_grad: bool = False) -> torch.Tensor:
    """Random normal input on ``device`` (default: the suite's). Drawn in float64 on the CPU from
    ``seed`` (or from the test's seeded stream), so a seed gives the same values on every device."""
    g = torch.Generator(device="cpu").manual_seed(_seed(seed))
    t = torch.randn(*shape, generator=g, dtype=torch.float64, device="cpu") * scale
    return t.to(device=device or DEVICE, dtype=dtype).requires_grad_(requires_grad)


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
