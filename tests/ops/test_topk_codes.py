import warnings

import pytest
import torch

import fastvq
from fastvq.testing import assert_close
from tests.ops.test_search_contract import d64
from tests.utils import count_kernel_launches, generator, randn

METRICS = ["l2", "euclidean", "cosine", "dot"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _check_topk(x, c, k, metric, idx, dist):
    """Shape, range, distinct indices, ascending distances; each position's distance is the true
    k-th smallest within the search's rounding; the distances are the chosen codes' own."""
    lead = x.shape[:-1]
    assert idx.shape == (*lead, k) and dist.shape == (*lead, k)
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    K, D = c.shape
    idx2, dist2 = idx.reshape(-1, k), dist.reshape(-1, k)
    assert ((idx2 >= 0) & (idx2 < K)).all()
    assert (idx2.sort(1).values.diff(dim=1) > 0).all(), "indices repeat within a row"
    if idx2.numel() == 0:
        return
    d = d64(x.reshape(-1, D), c, metric)
    chosen = d.gather(1, idx2)
    truth = d.sort(1).values[:, :k]
    x64, c64 = x.reshape(-1, D).double(), c.double()
    # the search compares float32 scores: allow the rounding of |x|^2 + |c|^2 (l2) etc.
    if metric in ("l2", "euclidean"):
        mag = (x64**2).sum(-1, keepdim=True) + (c64**2).sum(-1).max()
        if metric == "euclidean":
            chosen, truth = chosen**2, truth**2
    elif metric == "dot":
        mag = x64.norm(dim=-1, keepdim=True) * c64.norm(dim=-1).max()
    else:
        mag = torch.ones_like(truth[:, :1])
    assert ((chosen - truth).abs() <= 1e-5 * mag).all(), f"not the k nearest: {(chosen - truth).abs().max()}"
    assert_close(dist2, d.gather(1, idx2), dtype=torch.float32, reduce_len=2 * D + 8,
                 magnitude=d.gather(1, idx2).abs() + (x64.abs() @ c64.abs().T).gather(1, idx2) + 1e-30)
    assert (dist2.diff(dim=1) >= -1e-5 * mag).all(), "distances not ascending"


CASES = [  # (N, K, D, k)
    pytest.param(5, 7, 3, 1, id="k1"),
    pytest.param(9, 70, 12, 5, id="N9-K70-k5"),
    pytest.param(33, 40, 20, 16, id="N33-K40-k16"),
    pytest.param(4, 16, 8, 16, id="k=K"),
    pytest.param(3, 50, 300, 4, id="streamD"),
    pytest.param(0, 9, 6, 3, id="N0"),
]


@pytest.mark.parametrize("N,K,D,k", CASES)
@pytest.mark.parametrize("metric", METRICS)
def test_parity(backend, N, K, D, k, metric):
    x, c = randn(N, D), randn(K, D)
    idx, dist = fastvq.topk_codes(x, c, k, metric)
    _check_topk(x, c, k, metric, idx, dist)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_dtypes_and_batch_dims(backend, dtype):
    x, c = randn(2, 3, 7, 16, dtype=dtype), randn(30, 16, dtype=dtype)
    for metric in ("l2", "cosine"):
        idx, dist = fastvq.topk_codes(x, c, 6, metric)
        _check_topk(x, c, 6, metric, idx, dist)


def test_first_is_nearest_code(backend):
    x, c = randn(40, 10), randn(90, 10)
    for metric in METRICS:
        top, _ = fastvq.topk_codes(x, c, 3, metric)
        near, _ = fastvq.nearest_code(x, c, metric)
        assert torch.equal(top[:, 0], near)


def test_exact_ties_to_smaller_index(backend):
    # integer data: exact scores; code 4 duplicated at 11, 40, 77 (other tiles too); x at code 4
    g = generator(3)
    c = torch.randint(-4, 5, (100, 6), generator=g, device=g.device).float()
    c[[11, 40, 77]] = c[4].clone()
    x = c[4].expand(3, 6)
    idx, dist = fastvq.topk_codes(x, c, 5, "l2")
    assert idx[:, :4].tolist() == [[4, 11, 40, 77]] * 3
    assert (dist[:, :4] == 0).all()
    idx, _ = fastvq.topk_codes(x, c, 2, "l2")  # fewer slots than ties: the smallest indices stay
    assert idx.tolist() == [[4, 11]] * 3


def test_multi_codebook_one_launch(backend, monkeypatch):
    import fastvq.kernels.nearest_code as knc

    x, c = randn(3, 2, 9, 8), randn(3, 25, 8)
    launched = count_kernel_launches(monkeypatch, knc, "_topk_codes_fwd_kernel")
    idx, dist = fastvq.topk_codes(x, c, 4, "l2")
    assert idx.shape == (3, 2, 9, 4)
    for h in range(3):
        _check_topk(x[h], c[h], 4, "l2", idx[h], dist[h])
    if backend == "triton":
        assert launched == ["_topk_codes_fwd_kernel"]


@pytest.mark.parametrize("metric", METRICS)
def test_nonfinite(backend, metric):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        x, c = randn(6, 5), randn(12, 5)
        x[1, 0] = float("nan")
        x[2, 3] = float("inf")
        c[0, 1] = float("nan")
        c[5, 2] = float("-inf")
        idx, dist = fastvq.topk_codes(x, c, 12, metric)
    finite = [j for j in range(12) if j not in (0, 5)]
    assert idx[1].tolist() == list(range(12)) and dist[1].isnan().all()  # NaN row: 0..k-1
    assert idx[2].tolist() == finite + [0, 5]  # infinite row: finite codes by index, then the others
    for r in (0, 3, 4, 5):  # finite rows: the non-finite codes come last
        assert set(idx[r, -2:].tolist()) == {0, 5}
        assert torch.isfinite(dist[r, :-2]).all()


def test_triton_matches_reference_exactly_on_integers():
    g = generator(5)
    x = torch.randint(-3, 4, (20, 7), generator=g, device=g.device).float()
    c = torch.randint(-3, 4, (64, 7), generator=g, device=g.device).float()
    for metric in ("l2", "dot"):
        with fastvq.backend("reference"):
            ref = fastvq.topk_codes(x, c, 8, metric)
        with fastvq.backend("triton"):
            got = fastvq.topk_codes(x, c, 8, metric)
        assert torch.equal(ref[0], got[0]) and torch.equal(ref[1], got[1])


@pytest.mark.parametrize(
    "k,err",
    [(0, ValueError), (13, ValueError), (True, TypeError), (2.5, ValueError), ("3", TypeError), (None, TypeError)],
    ids=["k0", "k>K", "bool", "non-integral", "str", "None"],
)
def test_bad_k(k, err):
    with pytest.raises(err, match="topk_codes.*k"):
        fastvq.topk_codes(torch.randn(3, 4), torch.randn(12, 4), k)


def test_integral_float_k_and_bad_shapes():
    idx, _ = fastvq.topk_codes(torch.randn(3, 4), torch.randn(12, 4), 3.0)
    assert idx.shape == (3, 3)
    with pytest.raises(ValueError, match="topk_codes"):
        fastvq.topk_codes(torch.randn(3, 4), torch.randn(2, 12, 4), 2)  # x not (H, ..., D)
    with pytest.raises(ValueError, match="topk_codes"):
        fastvq.topk_codes(torch.randn(3, 4), torch.randn(12, 5), 2)
    with pytest.raises(ValueError, match="topk_codes.*metric"):
        fastvq.topk_codes(torch.randn(3, 4), torch.randn(12, 4), 2, "l1")
    with pytest.raises(ValueError, match="maximum"):
        fastvq.topk_codes(torch.randn(1, 2), torch.randn(200, 2), 129)


def test_opcheck():
    x, c = randn(2, 6, 5), randn(2, 9, 5)
    for name in ("reference", "triton"):
        with fastvq.backend(name):
            torch.library.opcheck(torch.ops.fastvq.topk_codes.default, (x, c, 3, "cosine", False))


def test_compile_fullgraph(backend):
    x, c = randn(7, 6), randn(10, 6)

    @torch.compile(fullgraph=True, backend="eager")
    def f(x, c):
        return fastvq.topk_codes(x, c, 4, "l2")

    idx, dist = f(x, c)
    _check_topk(x, c, 4, "l2", idx, dist)


@pytest.mark.gpu
@pytest.mark.parametrize("k", [1, 16, 64])
def test_large_gpu(k, device):
    x, c = randn(4096, 128, dtype=torch.bfloat16, device=device), randn(4096, 128, dtype=torch.bfloat16, device=device)
    with fastvq.backend("triton"):
        idx, dist = fastvq.topk_codes(x, c, k)
    with fastvq.backend("reference"):
        ref_idx, ref_dist = fastvq.topk_codes(x, c, k)
    assert ((idx >= 0) & (idx < 4096)).all()
    assert (idx == ref_idx).float().mean() > 0.99
    torch.testing.assert_close(dist, ref_dist, rtol=1e-4, atol=1e-3)


def _check_multiscale(x, c, k, idx, dist):
    """l2 against a float64 oracle, position by position, allowing float32 rounding of the terms
    |x|^2 and |c|^2 of the codes compared (relative, so tiny codes are held to tiny errors)."""
    x64, c64 = x.double().reshape(-1, x.shape[-1]), c.double()
    d = ((x64[:, None, :] - c64[None]) ** 2).sum(-1)
    order = d.sort(1)
    truth, t_idx = order.values[:, :k], order.indices[:, :k]
    chosen = d.gather(1, idx.reshape(-1, k))
    cn = (c64**2).sum(-1)
    mag = (x64**2).sum(-1, keepdim=True) + torch.maximum(cn[idx.reshape(-1, k)], cn[t_idx])
    bad = (chosen - truth).abs() > 1e-5 * mag + 1e-44
    assert not bad.any(), f"not the k nearest, in order: rows {bad.any(1).nonzero().flatten().tolist()[:5]}"
    dist2 = dist.reshape(-1, k)
    assert (dist2[:, 1:] >= dist2[:, :-1]).all(), "distances not increasing"


def test_l2_codes_at_widely_different_scales_reproducer(backend):
    # probe2 Q1: codes 1e4 and 1e-3 overflowed the row's unit (both +inf) and tied by index
    x = torch.tensor([[1e-19]])
    c = torch.tensor([[1e4], [1e-3], [1e-18], [1e-27]])
    for k in (3, 4):
        idx, dist = fastvq.topk_codes(x, c, k)
        assert idx.tolist() == [[3, 2, 1, 0][:k]]
        assert (dist[:, 1:] >= dist[:, :-1]).all()
        _check_multiscale(x, c, k, idx, dist)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("D", [1, 2, 3])
def test_l2_codes_at_widely_different_scales(backend, dtype, D):
    g = generator()
    K, N = 24, 48
    e_c = torch.randint(-120, 121, (K, 1), generator=g, device=g.device).float()
    c = (torch.randn(K, D, generator=g, device=g.device) * torch.exp2(e_c)).to(dtype)
    # rows at the codes' scales, some next to a code
    e_x = torch.randint(-120, 121, (N, 1), generator=g, device=g.device).float()
    x = torch.randn(N, D, generator=g, device=g.device) * torch.exp2(e_x)
    near = torch.randint(0, K, (N // 2,), generator=g, device=g.device)
    x[: N // 2] = c[near].float() * (1 + 1e-2 * torch.randn(N // 2, D, generator=g, device=g.device))
    x = x.to(dtype)
    for k in (5, K):
        idx, dist = fastvq.topk_codes(x, c, k)
        _check_multiscale(x, c, k, idx, dist)


def test_codebooks_beyond_the_kernels_code_range_are_refused(monkeypatch):
    # fuzzF: topk_codes_fwd asserted K < 2^30 (an AssertionError, not a ValueError naming the op);
    # the limit stands in at 8 codes here (2^30 would not fit in memory)
    from fastvq.ops import topk_codes as op

    monkeypatch.setattr(op, "MAX_TRITON_CODES", 8)
    x, c = randn(3, 4, seed=1), randn(8, 4, seed=2)
    with fastvq.backend("triton"), pytest.raises(ValueError, match="topk_codes: a codebook of 8 codes is beyond"):
        fastvq.topk_codes(x, c, 2)
    with fastvq.backend("reference"):
        fastvq.topk_codes(x, c, 2)
    with fastvq.backend("triton"):
        fastvq.topk_codes(x, c[:7], 2)
