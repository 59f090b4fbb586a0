import pytest
import torch

import fastvq
import fastvq.testing as ft
from fastvq.reference.mine_negatives import mine_negatives_ref
from tests.utils import assert_close, generator, noncontiguous, randn

STRATEGIES = ["hardest", "semi-hard"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

CASES = [  # (N, M, D)
    pytest.param(1, 1, 1, id="N1-M1-D1"),
    pytest.param(5, 7, 2, id="N5-M7-D2"),
    pytest.param(127, 61, 60, id="N127-M61-D60"),
    pytest.param(3, 1000, 8, id="N3-M1000-D8-split"),
    pytest.param(0, 9, 16, id="N0"),
]


def _check(a, p, n, strategy, idx, dist):
    """fastvq.testing's oracle and bounds: float64 squared distances on the inputs as given, each
    with its rounding bound (:func:`fastvq.testing.error_bound` of its sum of ``|terms|``)."""
    N, M = a.shape[0], n.shape[0]
    assert idx.shape == (N,) and dist.shape == (N,)
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert ((idx >= 0) & (idx < M)).all(), "index out of range"
    assert not dist.isnan().any(), "unwritten output element"
    if N == 0:
        return
    precision = ft.search_precision(a.dtype)

    def with_bound(u, v):  # (N, K) float64 squared distances, their |terms| sums and rounding bounds
        d, mag, length = ft.distances64(u, v, "l2")
        return d, mag, ft.error_bound(d, dtype=a.dtype, reduce_len=length, magnitude=mag, precision=precision,
                                      out_dtype=torch.float32)

    d, mag, err = with_bound(a, n)
    pos, _, pos_err = (t.diagonal() for t in with_bound(a, p))  # anchor i to its own positive i
    at = idx[:, None]
    chosen, c_err = d.gather(1, at).squeeze(1), err.gather(1, at).squeeze(1)
    ft.assert_close(dist, chosen, dtype=a.dtype, reduce_len=a.shape[1] + 2, magnitude=mag.gather(1, at).squeeze(1),
                    precision=precision, out_dtype=torch.float32, name="distance at the chosen negative")
    assert (dist >= 0).all()
    if strategy == "hardest":
        ft.assert_argmin_within_bound(a, n, idx, "l2", precision)
        return
    # semi-hard: the nearest negative strictly farther than the positive, else the hardest; a
    # negative within rounding of the positive's distance may count as either side
    slack = err + pos_err[:, None]
    far, near_boundary = d > pos[:, None] + slack, ((d - pos[:, None]).abs() <= slack).any(1)
    any_far = far.any(1)
    t_idx = torch.where(any_far, torch.where(far, d, float("inf")).argmin(1), d.argmin(1))[:, None]
    target, t_err = d.gather(1, t_idx).squeeze(1), err.gather(1, t_idx).squeeze(1)
    assert ((chosen > pos - c_err - pos_err) | ~any_far | near_boundary).all(), "semi-hard pick not farther than the positive"
    chosen = torch.where(near_boundary, target, chosen)
    gap = chosen - target
    assert (gap.abs() <= c_err + t_err).all(), f"wrong negative: max gap {gap.abs().max().item()}"


@pytest.mark.parametrize("N,M,D", CASES)
@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity(backend, N, M, D, strategy, dtype):
    a, n = randn(N, D, dtype=dtype), randn(M, D, dtype=dtype)
    p = (a.float() + 0.8 * randn(N, D)).to(dtype)  # positives nearer than most negatives
    idx, dist = fastvq.mine_negatives(a, p, n, strategy)
    _check(a, p, n, strategy, idx, dist)


def test_semi_hard_is_strict_and_skips_nearer(backend):
    # Integer values: all distances are exact in fp32.
    a = torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    p = torch.tensor([[2.0, 0.0, 0.0], [1.0, 1.0, 1.0]])  # |a-p|^2 = 4 and 0
    n = torch.tensor(
        [
            [0.0, 1.0, 0.0],  # d = 1 (anchor 0: nearer than the positive)
            [0.0, 0.0, 2.0],  # d = 4 == |a-p|^2: not strictly farther
            [0.0, -2.0, 0.0],  # d = 4 again
            [3.0, 0.0, 0.0],  # d = 9
            [0.0, 0.0, -3.0],  # d = 9: tie with index 3
            [1.0, 1.0, 1.0],  # d = 3 for anchor 0, d = 0 for anchor 1 (== |a-p|^2 = 0: excluded)
        ]
    )
    idx, dist = fastvq.mine_negatives(a, p, n, "semi-hard")
    assert idx.tolist() == [3, 0]  # anchor 1: d(n0) = 1 + 0 + 1 = 2 > 0, nearest farther one
    assert dist.tolist() == [9.0, 2.0]
    idx, dist = fastvq.mine_negatives(a, p, n, "hardest")
    assert idx.tolist() == [0, 5]
    assert dist.tolist() == [1.0, 0.0]


def test_semi_hard_never_returns_a_copy_of_the_positive(backend):
    # findings M1: the positive's copy in the pool (the usual in-batch setup) scored "strictly
    # farther" through the search's rounding and was returned at a distance equal to |a - p|^2
    a = torch.tensor([[0.40334683656692505, 0.8380263447761536]])
    p = torch.tensor([[-1.0351684093475342, 0.031339287757873535]])
    n = torch.cat([torch.tensor([[0.34368330240249634, 0.8562300205230713]]), p])
    idx, dist = fastvq.mine_negatives(a, p, n, "semi-hard")
    assert idx.tolist() == [0] and dist[0] < 0.01  # no negative is farther: the hardest


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [2, 5, 32])
def test_semi_hard_pick_is_farther_in_the_returned_distances(backend, dtype, D):
    # a pool of 3 near negatives per anchor and a copy of every positive: the returned distance
    # (computed directly) exceeds |a - p|^2 computed the same way, or the pick is the hardest
    from fastvq.reference.nearest_code import distance

    N = 64
    a = randn(N, D, dtype=dtype, seed=80)
    p = (a.float() + 2.0 * randn(N, D, seed=81)).to(dtype)
    near = (a.float().repeat(3, 1) + 0.5 * randn(3 * N, D, seed=82)).to(dtype)
    n = torch.cat([near, p])
    idx, dist = fastvq.mine_negatives(a, p, n, "semi-hard")
    hard, _ = fastvq.mine_negatives(a, p, n, "hardest")
    positive = distance(a, p, "l2")
    assert ((dist > positive) | (idx == hard)).all()
    _check(a, p, n, "semi-hard", idx, dist)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_semi_hard_overflowing_negative_is_farther(backend, dtype):
    # Fuzz explorer (bf16): an anchor ~1e-10, its positive at ~4e6, negative 1 with a -3e38 entry
    # (distance overflows float32, its score |n|^2 - 2 a.n too): negative 1 is the only one
    # farther than the positive; an overflowed (+inf) score was left out and the hardest,
    # negative 0 (not farther), came back. Row 1 (anchor and the -3e38 entry of the same sign):
    # the score was inf - inf = NaN (|n|^2 = +inf, and the scaled code's b term -2^127 times
    # x'.c' = 7 overflowed to -inf), so negative 1 was left out as if it were not finite.
    dev = randn(1).device
    a = torch.tensor([[1e-10] * 4, [-4.0] * 4], device=dev).to(dtype)
    p = torch.tensor([[1e3] * 4, [-1e3] * 4], device=dev).to(dtype)
    n = torch.tensor([[1e-10, 0.0, 0.0, 0.0], [-3e38, 0.0, 0.0, 0.0]], device=dev).to(dtype)
    idx, dist = fastvq.mine_negatives(a, p, n, "semi-hard")
    assert idx.tolist() == [1, 1] and dist.tolist() == [float("inf")] * 2, (idx, dist)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_semi_hard_tiny_anchor_with_a_far_positive(backend, dtype):
    # Fuzz explorer (fp32): an anchor at 0 (or ~1e-30) among negatives ~1e-30 is searched in the
    # unit 2^-96, where its positive's distance (9) overflows: no negative qualified and the
    # hardest (not farther) came back. The farther negatives are 3 (16) and 2 (25): 3 is the pick.
    dev = randn(1).device
    tiny = randn(2, 6, seed=3, scale=1e-30)
    a = torch.cat([torch.zeros(1, 6, device=dev), tiny[:1]]).to(dtype)
    p = torch.zeros(2, 6, device=dev)
    p[:, 0] = 3.0
    n = torch.cat([randn(2, 6, seed=4, scale=1e-30), torch.zeros(2, 6, device=dev)]).to(dtype)
    n[2, 0], n[3, 0] = 5.0, 4.0
    idx, dist = fastvq.mine_negatives(a, p.to(dtype), n, "semi-hard")
    assert idx.tolist() == [3, 3] and dist.tolist() == [16.0, 16.0], (idx, dist)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_semi_hard_margin_is_the_rounding_bound(backend, dtype):
    # Fuzz explorer (bf16, |a| >> |p|, |n|): negative 1 is farther than the positive by
    # 2^65 = 2^-15 |a|^2, beyond the rounding bound of the comparison (~2 (D + 8) 2^-22 |a|^2 at
    # D = 16: 2^-16.4 |a|^2) but within the former margin (D + 4) 2^-19 (|a|^2 + |a - p|^2)
    # = 2^-13.7 |a|^2, which passed it over for the farther negative 2. Every value and every
    # float32 operation here is exact.
    dev = randn(1).device
    s, q, u = 2.0**40, 2.0**30, 2.0**32
    z = [0.0] * 13
    a = torch.tensor([[s, 0.0, 0.0] + z], device=dev).to(dtype)
    p = torch.tensor([[0.0, q, 0.0] + z], device=dev).to(dtype)  # |a - p|^2 = s^2 + q^2
    n = torch.tensor([[s, 0.0, 0.0] + z,  # distance 0: nearer, the hardest
                      [0.0, q, u, u] + z[1:],  # s^2 + q^2 + 2^65: farther, the nearest such
                      [0.0, 0.0, 2.0**39, 0.0] + z[1:]], device=dev).to(dtype)  # s^2 + 2^78
    idx, dist = fastvq.mine_negatives(a, p, n, "semi-hard")
    assert idx.tolist() == [1], (idx, dist)
    assert dist.tolist() == [s * s + q * q + 2.0**65]


def test_semi_hard_falls_back_to_hardest(backend):
    a, n = randn(20, 16), randn(50, 16)
    p = a + 100.0  # the positive is farther than every negative
    hard = fastvq.mine_negatives(a, p, n, "hardest")
    semi = fastvq.mine_negatives(a, p, n, "semi-hard")
    assert torch.equal(semi[0], hard[0])
    assert torch.equal(semi[1], hard[1])
    _check(a, p, n, "semi-hard", *semi)
    # mixed: half the anchors have a positive beyond every negative, half at themselves
    p2 = torch.where(torch.arange(20)[:, None] % 2 == 0, a + 100.0, a)
    idx, dist = fastvq.mine_negatives(a, p2, n, "semi-hard")
    assert torch.equal(idx[0::2], hard[0][0::2])
    _check(a, p2, n, "semi-hard", idx, dist)


def test_exact_ties_pick_smallest_index(backend):
    # Integer values: distances are exact in fp32, so the duplicates tie exactly.
    g = generator(0)
    a = torch.randint(-4, 5, (4, 10), generator=g).float()
    n = (a[0] + 50.0).repeat(150, 1)  # far from anchor 0 (other anchors: whatever)
    n[0] = a[0]  # d = 0: the hardest, nearer than the positive
    n[[120, 41, 9]] = a[0] + 1.0  # d = 10, three identical negatives in different 32-code tiles
    p = a + 0.5
    p[0] = a[0] + torch.tensor([1.0, 1, 1, 0, 0, 0, 0, 0, 0, 0])  # |a-p|^2 = 3
    assert fastvq.mine_negatives(a, p, n, "hardest")[0][0].item() == 0
    assert fastvq.mine_negatives(a, p, n, "semi-hard")[0][0].item() == 9
    n[0] = a[0] + 50.0
    idx, dist = fastvq.mine_negatives(a, p, n, "hardest")
    assert idx[0].item() == 9 and dist[0].item() == 10.0


def test_split_path(backend, monkeypatch, device):
    import fastvq.kernels.nearest_code as knc

    monkeypatch.setattr(knc, "SPLIT_MIN_CODES", 32)
    a, n = randn(3, 12), randn(500, 12)
    p = a + 0.5 * randn(3, 12)
    assert knc.num_splits(3, 500, torch.device(device)) > 2
    for strategy in STRATEGIES:
        idx, dist = fastvq.mine_negatives(a, p, n, strategy)
        _check(a, p, n, strategy, idx, dist)


def test_noncontiguous_and_mixed_dtypes(backend):
    a, p, n = randn(10, 8), randn(10, 8), randn(30, 8)
    for strategy in STRATEGIES:
        idx, dist = fastvq.mine_negatives(noncontiguous(a), p.T.contiguous().T, noncontiguous(n), strategy)
        _check(a, p, n, strategy, idx, dist)
        idx2, _ = fastvq.mine_negatives(a.bfloat16(), p, n.half(), strategy)  # promoted to float32
        _check(a.bfloat16().float(), p, n.half().float(), strategy, idx2, _)


def test_backends_agree_exactly_on_integer_data():
    g = generator(1)
    a, p, n = (torch.randint(-3, 4, s, generator=g).float() for s in ((40, 6), (40, 6), (200, 6)))
    for strategy in STRATEGIES:
        with fastvq.backend("reference"):
            ref = fastvq.mine_negatives(a, p, n, strategy)
        with fastvq.backend("triton"):
            got = fastvq.mine_negatives(a, p, n, strategy)
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


def test_nan_inputs_keep_indices_in_range(backend):
    a, p, n = randn(5, 8), randn(5, 8), randn(20, 8)
    a[1] = float("nan")
    p[2] = float("nan")
    n[3] = float("nan")
    for strategy in STRATEGIES:
        idx, _ = fastvq.mine_negatives(a, p, n, strategy)
        assert ((idx >= 0) & (idx < 20)).all() and (idx != 3).all()


def test_requires_grad_inputs_give_outputs_without_grad(backend):
    a, p, n = (randn(4, 3).requires_grad_() for _ in range(3))
    idx, dist = fastvq.mine_negatives(a, p, n, "semi-hard")
    assert not idx.requires_grad and not dist.requires_grad


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_triton_backend_really_launches_the_kernel(monkeypatch, strategy):
    import fastvq.kernels.nearest_code as knc

    calls = []
    real = knc.mine_negatives_fwd
    monkeypatch.setattr(knc, "mine_negatives_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    a, p, n = randn(6, 5), randn(6, 5), randn(40, 5)
    with fastvq.backend("reference"):
        fastvq.mine_negatives(a, p, n, strategy)
    assert calls == []
    with fastvq.backend("triton"):
        idx, dist = fastvq.mine_negatives(a, p, n, strategy)
    assert calls == [1]
    _check(a, p, n, strategy, idx, dist)


def test_zero_feature_dim(backend):
    a, n = torch.empty(3, 0), torch.empty(5, 0)
    for strategy in STRATEGIES:  # every distance is 0: not farther than the positive -> hardest, index 0
        idx, dist = fastvq.mine_negatives(a, a, n, strategy)
        assert idx.tolist() == [0, 0, 0] and dist.tolist() == [0.0, 0.0, 0.0]


def test_reference_matches_nearest_code_for_hardest():
    a, n = randn(30, 9), randn(70, 9)
    idx, dist = mine_negatives_ref(a, randn(30, 9), n, "hardest")
    with fastvq.backend("reference"):
        ref = fastvq.nearest_code(a, n)
    assert torch.equal(idx, ref[0]) and torch.equal(dist, ref[1])


@pytest.mark.parametrize(
    "a,p,n,kw,err",
    [
        (torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 3), {}, ValueError),
        (torch.randn(3, 4), torch.randn(2, 4), torch.randn(5, 4), {}, ValueError),
        (torch.randn(3, 4), torch.randn(3, 4), torch.randn(0, 4), {}, ValueError),
        (torch.randn(3, 4), torch.randn(3, 4), torch.randn(4), {}, ValueError),
        (torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(5, 4), {}, ValueError),
        (torch.randint(0, 3, (3, 4)), torch.randn(3, 4), torch.randn(5, 4), {}, TypeError),
        (torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4), {}, TypeError),
        (torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 4), {"strategy": None}, TypeError),
        (torch.randn(3, 4), torch.randn(3, 4), torch.randint(0, 3, (5, 4)), {}, TypeError),
        (torch.randn(3, 4), torch.randn(3, 4, device="meta"), torch.randn(5, 4), {}, ValueError),
        (torch.randn(3, 4), torch.randn(3, 4), torch.randn(5, 4), {"strategy": "easy"}, ValueError),
        ([[1.0]], torch.randn(1, 1), torch.randn(5, 1), {}, TypeError),
    ],
    ids=["D-mismatch", "positive-shape", "M0", "negatives-1D", "anchor-3D", "int-anchor", "float64-positive",
         "strategy-None", "int-negatives",
         "devices-differ", "unknown-strategy", "not-tensor"],
)
def test_bad_input(a, p, n, kw, err):
    with pytest.raises(err, match="mine_negatives"):
        fastvq.mine_negatives(a, p, n, **kw)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_opcheck(strategy):
    a, p, n = randn(6, 5), randn(6, 5), randn(9, 5)
    for name in ("reference", "triton"):
        with fastvq.backend(name):
            torch.library.opcheck(torch.ops.fastvq.mine_negatives.default, (a, p, n, strategy))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_large_gpu(dtype, strategy):
    N, M, D = 65536, 4096, 256
    a, n = randn(N, D, dtype=dtype), randn(M, D, dtype=dtype)
    p = (a.float() + randn(N, D)).to(dtype)
    with fastvq.backend("triton"):
        idx, dist = fastvq.mine_negatives(a, p, n, strategy)
    with fastvq.backend("reference"):
        ref_idx, ref_dist = fastvq.mine_negatives(a, p, n, strategy)
    assert ((idx >= 0) & (idx < M)).all()
    chosen = ((a.double() - n.double()[idx]) ** 2).sum(-1)
    assert_close(dist, chosen, torch.float32, reduce_len=D * 100)
    assert_close(dist, ref_dist, torch.float32, reduce_len=D * 100)
    assert (idx == ref_idx).float().mean() > 0.999
