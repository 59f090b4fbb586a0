import pytest
import torch
import torch.nn.functional as F

import fastvq
import fastvq.testing as ft
from fastvq.bench.peers import vqpt_rotate_to as _vqpt_rotate_to
from fastvq.ops.rotation_trick import EPS_ANTIPODAL, EPS_NORM
from tests.utils import assert_close, backend_cells, noncontiguous, randn

CASES = [  # (batch shape, D)
    pytest.param((1,), 1, id="N1-D1"),
    pytest.param((17,), 1, id="N17-D1"),
    pytest.param((5,), 2, id="N5-D2"),
    pytest.param((127,), 60, id="N127-D60"),
    pytest.param((3, 11), 100, id="B3x11-D100"),
    pytest.param((0,), 16, id="N0"),
]


def _grad64(e, q, g):
    """float64 oracle, straight from the paper's formula (no fallback handling)."""
    e, q, g = e.double(), q.double(), g.double()
    a, b = e.norm(dim=-1, keepdim=True), q.norm(dim=-1, keepdim=True)
    eh, qh = e / a, q / b
    w = (eh + qh) / (eh + qh).norm(dim=-1, keepdim=True)
    gw, gq = (g * w).sum(-1, keepdim=True), (g * qh).sum(-1, keepdim=True)
    return (b / a) * (g - 2 * gw * w + 2 * gq * eh)


def assert_grad_close(actual, expected, e, q, g, dtype):
    """fastvq.testing's bounds, per row: the fp32 work (chained length-D reductions: |e|, |q|,
    |e^ + q^|, g.w, g.q^) on the row's gradient scale ``lambda |g|`` times the conditioning
    ``1 + 1/|e^ + q^|`` (w = s/|s| amplifies rounding near the antipode), plus the store in
    ``dtype``; and non-degenerate: non-zero where the exact gradient is, close in norm."""
    e, q, g = e.double(), q.double(), g.double()
    D = e.shape[-1]
    a, b = e.norm(dim=-1, keepdim=True), q.norm(dim=-1, keepdim=True)
    cond = 1 + 1 / (e / a + q / b).norm(dim=-1, keepdim=True)
    n = 4 * D + 8
    ft.assert_close(actual, expected, dtype=dtype, reduce_len=n, magnitude=(b / a) * g.norm(dim=-1, keepdim=True) * cond,
                    name="rotation_trick grad")
    if actual.numel():
        ft.assert_grad_nondegenerate(actual, expected, dtype=dtype, reduce_len=n, condition=2 * float(cond.max()),
                                     name="rotation_trick grad")


def _regular(e, q):
    """``e`` with its near-antipodal rows (``|e^ + q^| < 0.05``, where the documented fallback
    applies and the paper's formula is ill-conditioned) negated, so every row is regular. Random
    D = 2 rows land within EPS_ANTIPODAL of the antipode with probability ~3e-4 each."""
    ns = (F.normalize(e.double(), dim=-1) + F.normalize(q.double(), dim=-1)).norm(dim=-1, keepdim=True)
    return torch.where(ns < 0.05, -e, e)


def _grad_of(fn, e, q, g):
    e = e.detach().clone().requires_grad_()
    q = q.detach().clone().requires_grad_()
    fn(e, q).backward(g)
    return e.grad, q.grad


@pytest.mark.parametrize("batch,D", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_forward_is_q_and_grad_matches_float64(backend, batch, D, dtype):
    e, q, g = randn(*batch, D, dtype=dtype), randn(*batch, D, dtype=dtype), randn(*batch, D, dtype=dtype)
    e = _regular(e, q)
    e_ = e.clone().requires_grad_()
    out = fastvq.rotation_trick(e_, q)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.equal(out, q)
    out.backward(g)
    assert e_.grad.dtype == dtype and e_.grad.shape == e.shape
    assert torch.isfinite(e_.grad).all()
    # float32 math on the (rounded) inputs; the rounding of the result is the dtype's own
    if D > 1:  # D = 1: e^ + q^ is 0 or 2, tested separately
        assert_grad_close(e_.grad, _grad64(e, q, g), e, q, g, dtype)


@pytest.mark.parametrize("D", [2, 7, 64])
def test_grad_matches_vector_quantize_pytorch(backend, D):
    e, q, g = randn(50, D), randn(50, D, scale=3.0), randn(50, D)
    e = _regular(e, q)  # "regular inputs": away from the antipode, where only we fall back
    ours, ours_q = _grad_of(fastvq.rotation_trick, e, q, g)
    theirs, _ = _grad_of(_vqpt_rotate_to, e.double(), q.double(), g.double())  # their formula, float64
    assert ours_q is None or not ours_q.any()
    assert_grad_close(ours, theirs, e, q, g, torch.float32)
    theirs32, _ = _grad_of(_vqpt_rotate_to, e, q, g)  # and in float32, as they run it
    assert_grad_close(ours, theirs32, e, q, g, torch.float32)


def test_vqpt_value_is_not_exact_but_ours_is(backend):
    # the case the issue reports: tiny e, where their value is q * |e| / 1e-6, far from q
    e, q = randn(4, 8, scale=1e-8), randn(4, 8)
    assert not torch.allclose(_vqpt_rotate_to(e, q), q, atol=1e-3)
    assert torch.equal(fastvq.rotation_trick(e, q), q)


def test_q_gets_no_gradient(backend):
    e, q = randn(9, 5).requires_grad_(), randn(9, 5).requires_grad_()
    fastvq.rotation_trick(e, q).sum().backward()
    assert q.grad is None or not q.grad.any()
    assert e.grad is not None and e.grad.abs().sum() > 0


def test_degenerate_rows_fall_back_to_straight_through(backend):
    D = 6
    e, q, g = randn(8, D), randn(8, D), randn(8, D)
    e[0] = 0  # e = 0
    e[1] = -2.5 * q[1]  # antipodal
    e[2] = -1e-3 * q[2]  # antipodal, tiny
    q[3] = 0  # q = 0
    e[4] = 1e-9  # |e| below EPS_NORM
    e[5] = -q[5] + 1e-6 * randn(D)  # |e^ + q^| ~ 1e-6 < EPS_ANTIPODAL
    e_ = e.clone().requires_grad_()
    out = fastvq.rotation_trick(e_, q)
    assert torch.equal(out, q)
    out.backward(g)
    assert torch.isfinite(e_.grad).all()
    assert torch.equal(e_.grad[:6], g[:6])
    assert_grad_close(e_.grad[6:], _grad64(e[6:], q[6:], g[6:]), e[6:], q[6:], g[6:], torch.float32)


def test_zero_inputs_value_exact(backend):
    e, q = torch.zeros(3, 4), torch.tensor([[0.0, -0.0, 1.0, -2.0]] * 3)
    out = fastvq.rotation_trick(e, q)
    assert torch.equal(out, q) and torch.equal(out.signbit(), q.signbit())  # -0.0 stays -0.0


def test_thresholds_are_the_documented_ones(backend):
    # just above both thresholds the rotation is applied, just below the fallback is
    D = 3
    q, g = torch.tensor([[1.0, 0.0, 0.0]] * 2), torch.tensor([[0.3, -1.0, 0.5]] * 2)
    e = torch.tensor([[0.0, 2 * EPS_NORM, 0.0], [0.0, 0.5 * EPS_NORM, 0.0]]).requires_grad_()
    fastvq.rotation_trick(e, q).backward(g)
    assert not torch.equal(e.grad[0], g[0]) and torch.equal(e.grad[1], g[1])
    # |e^ + q^| = 2 cos(theta / 2) about the antipode: rotate at 4 * EPS, fall back at EPS / 4
    for k, expect_rot in ((4.0, True), (0.25, False)):
        ang = torch.pi - k * EPS_ANTIPODAL
        e = torch.tensor([[torch.cos(torch.tensor(ang)).item(), torch.sin(torch.tensor(ang)).item(), 0.0]])
        e.requires_grad_()
        fastvq.rotation_trick(e, q[:1]).backward(g[:1])
        assert torch.isfinite(e.grad).all()
        assert torch.equal(e.grad, g[:1]) != expect_rot


def test_D1(backend):
    # D = 1: same sign -> R = I, lambda = |q|/|e|; opposite sign -> antipodal -> straight through
    e = torch.tensor([[2.0], [-2.0], [0.0], [3.0]]).requires_grad_()
    q = torch.tensor([[4.0], [1.0], [5.0], [-1.5]])
    g = torch.tensor([[1.0], [1.0], [1.0], [1.0]])
    out = fastvq.rotation_trick(e, q)
    assert torch.equal(out, q)
    out.backward(g)
    assert torch.equal(e.grad, torch.tensor([[2.0], [1.0], [1.0], [1.0]]))


@pytest.mark.parametrize("block_d", [None, 4])  # 4: the looping kernel path at D = 7
def test_rows_at_the_eps_norm_threshold_take_one_branch_on_both_backends(block_d):
    # probe P12: |e| within a float32 rounding of EPS_NORM; the reference decided on a float64
    # norm, the kernel on a float32 one, and the gradient jumped by |q| / |e| ~ 1e6 between them
    from fastvq.kernels.rotation_trick import rotation_trick_bwd
    from fastvq.reference.rotation_trick import rotation_trick_bwd_ref

    e = torch.tensor([[-1.690011686150683e-07, 6.965975103412347e-07, 2.498397009276232e-07, -2.06052106932475e-07,
                       -3.449629275564803e-07, -8.04601398840532e-08, -5.058061560703209e-07]])
    q = torch.tensor([[-0.08967044949531555, 0.00542820431292057, 0.3412787616252899, -0.04770243540406227,
                       0.6271626949310303, -0.9845940470695496, -1.1454302072525024]])
    # and 400 directions scaled to within +-50 float32 steps of the threshold
    d = randn(400, 7, seed=12)
    d = d / d.double().norm(dim=1, keepdim=True).float()
    steps = torch.arange(-50, 50, dtype=torch.float32).repeat(4)[:, None]
    e = torch.cat([e, d * (EPS_NORM * (1 + steps * 2.0**-23))])
    q = torch.cat([q, randn(400, 7, seed=13)])
    g = torch.ones_like(e)
    ref = rotation_trick_bwd_ref(e, q, g)
    got = rotation_trick_bwd(e, q, g, EPS_NORM, EPS_ANTIPODAL, block_d=block_d)
    straight = torch.equal
    below = e.double().norm(dim=1) < EPS_NORM
    assert straight(ref[0], g[0]) and straight(got[0], g[0]), (ref[0], got[0])
    assert below.any() and (~below).any()
    for i in range(e.shape[0]):  # the same branch: straight through exactly where |e| < EPS_NORM
        assert straight(ref[i], g[i]) == straight(got[i], g[i]) == bool(below[i]), (i, ref[i], got[i])


def test_looping_kernel_path_matches():
    # rows wider than the D tile take the three-sweep path of the kernel
    from fastvq.kernels.rotation_trick import rotation_trick_bwd

    e, q, g = randn(13, 37), randn(13, 37), randn(13, 37)
    e[0] = 0
    e[1] = -q[1]
    whole = rotation_trick_bwd(e, q, g, EPS_NORM, EPS_ANTIPODAL)
    looped = rotation_trick_bwd(e, q, g, EPS_NORM, EPS_ANTIPODAL, block_d=8)
    assert torch.equal(looped[:2], g[:2])
    assert_close(looped, whole, torch.float32, 37)
    assert_grad_close(whole[2:], _grad64(e[2:], q[2:], g[2:]), e[2:], q[2:], g[2:], torch.float32)


# (scale of e, of q, of g, dtype): rows scaled far from 1 in every direction. The float64 oracle
# squares them without trouble; a float32 kernel that normalises before it scales does not.
MAGNITUDES = [
    pytest.param(1.0, 1e20, 1.0, torch.float32, id="q1e20"),
    pytest.param(1e20, 1e20, 1e20, torch.float32, id="all1e20"),
    pytest.param(1e30, 1e25, 1e-20, torch.float32, id="e1e30-g1e-20"),
    pytest.param(1e-5, 1.0, 1e30, torch.float32, id="e1e-5-g1e30"),
    pytest.param(1e-5, 1e-5, 1e-35, torch.float32, id="small-e-q-tiny-g"),
    pytest.param(1.0, 5e3, 20.0, torch.float16, id="fp16-q5e3-overflowing"),
    pytest.param(1e30, 1e30, 1e30, torch.bfloat16, id="bf16-1e30"),
    pytest.param(1.0, 3.0, 1e-40, torch.float32, id="g-subnormal"),  # findings R1: 1/max|g| overflowed
]


@pytest.mark.parametrize("se,sq,sg,dtype", MAGNITUDES)
@pytest.mark.parametrize("D", [5, 37])
@backend_cells("block_d", {"whole": None}, {"looping": 8})  # 8: the looping kernel path at D = 37
def test_extreme_magnitudes_stay_finite_and_exact(backend, device, se, sq, sg, dtype, D, block_d):
    e = randn(16, D, seed=1, scale=se, device=device).to(dtype)
    q = randn(16, D, seed=2, scale=sq, device=device).to(dtype)
    g = randn(16, D, seed=3, scale=sg, device=device).to(dtype)
    e = _regular(e, q)
    if block_d is None:
        got, _ = _grad_of(fastvq.rotation_trick, e, q, g)
    else:
        from fastvq.kernels.rotation_trick import rotation_trick_bwd

        got = rotation_trick_bwd(e, q, g, EPS_NORM, EPS_ANTIPODAL, block_d=block_d)
    want = _grad64(e, q, g)
    finfo = torch.finfo(dtype)
    representable = want.abs() <= finfo.max
    assert torch.isfinite(got[representable]).all()
    # beyond the dtype's range: +-inf of the right sign, never NaN or a made-up number
    assert torch.equal(got[~representable], want[~representable].sign() * float("inf"))
    rows = representable.all(-1)
    assert_grad_close(got[rows], want[rows], e[rows], q[rows], g[rows], dtype)


@backend_cells("block_d", {"whole": None}, {"looping": 8})  # 8: the looping kernel path at D = 37
@pytest.mark.parametrize("which", ["e", "q"])
def test_subnormal_rows_of_e_or_q_go_straight_through(backend, device, which, block_d):
    # findings R1: a finite row whose largest entry is subnormal (< 2^-126) made 1 / max overflow
    # in the kernel, and the row's gradient NaN; it is far below EPS_NORM: straight through
    e, q, g = (randn(6, 37, seed=s, device=device) for s in (90, 91, 92))
    tiny = {"e": e, "q": q}[which]
    tiny[0] = 0.0
    tiny[0, 3] = 1e-39
    tiny[1] *= 1e-39  # every entry subnormal
    tiny[2] = 0.0
    tiny[2, 0] = 1e-45  # the smallest subnormal
    if block_d is None:
        got, _ = _grad_of(fastvq.rotation_trick, e, q, g)
    else:
        from fastvq.kernels.rotation_trick import rotation_trick_bwd

        got = rotation_trick_bwd(e, q, g, EPS_NORM, EPS_ANTIPODAL, block_d=block_d)
    assert torch.equal(got[:3], g[:3])
    assert_grad_close(got[3:], _grad64(e[3:], q[3:], g[3:]), e[3:], q[3:], g[3:], torch.float32)


def test_findings_subnormal_reproducers(backend):
    e, q = torch.tensor([[1.0, -3.0]]), torch.tensor([[2.0, 1.0]])
    got, _ = _grad_of(fastvq.rotation_trick, e, q, torch.tensor([[1e-39, 0.0]]))
    assert torch.isfinite(got).all() and (got != 0).any()
    assert_grad_close(got, _grad64(e, q, torch.tensor([[1e-39, 0.0]])), e, q, torch.tensor([[1e-39, 0.0]]),
                      torch.float32)
    for e, q in ((torch.tensor([[1e-39, 0.0]]), torch.tensor([[1.0, -3.0]])),
                 (torch.tensor([[1.0, -3.0]]), torch.tensor([[1e-39, 0.0]]))):
        got, _ = _grad_of(fastvq.rotation_trick, e, q, torch.ones(1, 2))
        assert torch.equal(got, torch.ones(1, 2))


def test_eps_norm_threshold_is_the_same_number_on_both_backends():
    # findings R2: float32(1e-6) was below 1e-6 in the reference's float64 test (straight
    # through) and not in the kernel's float32 test (rotated): a factor 1e6 apart
    q, g = torch.tensor([[0.0, 1.0]]), torch.ones(1, 2)
    below = torch.nextafter(torch.tensor(EPS_NORM, dtype=torch.float32), torch.tensor(0.0)).item()
    for value, rotates in ((1e-6, True), (EPS_NORM, True), (below, False)):
        e = torch.tensor([[value, 0.0]])
        grads = {}
        for name in ("reference", "triton"):
            with fastvq.backend(name):
                grads[name], _ = _grad_of(fastvq.rotation_trick, e, q, g)
        for name, got in grads.items():  # the same decision; a rotated row to float32 rounding
            assert torch.equal(got, g) != rotates, (name, value, got)
            if rotates:
                assert_grad_close(got, _grad64(e, q, g), e, q, g, torch.float32)


def test_gradient_overflow_is_inf(backend, device):
    # lambda |g| = (1e35 / 1e-5) * 1e10 = 1e50: beyond float32, so +-inf, never NaN
    e = randn(4, 6, seed=4, scale=1e-5, device=device)
    q = randn(4, 6, seed=5, scale=1e35, device=device)
    g = randn(4, 6, seed=6, scale=1e10, device=device)
    got, _ = _grad_of(fastvq.rotation_trick, _regular(e, q), q, g)
    want = _grad64(_regular(e, q), q, g)
    assert torch.equal(got, want.sign() * float("inf"))


@pytest.mark.parametrize("where,value", [("e", "nan"), ("e", "inf"), ("q", "nan"), ("q", "-inf")])
def test_nonfinite_e_or_q_gives_nan_row(backend, device, where, value):
    e, q, g = randn(6, 9, seed=7, device=device), randn(6, 9, seed=8, device=device), randn(6, 9, seed=9, device=device)
    e[1] = 0  # a straight-through row: a NaN in its q still makes it NaN
    (e if where == "e" else q)[[1, 3], 2] = float(value)
    got, _ = _grad_of(fastvq.rotation_trick, e, q, g)
    assert torch.isnan(got[[1, 3]]).all()
    rest = [0, 2, 4, 5]
    assert torch.isfinite(got[rest]).all()
    assert_grad_close(got[rest], _grad64(e[rest], q[rest], g[rest]), e[rest], q[rest], g[rest], torch.float32)


def test_nonfinite_upstream_gradient(backend, device):
    e, q, g = randn(4, 5, seed=10, device=device), randn(4, 5, seed=11, device=device), randn(4, 5, seed=12, device=device)
    e[0] = 0  # straight through: g passes unchanged, inf and NaN included
    g[0, 1], g[0, 3] = float("inf"), float("nan")
    g[1, 2] = float("inf")  # rotated rows: the rotation of an infinite vector is undefined
    g[2, 0] = float("nan")
    got, _ = _grad_of(fastvq.rotation_trick, e, q, g)
    assert torch.equal(got[0].isnan(), g[0].isnan()) and torch.equal(got[0][~g[0].isnan()], g[0][~g[0].isnan()])
    assert torch.isnan(got[1:3]).all()
    assert torch.isfinite(got[3]).all()


def test_D0(backend, device):
    e = torch.zeros(3, 0, device=device, requires_grad=True)
    out = fastvq.rotation_trick(e, torch.zeros(3, 0, device=device))
    assert out.shape == (3, 0)
    out.sum().backward()
    assert e.grad.shape == (3, 0)


def test_noncontiguous_and_mixed_dtypes(backend):
    e, q, g = randn(10, 12), randn(10, 12, dtype=torch.bfloat16), randn(10, 12)
    e_ = noncontiguous(e).requires_grad_()
    out = fastvq.rotation_trick(e_, noncontiguous(q))
    assert out.dtype == torch.float32 and torch.equal(out, q.float())
    out.backward(g)
    assert_grad_close(e_.grad, _grad64(e, q, g), e, q, g, torch.float32)


def test_deterministic(backend):
    e, q, g = randn(31, 20), randn(31, 20), randn(31, 20)
    a, _ = _grad_of(fastvq.rotation_trick, e, q, g)
    b, _ = _grad_of(fastvq.rotation_trick, e, q, g)
    assert torch.equal(a, b)


@pytest.mark.parametrize(
    "e,q,err",
    [
        (torch.randn(3, 4), torch.randn(3, 5), ValueError),
        (torch.randn(3, 4), torch.randn(4, 4), ValueError),
        (torch.randn(()), torch.randn(()), ValueError),
        (torch.randint(0, 3, (3, 4)), torch.randn(3, 4), TypeError),
        (torch.randn(3, 4), torch.randn(3, 4, dtype=torch.float64), TypeError),
        ([[1.0]], torch.randn(1, 1), TypeError),
    ],
    ids=["D-mismatch", "N-mismatch", "0-D", "int-dtype", "float64", "not-tensor"],
)
def test_bad_input(e, q, err):
    with pytest.raises(err, match="rotation_trick"):
        fastvq.rotation_trick(e, q)


def test_opcheck():
    e, q, g = randn(6, 5), randn(6, 5), randn(6, 5)
    e[0] = 0
    for name in ("reference", "triton"):
        with fastvq.backend(name):
            torch.library.opcheck(torch.ops.fastvq.rotation_trick.default, (e.clone().requires_grad_(), q))
            torch.library.opcheck(torch.ops.fastvq.rotation_trick_bwd.default, (e, q, g))


def test_compile_fullgraph():
    e, q, g = randn(7, 5), randn(7, 5), randn(7, 5)

    def f(e, q):
        return fastvq.rotation_trick(e, q) * 2.0

    with fastvq.backend("reference"):
        e_ = e.clone().requires_grad_()
        out = torch.compile(f, fullgraph=True, backend="aot_eager")(e_, q)
        out.backward(g)
        assert torch.equal(out, 2 * q)
        assert_grad_close(e_.grad, _grad64(e, q, 2 * g), e, q, 2 * g, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("D", [3, 256, 8192])  # 8192: the looping path
def test_large_gpu(dtype, D):
    e, q, g = (randn(4099, D, dtype=dtype) for _ in range(3))
    with fastvq.backend("triton"):
        gt, _ = _grad_of(fastvq.rotation_trick, e, q, g)
        assert torch.equal(fastvq.rotation_trick(e, q), q)
    assert_grad_close(gt, _grad64(e, q, g), e, q, g, dtype)


# ------------------------------------------------------------------ mutation round C (mutC): behaviour no test pinned


def test_looping_path_g_max_is_over_the_whole_row():
    # C01: max|g| of the looping path kept only the last D tile; rows whose g vanishes (or is
    # small) in the last tile got a gradient of 0 (or scaled by the wrong max)
    from fastvq.kernels.rotation_trick import rotation_trick_bwd

    e, q, g = randn(6, 37, seed=21), randn(6, 37, seed=22), randn(6, 37, seed=23)
    g[0, 32:] = 0.0  # last tile of block_d = 8 all zero
    g[1, 32:] *= 1e-30  # last tile tiny: g / max|g_last| overflows float32
    got = rotation_trick_bwd(e, q, g, EPS_NORM, EPS_ANTIPODAL, block_d=8)
    want = _grad64(e, q, g)
    assert torch.isfinite(got).all()
    assert_close(got, want, torch.float32, reduce_len=4 * 37 + 8)


def test_looping_path_nonfinite_e_or_q_gives_nan_row():
    # C03: the looping path's NaN for a row with a NaN/inf entry in e or q was not tested
    from fastvq.kernels.rotation_trick import rotation_trick_bwd

    for which, value in (("e", float("nan")), ("e", float("inf")), ("q", float("nan")), ("q", float("-inf"))):
        e, q, g = randn(6, 37, seed=7), randn(6, 37, seed=8), randn(6, 37, seed=9)
        e[1] = 0  # a straight-through row: a NaN in its q still makes it NaN
        (e if which == "e" else q)[[1, 3], 30] = value
        got = rotation_trick_bwd(e, q, g, EPS_NORM, EPS_ANTIPODAL, block_d=8)
        assert torch.isnan(got[[1, 3]]).all(), (which, value)
        assert torch.isfinite(got[[0, 2, 4, 5]]).all()


def test_small_q_goes_straight_through():
    # C06: the kernels' EPS_NORM test on |q| was dropped (b_ok from |e| alone) and no test saw it:
    # the tests' small-q rows were 0 or subnormal, which a NaN in q^ sends straight through anyway.
    # A normal row of |q| ~ 1e-8 < EPS_NORM must take g exactly (single and looping paths)
    from fastvq.kernels.rotation_trick import rotation_trick_bwd

    e, q, g = randn(4, 37, seed=31), randn(4, 37, seed=32), randn(4, 37, seed=33)
    q[0] *= 1e-9  # |q| ~ 6e-9: normal float32 entries, below EPS_NORM
    q[1] *= 1e-12
    for block_d in (None, 8):
        got = rotation_trick_bwd(e, q, g, EPS_NORM, EPS_ANTIPODAL, block_d=block_d)
        assert torch.equal(got[:2], g[:2]), block_d
        assert_close(got[2:], _grad64(e[2:], q[2:], g[2:]), torch.float32, reduce_len=4 * 37 + 8)
    for name in ("reference", "triton"):
        with fastvq.backend(name):
            ee = e.clone().requires_grad_()
            fastvq.rotation_trick(ee, q).backward(g)
        assert torch.equal(ee.grad[:2], g[:2]), name


def test_row_exactly_at_eps_norm_rotates_on_both_backends():
    # C12: the reference deciding on me * a1 (a rounded float64 norm) instead of the exact sum of
    # squares. These float32 rows have |e| == EPS_NORM exactly (integer sums of squares:
    # 8796093^2 = W^2 + X^2 + Y^2 + Z^2, times 2^-43), where me * a1 rounds one ulp below EPS_NORM
    from fastvq.kernels.rotation_trick import rotation_trick_bwd
    from fastvq.reference.rotation_trick import rotation_trick_bwd_ref

    rows = [[1574703, 33392, 41750, 8653826], [4072501, 2444, 25136, 7796496], [7364555, 1728, 13108, 4809824]]
    e = torch.tensor(rows, dtype=torch.float64).mul(2.0**-43).float()
    assert torch.equal((e.double() ** 2).sum(1), torch.full((3,), EPS_NORM**2, dtype=torch.float64))
    q, g = randn(3, 4, seed=34), torch.ones(3, 4)
    ref = rotation_trick_bwd_ref(e, q, g)
    got = rotation_trick_bwd(e, q, g, EPS_NORM, EPS_ANTIPODAL)
    for i in range(3):  # |e| >= EPS_NORM: rotated (lambda ~ 1e6), on both
        assert not torch.equal(ref[i], g[i]) and not torch.equal(got[i], g[i]), (i, ref[i], got[i])
    assert_close(ref, _grad64(e, q, g), torch.float32, reduce_len=24)
