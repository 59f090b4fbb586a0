import heapq
import math

import pytest
import torch

import fastvq
from tests._syncs import count_host_syncs
from tests.utils import assert_close, count_kernel_launches, generator, randn, raises_invalid

CASES = [  # (N, D, K)
    pytest.param(1, 1, 1, id="N1-D1-K1"),
    pytest.param(127, 60, 3, id="N127-D60-K3"),
    pytest.param(100, 100, 1000, id="N100-D100-K1000"),
    pytest.param(300, 7, 1, id="N300-D7-K1"),
    pytest.param(200, 130, 13, id="N200-D130-K13"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
MODES = [pytest.param(True, id="deterministic"), pytest.param(False, id="atomic")]


def randint(high, *shape, seed=None):
    return torch.randint(0, high, shape, generator=generator(seed))


def stats64(x, indices, num_codes, weights=None):
    """float64 oracle, row by row in Python-visible steps (no one-hot): counts (K,), sums (K, D),
    skipped. A row of weight 0 is ignored, a row with a non-finite weight or element is skipped."""
    w = torch.ones(indices.shape[0], dtype=torch.float64, device=x.device) if weights is None else weights.double()
    x64, idx = x.double(), indices.long()
    live = w != 0
    ok = torch.isfinite(x64).all(-1) & torch.isfinite(w)
    use = live & ok
    skipped = int((live & ~ok).sum())
    counts = torch.zeros(num_codes, dtype=torch.float64, device=x.device)
    counts.index_add_(0, idx[use], w[use])
    sums = torch.zeros(num_codes, x.shape[-1], dtype=torch.float64, device=x.device)
    sums.index_add_(0, idx[use], x64[use] * w[use, None])
    return counts, sums, skipped


def check(x, indices, num_codes, counts, sums, weights=None, skipped=None):
    c64, s64, n_skipped = stats64(x, indices, num_codes, weights)
    assert counts.dtype == torch.float32 and sums.dtype == torch.float32
    assert not sums.isnan().any() and not counts.isnan().any(), "unwritten output element"
    if weights is None or weights.dtype == torch.bool:
        assert torch.equal(counts.double(), c64)
    else:
        assert_close(counts, c64, torch.float32, reduce_len=indices.shape[0])
    # float64 accumulation rounded once: float32 tolerance
    reduce_len = max(int(c64.abs().max()) if c64.numel() else 1, 1)
    assert_close(sums, s64, torch.float32, reduce_len=reduce_len)
    if skipped is not None:
        assert skipped.dtype == torch.int64 and int(skipped) == n_skipped


@pytest.mark.parametrize("N,D,K", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("deterministic", MODES)
def test_parity(backend, N, D, K, dtype, deterministic):
    x, idx = randn(N, D, dtype=dtype), randint(K, N)
    counts, sums = fastvq.code_statistics(x, idx, K, deterministic=deterministic)
    assert counts.shape == (K,) and sums.shape == (K, D)
    check(x, idx, K, counts, sums)


@pytest.mark.parametrize("deterministic", MODES)
def test_skewed_and_unused_codes(backend, deterministic):
    # most rows on one code (a collapsed codebook), many codes unused (must come back 0, not NaN)
    N, D, K = 500, 24, 50
    idx = randint(K, N)
    idx[: N * 9 // 10] = 17
    x = randn(N, D)
    counts, sums = fastvq.code_statistics(x, idx, K, deterministic=deterministic)
    check(x, idx, K, counts, sums)
    unused = counts == 0
    assert unused.any() and (sums[unused] == 0).all()


@pytest.mark.parametrize("deterministic", MODES)
def test_batched_levels(backend, deterministic):
    L, N, D, K = 3, 77, 20, 9
    x, idx = randn(L, N, D), randint(K, L, N)
    counts, sums = fastvq.code_statistics(x, idx, K, deterministic=deterministic)
    assert counts.shape == (L, K) and sums.shape == (L, K, D)
    for lvl in range(L):
        check(x[lvl], idx[lvl], K, counts[lvl], sums[lvl])
        if deterministic:  # same rows, same fixed order: bitwise the per-level call
            c1, s1 = fastvq.code_statistics(x[lvl], idx[lvl], K)
            assert torch.equal(c1, counts[lvl]) and torch.equal(s1, sums[lvl])


def test_deterministic_is_bitwise_reproducible(backend):
    # large values of both signs on few codes: float32 sums whose rounding depends on the order
    N, D, K = 2000, 33, 4
    x, idx = randn(N, D, scale=1e4), randint(K, N)
    first = fastvq.code_statistics(x, idx, K)
    for _ in range(2):
        again = fastvq.code_statistics(x, idx, K)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])


def test_deterministic_row_order_within_code(backend):
    # rows of one code are summed in their original order (stable sort): interleaving other
    # codes' rows between them does not change the bits
    D = 8
    x = randn(64, D, scale=1e3)
    a = fastvq.code_statistics(x, torch.zeros(64, dtype=torch.long), 1)
    x2 = torch.zeros(128, D)
    x2[0::2] = x
    x2[1::2] = randn(64, D)
    idx2 = torch.tensor([0, 1] * 64)
    b = fastvq.code_statistics(x2, idx2, 2)
    assert torch.equal(a[1][0], b[1][0]) and b[0].tolist() == [64.0, 64.0]


@pytest.mark.parametrize("deterministic", MODES)
def test_empty(backend, deterministic):
    counts, sums = fastvq.code_statistics(randn(0, 5), torch.zeros(0, dtype=torch.long), 4, deterministic=deterministic)
    assert torch.equal(counts, torch.zeros(4)) and torch.equal(sums, torch.zeros(4, 5))
    counts, sums = fastvq.code_statistics(randn(2, 0, 5), torch.zeros(2, 0, dtype=torch.long), 3,
                                          deterministic=deterministic)
    assert torch.equal(counts, torch.zeros(2, 3)) and torch.equal(sums, torch.zeros(2, 3, 5))
    counts, sums = fastvq.code_statistics(randn(0, 5), torch.zeros(0, dtype=torch.long), 0, deterministic=deterministic)
    assert counts.shape == (0,) and sums.shape == (0, 5)
    # D = 0: no sums, but the rows still count (the atomic kernel once returned zero counts)
    counts, sums = fastvq.code_statistics(randn(3, 0), torch.tensor([0, 1, 1]), 2, deterministic=deterministic)
    assert counts.tolist() == [1.0, 2.0] and sums.shape == (2, 0)


@pytest.mark.parametrize("deterministic", MODES)
def test_noncontiguous_and_int32(backend, deterministic):
    N, D, K = 90, 12, 7
    big = randn(N, 2 * D)
    x = big[:, ::2]
    idx_big = randint(K, 2 * N).to(torch.int32)
    idx = idx_big[::2]
    assert not x.is_contiguous() and not idx.is_contiguous()
    counts, sums = fastvq.code_statistics(x, idx, K, deterministic=deterministic)
    check(x, idx, K, counts, sums)
    xt = randn(D, N).T  # column-major rows
    counts, sums = fastvq.code_statistics(xt, idx, K, deterministic=deterministic)
    check(xt, idx, K, counts, sums)


def test_not_differentiable(backend):
    x = randn(10, 4).requires_grad_()
    counts, sums = fastvq.code_statistics(x, randint(3, 10), 3)
    assert not counts.requires_grad and not sums.requires_grad


@pytest.mark.parametrize("bad", [-1, 5, 1000, 2**40], ids=["negative", "K", "far", "int32-wrap"])
@pytest.mark.parametrize("deterministic", MODES)
def test_out_of_range(backend, bad, deterministic):
    # 2**40 would wrap to 0 in an int32 key: the range is checked on the original values
    idx = torch.tensor([0, 1, bad, 2])
    # a row of weight 0 (padding) is never looked at, whatever its index
    counts, sums = fastvq.code_statistics(randn(4, 3), idx, 5, weights=torch.tensor([True, True, False, True]),
                                          deterministic=deterministic)
    assert counts.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    with raises_invalid(r"code_statistics.*num_codes=5.*1 rows, values in \[" + str(bad)):
        fastvq.code_statistics(randn(4, 3), idx, 5, deterministic=deterministic)
    with raises_invalid("code_statistics.*num_codes=5"):  # batched, last level
        fastvq.code_statistics(randn(2, 4, 3), torch.stack([idx.clamp(0, 4), idx]), 5, deterministic=deterministic)


def test_out_of_range_with_no_codes(backend):
    with raises_invalid("code_statistics.*num_codes=0"):
        fastvq.code_statistics(randn(3, 2), torch.zeros(3, dtype=torch.long), 0)


@pytest.mark.parametrize(
    "x,indices,num_codes,err",
    [
        (torch.randint(0, 3, (4, 3)), torch.zeros(4, dtype=torch.long), 3, TypeError),
        (torch.randn(4, 3), torch.zeros(4), 3, TypeError),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 3.5, ValueError),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), True, TypeError),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), -1, ValueError),
        (torch.randn(4, 3), torch.zeros(5, dtype=torch.long), 3, ValueError),
        (torch.randn(4), torch.zeros(4, dtype=torch.long), 3, ValueError),
        (torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long), 3, ValueError),
        (torch.randn(2, 4, 3), torch.zeros(2, 5, dtype=torch.long), 3, ValueError),
        ([[1.0]], torch.zeros(1, dtype=torch.long), 3, TypeError),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long, device="meta"), 3, ValueError),
    ],
    ids=["x-int", "indices-float", "K-nonintegral", "K-bool", "K-negative", "N-mismatch", "x-1D",
         "indices-2D-for-2D-x", "batched-N-mismatch", "not-tensor", "devices"],
)
def test_bad_input(x, indices, num_codes, err):
    with pytest.raises(err, match="code_statistics"):
        fastvq.code_statistics(x, indices, num_codes)


@pytest.mark.parametrize("batched", [False, True], ids=["2D", "batched-L2"])
def test_num_codes_beyond_int32_keys_is_named(backend, batched):
    """``L * num_codes`` beyond the int32 sort keys (2**31 - 2) is a ValueError naming num_codes on
    both backends (it was a bare AssertionError on Triton and an allocator RuntimeError on the
    reference), checked before anything is allocated."""
    L = 2 if batched else 1
    x = randn(L, 6, 3) if batched else randn(6, 3)
    idx = torch.zeros(x.shape[:-1], dtype=torch.long, device=x.device)
    limit = (2**31 - 2) // L
    for K in (limit + 1, 2**31, 2**40):
        with pytest.raises(ValueError, match=rf"fastvq\.code_statistics: num_codes must be <= {limit}\b"):
            fastvq.code_statistics(x, idx, K)


def test_integral_float_num_codes():
    # every size argument takes an integral float (1e6) the same way: one check, _checks.check_int_arg
    x, idx = randn(6, 3), torch.tensor([0, 2, 1, 2, 0, 0])
    for got, want in zip(fastvq.code_statistics(x, idx, 3.0), fastvq.code_statistics(x, idx, 3)):
        assert torch.equal(got, want)


def test_bad_flags_and_weights():
    x, idx = randn(4, 3), torch.zeros(4, dtype=torch.long)
    with pytest.raises(TypeError, match="code_statistics.*deterministic"):
        fastvq.code_statistics(x, idx, 3, deterministic="yes")
    with pytest.raises(TypeError, match="code_statistics.*return_skipped"):
        fastvq.code_statistics(x, idx, 3, return_skipped=1)
    with pytest.raises(TypeError, match="code_statistics.*weights must be.*torch.int64"):
        fastvq.code_statistics(x, idx, 3, weights=torch.ones(4, dtype=torch.long))
    with pytest.raises(TypeError, match="code_statistics.*weights must be a torch.Tensor"):
        fastvq.code_statistics(x, idx, 3, weights=[1.0] * 4)
    with pytest.raises(ValueError, match=r"code_statistics.*weights must have shape \(4,\).*got \(5,\)"):
        fastvq.code_statistics(x, idx, 3, weights=torch.ones(5))
    with pytest.raises(ValueError, match=r"code_statistics.*weights must have shape \(2, 4\) or \(4,\)"):
        fastvq.code_statistics(randn(2, 4, 3), torch.zeros(2, 4, dtype=torch.long), 3, weights=torch.ones(4, 2))
    with pytest.raises(ValueError, match="code_statistics.*one device"):
        fastvq.code_statistics(x, idx, 3, weights=torch.ones(4, device="meta"))


def test_opcheck():
    x, idx = randn(30, 5), randint(4, 30)
    xb, idxb = randn(2, 30, 5), randint(4, 2, 30)
    w = torch.rand(30)
    for name in ("reference", "triton"):
        with fastvq.backend(name):
            for det in (True, False):
                torch.library.opcheck(torch.ops.fastvq.code_statistics.default, (x, idx, 4, det))
                torch.library.opcheck(torch.ops.fastvq.code_statistics.default, (xb, idxb, 4, det))
                torch.library.opcheck(torch.ops.fastvq.code_statistics.default, (x, idx, 4, det, w > 0.5))
                torch.library.opcheck(torch.ops.fastvq.code_statistics.default, (xb, idxb, 4, det, w))


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_gpu(deterministic, dtype):
    L, N, D, K = 8, 262144, 256, 256
    x = randn(L, N, D, dtype=dtype)
    idx = randint(K, L, N)
    with fastvq.backend("triton"):
        counts, sums = fastvq.code_statistics(x, idx, K, deterministic=deterministic)
        if deterministic:
            again = fastvq.code_statistics(x, idx, K)
            assert torch.equal(counts, again[0]) and torch.equal(sums, again[1])
    with fastvq.backend("reference"):
        counts_ref, sums_ref = fastvq.code_statistics(x, idx, K)
    assert torch.equal(counts, counts_ref)
    assert_close(sums, sums_ref, torch.float32, reduce_len=N // K * 4)
    for lvl in (0, L - 1):
        check(x[lvl], idx[lvl], K, counts[lvl], sums[lvl])



@pytest.mark.parametrize("name", ["reference", "triton"])
def test_triton_backend_really_launches_kernels(monkeypatch, name):
    from fastvq.kernels import code_statistics as kmod

    names = ("_code_statistics_segment_kernel", "_code_statistics_merge_kernel", "_code_statistics_atomic_kernel")
    launched = count_kernel_launches(monkeypatch, kmod, *names)
    with fastvq.backend(name):
        fastvq.code_statistics(randn(9, 5), torch.arange(9) % 4, 4)
        fastvq.code_statistics(randn(9, 5), torch.arange(9) % 4, 4, deterministic=False)
    assert launched == (list(names) if name == "triton" else [])


# ------------------------------------------------------------------ weights, masks, non-finite rows


WEIGHTS = [pytest.param("mask", id="mask"), pytest.param("float", id="float"), pytest.param("bf16", id="bf16")]


def make_weights(kind, *shape, seed=0):
    g = generator(seed)
    if kind == "mask":
        return torch.rand(*shape, generator=g) < 0.7
    w = torch.rand(*shape, generator=g) * 3 - 0.5  # some negative, some zero after the next line
    w[torch.rand(*shape, generator=g) < 0.2] = 0
    return w.to(torch.bfloat16 if kind == "bf16" else torch.float32)


@pytest.mark.parametrize("kind", WEIGHTS)
@pytest.mark.parametrize("deterministic", MODES)
def test_weights(backend, kind, deterministic):
    N, D, K = 150, 13, 7
    x, idx, w = randn(N, D), randint(K, N), make_weights(kind, N)
    counts, sums, skipped = fastvq.code_statistics(x, idx, K, weights=w, deterministic=deterministic,
                                                   return_skipped=True)
    check(x, idx, K, counts, sums, w, skipped)
    if kind == "mask":  # a mask is the same as dropping the rows
        c2, s2 = fastvq.code_statistics(x[w], idx[w], K, deterministic=deterministic)
        assert torch.equal(counts, c2)
        assert_close(sums, s2, torch.float32, reduce_len=N)


@pytest.mark.parametrize("deterministic", MODES)
def test_batched_weights(backend, deterministic):
    L, N, D, K = 3, 40, 6, 5
    x, idx = randn(L, N, D), randint(K, L, N)
    shared, per_level = make_weights("float", N, seed=1), make_weights("float", L, N, seed=2)
    for w in (shared, per_level):
        counts, sums, skipped = fastvq.code_statistics(x, idx, K, weights=w, deterministic=deterministic,
                                                       return_skipped=True)
        assert skipped.shape == (L,)
        for lvl in range(L):
            check(x[lvl], idx[lvl], K, counts[lvl], sums[lvl], w if w.dim() == 1 else w[lvl], skipped[lvl])


NONFINITE = [float("nan"), float("inf"), -float("inf")]


@pytest.mark.parametrize("D", [1, 9, 300], ids=lambda d: f"D{d}")  # 300: several column blocks
@pytest.mark.parametrize("deterministic", MODES)
def test_nonfinite_rows_are_left_out_and_counted(backend, D, deterministic):
    N, K = 60, 4
    x, idx = randn(N, D, scale=3.0), randint(K, N)
    bad_rows = [0, 7, 8, 31, 59]
    for i, r in enumerate(bad_rows):  # one bad element per row, in a different column each time
        x[r, (r * 37) % D] = NONFINITE[i % 3]
    x[31] = float("nan")  # a whole row
    counts, sums, skipped = fastvq.code_statistics(x, idx, K, deterministic=deterministic, return_skipped=True)
    assert int(skipped) == len(bad_rows)
    assert torch.isfinite(sums).all(), "a non-finite row leaked into the sums"
    check(x, idx, K, counts, sums, None, skipped)
    # weights that are not finite skip their row too; a masked-out NaN row is not counted
    w = torch.ones(N)
    w[3], w[4], w[7] = float("nan"), float("inf"), 0.0
    counts, sums, skipped = fastvq.code_statistics(x, idx, K, weights=w, deterministic=deterministic,
                                                   return_skipped=True)
    assert int(skipped) == len(bad_rows) - 1 + 2
    check(x, idx, K, counts, sums, w, skipped)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("deterministic", MODES)
def test_nonfinite_low_precision_and_batched(backend, dtype, deterministic):
    L, N, D, K = 2, 50, 8, 3
    x, idx = randn(L, N, D, dtype=dtype), randint(K, L, N)
    x[1, 5, 2] = float("inf")
    x[1, 6, 0] = float("nan")
    x[0, 9, 7] = -float("inf")
    counts, sums, skipped = fastvq.code_statistics(x, idx, K, deterministic=deterministic, return_skipped=True)
    assert skipped.tolist() == [1, 2]
    for lvl in range(L):
        check(x[lvl], idx[lvl], K, counts[lvl], sums[lvl], None, skipped[lvl])


@pytest.mark.parametrize("deterministic", MODES)
def test_overflow_is_inf_never_nan(backend, deterministic):
    # float32 partial sums would overflow; the exact sums decide: finite, +inf or -inf, never NaN
    big = 3e38
    rows = torch.tensor([
        [big, big, -big, 1.0],    # code 0: column 0 sums to 9e38 -> +inf, column 2 to -9e38 -> -inf,
        [big, big, -big, 2.0],    #   column 1 passes 6e38 (a float32 running sum is inf from here on)
        [big, -big, -big, 3.0],   #   and comes back to 3e38: finite
        [big, -big, 1.0, 1.0],    # code 1
        [-big, big, 1.0, 1.0],    # code 1: 0, 0 exactly
    ])
    # spread code 0's big rows over different row tiles and pieces (zero rows between them), so
    # every stage of the accumulation sees a partial sum beyond float32's range
    x = torch.zeros(1000, 4)
    x[[0, 100, 550, 998, 999]] = rows
    idx = torch.zeros(1000, dtype=torch.long)
    idx[998:] = 1
    counts, sums = fastvq.code_statistics(x, idx, 2, deterministic=deterministic)
    exact = torch.zeros(2, 4, dtype=torch.float64).index_add_(0, idx, x.double())
    assert not sums.isnan().any()
    assert torch.equal(sums, exact.float()), (sums, exact)
    assert sums[0, 0] == float("inf") and sums[0, 2] == -float("inf") and sums[0, 1] == torch.tensor(big)
    assert sums[1, 0] == 0 and sums[1, 1] == 0


def test_backends_agree_bitwise():
    # fixed-order float64 sums rounded once: the deterministic kernel and the reference agree
    # (both backends named: under a backend fixture the reference compared with itself; taudit F3)
    N, D, K = 700, 20, 6
    x, idx, w = randn(N, D, scale=1e3), randint(K, N), make_weights("float", N)
    with fastvq.backend("triton"):
        ours = fastvq.code_statistics(x, idx, K, weights=w)
    with fastvq.backend("reference"):
        ref = fastvq.code_statistics(x, idx, K, weights=w)
    assert torch.equal(ours[0], ref[0])
    assert_close(ours[1], ref[1], torch.float32)


# ------------------------------------------------------------------ balance, keys, syncs


@pytest.mark.parametrize("lengths", [(255, 256, 257), (513, 1, 0, 600), (1500,)], ids=["edges", "mixed", "hot"])
@pytest.mark.parametrize("weighted", [False, True], ids=["plain", "weighted"])
def test_multi_piece_segments(backend, lengths, weighted):
    # segments longer than a piece (P = 256 rows here) are summed by several programs and merged
    from fastvq.kernels.code_statistics import piece_rows

    N = sum(lengths)
    assert piece_rows(N, 24) == 256
    K = len(lengths) + 1
    idx = torch.cat([torch.full((n,), k) for k, n in enumerate(lengths)])
    idx = idx[torch.randperm(N, generator=generator(0))]
    x = randn(N, 24, scale=100.0)
    x[11, 3] = float("nan")
    w = make_weights("float", N) if weighted else None
    counts, sums, skipped = fastvq.code_statistics(x, idx, K, weights=w, return_skipped=True)
    check(x, idx, K, counts, sums, w, skipped)
    again = fastvq.code_statistics(x, idx, K, weights=w)
    assert torch.equal(counts, again[0]) and torch.equal(sums, again[1])


def test_keys_are_int32(monkeypatch):
    from fastvq.kernels import code_statistics as kmod

    dtypes = []
    real_sort = torch.sort

    def sort(t, *args, **kwargs):
        dtypes.append(t.dtype)
        return real_sort(t, *args, **kwargs)

    monkeypatch.setattr(kmod.torch, "sort", sort)
    with fastvq.backend("triton"):
        fastvq.code_statistics(randn(20, 3), randint(5, 20), 5)
        fastvq.code_statistics(randn(2, 20, 3), randint(5, 2, 20).int(), 5)
    assert dtypes == [torch.int32, torch.int32]


@pytest.mark.parametrize("deterministic", MODES)
def test_no_host_sync(backend, deterministic):
    L, N, D, K = 2, 300, 8, 5
    x, idx, w = randn(L, N, D), randint(K, L, N), make_weights("mask", N)
    x[0, 3, 1] = float("nan")
    with count_host_syncs() as syncs:
        fastvq.code_statistics(x, idx, K, weights=w, deterministic=deterministic, return_skipped=True)
        fastvq.code_statistics(x[0], idx[0], K, deterministic=deterministic)
    assert syncs == []


def _program_costs(keys, S, D):
    """Per program of the deterministic path, its work in 4096-element tiles (+1 for starting):
    the piece kernel's rows, the merge kernel's float64 partials (twice the bytes)."""
    from fastvq.kernels import code_statistics as kmod

    plan = kmod.segment_plan(keys, S, D)
    _, BLOCK_D, n_dblocks, _ = kmod._blocks(D)
    P, seg = plan["P"], plan["seg_of_item"].long()
    offsets, pieces, item_end = plan["offsets"].long(), plan["pieces"].long(), plan["item_end"].long()
    active = seg < S
    s = seg[active]
    j = torch.arange(seg.shape[0])[active] - (item_end[s] - pieces[s])
    rows = torch.minimum(offsets[s] + (j + 1) * P, offsets[s + 1]) - (offsets[s] + j * P)
    assert int(rows.sum()) == int((keys < S).sum()) and int(rows.max()) <= P  # every row, once
    assert seg.shape[0] <= min(keys.shape[0], S) + math.ceil(keys.shape[0] / P)  # the grid, from shapes
    merged = plan["multi_seg"].long()
    merged = merged[merged < S]
    stage1 = ((rows * min(BLOCK_D, D) + 4095) // 4096 + 1).tolist() * n_dblocks
    stage2 = ((pieces[merged] * kmod.MERGE_BLOCK_D * 2 + 4095) // 4096 + 1).tolist() * math.ceil(D / kmod.MERGE_BLOCK_D)
    return stage1, stage2


def _makespan(costs, slots):
    """Greedy list scheduling of the programs, in launch order, onto ``slots`` concurrent programs."""
    if not costs:
        return 0
    heap = [0] * slots
    for c in costs:
        heapq.heappush(heap, heapq.heappop(heap) + c)
    return max(heap)


@pytest.mark.parametrize("M,K,D", [(1 << 20, 8192, 256), (1 << 20, 1024, 64), (1 << 20, 256, 16),
                                   (1 << 18, 4096, 256)],
                         ids=["1M-K8192-D256", "1M-K1024-D64", "1M-K256-D16", "256K-K4096-D256"])
def test_hot_code_is_balanced(M, K, D):
    """Counted on CPU (programs and per-program work, no GPU timing): when every row picks one code
    the deterministic path's modelled time stays within 2x of evenly spread codes, at 132, 528
    and 2112 concurrent programs (an H100's SMs x 1, 4, 16). The old design (one program per
    code) was 48-1000x slower there. (Below ~256K rows the whole call is a few microseconds of
    work per program, where launch latency dominates: at 64K rows and 2112 slots the model gives
    12 tile-times hot vs 4 uniform.)"""
    g = generator(0)
    uniform = torch.randint(0, K, (M,), generator=g, dtype=torch.int32)
    hot = torch.full((M,), 17, dtype=torch.int32)
    costs = {name: _program_costs(keys, K, D) for name, keys in (("uniform", uniform), ("hot", hot))}
    for slots in (132, 528, 2112):
        t = {name: _makespan(c1, slots) + _makespan(c2, slots) for name, (c1, c2) in costs.items()}
        assert t["hot"] <= 2 * t["uniform"], (slots, t)
        # one program per code, 128 columns each (the design before): a hot code serialises
        old = {name: _makespan(((torch.bincount(k.long(), minlength=K) * 128 + 4095) // 4096 + 1).tolist()
                               * math.ceil(D / 128), slots) for name, k in (("uniform", uniform), ("hot", hot))}
        assert old["hot"] > 20 * old["uniform"], (slots, old)


# ------------------------------------------------------------------ sums rounded once


def _float32_cases(n_terms):
    """The float32 midpoint cases whose terms are all float32 values (the rows a user passes)."""
    from tests._midpoints import midpoint_cases

    cases = [t for seed in (3, 4, 5) for dt, t in midpoint_cases(generator(seed), n_terms) if dt == torch.float32]
    return [t for t in cases if all(torch.tensor(v).item() == v for v in t)]


@pytest.mark.parametrize("spread", [False, True], ids=["one-piece", "pieces"])
def test_sums_near_rounding_midpoints_round_once(backend, spread):
    # A float64 sum of float32 rows can land on a float32 rounding midpoint the exact sum is not
    # on, and then round the wrong way: max, 2^103, -2^60 gave +inf (the exact sum rounds to max),
    # 1, 2^-24, 2^-80 gave 1 (the exact sum rounds to 1 + 2^-23). Each column below is such a
    # sum (a term near a midpoint, the half ulp, a tiny offset of either sign, cancelling pairs
    # of large terms), the counts such a sum of weights; spread over several pieces (P = 256
    # rows) they go through the deterministic path's partials and its merge too.
    from fractions import Fraction

    from tests._midpoints import nearest

    cases = _float32_cases(7)
    n_terms = len(cases[0])
    cols = torch.tensor(cases, dtype=torch.float32).T.contiguous()  # (terms, cases)
    N = 900 if spread else n_terms
    rows = torch.linspace(0, N - 1, n_terms).long() if spread else torch.arange(n_terms)
    x = torch.zeros(N, cols.shape[1])
    x[rows] = cols
    idx = torch.zeros(N, dtype=torch.long)
    want = torch.tensor([nearest(sum(Fraction(v) for v in c), torch.float32) for c in cases])
    counts, sums = fastvq.code_statistics(x, idx, 1)
    assert torch.equal(sums[0], want), (sums[0] - want).nonzero().flatten().tolist()
    # the counts: positive weights whose exact sum is just above a midpoint (1, 2^-24, 2^-80 -> 1 + 2^-23)
    w = torch.zeros(N)
    w[rows[:3]] = torch.tensor([1.0, 2.0**-24, 2.0**-80])
    counts, _ = fastvq.code_statistics(torch.ones(N, 1), idx, 1, weights=w)
    assert counts.item() == 1 + 2.0**-23
    # a plain float64 sum gets cases wrong, so the assertions above can fail
    plain = x.double().sum(0).float()
    assert (plain != want).sum() >= 4


@pytest.mark.parametrize("rows", [[0, 1, 2, 3, 4], [0, 1, 64, 128, 192], [0, 256, 512, 768, 1024],
                                  [0, 256 * 21, 256 * 42, 256 * 63, 256 * 64]],
                         ids=["one-tile", "tiles", "pieces", "merge-blocks"])
def test_sums_keep_a_small_remainder_beside_cancelling_ones(backend, device, rows):
    # tests/_midpoints.py small_remainder_rows (the README's max, half ulp, 2^77, -2^-100, -2^77:
    # max; and 1, half ulp, 2^-60, 2^-130, -2^-60: 1 + 2^-23) as two columns of one code, the
    # terms at these rows (zeros between): in one tile of rows, in different tiles of one piece
    # (64 rows each), in different pieces of 256 rows (merged), the last one in the 65th piece
    # (the merge kernel's second block of MERGE_BLOCK_Q = 64 partials). One split with the
    # remainders summed plainly lost the small term in the merge (+inf and 1); a running pair
    # across tiles and pieces lost the 2^-130 (1)
    from fractions import Fraction

    from fastvq.kernels.code_statistics import MERGE_BLOCK_Q, _blocks, piece_rows
    from tests._midpoints import nearest, small_remainder_rows

    terms = small_remainder_rows(torch.float32)
    N = rows[-1] + 8
    assert piece_rows(N, 2) == 256 and _blocks(2)[0] == 64 and rows[-1] // 256 in (0, 4, MERGE_BLOCK_Q)
    x = torch.zeros(N, 2, device=device)
    x[torch.tensor(rows, device=device)] = torch.tensor(terms, device=device).T
    want = [nearest(sum(Fraction(v) for v in r), torch.float32) for r in terms]
    counts, sums = fastvq.code_statistics(x, torch.zeros(N, dtype=torch.long, device=device), 1, deterministic=True)
    assert sums.flatten().tolist() == want and counts.tolist() == [N]


def test_deterministic_sums_of_products_that_cancel(backend, device):
    # fuzzM D1: weighted terms 3e38 * 1e38, 1, -3e38 * 1e38 (products of up to 48 bits) summed
    # to 0 on the Triton backend (one extraction left the big products' low bits in remainders
    # whose plain sum lost the 1); the exact sum is 1. The deterministic path extracts twice
    x = torch.tensor([[3e38], [1.0], [-3e38], [2.5]], device=device)
    w = torch.tensor([1e38, 1.0, 1e38, 3.0], device=device)
    idx = torch.tensor([0, 0, 0, 1], device=device)
    counts, sums = fastvq.code_statistics(x, idx, 2, weights=w, deterministic=True)
    assert sums.flatten().tolist() == [1.0, 7.5]


# ------------------------------------------------------------------ mutation round C (mutC): behaviour no test pinned


def test_code_statistics_bad_counts_agree_between_paths():
    # C47 (internal contract only: the op raises on any out-of-range index and drops bad[:, 0]):
    # a row with an out-of-range index AND a non-finite weight is an index error, not also a
    # non-finite row; the atomic kernel counted it in both columns, the deterministic path in one
    from fastvq.kernels.code_statistics import code_statistics_fwd
    from fastvq.reference.code_statistics import code_statistics_full_ref

    x = randn(40, 9, seed=41)
    idx = torch.randint(0, 5, (40,), generator=generator(42))
    w = torch.rand(40, generator=generator(43)) + 0.5
    idx[3], w[3] = 7, float("inf")  # out of range and a non-finite weight
    idx[8], w[8] = -1, float("nan")
    w[11] = float("inf")  # in range, non-finite weight: counted as not finite
    _, _, want = code_statistics_full_ref(x, idx, 5, w)
    assert want.tolist() == [[1, 2]]
    for det in (True, False):
        _, _, bad = code_statistics_fwd(x, idx, 5, 40, w, det)
        assert bad.tolist() == [[1, 2]], det


def test_multi_piece_weighted_count_rounds_once():
    # C52 (and C56 for the sums): the merge kernel dropped the pieces' low parts. One segment of
    # 514 rows (3 pieces of at most 256): weights 1, 2^-60 and 512 x 2^-33, whose exact sum
    # 1 + 2^-24 + 2^-60 lies just above the float32 midpoint 1 + 2^-24: float32 gives 1 + 2^-23.
    # The 2^-60 lives only in the first piece's low part: without it the sum is the tie -> 1.0
    w = torch.cat([torch.tensor([1.0, 2.0**-60]), torch.full((512,), 2.0**-33)])
    x = torch.ones(514, 3)
    idx = torch.zeros(514, dtype=torch.long)
    want = torch.tensor(1 + 2.0**-23, dtype=torch.float32)
    for name in ("reference", "triton"):
        with fastvq.backend(name):
            counts, sums = fastvq.code_statistics(x, idx, 2, weights=w, deterministic=True)
        assert counts[0] == want and (sums[0] == want).all(), (name, counts[0].item() - 1, sums[0] - 1)


def test_code_statistics_sum_just_below_a_float32_midpoint():
    # C62: round_dd (to nearest, float64 rounded to odd first) nudged an ODD float64 sum too: the
    # exact sum M - 2^-52 + 2^-80, just below the float32 midpoint M = 1 + 2^-23 + 2^-24, came out
    # as M itself, a tie, rounded to the even neighbour 1 + 2^-22 instead of down to 1 + 2^-23
    x = torch.tensor([1.0, 2.0**-23, 2.0**-24, -(2.0**-52), 2.0**-80])[:, None]
    idx = torch.zeros(5, dtype=torch.long)
    want = torch.tensor(1 + 2.0**-23, dtype=torch.float32)
    for name in ("reference", "triton"):
        with fastvq.backend(name):
            _, sums = fastvq.code_statistics(x, idx, 1, deterministic=True)
        assert sums[0, 0] == want, (name, (sums[0, 0].double() - 1) * 2**24)
