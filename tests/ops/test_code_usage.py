import math

import pytest
import torch

import fastvq
from tests.utils import assert_close, count_kernel_launches, raises_invalid


def _seed_usage(indices, K):
    """The seed's compute_quantization_metrics formulas for one batch, in float64."""
    counts = torch.bincount(indices.flatten().long(), minlength=K)
    probs = counts.double() / max(counts.sum().item(), 1)
    entropy = -torch.sum(probs * torch.log(probs + 1e-10))
    return counts, torch.exp(entropy), (counts > 0).sum(), entropy


def _randint(high, shape, dtype=torch.int64):
    return torch.randint(0, high, shape).to(dtype)


CASES = [  # (shape, K)
    pytest.param((0,), 5, id="N0-K5"),
    pytest.param((1,), 1, id="N1-K1"),
    pytest.param((127,), 3, id="N127-K3"),
    pytest.param((127,), 1000, id="N127-K1000"),
    pytest.param((2048 + 5,), 7, id="N2053-K7-contended"),
    pytest.param((4, 5, 3), 11, id="batch-dims-B4-T5-L3"),
]


@pytest.mark.parametrize("shape,K", CASES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.uint8], ids=str)
def test_parity_with_seed_formulas(backend, shape, K, dtype):
    K = min(K, 256) if dtype == torch.uint8 else K  # uint8 holds ids < 256
    idx = _randint(K, shape, dtype)
    u = fastvq.code_usage(idx, K)
    counts, ppl, active, ent = _seed_usage(idx, K)
    assert u.counts.dtype == torch.int64 and u.counts.shape == (K,)
    assert torch.equal(u.counts, counts)
    assert u.active_codes.dtype == torch.int64 and u.active_codes.item() == active.item()
    assert u.perplexity.shape == () and u.entropy.shape == ()
    # (the seed's log(p + 1e-10) moves its entropy by up to K 1e-10 from the exact one, which
    # fastvq computes: at K = 1 the seed gives -1e-10 for 0; the terms are O(1), magnitude 1)
    assert_close(u.entropy, ent, torch.float32, K, magnitude=max(float(ent.abs()), 1.0))
    assert_close(u.perplexity, ppl, torch.float32, K)
    if shape[0] == 0:
        assert u.perplexity.item() == 1.0 and u.entropy.item() == 0.0 and u.active_codes.item() == 0


@pytest.mark.parametrize("ids", [[], [3, 3, 3]], ids=["empty", "one-code"])
def test_zero_entropy_is_positive_zero(backend, ids):
    # no code, or one code, in use: entropy +0.0 (the seed's -sum gives -0.0, which prints "-0.")
    u = fastvq.code_usage(torch.tensor(ids, dtype=torch.int64), 8)
    assert u.entropy.item() == 0.0 and math.copysign(1.0, u.entropy.item()) == 1.0
    meter = fastvq.CodeUsageMeter(8)
    assert math.copysign(1.0, meter.compute().entropy.item()) == 1.0
    meter.update(torch.tensor(ids, dtype=torch.int64))
    assert math.copysign(1.0, meter.compute().entropy.item()) == 1.0


def test_known_values(backend):
    u = fastvq.code_usage(torch.tensor([0, 1, 1, 3]), 4)
    assert u.counts.tolist() == [1, 2, 0, 1]
    assert u.active_codes.item() == 3
    assert u.perplexity.item() == pytest.approx(math.exp(1.5 * math.log(2)), rel=1e-5)
    assert u.usage.item() == pytest.approx(0.75)
    d = u.to_dict()
    assert d["active_codes"] == 3 and d["perplexity"] == pytest.approx(2 ** 1.5, rel=1e-5)
    # uniform over K codes: perplexity K
    assert fastvq.code_usage(torch.arange(10).repeat(3), 10).perplexity.item() == pytest.approx(10.0, rel=1e-5)


def test_noncontiguous(backend):
    idx = _randint(9, (30, 8))
    assert torch.equal(fastvq.code_usage(idx[:, ::3], 9).counts, _seed_usage(idx[:, ::3], 9)[0])
    assert torch.equal(fastvq.code_usage(idx.T, 9).counts, _seed_usage(idx, 9)[0])


def test_meter_equals_concatenation(backend):
    K = 13
    batches = [_randint(K, (n,)) for n in (17, 1, 0, 64, 33)] + [_randint(K, (3, 4, 2), torch.int32)]
    meter = fastvq.CodeUsageMeter(K)
    for b in batches:
        batch_usage = meter.update(b)
        assert torch.equal(batch_usage.counts, _seed_usage(b, K)[0])
    assert meter.num_batches == len(batches)
    got = meter.compute()
    want = fastvq.code_usage(torch.cat([b.flatten().long() for b in batches]), K)
    assert torch.equal(got.counts, want.counts)
    assert got.active_codes.item() == want.active_codes.item()
    assert_close(got.perplexity, want.perplexity)
    assert_close(got.entropy, want.entropy)


def _seed_compute_quantization_metrics(batches, num_embeddings):
    """The seed's loop, with the model replaced by the batches of codes it would return."""
    total_perplexity = 0
    total_usage = torch.zeros(num_embeddings)
    for encoding_indices in batches:
        avg_probs = torch.bincount(encoding_indices.flatten(), minlength=num_embeddings).float()
        avg_probs = avg_probs / avg_probs.sum()
        perplexity = torch.exp(-torch.sum(avg_probs * torch.log(avg_probs + 1e-10)))
        total_perplexity += perplexity
        total_usage += avg_probs
    active_codes = (total_usage > 0).sum().item()
    usage_entropy = -torch.sum(total_usage * torch.log(total_usage + 1e-10))
    return {"perplexity": total_perplexity / len(batches), "active_codes": active_codes, "usage_entropy": usage_entropy.item()}


def test_meter_matches_seed_loop(backend):
    K = 16
    batches = [_randint(K // 2, (8, 3)) for _ in range(4)] + [_randint(K, (20, 3))]
    meter = fastvq.CodeUsageMeter(K)
    for b in batches:
        meter.update(b)
    seed = _seed_compute_quantization_metrics(batches, K)
    assert meter.mean_batch_perplexity.item() == pytest.approx(seed["perplexity"].item(), rel=1e-5)
    assert meter.compute().active_codes.item() == seed["active_codes"]
    # one batch: the seed's usage_entropy is the entropy of that batch
    one = fastvq.CodeUsageMeter(K)
    one.update(batches[-1])
    assert one.compute().entropy.item() == pytest.approx(
        _seed_compute_quantization_metrics(batches[-1:], K)["usage_entropy"], rel=1e-5
    )


def test_meter_reset_and_empty():
    meter = fastvq.CodeUsageMeter(4)
    assert meter.device is None
    u = meter.compute()
    assert u.counts.tolist() == [0, 0, 0, 0] and u.perplexity.item() == 1.0
    with pytest.raises(RuntimeError, match="CodeUsageMeter"):
        meter.mean_batch_perplexity
    meter.update(torch.tensor([1, 1, 2]))
    assert meter.compute().counts.tolist() == [0, 2, 1, 0]
    meter.reset()
    assert meter.num_batches == 0 and meter.compute().counts.tolist() == [0, 0, 0, 0]
    meter.update(torch.tensor([3]))
    assert meter.compute().counts.tolist() == [0, 0, 0, 1]
    assert meter.mean_batch_perplexity.item() == pytest.approx(1.0)


def test_meter_out_of_range_raises_at_compute(backend):
    meter = fastvq.CodeUsageMeter(4)
    batch = meter.update(torch.tensor([0, 4, 1, -1]))  # no error (no host sync) here
    assert batch.counts.tolist() == [1, 1, 0, 0]
    meter.update(torch.tensor([2]))
    with pytest.raises(ValueError, match=r"CodeUsageMeter: 2 indices are outside \[0, 4\)"):
        meter.compute()


@pytest.mark.parametrize(
    "indices,K,err",
    [
        (torch.tensor([0.0, 1.0]), 5, TypeError),
        (torch.tensor([True, False]), 5, TypeError),
        ([0, 1], 5, TypeError),
        (torch.tensor([0]), 0, ValueError),
        (torch.tensor([0]), 2.5, ValueError),
        (torch.tensor([0]), float("inf"), ValueError),
        (torch.tensor([0]), "5", TypeError),
        (torch.tensor([0]), True, TypeError),
    ],
    ids=["float-dtype", "bool-dtype", "not-tensor", "K0", "K-nonintegral", "K-inf", "K-str", "K-bool"],
)
def test_bad_input(backend, indices, K, err):
    with pytest.raises(err, match="code_usage"):
        fastvq.code_usage(indices, K)


@pytest.mark.parametrize("indices", [torch.tensor([0, 1, 5]), torch.tensor([[0, -1]])], ids=["id-eq-K", "negative-id"])
def test_out_of_range_raises_without_host_sync(backend, monkeypatch, indices):
    # checked on the device (a CPU check raises at once; CUDA: an asynchronous device-side assert)
    from fastvq.bench.traffic import metering

    def no_item(self):
        raise AssertionError("host sync in code_usage")

    with metering() as meter, monkeypatch.context() as m:  # (undone before the meter's own patches)
        m.setattr(torch.Tensor, "item", no_item)
        m.setattr(torch.Tensor, "tolist", no_item)
        fastvq.code_usage(torch.tensor([0, 1, 4]), 5)  # valid: no host read at all
        assert meter.counts["fwd"].syncs == 0, dict(meter.counts["fwd"].sync_ops)
    with raises_invalid(r"code_usage: 1 indices are outside \[0, 5\)"):
        fastvq.code_usage(indices, 5)


def test_one_index_out_of_range_makes_entropy_and_perplexity_nan(backend, device):
    # mutA M13: the tests had two bad indices; a check that let one through survived them
    m = fastvq.CodeUsageMeter(5)
    u = m.update(torch.tensor([0, 1, 7], device=device))
    assert u.out_of_range.item() == 1 and u.counts.tolist() == [1, 1, 0, 0, 0]
    assert math.isnan(u.entropy.item()) and math.isnan(u.perplexity.item())
    assert math.isnan(m.mean_batch_perplexity.item())
    with pytest.raises(ValueError, match=r"CodeUsageMeter: 1 indices are outside \[0, 5\)"):
        m.compute()


def test_meter_batch_usage_reports_out_of_range(backend):
    u = fastvq.CodeUsageMeter(5).update(torch.tensor([0, 1, 5, -2]))
    assert u.out_of_range.item() == 2 and u.counts.tolist() == [1, 1, 0, 0, 0]
    assert math.isnan(u.entropy.item()) and math.isnan(u.perplexity.item())
    with pytest.raises(ValueError, match=r"CodeUsage: 2 indices are outside \[0, 5\)"):
        u.to_dict()


def test_integral_float_codebook_size_is_accepted():
    assert fastvq.code_usage(torch.tensor([1, 3]), 4.0).counts.tolist() == [0, 1, 0, 1]


@pytest.mark.parametrize("counts", [[0, 0, 0], [2**62, 2**62, 0], [2**62, 1, 2**40]], ids=["empty", "huge", "huge-mixed"])
def test_statistics_of_empty_and_huge_counts(counts):
    from fastvq.reference.code_usage import usage_from_counts

    c = torch.tensor(counts, dtype=torch.int64)
    u = usage_from_counts(c, torch.zeros((), dtype=torch.int64))
    p = c.double() / max(c.double().sum().item(), 1.0)
    ent = -(p * torch.log(p + 1e-10)).sum()
    assert torch.isfinite(u.entropy) and torch.isfinite(u.perplexity)
    assert u.entropy.item() == pytest.approx(ent.item(), abs=1e-6)
    assert u.perplexity.item() == pytest.approx(math.exp(ent.item()), rel=1e-6)
    assert u.to_dict()["active_codes"] == sum(x > 0 for x in counts)


@pytest.mark.parametrize("K", [2**31, 2**40, 2**62, 10**19], ids=["2^31", "2^40", "2^62", "1e19"])
def test_huge_codebook_size_is_named(backend, K):
    """A codebook_size beyond the int32 index range is a ValueError naming it, on both backends
    and in the meter (2**62 was torch's 'Storage size calculation overflowed', 2**40 an 8 TiB
    allocation attempt); 2**31 - 1 is the largest accepted."""
    idx = torch.tensor([0, 3])
    with pytest.raises(ValueError, match=r"fastvq\.code_usage: codebook_size must be <= 2147483647"):
        fastvq.code_usage(idx, K)
    with pytest.raises(ValueError, match=r"fastvq\.CodeUsageMeter: codebook_size must be <= 2147483647"):
        fastvq.CodeUsageMeter(K)


@pytest.mark.parametrize("K,err", [(0, ValueError), (3.5, ValueError), (True, TypeError)], ids=["K0", "K-float", "K-bool"])
def test_meter_bad_input(K, err):
    with pytest.raises(err, match="CodeUsageMeter"):
        fastvq.CodeUsageMeter(K)
    with pytest.raises(TypeError, match="CodeUsageMeter"):
        fastvq.CodeUsageMeter(3).update(torch.rand(4))


def test_opcheck():
    idx = _randint(6, (50,))
    for name in ("reference", "triton"):
        with fastvq.backend(name):
            for check in (True, False):
                torch.library.opcheck(torch.ops.fastvq.code_usage_counts.default, (idx, 6, check))
                torch.library.opcheck(torch.ops.fastvq.code_usage_counts.default, (idx.int()[:0], 6, check))


def test_compile_fullgraph_checks_range(backend):
    # the out-of-range check reads the device, so it must live in the op body: a host read in
    # the Python wrapper made fullgraph tracing fail (and would be a graph break otherwise)
    torch._dynamo.reset()
    fn = torch.compile(lambda i: fastvq.code_usage(i, 5), fullgraph=True, backend="aot_eager")
    idx = torch.tensor([0, 1, 1, 3, 4, 4, 4])
    got, want = fn(idx), fastvq.code_usage(idx, 5)
    assert torch.equal(got.counts, want.counts) and torch.equal(got.active_codes, want.active_codes)
    assert_close(got.perplexity, want.perplexity)
    with raises_invalid(r"code_usage: 1 indices are outside \[0, 5\)"):
        fn(torch.tensor([0, 5, 1, 2, 3, 4, 0]))


@pytest.mark.gpu
def test_large_gpu():
    idx = torch.randint(0, 8192, (3, 1 << 20))
    with fastvq.backend("triton"):
        u = fastvq.code_usage(idx, 8192)
        meter = fastvq.CodeUsageMeter(8192)
        for row in idx:
            meter.update(row)
    assert torch.equal(u.counts, torch.bincount(idx.flatten(), minlength=8192))
    assert torch.equal(meter.compute().counts, u.counts)



@pytest.mark.parametrize("name", ["reference", "triton"])
def test_triton_backend_really_launches_kernels(monkeypatch, name):
    from fastvq.kernels import code_usage as kmod

    launched = count_kernel_launches(monkeypatch, kmod, "_code_usage_fwd_kernel")
    with fastvq.backend(name):
        (fastvq.code_usage(torch.tensor([0, 2, 2]), 3), fastvq.CodeUsageMeter(3).update(torch.tensor([1])))
    assert launched == (["_code_usage_fwd_kernel"] * 2 if name == "triton" else [])


# ------------------------------------------------------------------ mutation round C (mutC): behaviour no test pinned


def test_code_usage_ids_beyond_int32_are_out_of_range():
    # C59: the kernel's ids cast to int32: 2^32 + 1 wrapped to 1, counted as code 1, and the
    # op's range check passed. (test_code_usage's out-of-range ids all fit int32)
    from fastvq.kernels.code_usage import code_usage_fwd

    ids = torch.tensor([1, 2**32 + 1, -(2**32) + 2, 3])
    assert code_usage_fwd(ids, 4).tolist() == [0, 1, 0, 1, 2]
    for name in ("reference", "triton"):
        with fastvq.backend(name), pytest.raises(ValueError):
            fastvq.code_usage(ids, 4)
