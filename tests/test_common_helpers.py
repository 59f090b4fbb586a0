"""The kernel-side helpers of kernels/_common.py, run through tiny kernels (the interpreter on the
CPU), and their pure-torch twins in fastvq.reference: the same bits."""

import math

import pytest
import torch
import triton
import triton.language as tl

from fastvq.kernels._common import dot_split_nt, exp2i, tf32_split
from fastvq.reference.nearest_code import exp2i as exp2i_ref
from tests.utils import generator, randn

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


# --------------------------------------------------------------------------- the float32 split


@triton.jit
def _tf32_split_kernel(p_x, p_hi, p_lo, N, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    hi, lo = tf32_split(tl.load(p_x + o, mask=m, other=0.0))
    tl.store(p_hi + o, hi, mask=m)
    tl.store(p_lo + o, lo, mask=m)


def _round_tf32(v: torch.Tensor) -> torch.Tensor:
    """float64 ``v`` (float32 values) rounded to 11 significant bits, ties away from zero."""
    _, e = torch.frexp(v)  # v = m 2^e, 0.5 <= |m| < 1: TF32's spacing there is 2^(e - 11)
    e = torch.maximum(e, torch.full_like(e, -125))  # below 2^-126 the fixed spacing 2^-136 (13 bits masked)
    q = torch.ldexp(v, 11 - e)
    q = torch.sign(q) * torch.floor(q.abs() + 0.5)
    return torch.ldexp(q, e - 11)


def _split_inputs(device):
    g = generator(7, device)
    parts = [torch.randn(4000, generator=g, device=device)
             * 2.0 ** torch.randint(-140, 126, (4000,), generator=g, device=device).float(),
             # powers of two, subnormals included
             torch.ldexp(torch.ones(39, dtype=torch.float64), torch.arange(-149, 120, 7)),
             1.0 + torch.arange(-40, 40) * 2.0**-23,  # around the ties of the first split (2^-11 apart)
             torch.tensor([0.0, -0.0, 1.0 + 2.0**-11, 1.0 + 3 * 2.0**-11, 1.0 + 2.0**-11 + 2.0**-22,
                           float.fromhex("0x1.ffcp126"), -float.fromhex("0x1.ffbffep126"), 1e-45, -3e-39])]
    x = torch.cat([p.float().to(device) for p in parts])
    return torch.cat([x, -x]).to(device)


def test_tf32_split_parts_are_rounded_tf32_and_sum_to_x(device):
    """hi = x rounded to TF32 (11 significant bits, nearest, ties away), lo = (x - hi) rounded the
    same way, both with the low 13 mantissa bits zero (a tensor core reads them exactly), and
    |x - hi - lo| <= max(2^-22 |x|, 2^-137): the premise of the "tf32x3" search's error bound."""
    x = _split_inputs(device)
    hi, lo = torch.empty_like(x), torch.empty_like(x)
    _tf32_split_kernel[(triton.cdiv(x.numel(), 256),)](x, hi, lo, x.numel(), BLOCK=256)
    x64 = x.double()
    assert ((hi.view(torch.int32) & 0x1FFF) == 0).all() and ((lo.view(torch.int32) & 0x1FFF) == 0).all()
    assert torch.equal(hi.double(), _round_tf32(x64)), "hi is not x rounded to TF32"
    assert torch.equal(lo.double(), _round_tf32(x64 - hi.double())), "lo is not (x - hi) rounded to TF32"
    rest = (x64 - hi.double() - lo.double()).abs()
    assert (rest <= torch.clamp(2.0**-22 * x64.abs(), min=2.0**-137)).all(), float((rest / x64.abs()).max())
    big = x64.abs() >= 2.0**-115  # (below, TF32's fixed spacing 2^-136 leaves up to 2^-137)
    assert (rest[big] <= 2.0**-22 * x64.abs()[big]).all()


def test_tf32_split_keeps_nan_and_inf(device):
    """NaN in, NaN in ``hi`` for every payload (a GPU's NaN, 0x7FFFFFFF, would round to -0 through
    the integer add: a NaN row's products would be finite); infinities stay infinite."""
    bits = torch.tensor([0x7FFFFFFF, -1, 0x7FC00000, 0x7F800001, -4194304, 0x7FFFF000, -4096, 0x7F800000,
                         -8388608], dtype=torch.int64).to(torch.int32)  # (-1: 0xFFFFFFFF; -8388608: -inf)
    x = bits.view(torch.float32).to(device)
    hi, lo = torch.empty_like(x), torch.empty_like(x)
    _tf32_split_kernel[(1,)](x, hi, lo, x.numel(), BLOCK=16)
    assert hi[:7].isnan().all(), hi[:7].view(torch.int32).tolist()
    assert hi[7] == float("inf") and hi[8] == float("-inf")


@triton.jit
def _dot_split_kernel(p_a, p_b, p_out, M: tl.constexpr, N: tl.constexpr, D: tl.constexpr,
                      PRECISION: tl.constexpr):
    o_m, o_n, o_d = tl.arange(0, M), tl.arange(0, N), tl.arange(0, D)
    b_a = tl.load(p_a + o_m[:, None] * D + o_d[None, :])
    b_b = tl.load(p_b + o_n[:, None] * D + o_d[None, :])
    b_ah, b_al = tf32_split(b_a)
    acc = dot_split_nt(b_ah, b_al, b_b, tl.zeros((M, N), dtype=tl.float32), PRECISION)
    tl.store(p_out + o_m[:, None] * N + o_n[None, :], acc)


def test_dot_split_is_float32_accurate(device):
    """Three TF32 products of the split operands: within fastvq.testing's "tf32x3" bound of the
    float64 product (3 * 2^-22 per product plus float32 accumulation); one TF32 product of the
    high parts (what a lost low part would leave) errs ~2^-11 and fails it."""
    import fastvq.testing as ft

    a = randn(32, 64, seed=3, scale=3.0, device=device)
    b = randn(16, 64, seed=4, scale=3.0, device=device)
    out = torch.empty(32, 16, device=device)
    _dot_split_kernel[(1,)](a, b, out, M=32, N=16, D=64, PRECISION="tf32x3")
    exact = a.double() @ b.double().T
    mag = a.double().abs() @ b.double().abs().T
    # (round-to-nearest accumulation under the interpreter; a GPU's tensor cores get the usual slack)
    assert ft.error_ratio(out, exact, dtype=torch.float32, reduce_len=64, magnitude=mag, precision="tf32x3",
                          factor=ft.ACCUMULATION_FACTOR if out.is_cuda else 1.0) <= 1
    ha, hb = _round_tf32(a.double()), _round_tf32(b.double())  # the high parts alone
    assert ft.error_ratio((ha @ hb.T).float(), exact, dtype=torch.float32, reduce_len=64, magnitude=mag,
                          precision="tf32x3") > 1


# --------------------------------------------------------------------------- sums rounded once

from fractions import Fraction  # noqa: E402

from fastvq.kernels._common import dd_add, dd_sum, round_dd  # noqa: E402
from fastvq.reference._exact_sum import pair_index_sum, round_pair  # noqa: E402
from tests._midpoints import midpoint_cases as _cases, nearest as _nearest, small_remainder_rows  # noqa: E402


@triton.jit
def _dd_round_kernel(p_t, p_out, p_odd, N_TERMS: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row of ``N_TERMS`` float64 terms: ``BLOCK`` at a time summed by dd_sum and
    added to the running sum by dd_add (as the kernels walk blocks of rows, items or columns),
    rounded once to nearest float32 (``p_out``) and to odd at float32 (``p_odd``)."""
    o = tl.arange(0, BLOCK)
    b_s = tl.zeros((1,), dtype=tl.float64)
    b_e = tl.zeros((1,), dtype=tl.float64)
    b_f = tl.zeros((1,), dtype=tl.float64)
    for b0 in tl.static_range(0, N_TERMS, BLOCK):
        b_t = tl.load(p_t + tl.program_id(0) * N_TERMS + b0 + o, mask=b0 + o < N_TERMS, other=0.0)
        b_hi, b_mid, b_lo = dd_sum(b_t[:, None], 0)
        b_s, b_e, b_f = dd_add(b_s, b_e, b_f, b_hi, b_mid, b_lo)
    tl.store(p_out + tl.program_id(0) + tl.arange(0, 1), round_dd(b_s, b_e, b_f, False))
    tl.store(p_odd + tl.program_id(0) + tl.arange(0, 1), round_dd(b_s, b_e, b_f, True))


def _kernel_rounding(terms, dtype, block):
    """Each row of ``terms`` (float64) through :func:`_dd_round_kernel`, ``block`` terms at a time,
    rounded once to ``dtype``."""
    out = torch.empty(terms.shape[0], dtype=torch.float32, device=terms.device)
    odd = torch.empty_like(out)
    _dd_round_kernel[(terms.shape[0],)](terms.contiguous(), out, odd, N_TERMS=terms.shape[1], BLOCK=block)
    return out if dtype == torch.float32 else odd.to(dtype)


@pytest.mark.parametrize("block", [8, 2, 1], ids=["one-block", "blocks-of-2", "blocks-of-1"])
def test_sums_near_rounding_midpoints_round_once(device, block):
    """kernels/_common.py dd_sum + dd_add + round_dd and fastvq/reference/_exact_sum.py against
    exact rational sums: float32 to nearest, and rounded to odd at float32 then to bfloat16 /
    float16, equal the correctly rounded sum at every midpoint case, the terms in one block or
    spread over blocks (a plain float64 sum rounds some of them twice: asserted too, so that the
    cases can fail)."""
    gen = generator(1)
    cases = _cases(gen, 7)
    terms = torch.tensor([t for _, t in cases], dtype=torch.float64, device=device)
    got = {dt: _kernel_rounding(terms, dt, block) for dt in {dt for dt, _ in cases}}
    plain_wrong = 0
    for i, (dtype, t) in enumerate(cases):
        want = _nearest(sum(Fraction(v) for v in t), dtype)
        assert got[dtype][i].item() == want, (dtype, t, got[dtype][i].item(), want)
        plain = terms[i].sum().to(torch.float32).to(dtype).item()
        plain_wrong += plain != want
        if block == 8:  # the reference: the same terms as one row's gradient, rows 0 and 1 (reversed order)
            idx = torch.tensor([0] * 7, device=device)
            hi, lo = pair_index_sum((2, 1), lambda: [(idx, terms[i, :, None]), (idx + 1, terms[i].flip(0)[:, None])],
                                    device)
            ref = round_pair(hi, lo, dtype)
            assert ref[0, 0].item() == want and ref[1, 0].item() == want, (dtype, t, ref.flatten().tolist(), want)
    assert plain_wrong >= 5, plain_wrong


def test_running_sum_keeps_what_cancelling_blocks_leave(device):
    """dd_add's three parts: blocks (1, 2^-60), (-1, 2^-130), (-2^-60) sum exactly to 2^-130, and
    1, 2^-24, 2^-60, 2^-130, -2^-60 to just above the midpoint 1 + 2^-24, one term per block or
    the first four in one block. A running pair, whose low part was summed plainly, held 2^-60 +
    2^-130 as 2^-60: it gave 0 and 1; so did a block's pair (dd_sum's mid + lo)."""
    terms = torch.tensor([[1.0, 2.0**-60, -1.0, 2.0**-130, -(2.0**-60), 0.0],
                          [1.0, 2.0**-24, 2.0**-60, 2.0**-130, -(2.0**-60), 0.0]], dtype=torch.float64, device=device)
    assert _kernel_rounding(terms[:1], torch.float32, 2).item() == 2.0**-130
    for block in (1, 4):
        assert _kernel_rounding(terms[1:], torch.float32, block).item() == 1 + 2.0**-23, block
    # blocks of two whose running sum cancels to far below its largest value, the exact sum a
    # tiny offset from a float32 midpoint (found by a search of random blocks against exact
    # sums): they round the wrong way when dd_add leaves its parts unnormalised (e far above s)
    hexes = [["-0x1.d5516cf8965d1p-154", "0x0p0", "-0x1p-34", "-0x1.5e00f646b3689p-117", "0x1.46b3689p-141",
              "0x1.828083c7cc2dbp-287", "0x1p-34", "0x0p0", "0x1.d5516cf8965d1p-154", "-0x1.828083c7cc2dbp-287",
              "-0x1p-236", "0x0p0", "0x0p0", "0x0p0", "0x0p0", "0x0p0"],
             ["0x1p-36", "0x1.742f0e0de0492p-119", "-0x1p-36", "-0x1.651e4d2b7ae80p-94", "-0x1.88ae7a8b1802cp-106",
              "0x1.5258f86ea8cd7p-164", "-0x1p-106", "-0x1.e8be2f4482a8ap-159", "0x1.88ae7a8b1802cp-106", "0x0p0",
              "-0x1.41f5dca8a6045p-86", "0x0p0", "0x1.f51767b0f910dp-110", "-0x1.5e930fde53b97p-164", "-0x1p-205",
              "0x0p0"]]
    rows = [[float.fromhex(h) for h in r] for r in hexes]
    want = [_nearest(sum(Fraction(v) for v in r), torch.float32) for r in rows]
    got = _kernel_rounding(torch.tensor(rows, dtype=torch.float64, device=device), torch.float32, 2)
    assert got.tolist() == want, (got.tolist(), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_sums_keep_a_small_remainder_beside_cancelling_ones(device, dtype):
    """A small term between two that cancel decides the midpoint (tests/_midpoints.py
    small_remainder_rows): the references split their remainders again (mutG B-2), and so does
    the kernels' dd_sum (one extraction lost the -2^-100 of the README's row: +inf in
    qr_lookup's kernels). Each row in both orders; 16-bit: rounded to odd at float32 first."""
    for terms in small_remainder_rows(dtype):
        want = _nearest(sum(Fraction(v) for v in terms), dtype)
        assert want == (terms[0] if terms[0] > 1 else 1 + 2 * terms[1])  # (below / above the midpoint)
        t = torch.tensor(terms, dtype=torch.float64, device=device)
        idx = torch.zeros(len(terms), dtype=torch.long, device=device)
        hi, lo = pair_index_sum((2, 1), lambda: [(idx, t[:, None]), (idx + 1, t.flip(0)[:, None])], device)
        assert round_pair(hi, lo, dtype).flatten().tolist() == [want, want], (terms, want)
        both = torch.stack([t, t.flip(0)])
        for block in (8, 1):  # one block, each term its own block
            got = _kernel_rounding(both, dtype, block)
            assert got.tolist() == [want, want], (terms, block, got.tolist(), want)


def test_interpreted_kernels_print_no_numpy_floating_point_warnings(device):
    # inf and NaN inputs: the interpreter's numpy arithmetic overflows and meets NaN where a GPU
    # computes the same values silently; a CPU parity run must not print warnings that read like
    # defects (kernels/_common.py filters the interpreter module's RuntimeWarnings). On a GPU the
    # same calls must not warn either. (catch_warnings keeps the filters in force and resets the
    # once-per-place registries, so a warning seen in an earlier test would be recorded again.)
    import warnings

    import fastvq

    x = randn(3, 3, seed=0, device=device)
    x[0] = torch.tensor([3e38, -3e38, float("nan")])
    x[1, 0] = float("inf")
    c = randn(5, 3, seed=1, device=device)
    c[0] = float("inf")
    # a bag of items +-1e40 (beyond float32): the interpreter's reductions (tl.sum, tl.max) run
    # numpy's own reduce, which warns from numpy's module, not the interpreter's
    q = torch.tensor([[2e20, 1e20], [-1e20, -1e20]], device=device, requires_grad=True)
    r = torch.tensor([[1e20, 1e20]], device=device)
    ids, offs = torch.tensor([0, 1], device=device), torch.tensor([0], device=device)
    with fastvq.backend("triton"), warnings.catch_warnings(record=True) as caught:
        idx, dist = fastvq.nearest_code(x, c)
        fastvq.pairwise_sqdist(x, c)
        fastvq.qr_lookup(ids, q, r, "mult", offsets=offs).sum().backward()
    assert idx[0].item() == 0 and dist[0].isnan()
    assert torch.isfinite(q.grad).all(), q.grad
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_a_pair_below_float32s_subnormals_rounds_to_a_signed_zero(device, dtype):
    # round D's D27 (classified in neither round): a pair whose float32 neighbour is 0 is rounded to
    # odd at float32 by moving away from that 0 in its own sign; without the rule for f == 0 a
    # positive pair stepped below +0's bits to a NaN pattern
    hi = torch.tensor([1e-50, -1e-50, 3e-46, -3e-46], dtype=torch.float64, device=device)
    got = round_pair(hi, torch.zeros_like(hi), dtype)
    assert not got.isnan().any(), got
    assert got.tolist() == [0.0, 0.0, 0.0, 0.0] and torch.equal(got.signbit(), hi < 0)


# --------------------------------------------------------------------------- "mean"'s pieces
from fastvq.kernels._common import two_prod  # noqa: E402
from fastvq.kernels.qr_lookup import _inv_len_dd  # noqa: E402
from fastvq.reference._exact_sum import quotient_terms, reciprocal_pair, two_prod as two_prod_ref  # noqa: E402


@triton.jit
def _snap_round_kernel(p_s, p_e, p_tol, p_out, p_odd, BLOCK: tl.constexpr):
    """``round_dd(s, e, 0, ..., tol, SNAP=True)`` of ``BLOCK`` pairs: to nearest float32 and to
    odd at float32."""
    o = tl.arange(0, BLOCK)
    b_s, b_e, b_tol = tl.load(p_s + o), tl.load(p_e + o), tl.load(p_tol + o)
    tl.store(p_out + o, round_dd(b_s, b_e, tl.zeros_like(b_s), False, b_tol, True))
    tl.store(p_odd + o, round_dd(b_s, b_e, tl.zeros_like(b_s), True, b_tol, True))


def _snap_cases(gen, n):
    """``(s, e, tol)`` float64: ``s`` a point of float32's half-ulp grid (a float32 value, or a
    float32, bfloat16 or float16 rounding midpoint) from 2^-140 to 2^127, ``e`` an offset from it
    of 0, just inside or just outside ``tol``, or far from it, and ``tol`` 0 or up to 2^-60 of ``s``."""
    s, e, tol = [], [], []
    for i in range(n):
        k = int(torch.randint(-140, 128, (1,), generator=gen))
        m = int(torch.randint(1 << 23, 1 << 24, (1,), generator=gen))
        frac = [0.0, 0.5, 2.0**15 + 0.5, 2.0**12 + 0.5][i % 4]  # (a value; float32 / bfloat16 / float16 midpoints)
        p = math.ldexp(m + (frac if i % 4 < 2 else 0.0), k - 23)
        if i % 4 >= 2:  # bfloat16 / float16 midpoint: 8 / 11 bits, then half an ulp
            bits = 8 if i % 4 == 2 else 11
            p = math.ldexp((m >> (24 - bits)) + 0.5, k - bits + 1)
        p = max(p, 2.0**-149) * (-1 if i % 3 == 0 else 1)
        t = abs(p) * [0.0, 2.0**-100, 2.0**-60][i % 3]
        d = [0.0, 0.5 * t, -0.5 * t, 2 * t, -2 * t, abs(p) * 2.0**-40][i % 6]
        s.append(p), e.append(d), tol.append(t)
    return s, e, tol


def test_snap_rounds_within_tol_of_a_grid_point_to_it(device):
    """kernels/_common.py round_dd with SNAP (snap_half_ulp) and fastvq/reference/_exact_sum.py
    round_pair with a tolerance against exact rationals: a pair within ``tol`` of a point of
    float32's half-ulp grid rounds as that point does (to nearest even: ties to even), every
    other pair as its exact value does. Without the snap (tol 0) a tie plus a tiny error rounds
    away from the tie: asserted too, so that the cases can fail."""
    s, e, tol = _snap_cases(generator(3), 256)
    S, E, T = (torch.tensor(v, dtype=torch.float64, device=device) for v in (s, e, tol))
    out, odd = torch.empty(256, dtype=torch.float32, device=device), torch.empty(256, dtype=torch.float32, device=device)
    _snap_round_kernel[(1,)](S, E, T, out, odd, BLOCK=256)
    away = 0
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got = out if dtype == torch.float32 else odd.to(dtype)
        ref = round_pair(S, E, dtype, T)
        for i in range(256):
            x, p = Fraction(s[i]) + Fraction(e[i]), Fraction(s[i])
            snapped = abs(x - p) <= Fraction(tol[i])
            want = _nearest(p if snapped else x, dtype)
            assert got[i].item() == want and ref[i].item() == want, (dtype, s[i], e[i], tol[i], got[i].item(),
                                                                     ref[i].item(), want)
            away += snapped and _nearest(x, dtype) != want
    assert away >= 20, away
    # within tol of 0 (fuzzU: an exact 0 of thirds came out 2^-108): +0, and a zero keeps its sign
    S = torch.tensor([2.0**-108, -(2.0**-108), -0.0, 0.0, 2.0**-99, -(2.0**-160), -(2.0**-101), 3.0],
                     dtype=torch.float64, device=device)
    T = torch.full_like(S, 2.0**-100)
    E = torch.zeros_like(S)
    E[2] = -0.0  # (-0 + -0 is -0; -0 + +0 is +0)
    out, odd = torch.empty(8, dtype=torch.float32, device=device), torch.empty(8, dtype=torch.float32, device=device)
    _snap_round_kernel[(1,)](S, E, T, out, odd, BLOCK=8)
    for got in (out, odd, round_pair(S, E, torch.float32, T), round_pair(S, E, torch.bfloat16, T)):
        assert got.tolist() == [0.0, 0.0, 0.0, 0.0, 2.0**-99, 0.0, 0.0, 3.0], got
        assert got.signbit().tolist() == [False, False, True, False, False, False, False, False], got


@triton.jit
def _two_prod_kernel(p_a, p_b, p_p, p_e, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    b_p, b_e = two_prod(tl.load(p_a + o), tl.load(p_b + o))
    tl.store(p_p + o, b_p)
    tl.store(p_e + o, b_e)


@triton.jit
def _inv_len_dd_kernel(p_n, p_hi, p_lo, BLOCK: tl.constexpr):
    o = tl.arange(0, BLOCK)
    b_hi, b_lo = _inv_len_dd(tl.zeros_like(o).to(tl.int64), tl.load(p_n + o))
    tl.store(p_hi + o, b_hi)
    tl.store(p_lo + o, b_lo)


def test_mean_quotients_are_two_terms_within_2_to_the_minus_101(device):
    """The pieces of "mean"'s redo against exact rationals: ``two_prod`` (kernel and reference) is
    exact for products of float32-range values (and of float32 products with 1/n); ``1 / n`` as
    a pair (the kernels' from a float32 reciprocal and two Newton steps, the reference's from a
    float64 division) is within 2^-102 of it, n up to 2^31 - 1; and ``x / n`` as two terms within
    2^-101 of it (the reference's quotient_terms)."""
    gen = generator(4)
    n = torch.cat([torch.arange(1, 130), torch.randint(130, 2**31 - 1, (127,), generator=gen)]).to(device)
    hi, lo = torch.empty(256, dtype=torch.float64, device=device), torch.empty(256, dtype=torch.float64, device=device)
    _inv_len_dd_kernel[(1,)](n, hi, lo, BLOCK=256)
    rhi, rlo = reciprocal_pair(n)
    x = (randn(256, seed=5, device=device).double() * torch.exp2(torch.randint(-140, 126, (256,), generator=gen)
                                                                 .to(device).double()))
    x = x.float().double() * randn(256, seed=6, device=device).float().double()  # (products of two float32 values)
    p, e = torch.empty_like(x), torch.empty_like(x)
    _two_prod_kernel[(1,)](x, hi, p, e, BLOCK=256)
    rp, re = two_prod_ref(x, hi)
    qp, qe = quotient_terms(x, rhi, rlo)
    for i in range(256):
        inv = Fraction(1, int(n[i]))
        for h, l in ((hi[i], lo[i]), (rhi[i], rlo[i])):
            assert abs(Fraction(h.item()) + Fraction(l.item()) - inv) <= inv * Fraction(1, 2**102), (int(n[i]), h, l)
        prod = Fraction(x[i].item()) * Fraction(hi[i].item())
        assert Fraction(p[i].item()) + Fraction(e[i].item()) == prod and p[i].item() == rp[i].item()
        assert e[i].item() == re[i].item()
        q = Fraction(x[i].item()) * inv
        assert abs(Fraction(qp[i].item()) + Fraction(qe[i].item()) - q) <= abs(q) * Fraction(1, 2**101), (x[i], n[i])
