"""Fuzz: the integer ops (to_bits / to_decimal, code_usage + CodeUsageMeter, semantic_ids +
semantic_id_stats) on both backends, against independent Python computations."""

from __future__ import annotations

import inspect
import math
import re
from collections import Counter

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastvq
from tests.fuzz import _oracle as O
from tests.fuzz._gen import fuzz_settings
from tests.utils import raises_invalid

INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
RANGE = {torch.int64: 2**63, torch.int32: 2**31, torch.int16: 2**15, torch.int8: 2**7, torch.uint8: 2**8}


def _noncontig(t: torch.Tensor, how: str) -> torch.Tensor:
    if how == "strided" and t.dim() >= 1 and t.numel():
        big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype)
        big[..., ::2] = t
        return big[..., ::2]
    if how == "transposed" and t.dim() == 2:
        return t.T.contiguous().T
    return t


# --------------------------------------------------------------------------- to_bits / to_decimal


@given(num_bits=st.integers(1, 63), data=st.data())
@fuzz_settings(30)
def test_bits_roundtrip(num_bits, data):
    """to_bits gives the binary digits (most significant first) of every value in
    [0, 2**num_bits) for every integer dtype that holds it; to_decimal inverts it."""
    dtype = data.draw(st.sampled_from(INT_DTYPES))
    hi = min(2**num_bits, RANGE[dtype]) - 1
    vals = data.draw(st.lists(st.integers(0, hi), min_size=0, max_size=7))
    shape = data.draw(st.sampled_from(("flat", "2d")))
    t = torch.tensor(vals, dtype=torch.int64).to(dtype)
    if shape == "2d" and len(vals) % 2 == 0:
        t = t.reshape(2, -1)
    bits = fastvq.to_bits(t, num_bits)
    assert bits.dtype == torch.int64 and bits.shape == (*t.shape, num_bits), (bits.dtype, bits.shape)
    flat_bits = bits.reshape(-1, num_bits).tolist()
    for v, b in zip(t.reshape(-1).tolist(), flat_bits):
        want = [int(c) for c in format(v, f"0{num_bits}b")]
        if b != want:
            O.fail("to_bits", f"{v} with {num_bits} bits gave {b}, want {want}")
    back = fastvq.to_decimal(bits)
    if back.dtype != torch.int64 or back.tolist() != t.long().tolist():
        O.fail("to_decimal", f"to_decimal(to_bits({t.tolist()})) = {back.tolist()}")
    # bool and float bit tensors decode the same
    if bits.numel():
        assert fastvq.to_decimal(bits.bool()).tolist() == t.long().tolist()
        assert fastvq.to_decimal(bits.float()).tolist() == t.long().tolist()


@given(num_bits=st.integers(1, 62), offset=st.sampled_from((-1, 0)), dtype=st.sampled_from((torch.int64, torch.int32)))
@fuzz_settings(15)
def test_to_bits_rejects_out_of_range(num_bits, offset, dtype):
    """A value outside [0, 2**num_bits) is a ValueError naming the indices, never truncated."""
    v = -1 if offset == -1 else 2**num_bits
    if v >= RANGE[dtype]:
        return
    with raises_invalid("indices"):
        fastvq.to_bits(torch.tensor([0, v], dtype=dtype), num_bits)


@given(bad=st.sampled_from((2, -1, 0.5, math.nan, 3)))
@fuzz_settings(5)
def test_to_decimal_rejects_non_bits(bad):
    with raises_invalid("bits"):
        fastvq.to_decimal(torch.tensor([[0.0, 1.0, bad]]))


# --------------------------------------------------------------------------- code_usage


def _usage64(vals, K):
    counts = [0] * K
    for v in vals:
        counts[v] += 1
    n = sum(counts)
    p = [c / n if n else 0.0 for c in counts]
    ent = -sum(pi * math.log(pi + 1e-10) for pi in p)
    return counts, ent, math.exp(ent), sum(1 for c in counts if c)


@given(K=st.integers(1, 40), data=st.data())
@fuzz_settings(25)
def test_code_usage(backend, device, K, data):
    """counts (exact), entropy -sum p log(p + 1e-10), perplexity exp(entropy), active codes, for
    every integer dtype and shape; an empty input gives entropy 0, perplexity 1."""
    dtype = data.draw(st.sampled_from([d for d in INT_DTYPES if RANGE[d] >= K]))
    vals = data.draw(st.lists(st.integers(0, K - 1), max_size=60))
    t = torch.tensor(vals, dtype=torch.int64).to(dtype)
    layout = data.draw(st.sampled_from(("flat", "strided", "2d")))
    if layout == "2d" and len(vals) % 3 == 0 and vals:
        t = t.reshape(3, -1)
    t = _noncontig(t, "strided" if layout == "strided" else "none").to(device)
    u = fastvq.code_usage(t, K)
    counts, ent, ppl, active = _usage64(vals, K)
    op = f"code_usage[{backend}]"
    if u.counts.dtype != torch.int64 or u.counts.tolist() != counts:
        O.fail(op, f"counts {u.counts.tolist()} != {counts}")
    O.check_value(op, "entropy", float(u.entropy), ent, 1e-5 * (abs(ent) + 1))
    O.check_value(op, "perplexity", float(u.perplexity), ppl, 1e-5 * (abs(ppl) + 1))
    if int(u.active_codes) != active:
        O.fail(op, f"active_codes {int(u.active_codes)} != {active}")


@given(K=st.integers(1, 20), data=st.data())
@fuzz_settings(15)
def test_code_usage_meter(backend, device, K, data):
    """The meter over several batches equals code_usage of their concatenation; an index out of
    range in any batch makes compute() raise a ValueError (update never syncs)."""
    batches = data.draw(st.lists(st.lists(st.integers(0, K - 1), max_size=20), min_size=1, max_size=4))
    bad = data.draw(st.booleans())
    meter = fastvq.CodeUsageMeter(K)
    for b in batches:
        meter.update(torch.tensor(b, dtype=torch.int64).to(device))
    if bad:
        meter.update(torch.tensor([K], dtype=torch.int64).to(device))
        with pytest.raises(ValueError):
            meter.compute()
        return
    allv = [v for b in batches for v in b]
    counts, ent, ppl, active = _usage64(allv, K)
    u = meter.compute()
    op = f"CodeUsageMeter[{backend}]"
    if u.counts.tolist() != counts:
        O.fail(op, f"counts {u.counts.tolist()} != {counts}")
    O.check_value(op, "entropy", float(u.entropy), ent, 1e-5 * (abs(ent) + 1))
    want_mean = sum(_usage64(b, K)[2] for b in batches) / len(batches)
    O.check_value(op, "mean_batch_perplexity", float(meter.mean_batch_perplexity), want_mean, 1e-5 * (want_mean + 1))


@given(K=st.integers(1, 20), bad=st.sampled_from((-1, "K", "max")), dtype=st.sampled_from((torch.int64, torch.int32, torch.int8)))
@fuzz_settings(10)
def test_code_usage_rejects_out_of_range(backend, device, K, bad, dtype):
    v = {-1: -1, "K": K, "max": RANGE[dtype] - 1}[bad]
    if v < K and v >= 0 or v >= RANGE[dtype]:
        return
    """An index outside [0, K) is never silently dropped: a ValueError right away, or (the
    sync-free form) counted in ``out_of_range`` with NaN entropy and perplexity, and a
    ValueError from ``check=True``."""
    t = torch.tensor([0, v], dtype=dtype).to(device)
    op = f"code_usage[{backend}]"
    try:
        u = fastvq.code_usage(t, K)
    except ValueError as err:
        if not re.search(r"codebook_size|outside", str(err)):
            O.fail(op, f"the ValueError does not say what is wrong: {err}")
        return
    oor = getattr(u, "out_of_range", None)
    if oor is None or int(oor) != 1 or not (math.isnan(float(u.entropy)) and math.isnan(float(u.perplexity))):
        O.fail(op, f"index {v} outside [0, {K}) silently dropped: out_of_range={oor}, entropy={float(u.entropy)}")
    if "check" in inspect.signature(fastvq.code_usage).parameters:
        with pytest.raises(ValueError):
            fastvq.code_usage(t, K, check=True)


# --------------------------------------------------------------------------- semantic_ids


@given(data=st.data())
@fuzz_settings(25)
def test_semantic_ids(backend, device, data):
    """out[:, :L] == codes and out[i, L] = number of earlier rows equal to row i (so the rows of
    out are distinct), for every integer dtype, negative codes, L = 0, N = 0, any strides;
    semantic_id_stats agrees with a Counter."""
    N = data.draw(st.integers(0, 30))
    L = data.draw(st.integers(0, 4))
    dtype = data.draw(st.sampled_from(INT_DTYPES))
    lo = 0 if dtype == torch.uint8 else -3
    rows = data.draw(st.lists(st.lists(st.integers(lo, 3), min_size=L, max_size=L), min_size=N, max_size=N))
    codes = torch.tensor(rows, dtype=torch.int64).reshape(N, L).to(dtype)
    codes = _noncontig(codes, data.draw(st.sampled_from(("none", "strided", "transposed")))).to(device)
    out = fastvq.semantic_ids(codes)
    op = f"semantic_ids[{backend}]"
    if out.dtype != torch.int64 or tuple(out.shape) != (N, L + 1):
        O.fail(op, f"output {out.dtype} {tuple(out.shape)}, expected int64 {(N, L + 1)}")
    seen = Counter()
    for i, r in enumerate(rows):
        want = list(r) + [seen[tuple(r)]]
        seen[tuple(r)] += 1
        if out[i].tolist() != want:
            O.fail(op, f"row {i}: {out[i].tolist()} != {want}")
    stats = fastvq.semantic_id_stats(codes)
    if stats.num_items != N or stats.num_unique != len(seen) or \
            stats.max_group_size != max(seen.values(), default=0) or \
            abs(stats.collision_rate - ((N - len(seen)) / N if N else 0.0)) > 1e-12:
        O.fail(f"semantic_id_stats[{backend}]", f"{stats} for groups {dict(seen)}")
