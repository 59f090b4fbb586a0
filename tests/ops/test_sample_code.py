import warnings

import pytest
import torch

import fastvq
import fastvq.testing as ft
from tests.ops.test_search_contract import d64
from tests.utils import count_kernel_launches, generator, randn

METRICS = ["l2", "euclidean", "cosine", "dot"]
CHI2_5DOF_1E4 = 25.74  # P(chi-square with 5 degrees of freedom > 25.74) = 1e-4
TEMPERATURE = {"l2": 2.0, "euclidean": 1.0, "cosine": 0.7, "dot": 0.7}  # every code drawn >= 1% of the time


def _chi2(counts, probs):
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def _one_row_many_times(metric, n=3000, temperature=0.7):
    """One row repeated ``n`` times against 6 codes whose probabilities are far from uniform."""
    c = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.2, 0.0], [0.5, 0.5, 0.3], [-1.0, 0.2, 0.1], [0.3, -0.8, 0.9],
                      [0.9, 0.1, -0.2]])
    x = torch.tensor([[0.75, 0.25, 0.05]]).expand(n, 3)  # no two distances within 0.007
    probs = torch.softmax(-d64(x[:1], c, metric)[0] / temperature, 0)
    return x, c, probs


@pytest.mark.parametrize("metric", METRICS)
def test_distribution_chi_square(backend, metric):
    t = TEMPERATURE[metric]
    x, c, probs = _one_row_many_times(metric, temperature=t)
    assert probs.min() > 0.01 and probs.max() < 0.5  # a real test of the weights
    idx, dist = fastvq.sample_code(x, c, t, metric, seed=2024)
    counts = torch.bincount(idx, minlength=6).double()
    assert _chi2(counts, probs) < CHI2_5DOF_1E4, (counts, probs * len(idx))
    torch.testing.assert_close(dist.double(), d64(x[:1], c, metric)[0][idx], rtol=1e-5, atol=1e-6)


def test_skewed_distribution(backend):
    # l2 distances 0, 0.7, 1.5, 2.5 at temperature 1: p = (0.555, 0.276, 0.124, 0.046); noise that is
    # not Gumbel (e.g. exponential: 0.655, 0.223, 0.091, 0.032) is far outside the bound
    c = torch.tensor([[0.0, 0.0], [0.7, 0.0], [1.5, 0.0], [2.5, 0.0]]).sqrt()
    x = torch.zeros(3000, 2)
    probs = torch.softmax(-torch.tensor([0.0, 0.7, 1.5, 2.5], dtype=torch.float64), 0)
    idx, _ = fastvq.sample_code(x, c, 1.0, seed=77)
    counts = torch.bincount(idx, minlength=4).double()
    assert _chi2(counts, probs) < 21.11, (counts, probs * 3000)  # chi-square, 3 dof, P = 1e-4


def test_temperature_extremes(backend):
    x, c, _ = _one_row_many_times("l2", n=600)
    idx, _ = fastvq.sample_code(x, c, 1e-6, seed=1)  # far below the gaps: the nearest code
    assert (idx == fastvq.nearest_code(x[:1], c)[0]).all()
    idx, _ = fastvq.sample_code(x, c, 1e6, seed=1)  # far above: uniform
    assert _chi2(torch.bincount(idx, minlength=6).double(), torch.full((6,), 1 / 6)) < CHI2_5DOF_1E4
    idx0, d0 = fastvq.sample_code(x, c, 0.0)  # 0: exactly nearest_code, no noise
    ref = fastvq.nearest_code(x, c)
    assert torch.equal(idx0, ref[0]) and torch.equal(d0, ref[1])


def test_seeds_reproduce(backend):
    x, c = randn(64, 8), randn(40, 8)
    a = fastvq.sample_code(x, c, 1.0, seed=7)
    b = fastvq.sample_code(x, c, 1.0, seed=7)
    other = fastvq.sample_code(x, c, 1.0, seed=8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], other[0])
    g1, g2 = generator(5), generator(5)
    assert torch.equal(fastvq.sample_code(x, c, 1.0, generator=g1)[0], fastvq.sample_code(x, c, 1.0, generator=g2)[0])
    torch.manual_seed(11)
    d1 = fastvq.sample_code(x, c, 1.0)[0]
    torch.manual_seed(11)
    assert torch.equal(d1, fastvq.sample_code(x, c, 1.0)[0])
    t = torch.tensor(7)
    assert torch.equal(fastvq.sample_code(x, c, 1.0, seed=t)[0], a[0])


def _assert_same_draws(x, c, temperature, metric, seed, ref, got):
    """The two backends drew the same codes, except in rows where the two picks' perturbed
    scores ``d / T - g`` (float64 distances, the shared float32 noise) are within float32
    rounding of each other: only such near-ties may go either way (taudit F5: 1 % of rows
    allowed to differ let a one-row noise bug through)."""
    from fastvq.reference.sample_code import gumbel

    differ = ref[0] != got[0]
    for h, n in differ.nonzero().tolist():
        g = gumbel(torch.tensor(seed), torch.tensor([n]), c.shape[1], h)[0].double()
        d = d64(x[h, n : n + 1], c[h], metric)[0]
        score = d / temperature - g
        # each distance's sum of |terms| (the dot's terms cancel: |d| understates its rounding)
        terms = ft.distances64(x[h, n : n + 1], c[h], "l2" if metric == "euclidean" else metric)[1][0]
        mag = (terms.sqrt() if metric == "euclidean" else terms) / temperature + g.abs()
        i, j = int(ref[0][h, n]), int(got[0][h, n])
        assert (score[i] - score[j]).abs() <= 2.0**-20 * (mag[i] + mag[j]), (
            f"head {h} row {n}: reference code {i}, triton code {j}, perturbed scores {float(score[i])}, "
            f"{float(score[j])}: not a float32 near-tie")
    same = ~differ
    torch.testing.assert_close(got[1][same], ref[1][same], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("metric", METRICS)
def test_backends_draw_the_same_noise(metric):
    x, c = randn(2, 50, 8), randn(2, 37, 8)
    with fastvq.backend("reference"):
        ref = fastvq.sample_code(x, c, 0.5, metric, seed=99)
    with fastvq.backend("triton"):
        got = fastvq.sample_code(x, c, 0.5, metric, seed=99)
    _assert_same_draws(x, c, 0.5, metric, 99, ref, got)


def test_split_path_and_multi_codebook(monkeypatch):
    import fastvq.kernels.nearest_code as knc

    monkeypatch.setattr(knc, "SPLIT_MIN_CODES", 32)
    x, c = randn(2, 3, 10), randn(2, 300, 10)
    assert knc.num_splits(6, 300, x.device) > 1
    with fastvq.backend("reference"):
        ref = fastvq.sample_code(x, c, 2.0, "cosine", seed=3)
    with fastvq.backend("triton"):
        launched = count_kernel_launches(monkeypatch, knc, "_nearest_code_fwd_kernel", "_nearest_code_reduce_kernel")
        got = fastvq.sample_code(x, c, 2.0, "cosine", seed=3)
    assert launched == ["_nearest_code_fwd_kernel", "_nearest_code_reduce_kernel"]
    assert torch.equal(ref[0], got[0])


def test_nonfinite(backend):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        x, c = randn(300, 4), randn(6, 4)
        c[2, 0] = float("nan")
        c[4, 1] = float("inf")
        x[0, 0] = float("nan")
        x[1, 2] = float("-inf")
        idx, dist = fastvq.sample_code(x, c, 5.0, seed=0)  # hot: every finite code gets drawn
    assert idx[0].item() == 0 and dist[0].isnan()
    assert idx[1].item() == 0 and dist[1].item() == float("inf")
    assert not ((idx[2:] == 2) | (idx[2:] == 4)).any()
    assert set(idx[2:].tolist()) == {0, 1, 3, 5}


@pytest.mark.parametrize(
    "kw,err",
    [({"temperature": -1.0}, ValueError), ({"temperature": float("nan")}, ValueError),
     ({"temperature": float("inf")}, ValueError), ({"temperature": True}, TypeError),
     ({"temperature": "1"}, TypeError), ({"temperature": torch.tensor([1.0, 2.0])}, ValueError),
     ({"temperature": torch.tensor(1)}, TypeError), ({"temperature": torch.tensor(-1.0)}, ValueError),
     ({"temperature": 1.0, "seed": True}, TypeError), ({"temperature": 1.0, "seed": 1.5}, ValueError),
     ({"temperature": 1.0, "seed": 1, "generator": generator(0)}, ValueError),
     ({"temperature": 1.0, "seed": torch.tensor([1, 2])}, TypeError),
     ({"temperature": 1.0, "generator": 3}, TypeError), ({"temperature": 1.0, "metric": "l1"}, ValueError),
     # (meta tensors hold no value: the op ran its shape-only implementation on CPU inputs and
     # returned uninitialised memory, indices far outside [0, K); fuzzB)
     ({"temperature": torch.tensor(1.0, device="meta")}, ValueError),
     ({"temperature": 1.0, "seed": torch.tensor(1, device="meta")}, ValueError),
     # (beyond float32's largest T is +inf in float32: T = 1e39 sampled uniformly; fuzzA)
     ({"temperature": 1e39}, ValueError), ({"temperature": torch.tensor(1e39, dtype=torch.float64)}, ValueError)],
    ids=["negative", "nan", "inf", "bool", "str", "tensor-2", "tensor-int", "tensor-negative", "seed-bool", "seed-float", "seed-and-generator",
         "seed-1d", "generator-int", "metric", "tensor-meta", "seed-meta", "beyond-float32", "tensor-beyond-float32"],
)
def test_bad_input(kw, err):
    with pytest.raises(err, match="sample_code"):
        fastvq.sample_code(torch.randn(3, 4), torch.randn(5, 4), **kw)


def test_opcheck():
    x, c = randn(2, 6, 5), randn(2, 9, 5)
    for name in ("reference", "triton"):
        with fastvq.backend(name):
            torch.library.opcheck(torch.ops.fastvq.sample_code.default, (x, c, torch.tensor(3), 0.5, None, "l2", False))
            torch.library.opcheck(torch.ops.fastvq.sample_code.default,  # (a temperature tensor: read in the op)
                                  (x, c, torch.tensor(3), float("nan"), torch.tensor(0.5), "l2", False))


def test_compile_fullgraph(backend):
    x, c = randn(7, 6), randn(10, 6)

    @torch.compile(fullgraph=True, backend="eager")
    def f(x, c):
        return fastvq.sample_code(x, c, 0.5, "euclidean", seed=4)

    idx, dist = f(x, c)
    assert torch.equal(idx, fastvq.sample_code(x, c, 0.5, "euclidean", seed=4)[0])


@pytest.mark.parametrize("metric", ["dot", "l2"])
def test_tiny_temperature_where_distance_over_temperature_overflows(backend, metric):
    # probe2 Q2: d / T overflowed float32 (both codes at -inf): the tie went to index 0, a code of
    # probability exp(-3e43) = 0; the nearest code is the draw
    if metric == "dot":
        x = torch.tensor([[0.0, 0.0, 1e-20]])
        c = torch.tensor([[0.0, 0.0, 1e33], [0.0, 0.0, 4e33]])
        temps = [1e-30, 1e-25]
    else:  # scores of the row's unit times 1/T near 2^100
        x = torch.tensor([[3e13, 0.0, 0.0]])
        c = torch.tensor([[1e13, 0.0, 0.0], [2e13, 0.0, 0.0]])
        temps = [1e-10, 1e-3]
    for temperature in temps:
        got = [fastvq.sample_code(x, c, temperature, metric, seed=s)[0].item() for s in range(4)]
        assert got == [1] * 4, (temperature, got)
    # random: rows ~1e-21, codes ~1e33 (float64 distances apart by far more than T)
    g = generator()
    xr = torch.randn(16, 3, generator=g, device=g.device) * 1e-21
    cr = torch.randn(6, 3, generator=g, device=g.device) * 1e33
    if metric == "l2":
        xr, cr = xr * 1e34, cr * 1e-20
    want = d64(xr, cr, metric).argmin(1)
    got, _ = fastvq.sample_code(xr, cr, 1e-30, metric, seed=3)
    assert got.tolist() == want.tolist()


def test_temperature_below_float32s_normal_range_samples_softmax(backend):
    # fuzzA: codes +-1e-20 for the row 1e-20 (dot distances -+1e-40) at T = 1e-40 give softmax
    # 0.881 / 0.119; 1 / T overflowed float32 and every row took the nearest code. The factor is
    # now formed from T's mantissa and exponent apart (a number or a float64 tensor alike).
    x = torch.full((1000, 1), 1e-20)
    c = torch.tensor([[1e-20], [-1e-20]])
    want = torch.softmax(-torch.tensor([-1.0, 1.0], dtype=torch.float64) * (1e-40 / 1e-40), 0)[0].item()
    for t in (1e-40, torch.tensor(1e-40, dtype=torch.float64)):
        idx, _ = fastvq.sample_code(x, c, t, "dot", seed=3)
        p0 = (idx == 0).double().mean().item()
        # (5 standard deviations at 1000 draws; every row on the nearest code is 11.6 away)
        assert abs(p0 - want) < 0.05, (t, p0, want)
    # far below the distances' scale it is the nearest code, as softmax's limit is
    idx, _ = fastvq.sample_code(torch.ones(50, 1), torch.tensor([[1.0], [-1.0]]), 1e-300, "dot", seed=3)
    assert (idx == 0).all()


def test_noise_is_finite_where_the_hash_word_is_the_largest(backend, device):
    # mutB F1: u = ((r >> 8) + 0.5) 2^-24 rounds to 1 in float32 for r >> 8 = 2^24 - 1, and the
    # noise -log(-log(u)) was +inf: that code was taken whatever its distance (once in 2^24 draws
    # per row and code; with K = 65536, about one row in 256 of each call). Seed 39075 gives that
    # word for row 0, code 3 (found by a search over seeds with the reference's Philox).
    from fastvq.reference.sample_code import gumbel

    g = gumbel(torch.tensor(39075), torch.zeros(1, dtype=torch.int64), 4, 0)
    assert g.isfinite().all() and g[0, 3] > 16.0, g  # -log(-log(1 - 2^-24)) = 16.6
    x = torch.zeros(1, 1, device=device)
    c = torch.zeros(16, 1, device=device)
    c[3] = 100.0  # softmax probability ~e^-10000
    idx, dist = fastvq.sample_code(x, c, 1.0, "l2", seed=39075)
    assert idx.item() != 3 and dist.item() == 0.0, (idx, dist)


def test_backends_draw_the_same_noise_across_the_references_row_chunks(monkeypatch):
    # mutB B47: the reference (the CPU path) works in row chunks; numbering each chunk's noise
    # rows from 0 drew the same noise every chunk (every 4096 rows at K <= 4096) and survived
    # every test, none of which had more than one chunk. Chunks of 8 rows here.
    monkeypatch.setattr("fastvq.reference._chunks.ROW_CHUNK_ELEMENTS", 8 * 37)
    x, c = randn(2, 50, 8), randn(2, 37, 8)
    with fastvq.backend("reference"):
        ref = fastvq.sample_code(x, c, 0.5, "l2", seed=99)
    with fastvq.backend("triton"):
        got = fastvq.sample_code(x, c, 0.5, "l2", seed=99)
    _assert_same_draws(x, c, 0.5, "l2", 99, ref, got)
