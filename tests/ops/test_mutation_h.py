"""Mutation round H (the kernels' shared numerics and special cases: kernels/_common.py's helpers,
qr_lookup's redo triggers, and the edge logic of code_statistics, code_usage, semantic_ids,
ema_update and rotation_trick): one test per surviving mutant, each naming it.

Each test passes on the real code and fails with its mutant applied (the round's verify_kills.py)."""

import math

import pytest
import torch

import fastvq
from fastvq.ops.ema_update import ema_update_


# --------------------------------------------------------------------------- the rotation trick's thresholds


def _rotated64(e, q, g):
    """The rotation trick's gradient to ``e`` from the paper's formula, in float64."""
    e, q, g = e.double(), q.double(), g.double()
    a, b = e.norm(dim=-1, keepdim=True), q.norm(dim=-1, keepdim=True)
    eh, qh = e / a, q / b
    w = (eh + qh) / (eh + qh).norm(dim=-1, keepdim=True)
    return (b / a) * (g - 2 * (g * w).sum(-1, keepdim=True) * w + 2 * (g * qh).sum(-1, keepdim=True) * eh)


def test_rotation_rows_whose_q_is_exactly_at_eps_norm_rotate(backend, device):
    """H44 (_common.unit_scales: ``|q|^2 >= EPS_N^2`` made strict): rows of ``q`` with |q| equal
    to EPS_NORM exactly (integer sums of squares, 8796093^2 = W^2 + X^2 + Y^2 + Z^2, times 2^-43)
    rotate, as rows of ``e`` there do (tests/ops/test_rotation_trick.py covers ``e`` only): the
    gradient is lambda R^T g with lambda = |q| / |e| ~ 1e-6, not ``g``."""
    from fastvq.ops.rotation_trick import EPS_NORM

    rows = [[1574703, 33392, 41750, 8653826], [4072501, 2444, 25136, 7796496], [7364555, 1728, 13108, 4809824]]
    q = (torch.tensor(rows, dtype=torch.float64) * 2.0**-43).float().to(device)
    assert torch.equal((q.double() ** 2).sum(1), torch.full((3,), EPS_NORM**2, dtype=torch.float64, device=device))
    e = torch.tensor([[1.0, -2.0, 0.5, 3.0], [0.25, 1.0, -1.0, 2.0], [-3.0, 0.5, 1.5, 1.0]], device=device)
    g = torch.ones(3, 4, device=device)
    ee = e.clone().requires_grad_()
    fastvq.rotation_trick(ee, q).backward(g)
    want = _rotated64(e, q, g)
    assert (ee.grad.abs() < 1e-5).all(), ee.grad  # (not g)
    torch.testing.assert_close(ee.grad.double(), want, rtol=1e-5, atol=1e-12)


def test_rotation_rows_exactly_at_eps_antipodal_rotate_in_both_kernel_paths(device):
    """H50 (_common.rotation_grad_rows) and H111 (rotation_trick's looping path): ``|e^ + q^| >=
    EPS_ANTIPODAL`` made strict. Two D = 2 rows (found by search) whose float32 |e^ + q^| is
    exactly float32(1e-3) in the kernel's arithmetic rotate (the gradient is not ``g``) in the
    single-tile path and the looping path (block_d = 1), and agree with the float64 reference
    to float32 accuracy."""
    from fastvq.kernels import INTERPRETED
    from fastvq.kernels.rotation_trick import rotation_trick_bwd
    from fastvq.ops.rotation_trick import EPS_ANTIPODAL, EPS_NORM
    from fastvq.reference.rotation_trick import rotation_trick_bwd_ref

    if not INTERPRETED:
        pytest.skip("the rows sit on the threshold in the interpreter's float32 arithmetic (a GPU may fuse "
                    "the multiply-adds of e^ + q^ and |s|^2 and land one ulp off it)")
    e = torch.tensor([[1.0, float.fromhex("0x1.76141ap-1")], [1.0, float.fromhex("0x1.5bd62ap-2")]], device=device)
    q = torch.tensor([[-1.0, -float.fromhex("0x1.76dd4ap-1")], [-1.0, -float.fromhex("0x1.5ab1dep-2")]], device=device)
    g = torch.tensor([[1.0, 2.0], [1.0, 2.0]], device=device)
    ref = rotation_trick_bwd_ref(e, q, g)
    for block_d in (None, 1):
        got = rotation_trick_bwd(e, q, g, EPS_NORM, EPS_ANTIPODAL, block_d=block_d)
        assert not torch.equal(got[0], g[0]) and not torch.equal(got[1], g[1]), (block_d, got)
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=0)


def test_rotation_looping_path_scales_by_the_running_max_when_a_later_tile_is_zero(device):
    """H60 (_common.scaled_sumsq: the running max |x| replaced by the tile's own): in the looping
    path (rows wider than the D tile), rows of ``e`` whose last tiles are zero (or far smaller)
    must keep the row's max as its scale; with the tile's max the scale became 0 and the
    gradient factor m_q / m_e infinite (rows of inf, NaN or ``g``). Both tile widths agree with
    the float64 reference to float32 accuracy, per row."""
    from fastvq.kernels.rotation_trick import rotation_trick_bwd
    from fastvq.ops.rotation_trick import EPS_ANTIPODAL, EPS_NORM
    from fastvq.reference.rotation_trick import rotation_trick_bwd_ref

    e = torch.tensor([[3.0, 4.0, 0.0, 0.0], [1e30, -2e30, 1.0, 0.0], [0.5, 0.0, 0.0, 0.0]], device=device)
    q = torch.tensor([[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]], device=device)
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0]] * 3, device=device)
    ref = rotation_trick_bwd_ref(e, q, g).double()
    for block_d in (2, 1):
        got = rotation_trick_bwd(e, q, g, EPS_NORM, EPS_ANTIPODAL, block_d=block_d).double()
        assert torch.isfinite(got).all(), (block_d, got)
        assert ((got - ref).abs() <= 1e-5 * ref.abs().amax(1, keepdim=True)).all(), (block_d, got, ref)


# --------------------------------------------------------------------------- _common.add_rows_by_index


def test_codebook_gradient_fix_up_keeps_a_nan_row_out_of_its_neighbours_sums(backend, device):
    """H16 (_common.add_rows_by_index: each code's rows picked by multiplying with the index mask
    instead of ``where``): in residual quantization's backward, code 0's float32 sum overflows
    on the way (terms +-3e38 in column 0, exact sum 0) and code 1, in the same fix-up group,
    has a NaN term (column 1). The fix-up sums both codes again in float64: code 1's NaN must not
    reach code 0 (NaN * 0 is NaN), whose every column is its exact sum."""
    from fastvq.ops.residual_quantize import _residual_quantize_bwd_op

    N, D = 20, 4
    x = torch.arange(N * D, dtype=torch.float32, device=device).reshape(N, D)  # (integers: exact in any order)
    x[:8, 0] = torch.tensor([-3e38] * 4 + [3e38] * 4, device=device)
    x[8, 1] = float("nan")
    cb = torch.zeros(1, 2, D, device=device)
    cb[0, 1] = torch.tensor([1.0, -2.0, 0.5, 3.0], device=device)
    codes = torch.ones(N, 1, dtype=torch.long, device=device)
    codes[:8, 0] = 0
    ge = torch.tensor([0.5], device=device)
    _, dcb = _residual_quantize_bwd_op(x, cb, codes, torch.ones(N, device=device), None, None, ge, False, False)
    t = 2.0 * 0.5 * (cb[0].double()[codes[:, 0]] - x.double())  # the terms 2 ge w (c - r)
    want = torch.zeros(2, D, dtype=torch.float64, device=device).index_add_(0, codes[:, 0], t)
    assert want[0, 0] == 0.0 and want[1, 1].isnan()
    assert torch.equal(dcb[0, 0], want[0].float()), dcb
    assert dcb[0, 1, 1].isnan() and torch.equal(dcb[0, 1, [0, 2, 3]], want[1, [0, 2, 3]].float()), dcb


# --------------------------------------------------------------------------- _common.nan_clamp


def test_cosine_distance_of_nearly_antipodal_rows_is_at_most_2(backend, device):
    """H28 (_common.nan_clamp: the clamp of ``1 - cos`` to [0, 2] without its upper bound):
    float32 rounding puts the kernel's cosine of some nearly antipodal rows just below -1, so
    1 - cos = 2 + 2^-22 unclamped (4 of 256 seeded pairs of D = 64 under the interpreter: the
    4 kept here). The lower bound has its own test (test_nearest_code.py,
    test_cosine_distance_of_a_row_to_itself_is_never_negative)."""
    from tests.utils import randn

    pick = [42, 58, 90, 213]
    x = randn(256, 1, 64, seed=42, device=device)[pick]
    c = -x + 1e-4 * randn(256, 1, 64, seed=43, device=device)[pick]
    _, dist = fastvq.nearest_code(x, c, metric="cosine")  # (4 heads, one code each)
    assert ((dist >= 1.99) & (dist <= 2.0)).all(), dist.max()


# --------------------------------------------------------------------------- qr_lookup's redo triggers

# qrprobe QP1's item ("mult", weight 4096): q * r = 1.5 (1 + 2^-12) 2^-138 underflows to a float32
# subnormal, the exact q r w = 1.5 (1 + 2^-12) 2^-126 is a normal float32 that only the float64
# redo gets right. Here it is the first of 17 items, so the other 16 (weight 1, product 0: no
# underflow) fill the next block of 16 items.
_QP1_Q, _QP1_R = 1.5 * 2.0**-64, (1 + 2.0**-12) * 2.0**-74


def test_qr_bag_redo_remembers_an_underflowed_weighted_item_of_an_earlier_block(backend, device):
    """H71 (qr_lookup _qr_bag_sum: the max |weight| of underflowed items kept from the last block
    of items only): the bag's first block holds the underflowed item of weight 4096, its second
    block none; the bag must still be summed again in float64 (exact), not 1 ulp off in float32."""
    q = torch.tensor([[_QP1_Q], [0.0]], device=device)
    r = torch.tensor([[_QP1_R]], device=device)
    ids = torch.tensor([0] + [1] * 16, device=device)
    w = torch.tensor([4096.0] + [1.0] * 16, device=device)
    out = fastvq.qr_lookup(ids, q, r, "mult", offsets=torch.zeros(1, dtype=torch.long, device=device),
                           per_sample_weights=w)
    exact = (torch.tensor(_QP1_Q, dtype=torch.float64) * _QP1_R * 4096.0).float().item()
    assert out.item() == exact == 1.7636720051216718e-38, (out.item(), exact)


def test_qr_row_gradient_redo_remembers_an_underflowed_weighted_item_of_an_earlier_block(backend, device):
    """H72 (qr_lookup _qr_row_sum: the same, for a table row's gradient, deterministic path):
    17 one-item bags on one q row, the first with g * r underflowed and weight 4096, the other
    16 with g = 0: q's gradient is the exact g r w, summed again in float64."""
    q = torch.ones(1, 1, device=device, requires_grad=True)
    r = torch.tensor([[_QP1_R]], device=device, requires_grad=True)
    w = torch.tensor([4096.0] + [1.0] * 16, device=device)
    g = torch.zeros(17, 1, device=device)
    g[0, 0] = _QP1_Q
    fastvq.qr_lookup(torch.zeros(17, dtype=torch.long, device=device), q, r, "mult",
                     offsets=torch.arange(17, device=device), per_sample_weights=w).backward(g)
    exact = (torch.tensor(_QP1_Q, dtype=torch.float64) * _QP1_R * 4096.0).float().item()
    assert q.grad.item() == exact == 1.7636720051216718e-38, (q.grad.item(), exact)


# --------------------------------------------------------------------------- ema_update


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_ema_update_keeps_a_code_that_overflows_the_codebook_dtype_only(backend, device, dtype):
    """H107 (ema_update kernel: the new code's finiteness tested in float32, not in the codebook's
    dtype): a code whose new value is finite in float32 (3.4e38, 65520) but +inf in a bfloat16 /
    float16 codebook keeps its whole old value; the other code moves."""
    codebook = torch.full((1, 2, 2), 5.0, dtype=dtype, device=device)
    cs, ea = torch.zeros(1, 2, device=device), torch.zeros(1, 2, 2, device=device)
    counts = torch.ones(1, 2, device=device)
    big = 3.4e38 if dtype == torch.bfloat16 else 65520.0
    sums = torch.tensor([[[big, 1.0], [2.0, 4.0]]], device=device)
    ema_update_(codebook, cs, ea, counts, sums, 0.0, 1e-30)
    assert codebook.tolist() == [[[5.0, 5.0], [2.0, 4.0]]], codebook


def test_ema_update_keeps_a_code_whose_new_value_is_nan(backend, device):
    """H106 (ema_update kernel: a new code counted bad only where it is +-inf, not NaN): a code
    whose EMA state holds a NaN (so its new embed_avg and code are NaN in that feature) keeps
    its whole old value in the codebook; the other code moves (embed_avg itself is updated as
    the formula says, NaN included)."""
    codebook = torch.full((1, 2, 2), 5.0, device=device)
    cs, counts = torch.ones(1, 2, device=device), torch.ones(1, 2, device=device)
    ea = torch.tensor([[[math.nan, 1.0], [1.0, 1.0]]], device=device)
    sums = torch.tensor([[[1.0, 1.0], [2.0, 4.0]]], device=device)
    ema_update_(codebook, cs, ea, counts, sums, 0.5, 1e-5)
    assert codebook[0, 0].tolist() == [5.0, 5.0], codebook
    assert codebook.isfinite().all() and not torch.equal(codebook[0, 1], torch.full((2,), 5.0, device=device))
    assert ea[0, 0, 0].isnan() and ea[0, 1].tolist() == [1.5, 2.5]


def test_ema_update_weighs_the_batch_by_1_minus_decay_rounded_once(backend, device):
    """H109 (ema_update kernel: the batch weight formed in the kernel as ``1 - decay`` from the
    float32 ``decay``, not passed as the float32 of the exact ``1 - decay``): with embed_avg 0 and
    sums 1 the new embed_avg is exactly float32(1 - 0.99) = 0.0099999998 (1 - float32(0.99) is
    0.0099999905). test_matches_the_seed_update's bit-for-bit cases use decay 0.5."""
    codebook = torch.zeros(1, 2, 3, device=device)
    cs, counts = torch.ones(1, 2, device=device), torch.ones(1, 2, device=device)
    ea = torch.zeros(1, 2, 3, device=device)
    ema_update_(codebook, cs, ea, counts, torch.ones(1, 2, 3, device=device), 0.99, 1e-5)
    want = torch.tensor(1 - 0.99, dtype=torch.float32).item()
    assert ea.flatten().tolist() == [want] * 6, ea


# --------------------------------------------------------------------------- _common.round_bf16

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastvq.kernels._common import round_bf16  # noqa: E402


@triton.jit
def _round_bf16_kernel(p_x, p_out, N, BLOCK: tl.constexpr):
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = o < N
    tl.store(p_out + o, round_bf16(tl.load(p_x + o, mask=m, other=0.0)), mask=m)


def test_round_bf16_rounds_finite_values_to_nearest_even_as_torch(device):
    """H55 (_common.round_bf16: ``u + 0x7FFF + ((u >> 16) & 1)`` -> ``u + 0x8000``, ties away from
    zero): the integer rounding the kernels fall back on where the interpreter's own cast
    truncates (``bf16_rne``; not taken while ``INTERPRETER_BF16_EXACT`` holds, so no op test runs
    it) gives torch's float32 -> bfloat16 bits for finite values, ties to even included (1 + 2^-8
    -> 1, 1 + 3 2^-8 -> 1 + 2^-6), subnormals, the largest values and infinities; and NaN stays
    NaN (0x7FFFFFFF, a GPU's NaN, and 0xFFFFFFFF carried into the sign and came out -0.0 and
    +0.0; round H's report)."""
    from tests.utils import generator

    g = generator(55, device)
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, -(1 + 2**-8), 2**-126 * (1 + 2**-8), 3.3961775e38, 1e-40, 0.0,
                         -0.0, float("inf"), float("-inf"), 3.4028235e38], device=device)
    x = torch.cat([ties, torch.randn(2000, generator=g, device=device) * 2.0 ** torch.randint(
        -140, 120, (2000,), generator=g, device=device).float()])
    out = torch.empty(x.shape, dtype=torch.bfloat16, device=device)
    _round_bf16_kernel[(triton.cdiv(x.numel(), 512),)](x, out, x.numel(), BLOCK=512)
    want = x.to(torch.bfloat16)
    assert torch.equal(out.view(torch.int16), want.view(torch.int16)), (out[:11].tolist(), want[:11].tolist())
    assert out[:2].tolist() == [1.0, 1 + 2**-6]
    nans = torch.tensor([0x7FFFFFFF, -1, 0x7FC00000, 0x7F800001, -0x400000], dtype=torch.int32,
                        device=device).view(torch.float32)
    out = torch.empty(nans.shape, dtype=torch.bfloat16, device=device)
    _round_bf16_kernel[(1,)](nans, out, nans.numel(), BLOCK=8)
    assert bool(out.isnan().all()), out
