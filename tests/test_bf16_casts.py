"""bfloat16 <-> float32 casts inside a kernel give the bits a GPU gives (and torch gives).

Under the Triton interpreter these casts are ``kernels._common``'s fix of the interpreter (its
generic float conversion gets subnormals wrong both ways and truncates on the way down); on a
GPU the same tests check the compiled casts. The last test is what the fix was for: a bf16
search on subnormal-sized inputs, which used to pick wrong codes when interpreted.
"""

import pytest
import torch
import triton
import triton.language as tl

import fastvq
from fastvq.kernels import _common  # noqa: F401 (importing it fixes the interpreter's casts)

from .utils import generator, randn


@triton.jit
def _cast_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask), mask=mask)  # the store casts


def _launch(kernel, x, dtype):
    y = torch.empty(x.shape, dtype=dtype, device=x.device)
    block = 4096
    kernel[(triton.cdiv(x.numel(), block),)](x, y, x.numel(), BLOCK=block)
    return y


def _same_bits(got, want):
    """Equal bits, any NaN matching any NaN (a GPU's quiet-NaN payload may differ)."""
    width = torch.int16 if got.dtype == torch.bfloat16 else torch.int32
    return (got.view(width) == want.view(width)) | (torch.isnan(got) & torch.isnan(want))


def test_every_bf16_value_widens_exactly(device):
    x = torch.arange(-(2**15), 2**15, dtype=torch.int32, device=device).to(torch.int16).view(torch.bfloat16)
    got = _launch(_cast_kernel, x, torch.float32)
    bad = ~_same_bits(got, x.float())
    assert not bad.any(), f"{int(bad.sum())} of 65536 bf16 values widened wrongly, e.g. {x[bad][:4].tolist()}"


@pytest.mark.parametrize("kernel", [_cast_kernel, _store_kernel], ids=["to", "store"])
def test_float32_narrows_to_bf16_by_nearest_even(device, kernel):
    g = generator()
    bits = torch.randint(-(2**31), 2**31 - 1, (40_000,), generator=g, dtype=torch.int32)
    ties = (torch.randint(-(2**15), 2**15, (4_000,), generator=g, dtype=torch.int32) << 16) | 0x8000  # halfway
    specials = torch.tensor([float("nan"), float("inf"), -float("inf"), 3.3895e38, 3.4e38, -0.0, 0.0, 1e-45,
                             1.1754942e-38, 9.2e-41, -3e-40], device=device)
    x = torch.cat([bits.view(torch.float32), ties.view(torch.float32), specials])
    got = _launch(kernel, x, torch.bfloat16)
    bad = ~_same_bits(got, x.to(torch.bfloat16))
    assert not bad.any(), f"{int(bad.sum())} float32 values narrowed wrongly, e.g. {x[bad][:4].tolist()}"


@pytest.mark.parametrize("metric", ["l2", "dot", "cosine"])
def test_bf16_search_on_subnormal_inputs_matches_float64(device, metric):
    x = randn(24, 8, scale=1e-39, device=device).to(torch.bfloat16)
    codes = randn(16, 8, scale=1e-39, device=device).to(torch.bfloat16)
    assert (x.float().abs() < torch.finfo(torch.float32).tiny).float().mean() > 0.9  # mostly subnormal
    with fastvq.backend("triton"):
        idx, dist = fastvq.nearest_code(x, codes, metric=metric)
    fastvq.testing.assert_argmin_within_bound(x, codes, idx, metric, name=metric)
    exact, magnitude, n = fastvq.testing.distances64(x, codes, metric)
    rows = torch.arange(len(x), device=device)
    fastvq.testing.assert_close(dist, exact[rows, idx], dtype=torch.float32, reduce_len=n,
                                magnitude=magnitude[rows, idx], name=f"{metric} distances")


def test_float_arguments_are_float32_as_on_a_gpu():
    # A GPU launch types a Python float argument fp32; the interpreter kept it float64, so a
    # kernel widening it computed differently on the CPU (mutC C30). kernels._common passes it as
    # float32 there too.
    import triton
    import triton.language as tl

    from fastvq.kernels import _common

    if not _common.INTERPRETED:
        pytest.skip("checks the interpreter's argument conversion")

    @triton.jit
    def widen(p, x):
        tl.store(p, x * tl.full((), 1.0, tl.float64))

    import numpy as np

    want = float(torch.tensor(0.8333333333333334, dtype=torch.float32))
    for x in (0.8333333333333334, np.float64(0.8333333333333334)):  # (numpy's: review13)
        out = torch.zeros(1, dtype=torch.float64)
        widen[(1,)](out, x)
        assert out.item() == want, type(x)
