import pytest
import torch

import fastvq
import fastvq.testing as ft
from fastvq.reference.residual_quantize import residual_quantize_ref
from tests.utils import count_kernel_launches, generator, noncontiguous, randn

CASES = [  # (N, L, K, D)
    pytest.param(1, 1, 1, 1, id="N1-L1-K1-D1"),
    pytest.param(127, 3, 3, 60, id="N127-L3-K3-D60"),
    pytest.param(33, 2, 100, 100, id="N33-L2-K100-D100"),
    pytest.param(9, 2, 1000, 16, id="N9-L2-K1000-D16"),
    pytest.param(40, 8, 17, 5, id="N40-L8-K17-D5"),
    pytest.param(20, 4, 1, 7, id="N20-L4-K1-D7"),
    pytest.param(0, 2, 5, 8, id="N0"),
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def assert_greedy(x, codebooks, codes, kernel, chunk=16384):
    """Level by level, each row's code is a nearest one to the residual the op searched with, within
    fastvq.testing's rounding bound (float64 on the same rounded operands): the float32 residual
    with the op's own choices subtracted (so a legitimate near-tie flip does not cascade), which the
    Triton kernel (``kernel``) rounds to the codebook dtype for its dot and the reference does not."""
    L, K, D = codebooks.shape
    x, codes = x.reshape(-1, D), codes.reshape(-1, L)
    for s in range(0, x.shape[0], chunk):
        r = x[s : s + chunk].float()
        for lvl in range(L):
            idx = codes[s : s + chunk, lvl]
            cb = codebooks[lvl] if kernel else codebooks[lvl].float()
            ft.assert_argmin_within_bound(r.to(cb.dtype), cb, idx, "l2", name=f"residual_quantize level {lvl}")
            r = r - codebooks[lvl].float()[idx]


def sum_of_codes(codebooks, codes, dtype):
    """float32 sum of the chosen codes in level order, cast to ``dtype``: bitwise what the op returns."""
    L, K, D = codebooks.shape
    flat = codes.reshape(-1, L)
    q = torch.zeros(flat.shape[0], D, dtype=torch.float32, device=codes.device)
    for lvl in range(L):
        q = q + codebooks[lvl].float()[flat[:, lvl]]
    return q.to(dtype).reshape(*codes.shape[:-1], D)


@pytest.mark.parametrize("N,L,K,D", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity(backend, N, L, K, D, dtype):
    x, codebooks = randn(N, D, dtype=dtype), randn(L, K, D, dtype=dtype)
    q, codes = fastvq.residual_quantize(x, codebooks)
    assert q.shape == (N, D) and q.dtype == dtype
    assert codes.shape == (N, L) and codes.dtype == torch.int64
    assert not q.isnan().any(), "unwritten output element"
    assert_greedy(x, codebooks, codes, backend == "triton")
    assert torch.equal(q, sum_of_codes(codebooks, codes, dtype))


def test_matches_reference_codes_fp32(backend):
    # well-separated codes (scale 10 vs residual noise): no near-ties, so codes agree exactly
    codebooks = randn(3, 37, 24, scale=10.0, seed=1)
    pick = torch.randint(0, 37, (50, 3), generator=generator(2))
    x = sum(codebooks[lvl][pick[:, lvl]] * (0.5 ** lvl) for lvl in range(3)) + 0.01 * randn(50, 24)
    q, codes = fastvq.residual_quantize(x, codebooks)
    q_ref, codes_ref = residual_quantize_ref(x, codebooks)
    assert torch.equal(codes, codes_ref)
    assert torch.equal(q, q_ref)


def test_exact_ties_pick_smallest_index(backend):
    # Small integers: every distance below is exact in float32 (and bf16/fp16 dot operands).
    g = generator(0)
    K, D = 40, 4
    cb = torch.randint(-3, 4, (2, K, D), generator=g).float()
    cb[0, 35] = cb[0, 3]  # duplicate in a later K tile
    cb[0, 4] = cb[0, 3]  # duplicate in the same tile
    cb[1] = torch.randint(5, 9, (K, D), generator=g).float()  # level 1: all far from 0 ...
    cb[1, 2] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # ... but these three, tied nearest to 0
    cb[1, 20] = cb[1, 2]
    cb[1, 39] = cb[1, 2]
    x = cb[0, 3].repeat(5, 1)  # level 0 distance 0 to codes 3, 4, 35; residual 0 after it
    # a point midway between two distinct codes 7 and 30 of level 0 (and far from the rest)
    cb[0, 7] = torch.tensor([20.0, 20.0, 20.0, 20.0])
    cb[0, 30] = torch.tensor([22.0, 20.0, 20.0, 20.0])
    mid = torch.tensor([[21.0, 20.0, 20.0, 20.0]])
    x = torch.cat([x, mid])
    for dtype in DTYPES:
        _, codes = fastvq.residual_quantize(x.to(dtype), cb.to(dtype))
        assert codes[:5, 0].tolist() == [3] * 5, dtype
        assert codes[:5, 1].tolist() == [2] * 5, dtype
        assert codes[5, 0].item() == 7, dtype


def test_gradient_straight_through_once(backend):
    x = randn(6, 5, 12).requires_grad_()
    codebooks = randn(3, 9, 12).requires_grad_()
    g = randn(6, 5, 12)
    q, codes = fastvq.residual_quantize(x, codebooks)
    assert q.requires_grad and not codes.requires_grad
    (q * g).sum().backward()
    assert torch.equal(x.grad, g)  # exactly the upstream gradient, once (not L times)
    assert codebooks.grad is None


def test_gradient_low_precision_and_mixed(backend):
    x = randn(7, 10, dtype=torch.bfloat16).requires_grad_()
    codebooks = randn(2, 5, 10, dtype=torch.float32).requires_grad_()
    g = randn(7, 10, dtype=torch.bfloat16)
    q, codes = fastvq.residual_quantize(x, codebooks)
    assert q.dtype == torch.bfloat16  # dtype of x; the search ran in float32
    assert_greedy(x, codebooks, codes, backend == "triton")
    (q * g).sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.equal(x.grad, g)
    assert codebooks.grad is None


def test_batch_dims(backend):
    x, codebooks = randn(2, 3, 5, 20), randn(4, 11, 20)
    q, codes = fastvq.residual_quantize(x, codebooks)
    assert q.shape == (2, 3, 5, 20) and codes.shape == (2, 3, 5, 4)
    q2, codes2 = fastvq.residual_quantize(x.reshape(30, 20), codebooks)
    assert torch.equal(codes.reshape(30, 4), codes2) and torch.equal(q.reshape(30, 20), q2)


def test_one_dim_x(backend):
    x, codebooks = randn(20), randn(2, 7, 20)
    q, codes = fastvq.residual_quantize(x, codebooks)
    assert q.shape == (20,) and codes.shape == (2,)
    assert torch.equal(codes, fastvq.residual_quantize(x[None], codebooks)[1][0])


def test_noncontiguous(backend):
    x, codebooks = randn(25, 18), randn(3, 13, 18)
    q, codes = fastvq.residual_quantize(x, codebooks)
    cb_nc = codebooks.transpose(0, 1).contiguous().transpose(0, 1)  # strides (18, 54, 1)
    assert not cb_nc.is_contiguous()
    for cb in (cb_nc, noncontiguous(codebooks)):
        q2, codes2 = fastvq.residual_quantize(noncontiguous(x), cb)
        assert torch.equal(codes, codes2) and torch.equal(q, q2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_d_chunked_kernel(dtype):
    # The D-chunked kernel (residual in a float32 workspace) that runs for D > 1024, forced on
    # small D, and the real thing through the public function at D = 1100.
    from fastvq.kernels.residual_quantize import residual_quantize_fwd

    x, codebooks = randn(37, 100, dtype=dtype), randn(3, 20, 100, dtype=dtype)
    q, codes = residual_quantize_fwd(x, codebooks, max_register_d=16)
    assert_greedy(x, codebooks, codes, True)
    assert torch.equal(q, sum_of_codes(codebooks, codes, dtype))
    q_reg, codes_reg = residual_quantize_fwd(x, codebooks)
    if dtype == torch.float32:
        assert_greedy(x, codebooks, codes_reg, True)

    x, codebooks = randn(5, 1100, dtype=dtype), randn(2, 3, 1100, dtype=dtype)
    with fastvq.backend("triton"):
        q, codes = fastvq.residual_quantize(x, codebooks)
    assert_greedy(x, codebooks, codes, True)
    assert torch.equal(q, sum_of_codes(codebooks, codes, dtype))


@pytest.mark.parametrize(
    "x,codebooks,err",
    [
        (torch.randn(3, 4), torch.randn(5, 4), ValueError),
        (torch.randn(3, 4), torch.randn(2, 5, 3), ValueError),
        (torch.randn(3, 4), torch.randn(0, 5, 4), ValueError),
        (torch.randn(3, 4), torch.randn(2, 0, 4), ValueError),
        (torch.randn(3, 0), torch.randn(2, 5, 0), ValueError),
        (torch.randn(()), torch.randn(2, 5, 1), ValueError),
        (torch.randint(0, 3, (3, 4)), torch.randn(2, 5, 4), TypeError),
        (torch.randn(3, 4), torch.randint(0, 3, (2, 5, 4)), TypeError),
        (torch.randn(3, 4, dtype=torch.float64), torch.randn(2, 5, 4), TypeError),
        ([[1.0]], torch.randn(2, 5, 1), TypeError),
        (torch.randn(3, 4), torch.randn(2, 5, 4, device="meta"), ValueError),
    ],
    ids=["codebooks-2D", "D-mismatch", "L0", "K0", "D0", "x-0D", "x-int", "codebooks-int", "x-float64",
         "not-tensor", "devices"],
)
def test_bad_input(x, codebooks, err):
    with pytest.raises(err, match="residual_quantize"):
        fastvq.residual_quantize(x, codebooks)


def test_opcheck():
    x, codebooks = randn(6, 5).requires_grad_(), randn(3, 4, 5).requires_grad_()
    for name in ("reference", "triton"):
        with fastvq.backend(name):
            torch.library.opcheck(torch.ops.fastvq.residual_quantize.default, (x, codebooks))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_large_gpu(dtype):
    x = randn(262144, 256, dtype=dtype)
    codebooks = randn(8, 256, 256, dtype=dtype, scale=0.5)
    with fastvq.backend("triton"):
        q, codes = fastvq.residual_quantize(x, codebooks)
    with fastvq.backend("reference"):
        q_ref, codes_ref = fastvq.residual_quantize(x, codebooks)
    assert_greedy(x, codebooks, codes, True)
    assert torch.equal(q, sum_of_codes(codebooks, codes, dtype))
    # level 0 sees the same input in both: near-tie flips only
    assert (codes[:, 0] == codes_ref[:, 0]).float().mean() > 0.99


@pytest.mark.gpu
def test_large_d_gpu():
    x, codebooks = randn(4099, 2048), randn(4, 300, 2048)
    with fastvq.backend("triton"):
        q, codes = fastvq.residual_quantize(x, codebooks)
    assert_greedy(x, codebooks, codes, True)
    assert torch.equal(q, sum_of_codes(codebooks, codes, torch.float32))



@pytest.mark.parametrize("name", ["reference", "triton"])
def test_triton_backend_really_launches_kernels(monkeypatch, name):
    from fastvq.kernels import residual_quantize as kmod

    launched = count_kernel_launches(monkeypatch, kmod, "_residual_quantize_fwd_kernel")
    with fastvq.backend(name):
        fastvq.residual_quantize(randn(9, 5), randn(3, 4, 5))
    assert launched == (["_residual_quantize_fwd_kernel"] if name == "triton" else [])
