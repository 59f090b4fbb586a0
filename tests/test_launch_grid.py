"""Launch grids past one axis's limit (CUDA: 2**31 - 1 programs on axis 0, 65,535 on axes 1, 2).

Launchers whose program count grows with the data launch ``kernels._common.flat_grid(n)``, which
folds axis 0 into axis 1 when it is full, and their kernels read ``flat_program_id()``. Here
the limits are lowered (``_common.GRID_LIMITS``) so that small inputs need the fold: every grid
the interpreter is handed must respect the lowered limits, at least one launch of each kernel
must have folded, and the results must be bitwise those of the unfolded launch. No huge tensor.
"""

import math

import pytest
import torch

import fastvq
from fastvq import kernels
from fastvq.kernels import _common

from .utils import generator, randn

pytestmark = pytest.mark.skipif(not kernels.INTERPRETED, reason="grids are read from the Triton interpreter")

LIMIT_X = 2
GUARD = 64  # elements after every torch.empty buffer, to catch a program writing past the end


@pytest.fixture
def grids(monkeypatch):
    """Every (kernel, grid) the interpreter launches while the limits are lowered."""
    from triton.runtime import interpreter

    seen = []
    real_run = interpreter.InterpretedFunction.run
    real_dim = interpreter.interpreter_builder.set_grid_dim
    current = []

    def run(self, *args, _real=real_run, **kwargs):
        current.append(getattr(self, "__name__", "?"))
        try:
            return _real(self, *args, **kwargs)
        finally:
            current.pop()

    def set_grid_dim(nx, ny, nz):
        seen.append((current[-1] if current else "?", (nx, ny, nz), _common.GRID_LIMITS[0] == LIMIT_X))
        return real_dim(nx, ny, nz)

    monkeypatch.setattr(interpreter.InterpretedFunction, "run", run)
    monkeypatch.setattr(interpreter.interpreter_builder, "set_grid_dim", set_grid_dim)
    return seen


@pytest.fixture(autouse=True)
def guarded_empty(monkeypatch):
    """torch.empty hands out the front of a longer buffer whose tail holds a sentinel: a surplus
    program of a folded grid that writes past its output changes the tail, and the test fails."""
    real = torch.empty
    buffers = []

    def empty(*size, dtype=None, device=None, **kwargs):
        if kwargs or (size and not isinstance(size[0], int) and len(size) != 1):
            return real(*size, dtype=dtype, device=device, **kwargs)
        shape = tuple(size[0]) if len(size) == 1 and not isinstance(size[0], int) else tuple(size)
        n = math.prod(shape)
        buf = real(n + GUARD, dtype=dtype, device=device)
        sentinel = 12345 if buf.dtype != torch.bool else True
        buf[n:] = sentinel
        buf[:n] = float("nan") if buf.is_floating_point() else 0
        buffers.append((buf, n, sentinel))
        return buf[:n].view(shape)

    monkeypatch.setattr(torch, "empty", empty)
    yield
    for buf, n, sentinel in buffers:
        assert (buf[n:] == sentinel).all(), "a kernel wrote past the end of its output"


def _both(fn):
    """``fn()`` with the real limits and with axis 0 lowered to LIMIT_X programs."""
    with fastvq.backend("triton"):
        want = fn()
        saved = list(_common.GRID_LIMITS)
        _common.GRID_LIMITS[0] = LIMIT_X
        try:
            got = fn()
        finally:
            _common.GRID_LIMITS[:] = saved
    return want, got


def _assert_folded(grids, names):
    lowered = [(name, dims) for name, dims, low in grids if low]
    for name, (nx, ny, nz) in lowered:
        assert nx <= LIMIT_X and ny <= _common.GRID_LIMITS[1] and nz <= _common.GRID_LIMITS[2], (name, nx, ny, nz)
    folded = {name for name, (_, ny, _) in lowered if ny > 1}
    assert set(names) <= folded, f"not folded: {set(names) - folded}"


def _equal(a, b, exact=True):
    for x, y in zip(a, b):
        if x is None:
            assert y is None
        elif exact:
            assert torch.equal(x, y)
        else:  # atomics: another program order, another rounding
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def _grad_run(fn, *leaves):
    leaves = [t.detach().clone().requires_grad_() for t in leaves]
    out = fn(*leaves)
    out.backward(torch.ones_like(out) if out.dim() else None)
    return (out.detach(), *(t.grad for t in leaves))


def test_rotation_trick(grids, device):
    e, q = randn(300, 64, seed=0, device=device), randn(300, 64, seed=1, device=device)
    want, got = _both(lambda: _grad_run(fastvq.rotation_trick, e, q)[:2])
    _equal(want, got)
    from fastvq.kernels.rotation_trick import rotation_trick_bwd

    want, got = _both(lambda: (rotation_trick_bwd(e[:40], q[:40], e[:40], 1e-6, 1e-3, block_d=16),))
    _equal(want, got)
    _assert_folded(grids, ["_rotation_trick_fwd_kernel", "_rotation_trick_bwd_kernel"])


def test_pairwise_kl_loss(grids, device):
    pred, target = randn(200, 8, seed=2, device=device), randn(200, 5, seed=3, device=device)
    want, got = _both(lambda: _grad_run(lambda p: fastvq.pairwise_kl_loss(p, target, 0.5), pred))
    _equal(want, got)
    _assert_folded(grids, ["_pairwise_kl_loss_fwd_kernel", "_pairwise_kl_loss_bwd_kernel"])


def test_code_usage_and_semantic_ids(grids, device):
    idx = torch.randint(0, 7, (5000,), generator=generator(4)).to(device)
    codes = torch.randint(0, 3, (1000, 2), generator=generator(5)).to(device)
    want, got = _both(lambda: (fastvq.code_usage(idx, 7).counts, fastvq.semantic_ids(codes)))
    _equal(want, got)
    _assert_folded(grids, ["_code_usage_fwd_kernel", "_semantic_ids_fwd_kernel"])


@pytest.mark.parametrize("deterministic,sparse", [(True, False), (False, False), (True, True)],
                         ids=["sorted", "atomic", "sparse"])
def test_qr_lookup(grids, device, deterministic, sparse, monkeypatch):
    from fastvq.kernels import qr_lookup as kmod

    monkeypatch.setattr(kmod, "KEYS_BLOCK", 64)  # 300 ids: 5 programs of the key kernel
    g = generator(6)
    ids = torch.randint(-10**6, 10**6, (300,), generator=g).to(device)
    offsets = torch.sort(torch.randint(0, 300, (9,), generator=g)).values.to(device)
    offsets[0] = 0
    qw, rw = randn(13, 8, seed=7, device=device), randn(10, 8, seed=8, device=device)  # 23 rows: odd
    w = randn(300, seed=9, device=device)

    def run():
        plain = _grad_run(lambda a, b: fastvq.qr_lookup(ids, a, b, "mult", deterministic=deterministic, sparse=sparse),
                          qw, rw)
        bags = _grad_run(lambda a, b, x: fastvq.qr_lookup(ids, a, b, "mult", offsets=offsets, per_sample_weights=x,
                                                          deterministic=deterministic, sparse=sparse), qw, rw, w)
        dense = [t.to_dense() if t is not None and t.is_sparse else t for t in (*plain, *bags)]
        return dense

    want, got = _both(run)
    _equal(want, got, exact=deterministic or sparse)
    names = ["_qr_lookup_fwd_kernel", "_qr_psw_grad_kernel",
             "_qr_atomic_kernel" if not deterministic and not sparse else "_qr_rows_kernel"]
    if deterministic or sparse:
        names.append("_qr_keys_kernel")
    _assert_folded(grids, names)


def test_flat_grid_covers_every_program():
    saved = list(_common.GRID_LIMITS)
    try:
        _common.GRID_LIMITS[0] = 7
        for n in (1, 6, 7, 8, 49, 50, 1000):
            x, y = _common.flat_grid(n)
            assert x <= 7 and x * y >= n and x * (y - 1) < n
    finally:
        _common.GRID_LIMITS[:] = saved
    assert _common.flat_grid(2**33) == (2**31 - 1, 5)
