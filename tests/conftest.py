"""Shared test setup.

- Without CUDA, the Triton kernels run under the interpreter: TRITON_INTERPRET=1 is set here,
  before any fastvq kernel module is imported (Triton reads it when a kernel is defined).
- `backend` runs a test once per backend ("reference", "triton"), the Triton one really
  launching kernels (interpreted on CPU).
- Every torch.empty / empty_like made while a test runs is poisoned (NaN for floats, a large
  negative sentinel for integers), so an output element a kernel forgets to write fails.
- Tests marked `gpu` skip cleanly without CUDA.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastvq  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
POISON_INT = -(2**31) + 7


def _poison(t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # torch.empty(..., requires_grad=True) gives a leaf: fill it untracked
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(POISON_INT if t.dtype not in (torch.int8, torch.uint8, torch.int16) else -1)
    return t


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def empty(*args, **kwargs):
        return _poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return _poison(real_empty_like(*args, **kwargs))

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    yield


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    """Run the test under each backend; yields the backend name."""
    with fastvq.backend(request.param):
        yield request.param


@pytest.fixture
def device():
    return DEVICE


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
