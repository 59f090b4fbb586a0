"""Mutation round G (the code both backends share: the EMA update's decisions, the references'
exact sums and statistics, code usage, semantic ids, the input checks, fastvq.testing and the
backend switch): one test per surviving mutant, each naming it.

Each test passes on the real code and fails with its mutant applied (the round's verify_kills.py).
Two tests pinned bugs the round found, fixed since (B-1: the EMA fallback's cs + eps overflowed
float32; B-2: the references' remainder sums lost a small remainder beside cancelling ones)."""

import math

import pytest
import torch

import fastvq
from fastvq.nn import VectorQuantizer
from fastvq.ops.ema_update import ema_update_
from fastvq.reference.ema_update import ema_decisions
from tests.utils import randn


# --------------------------------------------------------------------------- ema_update_


def test_ema_update_keeps_the_state_of_a_code_whose_count_is_not_finite(backend, device):
    """G03 (ema_decisions: ``keep`` without ``isfinite(new_cs)``): a code whose batch count is
    +inf (its sums finite) keeps its EMA state, as the docstring says ("a code whose new count or
    batch sums are not finite keeps its EMA state"); the others move. test_guards had non-finite
    sums only."""
    L, K, D = 1, 3, 2
    codebook = randn(L, K, D, seed=1, device=device)
    cs = torch.tensor([[2.0, 3.0, 4.0]], device=device)
    ea = randn(L, K, D, seed=2, device=device)
    counts = torch.tensor([[1.0, math.inf, 2.0]], device=device)
    sums = randn(L, K, D, seed=3, device=device)
    before = [t.clone() for t in (codebook, cs, ea)]
    ema_update_(codebook, cs, ea, counts, sums, 0.5, 1e-5)
    assert cs[0, 1] == 3.0 and torch.equal(ea[0, 1], before[2][0, 1])
    assert cs.isfinite().all() and ea.isfinite().all() and codebook.isfinite().all()
    assert cs[0, 0] == 1.5 and cs[0, 2] == 3.0  # (0.5 * 2 + 0.5 * 1, 0.5 * 4 + 0.5 * 2: exact)
    n = 1.5 + 3.0 + 3.0
    for k in (0, 2):
        want_ea = 0.5 * before[2][0, k].double() + 0.5 * sums[0, k].double()
        smoothed = (float(cs[0, k]) + 1e-5) / (n + 3e-5) * n
        torch.testing.assert_close(codebook[0, k].double(), want_ea / smoothed, rtol=1e-6, atol=0)


def test_ema_update_keeps_a_code_whose_new_value_is_partly_not_finite(backend, device):
    """G19 (ema_update_rows_ref_: ``isfinite(new_code).all(-1)`` -> ``.any(-1)``): a code whose new
    value overflows float32 in one feature only keeps its whole old value (the kernel's rule);
    test_guards overflowed every feature of its code."""
    codebook = randn(1, 2, 3, seed=4, device=device)
    cs = torch.tensor([[1e-30, 5.0]], device=device)
    ea = torch.tensor([[[3e38, 1.0, 1.0], [1.0, 2.0, 3.0]]], device=device)
    counts = torch.tensor([[0.0, 2.0]], device=device)
    sums = torch.tensor([[[0.0, 0.0, 0.0], [2.0, 4.0, 6.0]]], device=device)
    before = codebook.clone()
    ema_update_(codebook, cs, ea, counts, sums, 0.99, 1e-5)
    assert torch.equal(codebook[0, 0], before[0, 0])
    assert codebook.isfinite().all() and not torch.equal(codebook[0, 1], before[0, 1])


def test_ema_smoothing_is_the_seeds_float32_arithmetic_down_to_float32s_normal_range(device):
    """G15 (ema_decisions: the float64 fallback from ``quotient < tiny`` -> ``< eps``): a code
    whose quotient (cs + eps) / (n + K eps) is ~1e-9 (normal) keeps the seed's float32 smoothing
    bit for bit; the float64 fallback rounds it one ulp apart (1.1000000086e-4 vs 1.0999999358e-4).
    The bit-for-bit test's quotients were all above float32's epsilon."""
    new_cs = torch.tensor([[1e-4, 1e5]], device=device)
    counts = new_cs.clone()
    sums = torch.ones(1, 2, 1, device=device)
    _, _, got_cs, smoothed = ema_decisions(torch.zeros_like(new_cs), counts, sums, 0.0, 1e-5)
    n = got_cs.sum(-1, keepdim=True)
    seed = (got_cs + 1e-5) / (n + 2 * 1e-5) * n
    assert torch.equal(got_cs, new_cs) and torch.equal(smoothed, seed)
    assert 0 < float(((got_cs + 1e-5) / (n + 2e-5))[0, 0]) < torch.finfo(torch.float32).eps


def test_ema_update_of_a_count_near_float32s_largest_with_a_large_eps(backend, device):
    """Round G's B-1, and G12 (ema_decisions: the fallback no longer taken where the total
    overflows, only where the quotient is subnormal): one code counting 3.4e38 with eps 1e37:
    smoothed = (3.4e38 + 1e37) / (3.4e38 + 1e37) * 3.4e38, the code 3.4e38 / 3.4e38 = 1. The
    fallback formed cs + eps in float32, +inf there, and wrote 0; G12 keeps the old value 5."""
    codebook = torch.full((1, 1, 1), 5.0, device=device)
    cs, ea = torch.zeros(1, 1, device=device), torch.zeros(1, 1, 1, device=device)
    counts = torch.full((1, 1), 3.4e38, device=device)
    sums = torch.full((1, 1, 1), 3.4e38, device=device)
    ema_update_(codebook, cs, ea, counts, sums, 0.0, 1e37)
    assert float(codebook) == 1.0


# --------------------------------------------------------------------------- the references' exact sums

from fractions import Fraction  # noqa: E402

from fastvq.reference._exact_sum import pair_index_sum, round_pair  # noqa: E402
from tests._midpoints import nearest  # noqa: E402

# 13 terms below 1 whose exact sum lies 2^-50 from a float32 midpoint (11.4 + 2^-21): their
# extraction at sigma = 2^ceil(log2(13 + 2)) = 16 is exact; at 8 (X02: floor) or 2 (X06: the
# count left at 0) the sum of the extracted parts (11.4, spacing 2^-49) rounds away a 2^-50
MARGIN_CASES = {
    "X02": ["0x1.fffffffe5c41cp-1", "0x1.fffffffec1144p-1", "0x1.fffffffe9246cp-1", "0x1.fffffffe7207cp-1",
            "0x1.fffffffeff0b8p-1", "0x1.ffffffff62e7cp-1", "0x1.fffffffff343ep-1", "0x1.fffffffe2b0e0p-1",
            "0x1.ffffffffaf074p-1", "0x1.fffffffea8056p-1", "0x1.ffffffffd134ep-1", "-0x1.000000047e7f8p-1",
            "0x1.ccccd00fb454ep-1"],
    "X06": ["0x1.fffffffe75824p-1", "0x1.fffffffe5155ap-1", "0x1.ffffffffd68b4p-1", "0x1.fffffffef6de8p-1",
            "0x1.fffffffe0e68ep-1", "0x1.fffffffe6158ep-1", "0x1.fffffffec9686p-1", "0x1.fffffffe17f6ep-1",
            "0x1.fffffffe915b8p-1", "0x1.ffffffff20508p-1", "0x1.ffffffff71622p-1", "-0x1.0000000482688p-1",
            "0x1.ccccd01279f84p-1"],
}


@pytest.mark.parametrize("case", list(MARGIN_CASES))
def test_index_sum_extraction_margin_covers_thirteen_terms(device, case):
    """X02 (_exact_sum._sigma: ``ceil(log2(n + 2))`` -> ``floor``) and X06 (pair_index_sum: the
    per-row term count never accumulated, so sigma = 2 |max|): sigma must exceed the row's sum
    of extracted parts, or their float64 sum is not exact; a sum 2^-50 above a float32 midpoint
    then rounds down (11.3999996 for 11.4000006). The midpoint test's 7 terms sit where floor and
    ceil agree, and its counts never mattered."""
    terms = [float.fromhex(h) for h in MARGIN_CASES[case]]
    want = nearest(sum(Fraction(v) for v in terms), torch.float32)
    t = torch.tensor(terms, dtype=torch.float64, device=device)
    idx = torch.zeros(len(terms), dtype=torch.long, device=device)
    hi, lo = pair_index_sum((1, 1), lambda: [(idx, t[:, None])], device)
    assert round_pair(hi, lo, torch.float32).item() == want == 11.40000057220459


def test_code_statistics_sum_just_above_a_midpoint_with_a_cancelled_pair(backend, device):
    """Round G's B-2: rows (D = 1) of one code: (1 + 2^-23) * (1 - 2^-24), 2^-47, 2^-60, 2^-130,
    -2^-60 (weights 1 but the first): exact sum 1 + 2^-24 + 2^-130, just above the midpoint of 1
    and 1 + 2^-23. The reference's remainders summed plainly lost the 2^-130 (1.0)."""
    x = torch.tensor([[1 + 2**-23], [2**-47], [2**-60], [2**-130], [-2**-60]], device=device)
    w = torch.tensor([1 - 2**-24, 1, 1, 1, 1], device=device)
    _, sums = fastvq.code_statistics(x, torch.zeros(5, dtype=torch.long, device=device), 1, weights=w)
    exact = sum(Fraction(float(a)) * Fraction(float(b)) for a, b in zip(x.flatten().tolist(), w.tolist()))
    assert sums.item() == nearest(exact, torch.float32) == 1 + 2**-23


def test_dot_distance_of_a_row_with_an_infinite_entry_is_infinite(backend, device):
    """X08 (_exact_sum.pair_sum_lastdim, two extractions: the non-finite ``hi`` replaced by
    two_sum's ``hi + NaN``): the reference's direct dot distance of a row holding +-inf (the
    chosen code's, returned by nearest_code) is -+inf, as the kernel's, not NaN."""
    inf = math.inf
    x = torch.tensor([[inf, 1.0], [1.0, -inf], [2.0, 3.0]], device=device)
    c = torch.tensor([[1.0, 1.0], [2.0, 1.0]], device=device)
    idx, dist = fastvq.nearest_code(x, c, metric="dot")
    assert idx.tolist() == [0, 0, 1] and dist.tolist() == [-inf, inf, -7.0]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_round_pair_of_more_than_its_chunk_keeps_the_dtype(device, dtype):
    """X12 (_exact_sum.round_pair: the chunked path, beyond ROUND_CHUNK = 2^20 elements, rounded
    each chunk to float32 whatever ``dtype``): a 1025 x 1024 pair (a bag output or table gradient
    of that size) rounds to ``dtype``, each element as a small pair of the same values does.
    (qr_lookup's reference returned a float32 bag output for bfloat16 tables.)"""
    from fastvq.reference._exact_sum import ROUND_CHUNK

    hi = randn(1025, 1024, seed=5, device=device).double() * 3
    lo = randn(1025, 1024, seed=6, device=device).double() * 2.0**-60
    assert hi.numel() > ROUND_CHUNK
    out = round_pair(hi, lo, dtype)
    assert out.dtype == dtype
    assert torch.equal(out[:7], round_pair(hi[:7], lo[:7], dtype))
    assert torch.equal(out[-7:], round_pair(hi[-7:], lo[-7:], dtype))


def test_code_statistics_negative_sum_just_beyond_a_midpoint(backend, device):
    """X14 (_exact_sum.round_pair, float32: the step to odd ``up = (lo > 0) == (h > 0)`` ->
    ``lo > 0``): a negative sum whose float64 ``hi`` is a float32 midpoint and whose ``lo`` adds
    to its magnitude steps away from 0: rows -(1 + 2^-23) (weight 1 - 2^-24), -2^-47, -2^-80
    sum to -(1 + 2^-24 + 2^-80), which rounds to -(1 + 2^-23), not -1. The midpoint tests' sums
    were positive."""
    x = -torch.tensor([[1 + 2**-23], [2**-47], [2**-80]], device=device)
    w = torch.tensor([1 - 2**-24, 1, 1], device=device)
    _, sums = fastvq.code_statistics(x, torch.zeros(3, dtype=torch.long, device=device), 1, weights=w)
    exact = sum(Fraction(float(a)) * Fraction(float(b)) for a, b in zip(x.flatten().tolist(), w.tolist()))
    assert sums.item() == nearest(exact, torch.float32) == -(1 + 2**-23)


@pytest.mark.parametrize("dtype, half", [(torch.bfloat16, 2.0**-8), (torch.float16, 2.0**-11)], ids=["bf16", "fp16"])
def test_round_pair_16_bit_midpoint_held_in_float32_is_decided_by_lo(device, dtype, half):
    """X16 (_exact_sum.round_pair, 16-bit: ``d = where(d != 0, d, lo)`` -> ``d``): where ``hi`` is
    itself a float32 value (``d = hi - f = 0``) on a 16-bit midpoint, the sign of ``lo`` decides:
    1 + half + 2^-60 rounds up, 1 + half - 2^-60 down, 1 + half alone to even (1)."""
    hi = torch.full((3,), 1 + half, dtype=torch.float64, device=device)
    lo = torch.tensor([2.0**-60, -(2.0**-60), 0.0], dtype=torch.float64, device=device)
    got = round_pair(hi, lo, dtype).tolist()
    want = [nearest(Fraction(1 + half) + Fraction(v), dtype) for v in lo.tolist()]
    assert got == want == [1 + 2 * half, 1.0, 1.0]


# --------------------------------------------------------------------------- code_usage


def test_code_usage_entropy_uses_the_seeds_1e_10(backend, device):
    """U04 (reference/code_usage.py: ``EPS = 1e-10`` -> ``1e-8``): the entropy is the seed's
    ``-sum p log(p + 1e-10)``; the suite's parity test used few codes, where the eps moves the
    entropy below float32's resolution. 2^16 codes used once each: each term moves by about
    ``eps``, the entropy (11.09) by 6.5e-4 at eps 1e-8 (6e-5 relative; a float32 sum of 2^16
    equal terms errs far below 1e-5 relative)."""
    K = 2**16
    usage = fastvq.code_usage(torch.arange(K, device=device), K)
    p = torch.full((K,), 1.0 / K, dtype=torch.float64)
    want = float(-(p * torch.log(p + 1e-10)).sum())
    assert math.isclose(float(usage.entropy), want, rel_tol=1e-5), (float(usage.entropy), want)
    assert math.isclose(float(usage.perplexity), math.exp(want), rel_tol=1e-4)


def test_code_usage_to_dict_usage_is_the_fraction_in_use(backend, device):
    """U13 (CodeUsage.to_dict: ``"usage"`` from the active-code count, not the fraction): 3 of 8
    codes in use give usage 0.375 (no test read to_dict's usage)."""
    usage = fastvq.code_usage(torch.tensor([0, 0, 5, 7], device=device), 8)
    d = usage.to_dict()
    assert d["active_codes"] == 3 and d["usage"] == 0.375 == float(usage.usage)


# --------------------------------------------------------------------------- row chunks


def test_row_chunk_of_rows_wider_than_the_chunk_budget_is_one_row():
    """C01 (reference/_chunks.py row_chunk: ``max(1, ...)`` -> ``max(0, ...)``): rows of more than
    ROW_CHUNK_ELEMENTS = 2^24 columns are worked one at a time, not in chunks of 0 rows (``range``
    with step 0 raised in every reference that chunks, e.g. code_statistics of D = 2^24)."""
    from fastvq.reference._chunks import ROW_CHUNK, ROW_CHUNK_ELEMENTS, row_chunk

    assert row_chunk(ROW_CHUNK_ELEMENTS + 1) == 1 and row_chunk(3 * ROW_CHUNK_ELEMENTS) == 1
    assert row_chunk(ROW_CHUNK_ELEMENTS) == 1 and row_chunk(1) == ROW_CHUNK and row_chunk(0) == ROW_CHUNK


# --------------------------------------------------------------------------- fastvq.testing


def test_testing_subnormal_floor_is_one_spacing_per_rounding(device):
    """T07 (error_bound: the underflow floor ``sub(out) + n sub(acc)`` made 1000 times larger): an
    error of 2^-140 on an expected 0 (a float32 result, reduce_len 1: floor 2 * 2^-149) fails."""
    import fastvq.testing as ft

    exp = torch.zeros(1, dtype=torch.float64, device=device)
    act = torch.full((1,), 2.0**-140, device=device)
    assert float(ft.error_bound(exp, dtype=torch.float32)) == 2 * 2.0**-149
    assert ft.error_ratio(act, exp, dtype=torch.float32) == 2.0**9 / 2


def test_testing_store_rounding_is_the_output_dtypes(device):
    """T08 (error_bound: the store's ``2 u`` taken from the operands' dtype, not ``out_dtype``):
    bfloat16 operands stored as float32 (out_dtype) allow 2 * 2^-24 for the store, not 2 * 2^-8:
    a result 2^-10 off (relative) fails."""
    import fastvq.testing as ft

    exp = torch.full((3,), 1.5, dtype=torch.float64, device=device)
    act = (exp * (1 + 2.0**-10)).float()
    assert ft.error_ratio(act, exp, dtype=torch.bfloat16, out_dtype=torch.float32) > 100
    bound = ft.error_bound(exp, dtype=torch.bfloat16, out_dtype=torch.float32)
    want = 1.5 * (4 * ft.gamma(1, 2.0**-24) + 2 * 2.0**-24) + 2.0**-149 + 2.0**-149
    assert torch.allclose(bound, torch.full_like(bound, want), rtol=1e-12, atol=0)


def test_testing_magnitude_is_taken_as_its_absolute_value(device):
    """T09 (error_bound: ``_as_tensor(magnitude).abs()`` -> without abs): a magnitude passed with a
    sign (a signed product a.b where |a|.|b| was meant) bounds as its absolute value, never as a
    negative bound that fails an exact match's neighbour or passes nothing."""
    import fastvq.testing as ft

    exp = torch.tensor([1.0, -2.0], dtype=torch.float64, device=device)
    m = torch.tensor([-3.0, -5.0], dtype=torch.float64, device=device)
    assert torch.equal(ft.error_bound(exp, dtype=torch.float32, reduce_len=4, magnitude=m),
                       ft.error_bound(exp, dtype=torch.float32, reduce_len=4, magnitude=m.abs()))
    act = (exp * (1 + 2.0**-22)).float()
    assert ft.error_ratio(act, exp, dtype=torch.float32, reduce_len=4, magnitude=m) <= 1


def test_testing_assert_close_fails_a_ratio_just_above_one(device):
    """T16 (assert_close: raises from ratio 1.5, not 1): an element at 1.25 times its bound fails
    (error_ratio's "<= 1 passes" is assert_close's rule too)."""
    import fastvq.testing as ft

    exp = torch.ones(2, dtype=torch.float64, device=device)
    bound = float(ft.error_bound(exp, dtype=torch.float32)[0])
    act = exp + torch.tensor([0.0, 1.25 * bound], dtype=torch.float64, device=device)
    assert math.isclose(ft.error_ratio(act, exp, dtype=torch.float32), 1.25, rel_tol=1e-9)
    with pytest.raises(AssertionError, match="1 of 2 elements exceed"):
        ft.assert_close(act, exp, dtype=torch.float32)


def test_testing_rounded_distance_allows_one_unit_roundoff_of_each_distance(device):
    """T20 (argmin_ratio(rounded_distance=True): ``u |d_k|`` -> ``2 u |d_k|``): the allowance of a
    program that argmins its rounded float32 distances grows by 2^-24 |d_k| per code, no more:
    choosing d = 1 over d = 0.25 allows 2^-24 (1 + 0.25) more."""
    import fastvq.testing as ft

    x = torch.tensor([[1.0, 0.0]], device=device)
    c = torch.tensor([[0.0, 0.0], [0.5, 0.0]], device=device)
    idx = torch.tensor([0], device=device)
    _, gap, plain, d = ft.argmin_ratio(x, c, idx, "l2")
    _, _, rounded, _ = ft.argmin_ratio(x, c, idx, "l2", rounded_distance=True)
    assert d.tolist() == [[1.0, 0.25]] and gap.tolist() == [0.75]
    assert math.isclose(float(rounded - plain), 2.0**-24 * 1.25, rel_tol=1e-9)


def test_testing_tf32_scaling_floor_is_two_to_minus_136(device):
    """T21 (argmin_ratio: the "tf32"/"tf32x3" floor unit 2^-136 -> 2^-130): a dot search that
    chooses the zero code over one scoring -2^-132 (x = [1, 0]) is wrong even in TF32: its floor
    is D 2^-136 = 2^-135 per code, so the gap 2^-132 is 4 times what rounding explains."""
    import fastvq.testing as ft

    x = torch.tensor([[1.0, 0.0]], device=device)
    c = torch.tensor([[2.0**-132, 0.0], [0.0, 0.0]], device=device)
    ratio, gap, allowed, _ = ft.argmin_ratio(x, c, torch.tensor([1], device=device), "dot", "tf32x3")
    assert float(gap[0]) == 2.0**-132 and 3.5 < float(ratio[0]) < 4.0
    with pytest.raises(AssertionError, match="farther than rounding explains"):
        ft.assert_argmin_within_bound(x, c, torch.tensor([1], device=device), "dot", "tf32x3")


def test_testing_l2_distances64_near_a_code_are_formed_directly(device):
    """T22 (distances64: the direct form only where the expansion lost 40 bits, not 20): a row
    2^-12 from a code (D = 8, d / mag ~ 2^-27) gets its float64 distance to float64 accuracy, not
    the expansion's ~2^-27 relative error (the "float64 oracle" the parity tests compare with)."""
    import fastvq.testing as ft

    c = randn(1, 8, seed=9, device=device)
    x = c + randn(1, 8, seed=10, device=device) * 2.0**-12
    d, mag, _ = ft.distances64(x, c, "l2")
    exact = sum(Fraction(float(a)) ** 2 for a in (x.double() - c.double()).flatten().tolist())
    assert 2.0**-40 < float(d) / float(mag) < 2.0**-20
    assert abs(Fraction(float(d)) - exact) <= exact * 2.0**-48


@pytest.mark.parametrize("metric, n", [("l2", 5 + 2), ("dot", 5), ("cosine", 2 * 5 + 8)])
def test_testing_distances64_reduction_lengths(device, metric, n):
    """T23 (distances64: cosine's reduction length 2D + 8 -> 4D + 8): the lengths the bounds use
    are D + 2 (l2), D (dot) and 2D + 8 (cosine: the dot, both norms, their roots and scaling)."""
    import fastvq.testing as ft

    assert ft.distances64(randn(3, 5, seed=11, device=device), randn(4, 5, seed=12, device=device), metric)[2] == n


def test_testing_grad_zeros_count_from_the_floor(device):
    """T24 (grad_ratio: zeros counted where ``|exact| > 2 floor``, not ``> floor``): an exact 0
    where the exact gradient is 1.5 floors is a zero (a dropped gradient), and fails."""
    import fastvq.testing as ft

    exact = torch.tensor([1.0, 1.5e-3], dtype=torch.float64, device=device)
    actual = torch.tensor([1.0, 0.0], device=device)
    r = ft.grad_ratio(actual, exact, floor=1e-3)
    assert r["zeros"] == 1 and r["ratio"] == math.inf


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_testing_grad_default_rtol_and_floor(device, dtype):
    """T25 (the default rtol's store term doubled) and T29 (the default floor's ``inner * scale``
    doubled): rtol = 2 u(dtype) + 4 condition gamma(n, 2^-24), floor = 4 condition gamma(n, 2^-24)
    max|exact| + the dtype's smallest subnormal, as grad_ratio's docstring gives them."""
    import fastvq.testing as ft

    exact = torch.tensor([3.0, -8.0, 0.5], dtype=torch.float64, device=device)
    r = ft.grad_ratio(exact.to(dtype), exact, reduce_len=10, condition=2.0)
    inner = 4 * 2.0 * ft.gamma(10, 2.0**-24)
    fi = torch.finfo(dtype)
    assert math.isclose(r["rtol"], 2 * ft.unit_roundoff(dtype) + inner, rel_tol=1e-12)
    assert math.isclose(r["floor"], inner * 8.0 + fi.tiny * fi.eps, rel_tol=1e-12)


def test_testing_dot_floor_of_a_codebook_rescaled_by_its_largest_code(device):
    """T30 (_scaling_floor, dot: the rescaled codebook's unit ``2^(bitlen(D - 1) - 123)`` of the
    largest code -> ``- 120``): beside a code at 2^126 (D = 17), a float32 dot search scores small
    codes in units of 2^(126 + 5 - 123) 2^-148 per product: each code's floor is 17 2^-140. Choosing
    the zero code over one scoring -2^-133 is 3.8 times what that explains, and fails."""
    import fastvq.testing as ft

    D = 17
    x = torch.zeros(1, D, device=device)
    x[0, 0] = 1.0
    c = torch.zeros(3, D, device=device)
    c[0, 1], c[1, 0] = 2.0**126, 2.0**-133
    ratio, gap, _, _ = ft.argmin_ratio(x, c, torch.tensor([2], device=device), "dot")
    assert float(gap[0]) == 2.0**-133 and 3.5 < float(ratio[0]) < 3.8


def test_testing_assert_argmin_fails_a_ratio_just_above_one(device):
    """T34 (assert_argmin_within_bound: raises from ratio 1.5, not 1): a dot choice whose gap is
    1.25 times its tf32x3 allowance (2 codes' floors of 2 2^-136) fails."""
    import fastvq.testing as ft

    x = torch.tensor([[1.0, 0.0]], device=device)
    c = torch.tensor([[5 * 2.0**-136, 0.0], [0.0, 0.0]], device=device)
    idx = torch.tensor([1], device=device)
    ratio = float(ft.argmin_ratio(x, c, idx, "dot", "tf32x3")[0][0])
    assert 1.2 < ratio < 1.25
    with pytest.raises(AssertionError, match="farther than rounding explains"):
        ft.assert_argmin_within_bound(x, c, idx, "dot", "tf32x3")


def test_testing_tf32x3_operand_error_and_the_fp16_alias(device):
    """T37 (_operand_error: "tf32x3" products err 2 * TF32X3_ERROR) and T38 (the alias "fp16"
    naming bfloat16): a float32 bound at precision "tf32x3" is 4 (3 2^-22 + gamma (1 + 3 2^-22))
    |e| + the store's 2 2^-24 |e| + the floor; "fp16", "half" and "float16" are float16's 2^-11."""
    import fastvq.testing as ft

    exp = torch.tensor([2.0, -0.75], dtype=torch.float64, device=device)
    e = 3 * 2.0**-22
    floor = 2.0**-149 + 8 * 2.0**-149  # (the store's subnormal and one per rounding of the 8)
    want = (4 * (e + ft.gamma(8, 2.0**-24) * (1 + e)) + 2 * 2.0**-24) * exp.abs() + floor
    bound = ft.error_bound(exp, dtype=torch.float32, reduce_len=8, precision="tf32x3")
    assert torch.allclose(bound, want, rtol=1e-12, atol=0)
    assert ft.unit_roundoff("fp16") == ft.unit_roundoff("half") == ft.unit_roundoff("float16") == 2.0**-11


def test_code_statistics_ref_skipped_counts_the_nonfinite_rows():
    """K11 (reference/code_statistics.py code_statistics_ref: ``skipped`` from the out-of-range
    column of ``bad``): the reference's ``return_skipped=True`` counts rows left out as not finite
    (the op's own count goes through code_statistics_full_ref, so no parity test saw it). One NaN
    row and two out-of-range ids: skipped 1."""
    from fastvq.reference.code_statistics import code_statistics_ref

    x = randn(5, 3, seed=13)
    x[1, 2] = float("nan")
    idx = torch.tensor([0, 1, 7, -1, 2], device=x.device)
    counts, _, skipped = code_statistics_ref(x, idx, 3, return_skipped=True)
    assert skipped.dim() == 0 and int(skipped) == 1 and counts.tolist() == [1.0, 0.0, 1.0]
    _, _, skipped2 = code_statistics_ref(x[None].expand(2, 5, 3), idx[None].expand(2, 5), 3, return_skipped=True)
    assert skipped2.tolist() == [1, 1]


def test_code_statistics_beyond_the_term_cache_counts_skipped_rows_once(backend, monkeypatch):
    """K12 (reference/code_statistics.py: the not-finite rows counted on every pass over the
    terms, not the first only): where the terms exceed pair_index_sum's CACHE_BYTES (64 MiB; 0
    here) the reference forms them twice, and a NaN row was counted twice (skipped 2)."""
    import fastvq.reference._exact_sum as es

    monkeypatch.setattr(es, "CACHE_BYTES", 0)
    x = randn(6, 3, seed=51)
    x[4, 0] = float("nan")
    idx = torch.tensor([0, 1, 2, 0, 1, 2], device=x.device)
    counts, sums, skipped = fastvq.code_statistics(x, idx, 3, return_skipped=True)
    assert int(skipped) == 1 and counts.tolist() == [2.0, 1.0, 2.0]
    torch.testing.assert_close(sums[1], x[1], rtol=0, atol=0)


# --------------------------------------------------------------------------- input checks


def test_an_overlap_only_the_sum_of_two_strides_reaches_is_refused(backend, device):
    """H08 (_checks.check_no_overlap: the reach of the smaller strides replaced, not summed): a
    codebook view of shape (2, 2, 2) and strides (3, 2, 1) puts elements (0, 0, 1) + (0, 1, 0)
    and (1, 0, 0) at offset 3: each stride exceeds the one below it, but not their sum (1 + 2),
    and an in-place update would race. The suite's overlapping views shared a single stride."""
    base = torch.zeros(8, device=device)
    codebook = base.as_strided((2, 2, 2), (3, 2, 1))
    assert codebook[0, 1, 1].data_ptr() == codebook[1, 0, 0].data_ptr()
    cs, ea = torch.ones(2, 2, device=device), torch.zeros(2, 2, 2, device=device)
    counts, sums = torch.ones(2, 2, device=device), torch.ones(2, 2, 2, device=device)
    with pytest.raises(ValueError, match="codebook is updated in place, but its elements may share memory"):
        ema_update_(codebook, cs, ea, counts, sums, 0.5, 1e-5)
    codebook = torch.zeros(16, device=device).as_strided((2, 2, 2), (4, 2, 1))  # (no overlap: accepted)
    ema_update_(codebook, cs, ea, counts, sums, 0.5, 1e-5)


# --------------------------------------------------------------------------- the backend switch


@pytest.mark.parametrize("value", ["1", "true", "YES", "On"])
def test_interpreter_switch_takes_the_documented_spellings(monkeypatch, value):
    """B04 (_backend.interpreter_enabled: ``yes`` / ``on`` no longer read as switched on): the
    Triton interpreter's environment switch is read as triton reads it, any case."""
    from fastvq._backend import interpreter_enabled

    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert interpreter_enabled()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not interpreter_enabled()


@pytest.mark.about_devices("the interpreter's check concerns CPU tensors, on every machine")
def test_triton_backend_refuses_cpu_tensors_when_the_interpreter_came_too_late(monkeypatch):
    """B05 (_backend.use_triton: the check of ``kernels.INTERPRETED`` dropped): with
    TRITON_INTERPRET=1 set only after Triton was imported (the kernels were not built for the
    interpreter), the "triton" backend on CPU tensors raises, naming the cause."""
    from fastvq import kernels
    from fastvq._backend import use_triton

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    x = torch.zeros(2).cpu()
    with fastvq.backend("triton"), pytest.raises(RuntimeError, match="set after Triton was imported"):
        use_triton("nearest_code", x)


def test_triton_backend_refuses_meta_tensors(device):
    """B11 (_backend.use_triton: the check for devices other than CPU and CUDA dropped): meta
    tensors (or any other device) under backend "triton" raise a RuntimeError naming the devices."""
    from fastvq._backend import use_triton

    x = torch.zeros(2, device="meta")  # (a meta tensor: no data on any device)
    with fastvq.backend("triton"), pytest.raises(RuntimeError, match=r"runs on CUDA or \(interpreted\) CPU tensors"):
        use_triton("nearest_code", x)


def test_an_empty_backend_variable_is_unset(monkeypatch):
    """B12 (_backend.get_backend: ``if env:`` -> ``if env is not None:``): FASTVQ_BACKEND set to
    the empty string (``FASTVQ_BACKEND= python ...``) means the default, "auto", not an error."""
    from fastvq._backend import get_backend, set_backend

    monkeypatch.setenv("FASTVQ_BACKEND", "")
    set_backend(None)
    assert get_backend() == "auto"


def test_code_statistics_refuses_int16_indices(backend, device):
    """H11 (_checks.check_int: int16 accepted beside int64 and int32): indices must be int64 or
    int32 (the kernels load those two); an int16 tensor is a TypeError naming the dtype."""
    x = randn(4, 3, seed=14, device=device)
    with pytest.raises(TypeError, match="indices must be int64 or int32, got torch.int16"):
        fastvq.code_statistics(x, torch.tensor([0, 1, 0, 1], dtype=torch.int16, device=device), 2)


def test_a_thirty_digit_size_is_named_in_full(device):
    """H27 (_checks._short: numbers in full only up to 20 digits, not 40): a 31-digit codebook size
    is printed as given; only beyond 40 digits does the message give its bit length."""
    idx = torch.zeros(2, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match=r"codebook_size must be <= \d+, got 1000000000000000000000000000000$"):
        fastvq.code_usage(idx, 10**30)
    with pytest.raises(ValueError, match=r"got an int of 167 bits$"):
        fastvq.code_usage(idx, 10**50)


@pytest.mark.parametrize("eps, ok", [(2.0**-149, True), (2.0**-150, False), (1e-46, False), (0.0, False),
                                     (float(torch.finfo(torch.float32).max), True), (3.5e38, False)],
                         ids=["2^-149", "2^-150", "1e-46", "0", "f32max", "3.5e38"])
def test_ema_update_eps_is_a_positive_float32(backend, device, eps, ok):
    """H29 (check_real_arg(float32=True, positive): the float32 lower bound 2^-150 -> 0), H31
    (``> low`` -> ``>= low`` for open bounds) and H30 (``<= max`` -> ``< max``): ``eps`` must be
    > 0 as a float32 (2^-149 is, 2^-150 and 1e-46 round to 0) and finite in float32 (its largest
    value included)."""
    codebook, cs, ea = randn(1, 2, 3, seed=15, device=device), torch.ones(1, 2, device=device), randn(1, 2, 3, seed=16, device=device)
    counts, sums = torch.ones(1, 2, device=device), randn(1, 2, 3, seed=17, device=device)
    if ok:
        ema_update_(codebook, cs, ea, counts, sums, 0.5, eps)
        return
    with pytest.raises(ValueError, match=r"eps must be finite in float32 and > 0.0 in float32, got"):
        ema_update_(codebook, cs, ea, counts, sums, 0.5, eps)


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 10**400])
def test_real_arguments_are_finite_float64(value):
    """H33 (check_real_arg: without float32=True the bound ``sys.float_info.max`` -> ``inf``): a
    real argument must be finite whatever its other bounds (inf passed a check with no maximum)."""
    from fastvq._checks import check_real_arg

    with pytest.raises(ValueError, match="x must be finite"):
        check_real_arg("op", "x", value)
    assert check_real_arg("op", "x", 1.7976931348623157e308) == 1.7976931348623157e308


def test_a_codebook_of_more_than_two_to_the_61_floats_is_refused_by_name():
    """H28 (_checks.check_size_product: the float32 byte count ``prod * 4`` -> ``prod``): a
    VectorQuantizer of 2^60 x 3 codes (3 2^62 bytes, beyond int64) is a ValueError naming its
    arguments, before any allocation; the suite's 2^62 x 3 was beyond int64 without the * 4."""
    with pytest.raises(ValueError, match=r"num_embeddings \* embedding_dim too large"):
        VectorQuantizer(2**60, 3)


def test_sample_code_takes_the_largest_int64_seed(backend, device):
    """H26 (_checks.check_int_arg: ``value > maximum`` -> ``>=``): a bound is inclusive: the seed
    2^63 - 1 (the top of sample_code's [-2^63, 2^63)) is a seed, 2^63 is refused."""
    x, c = randn(6, 4, seed=26, device=device), randn(5, 4, seed=27, device=device)
    idx = fastvq.sample_code(x, c, 1.0, seed=2**63 - 1)[0]
    assert torch.equal(idx, fastvq.sample_code(x, c, 1.0, seed=2**63 - 1)[0])
    with pytest.raises(ValueError, match=r"seed must be <= 9223372036854775807, got 9223372036854775808"):
        fastvq.sample_code(x, c, 1.0, seed=2**63)


def test_residual_decode_refuses_negative_codes_and_takes_no_codes(backend, device):
    """H21 (_checks.check_index_range: the lower bound dropped) and H46 (its early return for an
    empty tensor dropped: aminmax of nothing raises): a code -1 (which would decode the previous
    level's last code) is refused; no rows decode to no rows."""
    cb = randn(2, 5, 3, seed=28, device=device)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 5\), got values in \[-1, 0\]"):
        fastvq.residual_decode(torch.tensor([[-1, 0]], device=device), cb)
    out = fastvq.residual_decode(torch.zeros(0, 2, dtype=torch.long, device=device), cb)
    assert out.shape == (0, 3)


def test_kmeans_init_takes_a_float_mask_with_zero_weights(backend):
    """H15 (_checks.weights_detail: weight 0 taken as bad): k-means init reads a float mask's
    complaint on the host; padding rows of weight 0 are valid (only negative or non-finite weights
    are refused), and a negative weight's message names it alone."""
    torch.manual_seed(0)
    x = randn(24, 2, seed=29)
    mask = (torch.arange(24, device=x.device) < 12).float()
    vq = VectorQuantizer(3, 2, kmeans_init=True).to(x.device).train()
    vq(x, mask)
    assert bool(vq.initted)
    mask[3] = -1.0
    with pytest.raises(ValueError, match=r"mask must be finite and >= 0, got \[-1.0\]$"):
        VectorQuantizer(3, 2, kmeans_init=True).to(x.device).train()(x, mask)


def _kl_inputs(device):
    return randn(3, 4, seed=30, device=device), randn(3, 4, seed=31, device=device)


def test_temperature_tensors_as_the_docstring_takes_them(backend, device):
    """H34 (_checks.temperature_arg: a 1-element tensor of any shape -> 0-d only), H35 (a tensor
    that requires grad accepted: its gradient silently dropped) and H37 (an integer tensor accepted; pass 2
    found test_sample_code kills it too):
    a temperature is a number or a 1-element floating tensor that needs no gradient."""
    pred, target = _kl_inputs(device)
    want = fastvq.pairwise_kl_loss(pred, target, 0.5)
    for t in (torch.tensor([0.5], device=device), torch.tensor([[0.5]], device=device)):
        assert torch.equal(fastvq.pairwise_kl_loss(pred, target, t), want)
    with pytest.raises(ValueError, match="temperature is read as a number and gets no gradient"):
        fastvq.pairwise_kl_loss(pred, target, torch.tensor(0.5, device=device, requires_grad=True))
    with pytest.raises(TypeError, match="a temperature tensor must be floating point, got torch.int64"):
        fastvq.pairwise_kl_loss(pred, target, torch.tensor(1, device=device))


def test_numpy_bools_are_bools(backend, device):
    """H39 (_checks.check_bool_arg: NumPy bools refused): a flag given as ``np.True_`` (a mask's
    ``.any()`` in NumPy) is a bool; a string is not."""
    import numpy as np

    ids, q, r = torch.tensor([0, 1], device=device), randn(2, 3, seed=32, device=device), randn(2, 3, seed=33, device=device)
    want = fastvq.qr_lookup(ids, q, r, deterministic=True)
    assert torch.equal(fastvq.qr_lookup(ids, q, r, deterministic=np.True_), want)
    with pytest.raises(TypeError, match="deterministic must be True or False"):
        fastvq.qr_lookup(ids, q, r, deterministic="yes")
