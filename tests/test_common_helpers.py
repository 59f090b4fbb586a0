"""The kernel-side helpers of kernels/_common.py, run through tiny kernels (the interpreter on the
CPU), and their pure-torch twins in fastvq.reference: the same bits."""

import pytest
import torch
import triton
import triton.language as tl

from fastvq.kernels._common import exp2i
from fastvq.reference.nearest_code import exp2i as exp2i_ref

# every exponent from well below float32's subnormals (-149) to beyond its largest power (127),
# and the int32 extremes (no wrap-around in the shifts)
EXPONENTS = list(range(-160, 141)) + [-(2**31), -(2**31) + 1, -1000, 1000, 2**31 - 1]


@triton.jit
def _exp2i_kernel(p_e, p_out, N, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    tl.store(p_out + o, exp2i(tl.load(p_e + o, mask=m, other=0)), mask=m)


def _exact(e: torch.Tensor) -> torch.Tensor:
    """2**e in float64 (exact over this range; 0 / inf far beyond it), rounded once to float32."""
    return torch.pow(torch.full(e.shape, 2.0, dtype=torch.float64, device=e.device),
                     e.double().clamp(-2000, 2000)).float()


def _show(got, want, e):
    bad = (got.view(torch.int32) != want.view(torch.int32)).nonzero().reshape(-1)[:5].tolist()
    return [(int(e[i]), float(got[i]), float(want[i])) for i in bad]


def test_exp2i_kernel_is_2_to_the_e_rounded(device):
    # was clamped to [-126, 127]: 2**-127 came out 2**-126 (the euclidean distance of a subnormal
    # difference twice too large) and 2**128 came out 2**127 instead of +inf
    e = torch.tensor(EXPONENTS, dtype=torch.int32, device=device)
    out = torch.empty(e.shape, dtype=torch.float32, device=device)
    _exp2i_kernel[(triton.cdiv(e.numel(), 64),)](e, out, e.numel(), BLOCK=64)
    want = _exact(e)
    assert torch.equal(out.view(torch.int32), want.view(torch.int32)), _show(out, want, e)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int64], ids=str)
def test_exp2i_reference_is_2_to_the_e_rounded(device, dtype):
    e = torch.tensor(EXPONENTS, dtype=dtype, device=device)
    out = exp2i_ref(e)
    want = _exact(e)
    assert out.dtype == torch.float32
    assert torch.equal(out.view(torch.int32), want.view(torch.int32)), _show(out, want, e)
