import pytest
import torch

import fastvq
from tests.utils import assert_close, count_kernel_launches, generator, randn

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


def stats64(x, indices, num_codes):
    """float64 oracle by index_add_ (no one-hot): counts (K,), sums (K, D)."""
    counts = torch.zeros(num_codes, dtype=torch.float64, device=x.device)
    counts.index_add_(0, indices.long(), torch.ones(indices.shape[0], dtype=torch.float64, device=x.device))
    sums = torch.zeros(num_codes, x.shape[-1], dtype=torch.float64, device=x.device)
    sums.index_add_(0, indices.long(), x.double())
    return counts, sums


def check(x, indices, num_codes, counts, sums):
    c64, s64 = stats64(x, indices, num_codes)
    assert counts.dtype == torch.float32 and sums.dtype == torch.float32
    assert not sums.isnan().any() and not counts.isnan().any(), "unwritten output element"
    assert torch.equal(counts.double(), c64)
    # float32 accumulation of (possibly low-precision) inputs, exact on input: float32 tolerance
    assert_close(sums, s64, torch.float32, reduce_len=max(int(c64.max().item()) if c64.numel() else 1, 1))


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


@pytest.mark.parametrize("bad", [-1, 5, 1000], ids=["negative", "K", "far"])
@pytest.mark.parametrize("deterministic", MODES)
def test_out_of_range(bad, deterministic):
    idx = torch.tensor([0, 1, bad, 2])
    with pytest.raises(ValueError, match="code_statistics.*num_codes=5"):
        fastvq.code_statistics(randn(4, 3), idx, 5, deterministic=deterministic)


@pytest.mark.parametrize(
    "x,indices,num_codes,err",
    [
        (torch.randint(0, 3, (4, 3)), torch.zeros(4, dtype=torch.long), 3, TypeError),
        (torch.randn(4, 3), torch.zeros(4), 3, TypeError),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), 3.0, TypeError),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), True, TypeError),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long), -1, ValueError),
        (torch.randn(4, 3), torch.zeros(5, dtype=torch.long), 3, ValueError),
        (torch.randn(4), torch.zeros(4, dtype=torch.long), 3, ValueError),
        (torch.randn(4, 3), torch.zeros(4, 1, dtype=torch.long), 3, ValueError),
        (torch.randn(2, 4, 3), torch.zeros(2, 5, dtype=torch.long), 3, ValueError),
        ([[1.0]], torch.zeros(1, dtype=torch.long), 3, TypeError),
        (torch.randn(4, 3), torch.zeros(4, dtype=torch.long, device="meta"), 3, ValueError),
    ],
    ids=["x-int", "indices-float", "K-float", "K-bool", "K-negative", "N-mismatch", "x-1D",
         "indices-2D-for-2D-x", "batched-N-mismatch", "not-tensor", "devices"],
)
def test_bad_input(x, indices, num_codes, err):
    with pytest.raises(err, match="code_statistics"):
        fastvq.code_statistics(x, indices, num_codes)


def test_bad_deterministic_flag():
    with pytest.raises(TypeError, match="code_statistics"):
        fastvq.code_statistics(randn(4, 3), torch.zeros(4, dtype=torch.long), 3, deterministic="yes")


def test_opcheck():
    x, idx = randn(30, 5), randint(4, 30)
    xb, idxb = randn(2, 30, 5), randint(4, 2, 30)
    for name in ("reference", "triton"):
        with fastvq.backend(name):
            for det in (True, False):
                torch.library.opcheck(torch.ops.fastvq.code_statistics.default, (x, idx, 4, det))
                torch.library.opcheck(torch.ops.fastvq.code_statistics.default, (xb, idxb, 4, det))


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

    launched = count_kernel_launches(monkeypatch, kmod, "_code_statistics_segment_kernel", "_code_statistics_atomic_kernel")
    with fastvq.backend(name):
        (fastvq.code_statistics(randn(9, 5), torch.arange(9) % 4, 4), fastvq.code_statistics(randn(9, 5), torch.arange(9) % 4, 4, deterministic=False))
    assert launched == (["_code_statistics_segment_kernel", "_code_statistics_atomic_kernel"] if name == "triton" else [])
