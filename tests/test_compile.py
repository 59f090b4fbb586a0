"""torch.compile(fullgraph=True) traces every op, forward and backward, without graph breaks.

aot_eager exercises the fake implementations and the registered autograd (what inductor relies
on) at interpreter speed; one test runs inductor end to end.
"""

import pytest
import torch
import torch.nn.functional as F

import fastvq
from tests.utils import assert_close, raises_invalid, randn


def _grads(fn, *args):
    """Output and input gradients of sum(fn(*args) * fixed weights)."""
    args = [a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a for a in args]
    out = fn(*args)
    outs = out if isinstance(out, tuple) else (out,)
    loss = sum((o.float() * torch.linspace(-1, 1, o.numel()).reshape(o.shape)).sum()
               for o in outs if isinstance(o, torch.Tensor) and o.is_floating_point() and o.requires_grad)
    if isinstance(loss, torch.Tensor):
        loss.backward()
    return outs, [a.grad for a in args if isinstance(a, torch.Tensor) and a.requires_grad]


CASES = {
    "nearest_code": (lambda x, c: fastvq.nearest_code(x, c), lambda: (torch.randn(2, 9, 8), torch.randn(13, 8))),
    "pairwise_sqdist": (fastvq.pairwise_sqdist,
                        lambda: (torch.randn(7, 5, requires_grad=True), torch.randn(6, 5, requires_grad=True))),
    "mine_negatives": (lambda a, p, n: fastvq.mine_negatives(a, p, n, strategy="semi-hard"),
                       lambda: (torch.randn(7, 5), torch.randn(7, 5), torch.randn(11, 5))),
    "residual_quantize": (fastvq.residual_quantize,
                          lambda: (torch.randn(9, 8, requires_grad=True), torch.randn(3, 5, 8))),
    "code_statistics": (lambda x, i: fastvq.code_statistics(x, i, 6), lambda: (torch.randn(20, 4), torch.randint(0, 6, (20,)))),
    "rotation_trick": (fastvq.rotation_trick, lambda: (torch.randn(10, 6, requires_grad=True), torch.randn(10, 6))),
    "qr_lookup": (lambda i, q, r: fastvq.qr_lookup(i, q, r, op="mult"),
                  lambda: (torch.randint(-1000, 1000, (12,)), torch.randn(5, 4, requires_grad=True),
                           torch.randn(7, 4, requires_grad=True))),
    "pairwise_kl_loss": (lambda p, t: fastvq.pairwise_kl_loss(p, t, 0.3),
                         lambda: (F.normalize(torch.randn(9, 6), dim=1).requires_grad_(), F.normalize(torch.randn(9, 4), dim=1))),
}


@pytest.mark.parametrize("op", list(CASES))
def test_op_compiles_fullgraph(backend, op):
    fn, make = CASES[op]
    args = make()
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    outs_e, grads_e = _grads(fn, *args)
    outs_c, grads_c = _grads(compiled, *args)
    for a, b in zip(outs_e, outs_c):
        if a.is_floating_point():
            assert_close(b, a, torch.float32, 16)
        else:
            assert torch.equal(a, b)
    for a, b in zip(grads_e, grads_c):
        assert_close(b, a, torch.float32, 16)


TEMPERATURE_CASES = {  # ops with a float argument a schedule changes between steps
    "pairwise_kl_loss": (lambda p, t, T: fastvq.pairwise_kl_loss(p, t, T),
                         lambda: (F.normalize(randn(9, 6, seed=1), dim=1), F.normalize(randn(9, 4, seed=2), dim=1))),
    "sample_code": (lambda x, c, T: fastvq.sample_code(x, c, T, seed=1)[1], lambda: (randn(6, 4, seed=3), randn(5, 4, seed=4))),
}


@pytest.mark.parametrize("dynamic", [None, True], ids=["auto", "dynamic"])
@pytest.mark.parametrize("op", list(TEMPERATURE_CASES))
def test_a_changing_temperature_keeps_one_graph_working(backend, op, dynamic):
    # probe3 R1: from the second temperature on, dynamo traces the float as a symbol, and the
    # argument check's math.isfinite on it ended the graph. A bad value still raises.
    fn, make = TEMPERATURE_CASES[op]
    args = make()
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager", dynamic=dynamic)
    for T in (0.5, 0.4, 0.3):
        assert_close(compiled(*args, T), fn(*args, T), torch.float32, 16)
    for bad in (-1.0, float("nan")):  # an error (a guard or runtime assert of the graph), never a result
        with pytest.raises(Exception):
            compiled(*args, bad)


class _TinyVQVAE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(12, 8)
        self.vq = fastvq.nn.VectorQuantizer(16, 8)
        self.rq = fastvq.nn.ResidualQuantizer(2, 16, 8)
        self.dec = torch.nn.Linear(8, 12)

    def forward(self, x):
        z = self.enc(x)
        q1, c1, e1, _ = self.vq(z)
        q2, c2, e2, _ = self.rq(z)
        return F.mse_loss(self.dec(q1 + q2), x) + 0.25 * (c1 + c2) + e1 + e2


def test_model_compiles_fullgraph(backend):
    torch.manual_seed(0)
    model = _TinyVQVAE()
    x = torch.randn(4, 5, 12)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    loss_c = compiled(x)
    loss_c.backward()
    grads_c = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    loss_e = model(x)
    loss_e.backward()
    assert_close(loss_c, loss_e, torch.float32, 16)
    for gc, p in zip(grads_c, model.parameters()):
        assert_close(gc, p.grad, torch.float32, 16)


def test_inductor_end_to_end():
    torch._dynamo.reset()
    x, c = torch.randn(33, 16), torch.randn(40, 16)

    def f(x, c):
        idx, d = fastvq.nearest_code(x, c)
        return c[idx], d.sqrt()

    with fastvq.backend("reference"):
        q_c, d_c = torch.compile(f, fullgraph=True)(x, c)
        q_e, d_e = f(x, c)
    assert torch.equal(q_c, q_e)
    assert_close(d_c, d_e, torch.float32, 16)


@pytest.mark.parametrize("make", [lambda: fastvq.nn.VectorQuantizer(8, 4, ema=True),
                                  lambda: fastvq.nn.ResidualQuantizer(2, 8, 4, ema=True)], ids=["vq", "rq"])
def test_inductor_ema_training_steps_match_eager(make):
    # The forward updates the codebook in place (EMA) after choosing the codes; the backward must
    # read the codebook as it was before. Inductor's partitioner recomputed the saved clone in the
    # backward from the (then updated) parameter: compiled grads were the next step's eager grads.
    torch._dynamo.reset()
    torch.manual_seed(9)
    eager = make()
    compiled = make()
    compiled.load_state_dict(eager.state_dict())
    step = torch.compile(compiled, fullgraph=True)
    xs = [randn(12, 4, seed=40 + i) for i in range(3)]
    with fastvq.backend("reference"):
        for x in xs:
            outs = []
            for f in (eager, step):
                xa = x.clone().requires_grad_()
                q, commit, _, codes = f(xa)
                (commit + (q * torch.linspace(-1, 1, q.numel()).reshape(q.shape)).sum()).backward()
                outs.append((codes, commit.detach(), xa.grad))
            (codes_e, loss_e, grad_e), (codes_c, loss_c, grad_c) = outs
            assert torch.equal(codes_c, codes_e)
            assert_close(loss_c, loss_e, torch.float32, 16)
            assert_close(grad_c, grad_e, torch.float32, 16)
        for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
            if a.is_floating_point():
                assert_close(b, a, torch.float32, 16, msg=name)


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")], ids=["negative", "nan", "inf"])
def test_compiled_step_checks_row_weights(backend, bad):
    """probe5 K1: the float row-weight check runs inside an op, so a compiled step raises the
    ValueError eager does (it was traced in the Python wrapper, and the compiled graph dropped it)."""
    x, cbs = randn(6, 4, seed=1), randn(2, 3, 4, seed=2)
    vq = fastvq.nn.VectorQuantizer(3, 4, ema=True)
    step = torch.compile(lambda w: fastvq.residual_quantize_step(x, cbs, weights=w).commitment_loss,
                         fullgraph=True, backend="aot_eager")
    module = torch.compile(lambda w: vq(x, mask=w)[1], fullgraph=True, backend="aot_eager")
    good = torch.ones(6)
    step(good), module(good)
    w = good.clone()
    w[2] = bad
    for fn in (step, module):
        with raises_invalid("finite and >= 0"):
            fn(w)
