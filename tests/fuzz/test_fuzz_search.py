"""Fuzz: nearest_code (l2 / cosine / dot), pairwise_sqdist, mine_negatives on both backends.

Generated shapes (N = 0, K = 1, D = 0/1 and the kernels' block edges, the split-codebook and
streamed-D paths), dtypes (fp32/fp16/bf16, mixed), strides (strided, column-major, expanded
zero-stride rows), magnitudes 1e-30 .. 1e30 (fp16 up to 65504), NaN/inf placements; every
result against a float64 computation of the documented definition (tests/fuzz/_oracle.py).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastvq
import fastvq.testing as ft
from tests.fuzz import _oracle as O
from tests.fuzz._bounds import FACTOR, gamma
from tests.fuzz._gen import DTYPES, TSpec, fuzz_settings, sizes, special_kinds, tspecs

METRICS = ("l2", "cosine", "dot")
UNIT_TF32 = ft.unit_roundoff("tf32")

N_SIZES = dict(lo=0, hi=6, extra=(31, 33, 65))
K_SIZES = dict(lo=1, hi=6, extra=(31, 33, 600))  # 600: the split-codebook path (interpreter: K > 512)
D_SIZES = dict(lo=0, hi=6, extra=(16, 60, 257))  # 257: D streamed in chunks (D > 256)


@st.composite
def search_case(draw, nonfinite: bool, *, max_k=None, min_d=0, fp32=False):
    N = draw(sizes(**N_SIZES))
    K = draw(sizes(**K_SIZES)) if max_k is None else draw(st.integers(1, max_k))
    D = draw(sizes(**D_SIZES).filter(lambda d: d >= min_d))
    if K * D > 40_000 and draw(st.integers(0, 2)):  # the split codebook with D streamed: a third of the
        D = draw(st.sampled_from((16, 60)))      # times it is drawn (the interpreter's costliest case)
    if N * K * max(D, 1) > 40_000:  # keep the interpreter fast
        N = min(N, 5)
    dtype = torch.float32 if fp32 else draw(st.sampled_from(DTYPES))
    cdtype = dtype if fp32 or draw(st.integers(0, 3)) else draw(st.sampled_from(DTYPES))
    lead = (2, N // 2) if N >= 2 and draw(st.integers(0, 4)) == 0 else (N,)
    sp_x, sp_c = special_kinds(draw, nonfinite, 2)
    xs = draw(tspecs(lead + (D,), dtype, specials=sp_x, dups=False))
    cs = draw(tspecs((K, D), cdtype, specials=sp_c))
    if nonfinite and not (xs.specials or cs.specials):
        cs = draw(tspecs((K, D), cdtype, specials=True, magnitudes=False).filter(lambda s: s.specials))
    return xs, cs


@O.on_host
def _check_nearest(op, x, c, metric, idx, dist, tf32=False):
    x64 = x.double().reshape(math.prod(x.shape[:-1]), x.shape[-1])
    c64 = c.double()
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32, (idx.dtype, dist.dtype)
    assert idx.shape == x.shape[:-1] and dist.shape == x.shape[:-1], (idx.shape, dist.shape, x.shape)
    idx, dist = idx.reshape(-1), dist.reshape(-1)
    d64 = O.distances64(x64, c64, metric)
    b64 = O.bounds64(x64, c64, metric)
    if tf32:  # both dot operands rounded to tf32 (fastvq.testing's operand error), twice for l2's 2 x.c
        e_ops = FACTOR * (2 * UNIT_TF32 + UNIT_TF32**2)
        nx = x64.nan_to_num(0, 0, 0).norm(dim=-1)[:, None]
        nc = c64.nan_to_num(0, 0, 0).norm(dim=-1)[None, :]
        b64 = b64 + {"l2": 2 * e_ops * nx * nc, "dot": e_ops * nx * nc}.get(metric, 2 * e_ops)
    x_fin, c_fin = O.finite_rows(x64), O.finite_rows(c64)
    ints = O.small_ints(x64) and O.small_ints(c64) and x64.shape[-1] <= 64
    lenient = None
    if metric == "cosine":  # the cosine of an infinite vector is left open by the contract
        lenient = ~x_fin & ~O.nan_rows(x64)
    O.check_choice(op, idx, dist, d64, b64, x_fin, c_fin, metric=metric,
                   exact=ints and metric != "cosine", lenient_rows=lenient)
    if ints:  # exact ties: identical codes score identically in any summation order
        O.check_first_duplicate(op, idx[x_fin], c64)


@pytest.mark.parametrize("metric", METRICS)
@given(case=search_case(nonfinite=False))
@fuzz_settings(16)
def test_nearest_code_finite(backend, device, metric, case):
    """Finite inputs at every magnitude: exact argmin within the rounding bound, distance of
    the chosen code, overflow -> +inf, cosine in [0, 2], exact ties to the smallest index."""
    xs, cs = case
    x, c = xs.build(device), cs.build(device)
    idx, dist = fastvq.nearest_code(x, c, metric)
    _check_nearest(f"nearest_code[{backend},{metric}]", x, c, metric, idx, dist)


@pytest.mark.parametrize("metric", METRICS)
@given(case=search_case(nonfinite=False, fp32=True))
@fuzz_settings(6)
def test_nearest_code_tf32(backend, device, metric, case):
    """``allow_tf32=True`` (fp32 only): the argmin within the bound widened by tf32's operand
    rounding, the distance of the chosen code, the same overflow/NaN/range contract."""
    xs, cs = case
    x, c = xs.build(device), cs.build(device)
    idx, dist = fastvq.nearest_code(x, c, metric, allow_tf32=True)
    _check_nearest(f"nearest_code[{backend},{metric},tf32]", x, c, metric, idx, dist, tf32=True)


@pytest.mark.parametrize("metric", METRICS)
@given(case=search_case(nonfinite=True))
@fuzz_settings(14)
def test_nearest_code_nonfinite(backend, device, metric, case):
    """NaN/inf rows and codes: NaN in -> NaN out, inf -> inf, a non-finite code never wins for
    a finite row while a finite code exists, indices in [0, K)."""
    xs, cs = case
    x, c = xs.build(device), cs.build(device)
    idx, dist = fastvq.nearest_code(x, c, metric)
    _check_nearest(f"nearest_code[{backend},{metric}]", x, c, metric, idx, dist)


# --------------------------------------------------------------------------- pairwise_sqdist


@O.on_host
def _check_sqdist(op, a, b, out):
    a64, b64 = a.double(), b.double()
    assert out.dtype == torch.float32 and out.shape == (a.shape[0], b.shape[0]), (out.dtype, out.shape)
    d64 = O.distances64(a64, b64, "l2")
    bound = O.bounds64(a64, b64, "l2")
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            O.check_value(op, f"out[{i}, {j}]", float(out[i, j]), float(d64[i, j]), float(bound[i, j]), lo=0.0)


@O.on_host
def _check_sqdist_grads(op, a, b, g, ga, gb):
    """d/da_i sum_j g_ij |a_i - b_j|^2 = 2 sum_j g_ij (a_i - b_j) (and the same for b), in float64."""
    a64, b64, g64 = a.detach().double(), b.detach().double(), g.double()
    diff = a64[:, None, :] - b64[None, :, :]  # (M, N, D)
    want_a = 2 * (g64[:, :, None] * diff).sum(1)
    want_b = -2 * (g64[:, :, None] * diff).sum(0)
    mag = g64.abs()[:, :, None] * (a64.abs()[:, None, :] + b64.abs()[None, :, :])
    bound_a = 2 * gamma(b.shape[0] + a.shape[-1]) * mag.sum(1)
    bound_b = 2 * gamma(a.shape[0] + a.shape[-1]) * mag.sum(0)
    for name, got, want, bound, dtype in (("grad_a", ga, want_a, bound_a, a.dtype), ("grad_b", gb, want_b, bound_b, b.dtype)):
        assert got.dtype == dtype and got.shape == want.shape, (name, got.dtype, got.shape)
        O.check_values(op, name, got, want, bound, dtype)


@st.composite
def sqdist_case(draw, nonfinite):
    M = draw(sizes(0, 6, extra=(65,)))
    N = draw(sizes(0, 6, extra=(65,)))
    D = draw(sizes(0, 6, extra=(17, 70)))
    dtype = draw(st.sampled_from(DTYPES))
    bdtype = dtype if draw(st.integers(0, 3)) else draw(st.sampled_from(DTYPES))
    sp_a, sp_b = special_kinds(draw, nonfinite, 2)
    a = draw(tspecs((M, D), dtype, specials=sp_a, dups=False))
    b = draw(tspecs((N, D), bdtype, specials=sp_b, dups=False))
    return a, b


@given(case=sqdist_case(nonfinite=False))
@fuzz_settings(16)
def test_pairwise_sqdist_finite(backend, device, case):
    """Every entry within the rounding bound of the float64 value, never negative, overflow
    -> +inf; gradients in both inputs finite and close wherever representable."""
    sa, sb = case
    a = sa.build(device).requires_grad_(True)
    b = sb.build(device).requires_grad_(True)
    out = fastvq.pairwise_sqdist(a, b)
    op = f"pairwise_sqdist[{backend}]"
    _check_sqdist(op, a.detach(), b.detach(), out)
    g = TSpec(tuple(out.shape), seed=sa.seed + 1).build(device)
    ga, gb = torch.autograd.grad(out, (a, b), g)
    _check_sqdist_grads(op, a, b, g, ga, gb)


@given(case=sqdist_case(nonfinite=True))
@fuzz_settings(14)
def test_pairwise_sqdist_nonfinite(backend, device, case):
    """NaN rows give NaN entries, infinite rows +inf (NaN where inf - inf is exact)."""
    sa, sb = case
    a, b = sa.build(device), sb.build(device)
    _check_sqdist(f"pairwise_sqdist[{backend}]", a, b, fastvq.pairwise_sqdist(a, b))


# --------------------------------------------------------------------------- mine_negatives


@st.composite
def mining_case(draw, nonfinite):
    N = draw(sizes(0, 6, extra=(33,)))
    M = draw(sizes(1, 6, extra=(33, 600)))
    D = draw(sizes(0, 6, extra=(16, 60)))
    dtype = draw(st.sampled_from(DTYPES))
    sp_a, sp_p, sp_n = special_kinds(draw, nonfinite, 3)
    a = draw(tspecs((N, D), dtype, specials=sp_a, dups=False))
    p = draw(tspecs((N, D), dtype, specials=sp_p, dups=False))
    n = draw(tspecs((M, D), dtype, specials=sp_n))
    strategy = draw(st.sampled_from(("hardest", "semi-hard")))
    return a, p, n, strategy


@O.on_host
def _check_mining(op, a, p, n, strategy, idx, dist):
    a64, p64, n64 = a.double(), p.double(), n.double()
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32, (idx.dtype, dist.dtype)
    assert idx.shape == (a.shape[0],) and dist.shape == (a.shape[0],), (idx.shape, dist.shape)
    d64 = O.distances64(a64, n64, "l2")
    b64 = O.bounds64(a64, n64, "l2")
    a_fin, n_fin = O.finite_rows(a64), O.finite_rows(n64)
    if strategy == "semi-hard":
        diff = a64 - p64
        dp = (diff**2).sum(-1)
        bp = gamma(a.shape[-1]) * dp.nan_to_num(0, 0, 0) + O.abs_slack(a.shape[-1])
        O.check_semihard(op, idx, dist, d64, b64, dp, bp, a_fin, n_fin)
    else:
        O.check_choice(op, idx, dist, d64, b64, a_fin, n_fin)
    if strategy == "hardest" and O.small_ints(a64) and O.small_ints(n64):
        O.check_first_duplicate(op, idx[a_fin], n64)


@given(case=mining_case(nonfinite=False))
@fuzz_settings(14)
def test_mine_negatives_finite(backend, device, case):
    """Hardest: the exact nearest negative within the bound; semi-hard: the nearest negative
    farther than the positive (the hardest when none is), its distance, indices in [0, M)."""
    sa, sp, sn, strategy = case
    a, p, n = sa.build(device), sp.build(device), sn.build(device)
    idx, dist = fastvq.mine_negatives(a, p, n, strategy)
    _check_mining(f"mine_negatives[{backend},{strategy}]", a, p, n, strategy, idx, dist)


@given(case=mining_case(nonfinite=True))
@fuzz_settings(12)
def test_mine_negatives_nonfinite(backend, device, case):
    sa, sp, sn, strategy = case
    a, p, n = sa.build(device), sp.build(device), sn.build(device)
    idx, dist = fastvq.mine_negatives(a, p, n, strategy)
    _check_mining(f"mine_negatives[{backend},{strategy}]", a, p, n, strategy, idx, dist)
