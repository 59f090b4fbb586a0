"""Mutation round I (kernels/qr_lookup.py: the redo triggers and thresholds left from round H):
one test per surviving mutant, each naming it.

Each test passes on the real code and fails with its mutant applied (the round's verify_kills.py)."""

import math
from fractions import Fraction

import pytest
import torch

import fastvq

# "mult": q * r = 1.25 (1 + 2^-23) 2^-127 underflows to a float32 subnormal, rounded up to
# (1.25 + 2^-22) 2^-127 (+0.375 of its ulp 2^-149). Times 2 that error is 0.75 ulp of the normal
# result: the float32 path gives (1.25 + 2^-22) 2^-126, the exact 2 q r = (1.25 + 1.25 2^-23)
# 2^-126 rounds to (1.25 + 2^-23) 2^-126. Only the float64 redo gets it right.
_Q, _R = 1.25 * 2.0**-53, (1 + 2.0**-23) * 2.0**-74


def _exact_qrw(w):
    """float32 of the exact ``q r w`` (a product of three float32 values is exact in float64)."""
    return (torch.tensor(_Q, dtype=torch.float64) * _R * w).float().item()


def _one_item(device):
    return torch.zeros(1, dtype=torch.long, device=device), torch.zeros(1, dtype=torch.long, device=device)


@pytest.mark.parametrize("path", ["forward", "sorted", "atomic", "weight-grad"])
def test_qr_weight_of_2_on_an_underflowed_product_is_summed_in_float64(backend, device, path):
    """H69 (qr_lookup BIG_W = 1 -> 2): a weight (or, for the weight's gradient, an upstream
    gradient) of 2 on a "mult" product that underflowed multiplies its rounding error past half
    an ulp of the result: every path must redo in float64 (any factor above 1 does). One bag of
    one item; the result is the single term q r w rounded once."""
    ids, offs = _one_item(device)
    want = _exact_qrw(2.0)
    assert want != (torch.tensor(_Q) * torch.tensor(_R) * 2.0).item()  # (the float32 product is off)
    if path == "forward":
        q, r = torch.tensor([[_Q]], device=device), torch.tensor([[_R]], device=device)
        got = fastvq.qr_lookup(ids, q, r, "mult", offsets=offs,
                               per_sample_weights=torch.tensor([2.0], device=device)).item()
    elif path in ("sorted", "atomic"):  # q's gradient g r w with g = _Q
        q = torch.ones(1, 1, device=device, requires_grad=True)
        r = torch.tensor([[_R]], device=device)
        fastvq.qr_lookup(ids, q, r, "mult", offsets=offs, per_sample_weights=torch.tensor([2.0], device=device),
                         deterministic=path == "sorted").backward(torch.tensor([[_Q]], device=device))
        got = q.grad.item()
    else:  # the weight's gradient (q r) . g with g = 2
        q, r = torch.tensor([[_Q]], device=device), torch.tensor([[_R]], device=device)
        w = torch.ones(1, device=device, requires_grad=True)
        fastvq.qr_lookup(ids, q, r, "mult", offsets=offs, per_sample_weights=w).backward(
            torch.full((1, 1), 2.0, device=device))
        got = w.grad.item()
    assert got == want, (path, got, want)


def test_qr_weight_gradient_redo_remembers_an_underflowed_column_of_an_earlier_tile(backend, device):
    """H86 (qr_lookup _qr_psw_dot: the max |g| of underflowed columns kept from the last D tile
    only): D = 130 (two 128-column tiles); column 0 holds the underflowed q r with bag gradient
    2, the second tile nothing underflowed: the weight's gradient is the exact 2 q r, not the
    float32 one."""
    D = 130
    q, r = torch.zeros(1, D, device=device), torch.zeros(1, D, device=device)
    q[0, 0], r[0, 0] = _Q, _R
    q[0, 129], r[0, 129] = 1.0, 2.0**-30  # (an ordinary product in the last tile, its g 0)
    g = torch.zeros(1, D, device=device)
    g[0, 0] = 2.0
    ids, offs = _one_item(device)
    w = torch.ones(1, device=device, requires_grad=True)
    fastvq.qr_lookup(ids, q, r, "mult", offsets=offs, per_sample_weights=w).backward(g)
    assert w.grad.item() == _exact_qrw(2.0), (w.grad.item(), _exact_qrw(2.0))


@pytest.mark.parametrize("dtype, terms", [
    pytest.param(torch.bfloat16, [-torch.finfo(torch.bfloat16).max, -(2.0**119), 2.0**100], id="bfloat16"),
    pytest.param(torch.float16, [-65504.0, -16.0, 2.0**-10], id="float16"),
])
def test_qr_negative_half_sums_just_inside_the_overflow_midpoint_round_to_minus_max(backend, device, dtype, terms):
    """H76 (qr_lookup _near_narrow_max: ``|result|`` -> ``result``, so a negative bfloat16 /
    float16 result at its dtype's largest magnitude is not summed again): QP3 negated. The exact
    sum lies just inside -(max + 1/2 ulp), so it rounds to -max; a float32 sum rounds to the
    midpoint and then to -inf. A table row's gradient (sorted), a bag (the forward) and a
    weight's gradient must all give -max."""
    big = torch.finfo(dtype).max
    midpoint = Fraction(big) + Fraction(2) ** (math.frexp(big)[1] - 1 - (8 if dtype == torch.bfloat16 else 11))
    assert -midpoint < sum(Fraction(t) for t in terms) < -Fraction(big)  # rounds to -max
    g = torch.tensor(terms, dtype=torch.float64, device=device)[:, None].to(dtype)
    assert g.double().flatten().tolist() == terms
    zeros = torch.zeros(1, 1, dtype=dtype, device=device)
    # a table row's gradient: three items on q row 0 / r row 0
    q, r = zeros.clone().requires_grad_(), zeros.clone().requires_grad_()
    fastvq.qr_lookup(torch.zeros(3, dtype=torch.long, device=device), q, r, "add").backward(g)
    # the forward: one bag of three items whose q rows are the terms
    out = fastvq.qr_lookup(torch.arange(3, device=device), g.clone(), zeros, "add",
                           offsets=torch.zeros(1, dtype=torch.long, device=device))
    # a weight's gradient: one item whose composed row is 1s, its bag gradient the terms
    w = torch.ones(1, dtype=dtype, device=device, requires_grad=True)
    fastvq.qr_lookup(torch.zeros(1, dtype=torch.long, device=device), torch.ones(1, 3, dtype=dtype, device=device),
                     torch.zeros(1, 3, dtype=dtype, device=device), "add",
                     offsets=torch.zeros(1, dtype=torch.long, device=device), per_sample_weights=w
                     ).backward(g.reshape(1, 3))
    got = [q.grad.item(), r.grad.item(), out.item(), w.grad.item()]
    assert got == [-big] * 4, (got, -big)


# --------------------------------------------------------------------------- the redo's cost: ordinary inputs never take it
# (spies on the kernels' calls under the interpreter, as test_qr_lookup.py's
# test_atomic_backward_of_nonfinite_gradients_takes_no_fix_up does)


def _spy(monkeypatch, name):
    from fastvq import kernels
    from fastvq.kernels import qr_lookup as k

    if not kernels.INTERPRETED:
        pytest.skip("the kernels' calls are counted under the interpreter")
    calls = []
    real = getattr(k, name)
    monkeypatch.setattr(k, name, lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def test_qr_ordinary_bags_rows_and_weight_gradients_take_no_float64_redo(monkeypatch, device):
    """H68 (qr_lookup _not_finite: ``> 0`` -> ``>= 0``, every sum redone in float64) and H70
    (_qr_bag_sum: a "mult" bag redone for any weight above 1, underflow or not): the module's
    contract is that bags and rows of ordinary values never take the float64 pass (its
    ``round_dd``). Ordinary seeded inputs, "mult" with weights of magnitude 1.5 to 3 and "add"
    with "mean": the forward, the sorted table gradients and the weights' gradient call no
    ``round_dd``, and agree with float64 to float32 accuracy. The spy sees QP1's redo."""
    from fastvq.reference.qr_lookup import qr_lookup_ref
    from tests.utils import randn

    calls = _spy(monkeypatch, "round_dd")
    ids, offs = torch.tensor([0, 5, 3, 7, 1, 1, 4], device=device), torch.tensor([0, 3, 3], device=device)
    q, r = randn(4, 6, seed=1, device=device), randn(2, 6, seed=2, device=device)
    w = torch.tensor([1.5, -2.0, 3.0, 2.5, -1.75, 2.0, -3.0], device=device)
    g = randn(3, 6, seed=3, device=device)
    with fastvq.backend("triton"):
        for op, mode, ww in (("mult", "sum", w), ("add", "mean", None), ("mult", "mean", None)):
            qq, rr = q.clone().requires_grad_(), r.clone().requires_grad_()
            w1 = None if ww is None else ww.clone().requires_grad_()
            out = fastvq.qr_lookup(ids, qq, rr, op, offsets=offs, mode=mode, per_sample_weights=w1)
            out.backward(g)
            q64, r64 = q.double().requires_grad_(), r.double().requires_grad_()
            w64 = None if ww is None else ww.double().requires_grad_()
            ref = qr_lookup_ref(ids, q64, r64, op, offsets=offs, mode=mode, per_sample_weights=w64)
            ref.backward(g.double())
            torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(qq.grad.double(), q64.grad, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(rr.grad.double(), r64.grad, rtol=1e-5, atol=1e-6)
            if ww is not None:
                torch.testing.assert_close(w1.grad.double(), w64.grad, rtol=1e-5, atol=1e-6)
        assert calls == [], (len(calls), "an ordinary bag, row or weight took the float64 redo")
        q1, r1 = torch.tensor([[_Q]], device=device), torch.tensor([[_R]], device=device)
        one, zero = _one_item(device)
        fastvq.qr_lookup(one, q1, r1, "mult", offsets=zero, per_sample_weights=torch.tensor([2.0], device=device))
    assert calls, "the spy must see the redo of an underflowed product times 2"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_qr_atomic_half_backward_of_infinite_gradients_sums_no_row_again(monkeypatch, device, dtype):
    """H85 (qr_lookup _qr_narrow_rows: ``& (|acc| < inf)`` dropped, so a half-precision row
    whose float32 accumulator holds +-inf is summed again): a diverged step (+inf in one column
    of every upstream gradient row) on bfloat16 / float16 tables, ``deterministic=False``: the
    infinite sums are exact (+inf) and no row is summed again (``_qr_fix_rows`` never called);
    the other columns agree with float64. The spy sees QP3's float16 row summed again."""
    from tests.utils import randn

    calls = _spy(monkeypatch, "_qr_fix_rows")
    ids = torch.tensor([0, 5, 3, 7, 1, 1, 4, 6], device=device)
    q, r = randn(4, 3, seed=4, device=device).to(dtype), randn(2, 3, seed=5, device=device).to(dtype)
    g = randn(8, 3, seed=6, device=device).to(dtype)
    g[:, 1] = math.inf
    with fastvq.backend("triton"):
        qq, rr = q.clone().requires_grad_(), r.clone().requires_grad_()
        fastvq.qr_lookup(ids, qq, rr, "add", deterministic=False).backward(g)
        assert calls == [], (len(calls), "a row of +inf was summed again")
        g64 = g.double()
        want_q = torch.zeros(4, 3, dtype=torch.float64, device=device).index_add_(0, ids // 2, g64)
        want_r = torch.zeros(2, 3, dtype=torch.float64, device=device).index_add_(0, ids % 2, g64)
        torch.testing.assert_close(qq.grad.double(), want_q.to(dtype).double(), rtol=1e-2, atol=1e-2)
        torch.testing.assert_close(rr.grad.double(), want_r.to(dtype).double(), rtol=1e-2, atol=1e-2)
        assert (qq.grad[:, 1] == math.inf).all() and (rr.grad[:, 1] == math.inf).all()
        h = torch.tensor([[65504.0], [16.0], [-(2.0**-10)]], dtype=torch.float16, device=device)
        zq, zr = (torch.zeros(1, 1, dtype=torch.float16, device=device, requires_grad=True) for _ in range(2))
        fastvq.qr_lookup(torch.zeros(3, dtype=torch.long, device=device), zq, zr, "add",
                         deterministic=False).backward(h)
    assert calls, "the spy must see QP3's row summed again"
