"""Fuzz: residual_quantize and code_statistics on both backends, against float64."""

from __future__ import annotations

import dataclasses
import inspect
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastvq
from tests.fuzz import _oracle as O
from tests.fuzz._bounds import UNIT, U, abs_slack, gamma
from tests.fuzz._gen import DTYPES, HOST, TSpec, fuzz_settings, host_generator, sizes, special_kinds, tspecs
from tests.utils import raises_invalid

# --------------------------------------------------------------------------- residual_quantize


@st.composite
def rq_case(draw, nonfinite):
    N = draw(sizes(0, 6, extra=(33,)))
    L = draw(st.integers(1, 3))
    K = draw(sizes(1, 6, extra=(33,)))
    D = draw(sizes(1, 6, extra=(16, 40)))
    dtype = draw(st.sampled_from(DTYPES))
    cdtype = dtype if draw(st.integers(0, 3)) else draw(st.sampled_from(DTYPES))
    sp_x, sp_c = special_kinds(draw, nonfinite, 2)
    lead = (2, N // 2) if N >= 2 and draw(st.integers(0, 4)) == 0 else (N,)
    xs = draw(tspecs(lead + (D,), dtype, specials=sp_x, dups=False))
    cs = draw(tspecs((L, K, D), cdtype, specials=sp_c, layouts=("contiguous",)))
    if not nonfinite and draw(st.integers(0, 2)) == 0:  # small integers: exact ties, across tiles too
        xs, cs = (dataclasses.replace(xs, ints=True, log10=0, spread=0),
                  dataclasses.replace(cs, ints=True, log10=0, spread=0, dups=((1, K - 1),) if K > 2 else ()))
    return xs, cs


@O.on_host
def _check_rq(op, x, cb, quantized, codes):
    """Replay the greedy search along the op's own choices in float64: at each level the chosen
    code is the exact argmin of |r_l - c|^2 within the rounding bound (which grows with the
    float32 rounding of the residual over the levels); ``quantized`` is the sum of the chosen codes."""
    L, K, D = cb.shape
    lead = x.shape[:-1]
    assert codes.dtype == torch.int64 and codes.shape == (*lead, L), (codes.dtype, codes.shape)
    assert quantized.dtype == x.dtype and quantized.shape == x.shape, (quantized.dtype, quantized.shape)
    n = math.prod(lead)
    x64 = x.double().reshape(n, D)
    cb64 = cb.double()
    codes = codes.reshape(n, L)
    search = torch.promote_types(x.dtype, cb.dtype)
    r = x64.clone()
    drift = torch.zeros(n, dtype=torch.float64)  # bound on |r_fp32 - r_exact| (2-norm)
    q64 = torch.zeros(n, D, dtype=torch.float64)
    qabs = torch.zeros(n, D, dtype=torch.float64)
    x_fin = O.finite_rows(x64)
    # small integers: every residual and distance is exact in float32, so ties are exact too
    exact = O.small_ints(x64) and O.small_ints(cb64) and D * (4 + 4 * L) ** 2 < 2**24
    for lvl in range(L):
        c = cb64[lvl]
        d64 = O.distances64(r, c, "l2")
        nr = r.nan_to_num(0, 0, 0).norm(dim=-1)[:, None]
        nc = c.nan_to_num(0, 0, 0).norm(dim=-1)[None, :]
        b64 = O.bounds64(r, c, "l2") + 2 * (nr + nc) * drift[:, None] + drift[:, None] ** 2
        if search != torch.float32:  # the residual is rounded to the codebook dtype for the dot
            b64 = b64 + 4 * UNIT[search] * nr * nc
        r_fin = O.finite_rows(r)
        O.check_choice(f"{op} level {lvl}", codes[:, lvl], None, d64, b64, r_fin & x_fin, O.finite_rows(c), exact=exact)
        chosen = c[codes[:, lvl]]
        drift = drift + U * (r.nan_to_num(0, 0, 0).norm(dim=-1) + chosen.nan_to_num(0, 0, 0).norm(dim=-1))
        r = r - chosen
        q64 = q64 + chosen
        qabs = qabs + chosen.abs()
    # quantized: the float32 sum of the chosen codes in level order, stored in x's dtype. Rows
    # whose input is not finite have no defined code, so their sum is not checked.
    mask = x_fin[:, None].expand(n, D)
    O.check_values(op, "quantized", quantized.reshape(n, D), q64, (L + 2) * U * qabs, x.dtype, mask=mask)


@given(case=rq_case(nonfinite=False))
@fuzz_settings(16)
def test_residual_quantize_finite(backend, device, case):
    """Finite inputs at every magnitude: each level's code is the exact argmin for the residual
    the op itself left (within the bound), quantized is the sum of the codes, and the gradient
    to x is the upstream gradient, exactly, once."""
    xs, cs = case
    x = xs.build(device).requires_grad_(True)
    cb = cs.build(device)
    quantized, codes = fastvq.residual_quantize(x, cb)
    _check_rq(f"residual_quantize[{backend}]", x.detach(), cb, quantized.detach(), codes)
    g = TSpec(tuple(x.shape), x.dtype, seed=xs.seed + 1).build(device)
    (gx,) = torch.autograd.grad(quantized, x, g)
    if not torch.equal(gx, g):
        O.fail(f"residual_quantize[{backend}]", f"gradient to x is not the upstream gradient: max diff "
                                                f"{(gx.double() - g.double()).abs().max().item():.3g}")


@given(case=rq_case(nonfinite=True))
@fuzz_settings(16)
def test_residual_quantize_nonfinite(backend, device, case):
    """NaN/inf in x or the codebooks: codes in [0, K) on every level; a non-finite code never
    chosen for a finite residual while a finite code exists (per level)."""
    xs, cs = case
    x, cb = xs.build(device), cs.build(device)
    quantized, codes = fastvq.residual_quantize(x, cb)
    _check_rq(f"residual_quantize[{backend}]", x, cb, quantized, codes)


# --------------------------------------------------------------------------- code_statistics


@st.composite
def stats_case(draw, nonfinite):
    levels = draw(st.sampled_from((None, None, 1, 2)))
    N = draw(sizes(0, 8, extra=(40, 129)))
    K = draw(sizes(1 if N else 0, 6, extra=(33,)))
    D = draw(sizes(0, 5, extra=(17, 70)))
    dtype = draw(st.sampled_from(DTYPES))
    shape = (N, D) if levels is None else (levels, N, D)
    (sp,) = special_kinds(draw, nonfinite, 1)
    xs = draw(tspecs(shape, dtype, specials=sp, dups=False, layouts=("contiguous", "strided", "transposed")))
    idx_dtype = draw(st.sampled_from((torch.int64, torch.int32)))
    idx_seed = draw(st.integers(0, 2**16))
    hot = draw(st.booleans())  # all rows on a few codes (long segments) or spread
    deterministic = draw(st.booleans())
    return xs, K, idx_dtype, idx_seed, hot, deterministic


def _indices(shape, K, dtype, seed, hot):
    g = host_generator(seed)
    if K == 0:
        return torch.zeros(shape, dtype=dtype, device=HOST)
    high = min(K, 2) if hot else K
    return torch.randint(0, high, shape, generator=g, device=HOST).to(dtype)


@O.on_host
def _check_stats(op, x, idx, K, counts, sums, weights=None, skipped=None, skips_nonfinite=False):
    """Exact counts (sum of weights), float64 sums within the float32 summation bound.

    Without ``skips_nonfinite``: a NaN row makes its code's sums NaN, inf + -inf too (item 1).
    With it (the op documents that non-finite rows are left out and counted, issue 9 item 2):
    those rows are out of counts and sums, and ``skipped`` counts them per level. A row of
    weight 0 is ignored whatever it holds."""
    batched = idx.dim() == 2
    L = idx.shape[0] if batched else 1
    n, D = idx.shape[-1], x.shape[-1]
    assert counts.dtype == torch.float32 and sums.dtype == torch.float32, (counts.dtype, sums.dtype)
    want_shape = ((L, K), (L, K, D)) if batched else ((K,), (K, D))
    assert (tuple(counts.shape), tuple(sums.shape)) == want_shape, (counts.shape, sums.shape, want_shape)
    x64 = x.double().reshape(L, n, D)
    idx = idx.long().reshape(L, n)
    w64 = torch.ones(L, n, dtype=torch.float64) if weights is None else weights.double().expand(L, n)
    want_c = torch.zeros(L, K, dtype=torch.float64)
    want_s = torch.zeros(L, K, D, dtype=torch.float64)
    mag = torch.zeros(L, K, D, dtype=torch.float64)
    want_skip = [0] * L
    for lvl in range(L):
        for i in range(n):
            w = float(w64[lvl, i])
            if w == 0:
                continue
            row = x64[lvl, i]
            if skips_nonfinite and not (bool(row.isfinite().all()) and math.isfinite(w)):
                want_skip[lvl] += 1
                continue
            k = int(idx[lvl, i])
            want_c[lvl, k] += w
            want_s[lvl, k] += w * row
            mag[lvl, k] += (w * row).abs().nan_to_num(0, 0, 0)
    O.check_values(op, "counts", counts.reshape(L, K), want_c, gamma(n) * want_c.abs(), torch.float32)
    if weights is None and not torch.equal(counts.double().reshape(L, K), want_c):
        O.fail(op, f"counts {counts.tolist()} != {want_c.tolist()} (exact integers without weights)")
    O.check_values(op, "sums", sums.reshape(L, K, D), want_s, gamma(n) * mag + abs_slack(n), torch.float32)
    if skipped is not None and skipped.reshape(-1).tolist() != want_skip:
        O.fail(op, f"skipped {skipped.tolist()} != {want_skip} non-finite rows")


def _stats_call(x, idx, K, det, weights=None):
    """code_statistics with ``return_skipped`` when the op has it (then also whether it skips)."""
    params = inspect.signature(fastvq.code_statistics).parameters
    kw = {} if weights is None else {"weights": weights}
    if "return_skipped" in params:
        counts, sums, skipped = fastvq.code_statistics(x, idx, K, deterministic=det, return_skipped=True, **kw)
        return counts, sums, skipped, True
    counts, sums = fastvq.code_statistics(x, idx, K, deterministic=det, **kw)
    return counts, sums, None, False


@given(case=stats_case(nonfinite=False))
@fuzz_settings(16)
def test_code_statistics_finite(backend, device, case):
    """Exact counts; sums within the float32 summation bound; float32 overflow -> +-inf; both
    the deterministic and the atomic path, single and batched levels, int32/int64 indices."""
    xs, K, idx_dtype, seed, hot, det = case
    x = xs.build(device)
    idx = _indices(x.shape[:-1], K, idx_dtype, seed, hot).to(device)
    counts, sums, skipped, skips = _stats_call(x, idx, K, det)
    _check_stats(f"code_statistics[{backend},det={det}]", x, idx, K, counts, sums, skipped=skipped,
                 skips_nonfinite=skips)


@given(case=stats_case(nonfinite=True))
@fuzz_settings(16)
def test_code_statistics_nonfinite(backend, device, case):
    """A NaN row makes its code's sums NaN (inf + -inf too), an infinite one +-inf: nothing is
    dropped or made finite silently; or, where the op documents it (``return_skipped``), the
    non-finite rows are left out of counts and sums and counted."""
    xs, K, idx_dtype, seed, hot, det = case
    x = xs.build(device)
    idx = _indices(x.shape[:-1], K, idx_dtype, seed, hot).to(device)
    counts, sums, skipped, skips = _stats_call(x, idx, K, det)
    _check_stats(f"code_statistics[{backend},det={det}]", x, idx, K, counts, sums, skipped=skipped,
                 skips_nonfinite=skips)


@given(K=st.integers(1, 6), N=st.integers(1, 6), bad=st.sampled_from((-1, "K", "big")), seed=st.integers(0, 99))
@fuzz_settings(10)
def test_code_statistics_rejects_out_of_range(backend, device, K, N, bad, seed):
    """An index outside [0, num_codes) is a ValueError naming the indices, on both backends."""
    idx = _indices((N,), K, torch.int64, seed, False)
    pos = seed % N
    idx[pos] = {-1: -1, "K": K, "big": 2**40}[bad]
    x = TSpec((N, 3), seed=seed).build(device)
    with raises_invalid("indices"):
        fastvq.code_statistics(x, idx.to(device), K)


@given(case=stats_case(nonfinite=True), wkind=st.sampled_from(("mask", "float")), wseed=st.integers(0, 999))
@fuzz_settings(12)
def test_code_statistics_weights(backend, device, case, wkind, wseed):
    """Where the op takes ``weights`` (a padding mask or float weights): counts are the weight
    sums, sums the weighted row sums, a row of weight 0 ignored whatever it holds."""
    if "weights" not in inspect.signature(fastvq.code_statistics).parameters:
        pytest.skip("code_statistics takes no weights on this branch")
    xs, K, idx_dtype, seed, hot, det = case
    x = xs.build(device)
    idx = _indices(x.shape[:-1], K, idx_dtype, seed, hot)
    n = x.shape[-2]
    g = host_generator(wseed)
    if wkind == "mask":
        w = torch.rand(n, generator=g, device=HOST) < 0.7
    else:
        w = torch.where(torch.rand(n, generator=g, device=HOST) < 0.3, 0.0,
                        torch.rand(n, generator=g, device=HOST, dtype=torch.float64) * 4).float()
    if n and K:  # a row of weight 0 may hold an out-of-range index
        off = (w == 0) if wkind == "float" else ~w
        idx = torch.where(off.expand_as(idx), torch.full_like(idx, K + 5), idx)
    counts, sums, skipped, skips = _stats_call(x, idx.to(device), K, det, weights=w.to(device))
    _check_stats(f"code_statistics[{backend},det={det},weights={wkind}]", x, idx, K, counts, sums,
                 weights=w, skipped=skipped, skips_nonfinite=skips)
