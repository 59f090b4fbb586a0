"""The numeric contract of the search ops (``fastvq.ops._search.NUMERIC_CONTRACT``), on both
backends and every dtype: NaN in -> NaN out, overflow -> +inf, non-finite codes never chosen for
a finite row while a finite code exists, the true nearest code at every magnitude, indices in
[0, K), cosine in [0, 2]. The oracle is float64 arithmetic on the same (dtype-rounded) values.
"""

import warnings

import pytest
import torch
import triton

import fastvq
from fastvq._names import METRICS
from fastvq.testing import assert_argmin_within_bound, assert_close, search_precision
from tests.utils import randn

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
NAN, INF = float("nan"), float("inf")

# Magnitudes per dtype: from tiny (squares underflow float32) to huge (squares overflow float32).
SCALES = {
    torch.float32: [1e-30, 1e-12, 1.0, 2e19, 1e30, 1e38],
    torch.bfloat16: [1e-30, 1.0, 2e19, 1e38],
    torch.float16: [1e-3, 1.0, 3e4],
}


@pytest.fixture(autouse=True)
def _quiet():
    with warnings.catch_warnings():  # the interpreter (numpy) warns on the overflows we test
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


def d64(x, c, metric):
    """``(N, K)`` float64 distances, elementwise IEEE rules (inf - inf and 0 * inf are NaN)."""
    x64, c64 = x.double()[:, None, :], c.double()[None, :, :]
    if metric in ("l2", "euclidean"):
        d = ((x64 - c64) ** 2).sum(-1)
        return d.sqrt() if metric == "euclidean" else d
    dot = (x64 * c64).sum(-1)
    if metric == "dot":
        return -dot
    den = (x64 * x64).sum(-1).sqrt() * (c64 * c64).sum(-1).sqrt()
    cos = torch.where(den == 0, torch.zeros_like(dot), dot / torch.where(den == 0, 1.0, den))
    return 1.0 - cos


def assert_distance(dist, truth64, metric, scale64, D):
    """``dist`` (float32) is ``truth64`` rounded as a direct float32 evaluation rounds it (the
    tolerance module's bound: same NaNs, same infinities, close elsewhere). ``scale64``: the sum of
    ``|terms|`` the evaluation adds up."""
    n = {"l2": D + 1, "euclidean": D + 3, "dot": D, "cosine": 2 * D + 8}[metric]
    assert_close(dist, truth64, dtype=torch.float32, reduce_len=n, magnitude=scale64, name=f"{metric} distance")
    if metric in ("l2", "euclidean"):
        assert (dist[~dist.isnan()] >= 0).all()
    if metric == "cosine":
        assert ((dist[~dist.isnan()] >= 0) & (dist[~dist.isnan()] <= 2)).all()


def check_search(x, c, metric, idx, dist):
    """Every clause of the contract for one ``nearest_code`` result."""
    K, D = c.shape
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert ((idx >= 0) & (idx < K)).all(), f"index out of range: {idx}"
    x64, c64 = x.double(), c.double()[idx]
    chosen = _pair64(x64, c64, metric)
    if metric in ("l2", "euclidean"):
        scale = (x64 - c64).pow(2).sum(-1)
        scale = scale.sqrt() if metric == "euclidean" else scale
    elif metric == "dot":
        scale = (x64 * c64).abs().sum(-1)
    else:
        scale = torch.ones_like(chosen)
    assert_distance(dist, chosen, metric, scale.nan_to_num(0.0, 0.0, 0.0), D)
    row_nan = x.isnan().any(-1)
    row_fin = torch.isfinite(x).all(-1)
    cf = torch.isfinite(c).all(-1)
    first = int(cf.int().argmax()) if cf.any() else 0
    assert (idx[row_nan] == 0).all(), "a row with a NaN takes index 0"
    assert (idx[~row_nan & ~row_fin] == first).all(), "a row with an infinite entry takes the first finite code"
    if not cf.any():
        assert (idx[row_fin] == 0).all()
        return
    assert cf[idx[row_fin]].all(), "a non-finite code was chosen for a finite row"
    if row_fin.any():  # the nearest finite code, within the rounding of the search
        remap = torch.cumsum(cf.long(), 0) - 1  # index among the finite codes
        assert_argmin_within_bound(x[row_fin], c[cf], remap[idx[row_fin]], "l2" if metric == "euclidean" else metric,
                                   search_precision(x.dtype), name=f"{metric} argmin")


def _pair64(x64, c64, metric):
    """float64 distance between matching rows (IEEE rules, as ``d64``)."""
    return torch.stack([d64(x64[i : i + 1], c64[i : i + 1], metric)[0, 0] for i in range(x64.shape[0])]) \
        if x64.shape[0] else x64.new_zeros(0)


def _near_codes(K, D, dtype, scale, seed):
    """A codebook at ``scale`` and rows: some very near a code (relative 1e-2), some anywhere."""
    c = randn(K, D, seed=seed, scale=scale, dtype=torch.float64)
    pick = torch.tensor([1, K // 2, K - 1])
    x = torch.cat([c[pick] * (1 + 1e-2 * randn(3, D, seed=seed + 1, dtype=torch.float64)),
                   randn(3, D, seed=seed + 2, scale=scale, dtype=torch.float64)])
    fmax = torch.finfo(dtype).max / 4
    return x.clamp(-fmax, fmax).to(dtype), c.clamp(-fmax, fmax).to(dtype)


@pytest.mark.parametrize("K", [40, 1100], ids=["K40", "K1100-split"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_every_magnitude(backend, metric, dtype, K):
    for i, scale in enumerate(SCALES[dtype]):
        x, c = _near_codes(K, 12, dtype, scale, seed=10 * i)
        idx, dist = fastvq.nearest_code(x, c, metric)
        check_search(x, c, metric, idx, dist)
        if dtype == torch.float32 and scale in (1e-30, 2e19) and metric != "dot":
            # rows next to a code (rel. 1e-2; the next code is much farther): that code, exactly
            assert idx[:3].tolist() == [1, K // 2, K - 1], (scale, idx)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_nonfinite_rows_and_codes(backend, metric, dtype):
    K, D = 70, 9
    x, c = randn(8, D, seed=1, dtype=dtype), randn(K, D, seed=2, dtype=dtype)
    x[1, 4] = NAN  # a NaN row
    x[2] = NAN
    x[3, 0] = INF  # infinite rows (no NaN)
    x[4, 1] = -INF
    x[5, 2], x[5, 3] = INF, NAN  # both
    c[0, 3] = NAN  # non-finite codes, including the first
    c[1, 0] = INF
    c[33] = -INF
    c[50, 2] = NAN
    x[6] = c[1].nan_to_num(posinf=1.0)  # a finite row next to the infinite code 1: code 1 is never chosen
    c[40] = x[7] * 1.001  # and a finite code next to row 7
    idx, dist = fastvq.nearest_code(x, c, metric)
    check_search(x, c, metric, idx, dist)
    assert idx[[1, 2, 5]].tolist() == [0, 0, 0] and dist[[1, 2, 5]].isnan().all()
    assert idx[[3, 4]].tolist() == [2, 2]  # the first finite code
    if metric in ("l2", "euclidean"):
        assert (dist[[3, 4]] == INF).all()
        assert idx[7].item() == 40


@pytest.mark.parametrize("metric", METRICS)
def test_no_finite_code(backend, metric):
    x = randn(5, 4, seed=3)
    x[1, 0] = NAN
    x[2, 1] = INF
    c = torch.full((6, 4), 1.0)
    c[:, 0] = torch.tensor([INF, NAN, -INF, INF, NAN, INF])
    idx, dist = fastvq.nearest_code(x, c, metric)
    check_search(x, c, metric, idx, dist)
    assert (idx == 0).all()


@pytest.mark.parametrize("metric", METRICS)
def test_overflowing_distances_are_inf(backend, metric):
    # distances far beyond float32 (|x - c|^2 ~ 1e60, <x, c> ~ 1e40): +inf (dot: -inf), and
    # still the true nearest code (the search's scores do not overflow)
    c = randn(30, 8, seed=4, scale=1e10)
    x = randn(6, 8, seed=5, scale=1e30)
    idx, dist = fastvq.nearest_code(x, c, metric)
    check_search(x, c, metric, idx, dist)
    if metric == "l2":
        assert (dist == INF).all()
    if metric == "euclidean":  # |x - c| ~ 1e30 itself is representable
        assert torch.isfinite(dist).all()
    if metric == "dot":
        assert (dist == -INF).all()


@pytest.mark.parametrize("metric", ["l2", "cosine", "dot"])
def test_huge_codebook_near_rows(backend, metric):
    # |x|, |c| ~ 2e19: |x|^2 overflows float32 but the distances between neighbours do not
    c = randn(50, 16, seed=6, scale=2e19)
    x = c[[7, 23, 49]] + randn(3, 16, seed=7, scale=2e16)
    idx, dist = fastvq.nearest_code(x, c, metric)
    check_search(x, c, metric, idx, dist)
    if metric != "dot":
        assert idx.tolist() == [7, 23, 49]
        assert torch.isfinite(dist).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("metric", ["l2", "euclidean"])
def test_l2_huge_code_keeps_the_small_codes(backend, metric, dtype):
    # F1: a code near the float32 maximum once scaled the whole codebook by 2^-254, so the small
    # codes' |c|^2 underflowed to 0 and [0, 0] took code 0 at distance 2, not code 1 at 0. Rows
    # of every size in one block (each row searched in its own unit).
    c = torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 3e38]], dtype=dtype, device=randn(1).device)
    x = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 3e38], [1e-30, 0.0], [0.0, 2e30]], dtype=dtype, device=c.device)
    idx, dist = fastvq.nearest_code(x, c, metric)
    assert idx.tolist() == [1, 0, 2, 1, 0], idx  # [0, 2e30]: [1, 1] is nearer than [0, 0] by 4e30
    assert dist[:4].tolist() == [0.0, 0.0, 0.0, dist[3].item()] and dist[3].item() < 1e-29
    check_search(x, c, metric, idx, dist)
    tk, td = fastvq.topk_codes(x[:2], c, 2, metric)
    assert tk.tolist() == [[1, 0], [0, 1]] and td[:, 0].tolist() == [0.0, 0.0]
    mi, md = fastvq.mine_negatives(x[:2], x[:2], c)
    assert mi.tolist() == [1, 0] and md.tolist() == [0.0, 0.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dot_huge_code_keeps_the_small_codes(backend, dtype):
    # F9: -<x, c>: code 1 (-4e-20) is nearer than code 0 (-2e-20) far beyond dot's rounding bound
    # (about 1e-6 |x| |c| of either code); found by the module fuzz suite at FASTVQ_FUZZ_SCALE=4.
    # A codebook scaled by one power of two (that of 3e38) flushed both small codes to 0.
    c = torch.tensor([[1e-20, 1e-20], [2e-20, 2e-20], [-3e38, 0.0]], device=randn(1).device).to(dtype)
    idx, dist = fastvq.nearest_code(torch.ones(1, 2, device=c.device, dtype=dtype), c, "dot")
    assert idx.tolist() == [1], (idx, dist)
    # the fuzz explorer's tf32 case, D = 1: codes ~1e-30 (both signs) beside one -max, rows of
    # small integers of either sign (the nearest code is the largest or the smallest code)
    c = randn(600, 1, seed=5, scale=1e-30)
    c = c.to(dtype)
    c[270] = -torch.finfo(dtype).max
    x = torch.tensor([[3.0], [-2.0], [1.0], [-5.0]], device=c.device, dtype=dtype)
    small = c.float().masked_fill(c.float().abs() > 1.0, float("nan"))[:, 0]
    for tf32 in (False, True) if dtype == torch.float32 else (False,):
        idx, dist = fastvq.nearest_code(x, c, "dot", allow_tf32=tf32)
        assert idx.tolist() == [int(small.nan_to_num(-1.0).argmax()), 270, int(small.nan_to_num(-1.0).argmax()),
                                270], (tf32, idx)
        check_search(x, c, "dot", idx, dist)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_dot_distance_infinite_times_tiny_is_infinite(backend, dtype):
    # The fuzz explorer's bf16 case: the direct dot distance scales row and code by their own
    # powers of two; an entry ~1e-20 beside a -3e38 flushed to 0, and -inf * 0 gave NaN where
    # the exact distance is -inf. Row 0: infinite row (first finite code, code 0); row 1: a
    # finite row and no finite code (code 0), the tiny row entries meeting the code's -inf.
    dev = randn(1).device
    x = torch.tensor([[1.0, 2.0, -INF, -INF], [1e-20, 1e-20, -1e-20, -3e38]], device=dev).to(dtype)
    c = torch.tensor([[1e-20, 1e-20, -1e-20, -3e38]], device=dev).to(dtype)
    idx, dist = fastvq.nearest_code(x[:1], c, "dot")
    assert idx.tolist() == [0] and dist.tolist() == [-INF], dist
    c = torch.tensor([[-INF, 1.0, 1.0, 1.0]], device=dev).to(dtype)
    idx, dist = fastvq.nearest_code(x[1:], c, "dot")
    assert idx.tolist() == [0] and dist.tolist() == [INF], dist
    check_search(x[1:], c, "dot", idx, dist)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dot_distance_of_huge_beside_tiny_entries_is_exact(backend, dtype):
    # fuzzA: the direct dot distance scaled row and code by their powers of two in float32 and
    # kept an entry that scaling flushed as the smallest normal: [1, 0] . [1e-30, 3e38] came out
    # -1 (exact: -1e-30), [3e38, 1e-20] . [0, -1] came out 1 (exact: 1e-20), in nearest_code,
    # topk_codes and sample_code. Now summed in float64 (products of the inputs exact): the
    # float64 value rounded once, and an infinite partner still gives +-inf, never NaN.
    dev = randn(1).device
    big = 3e38 if dtype != torch.float16 else 6e4
    tiny = {torch.float32: 1e-30, torch.bfloat16: 1e-30, torch.float16: 1e-7}[dtype]
    pairs = [([1.0, 0.0], [tiny, big]), ([big, tiny], [0.0, -1.0]), ([tiny, -big], [big, 0.0]),
             ([2.0, tiny, -3.0], [tiny, 1.0, 0.0]), ([-INF, 1.0], [tiny, 1.0])]
    for xr, cr in pairs:
        x = torch.tensor([xr], device=dev).to(dtype)
        c = torch.tensor([cr], device=dev).to(dtype)
        want = -(x.double() * c.double()).sum(-1).float()
        for name, (idx, dist) in (("nearest_code", fastvq.nearest_code(x, c, "dot")),
                                  ("topk_codes", [t[..., 0] for t in fastvq.topk_codes(x, c, 1, "dot")]),
                                  ("sample_code", fastvq.sample_code(x, c, 1.0, "dot", seed=0))):
            assert idx.tolist() == [0] and torch.equal(dist, want), (name, xr, cr, dist, want)
    # the search itself may lose such an entry (scores in the row's power-of-two unit): the row
    # [3e38, 1e-20] scores codes [0, -1] and [0, 1] alike, which fastvq.testing's bound covers
    x = torch.tensor([[big, tiny]], device=dev).to(dtype)
    c = torch.tensor([[0.0, -1.0], [0.0, 1.0]], device=dev).to(dtype)
    idx, dist = fastvq.nearest_code(x, c, "dot")
    check_search(x, c, "dot", idx, dist)


def _exact_float32(values) -> float:
    """The exact sum of Python floats (Fractions), rounded once to float32, ties to even: the
    nearest of the five float32 values around its float64 rounding (which may round twice)."""
    from fractions import Fraction

    import numpy as np

    total = sum((Fraction(v) for v in values), Fraction(0))
    f = np.float32(float(total))
    cands = [np.nextafter(np.nextafter(f, -np.inf, dtype=np.float32), -np.inf, dtype=np.float32)]
    for _ in range(4):
        cands.append(np.nextafter(cands[-1], np.inf, dtype=np.float32))
    return float(min(cands, key=lambda c: (abs(Fraction(float(c)) - total), int(np.array(c).view(np.int32)) & 1)))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dot_distance_of_cancelling_products_is_rounded_once(backend, device, dtype):
    # fuzzJ: the plain float64 sum of the exact products lost the ones below 2^-53 of the largest
    # when the large ones cancel: [1, 1, 1] . [2^100, 1, -2^100] gave 0 (exact -1), and
    # [1, 2^-24, 2^-80] . [-1, -1, -1] gave 1 (exact 1 + 2^-24 + 2^-80: 1 + 2^-23 rounded once).
    # Now a compensated float64 pair, rounded once, on both backends and in every search op
    big = {torch.float32: 2.0**100, torch.bfloat16: 2.0**100, torch.float16: 2.0**15}[dtype]
    small = {torch.float32: 2.0**-24, torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}[dtype]
    tail = {torch.float32: 2.0**-80, torch.bfloat16: 2.0**-80, torch.float16: 2.0**-24}[dtype]
    pairs = [([1.0, 1.0, 1.0], [big, 1.0, -big]), ([1.0, 1.0, 1.0, 1.0], [big, 1.0, -big, 0.5]),
             ([1.0, small, tail], [-1.0, -1.0, -1.0]), ([1.0, 1.0, 1.0], [big, -big, tail]),
             ([big, 1.0, big], [big, tail, -big])]  # (float16: products 2^30, 2^-24, -2^30)
    # review10: products of up to 48 bits (not powers of two) whose low bits the first extraction
    # leaves in remainders: (1 + 2^-23)^2 + 2^-100 - (1 + 2^-23)^2 gave 0 (exact 2^-100); and a
    # second level of cancellation, products 2^100, -2^100, 2^58, 1, -2^58
    a = {torch.float32: 1 + 2.0**-23, torch.bfloat16: 1 + 2.0**-7, torch.float16: 1 + 2.0**-10}[dtype]
    pairs.append(([a, small * tail, a], [a, 1.0, -a]))
    if dtype != torch.float16:
        pairs.append(([2.0**50, 2.0**50, 2.0**29, 1.0, 2.0**29], [2.0**50, -(2.0**50), 2.0**29, 1.0, -(2.0**29)]))
    for xr, cr in pairs:
        x = torch.tensor([xr], device=device).to(dtype)
        c = torch.tensor([cr], device=device).to(dtype)
        want = -_exact_float32([a * b for a, b in zip(x[0].double().tolist(), c[0].double().tolist())])
        for name, (idx, dist) in (("nearest_code", fastvq.nearest_code(x, c, "dot")),
                                  ("topk_codes", [t[..., 0] for t in fastvq.topk_codes(x, c, 1, "dot")]),
                                  ("sample_code", fastvq.sample_code(x, c, 1.0, "dot", seed=0))):
            assert idx.tolist() == [0] and dist.item() == want, (name, xr, cr, dist.item(), want)
    # an exact 0 is -0.0 on both backends (-(x.c) of +0: the reference gave +0.0; review10)
    zero = fastvq.nearest_code(torch.tensor([[1.0, -1.0]], device=device).to(dtype),
                               torch.ones(1, 2, device=device).to(dtype), "dot")[1]
    assert zero.item() == 0 and bool(torch.signbit(zero).all())


def test_l2_spread_codebook_with_a_max_entry(backend):
    # F1b (the fuzz suite's case, same cause): codes of magnitude 10^0..10^3, one -float32-max
    # entry, rows 10^-5..10^3: every row's code within the rounding bound of the nearest.
    c = randn(6, 16, seed=126, scale=1e3) * torch.logspace(0, -3, 6, dtype=torch.float64)[:, None].to(randn(1).device)
    c[2, 11] = -torch.finfo(torch.float32).max
    c[0] = 0.0
    x = randn(6, 16, seed=255, scale=1e3) * torch.logspace(0, -8, 6, dtype=torch.float64)[:, None].to(c.device)
    for metric in ("l2", "euclidean"):
        idx, dist = fastvq.nearest_code(x.float(), c.float(), metric)
        check_search(x.float(), c.float(), metric, idx, dist)


def test_cosine_tiny_and_zero(backend):
    # squares of 1e-30 underflow float32: cosine must still be right (scaled before normalising)
    c = randn(20, 6, seed=8, scale=1e-30)
    c[3] = 0.0
    x = torch.cat([c[[5, 11]] * 1.5, torch.zeros(1, 6), randn(2, 6, seed=9, scale=1e-38)])
    idx, dist = fastvq.nearest_code(x, c, "cosine")
    check_search(x, c, "cosine", idx, dist)
    assert idx[:3].tolist() == [5, 11, 0] and dist[2].item() == 1.0


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("metric", METRICS)
def test_launcher_contract_split_and_unsplit(metric, splits):
    from fastvq.kernels.nearest_code import nearest_code_fwd

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        x, c = randn(7, 10, seed=11), randn(200, 10, seed=12, scale=3e20)
        x[0] = NAN
        x[1, 3] = INF
        x[2:5] = c[[9, 130, 199]] * 1.01
        c[9, 0] = NAN  # row 2's code is not finite any more
        idx, dist = nearest_code_fwd(x, c, metric, splits=splits)
        check_search(x, c, metric, idx, dist)


# --------------------------------------------------------------------------- mine_negatives


@pytest.mark.parametrize("strategy", ["hardest", "semi-hard"])
def test_mining_contract(backend, strategy):
    a, n = randn(8, 6, seed=20), randn(40, 6, seed=21)
    p = a + 0.3 * randn(8, 6, seed=22)
    a[0, 1] = NAN  # NaN anchor: index 0, distance NaN
    a[1, 0] = INF  # infinite anchor: first finite negative, +inf
    p[2, 2] = NAN  # NaN positive: no negative is known to be farther -> hardest
    n[0, 0] = NAN  # non-finite negatives, never chosen for finite anchors
    n[1] = INF
    a[3] = n[1].nan_to_num(posinf=1.0)
    a[4] *= 1e30  # far anchors: distances overflow -> +inf
    idx, dist = fastvq.mine_negatives(a, p, n, strategy)
    check_search(a, n, "l2", idx, dist) if strategy == "hardest" else None
    assert ((idx >= 0) & (idx < 40)).all()
    assert idx[0].item() == 0 and dist[0].isnan()
    assert idx[1].item() == 2 and dist[1].item() == INF
    assert dist[4].item() == INF
    hard = fastvq.mine_negatives(a, p, n, "hardest")
    assert idx[2].item() == hard[0][2].item()
    fin = torch.isfinite(a).all(-1)
    assert torch.isfinite(n[idx[fin]]).all()
    truth = ((a.double() - n.double()[idx]) ** 2).sum(-1)
    assert_distance(dist, truth, "l2", truth.nan_to_num(0.0, 0.0, 0.0), 6)


# --------------------------------------------------------------------------- pairwise_sqdist


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_pairwise_sqdist_contract(backend, dtype):
    big = 2e19 if dtype != torch.float16 else 3e4
    a, b = randn(70, 5, seed=30, dtype=dtype), randn(9, 5, seed=31, dtype=dtype)
    a[1, 2] = NAN
    a[2, 0] = INF
    b[3, 0] = INF  # with a[2]: inf - inf = NaN; with finite rows: +inf
    b[4, 1] = -INF
    a[66] = (randn(5, seed=32) * big).to(dtype)  # a tile far from the first: huge rows ...
    b[5] = (a[66].double() * 1.001).to(dtype)  # ... near a huge code: |a|^2 overflows, the distance does not
    a[67] = (randn(5, seed=33) * 1e30).to(dtype) if dtype != torch.float16 else a[67]  # overflow -> +inf
    out = fastvq.pairwise_sqdist(a, b)
    truth = ((a.double()[:, None] - b.double()[None]) ** 2).sum(-1)
    aa, bb = (a.double() ** 2).sum(-1), (b.double() ** 2).sum(-1)
    scale = (aa[:, None] + bb[None, :]).nan_to_num(0.0, 0.0, 0.0)  # the expansion's rounding
    assert_close(out, truth, dtype=torch.float32, reduce_len=5 + 2, magnitude=scale, name="pairwise_sqdist")
    assert (out[~out.isnan()] >= 0).all()
    assert out[1].isnan().all() and out[2, 3].isnan() and (out[2, [0, 1, 2, 4]] == INF).all()
    if dtype != torch.float16:
        assert torch.isfinite(out[66, 5]) and (out[67] == INF).all()


# --------------------------------------------------------------------------- launch grids

GRID_Y_MAX = 65535
GRID_X_MAX = 2**31 - 1


def _spy_grids(monkeypatch, module, names):
    """Replace the named kernels' launches by a recorder of their grids (nothing runs)."""
    grids = []
    for name in names:
        kernel = getattr(module, name)
        jit = kernel.fn if isinstance(kernel, triton.runtime.autotuner.Autotuner) else kernel

        def run(*args, grid, _name=name, **kwargs):
            g = grid(kwargs) if callable(grid) else grid
            grids.append((_name, tuple(g)))

        monkeypatch.setattr(jit, "run", run)
    return grids


def _assert_grid_ok(grids):
    assert grids
    for name, g in grids:
        assert 1 <= len(g) <= 3, (name, g)
        assert g[0] <= GRID_X_MAX and all(v <= GRID_Y_MAX for v in g[1:]), (name, g)


def test_pairwise_sqdist_grid_beyond_one_axis(monkeypatch):
    import fastvq.kernels.pairwise_sqdist as kps

    grids = _spy_grids(monkeypatch, kps, ["_pairwise_sqdist_fwd_kernel"])
    rows = 65535 * 64 + 1  # 4,194,241 rows of b: more blocks than a y axis holds
    a, b = torch.randn(3, 4), torch.randn(1, 4).expand(rows, 4)  # stride 0: no memory
    kps.pairwise_sqdist_fwd(a, b)
    _assert_grid_ok(grids)
    assert grids[0][1][0] == triton_cdiv(rows, 64)
    assert kps.grid(rows, rows, 64, 64)[0] == triton_cdiv(rows, 64) ** 2


def test_nearest_code_grids_beyond_one_axis(monkeypatch):
    import fastvq.kernels.nearest_code as knc

    names = ["_code_terms_kernel", "_code_rescale_kernel", "_nearest_code_fwd_kernel", "_nearest_code_reduce_kernel"]
    grids = _spy_grids(monkeypatch, knc, names)
    # many rows, many codebooks (H > 65,535), the split path: every grid within its limits
    knc.nearest_code_fwd(torch.randn(1, 4).expand(3_000_000, 4), torch.randn(3, 4))
    knc.nearest_code_fwd(torch.randn(1, 1, 4).expand(70_000, 2, 4), torch.randn(1, 1, 4).expand(70_000, 3, 4))
    knc.nearest_code_fwd(torch.randn(2, 4), torch.randn(1, 4).expand(5_000_000, 4), splits=128)
    knc.mine_negatives_fwd(torch.randn(3, 4), torch.randn(3, 4), torch.randn(1, 4).expand(5_000_000, 4), "semi-hard")
    _assert_grid_ok(grids)
    assert {n for n, _ in grids} == set(names)


def triton_cdiv(a, b):
    return -(-a // b)
