"""Mutation round E (the fastvq/ops/ layer): one test per surviving mutant, each naming it.

Each test passes on the real code and fails with its mutant applied (verify_kills.py)."""

import pytest
import torch

import fastvq
from tests.utils import assert_close, noncontiguous, raises_invalid, randn


def test_step_statistics_carry_no_gradient(backend):
    """E29 (ops/residual_quantize.py _setup_context: ``mark_non_differentiable(*output[4:])`` ->
    ``output[6:]``): counts and sums of a step whose x requires grad must not require grad (the
    docstring: statistics and candidates carry no gradient); no test looked at them."""
    x = randn(7, 5, seed=1, requires_grad=True)
    cb = randn(2, 4, 5, seed=2, requires_grad=True)
    out = fastvq.residual_quantize_step(x, cb, statistics=True, candidate_rows=torch.tensor([0, 3], device=x.device))
    assert out.quantized.requires_grad
    for name in ("counts", "sums", "skipped", "candidates", "candidates_ok"):
        assert not getattr(out, name).requires_grad, name


def test_mine_negatives_promotes_a_wider_positive(backend, device):
    """E23 (ops/mine_negatives.py: the common dtype from anchor and negatives only, positive
    rounded to it): a float32 positive beside bfloat16 anchor and negatives is promoted, not
    rounded. p = 1 - 2^-10 is 1.0 in bfloat16; the negative at distance 1 is farther than p
    (|a - p|^2 = 0.998) and is the semi-hard choice, but ties with a positive rounded to 1.0."""
    a = torch.zeros(1, 1, dtype=torch.bfloat16, device=device)
    p = torch.tensor([[1 - 2**-10]], dtype=torch.float32, device=device)
    n = torch.tensor([[1.0], [1.0078125]], dtype=torch.bfloat16, device=device)
    idx, dist = fastvq.mine_negatives(a, p, n, "semi-hard")
    assert idx.tolist() == [0] and dist.tolist() == [1.0]


def test_pairwise_sqdist_promotes_a_narrower_b(backend):
    """E21 (ops/pairwise_sqdist.py: ``a, b = a.to(dtype), b.to(dtype)`` -> b left as given): a
    float32 ``a`` beside a bfloat16 ``b`` is promoted (the Triton launcher asserts one dtype).
    The suite's mixed-dtype test promoted ``a`` only (bfloat16 a, float32 b)."""
    a = randn(4, 8, seed=7, requires_grad=True)
    b = randn(6, 8, seed=8, dtype=torch.bfloat16, requires_grad=True)
    d = fastvq.pairwise_sqdist(a, b)
    a64, b64 = a.detach().double(), b.detach().double()
    want = (a64[:, None, :] - b64[None, :, :]).square().sum(-1)
    assert d.dtype == torch.float32
    assert_close(d, want, torch.float32, reduce_len=3 * 8)
    d.sum().backward()
    assert b.grad.dtype == torch.bfloat16 and a.grad.dtype == torch.float32



def _kl_fwd_spy(monkeypatch):
    """Replace the Triton forward launcher of pairwise_kl_loss by the reference (cheap on wide
    rows under the interpreter), recording the operands' dtypes and the logit scaling it got."""
    import fastvq.kernels.pairwise_kl_loss as kkl
    from fastvq.reference.pairwise_kl_loss import pairwise_kl_loss_fwd_ref

    seen = []

    def spy(pred, target, temperature, scaling, amax_p, amax_t):
        seen.append((pred.dtype, target.dtype, scaling))
        return pairwise_kl_loss_fwd_ref(pred, target, temperature, amax_p, amax_t)

    monkeypatch.setattr(kkl, "pairwise_kl_loss_fwd", spy)
    return seen


def test_kl_logit_scaling_counts_the_target_width(monkeypatch, device):
    """E60 (ops/pairwise_kl_loss.py _scaling: ``max(pred.shape[1], target.shape[1])`` ->
    ``pred.shape[1]``): the kernels' wide-logit threshold lowers from 2^18 features on, for the
    longer of the rows (logit_scaling's ``d``): a 3-feature pred beside a 2^19-feature target gets
    the target's threshold. The suite's wide-row test is skipped under the interpreter."""
    from fastvq.reference.pairwise_kl_loss import logit_scaling

    T = 0.5
    pred, target = randn(2, 3, seed=12, device=device), randn(2, 2**19, seed=13, device=device)
    seen = _kl_fwd_spy(monkeypatch)
    with fastvq.backend("triton"):
        fastvq.pairwise_kl_loss(pred, target, T)
    assert logit_scaling(T, 2**19) != logit_scaling(T, 3)
    assert [s[2] for s in seen] == [logit_scaling(T, 2**19)]


@pytest.mark.parametrize("dp, dt, T, want", [(1, 4096, 2.0**-67, torch.float32),   # E59: the target's width
                                             (4, 4, 2.0**-66, torch.float32),      # E58: 2^32 D / T == 2^100
                                             (4, 4, 2.0**-65, torch.float16)])
def test_kl_float16_rows_take_the_float32_kernels_at_tiny_temperatures(monkeypatch, device, dp, dt, T, want):
    """E58 (``2^32 D / T >= 2^100`` -> ``>``) and E59 (``D`` from pred's width alone), both in
    ops/pairwise_kl_loss.py _kernel_operands: float16 rows run the float32 kernels where
    ``2^32 max(Dp, Dt) / T >= 2^100`` (the docstring's rule), boundary included."""
    pred = randn(3, dp, seed=14, device=device, dtype=torch.float16)
    target = randn(3, dt, seed=15, device=device, dtype=torch.float16)
    seen = _kl_fwd_spy(monkeypatch)
    with fastvq.backend("triton"):
        fastvq.pairwise_kl_loss(pred, target, T)
    assert [s[:2] for s in seen] == [(want, want)]


def test_kl_temperature_range_starts_at_two_to_minus_125(device):
    """E63 (ops/pairwise_kl_loss.py _t_bounds: minimum 2^-125 -> 2^-126): the documented range
    of T is [2^-125, 2^125] (T and 1/T normal float32 numbers); 2^-126 (1/T = 2^126, and the
    kernels' factors beyond it) is a ValueError, not run."""
    pred, target = randn(4, 3, seed=16, device=device), randn(4, 2, seed=17, device=device)
    assert fastvq.pairwise_kl_loss(pred, target, 2.0**-125).isfinite()
    for T in (2.0**-126, torch.tensor(2.0**-126, device=device)):
        with pytest.raises(ValueError, match="temperature must be"):
            fastvq.pairwise_kl_loss(pred, target, T)




def test_sample_code_takes_an_int32_seed_tensor(backend, device):
    """E68 (ops/sample_code.py _seed: int32 seed tensors refused): a 0-d int32 seed tensor is a
    seed as documented (int64/int32), the same draw as the int64 one and the Python int."""
    x, c = randn(30, 8, seed=22), randn(50, 8, seed=23)
    want = fastvq.sample_code(x, c, 1.0, seed=12345)
    for seed in (torch.tensor(12345, dtype=torch.int32, device=device), torch.tensor(12345, device=device)):
        got = fastvq.sample_code(x, c, 1.0, seed=seed)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])



def test_sample_code_takes_negative_seeds(backend):
    """E69 (ops/sample_code.py _seed: the seed's range [-2^63, 2^63) narrowed to [0, 2^63)):
    negative seeds down to -2^63 are seeds (a signed 64-bit value), reproducible."""
    x, c = randn(30, 8, seed=24), randn(50, 8, seed=25)
    for seed in (-1, -(2**63)):
        a = fastvq.sample_code(x, c, 1.0, seed=seed)
        b = fastvq.sample_code(x, c, 1.0, seed=seed)
        assert torch.equal(a[0], b[0]) and ((a[0] >= 0) & (a[0] < 50)).all()



def test_sample_code_temperature_up_to_float32_max(backend):
    """E70 (ops/sample_code.py _t_bounds: maximum float32's largest -> 3.4e38): every temperature
    up to float32's largest, 3.4028234663852886e38, is accepted (the documented range); just
    beyond it is a ValueError."""
    x, c = randn(5, 4, seed=26), randn(7, 4, seed=27)
    idx, _ = fastvq.sample_code(x, c, 3.4028234663852886e38, seed=1)
    assert ((idx >= 0) & (idx < 7)).all()
    with pytest.raises(ValueError, match="temperature"):
        fastvq.sample_code(x, c, 3.4028236e38, seed=1)


def test_qr_two_offsets_must_not_decrease(device):
    """E73 (ops/qr_lookup.py _check_offsets: the order check only from 3 offsets on, ``> 1`` ->
    ``> 2``): two offsets that decrease (``[0, -1]``: offsets[0] is 0 and offsets[-1] <= len(ids))
    are a ValueError, as longer decreasing offsets are."""
    q, r = randn(4, 3, seed=28), randn(5, 3, seed=29)
    ids = torch.tensor([1, 2, 3], device=device)
    with raises_invalid("non-decreasing"):
        fastvq.qr_lookup(ids, q, r, offsets=torch.tensor([0, -1], device=device))


@pytest.mark.parametrize("shape", [(2**31,), (2, 2**30)], ids=["N", "L-N"])
def test_code_statistics_refuses_two_to_the_31_rows(shape):
    """E82 (ops/code_statistics.py: ``indices.numel() >= 2**31`` -> ``>``): exactly 2^31 rows
    (L * N, the int32 offsets) are a ValueError, checked before anything runs (meta tensors: no
    memory; the mutant ran the op's shape-only implementation instead)."""
    x = torch.empty(*shape, 1, device="meta")
    idx = torch.empty(shape, dtype=torch.int64, device="meta")
    with pytest.raises(ValueError, match=r"fewer than 2\*\*31 rows"):
        fastvq.code_statistics(x, idx, 4)


def test_code_usage_meter_perplexity_is_not_the_first_batchs(device):
    """E87 (ops/code_usage.py CodeUsageMeter.update: ``batch.perplexity.clone()`` ->
    ``batch.perplexity``): changing the first batch's returned perplexity in place must not
    change the meter's mean batch perplexity."""
    meter = fastvq.CodeUsageMeter(4)
    first = meter.update(torch.tensor([0, 1, 2, 3], device=device))  # perplexity 4
    want = float(first.perplexity)
    first.perplexity.zero_()
    assert float(meter.mean_batch_perplexity) == want


def test_ema_update_with_decay_zero_takes_the_batch(backend, device):
    """E90 (ops/ema_update.py _check: ``0.0 <= decay`` -> ``0.0 < decay``): decay 0 lies in the
    documented range [0, 1]: the EMA state becomes this batch's statistics exactly (cluster_size
    = counts, embed_avg = sums) and every code moves to sums / smoothed (the seed's arithmetic)."""
    from fastvq.ops.ema_update import ema_update_

    L, K, D, eps = 1, 3, 2, 1e-5
    codebook = randn(L, K, D, seed=30, device=device)
    cluster_size = torch.full((L, K), 2.0, device=device)
    embed_avg = randn(L, K, D, seed=31, device=device)
    counts = torch.tensor([[1.0, 3.0, 0.0]], device=device)
    sums = randn(L, K, D, seed=32, device=device) * counts.unsqueeze(-1)
    ema_update_(codebook, cluster_size, embed_avg, counts, sums, 0.0, eps)
    assert_close(cluster_size, counts.double(), torch.float32, reduce_len=2)
    assert_close(embed_avg, sums.double(), torch.float32, reduce_len=2)
    n = counts.double().sum()
    smoothed = (counts.double() + eps) / (n + K * eps) * n
    want = sums.double() / smoothed.unsqueeze(-1)
    assert_close(codebook, want, torch.float32, reduce_len=8)  # (the unused code: 0 / smoothed = 0)


def test_ema_update_takes_strided_float32_sums(backend, device):
    """E92 (ops/ema_update.py ema_update_: ``sums.float().contiguous()`` -> ``sums.float()``):
    float32 batch sums of any strides (a view of an all-reduced buffer) update the state as
    their contiguous copy does (the fused kernel reads sums contiguous)."""
    from fastvq.ops.ema_update import ema_update_

    L, K, D = 2, 5, 3
    state = (randn(L, K, D, seed=33, device=device), randn(L, K, seed=34, device=device).abs() * 5,
             randn(L, K, D, seed=35, device=device) * 3)
    counts = torch.tensor([[1.0, 0.0, 2.0, 3.0, 1.0], [0.0, 4.0, 1.0, 0.0, 2.0]], device=device)
    sums = randn(L, K, D, seed=36, device=device) * counts.unsqueeze(-1)
    want = [t.clone() for t in state]
    ema_update_(*want, counts, sums, 0.9, 1e-5)
    got = [t.clone() for t in state]
    ema_update_(*got, counts, noncontiguous(sums), 0.9, 1e-5)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def test_semantic_id_stats_last_codes_past_the_group_size_are_codes(device):
    """E97 (ops/semantic_ids.py semantic_id_stats: ``last < sizes[group]`` -> ``<=``): with
    ``collision_level=None`` the last column is a collision level only if each group of equal
    prefixes holds 0 .. size - 1; an item alone in its group with last code 1 is raw codes."""
    stats = fastvq.semantic_id_stats(torch.tensor([[5, 1], [6, 0], [6, 1]], device=device))
    assert not stats.has_collision_level
    assert (stats.num_unique, stats.max_group_size) == (3, 1)


def test_semantic_id_stats_of_one_column_never_takes_it_as_the_level(device):
    """E98 (ops/semantic_ids.py semantic_id_stats: the default reading from ``width >= 2`` ->
    ``>= 1``): one column of codes is codes (a collision level needs a column before it)."""
    stats = fastvq.semantic_id_stats(torch.tensor([[0], [1], [2]], device=device))
    assert not stats.has_collision_level
    assert (stats.num_unique, stats.collision_rate, stats.max_group_size) == (3, 0.0, 1)


def test_bitcode_sum_counts_many_infinite_selections_exactly(device):
    """E104 (ops/bitcodes.py _code_sum: the selection counts always in float32, not float64 once
    ``(num_bits + 1)^3 > 2^24``): 5000 bits whose selected rows hold 4001 entries of -inf in one
    column sum to -inf; float32 counts (4001 * 5001, odd, above 2^24) round to an even number
    whose remainder reads as a selected +inf, which made the sum NaN."""
    from fastvq.ops.bitcodes import bitcode_decode

    nb = 5000
    codebook = torch.zeros(2 * nb, 2, device=device)
    codebook[1:2 * 4001:2, 0] = float("-inf")  # bit k = 1 selects row 2k + 1
    bits = torch.ones(1, nb, dtype=torch.int64, device=device)
    out = bitcode_decode("Bitcodes", bits, codebook)
    assert out[0, 0].item() == float("-inf") and out[0, 1].item() == 0.0


def test_topk_codes_takes_k_up_to_128():
    """E16 (ops/topk_codes.py: ``k > MAX_K`` -> ``k >= MAX_K``): k = 128 is the documented maximum
    (``1 <= k <= min(K, 128)``) and runs; 129 is refused. (Reference backend: the check is the
    wrapper's, before any backend.)"""
    x, c = randn(3, 4, seed=37), randn(130, 4, seed=38)
    with fastvq.backend("reference"):
        idx, dist = fastvq.topk_codes(x, c, 128)
        with pytest.raises(ValueError, match="above the supported maximum 128"):
            fastvq.topk_codes(x, c, 129)
    assert idx.shape == (3, 128) and (dist[:, 1:] >= dist[:, :-1]).all()
    d64 = (x.double()[:, None, :] - c.double()[None]).square().sum(-1)
    assert torch.equal(idx.sort(-1).values, d64.argsort(-1)[:, :128].sort(-1).values)


def test_codebooks_of_exactly_two_to_the_31_elements_are_refused(monkeypatch):
    """E28 (ops/residual_quantize.py: ``codebooks.numel() >= 2**31`` -> ``>``): codebooks of
    exactly 2^31 elements are beyond the kernels' int32 offsets too (the suite's test had 2^31 +
    1024). The launcher is replaced by one that fails, so the mutant does not run for long."""
    import fastvq.kernels.residual_quantize as krq

    def launched(*args, **kwargs):
        raise AssertionError("the Triton kernel was launched on 2^31 elements")

    monkeypatch.setattr(krq, "residual_quantize_fwd", launched)
    shape = (2, 2**20, 1024)
    cb = torch.zeros((), dtype=torch.float16).expand(shape)  # (no memory: the op checks the count first)
    assert cb.numel() == 2**31
    with fastvq.backend("triton"), pytest.raises(ValueError, match="hold 2\\^31 elements"):
        fastvq.residual_quantize(randn(4, 1024).half(), cb)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_nearest_code_shape_only_outputs_of_16_bit_inputs(dtype):
    """E13 (ops/nearest_code.py register_fake: distances in x's dtype, not float32): the op's
    shape-only implementation (meta tensors, torch.compile's tracing) gives float32 distances for
    16-bit inputs, as the op does; the suite's opcheck and compile tests used float32 inputs."""
    x = torch.empty(2, 5, 4, dtype=dtype, device="meta")
    c = torch.empty(7, 4, dtype=dtype, device="meta")
    idx, dist = fastvq.nearest_code(x, c)
    assert (idx.dtype, dist.dtype, dist.shape) == (torch.int64, torch.float32, (2, 5))


def test_topk_codes_shape_only_output_for_k_1():
    """E19 (ops/topk_codes.py register_fake: ``k`` -> ``max(k, 2)``): the shape-only
    implementation (meta tensors, torch.compile's tracing) gives ``x.shape[:-1] + (k,)`` for
    k = 1 as well; the suite's opcheck and compile tests used k > 1."""
    x = torch.empty(5, 4, device="meta")
    c = torch.empty(7, 4, device="meta")
    idx, dist = fastvq.topk_codes(x, c, 1)
    assert idx.shape == dist.shape == (5, 1)


def test_mine_negatives_positive_of_another_width_is_refused(backend):
    """E24 (ops/mine_negatives.py: ``positive.shape != anchor.shape`` -> rows only): a positive
    with as many rows as anchor but another feature count is the documented ValueError naming
    both shapes (the suite's bad-shape case differed in rows)."""
    a, n = randn(4, 3, seed=42), randn(6, 3, seed=43)
    with pytest.raises(ValueError, match=r"positive must have the shape of anchor, got \(4, 5\) and \(4, 3\)"):
        fastvq.mine_negatives(a, randn(4, 5, seed=44), n)


def test_forward_mode_tangent_is_refused_through_nested_vmap(backend):
    """E03 (ops/_custom_op.py _tangent: ``while is_batchedtensor`` -> ``if``): under two vmaps
    inside a dual level the input is batched twice; every wrapper is looked through, so a tangent
    is refused with fastvq's message, and an input without one runs (one unwrap left a batched
    tensor for unpack_dual, which has no batching rule: torch's internal error)."""
    import torch.autograd.forward_ad as fwAD

    x, t, q = randn(2, 3, 4, seed=45), randn(2, 3, 4, seed=46), randn(4, seed=47)
    f = torch.func.vmap(torch.func.vmap(lambda r: fastvq.rotation_trick(r, q)))
    with fwAD.dual_level():
        assert torch.equal(f(x), q.expand(2, 3, 4))
        with pytest.raises(RuntimeError, match="forward-mode AD"):
            f(fwAD.make_dual(x, t))



def test_code_usage_meter_refuses_a_batch_on_another_device(device):
    """E88 (ops/code_usage.py CodeUsageMeter.update: the device check dropped): a batch on another
    device than the meter's state is the documented ValueError naming both (a meta tensor stands
    in for a second device)."""
    meter = fastvq.CodeUsageMeter(4)
    meter.update(torch.tensor([0, 1, 1, 3], device=device))
    with pytest.raises(ValueError, match="accumulates on"):
        meter.update(torch.tensor([0, 2], device="meta"))


def test_code_statistics_skipped_of_one_level_is_0_d(backend):
    """E83 (ops/code_statistics.py: ``skipped.reshape(())`` dropped for the (N, D) form):
    ``return_skipped=True`` gives an int64 ``()`` count for x (N, D) (``(L,)`` only for the
    batched form)."""
    x = randn(6, 3, seed=50)
    x[2, 1] = float("nan")
    idx = torch.tensor([0, 1, 2, 0, 1, 2], device=x.device)
    _, _, skipped = fastvq.code_statistics(x, idx, 3, return_skipped=True)
    assert skipped.shape == () and skipped.dtype == torch.int64 and int(skipped) == 1
