"""opsprobe: an independent probe of the public ops (both backends) against float64 computations.

Its two findings, both fixed (each test below failed before its fix):

- P1 (doc mismatch; both backends): ``topk_codes`` promises its distances "in increasing
  distance" (its docstring's example even asserts ``dist[:, 1:] >= dist[:, :-1]``), but it orders
  the codes by their float32 scores ``|c|^2 - 2 x.c`` and then computes each distance directly, so
  near-ties within the score's rounding come out in decreasing order. Rows offset from the origin
  (``randn + 100``, D = 8, codes within 1e-4 of each other) give unsorted distances in every row.
- P2 (wrong answer; both backends, l2 and the scores that share its units): ``sample_code``
  takes the nearest code, without noise, wherever the factor ``a = unit^2 / T`` passes 2^100
  (``fastvq/reference/sample_code.py:90``, ``kernels/nearest_code.py:634``). For rows in the
  middle unit band (``|x|`` from 2^-48 to 2^48) that is an absolute threshold ``T < 2^-100``
  that ignores the data's scale, and in the top band ``T < 2^92``. The docstring says this
  happens only for a "temperature far below float32's resolution of its distances", but
  ``x = 2^-47``, codes ``x (1 + 1e-2)`` and ``x (1 + 1.414e-2)`` (distances 5e-33 and 1e-32,
  float32 resolves them to ~1e-36) at ``T = 5e-33`` should pick code 0 with probability 0.731 and
  pick it always; the same at ``x = 2^50``, ``T = 1.3e26``. Scaled to ``x = 1`` (``T = 1e-4``)
  the same problem samples right, and every other power-of-two scale gives bitwise the same
  draws (seed 0): a scan of ``x = 2^k`` at ``T`` = the near code's distance fails at k = -48,
  -45 (middle band, ``|x| < 2^-44``) and k = 51 (top band, ``|x| < 2^53``) only. The window
  grows as ``T / |x|^2`` shrinks (k = -48..-44 at ``T / |x|^2 = 1e-4``). euclidean, cosine and
  dot scale correctly (their factor passes 2^100 only far below float32's resolution).

P1 fix: the k codes are ordered by the distances returned (a stable sort after the search,
``fastvq.reference.topk_codes.order_by_distance``, both backends). P2 fix: the limit is 2^124,
where the noise's power-of-two factor would leave float32's normal range, not 2^100.

The properties in the passing tests held on everything tried (a few thousand seeded random cases
per op on both backends, outside these tests): nearest_code's numeric contract in all four metrics
(euclidean included) over magnitudes 1e-44..3e38, NaN/inf placements, duplicates and all three
dtypes; topk_codes' order of non-finite codes, uniqueness and top-k set within the rounding
bound up to K = 600 and k = 128; sample_code's distribution (chi-square) per metric and dtype
at unit scale; mine_negatives semi-hard against float64 with the documented margin;
pairwise_sqdist's forward and both gradients within ``fastvq.testing``'s bound at 1e-40..3e38;
code_statistics against float64 sums (weights negative, bool, half, NaN/inf, (N,) weights for L
levels, int32 indices, non-contiguous x, K = 0 with zero weights); rotation_trick's gradient
against the analytic float64 one at 1e-30..1e30; pairwise_kl_loss and its gradient against
float64 autograd; semantic_ids against a dictionary count (int8..int64, strided, L up to 40);
to_bits/to_decimal for every integer dtype; every bad argument tried raised a ValueError or
TypeError naming it; torch.compile(fullgraph=True) of every op matched eager; torch.library.opcheck
of every op.
"""

import math

import pytest
import torch

import fastvq
from fastvq.ops.ema_update import ema_update_
from tests.utils import generator

F32_MAX = torch.finfo(torch.float32).max


# --------------------------------------------------------------------------- findings


def test_p1_topk_distances_are_sorted(backend, device):
    g = generator(0, device)
    x = torch.randn(64, 8, generator=g, device=device) + 100.0
    c = torch.randn(1, 8, generator=g, device=device) + 100.0 + 1e-4 * torch.randn(32, 8, generator=g, device=device)
    _, dist = fastvq.topk_codes(x, c, 8)
    assert bool((dist[:, 1:] >= dist[:, :-1]).all()), "distances decrease within a row"


def _two_code_case(scale: float, device):
    """2,000 copies of the row ``scale`` (D = 1) and codes ``scale (1 + 1e-2)``, ``scale (1 + 1.414e-2)``
    at ``T`` = the first distance: code 0 has probability ``1 / (1 + e^-1)`` = 0.731."""
    x = torch.full((2000, 1), scale, device=device)
    c = (torch.tensor([[1.0 + 1e-2], [1.0 + 1.4142135e-2]], dtype=torch.float64, device=device) * scale).float()
    d = ((x[0].double() - c.double()) ** 2).sum(-1)
    p0 = float(torch.softmax(-d / d[0], 0)[0])
    return x, c, float(d[0]), p0


@pytest.mark.parametrize("scale", [2.0**-48, 2.0**-47, 2.0**-45, 2.0**50, 2.0**51],
                         ids=["band1_-48", "band1_-47", "band1_-45", "band2_50", "band2_51"])
def test_p2_sample_code_l2_small_or_large_scale_still_samples(backend, device, scale):
    x, c, T, p0 = _two_code_case(scale, device)
    idx, _ = fastvq.sample_code(x, c, T, "l2", seed=0)
    freq = float((idx == 0).float().mean())
    sd = math.sqrt(p0 * (1 - p0) / x.shape[0])
    assert abs(freq - p0) < 6 * sd, f"code 0 drawn {freq:.4f} of the time, expected {p0:.4f}"


# --------------------------------------------------------------------------- properties that held


@pytest.mark.parametrize("scale", [1.0, 2.0**-20], ids=["unit", "small_band0"])
def test_sample_code_l2_scaled_control(backend, device, scale):
    """The P2 case where ``a = 1/T`` stays below 2^100: the distribution is right."""
    x, c, T, p0 = _two_code_case(scale, device)
    idx, _ = fastvq.sample_code(x, c, T, "l2", seed=0)
    freq = float((idx == 0).float().mean())
    assert abs(freq - p0) < 6 * math.sqrt(p0 * (1 - p0) / x.shape[0])


@pytest.mark.parametrize("metric", ["l2", "euclidean", "cosine", "dot"])
def test_topk_nonfinite_codes_follow_finite_ones_by_index(backend, device, metric):
    """k above the number of finite codes: the finite codes first, then the others by index; a row
    with an infinite entry lists them all in that order, a NaN row 0..k-1."""
    inf, nan = math.inf, math.nan
    c = torch.tensor([[nan, 0.0], [1.0, 0.0], [inf, 0.0], [2.0, 0.0], [-5.0, 0.0]], device=device)
    x = torch.tensor([[0.5, 0.0], [inf, 0.0], [nan, 0.0], [1e30, 1.0]], device=device)
    idx, dist = fastvq.topk_codes(x, c, 5, metric)
    assert idx[1].tolist() == [1, 3, 4, 0, 2]
    assert idx[2].tolist() == [0, 1, 2, 3, 4] and bool(dist[2].isnan().all())
    assert idx[0, 3:].tolist() == [0, 2] and idx[3, 3:].tolist() == [0, 2]
    assert sorted(idx[0, :3].tolist()) == [1, 3, 4] and sorted(idx[3, :3].tolist()) == [1, 3, 4]


def test_euclidean_distance_is_sqrt_of_l2_near_the_range(backend, device):
    """euclidean (not in the fuzz suite's metrics): |x - c| directly at magnitudes where |x - c|^2
    overflows float32, and +inf only where |x - c| itself does."""
    x = torch.tensor([[1e30, 0.0], [3e38, 0.0], [-3e38, 0.0], [1e-30, 0.0]], device=device)
    c = torch.tensor([[0.0, 0.0], [3e38, 1e30]], device=device)
    idx, dist = fastvq.nearest_code(x, c, "euclidean")
    want_idx = [0, 1, 0, 0]
    assert idx.tolist() == want_idx
    for r, j in enumerate(want_idx):
        exact = (x[r].double() - c[j].double()).norm()
        if exact > F32_MAX:
            assert dist[r] == math.inf
        else:
            assert abs(float(dist[r]) - float(exact)) <= 4e-7 * float(exact)


def test_ema_update_state_stays_finite_at_float32_max(backend, device):
    """EMA state and batch sums at +-float32 max: decay * avg + (1 - decay) * sums never rounds
    past max (seeded over decays outside this test as well)."""
    for decay in (0.1, 0.3, 0.7, 0.99):
        cb = torch.ones(1, 2, 2, device=device)
        cs = torch.ones(1, 2, device=device)
        ea = torch.tensor([[[F32_MAX, -F32_MAX], [F32_MAX, F32_MAX]]], device=device)
        sums = torch.tensor([[[F32_MAX, -F32_MAX], [F32_MAX, F32_MAX]]], device=device)
        ema_update_(cb, cs, ea, torch.ones(1, 2, device=device), sums, decay, 1e-5)
        assert bool(torch.isfinite(ea).all()) and bool(torch.isfinite(cb).all())


def test_opcheck_ops_without_one(device):
    """opcheck of the ops whose own test files have none, on both backends."""
    ops = torch.ops.fastvq
    x, idx = torch.randn(6, 4, device=device), torch.randint(0, 3, (6,), device=device)
    cases = [
        (ops.code_statistics.default, (x, idx, 3, True, None)),
        (ops.code_statistics.default, (torch.randn(2, 6, 4, device=device), torch.randint(0, 3, (2, 6), device=device),
                                       3, False, torch.rand(6, device=device) > 0.5)),
        (ops.code_usage_counts.default, (torch.randint(0, 5, (10,), dtype=torch.int8, device=device), 5, True)),
        (ops.checked_bits.default, (torch.randint(0, 2, (3, 4), device=device), "x")),
        (ops.pairwise_kl_loss.default, (torch.randn(5, 3, device=device, requires_grad=True),
                                        torch.randn(5, 2, device=device), 0.7, None)),
        (ops.rotation_trick_bwd.default, (torch.randn(5, 3, device=device), torch.randn(5, 3, device=device),
                                          torch.randn(5, 3, device=device))),
    ]
    for name in ("reference", "triton"):
        with fastvq.backend(name):
            for op, args in cases:
                torch.library.opcheck(op, args)
