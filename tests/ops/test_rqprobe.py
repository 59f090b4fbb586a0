"""rqprobe: ``residual_quantize_step`` (weights, given codes, both gradient modes, statistics,
candidates), ``code_statistics``, ``ema_update_``, ``rotation_trick`` and ``qr_lookup`` probed on
both backends against float64 computations written here (not the reference's).

Its two findings, both fixed (each test failed before its fix):

- R1 (bad error, both backends): ``residual_quantize_step(statistics=)`` and
  ``code_statistics(deterministic=, return_skipped=)`` test ``isinstance(flag, bool)``, so a NumPy
  bool (``np.bool_(True)``, e.g. from a config array) is refused with the self-contradictory
  ``TypeError: ... statistics must be a bool, got bool``, while ``qr_lookup(deterministic=,
  sparse=)`` goes through ``fastvq._checks.check_bool_arg``, which accepts NumPy bools by design.
- R2 (doc mismatch): ``residual_quantize_step``'s docstring (``weights``) says a positive weight
  more than 2^149 below the largest "counts as 2^-149 of the largest ..., in the losses and the
  statistics alike", but the statistics carry the weight as given (f2probe S2's fix; the README's
  "Known limits" says so): weights ``[1e38, 1e-8]`` give ``counts[0, 1] = 1e-8``, not
  ``1e38 * 2^-149 = 1.4e-7``. The behaviour is the README's; the docstring is stale.

Fixes: every flag goes through ``check_bool_arg`` (also ``allow_tf32`` of the search ops, which
had the same check); the docstring says the statistics carry the weights as given.

The tests after them keep properties that held (see the report for what was tried).
"""

import math

import numpy as np
import pytest
import torch

import fastvq
import fastvq.testing as ft
from fastvq.ops.ema_update import ema_update_
from fastvq.reference.rotation_trick import rotation_trick_ref
from tests.utils import backend_cells, raises_invalid, randn

F32_MAX = torch.finfo(torch.float32).max


# --------------------------------------------------------------------------- findings


def test_r1_step_statistics_accepts_a_numpy_bool(backend, device):
    x, cb = randn(4, 3, device=device), randn(2, 5, 3, device=device)
    out = fastvq.residual_quantize_step(x, cb, statistics=np.bool_(True))
    assert out.counts.shape == (2, 5)


@pytest.mark.parametrize("flag", ["deterministic", "return_skipped"])
def test_r1_code_statistics_accepts_a_numpy_bool(backend, device, flag):
    x = randn(4, 3, device=device)
    idx = torch.tensor([0, 1, 1, 0], device=device)
    out = fastvq.code_statistics(x, idx, 2, **{flag: np.bool_(True)})
    assert out[0].tolist() == [2.0, 2.0]


@pytest.mark.parametrize("op", ["nearest_code", "topk_codes", "sample_code"])
def test_r1_search_allow_tf32_accepts_a_numpy_bool(backend, device, op):
    x, cb = randn(4, 3, device=device), randn(5, 3, device=device)
    extra = {"topk_codes": (2,), "sample_code": (0.5,)}.get(op, ())
    kw = {"seed": 0} if op == "sample_code" else {}
    idx = getattr(fastvq, op)(x, cb, *extra, allow_tf32=np.bool_(False), **kw)[0]
    assert torch.equal(idx, getattr(fastvq, op)(x, cb, *extra, allow_tf32=False, **kw)[0])
    with pytest.raises(TypeError, match="allow_tf32 must be True or False"):
        getattr(fastvq, op)(x, cb, *extra, allow_tf32=1, **kw)


def test_r1_qr_lookup_accepts_a_numpy_bool(backend, device):
    """The behaviour R1 asks the other flags to share (held)."""
    q, r = randn(3, 2, device=device), randn(4, 2, device=device)
    ids = torch.tensor([1, 2], device=device)
    assert fastvq.qr_lookup(ids, q, r, deterministic=np.bool_(False)).shape == (2, 2)


def test_r2_tiny_weight_statistics_match_the_docstring(backend, device):
    x = torch.tensor([[0.0], [5.0]], device=device)
    cb = torch.tensor([[[0.0], [5.0]]], device=device)
    out = fastvq.residual_quantize_step(x, cb, weights=torch.tensor([1e38, 1e-8], device=device), statistics=True)
    # the behaviour (held): the statistics carry 1e-8 as given, as the README's Known limits say
    assert out.counts[0, 1].item() == torch.tensor(1e-8).item()
    # the docstring's claim, which this contradicts
    assert "in the losses and the statistics alike" not in fastvq.residual_quantize_step.__doc__


# --------------------------------------------------------------------------- properties that held


def _step64(x, cb, codes, w, grad, gq, a, b):
    """float64 (quantized, loss, dx, dcb) of the step's contract: commitment = embedding =
    sum_l sum_i w_i |r_{i,l+1}|^2 / (D W); rows of weight 0 pass x through."""
    N, D = x.shape
    L = cb.shape[0]
    ww = torch.ones(N, dtype=torch.float64, device=x.device) if w is None else w.double()
    live = ww != 0
    x64 = x.detach().double().requires_grad_()
    cb64 = cb.detach().double().requires_grad_()
    codes = codes
    xm = torch.where(live[:, None], x64, 0.0)
    rr, com, emb = xm, 0.0, 0.0
    for lvl in range(L):
        c = torch.where(live[:, None], cb64[lvl][codes[:, lvl]], 0.0)
        com = com + (ww[:, None] * (rr - c.detach()) ** 2).sum()
        emb = emb + (ww[:, None] * (rr.detach() - c) ** 2).sum()
        rr = rr - c.detach()
    W = ww.sum()
    sc = 1.0 / (D * W) if W > 0 else 0.0
    qs = sum(cb64[lvl][codes[:, lvl]] for lvl in range(L)).detach()
    qsm = torch.where(live[:, None], qs, 0.0)
    qq = xm + (qsm - xm).detach() if grad == "ste" else rotation_trick_ref(xm, qsm)
    qq = torch.where(live[:, None], qq, x64)
    ((qq * gq.double()).sum() + a * com * sc + b * emb * sc).backward()
    q_val = torch.where(live[:, None], qs, x64.detach())
    return q_val, (com * sc).detach(), x64.grad, cb64.grad


@pytest.mark.parametrize("grad", ["ste", "rotation"])
@pytest.mark.parametrize("wkind", [None, "float", "bool"])
def test_step_losses_and_gradients_match_float64(backend, device, grad, wkind):
    """Codes within the rounding bound of the greedy argmin, quantized, both losses and both
    gradients against float64 autograd of the docstring's formula (weights with zeros)."""
    N, D, L, K = 17, 8, 3, 7
    x = randn(N, D, device=device, seed=11, requires_grad=True)
    cb = randn(L, K, D, device=device, seed=12, scale=0.5, requires_grad=True)
    w = None
    if wkind == "float":
        w = randn(N, device=device, seed=3).abs() * 2
        w[::4] = 0
    elif wkind == "bool":
        w = (torch.arange(N) % 3 != 0).to(device)
    out = fastvq.residual_quantize_step(x, cb, weights=w, grad=grad)
    r = x.detach().float()
    for lvl in range(L):
        ft.assert_argmin_within_bound(r, cb[lvl].detach(), out.codes[:, lvl], "l2", ft.search_precision(cb.dtype))
        r = r - cb[lvl].detach()[out.codes[:, lvl]]
    gq = randn(N, D, device=device, seed=13)
    a, b = 0.5, 2.0  # exact in every dtype: the losses' upstream gradients are not rounded
    ((out.quantized * gq).sum() + a * out.commitment_loss + b * out.embedding_loss).backward()
    q64, loss64, dx64, dcb64 = _step64(x, cb, out.codes, w, grad, gq, a, b)
    ft.assert_close(out.quantized, q64, dtype=torch.float32, reduce_len=L)
    ft.assert_close(out.commitment_loss, loss64, dtype=torch.float32, reduce_len=N * L * D)
    ft.assert_close(out.embedding_loss, loss64, dtype=torch.float32, reduce_len=N * L * D)
    # a rotated gradient's element carries the rounding of its row (|R^T g| = |g|): row magnitudes
    ft.assert_close(x.grad, dx64, dtype=torch.float32, reduce_len=L * D + 8,
                    magnitude=dx64.norm(dim=-1, keepdim=True) * 4)
    ft.assert_close(cb.grad, dcb64, dtype=torch.float32, reduce_len=N + 2, magnitude=dcb64.abs().amax())


def test_step_given_codes_near_the_float32_range(backend, device):
    """Given codes that take x ~ +-3e38 past the float32 range on the way (held rows): quantized,
    the loss and its input gradient stay right (float64), the statistics leave the held rows out."""
    x = torch.tensor([[3e38, 1.0], [-3e38, 2e38], [1.0, -1.0]], device=device, requires_grad=True)
    cb = torch.tensor([[[-3e38, 0.0], [1.0, 1.0]], [[3e38, -3e38], [0.0, 0.0]]], device=device)
    codes = torch.tensor([[0, 0], [1, 1], [1, 1]], device=device)
    out = fastvq.residual_quantize_step(x, cb, codes=codes, statistics=True)
    out.commitment_loss.backward()
    q64, loss64, dx64, _ = _step64(x, cb, codes, None, "ste", torch.zeros(3, 2, device=device), 0.0, 1.0)
    ft.assert_close(out.quantized, q64, dtype=torch.float32, reduce_len=2)
    x64 = x.detach().double()
    r1 = x64 - cb.double()[0][codes[:, 0]]
    r2 = r1 - cb.double()[1][codes[:, 1]]
    exact = ((r1 ** 2).sum() + (r2 ** 2).sum()) / 6
    ft.assert_close(out.commitment_loss, exact, dtype=torch.float32, reduce_len=12)
    dx = (2 * (r1 + r2) / 6)
    ft.assert_close(x.grad, dx, dtype=torch.float32, reduce_len=8, magnitude=dx.abs() * 4)
    # row 0's level-1 residual 6e38 is beyond float32: left out of level 1's statistics
    assert out.skipped.tolist() == [0, 1]
    assert out.counts.tolist() == [[1.0, 2.0], [0.0, 2.0]]


def test_ema_update_state_stays_finite_at_the_float32_range(backend, device):
    """embed_avg and sums at +-max, every decay from 0 to 1: the convex combination stays finite."""
    for decay in (0.0, 0.1, 0.3, 0.5, 0.7, 0.99, 1.0):
        for sign in (1.0, -1.0):
            cb = torch.zeros(1, 2, 1, device=device)
            cs = torch.ones(1, 2, device=device)
            ea = torch.full((1, 2, 1), sign * F32_MAX, device=device)
            ema_update_(cb, cs, ea, torch.ones(1, 2, device=device), torch.full((1, 2, 1), sign * F32_MAX, device=device),
                        decay, 1e-5)
            assert ea.isfinite().all() and cb.isfinite().all() and cs.isfinite().all(), decay


def test_rotation_trick_gradient_matches_float64_across_magnitudes(backend, device):
    """Rows 1e-30 .. 1e30 (e and q independently), antiparallel and parallel rows: the gradient
    against the paper's formula in float64 (straight through below EPS_NORM / EPS_ANTIPODAL)."""
    mags = torch.tensor([1e-30, 1e-5, 1.0, 1e10, 1e30, 1.0, 2.0, 1e20], dtype=torch.float64, device=device)
    e = randn(8, 7, dtype=torch.float64, device=device, seed=51) * mags[:, None]
    q = randn(8, 7, dtype=torch.float64, device=device, seed=52) * mags.flip(0)[:, None]
    q[5] = -3 * e[5]
    q[6] = 0.5 * e[6]
    gr = randn(8, 7, dtype=torch.float64, device=device, seed=53)
    e, q, gr = e.float(), q.float(), gr.float()
    ee = e.clone().requires_grad_()
    out = fastvq.rotation_trick(ee, q)
    out.backward(gr)
    assert torch.equal(out.detach(), q)
    e64, q64, g64 = e.double(), q.double(), gr.double()
    ne, nq = e64.norm(dim=-1, keepdim=True), q64.norm(dim=-1, keepdim=True)
    eh, qh = e64 / ne, q64 / nq
    s = eh + qh
    ns = s.norm(dim=-1, keepdim=True)
    w = s / ns
    rot = (nq / ne) * (g64 - 2 * (g64 * w).sum(-1, keepdim=True) * w + 2 * (g64 * qh).sum(-1, keepdim=True) * eh)
    ste = (ne < 1e-6) | (nq < 1e-6) | (ns < 1e-3)
    exp = torch.where(ste, g64, rot)
    mag = (nq / ne) * g64.norm(dim=-1, keepdim=True) * 4 + g64.abs()
    ft.assert_close(ee.grad, exp, dtype=torch.float32, reduce_len=3 * 7 + 8, magnitude=mag)


@pytest.mark.parametrize("kind", ["offsets[0] != 0", "decreasing", "past the end", "2-D", "float"])
def test_qr_lookup_bad_offsets_name_the_argument(backend, device, kind):
    q, r = randn(3, 2, device=device), randn(4, 2, device=device)
    ids = torch.tensor([1, 5, -7, 100], device=device)
    offs = {"offsets[0] != 0": [1, 2], "decreasing": [0, 3, 2], "past the end": [0, 5], "2-D": [[0]],
            "float": [0.0]}[kind]
    if kind in ("2-D", "float"):  # checked on the host
        with pytest.raises(TypeError if kind == "float" else ValueError, match="offsets"):
            fastvq.qr_lookup(ids, q, r, offsets=torch.tensor(offs, device=device))
        return
    with raises_invalid("offsets"):  # the values: on the device
        fastvq.qr_lookup(ids, q, r, offsets=torch.tensor(offs, device=device))


@pytest.mark.parametrize("pattern", ["alternating", "same sign"])
def test_twenty_levels_of_codes_near_the_float32_range(backend, device, pattern):
    """K = 1, L = 20 codes of +-3e38 or -1.7e38 (residuals up to ~3.4e39, held at scale 2^-5):
    quantized, the loss, its input gradient and the skipped counts against float64."""
    L = 20
    vals = [(-3e38 if lvl % 2 == 0 else 3e38) if pattern == "alternating" else -1.7e38 for lvl in range(L)]
    cb = torch.tensor(vals, device=device).reshape(L, 1, 1)
    x = torch.tensor([[3e38], [1.0], [-3e38]], device=device, requires_grad=True)
    out = fastvq.residual_quantize_step(x, cb, statistics=True)
    out.commitment_loss.backward()
    limit = F32_MAX + 2.0**103  # from here on a float32 residual is +-inf: held, left out
    r, tot, rs, skipped = x.detach().double(), 0.0, [], []
    for lvl in range(L):
        skipped.append(int((r.abs() >= limit).sum()))
        r = r - cb[lvl].double()[out.codes[:, lvl]]
        tot = tot + (r ** 2).sum()
        rs.append(r)
    q64 = cb.double().sum(0).expand(3, 1)
    ft.assert_close(out.quantized, q64, dtype=torch.float32, reduce_len=L, magnitude=cb.double().abs().sum(0))
    ft.assert_close(out.commitment_loss, tot / 3, dtype=torch.float32, reduce_len=3 * L)
    ft.assert_close(x.grad, 2 * sum(rs) / 3, dtype=torch.float32, reduce_len=L + 4,
                    magnitude=2 * sum(t.abs() for t in rs) / 3)
    assert out.skipped.tolist() == skipped


@pytest.mark.parametrize("grad", ["ste", "rotation"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 3e38])
def test_padding_rows_holding_anything_change_nothing(backend, device, grad, bad):
    """A row of weight 0 holding NaN/inf/3e38: quantized is its input, its gradient is the
    upstream one exactly, and every loss, gradient and statistic stays finite and unskipped."""
    x0 = randn(4, 4, device=device, seed=21)
    x0[1, 0], x0[1, 1] = bad, -3e38
    x, cb = x0.clone().requires_grad_(), randn(2, 3, 4, device=device, seed=22, requires_grad=True)
    g = randn(4, 4, device=device, seed=23)
    w = torch.tensor([1.0, 0.0, 2.0, 0.5], device=device)
    out = fastvq.residual_quantize_step(x, cb, weights=w, grad=grad, statistics=True,
                                        candidate_rows=torch.tensor([1, 0], device=device))
    ((out.quantized * g).sum() + out.commitment_loss + out.embedding_loss).backward()
    assert torch.equal(out.quantized[1].isnan(), x0[1].isnan())
    assert torch.equal(out.quantized[1].nan_to_num(), x0[1].nan_to_num())
    assert torch.equal(x.grad[1], g[1])
    assert x.grad[[0, 2, 3]].isfinite().all() and cb.grad.isfinite().all()
    assert out.commitment_loss.isfinite() and out.skipped.tolist() == [0, 0]
    assert out.counts.isfinite().all() and out.sums.isfinite().all()
    assert out.candidates_ok[:, 0].tolist() == [False, False]


@pytest.mark.parametrize("order", [[0, 1, 2], [1, 0, 2]], ids=["max-first", "max-second"])
def test_statistics_and_codebook_gradient_that_stay_at_max_where_the_exact_sum_overflows(backend, device, order):
    """One code (K = 1, D = 1, value 0). Statistics: rows max, 2^102, 2^102 sum in float32 to max
    (each 2^102 a quarter ulp of max) where the exact sum, the overflow midpoint, rounds to +inf;
    the fix-up redid only a float32 sum that was not finite, so the Triton kernel gave max.
    Codebook gradient: rows max, max, 2^103, 2^103 (terms -max / 2, -max / 2, -2^102, -2^102):
    -max, exact -inf. Now a float32 sum in float32's top binade is summed again too."""
    terms = [F32_MAX, 2.0**102, 2.0**102]
    x = torch.tensor([terms[i] for i in order], device=device)[:, None]
    out = fastvq.residual_quantize_step(x, torch.zeros(1, 1, 1, device=device), statistics=True)
    assert out.sums.item() == math.inf, out.sums
    rows = [F32_MAX, 2.0**103, F32_MAX, 2.0**103]
    x = torch.tensor([rows[i] for i in order + [3]], device=device)[:, None]
    cb = torch.zeros(1, 1, 1, device=device, requires_grad=True)
    fastvq.residual_quantize_step(x, cb).embedding_loss.backward()
    assert cb.grad.item() == -math.inf, cb.grad


@backend_cells("chunked", {"register": False}, {"chunked": True})
@pytest.mark.parametrize("search", [True, False], ids=["search", "codes"])
@pytest.mark.parametrize("weights, want", [
    ([F32_MAX, 2.0**102, 2.0**102], math.inf),  # the overflow midpoint: +inf
    ([2.0**127, 2.0**103, 2.0**103], 2.0**127 + 2.0**104),  # each 2^103 half an ulp: 2^127 in float32
    ([2.0**103, 2.0**103, 2.0**127], 2.0**127 + 2.0**104),
], ids=["midpoint", "ties-after", "ties-first"])
def test_statistics_counts_of_huge_weights_round_once(backend, device, chunked, weights, want, search):
    """fuzzW W1: the counts (sums of the rows' weights) were float32 atomics that no fix-up
    looked at: weights max, 2^102, 2^102 counted max (exact: the overflow midpoint, +inf), and
    2^127, 2^103, 2^103 counted 2^127 (exact 2^127 + 2^104, a float32 value), in row order. The
    residuals are 0 here, so no sum term raised the fix-up's flag either: a weight beyond the
    flag's bound now does, and a count in float32's top binade is summed again too. Both forward
    variants (``chunked``: the kernel's D-chunked one, forced)."""
    from fastvq.kernels.residual_quantize import residual_quantize_fwd

    x = torch.zeros(3, 1, device=device)
    cb = torch.zeros(1, 2, 1, device=device)
    w = torch.tensor(weights, device=device)
    codes = None if search else torch.zeros(3, 1, dtype=torch.long, device=device)
    if chunked:
        out = residual_quantize_fwd(x, cb, max_register_d=1, weights=w, codes=codes, stats=True)
        counts, sums, skipped = out["counts"], out["sums"], out["skipped"]
    else:
        out = fastvq.residual_quantize_step(x, cb, codes=codes, weights=w, statistics=True)
        counts, sums, skipped = out.counts, out.sums, out.skipped
    assert counts[0].tolist() == [want, 0.0], counts
    assert sums.tolist() == [[[0.0], [0.0]]] and skipped.tolist() == [0]


@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=[pytest.mark.xfail(
    strict=True, raises=AssertionError, reason="README Known limits: the residual kernels' statistics are float32 "
    "atomics below float32's top binade (a count of rows of weight 1 stops at 2^24)"), pytest.mark.skipif(
    torch.cuda.is_available(), reason="a GPU's atomics add in any order (1 + 1 first is exact); the interpreter's "
    "in row order")])], indirect=True)
def test_statistics_counts_beyond_float32s_integers(backend, device):
    x = torch.zeros(3, 1, device=device)
    w = torch.tensor([2.0**24, 1.0, 1.0], device=device)
    out = fastvq.residual_quantize_step(x, torch.zeros(1, 2, 1, device=device), weights=w, statistics=True)
    assert out.counts[0].tolist() == [2.0**24 + 2, 0.0], out.counts
