import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastvq
import fastvq.testing as ft
from fastvq.reference.pairwise_kl_loss import pairwise_kl_loss_fwd_ref, pairwise_kl_loss_ref
from tests.utils import assert_close, noncontiguous, randn


def seed_loss(pred, target, temperature):
    """The training loss of the pairwise-geometry experiment (seed 000), verbatim in substance."""
    batch_size = pred.size(0)
    p = pred.matmul(pred.transpose(0, 1))
    p = torch.where(torch.eye(batch_size) > 0, -1000 * torch.ones_like(p), p)
    p = F.log_softmax(p / temperature, dim=1)
    t = target.matmul(target.transpose(0, 1))
    t = torch.where(torch.eye(batch_size) > 0, -1000 * torch.ones_like(t), t)
    t = F.log_softmax(t / temperature, dim=1)
    return nn.KLDivLoss(reduction="batchmean", log_target=True)(p, t)


def exact_loss64(pred, target, temperature):
    """float64, the diagonal excluded exactly (valid at any temperature)."""
    B = pred.shape[0]
    if B <= 1:
        return pred.double().sum() * 0.0
    eye = torch.eye(B, dtype=torch.bool, device=pred.device)
    s = (pred.double() @ pred.double().T / temperature).masked_fill(eye, float("-inf"))
    t = (target.double() @ target.double().T / temperature).masked_fill(eye, float("-inf"))
    log_p, log_q = s.log_softmax(1), t.log_softmax(1)
    return torch.where(eye, 0.0, log_q.exp() * (log_q - log_p)).sum() / B


def kl_bounds(pred, target, temperature, g=1.0):
    """fastvq.testing's error terms for the loss and pred's gradient (float64, on the same inputs).

    Every log-ratio ``log q_ij - log p_ij`` carries the errors of two length-D dot products
    (``|x_i||x_j| / T`` each, entering directly and through the row's log-sum-exp) and of two
    log-sum-exps over B positive terms (``gamma_B``, absolute); the loss then sums ``B^2`` weighted
    terms (two levels of B, plus a few ulps of exp/log); a gradient element sums B terms."""
    B, D = pred.shape[0], max(pred.shape[1], target.shape[1])
    p64, t64 = pred.double(), target.double()
    eye = torch.eye(B, dtype=torch.bool, device=p64.device)
    log_p = (p64 @ p64.T / temperature).masked_fill(eye, float("-inf")).log_softmax(1).nan_to_num(neginf=0.0)
    log_q = (t64 @ t64.T / temperature).masked_fill(eye, float("-inf")).log_softmax(1).nan_to_num(neginf=0.0)
    P, Q = log_p.exp().masked_fill(eye, 0.0), log_q.exp().masked_fill(eye, 0.0)
    dots = 2 * (p64.norm(dim=1).max() ** 2 + t64.norm(dim=1).max() ** 2) / temperature if B else 0.0
    terms = (Q * (log_q - log_p).abs()).sum() / max(B, 1)
    G = ((P + Q) + (P + Q).T) @ p64.abs() * (abs(float(g)) / (max(B, 1) * temperature))
    return (dict(reduce_len=[D, B, 2 * B + 8], magnitude=[dots * abs(float(g)), 2.0 * abs(float(g)), terms * abs(float(g))]),
            dict(reduce_len=[D, B, B + 8], magnitude=[G * dots, 2 * G, G]))


def unit(B, D, dtype=torch.float32):
    return F.normalize(randn(B, D, dtype=torch.float64), dim=1).to(dtype)


def loss_and_grad(fn, pred, target, temperature, g):
    pred = pred.detach().clone().requires_grad_()
    loss = fn(pred, target, temperature)
    (loss * g).backward()
    return loss.detach(), pred.grad


CASES = [  # (B, Dp, Dt)
    pytest.param(1, 8, 8, id="B1"),
    pytest.param(2, 8, 3, id="B2"),
    pytest.param(37, 16, 24, id="B37-Dp16-Dt24"),
    pytest.param(65, 5, 1, id="B65-lastTileDiagOnly-Dt1"),
    pytest.param(100, 70, 130, id="B100-Dp70-Dt130"),
    pytest.param(50, 130, 64, id="B50-Dp130-splitDo"),
]
TEMPS = [0.05, 0.2, 1.0]


@pytest.mark.parametrize("temperature", TEMPS, ids=lambda t: f"T{t}")
@pytest.mark.parametrize("B,Dp,Dt", CASES)
def test_matches_seed_float64(backend, B, Dp, Dt, temperature):
    pred, target, g = unit(B, Dp), unit(B, Dt), randn(())
    loss, grad = loss_and_grad(fastvq.pairwise_kl_loss, pred, target, temperature, g)
    ref_loss, ref_grad = loss_and_grad(seed_loss, pred.double(), target.double(), temperature, g.double())
    assert loss.shape == () and loss.dtype == torch.float32 and grad.dtype == torch.float32
    loss_terms, grad_terms = kl_bounds(pred, target, temperature, g)
    ft.assert_close(loss, ref_loss, dtype=torch.float32, **loss_terms, name="pairwise_kl_loss")
    ft.assert_close(grad, ref_grad, dtype=torch.float32, **grad_terms, name="pairwise_kl_loss grad")
    if B > 1:
        ft.assert_grad_nondegenerate(grad, ref_grad, rtol=float(ft.error_bound(ref_grad, dtype=torch.float32, **grad_terms).norm()
                                                           / ref_grad.norm()), name="pairwise_kl_loss grad")
    assert loss >= -1e-6


@pytest.mark.parametrize("B", [3, 4, 7, 8, 15, 16])
def test_gradient_scale_on_each_side_of_powers_of_two(backend, B):
    # the backward scales h = G + G^T by 2^-e (2^e > B + 1) in its dot and the result by
    # 1 / (T B 2^-e), formed on the host (kernels' bwd_h_scale): a host exponent that differed from
    # the kernel's at B + 1 = 2^k would make the gradient 2x off (float16 scales by a constant)
    pred, target, g = unit(B, 6), unit(B, 5), randn(())
    _, grad = loss_and_grad(fastvq.pairwise_kl_loss, pred, target, 0.3, g)
    _, ref_grad = loss_and_grad(seed_loss, pred.double(), target.double(), 0.3, g.double())
    _, grad_terms = kl_bounds(pred, target, 0.3, g)
    ft.assert_close(grad, ref_grad, dtype=torch.float32, **grad_terms, name="pairwise_kl_loss grad")


@pytest.mark.parametrize("temperature", [0.05, 1.0], ids=lambda t: f"T{t}")
def test_matches_seed_float32(backend, temperature):
    pred, target, g = unit(45, 32), unit(45, 20), randn(())
    loss, grad = loss_and_grad(fastvq.pairwise_kl_loss, pred, target, temperature, g)
    ref_loss, ref_grad = loss_and_grad(seed_loss, pred, target, temperature, g)
    torch.testing.assert_close(loss, ref_loss, rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6 / temperature)


def test_diagonal_excluded_exactly_at_high_temperature(backend):
    # At T = 1000 the seed's -1000 diagonal is -1 after scaling, while the off-diagonal
    # entries of these (norm ~30) rows are O(1): the diagonal takes real probability mass.
    # We exclude it exactly, so we match the exact formula, not the seed.
    pred, target = randn(20, 6, scale=13.0), randn(20, 9, scale=10.0)
    T = 1000.0
    loss, grad = loss_and_grad(fastvq.pairwise_kl_loss, pred, target, T, torch.tensor(1.0))
    exact, exact_grad = loss_and_grad(exact_loss64, pred.double(), target.double(), T, torch.tensor(1.0, dtype=torch.float64))
    seed = seed_loss(pred.double(), target.double(), T)
    torch.testing.assert_close(loss.double(), exact, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=1e-3, atol=1e-10)
    assert not torch.isclose(seed, exact, rtol=1e-2)


def test_unnormalised_rows(backend):
    # rows used as given: large norms make sharp softmaxes; compare with the exact float64 loss
    pred, target = randn(40, 12, scale=0.7), randn(40, 10, scale=0.5)
    loss, grad = loss_and_grad(fastvq.pairwise_kl_loss, pred, target, 0.5, torch.tensor(1.0))
    exact, exact_grad = loss_and_grad(exact_loss64, pred.double(), target.double(), 0.5, torch.tensor(1.0, dtype=torch.float64))
    assert_close(loss, exact, torch.float32, reduce_len=40 * 12 * 20)
    assert_close(grad, exact_grad, torch.float32, reduce_len=40 * 20)


def test_identical_geometry_is_zero(backend):
    x = unit(70, 16)
    loss, grad = loss_and_grad(fastvq.pairwise_kl_loss, x, x.clone(), 0.1, torch.tensor(1.0))
    assert abs(loss.item()) < 1e-5
    assert grad.abs().max() < 1e-5


@pytest.mark.parametrize("B", [0, 1])
def test_no_pairs_gives_zero(backend, B):
    pred = randn(B, 4).requires_grad_()
    loss = fastvq.pairwise_kl_loss(pred, randn(B, 3), 0.3)
    assert loss.shape == () and loss.item() == 0.0
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros(B, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision(backend, dtype):
    pred, target = unit(48, 32, dtype), unit(48, 24, dtype)
    loss, grad = loss_and_grad(fastvq.pairwise_kl_loss, pred, target, 0.2, torch.tensor(1.0))
    ref_loss, ref_grad = loss_and_grad(exact_loss64, pred.double(), target.double(), 0.2, torch.tensor(1.0, dtype=torch.float64))
    assert loss.dtype == torch.float32 and grad.dtype == dtype
    # fp32 accumulation of the rounded inputs; the backward dot runs in the input dtype
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-4, atol=1e-4)
    rtol, atol = (2e-2, 2e-3) if dtype == torch.bfloat16 else (3e-3, 3e-4)
    torch.testing.assert_close(grad.double(), ref_grad, rtol=rtol, atol=atol)


def _tetrahedron(scale, seed, device):
    """4 rows in 3-D, every pair at a negative cosine (~ -1/3), slightly perturbed, norm ``scale``."""
    v = torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=torch.float64)
    v = F.normalize(v + 0.05 * randn(4, 3, dtype=torch.float64, seed=seed), dim=1)
    return (v * scale).float().to(device)


@pytest.mark.parametrize("scale,temperature", [(5e15, 1.0), (1.0, 1e-31)], ids=["norm5e15", "T1e-31"])
def test_logits_below_minus_1e30_stay_exact(backend, device, scale, temperature):
    # every off-diagonal logit is about -1e31: a finite sentinel of -1e30 for the running maxima
    # (the old kernel's) leaves the sums empty and the loss -inf
    pred, target = _tetrahedron(scale, 1, device), _tetrahedron(scale, 2, device)
    loss, grad = loss_and_grad(fastvq.pairwise_kl_loss, pred, target, temperature, torch.tensor(1.0, device=device))
    exact, exact_grad = loss_and_grad(exact_loss64, pred.double(), target.double(), temperature,
                                      torch.tensor(1.0, dtype=torch.float64, device=device))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    # logits ~1e31 carry an absolute float32 error ~1e24; the loss is their difference
    torch.testing.assert_close(loss.double(), exact, rtol=1e-4, atol=0.0)
    torch.testing.assert_close(grad.double(), exact_grad, rtol=1e-3, atol=1e-3 * exact_grad.abs().max().item())


def test_large_finite_logits(backend, device):
    # |pred| = 1e18: logits ~1e36, still float32; the loss and gradient stay finite and right
    pred, target = randn(12, 5, seed=3, device=device, scale=1e18 / 5**0.5), unit(12, 4).to(device)
    loss, grad = loss_and_grad(fastvq.pairwise_kl_loss, pred, target, 1.0, torch.tensor(1.0, device=device))
    exact, exact_grad = loss_and_grad(exact_loss64, pred.double(), target.double(), 1.0,
                                      torch.tensor(1.0, dtype=torch.float64, device=device))
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    torch.testing.assert_close(loss.double(), exact, rtol=1e-4, atol=0.0)


def test_overflowing_loss_gives_inf_and_nonfinite_inputs_nan(backend, device):
    pred, target = randn(9, 4, seed=4, device=device), unit(9, 3).to(device)
    big = pred * 1e20  # logits ~1e40: beyond float32
    # pred's softmaxes are one-hot, the target's are not: log p ~ -1e40, the exact loss overflows
    # float32 (+inf), while its gradient (P - Q) pred / (B T) ~ 1e20 does not
    loss, grad = loss_and_grad(fastvq.pairwise_kl_loss, big, target, 1.0, torch.tensor(1.0, device=device))
    exact, exact_grad = _exact_with_grad(big, target, 1.0)
    assert exact > 1e39 and loss.item() == float("inf")
    torch.testing.assert_close(grad.double(), exact_grad, rtol=1e-5, atol=1e-5 * exact_grad.abs().max().item())
    # the other way round the target's softmaxes are one-hot and the loss is ordinary (probe5 KL1:
    # it was +inf on both backends)
    torch.testing.assert_close(fastvq.pairwise_kl_loss(target, big[:, :3], 1.0).double(),
                               exact_loss64(target.double(), big[:, :3].double(), 1.0), rtol=1e-5, atol=0.0)
    for bad in (float("nan"), float("inf"), float("-inf")):
        p = pred.clone()
        p[3, 1] = bad
        assert math.isnan(fastvq.pairwise_kl_loss(p, target, 1.0).item())
        t = target.clone()
        t[0, 0] = bad
        assert math.isnan(fastvq.pairwise_kl_loss(pred, t, 1.0).item())


def test_fp16_backward_does_not_underflow(backend, device):
    # At B = 256 and T = 1e3 the softmaxes are nearly flat and nearly equal, so the entries of
    # G + G^T are ~1e-5 to 1e-6: below float16's normal range (6.1e-5), as they are at B ~ 16K
    # for ordinary temperatures. Cast to float16 unscaled for the backward's tensor-core dot,
    # they keep a few bits: relative error 2.0e-3 (B=256), 1.1e-3 (B=512, T=300), growing with B.
    # Scaled by 2^14 the kernel stays at the float32 reference's own level (4.4e-4 vs 4.9e-4).
    # The upstream 1e8 makes the gradient itself representable in float16.
    B, T = 256, 1e3
    pred = F.normalize(randn(B, 16, dtype=torch.float64, seed=11), dim=1).half().to(device)
    target = F.normalize(randn(B, 8, dtype=torch.float64, seed=12), dim=1).half().to(device)
    g = torch.tensor(1e8, device=device)
    _, grad = loss_and_grad(fastvq.pairwise_kl_loss, pred, target, T, g)
    _, exact = loss_and_grad(exact_loss64, pred.double(), target.double(), T, g.double())
    assert grad.dtype == torch.float16 and exact.abs().max() > 1e-2
    err = (grad.double() - exact).abs().max() / exact.abs().max()
    assert err < 1e-3, f"relative error {err:.3g}"


def test_mixed_dtypes_promote_and_target_gets_no_grad(backend):
    pred = unit(30, 8, torch.bfloat16).requires_grad_()
    target = unit(30, 8).requires_grad_()
    loss = fastvq.pairwise_kl_loss(pred, target, 0.5)
    loss.backward()
    assert pred.grad.dtype == torch.bfloat16 and target.grad is None
    assert_close(loss, exact_loss64(pred.detach().float(), target.detach(), 0.5), torch.float32, reduce_len=30 * 8)


def test_noncontiguous(backend):
    pred, target = unit(33, 12), unit(33, 7)
    loss, grad = loss_and_grad(fastvq.pairwise_kl_loss, noncontiguous(pred), target.T.contiguous().T, 0.3, torch.tensor(1.0))
    ref_loss, ref_grad = loss_and_grad(exact_loss64, pred.double(), target.double(), 0.3, torch.tensor(1.0, dtype=torch.float64))
    assert_close(loss, ref_loss, torch.float32, reduce_len=33 * 12 / 0.3)
    assert_close(grad, ref_grad, torch.float32, reduce_len=33 / 0.3)


def test_tensor_temperature(backend):
    pred, target = unit(10, 4), unit(10, 4)
    a = fastvq.pairwise_kl_loss(pred, target, torch.tensor(0.25))
    b = fastvq.pairwise_kl_loss(pred, target, 0.25)
    assert torch.equal(a, b)


def test_reference_is_chunked_and_exact():
    # the reference alone, across a chunk boundary (row_chunk shrinks with B)
    import fastvq.reference.pairwise_kl_loss as mod

    pred, target = unit(50, 6), unit(50, 5)
    orig = mod.row_chunk
    try:
        mod.row_chunk = lambda n: 7
        loss, lse_p, lse_t = pairwise_kl_loss_fwd_ref(pred, target, 0.3)
        loss2, grad = loss_and_grad(pairwise_kl_loss_ref, pred, target, 0.3, torch.tensor(1.0))
    finally:
        mod.row_chunk = orig
    exact, exact_grad = loss_and_grad(exact_loss64, pred.double(), target.double(), 0.3, torch.tensor(1.0, dtype=torch.float64))
    assert_close(loss, exact, torch.float32, reduce_len=50 * 6 / 0.3)
    assert_close(grad, exact_grad, torch.float32, reduce_len=50 / 0.3)
    s = (pred.double() @ pred.double().T / 0.3).fill_diagonal_(float("-inf"))
    assert lse_p.shape == (3, 50)  # (row max, log of the sum, max |pred_i|)
    assert torch.equal(lse_p[2], pred.abs().amax(1))
    assert_close(lse_p[0], s.amax(1), torch.float32, reduce_len=6)
    assert_close(lse_p[0] + lse_p[1], s.logsumexp(1), torch.float32, reduce_len=50)


@pytest.mark.parametrize(
    "pred,target,temperature,err",
    [
        (torch.randn(4), torch.randn(4, 3), 0.1, ValueError),
        (torch.randn(4, 3), torch.randn(2, 4, 3), 0.1, ValueError),
        (torch.randn(4, 3), torch.randn(5, 3), 0.1, ValueError),
        (torch.randint(0, 3, (4, 3)), torch.randn(4, 3), 0.1, TypeError),
        (torch.randn(4, 3), torch.randn(4, 3, dtype=torch.float64), 0.1, TypeError),
        ([[1.0]], torch.randn(1, 3), 0.1, TypeError),
        (torch.randn(4, 3), torch.randn(4, 3), 0.0, ValueError),
        (torch.randn(4, 3), torch.randn(4, 3), -1.0, ValueError),
        (torch.randn(4, 3), torch.randn(4, 3), math.nan, ValueError),
        (torch.randn(4, 3), torch.randn(4, 3), math.inf, ValueError),
        (torch.randn(4, 3), torch.randn(4, 3), "0.1", TypeError),
        (torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0.1, 0.2]), ValueError),
        # (no value: the shape-only implementation ran on CPU inputs, a made-up loss; fuzzB)
        (torch.randn(4, 3), torch.randn(4, 3), torch.tensor(1.0, device="meta"), ValueError),
    ],
    ids=["pred-1D", "target-3D", "B-mismatch", "int-dtype", "float64", "not-tensor",
         "T0", "T-negative", "T-nan", "T-inf", "T-str", "T-2-elements", "T-meta"],
)
def test_bad_input(pred, target, temperature, err):
    with pytest.raises(err, match="pairwise_kl_loss"):
        fastvq.pairwise_kl_loss(pred, target, temperature)


def test_opcheck():
    pred, target = unit(20, 6).requires_grad_(), unit(20, 5)
    for name in ("reference", "triton"):
        with fastvq.backend(name):
            t64 = torch.tensor(0.3, dtype=torch.float64)  # (a temperature tensor: read in the op)
            for T, T_t in ((0.3, None), (float("nan"), t64)):
                torch.library.opcheck(torch.ops.fastvq.pairwise_kl_loss.default, (pred, target, T, T_t))
                _, lse_p, lse_t = torch.ops.fastvq.pairwise_kl_loss(pred.detach(), target, T, T_t)
                torch.library.opcheck(
                    torch.ops.fastvq.pairwise_kl_loss_backward.default,
                    (torch.tensor(1.5), pred.detach(), target, lse_p, lse_t, T, T_t),
                )


@pytest.mark.gpu
@pytest.mark.parametrize("B", [4096, 16384])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_large_gpu(B, dtype):
    pred = F.normalize(torch.randn(B, 64), dim=1).to(dtype)
    target = F.normalize(torch.randn(B, 256), dim=1).to(dtype)
    out = {}
    for name in ("triton", "reference"):
        with fastvq.backend(name):
            out[name] = loss_and_grad(fastvq.pairwise_kl_loss, pred, target, 0.05, torch.tensor(1.0))
    rtol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out["triton"][0], out["reference"][0], rtol=rtol, atol=1e-5)
    torch.testing.assert_close(out["triton"][1].float(), out["reference"][1].float(), rtol=rtol * 10, atol=rtol * 1e-3)


@pytest.mark.gpu
def test_65536_rows_fit_without_bxb_memory():
    B = 65536
    pred = F.normalize(torch.randn(B, 64), dim=1).requires_grad_()
    target = F.normalize(torch.randn(B, 256), dim=1)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with fastvq.backend("triton"):
        loss = fastvq.pairwise_kl_loss(pred, target, 0.05)
        loss.backward()
    torch.cuda.synchronize()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    # inputs aside, a few floats a row (a B x B float32 matrix would be 16 GiB)
    assert torch.cuda.max_memory_allocated() - base < 64 * 2**20 + 2 * pred.numel() * 4


def test_compile_fullgraph():
    def f(p, t):
        return fastvq.pairwise_kl_loss(F.normalize(p, dim=1), t, 0.1)

    p, t = randn(40, 8).requires_grad_(), unit(40, 6)
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(p, t)
    loss.backward()
    grad, p.grad = p.grad.clone(), None
    f(p, t).backward()
    torch.testing.assert_close(grad, p.grad)


def test_configs_by_precision():
    # float32 and 16-bit inputs tune over their own config lists, pruned to what fits the target
    # GPU by the estimate (tests/test_resource_estimates.py checks it against ptxas), and float32
    # streams D in narrower chunks
    from fastvq.kernels import _common
    from fastvq.kernels import pairwise_kl_loss as mod

    for fwd_bwd, extra in (((mod._FWD_16, mod._FWD_32), {}), ((mod._BWD_16, mod._BWD_32), {"BLOCK_DO": 64})):
        both = fwd_bwd[0] + fwd_bwd[1]
        for dtype, want in ((torch.float32, fwd_bwd[1]), (torch.bfloat16, fwd_bwd[0]), (torch.float16, fwd_bwd[0])):
            named = {"p_pred": torch.zeros(1, dtype=dtype)}
            for target in _common.TARGETS:
                with _common.compile_target(target) as tgt:
                    kept = mod._prune_configs(both, named, **extra)
                    assert kept and {id(c) for c in kept} <= {id(c) for c in want}, (dtype, target)
                    fits = [c for c in want if _common.fits_target(tgt, **mod._estimate(c, named, **extra))]
                    assert [id(c) for c in kept] == [id(c) for c in (fits or kept)]
    assert mod._block_d(100, torch.float32) == 32 and mod._block_d(100, torch.bfloat16) == 64
    assert mod.MAX_BLOCK_DO == {4: 64, 2: 128}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_finite_where_pred_g_product_overflows(backend, device, dtype):
    # F3: the gradient (G + G^T) @ pred / (B T) summed (G + G^T) @ pred in float32 first: with
    # pred[0] = 3e38 and |G_10 + G_01| = 1.5 that is -4.5e38 = -inf, though the gradient is
    # -1.5e37 (T = 10, B = 3). Now G is scaled by 2^-k (2^k > B + 1) before the sum, exactly.
    p = torch.tensor([[3e38, 0.0], [0.0, 10.0], [0.0, 10.0]], device=device, dtype=dtype).requires_grad_(True)
    t = torch.tensor([[1.0, 0.0], [100.0, 0.0], [0.0, 1.0]], device=device, dtype=dtype)
    (grad,) = torch.autograd.grad(fastvq.pairwise_kl_loss(p, t, 10.0), p)
    p64, t64 = p.detach().double(), t.double()
    eye = torch.eye(3, dtype=torch.bool, device=device)
    lp = torch.log_softmax((p64 @ p64.T / 10.0).masked_fill(eye, -math.inf), 1)
    lq = torch.log_softmax((t64 @ t64.T / 10.0).masked_fill(eye, -math.inf), 1)
    G = torch.where(eye, 0.0, lp.exp() - lq.exp())
    exact = (G + G.T) @ p64 / 30.0
    assert torch.isfinite(grad).all(), grad
    assert float(exact[1, 0]) < -1e37
    ft.assert_grad_nondegenerate(grad, exact, dtype=dtype, reduce_len=3)


# --------------------------------------------------------------------------- issue 9: scaling and overflow


def _exact_with_grad(pred, target, temperature):
    """float64 loss and gradient in pred (the diagonal excluded exactly), on the inputs' device."""
    p64 = pred.detach().double().requires_grad_()
    loss = exact_loss64(p64, target.detach().double(), temperature)
    (grad,) = torch.autograd.grad(loss, p64)
    return loss.detach(), grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gram_that_overflows_before_the_temperature_divides(backend, device, dtype):
    # Fuzz find: at T = 1000 a target row holding -3e38 has dot products ~1e39 with the others,
    # beyond float32, though every logit (the dot / 1000) is ~1e36 and representable. The old
    # kernels formed the dot first: a NaN gradient (Triton) or +inf loss (both). Rows are now
    # scaled by their own power of two before the dot product, the scale restored on the logit.
    target = randn(5, 6, seed=21)
    target[3, 2] = -3.0e38
    pred = F.normalize(randn(5, 4, seed=22, dtype=torch.float64), dim=1)
    pred, target = pred.to(device, dtype), target.to(device, dtype)
    T = 1000.0
    loss, grad = loss_and_grad(fastvq.pairwise_kl_loss, pred, target, T, torch.tensor(1.0, device=device))
    exact, exact_grad = _exact_with_grad(pred, target, T)
    assert torch.isfinite(loss) and torch.isfinite(grad).all(), (loss, grad)
    torch.testing.assert_close(loss.double(), exact, rtol=1e-4, atol=1e-6)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(grad.double(), exact_grad, rtol=tol, atol=tol * exact_grad.abs().max().item())


@pytest.mark.parametrize("norm2", [1.9e37, 1.5e38], ids=["loss2e37", "loss1.5e38"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_huge_representable_loss_is_finite(backend, device, dtype, norm2):
    # Rows +-v with |v|^2 = 1.5e38 (T = 1): same-sign pairs have logit 1.5e38, opposite-sign pairs
    # -1.5e38, so s - max(s) = -3e38 (representable), and with the target's nearly uniform
    # softmax every row's KL is ~1.5e38: the loss is ~1.5e38, finite. The old kernel formed
    # s - max(s) at full scale and summed sum_j q_ij (...) before normalising (both overflow),
    # and both backends summed the rows' KL before dividing by B (6e39): +inf. At |v|^2 = 1.9e37
    # (the README's ~1.9e37 loss) only the sums overflowed (8e38).
    B = 40
    signs = torch.where(torch.arange(B) % 2 == 0, 1.0, -1.0).double()
    v = F.normalize(randn(3, dtype=torch.float64, seed=23), dim=0) * norm2**0.5
    pred = (signs[:, None] * v[None, :]).to(device, dtype)
    target = (0.1 * F.normalize(randn(B, 5, dtype=torch.float64, seed=24), dim=1)).to(device, dtype)
    loss, grad = loss_and_grad(fastvq.pairwise_kl_loss, pred, target, 1.0, torch.tensor(1.0, device=device))
    exact, exact_grad = _exact_with_grad(pred, target, 1.0)
    assert 0.9 * norm2 < exact < 1.1 * norm2
    assert torch.isfinite(loss) and torch.isfinite(grad).all(), (loss, grad)
    torch.testing.assert_close(loss.double(), exact, rtol=1e-4 if dtype == torch.float32 else 2e-2, atol=0.0)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(grad.double(), exact_grad, rtol=tol, atol=tol * exact_grad.abs().max().item())


def test_logit_overflowing_to_minus_inf_with_zero_weight(backend, device):
    # P1 (adversarial probe): pred_0 . pred_1 = -1e40 overflows float32 to -inf, but its target
    # weight is exp(-1e32) = 0 and the other pairs agree exactly: the exact loss and gradient are
    # 0. The old Triton kernel formed 0 * inf = NaN for that pair and returned +inf (with a zero
    # gradient); the reference returned 0.
    t = torch.tensor([[1e16, 0.0], [-1e16, 0.0], [0.0, 1e16]], device=device)
    for pred, target in ((t * 1e4, t), (t, t * 1e4)):
        loss, grad = loss_and_grad(fastvq.pairwise_kl_loss, pred, target, 1.0, torch.tensor(1.0, device=device))
        assert loss.item() == 0.0, loss
        assert torch.equal(grad, torch.zeros_like(grad)), grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=str)
def test_single_row_is_zero_even_when_not_finite(backend, device, dtype, bad):
    # B = 1: no row has another to compare with, so no logit is ever formed from the inputs and
    # the loss is the empty mean, 0 (the documented B <= 1 answer), whatever the values. The op
    # used to turn it NaN for a NaN/inf entry, unlike the same row's finite case.
    pred = randn(1, 4, dtype=dtype, device=device)
    target = randn(1, 3, dtype=dtype, device=device)
    for p, t in ((pred.clone().fill_(bad), target), (pred, target.clone().fill_(bad))):
        p = p.requires_grad_()
        loss = fastvq.pairwise_kl_loss(p, t, 0.1)
        loss.backward()
        assert loss.item() == 0.0 and torch.equal(p.grad, torch.zeros_like(p)), (loss, p.grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16bit_backward_within_the_rounding_of_h(backend, device, dtype):
    # The fuzz find (fp16, T = 0.05, B = 40, rows of 1e-6 .. 1e2): the gradient element
    # sum_j h_ij pred_j / (B T) (h = G + G^T) cancels, so an error of ~1% of it is still within
    # the arithmetic: the Triton backward rounds h to the input dtype for its 16-bit tensor-core
    # dot (pred is exact), relative unit roundoff u per entry, accumulated in float32. Bound:
    # u |H| @ |pred| / (B T) (twice, for the rounding of h as computed) plus the output's rounding.
    B, T = 40, 0.05
    mag = 10.0 ** (2 - 8 * torch.special.ndtr(randn(B, 1, dtype=torch.float64, seed=5)))  # 10^2 .. 10^-6, log-uniform
    pred = (randn(B, 16, dtype=torch.float64, seed=25) * mag).to(device, dtype)
    target = (randn(B, 3, dtype=torch.float64, seed=26) * mag).to(device, dtype)
    _, grad = loss_and_grad(fastvq.pairwise_kl_loss, pred, target, T, torch.tensor(1.0, device=device))
    p64, t64 = pred.double(), target.double()
    eye = torch.eye(B, dtype=torch.bool, device=p64.device)
    P = (p64 @ p64.T / T).masked_fill(eye, -math.inf).softmax(1)
    Q = (t64 @ t64.T / T).masked_fill(eye, -math.inf).softmax(1)
    H = (P - Q) + (P - Q).T
    exact = H @ p64 / (B * T)
    u = torch.finfo(dtype).eps / 2
    bound = 2 * u * (H.abs() @ p64.abs()) / (B * T) + 2 * u * exact.abs() + 1e-30
    err = (grad.double() - exact).abs()
    assert (err <= bound).all(), f"worst error / bound {(err / bound).max():.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_huge_row_beside_a_small_one_at_a_small_temperature(backend, device, dtype):
    # Fuzz find (explorer, scale 8): at T = 0.001 a row's exponent is clamped to 57, so the row
    # -3.39e38 keeps |u| = 2^71 and its Gram entry with a small row times its own factor R_i
    # overflowed before the column factor brought the logit (1.45e37) back: loss +inf and a NaN
    # gradient, where two rows (one pair each) give exactly 0.
    pred = torch.tensor([[-4.2915e-05], [-3.3895e38]], device=device).to(dtype)
    target = randn(2, 33, seed=61, scale=1e4).to(device, dtype)
    loss, grad = loss_and_grad(fastvq.pairwise_kl_loss, pred, target, 0.001, torch.tensor(1.0, device=device))
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad)), (loss, grad)


def test_loss_that_is_zero_in_exact_arithmetic_is_not_negative(backend, device):
    # probe2 Q8: target = pred + 1e-4 relative noise at T = 1000 has an exact loss of ~1e-10, and
    # both backends returned about -4e-8 (within the float32 rounding of the rows' KL terms; a KL
    # is >= 0 exactly). Each row's KL is now clamped at 0, the value only: the gradient stays the
    # KL's own (G = P - Q), the same as before, not the zero gradient of the clamp.
    pred = randn(12, 6, seed=17, scale=10.0, device=device)
    target = pred + randn(12, 6, seed=1017, scale=1e-3, device=device)
    T = 1000.0
    loss, grad = loss_and_grad(fastvq.pairwise_kl_loss, pred, target, T, torch.tensor(1.0, device=device))
    exact, exact_grad = _exact_with_grad(pred, target, T)
    assert 0 <= exact < 1e-9
    assert loss.item() >= 0.0, loss
    loss_terms, grad_terms = kl_bounds(pred, target, T)
    ft.assert_close(loss, exact, dtype=torch.float32, **loss_terms, name="pairwise_kl_loss")
    ft.assert_close(grad, exact_grad, dtype=torch.float32, **grad_terms, name="pairwise_kl_loss grad")
    assert grad.abs().max() > 0


def _gram64(x):
    """``x x^T`` in float64, every entry the exactly rounded sum (math.fsum) of its products, which
    are exact in float64 for float32 and bf16 entries: products ~2^252 that cancel leave the rest
    intact in any order."""
    rows = x.double().tolist()
    return torch.tensor([[math.fsum(a * b for a, b in zip(r, c)) for c in rows] for r in rows],
                        dtype=torch.float64, device=x.device)


def _exact_kl_fsum(pred, target, temperature):
    """float64 loss, gradient in pred and its term magnitudes ``|H| @ |pred| / (B T)``, from
    :func:`_gram64`'s exactly rounded logits (the diagonal excluded exactly)."""
    B = pred.shape[0]
    p64 = pred.double()
    eye = torch.eye(B, dtype=torch.bool, device=p64.device)
    log_p = (_gram64(pred) / temperature).masked_fill(eye, -math.inf).log_softmax(1)
    log_q = (_gram64(target) / temperature).masked_fill(eye, -math.inf).log_softmax(1)
    loss = torch.where(eye, 0.0, log_q.exp() * (log_q - log_p)).sum() / B
    G = torch.where(eye, 0.0, log_p.exp() - log_q.exp())
    H = G + G.T
    return loss, H @ p64 / (B * temperature), H.abs() @ p64.abs() / (B * temperature)


def _check_against_fsum(pred, target, T, dtype):
    device = pred.device
    loss, grad = loss_and_grad(fastvq.pairwise_kl_loss, pred, target, T, torch.tensor(1.0, device=device))
    exact, exact_grad, grad_mag = _exact_kl_fsum(pred, target, T)
    assert torch.isfinite(exact) and torch.isfinite(exact_grad).all()
    assert torch.isfinite(loss) and torch.isfinite(grad).all(), (loss, grad)
    torch.testing.assert_close(loss.double(), exact, rtol=1e-4, atol=1e-6)
    # per element, relative to its own terms (entries 2^126 and 1 sit in the same rows); the
    # 16-bit backward rounds G + G^T to the input dtype for its dot
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    err = (grad.double() - exact_grad).abs()
    assert (err <= tol * grad_mag + 1e-30).all(), f"worst error / terms {(err / (grad_mag + 1e-30)).max():.3g}"


@pytest.mark.parametrize("temperature", [1.0, 0.5], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("huge", ["pred", "target"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_products_beyond_float32_that_cancel(backend, device, dtype, huge, temperature):
    # README known limit (now closed): rows 0 and 1 hold +-2^126 at the same coordinates, so
    # their products are 2^252 and cancel to the representable logit 0; every other logit is
    # small. A row exponent is clamped at hi = 62 - fb (61 at T = 1), so |u| = 2^65 and the
    # scaled float32 dot overflowed (inf - inf): loss +inf, gradient NaN, both backends. A pair
    # with a clamped row now takes its logit from a float64 dot of the rows as given.
    big = torch.tensor([[2.0**126, 2.0**126, 1, 0], [2.0**126, -2.0**126, 0, 1], [0, 0, 2, -1],
                        [0, 0, -1, 3], [0, 0, 0.5, 0.5]], device=device, dtype=dtype)
    small = F.normalize(randn(5, 3, seed=31, dtype=torch.float64, device=device), dim=1).to(dtype)
    pred, target = (big, small) if huge == "pred" else (small, big)
    _check_against_fsum(pred, target, temperature, dtype)


@pytest.mark.parametrize("case", ["both-clamped", "partner-clamped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_tiny_entry_times_huge_partner_is_kept(backend, device, dtype, case):
    # A finite wrong number before: row 0's entry e sits 2^-149 below the power of two its row
    # is scaled by (2^-100 beside 2^126, whose exponent is clamped at 61: u = 2^-161; or 2^-109
    # beside 2^40: u = 2^-150), so the scaled copy flushed it to 0, while row 1 (2^100 / 2^109,
    # clamped) multiplies it back to the logit 1: both backends returned the loss of logit 0.
    a, b = (2.0**126, 2.0**-100) if case == "both-clamped" else (2.0**40, 2.0**-109)
    pred = torch.tensor([[a, b, 0], [0, 1 / b, 0], [0, 0, 1], [0, b, 0.5]], device=device, dtype=dtype)
    target = F.normalize(randn(4, 3, seed=32, dtype=torch.float64, device=device), dim=1).to(dtype)
    assert _gram64(pred)[0, 1] == 1.0
    _check_against_fsum(pred, target, 1.0, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_wide_rows_across_tiles(backend, device, dtype):
    # The float64 logits of wide rows (here rows 3 and 66, +-2^126 cancelling) across row and
    # column tiles (the interpreter's are 64 wide; B = 70 leaves a ragged last tile): every pair of
    # a wide row comes from float64 and every other pair from the float32 path, in the forward
    # and the backward alike, with the padding left out.
    B = 70
    pred = torch.zeros(B, 4, dtype=torch.float64, device=device)
    pred[:, 2:] = F.normalize(randn(B, 2, seed=33, dtype=torch.float64, device=device), dim=1) * 2
    pred[3] = torch.tensor([2.0**126, 2.0**126, 0.5, 0.0])
    pred[66] = torch.tensor([2.0**126, -2.0**126, 0.0, 0.5])
    target = F.normalize(randn(B, 5, seed=34, dtype=torch.float64, device=device), dim=1) * 2
    _check_against_fsum(pred.to(dtype), target.to(dtype), 1.0, dtype)


def test_wide_rows_with_the_backward_tiled_differently(backend, device, monkeypatch):
    # Whether a pair's logits come from float64 depends on its two rows only (not on the tile it
    # falls in), so a forward and a backward with different tiles (autotuned apart on a GPU) agree
    # on which pairs are float64 and add each once. The backward runs 16 x 32 tiles here, the
    # forward 64 x 64 (interpreter) or its own. (Logits ~1e10 would also need the float32 dots of
    # the two passes to round alike, which differently shaped interpreter dots do not: not this
    # test's subject.)
    import triton

    from fastvq.kernels import pairwise_kl_loss as mod

    monkeypatch.setattr(mod._pairwise_kl_loss_bwd_kernel, "configs",
                        [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4)])
    monkeypatch.setattr(mod._pairwise_kl_loss_bwd_kernel, "cache", {})
    B = 40
    pred = torch.zeros(B, 4, dtype=torch.float64, device=device)
    pred[:, 2:] = F.normalize(randn(B, 2, seed=35, dtype=torch.float64, device=device), dim=1)
    pred[5] = torch.tensor([2.0**126, 2.0**126, 0.5, 0.0])
    pred[37] = torch.tensor([2.0**126, -2.0**126, 0.0, 0.5])
    target = F.normalize(randn(B, 3, seed=36, dtype=torch.float64, device=device), dim=1) * 2
    _check_against_fsum(pred.float(), target.float(), 1.0, torch.float32)


# --------------------------------------------------------------------------- probe5 KL1: logits beyond float32


F32_MAX = float(torch.finfo(torch.float32).max)


def test_equal_inputs_with_a_logit_beyond_float32(backend, device):
    # probe5 KL1: pred_0 . pred_1 = 4e38 overflows float32, and target == pred: the exact loss is
    # 0 and so is the gradient (P = Q). The reference returned +inf and an all-NaN gradient,
    # Triton 0 and NaN in rows 0-1. A wide pair's logit now stays float64 where float32 cannot
    # hold it, and so does every normaliser it enters.
    p = torch.tensor([[2e19, 0.0], [2e19, 1.0], [0.0, 1.0]], device=device)
    loss, grad = loss_and_grad(fastvq.pairwise_kl_loss, p, p.clone(), 1.0, torch.tensor(1.0, device=device))
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad)), (loss, grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_ordinary_pred_against_a_target_beyond_float32(backend, device, dtype):
    # probe5 KL1: target rows ~1e20 have logits ~1e40, so each target softmax is one-hot, and the
    # exact loss (-mean log p at the target's choices) and gradient are ordinary numbers; both
    # backends returned +inf and an all-NaN gradient.
    pred = unit(7, 4, torch.float64).to(device, dtype)
    target = randn(7, 3, seed=41, scale=1e20, device=device).to(dtype)
    loss, grad = loss_and_grad(fastvq.pairwise_kl_loss, pred, target, 1.0, torch.tensor(1.0, device=device))
    exact, exact_grad = _exact_with_grad(pred, target, 1.0)
    assert 0.1 < exact < 10 and exact_grad.abs().max() < 1
    assert torch.isfinite(loss) and torch.isfinite(grad).all(), (loss, grad)
    torch.testing.assert_close(loss.double(), exact, rtol=1e-5, atol=0.0)
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(grad.double(), exact_grad, rtol=tol, atol=tol * exact_grad.abs().max().item())


def _beyond_float32_case(kind, dtype, seed, device):
    """``(pred, target, T)`` with logits beyond float32 (probe5 KL1): per-row magnitudes
    log-uniform across the dtype's range, rows 0 and 1 at the top. ``target-beyond``: an ordinary
    pred; ``same-geometry``: target = pred / 2 (both softmaxes one-hot at the same place in the
    huge rows: a small loss); ``both-beyond``: independent (the loss itself usually overflows,
    the gradient does not)."""
    B = 10
    if dtype == torch.float16:  # float16 logits overflow float32 only at tiny temperatures
        T, top, lo, hi, small = 1e-33, 3e4, -4.0, 4.5, (-4.0, -2.0)
    else:
        T = (1e-3, 1.0, 1e3, 0.05)[seed % 4]
        top, lo, hi, small = 1e24, -30.0, 25.0, (-1.0, 1.0)
    draws = iter(range(1000 * seed, 1000 * seed + 10))

    def rows(d, a, b, big):
        u = torch.special.ndtr(randn(B, 1, dtype=torch.float64, seed=next(draws), device=device))  # uniform
        mag = 10.0 ** (a + (b - a) * u)
        if big:
            mag[:2] = top
        return F.normalize(randn(B, d, dtype=torch.float64, seed=next(draws), device=device), dim=1) * mag

    if kind == "target-beyond":
        pred, target = rows(5, *small, False), rows(4, lo, hi, True)
    elif kind == "same-geometry":
        pred = rows(5, lo, hi, True)
        target = pred / 2
    else:
        pred, target = rows(5, lo, hi, True), rows(4, lo, hi, True)
    return pred.to(dtype), target.to(dtype), T


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("kind", ["target-beyond", "same-geometry", "both-beyond"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_logits_beyond_float32_against_float64(backend, device, dtype, kind, seed):
    # probe5 KL1 / issue 9: the loss and gradient follow the float64 computation wherever they are
    # representable (+inf only where the exact loss overflows; a NaN gradient never), by the
    # fuzz suite's oracle and bounds (logit roundings propagated through the softmaxes).
    from tests.fuzz.test_fuzz_train_ops import _check_kl, _kl64

    pred, target, T = _beyond_float32_case(kind, dtype, seed, device)
    p64, t64 = pred.double(), target.double()
    assert max((p64 @ p64.T).abs().max(), (t64 @ t64.T).abs().max()) / T > F32_MAX  # the subject
    g = 1e-30 if dtype == torch.float16 else 1.0  # (at T = 1e-33 a float16 gradient needs a small upstream)
    loss, grad = loss_and_grad(fastvq.pairwise_kl_loss, pred, target, T, torch.tensor(g, device=device))
    exact, exact_grad = _kl64(p64, t64, T, dtype)[:2]  # (on the host)
    if kind != "both-beyond":
        assert exact < F32_MAX and (exact_grad * g).abs().max() < float(torch.finfo(dtype).max)
    assert torch.isfinite(exact_grad).all() and not torch.isnan(grad).any(), grad
    _check_kl(f"pairwise_kl_loss[{backend},T={T}]", pred, target, T, loss, grad, g=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_row_whose_largest_logit_is_below_float32(backend, device, dtype):
    # Row 0 is opposite to every other row: its largest logit is -1e40, beyond float32. Its
    # softmax is that of float64 logits (its pairs are all wide); the Triton main loops read its
    # maximum as -float32max, not -inf, so the pairs they leave to the float64 loop (-inf there)
    # have probability 0 rather than exp((-inf) - (-inf)) = NaN.
    pred = torch.tensor([[1e20, 0.0, 0.0], [-1e20, 5e19, 0.0], [-1e20, 0.0, 5e19], [-1e20, -5e19, -5e19]],
                        device=device, dtype=dtype)
    target = F.normalize(randn(4, 3, seed=43, dtype=torch.float64, device=device), dim=1).to(dtype)
    for t in (pred, target):
        loss, grad = loss_and_grad(fastvq.pairwise_kl_loss, pred, t, 1.0, torch.tensor(1.0, device=device))
        exact, exact_grad = _exact_with_grad(pred, t, 1.0)
        assert torch.isfinite(exact_grad).all() and not torch.isnan(grad).any(), grad
        if t is pred:
            assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad)), (loss, grad)
        else:
            assert exact > F32_MAX and loss.item() == float("inf")
            tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
            torch.testing.assert_close(grad.double(), exact_grad, rtol=tol, atol=tol * exact_grad.abs().max().item())


def test_wide_threshold_scales_with_the_feature_count(backend, device):
    # Rows below the wide threshold (max |x| < 2^54 here) have float32 logits below D 2^109: with
    # more than 2^19 features that can pass float32 (x_0 . x_1 / T ~ 2^128.5 at D = 2^19.5). Both
    # rows take float64 logits now (the threshold lowers by log2 D beyond 2^18 features, decided
    # once in logit_scaling for both backends), so the target == pred loss is 0 with a zero
    # gradient, not +inf and NaN.
    from fastvq.reference.pairwise_kl_loss import logit_scaling

    D, T = 741455, 0.505
    assert logit_scaling(T, D)[5] < logit_scaling(T, 2**18 - 1)[5] == logit_scaling(T)[5]
    if backend == "triton" and not torch.cuda.is_available():
        pytest.skip("D = 741455 under the Triton interpreter takes many minutes (the threshold is the op's, above)")
    x = torch.full((3, D), 2.0**53.99, dtype=torch.float64)
    x[2] = 1.0
    p = x.float().to(device)
    assert float(p[0].double() @ p[1].double()) / T > F32_MAX
    loss, grad = loss_and_grad(fastvq.pairwise_kl_loss, p, p.clone(), T, torch.tensor(1.0, device=device))
    assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad)), (loss, grad)


# ------------------------------------------------------------------ mutation round C (mutC): behaviour no test pinned


def test_kl_backward_caps_a_probability_at_one():
    # C16: _exp_prob's cap (a logit one rounding above its row's saved maximum: a GPU's dot rounds
    # s_ij and s_ji apart) was dropped and no test saw it (the interpreter's dots are symmetric).
    # At logits ~1e36 one float32 ulp is ~1e29: exp(1e29) = inf, a NaN / inf gradient. Here the
    # forward's saved row maxima are lowered by one float32 ulp, as such a forward would have
    # them; the gradient must not change (these softmaxes are one-hot: the top probability is 1)
    from fastvq.kernels.pairwise_kl_loss import pairwise_kl_loss_bwd, pairwise_kl_loss_fwd
    from fastvq.reference.pairwise_kl_loss import logit_scaling, row_max

    pred = randn(12, 5, seed=3, scale=1e18 / 5**0.5)
    target = F.normalize(randn(12, 4, dtype=torch.float64, seed=4), dim=1).float()
    scaling = logit_scaling(1.0, 5)
    _, lse_p, lse_t = pairwise_kl_loss_fwd(pred, target, 1.0, scaling, row_max(pred), row_max(target))
    g = torch.tensor(1.0)
    want = pairwise_kl_loss_bwd(g, pred, target, lse_p, lse_t, 1.0, scaling)
    low = lse_p.clone()
    m32 = lse_p[0].float()
    assert (m32.double() == lse_p[0]).all() and (m32.abs() > 1e34).all()
    low[0] = torch.nextafter(m32, torch.tensor(float("-inf"))).double()
    got = pairwise_kl_loss_bwd(g, pred, target, low, lse_t, 1.0, scaling)
    assert torch.isfinite(want).all() and torch.isfinite(got).all()
    torch.testing.assert_close(got, want)


def _wide_backends_agree(pred, target):
    """Loss and gradient at T = 1, the Triton kernels against the reference: finite, and close
    (the triton side reads ``pred`` as given, strides included; the reference a packed copy)."""
    out = {}
    for name in ("reference", "triton"):
        with fastvq.backend(name):
            p = pred.clone().requires_grad_() if name == "reference" else pred.detach().requires_grad_()
            loss = fastvq.pairwise_kl_loss(p, target, 1.0)
            loss.backward()
        out[name] = (loss.detach(), p.grad)
    (l_ref, g_ref), (l_tri, g_tri) = out["reference"], out["triton"]
    assert torch.isfinite(l_tri) and torch.isfinite(g_tri).all()
    torch.testing.assert_close(l_tri, l_ref, rtol=1e-5, atol=0.0)
    torch.testing.assert_close(g_tri, g_ref, rtol=1e-4, atol=1e-4 * g_ref.abs().max().item())


def test_kl_wide_row_in_an_early_column_tile():
    # C22 / C64: whether the float64 loop of wide pairs runs was taken from the LAST column tile
    # only (b_seen = b_wide), and no test saw it: every wide-row test has B <= 5, one tile. At
    # B = 80 (the interpreter's tiles: 64 x 64) row 3 is wide (max |x| ~ 1e18 >= 2^54 at T = 1);
    # the row block 64..79 meets it in its first column tile only
    pred = F.normalize(randn(80, 6, dtype=torch.float64, seed=51), dim=1)
    pred[3] *= 1e18
    pred = pred.float()
    target = F.normalize(randn(80, 5, dtype=torch.float64, seed=52), dim=1).float()
    _wide_backends_agree(pred, target)


def test_kl_wide_logits_read_only_the_rows_columns():
    # C27: the float64 dot of the wide pairs (float32 inputs, 16-column chunks) loaded the column
    # operand without its column mask; the row operand's zeros hid it unless the memory past a
    # row's end holds an inf or NaN. pred is a view of a wider buffer whose extra columns are
    # inf (any strided input is read as given there), with a wide row (1e18 at T = 1)
    base = torch.full((12, 16), float("inf"))
    base[:, :6] = F.normalize(randn(12, 6, dtype=torch.float64, seed=61), dim=1).float()
    base[3, :6] *= 1e18
    pred = base[:, :6]
    target = F.normalize(randn(12, 5, dtype=torch.float64, seed=62), dim=1).float()
    _wide_backends_agree(pred, target)


def test_kl_wide_logits_use_the_float32_m():
    # C30: logit_scaling's m (1 / T = m 2^(fa + fb)) not rounded to float32. The kernels hold m as
    # a float32 (a GPU types a Python float argument fp32; kernels._common makes the interpreter
    # do the same); the reference's float64 wide logits must use that float32 m too. At T = 0.3
    # (1/T not a float32) the wide rows' largest logits are float32(x_i . x_j * m32 * 2^(fa+fb))
    from fastvq.reference.pairwise_kl_loss import logit_scaling, pairwise_kl_loss_fwd_ref

    pred = F.normalize(randn(16, 6, dtype=torch.float64, seed=71), dim=1)
    pred *= torch.logspace(17, 19, 16, dtype=torch.float64)[:, None]  # every row wide (>= 2^54)
    pred = pred.float()
    target = F.normalize(randn(16, 5, dtype=torch.float64, seed=72), dim=1).float()
    T = 0.3
    m, fa, fb = logit_scaling(T, 6)[:3]
    m32 = float(torch.tensor(1 / T, dtype=torch.float32).item() / 2.0 ** (fa + fb))
    assert m == m32
    p64 = pred.double()
    logits = ((p64 @ p64.T) * math.ldexp(m32, fa + fb)).float().double()
    logits.fill_diagonal_(float("-inf"))
    _, lse_p, _ = pairwise_kl_loss_fwd_ref(pred, target, T)
    assert torch.equal(lse_p[0], logits.amax(1)), (lse_p[0] - logits.amax(1)) / lse_p[0]
