"""Every op and quantizer ignores ``torch.autocast``: float32 inputs give float32 answers, bitwise
the ones they give outside autocast, on both backends (probe5 A1: the reference bodies' matmuls
ran in bfloat16 under CPU autocast while the kernels did not)."""

import pytest
import torch

import fastvq
from tests.ops.test_strided_arguments import CASES, _flat
from tests.utils import DEVICE, assert_same_run, randn

AUTOCAST = [torch.bfloat16, torch.float16]
# searches whose codes come in pairs c, 1.001 c: float32 scores tell them apart, bfloat16 and
# float16 scores mostly do not (the CASES are too small to show a changed code)
def _pairs(k, d, seed):
    base = randn(k, d, seed=seed)
    return torch.cat([base, base * 1.001])


SEARCHES = {
    f"nearest_code-{m}": (lambda x, c, m=m: fastvq.nearest_code(x, c, m), lambda: [randn(64, 32, seed=1), _pairs(64, 32, 2)])
    for m in ("l2", "cosine", "dot")
} | {
    "topk_codes": (lambda x, c: fastvq.topk_codes(x, c, 3), lambda: [randn(64, 32, seed=1), _pairs(64, 32, 2)]),
    "mine_negatives": (fastvq.mine_negatives, lambda: [randn(64, 32, seed=1), randn(64, 32, seed=3), _pairs(64, 32, 2)]),
    "residual_quantize": (fastvq.residual_quantize,
                          lambda: [randn(64, 32, seed=1), torch.stack([_pairs(64, 32, 2), _pairs(64, 32, 4) * 0.1])]),
}

# ops with a gradient to their float arguments (their float outputs summed)
DIFFERENTIABLE = {"pairwise_sqdist", "pairwise_kl_loss", "rotation_trick", "residual_quantize_step",
                  "qr_lookup", "qr_lookup_bags"}


def _run(fn, make, grad):
    args = make()
    leaves = [a.requires_grad_() if grad and a.is_floating_point() and a.dim() >= 2 else a for a in args]
    out = _flat(fn(*leaves))
    grads = []
    if grad:
        loss = sum(o.float().sum() for o in out if o.is_floating_point() and o.requires_grad)
        loss.backward()
        grads = [a.grad for a in leaves if a.requires_grad and a.grad is not None]
        assert grads, "no gradient reached the inputs"
    return [o.detach() for o in out] + grads


def _same_bits(got, want, msg):
    assert len(got) == len(want), msg
    for k, (g, w) in enumerate(zip(got, want)):
        assert_same_run(g, w, f"{msg}: output {k} differs")


@pytest.mark.parametrize("dtype", AUTOCAST, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", list(CASES) + list(SEARCHES))
def test_op_ignores_autocast(backend, name, dtype):
    fn, make = CASES[name] if name in CASES else SEARCHES[name]
    grad = name in DIFFERENTIABLE
    want = _run(fn, make, grad)
    with torch.autocast(DEVICE, dtype=dtype):
        got = _run(fn, make, grad)
    _same_bits(got, want, f"{name} under autocast({dtype})")


@pytest.mark.parametrize("dtype", AUTOCAST, ids=["bf16", "fp16"])
@pytest.mark.parametrize("kind", ["vq", "vq-ema", "rq"])
def test_quantizer_ignores_autocast(backend, kind, dtype):
    """A training step (float32 module and input) under autocast: the same codes, outputs,
    gradients and updated codebook as without it."""
    def step():
        torch.manual_seed(3)
        if kind == "rq":
            m = fastvq.nn.ResidualQuantizer(3, 48, 16)
        else:
            m = fastvq.nn.VectorQuantizer(48, 16, ema=kind == "vq-ema")
        x = randn(64, 16, seed=4, requires_grad=True)
        out = m(x)
        (out[0].square().sum() + out[1] + out[2]).backward()
        return [t.detach() for t in out] + [x.grad] + [t.detach().clone() for t in m.state_dict().values()]

    want = step()
    with torch.autocast(DEVICE, dtype=dtype):
        got = step()
    _same_bits(got, want, f"{kind} under autocast({dtype})")


@pytest.mark.parametrize("dtype", AUTOCAST, ids=["bf16", "fp16"])
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_bitcodes_ignores_autocast(train, dtype):
    """nn.Bitcodes's scores and code sums are module code (matmuls autocast would round to 16
    bits, and its exact selection counts with them); backward outside autocast, as torch advises."""
    def step():
        torch.manual_seed(0)
        m = fastvq.nn.Bitcodes(32, 8, 1.0).train(train)
        x = randn(64, 32, seed=1, requires_grad=True)
        return m, x

    m, x = step()
    y, bits = m(x)
    y.square().sum().backward()
    want = [y.detach(), bits, m.codebook.grad] + ([x.grad] if train else [])
    m, x = step()
    with torch.autocast(DEVICE, dtype=dtype):
        y, bits = m(x)
        back = m.from_bits(bits)
    y.square().sum().backward()
    got = [y.detach(), bits, m.codebook.grad] + ([x.grad] if train else [])
    _same_bits(got, want, f"Bitcodes under autocast({dtype})")
    _same_bits([back.detach()], [want[0]], "from_bits under autocast")


def test_bitcodes_compiles_fullgraph_under_autocast():
    """probe6 A1: the autocast guard must be traceable (an ExitStack was not). Eval mode (the
    training forward's Gumbel noise draws from torch.empty_like, which the suite poisons)."""
    torch.manual_seed(0)
    m = fastvq.nn.Bitcodes(32, 8, 1.0).eval()
    x = randn(16, 32, seed=1)
    torch._dynamo.reset()
    f = torch.compile(m, fullgraph=True, backend="aot_eager")
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y, bits = f(x)
    want_y, want_bits = m(x)
    assert y.dtype == torch.float32 and torch.equal(bits, want_bits) and torch.equal(y, want_y)
