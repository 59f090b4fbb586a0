"""Every launcher runs on its tensors' device (Triton launches on the *current* CUDA device).

All launchers go through ``kernels._common.launcher``, which enters
``kernels._common.device_context(device of the first tensor argument)``. Here every op runs
under the Triton backend with a spy on that context, and each public launcher must have entered
the device its tensors live on. On CPU that device is ``cpu``; on a multi-GPU node the same path
switches to the tensors' GPU.
"""

import importlib
import inspect
import pkgutil

import pytest
import torch

import fastvq
from fastvq import kernels
from fastvq.kernels import _common

from .utils import randn


def _launcher_names():
    out = []
    for info in pkgutil.iter_modules(kernels.__path__):
        if info.name.startswith("_"):
            continue
        mod = importlib.import_module(f"fastvq.kernels.{info.name}")
        for name, fn in inspect.getmembers(mod, inspect.isfunction):
            if fn.__module__ == mod.__name__ and (name.endswith("_fwd") or "_bwd" in name) and not name.startswith("_"):
                out.append((info.name, name, fn))
    return out


def test_every_public_launcher_is_wrapped():
    names = _launcher_names()
    assert len(names) >= 13, names
    unwrapped = [f"{m}.{n}" for m, n, fn in names if getattr(fn, "__wrapped__", None) is None]
    assert not unwrapped, f"launchers not going through kernels._common.launcher: {unwrapped}"


@pytest.fixture
def entered(monkeypatch):
    seen = []
    real = _common.device_context

    def spy(device):
        seen.append(torch.device(device))
        return real(device)

    monkeypatch.setattr(_common, "device_context", spy)
    return seen


def _run_every_op(device):
    x = randn(9, 16, device=device, seed=1, requires_grad=True)
    c = randn(5, 16, device=device, seed=2)
    fastvq.nearest_code(x, c)
    fastvq.mine_negatives(x, randn(9, 16, device=device, seed=3), c, strategy="semi-hard")
    fastvq.pairwise_sqdist(x, c).sum().backward()
    q, codes = fastvq.residual_quantize(x, randn(2, 5, 16, device=device, seed=4))
    fastvq.code_statistics(x.detach(), codes[:, 0], 5)
    fastvq.code_usage(codes[:, 0], 5)
    fastvq.semantic_ids(codes)
    fastvq.rotation_trick(x, c[codes[:, 0]]).sum().backward()
    ids = torch.arange(9, device=device)
    qw = randn(3, 16, device=device, seed=5, requires_grad=True)
    rw = randn(4, 16, device=device, seed=6, requires_grad=True)
    fastvq.qr_lookup(ids, qw, rw).sum().backward()
    fastvq.pairwise_kl_loss(x, randn(9, 8, device=device, seed=7), temperature=0.5).backward()


def test_every_launcher_enters_its_tensors_device(entered, device):
    with fastvq.backend("triton"):
        _run_every_op(device)
    want = torch.device(device)
    assert entered, "no launch went through kernels._common.device_context"
    assert all(d.type == want.type and (d.index in (None, want.index)) for d in entered), entered
    # one entry per launcher call: at least one for each of the 13 launchers exercised above
    assert len(entered) >= 13, len(entered)
