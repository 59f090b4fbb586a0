"""probe8's op findings (/work/wt/probe8-FINDINGS.md) as regression tests, each checked against
float64 autograd of the same loss. They fail today, so they are marked ``xfail(strict=True)``:
when a fix lands the test passes, the strict marker turns that into a failure, and whoever fixed
it removes the marker."""

import pytest
import torch

import fastvq

from tests.utils import DEVICE, randn


def _kl64(pred, target, temperature):
    """The loss and its gradient in float64 autograd (diagonal excluded exactly)."""
    p = pred.detach().double().requires_grad_()
    t = target.detach().double()
    eye = torch.eye(p.shape[0], dtype=torch.bool, device=p.device)
    lp = (p @ p.T / temperature).masked_fill(eye, float("-inf")).log_softmax(1)
    lt = (t @ t.T / temperature).masked_fill(eye, float("-inf")).log_softmax(1)
    q = lt.exp()
    loss = torch.where(q > 0, q * (lt - lp), 0.0).sum() / p.shape[0]
    loss.backward()
    return loss.detach(), p.grad


@pytest.mark.xfail(strict=True, reason="probe8 KL1: the backward's 1/T is a float32 scale (inf for T < 2.9e-39)")
def test_probe8_kl1_gradient_finite_at_a_tiny_temperature(backend):
    """T = 1e-39 (accepted: nonzero in float32) with rows ~1e-20 (logits ~0.1): float64 gives a
    gradient ~1e17; both backends multiply by 1/T held in float32 (1e39: inf) and give +-inf."""
    pred = randn(5, 3, seed=0, scale=1e-20, requires_grad=True)
    target = randn(5, 3, seed=1, scale=1e-20)
    T = 1e-39
    want_loss, want_grad = _kl64(pred, target, T)
    loss = fastvq.pairwise_kl_loss(pred, target, T)
    loss.backward()
    assert torch.allclose(loss.double(), want_loss, rtol=1e-4)  # (the forward is right already)
    assert torch.isfinite(pred.grad).all(), pred.grad
    assert torch.allclose(pred.grad.double(), want_grad, rtol=1e-3, atol=0)


@pytest.mark.xfail(strict=True, reason="probe8 KL1: target == pred at T = 1e-39 gives a NaN gradient (0 * inf)")
def test_probe8_kl1_equal_rows_zero_gradient_at_a_tiny_temperature(backend):
    """The docstring: "target == pred gives 0 and a zero gradient". At T = 1e-39 the loss is 0 but
    the gradient is NaN (G = 0 times the overflowed 1/T)."""
    x = torch.nn.functional.normalize(randn(4, 3, seed=0), dim=1)
    pred = x.clone().requires_grad_()
    loss = fastvq.pairwise_kl_loss(pred, x, 1e-39)
    loss.backward()
    assert float(loss) == 0.0
    assert torch.equal(pred.grad, torch.zeros_like(pred.grad)), pred.grad


@pytest.mark.xfail(strict=True, reason="probe8 KL2: grad * (1/T) / B underflows to subnormals for T ~ 3e38")
def test_probe8_kl2_gradient_precision_at_a_huge_temperature():
    """T = 3e38: 1/T = 3.3e-39 is subnormal, and dividing by B before scaling back by 2^k leaves
    few significant bits (B = 4096: relative error ~1e-3 against float64; float32 rounding is
    ~1e-6). Reference backend (the Triton kernel forms the same float32 expression; a B this large
    is slow under the interpreter)."""
    B = 4096
    pred = randn(B, 2, seed=0, scale=1e19, requires_grad=True)
    target = randn(B, 2, seed=1, scale=1e19)
    T = 3e38
    _, want = _kl64(pred, target, T)
    with fastvq.backend("reference"):
        fastvq.pairwise_kl_loss(pred, target, T).backward()
    rel = float((pred.grad.double() - want).norm() / want.norm())
    assert rel < 1e-5, rel


@pytest.mark.xfail(strict=True, reason="probe8 KL3: a temperature tensor that requires grad is read with .item(): "
                                       "its gradient is dropped silently")
def test_probe8_kl3_learnable_temperature_is_not_silently_detached(backend):
    """A one-element temperature tensor that requires grad either gets the loss's gradient
    (float64 autograd: d loss / d log T) or is refused naming ``temperature``."""
    pred = randn(8, 4, seed=0, requires_grad=True)
    target = randn(8, 4, seed=1)
    log_t = torch.zeros((), device=pred.device, requires_grad=True)
    try:
        loss = fastvq.pairwise_kl_loss(pred, target, log_t.exp())
    except (TypeError, ValueError) as e:
        assert "temperature" in str(e)
        return
    loss.backward()
    p, t = pred.detach().double(), target.double()
    lt = torch.zeros((), dtype=torch.float64, device=p.device, requires_grad=True)
    eye = torch.eye(8, dtype=torch.bool, device=p.device)
    lp = (p @ p.T / lt.exp()).masked_fill(eye, -1e300).log_softmax(1)
    lq = (t @ t.T / lt.exp()).masked_fill(eye, -1e300).log_softmax(1)
    ((lq.exp() * (lq - lp)).sum() / 8).backward()
    assert log_t.grad is not None, "the temperature got no gradient"
    assert torch.allclose(log_t.grad.double(), lt.grad, rtol=1e-4)


@pytest.mark.xfail(strict=True, reason="probe8 C1: every new temperature is a recompile (dynamo guards T == value); "
                                       "the 9th hits the recompile limit, a hard error under fullgraph=True")
@pytest.mark.parametrize("op", ["pairwise_kl_loss", "sample_code"])
def test_probe8_c1_the_seed_temperature_schedule_compiles_once(backend, op):
    """The seed's schedule, max(0.5 * 0.95 ** epoch, 0.05), over 12 epochs of a fullgraph,
    dynamic=True compiled call: the docstring promises no recompile for a changing temperature
    (a recompile per epoch hits torch._dynamo's limit of 8 and fails at epoch 8)."""
    import torch.nn.functional as F

    if op == "pairwise_kl_loss":
        def fn(a, b, T):
            return fastvq.pairwise_kl_loss(a, b, T)
        args = (F.normalize(randn(9, 6, seed=1), dim=1), F.normalize(randn(9, 4, seed=2), dim=1))
    else:
        def fn(a, b, T):
            return fastvq.sample_code(a, b, T, seed=1)[1]
        args = (randn(6, 4, seed=3), randn(5, 4, seed=4))
    torch._dynamo.reset()
    frames = []

    def count(gm, example_inputs):
        frames.append(gm)
        return gm.forward

    compiled = torch.compile(fn, fullgraph=True, backend=count, dynamic=True)
    for epoch in range(12):
        compiled(*args, max(0.5 * 0.95**epoch, 0.05))
    assert len(frames) <= 2, f"{len(frames)} graphs compiled for 12 temperatures"


def test_probe8_kl1b_equal_rows_at_a_temperature_below_float32(request, backend):
    """T = 2^-260 (accepted: a positive double) with target == pred: the loss is 0 exactly (the
    docstring: "target == pred gives 0"); the Triton forward gives +inf (the reference 0). A
    refusal naming ``temperature`` would be right too."""
    if backend == "triton":
        request.applymarker(pytest.mark.xfail(strict=True, reason="probe8 KL1b: Triton forward +inf at T < ~2^-255"))
    x = torch.zeros(3, 2, device=DEVICE)
    x[0, 0] = 1e-30
    try:
        loss = fastvq.pairwise_kl_loss(x, x, 2.0**-260)
    except (TypeError, ValueError) as e:
        assert "temperature" in str(e)
        return
    assert float(loss) == 0.0, float(loss)
