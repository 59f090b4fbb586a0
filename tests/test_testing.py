"""fastvq.testing: the bounds pass correct low-precision results and reject wrong ones.

Every criterion is shown failing on a deliberately wrong input: a bf16 result a few ulps past its
bound, a second-nearest code, an all-zero (and a partly zero) gradient, an index out of range.
The "kernels" here are torch computations in the kernel's arithmetic (low-precision operands,
fp32 accumulation, one rounding to the output dtype); the op tests use the same criteria on the
real kernels.
"""

import doctest
import math

import pytest
import torch

import fastvq
import fastvq.testing as ft
from tests.utils import randn


def _round_tf32(t: torch.Tensor) -> torch.Tensor:
    """float32 -> the nearest tf32 value (10 stored mantissa bits), as a tensor core reads it."""
    i = t.view(torch.int32)
    i = (i + 0x1000) & ~0x1FFF  # round half up on the 13 dropped bits (close enough to RN here)
    return i.view(torch.float32)


def test_unit_roundoff_table():
    assert ft.unit_roundoff(torch.float32) == 2.0**-24
    assert ft.unit_roundoff(torch.float16) == 2.0**-11
    assert ft.unit_roundoff(torch.bfloat16) == 2.0**-8
    assert ft.unit_roundoff("tf32") == 2.0**-11
    assert ft.unit_roundoff("bf16") == ft.unit_roundoff(torch.bfloat16)
    assert ft.unit_roundoff(torch.float64) == 2.0**-53
    for dt in (torch.float32, torch.float16, torch.bfloat16):  # u = eps / 2
        assert ft.unit_roundoff(dt) == torch.finfo(dt).eps / 2
    with pytest.raises(ValueError, match="int32"):
        ft.unit_roundoff(torch.int32)
    with pytest.raises(ValueError, match="fp8"):
        ft.unit_roundoff("fp8")


def test_gamma():
    assert ft.gamma(1, 2**-24) == pytest.approx(2**-24, rel=1e-6)
    assert ft.gamma(256, 2**-24) == pytest.approx(256 * 2**-24 / (1 - 256 * 2**-24))
    assert ft.gamma(256, 2**-8) == math.inf  # n u >= 1: no bound (why kernels accumulate in fp32)


def test_doc_examples_run():
    res = doctest.testmod(ft, optionflags=doctest.ELLIPSIS)
    assert res.attempted >= 6 and res.failed == 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("n", [1, 60, 1000])
def test_matmul_in_kernel_arithmetic_passes(dtype, n):
    a, b = randn(33, n, dtype=dtype, seed=n), randn(n, 17, dtype=dtype, seed=n + 1)
    out = (a.float() @ b.float()).to(dtype)  # low-precision operands, fp32 accumulation, one rounding
    exact = a.double() @ b.double()
    ft.assert_close(out, exact, dtype=dtype, reduce_len=n, magnitude=a.double().abs() @ b.double().abs())
    if dtype != torch.float32:  # not loose: in 16 bits the output rounding alone uses a fair share of it
        ratio = ft.error_ratio(out, exact, dtype=dtype, reduce_len=n, magnitude=a.double().abs() @ b.double().abs())
        assert ratio > 0.1


@pytest.mark.parametrize("extra_ulps", [3, 8])
def test_bf16_result_a_few_ulps_past_the_bound_fails(extra_ulps):
    n = 256
    a, b = randn(64, n, dtype=torch.bfloat16, seed=1), randn(n, 8, dtype=torch.bfloat16, seed=2)
    exact = a.double() @ b.double()
    mag = a.double().abs() @ b.double().abs()
    out = (a.float() @ b.float()).bfloat16()
    ft.assert_close(out, exact, dtype=torch.bfloat16, reduce_len=n, magnitude=mag)
    bound = ft.error_bound(exact, dtype=torch.bfloat16, reduce_len=n, magnitude=mag)
    # move one element just past its bound, then a few bf16 ulps further
    i, j = 5, 3
    wrong = out.clone()
    v = float(exact[i, j] + bound[i, j])
    w = torch.tensor(v, dtype=torch.float64).bfloat16()
    while float(w) <= v:
        w = _next_bf16(w)
    for _ in range(extra_ulps - 1):
        w = _next_bf16(w)
    wrong[i, j] = w
    with pytest.raises(AssertionError) as err:
        ft.assert_close(wrong, exact, dtype=torch.bfloat16, reduce_len=n, magnitude=mag, name="bf16 matmul")
    msg = str(err.value)
    assert "bf16 matmul: 1 of 512 elements" in msg and f"index ({i}, {j})" in msg
    assert "bound" in msg and "ratio" in msg


def _next_bf16(w: torch.Tensor) -> torch.Tensor:
    bits = w.view(torch.int16)
    step = 1 if float(w) >= 0 else -1
    return (bits + step).view(torch.bfloat16)


def test_one_ulp_of_output_rounding_is_allowed_three_are_not():
    exact = randn(1000, dtype=torch.float64, seed=3)
    rounded = exact.bfloat16()
    ft.assert_close(rounded, exact, dtype=torch.bfloat16)
    truncated = (exact.float().view(torch.int32) & ~0xFFFF).view(torch.float32).bfloat16()  # the interpreter's
    ft.assert_close(truncated, exact, dtype=torch.bfloat16)
    off = (rounded.view(torch.int16) + 3).view(torch.bfloat16)
    with pytest.raises(AssertionError, match="exceed their rounding bound"):
        ft.assert_close(off, exact, dtype=torch.bfloat16)


def test_tf32_needs_its_precision():
    n = 8  # short sums: the fp32 bound is tight and the operand rounding cannot hide in it
    a, b = randn(40, n, seed=4), randn(n, 24, seed=5)
    out = _round_tf32(a) @ _round_tf32(b)
    exact, mag = a.double() @ b.double(), a.double().abs() @ b.double().abs()
    ft.assert_close(out, exact, dtype=torch.float32, reduce_len=n, magnitude=mag, precision="tf32")
    with pytest.raises(AssertionError):  # judged as an exact fp32 product, tf32 is far off
        ft.assert_close(out, exact, dtype=torch.float32, reduce_len=n, magnitude=mag)


def test_magnitude_matters_under_cancellation():
    # x - y for nearly equal x, y in fp32: relative to |expected| the error is huge, to |x|+|y| it is not
    x = randn(100, seed=6) * 1000
    y = x + randn(100, seed=7) * 1e-3
    x32, y32 = x.float(), y.float()
    out = x32 - y32
    exact = x32.double() - y32.double()
    ft.assert_close(out, exact, dtype=torch.float32, magnitude=x32.double().abs() + y32.double().abs())


def test_several_error_sources_add_up():
    exp = torch.tensor([1.0, 2.0], dtype=torch.float64)
    one = ft.error_bound(exp, dtype=torch.float32, reduce_len=10, magnitude=3.0)
    two = ft.error_bound(exp, dtype=torch.float32, reduce_len=20, magnitude=5.0)
    both = ft.error_bound(exp, dtype=torch.float32, reduce_len=[10, 20], magnitude=[3.0, 5.0])
    out_term = ft.OUTPUT_ROUNDING * 2.0**-24 * exp
    assert torch.allclose(both - out_term, (one - out_term) + (two - out_term), rtol=1e-12, atol=1e-40)
    with pytest.raises(ValueError, match="same length"):
        ft.error_bound(exp, dtype=torch.float32, reduce_len=[10, 20], magnitude=3.0)


def test_nan_and_inf_semantics():
    exp = torch.tensor([1.0, math.nan, math.inf, -math.inf, 1e39], dtype=torch.float64)
    ok = torch.tensor([1.0, math.nan, math.inf, -math.inf, math.inf])
    ft.assert_close(ok, exp, dtype=torch.float32)
    for k, bad in enumerate([math.nan, 0.0, 1e38, math.inf, 3e38]):
        wrong = ok.clone()
        wrong[k] = bad
        with pytest.raises(AssertionError, match=f"index \\({k},\\)"):
            ft.assert_close(wrong, exp, dtype=torch.float32)
    with pytest.raises(AssertionError, match="shape"):
        ft.assert_close(ok[:2], exp, dtype=torch.float32)
    assert ft.error_ratio(ok[:0], exp[:0], dtype=torch.float32) == 0.0


# --------------------------------------------------------------------------- argmin


def _kernel_argmin(x, c, metric, tf32=False):
    """Nearest code in a kernel's arithmetic: fp32 scores of low-precision inputs, first minimum."""
    x32, c32 = x.float(), c.float()
    xd, cd = (_round_tf32(x32), _round_tf32(c32)) if tf32 else (x32, c32)
    xc = xd @ cd.T
    if metric == "l2":
        s = (c32 * c32).sum(-1) - 2 * xc
    elif metric == "cosine":
        s = -xc / c32.norm(dim=-1)
    else:
        s = -xc
    return s.argmin(1)


@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, "tf32"], ids=str)
def test_argmin_correct_choice_passes_second_nearest_fails(metric, dtype):
    tf32 = dtype == "tf32"
    dt = torch.float32 if tf32 else dtype
    N, K, D = 300, 200, 64
    x, c = randn(N, D, dtype=dt, seed=8), randn(K, D, dtype=dt, seed=9)
    idx = _kernel_argmin(x, c, metric, tf32)
    prec = "tf32" if tf32 else None
    ft.assert_argmin_within_bound(x, c, idx, metric, prec)
    # the second-nearest code (in float64) of every row: rejected, in (nearly) every row
    d, _, _ = ft.distances64(x.reshape(-1, D), c, metric)
    second = d.topk(2, dim=1, largest=False).indices[:, 1]
    ratio, *_ = ft.argmin_ratio(x, c, second, metric, prec)
    frac = float((ratio > 1).double().mean())
    assert frac > (0.7 if tf32 else 0.95), frac
    with pytest.raises(AssertionError, match=r"rows chose a code farther than rounding explains.*worst row \d+: "
                                             r"chose code \d+ .* nearest is code \d+ .*gap .* bound .* ratio"):
        ft.assert_argmin_within_bound(x, c, second, metric, prec, name="second nearest")


def test_argmin_exact_ties_either_way_and_range():
    c = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [-1.0, 0.0]])
    x = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    for first in (0, 2):  # code 0 == code 2: a true tie
        for second in (0, 1):  # x[1] is equidistant from codes 0 and 1
            ft.assert_argmin_within_bound(x, c, torch.tensor([first, second]), "l2")
    with pytest.raises(AssertionError, match="outside"):
        ft.assert_argmin_within_bound(x, c, torch.tensor([0, 4]), "l2")
    with pytest.raises(AssertionError, match="chose code 3"):
        ft.assert_argmin_within_bound(x, c, torch.tensor([3, 0]), "l2")


def test_argmin_nan_rows_skipped_nan_codes_never_win():
    x = torch.tensor([[1.0, 0.0], [math.nan, 0.0]])
    c = torch.tensor([[math.nan, 0.0], [0.9, 0.0], [5.0, 5.0]])
    ft.assert_argmin_within_bound(x, c, torch.tensor([1, 0]), "l2")  # NaN row: any valid index
    with pytest.raises(AssertionError):
        ft.assert_argmin_within_bound(x, c, torch.tensor([0, 0]), "l2")  # a NaN code chosen for a finite row


# --------------------------------------------------------------------------- gradients


def test_grad_correct_bf16_passes_zero_fails():
    e = randn(64, 256, dtype=torch.bfloat16, seed=10)
    g = randn(64, 256, dtype=torch.bfloat16, seed=11)
    exact = 0.5 * e.double() * g.double()
    actual = (0.5 * e.float() * g.float()).bfloat16()
    ft.assert_grad_nondegenerate(actual, exact)
    with pytest.raises(AssertionError, match=r"1638\d of 16384 elements are 0 where the exact gradient is not"):
        ft.assert_grad_nondegenerate(torch.zeros_like(actual), exact)
    partly = actual.clone()
    partly[7] = 0  # one row dropped
    with pytest.raises(AssertionError, match=r"256 of 16384 elements are 0 .* first at index \(7, 0\)"):
        ft.assert_grad_nondegenerate(partly, exact)
    with pytest.raises(AssertionError, match="relative norm error"):
        ft.assert_grad_nondegenerate(actual * 1.05, exact)  # 5% off: beyond bf16's rounding
    with pytest.raises(AssertionError, match="relative norm error"):
        ft.assert_grad_nondegenerate(-actual, exact)
    nan = actual.clone()
    nan[3, 3] = math.nan
    with pytest.raises(AssertionError, match=r"non-finite .* index \(3, 3\)"):
        ft.assert_grad_nondegenerate(nan, exact)


def test_grad_small_exact_entries_may_be_zero():
    exact = torch.tensor([1.0, 1e-30, 0.0], dtype=torch.float64)
    ft.assert_grad_nondegenerate(torch.tensor([1.0, 0.0, 0.0]), exact, dtype=torch.float32)
    r = ft.grad_ratio(torch.tensor([1.0, 0.0, 0.0]), exact, dtype=torch.float32)
    assert r["zeros"] == 0 and r["ratio"] <= 1


def test_describe_names_every_format():
    text = ft.describe()
    for name in ("float32", "tf32", "float16", "bfloat16", "2^-24", "2^-8", "gamma"):
        assert name in text


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_bounds_hold_on_tensor_cores(dtype, device):
    """Tensor cores do not round to nearest: the documented factor still covers them."""
    n = 4096
    a, b = randn(256, n, dtype=dtype, seed=12), randn(n, 256, dtype=dtype, seed=13)
    out = a @ b  # cuBLAS: tensor cores, fp32 accumulation
    exact = a.double() @ b.double()
    ft.assert_close(out, exact, dtype=dtype, reduce_len=n, magnitude=a.double().abs() @ b.double().abs())
    x, c = randn(2048, 256, dtype=dtype, seed=14), randn(1024, 256, dtype=dtype, seed=15)
    try:
        xc = torch.mm(x, c.T, out_dtype=torch.float32)  # fp32 output: no rounding to the input dtype
    except TypeError:
        pytest.skip("torch.mm has no out_dtype here")
    s = (c.float() * c.float()).sum(-1) - 2 * xc
    ft.assert_argmin_within_bound(x, c, s.argmin(1), "l2")


def test_a_nan_bound_passes_only_an_exact_match():
    """probe5 T1: a NaN magnitude (computed from inputs holding inf) made assert_close pass 5 vs 1."""
    exp = torch.tensor([1.0, 1.0], dtype=torch.float64)
    for magnitude in (float("nan"), torch.tensor([float("nan"), 1.0], dtype=torch.float64)):
        with pytest.raises(AssertionError):
            ft.assert_close(torch.tensor([5.0, 1.0]), exp, dtype=torch.float32, magnitude=magnitude)
        assert ft.error_ratio(torch.tensor([5.0, 1.0]), exp, dtype=torch.float32, magnitude=magnitude) == math.inf
        ft.assert_close(torch.tensor([1.0, 1.0]), exp, dtype=torch.float32, magnitude=magnitude)


@pytest.mark.parametrize("actual, exact, ok", [
    ([-math.inf, 1.0], [math.inf, 1.0], False),
    ([3.0, 1.0], [math.nan, 1.0], False),
    ([0.0, 1.0], [math.inf, 1.0], False),
    ([math.inf, 1.0], [math.inf, 1.0], True),
    ([math.nan, 1.0], [math.nan, 1.0], True),
], ids=["-inf-for-inf", "number-for-nan", "zero-for-inf", "inf", "nan"])
def test_gradient_criteria_hold_non_finite_exact_values(actual, exact, ok):
    """probe5 T1: elements whose exact gradient is not finite follow assert_close's rule."""
    a, e = torch.tensor(actual), torch.tensor(exact, dtype=torch.float64)
    assert (ft.grad_ratio(a, e)["ratio"] <= 1) == ok
    if ok:
        ft.assert_grad_nondegenerate(a, e)
    else:
        with pytest.raises(AssertionError, match="not finite"):
            ft.assert_grad_nondegenerate(a, e)


def test_an_infinite_bound_passes_only_an_exact_match():
    """probe6 T1: a magnitude holding inf (inf * |c|) made assert_close pass any finite value."""
    exp = torch.tensor([1.0, 1.0], dtype=torch.float64)
    with pytest.raises(AssertionError):
        ft.assert_close(torch.tensor([5.0, 1.0]), exp, dtype=torch.float32, reduce_len=4, magnitude=math.inf)
    assert ft.error_ratio(torch.tensor([-1e30, 1.0]), exp, dtype=torch.float32, reduce_len=4, magnitude=math.inf) == math.inf
    ft.assert_close(torch.tensor([1.0, 1.0]), exp, dtype=torch.float32, reduce_len=4, magnitude=math.inf)
    # an expected value beyond float32 with an infinite bound: only that infinity passes (probe6 T1b)
    big = torch.tensor([1e39], dtype=torch.float64)
    for wrong in (5.0, -3e38, 0.0):
        with pytest.raises(AssertionError):
            ft.assert_close(torch.tensor([wrong]), big, dtype=torch.float32, reduce_len=4, magnitude=math.inf)
    ft.assert_close(torch.tensor([math.inf]), big, dtype=torch.float32, reduce_len=4, magnitude=math.inf)


def test_one_infinite_exact_gradient_element_keeps_the_zero_criterion():
    """probe6 T2: the zero criterion's floor came from max |exact|, inf with one infinite element."""
    exact = torch.linspace(1, 2, 4096, dtype=torch.float64)
    exact[0] = math.inf
    actual = exact.float().clone()
    actual[5] = 0.0
    r = ft.grad_ratio(actual, exact)
    assert r["zeros"] == 1 and r["ratio"] == math.inf


@pytest.mark.parametrize("dtype,half_ulp", [(torch.float32, 2.0**103), (torch.bfloat16, 2.0**119),
                                            (torch.float16, 16.0)], ids=str)
def test_an_expected_value_from_the_overflow_midpoint_on_is_inf(dtype, half_ulp):
    # round to nearest sends max + 1/2 ulp (a tie: the even neighbour is inf) and above to inf;
    # the checker took the threshold at max + 1 ulp, so the correctly rounded inf of max + 1/2 ulp
    # failed as "a finite value's inf" (qrprobe QP2), and below the midpoint inf stays wrong
    big = torch.finfo(dtype).max
    inf = torch.tensor([math.inf], dtype=dtype)
    for exp in (big + half_ulp, big + 1.5 * half_ulp):
        ft.assert_close(inf, torch.tensor([exp], dtype=torch.float64), dtype=dtype, magnitude=exp)
    with pytest.raises(AssertionError):
        ft.assert_close(inf, torch.tensor([big + 0.75 * half_ulp], dtype=torch.float64), dtype=dtype,
                        magnitude=big)
    assert torch.tensor([big + half_ulp], dtype=torch.float64).to(dtype).isinf().all()
    assert torch.tensor([big + 0.75 * half_ulp], dtype=torch.float64).to(dtype).isfinite().all()


def test_tf32x3_bound_holds_the_split_floor_and_nothing_more():
    """precision="tf32x3" on dot: a choice that only the split's floor (entries 2^126 below the
    row's largest lose up to 2^-137 of its unit) can explain passes; the same wrong choice where the
    entries are normal (the split keeps them) fails, and the default (ieee) bound rejects both."""
    x = torch.tensor([[0.0, 1.0]])
    for t, passes in ((2.0**-140, True), (2.0**-100, False)):
        c = torch.tensor([[1.0, -t], [1.0, t]])  # code 1 is nearer (larger inner product) by 2t
        wrong = torch.tensor([0])
        assert (float(ft.argmin_ratio(x, c, wrong, "dot", precision="tf32x3")[0].max()) <= 1) == passes
        assert float(ft.argmin_ratio(x, c, wrong, "dot")[0].max()) > 1
        assert float(ft.argmin_ratio(x, c, torch.tensor([1]), "dot", precision="tf32x3")[0].max()) == 0
    # a way to multiply, not a format: a ValueError where a dtype is asked for
    with pytest.raises(ValueError, match="precision="):
        ft.unit_roundoff("tf32x3")
    with pytest.raises(ValueError, match="precision="):
        ft.error_bound(torch.ones(2, dtype=torch.float64), dtype=torch.float32, out_dtype="tf32x3")
    assert ft.search_precision(torch.float32) == "tf32x3" and ft.search_precision(torch.float16) is None


def test_cosine_argmin_allows_the_rounding_of_one_minus_cos_when_asked():
    # fuzzH: a float32 program that argmins 1 - cos ties cosines 1e-9 and 2e-9 (both 1.0): the
    # bound had no room for that output rounding, so a correct search failed by 1e5
    x, c = torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 1e-9], [1.0, 2e-9]])
    ft.assert_argmin_within_bound(x, c, torch.tensor([0]), "cosine", rounded_distance=True)
    ft.assert_argmin_within_bound(x, c, torch.tensor([1]), "cosine", rounded_distance=True)
    with pytest.raises(AssertionError):  # still tight: 1e-3 apart in cosine is no tie
        ft.assert_argmin_within_bound(x, torch.tensor([[1.0, 1e-3], [1.0, 2e-3]]), torch.tensor([0]), "cosine",
                                      rounded_distance=True)


def test_cosine_argmin_bound_holds_fastvqs_own_search_to_its_scores(device):
    # review9: fastvq's cosine search scores -(x.c)/|c| and never rounds 1 - cos, so it tells
    # cosines 1e-9 and 5e-8 apart; with the rounded-distance allowance on by default, the wrong
    # code passed (ratio 0.41): the suite's cosine checks hold the search to its own rounding
    x = torch.tensor([[0.0, 1.0]], device=device)
    c = torch.tensor([[1.0, 1e-9], [1.0, 5e-8]], device=device)
    assert fastvq.nearest_code(x, c, metric="cosine")[0].tolist() == [1]
    assert float(ft.argmin_ratio(x, c, torch.tensor([0], device=device), "cosine")[0].max()) > 1
    assert float(ft.argmin_ratio(x, c, torch.tensor([1], device=device), "cosine")[0].max()) == 0
    assert float(ft.argmin_ratio(x, c, torch.tensor([0], device=device), "cosine", rounded_distance=True)[0].max()) <= 1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_grad_ratio_takes_an_overflowing_exact_value_as_its_infinity(dtype):
    # fuzzH: exact 7e4 is +inf in float16 (3.4e38 * 1.002 in bfloat16): the correctly rounded
    # gradient failed as "non-finite where exact is finite"
    big = 7e4 if dtype == torch.float16 else 3.39e38 * 1.002
    exact = torch.tensor([big, 1.0, -2.0, -big], dtype=torch.float64)
    ft.assert_grad_nondegenerate(exact.to(dtype), exact, dtype=dtype)
    for wrong in (torch.tensor([-math.inf, 1.0, -2.0, -math.inf]), torch.tensor([1.0, 1.0, -2.0, -math.inf])):
        assert ft.grad_ratio(wrong.to(dtype), exact, dtype=dtype)["ratio"] == math.inf


def test_l2_distances64_near_a_code_are_formed_directly():
    # fuzzH: |x|^2 - 2 x.c + |c|^2 gave 1e46 for a row equal to a code at |x| ~ 1e30
    for scale in (1.0, 1e30):
        c = randn(40, 24, seed=1, dtype=torch.float64) * scale
        x = torch.cat([c[7:8], c[3:4] * (1 + 1e-9)])
        d, mag, _ = ft.distances64(x, c, "l2")
        direct = (x[:, None] - c[None]).square().sum(-1)
        assert d[0, 7] == 0 and torch.allclose(d, direct, rtol=1e-12, atol=0), scale
    # (..., D) rows, as the argument check accepts: (..., K) back, near a code too (review9: a 3-d
    # x with rows on codes failed unpacking the near rows' indices)
    x3 = torch.stack([c[:2], c[2:4]])
    for metric in ("l2", "dot", "cosine"):
        d3, mag3, _ = ft.distances64(x3, c, metric)
        d2, mag2, _ = ft.distances64(x3.reshape(4, -1), c, metric)
        assert d3.shape == mag3.shape == (2, 2, 40) and torch.equal(d3.reshape(4, 40), d2), metric
        assert torch.equal(mag3.reshape(4, 40), mag2), metric


def test_argmin_ratio_names_bad_arguments():
    # fuzzH: a codebook of the wrong shape, a 0-d x or an unknown metric gave torch's own errors
    x, c, idx = randn(4, 3, seed=1), randn(5, 3, seed=2), torch.zeros(4, dtype=torch.long)
    for args, match in (((x, randn(5, 2, seed=2), idx), "codebook must be"), ((x, c[0], idx), "codebook must be"),
                        ((torch.tensor(1.0), c, idx), "0-d"), ((x, c, idx, "l1"), "unknown metric"),
                        ((x.tolist(), c, idx), "must be a torch.Tensor")):
        with pytest.raises((ValueError, TypeError), match=match):
            ft.argmin_ratio(*args)
    with pytest.raises(ValueError, match="codebook must be"):
        ft.distances64(x, randn(5, 2, seed=2), "l2")


def test_dot_argmin_bound_covers_a_codebook_scored_in_its_largest_codes_unit(backend, device):
    # fuzzJ: a code at 2^126 sets dot's common score unit, 2^(126 + bitlen(D - 1) - 124); codes
    # ~2^-143 then score in float32's subnormals and tie at that unit's steps. The search's pick
    # failed the bound (ratio 1.85 at D = 17: the floor had no term for the unit)
    D = 17
    x = torch.zeros(1, D, device=device)
    x[0, 0] = 2.0**126
    c = torch.zeros(3, D, device=device)
    c[0, 0], c[1, 0], c[2, 0] = 65 * 2.0**-149, 191 * 2.0**-149, -(2.0**126)  # code 1 is the nearest
    idx, _ = fastvq.nearest_code(x, c, "dot")
    ft.assert_argmin_within_bound(x, c, idx, "dot")
    assert float(ft.argmin_ratio(x, c, torch.tensor([2], device=device), "dot")[0].max()) > 1  # 7e75 is no tie


def test_distances64_and_argmin_bound_take_rows_of_zero_width(device):
    # review10: reshape(-1, 0) is ambiguous, so D = 0 raised torch's reshape error
    for lead in ((3,), (2, 3)):
        x, c = torch.zeros(*lead, 0, device=device), torch.zeros(4, 0, device=device)
        for metric in ("l2", "dot", "cosine"):
            d, mag, _ = ft.distances64(x, c, metric)
            assert d.shape == mag.shape == (*lead, 4) and bool((d == d.flatten()[0]).all()), metric
            ft.assert_argmin_within_bound(x, c, torch.zeros(lead, dtype=torch.long, device=device), metric)


def test_grad_ratio_takes_float64_actual_and_names_a_missing_gradient(device):
    # fuzzO F3: a float64 `actual` (or the arguments swapped) failed in torch.where with "value
    # cannot be converted to type float without overflow" (float64's max as a default-dtype
    # scalar); a gradient that never arrived (x.grad is None) gave an AttributeError
    exact = torch.randn(10, 4, dtype=torch.float64, device=device)
    assert ft.grad_ratio(exact.clone(), exact)["ratio"] == 0.0
    ft.assert_grad_nondegenerate(exact.clone(), exact)
    with pytest.raises(TypeError, match=r"fastvq\.testing: actual must be a torch\.Tensor, got NoneType"):
        ft.assert_grad_nondegenerate(None, exact)


def test_an_infinite_gradient_bound_passes_only_an_exact_gradient(device):
    # fuzzP T1: 2^24 float32 roundings make gamma, so rtol and the zero floor, infinite: an
    # all-zero or sign-flipped gradient passed (ratio 0), where assert_close's infinite bound
    # passes only an exact match. Now the same rule
    exact = torch.randn(4, 3, dtype=torch.float64, device=device)
    for wrong in (torch.zeros(4, 3, device=device), -exact.float()):
        assert ft.grad_ratio(wrong, exact, reduce_len=2**24)["ratio"] == math.inf
        with pytest.raises(AssertionError):
            ft.assert_grad_nondegenerate(wrong, exact, reduce_len=2**24)
    assert ft.grad_ratio(exact.float().double(), exact.float().double(), reduce_len=2**24)["ratio"] == 0.0
    # review14: a formula that amplifies nothing (condition 0) or no rounding (reduce_len 0)
    # beside an infinite other factor gave a NaN tolerance, which passed the zero gradient
    for kw in (dict(condition=0.0, reduce_len=2**24), dict(condition=math.inf, reduce_len=0)):
        assert ft.grad_ratio(torch.zeros(4, 3, device=device), exact, **kw)["ratio"] == math.inf
        ft.assert_grad_nondegenerate(exact, exact, **kw)


@pytest.mark.parametrize("kw,match", [
    (dict(condition=-1.0), "condition must be >= 0"), (dict(rtol=-1.0), "rtol must be > 0"),
    (dict(rtol=0.0), "rtol must be > 0"), (dict(floor=float("nan")), "floor must be >= 0"),
    (dict(reduce_len=-5), "reduce_len must be >= 0"), (dict(dtype="tf32"), "dtype names the dtype values are stored"),
], ids=["condition", "rtol-negative", "rtol-0", "floor-nan", "reduce-len", "dtype-tf32"])
def test_gradient_criteria_name_a_bad_tolerance_argument(device, kw, match):
    # fuzzP T1/T2: a negative condition or rtol turned the ratio negative and a gradient 2x off
    # passed; dtype="tf32" raised torch.finfo's TypeError
    exact = torch.randn(4, 3, dtype=torch.float64, device=device)
    with pytest.raises(ValueError, match=f"fastvq.testing: {match}"):
        ft.assert_grad_nondegenerate(2 * exact.float(), exact, **kw)


def test_criteria_name_an_argument_that_is_no_dense_real_tensor(device):
    # fuzzP T2: QREmbedding(sparse=True)'s sparse gradient, a Python list and a complex tensor
    # met torch's internal errors (or a cast warning that dropped the imaginary part)
    exact = torch.ones(5, 2, dtype=torch.float64, device=device)
    sparse = torch.ones(5, 2, device=device).to_sparse()
    for fn in (ft.assert_grad_nondegenerate, ft.grad_ratio,
               lambda a, e: ft.assert_close(a, e, dtype=torch.float32),
               lambda a, e: ft.error_ratio(a, e, dtype=torch.float32)):
        with pytest.raises(ValueError, match=r"actual must be a dense tensor.*to_dense\(\)"):
            fn(sparse, exact)
        with pytest.raises(TypeError, match="actual must be a torch.Tensor, got list"):
            fn([1.0], exact)
        with pytest.raises(TypeError, match="actual must be real"):
            fn(torch.ones(5, 2, dtype=torch.complex64, device=device), exact)
    ft.assert_grad_nondegenerate(sparse.to_dense(), exact)  # (what the message asks for passes)


# ------------------------------------------------------------------ mutation round D (mutD): behaviour no test pinned


def test_a_bfloat16_store_two_ulps_off_fails():
    # D44: OUTPUT_ROUNDING = 2 allows one bfloat16 ulp for the store (the interpreter truncates);
    # doubled, a result two ulps off passed. Elementwise (reduce_len=1), so nothing else is in the bound.
    exp = torch.tensor([1.0, 3.0], dtype=torch.float64)
    ft.assert_close(torch.tensor([1 + 2**-7, 3 + 2**-6], dtype=torch.bfloat16), exp, dtype=torch.bfloat16)
    with pytest.raises(AssertionError, match="exceed their rounding bound"):
        ft.assert_close(torch.tensor([1 + 2**-6, 3.0], dtype=torch.bfloat16), exp, dtype=torch.bfloat16)


def test_argmin_index_outside_the_codebook_fails_even_next_to_the_nearest_code():
    # D48: an index outside [0, K) is scored as its clamped neighbour; without the in_range rule an
    # index K passed where code K - 1 is the nearest (and -1 where code 0 is).
    c = torch.tensor([[0.0, 0.0], [5.0, 5.0], [10.0, 10.0]])
    x = torch.tensor([[10.0, 9.0], [0.0, 1.0]])
    ft.assert_argmin_within_bound(x, c, torch.tensor([2, 0]))
    for bad in ([3, 0], [2, -1]):
        ratio, *_ = ft.argmin_ratio(x, c, torch.tensor(bad))
        assert ratio.isinf().any()
        with pytest.raises(AssertionError, match="outside"):
            ft.assert_argmin_within_bound(x, c, torch.tensor(bad))
