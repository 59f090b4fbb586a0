"""idprobe: semantic ids, code usage, bitcodes, ``fastvq.testing`` and ``python -m fastvq check``
probed on both backends against plain-Python / float64 computations written here.

Its eight findings, all fixed (each test below failed before its fix):

- I1 ``check_code_usage`` feeds 1000 ids, under one BLOCK_N=1024 program: a launcher that
  drops every block after the first passes the check.
- I2 ``check_code_usage`` never feeds an out-of-range id: a launcher that loses the overflow bin
  passes the check, and ``code_usage`` then accepts out-of-range ids silently.
- I3 ``check_semantic_ids`` feeds only contiguous int64 codes: a launcher that ignores the codes'
  strides passes the check.
- I4 ``assert_argmin_within_bound`` does not check one index per row of ``x``: no index for one
  row, or one index for two rows, passes.
- I5 ``assert_argmin_within_bound`` truncates float indices (19.5 -> 19) and passes them.
- I6 ``CodeUsageMeter.update``'s first batch usage aliases the meter's accumulator.
- I7 ``assert_grad_nondegenerate`` cannot pass any non-bitwise-zero result when the exact
  gradient is all zero, whatever ``floor``/``rtol``/``condition`` say.
- I8 ``RQVAE.semantic_ids({"features": X})`` iterates the dict's keys: "a batch must be ... got str".

Fixes: ``fastvq.check`` feeds 3,000 ids (several programs) and out-of-range ids, and
column-major codes; ``fastvq.testing`` refuses non-integer indices and indices not shaped
``x.shape[:-1]``, and passes an all-zero exact gradient when every ``|actual| <= floor``; the
meter copies its first counts; ``RQVAE.semantic_ids`` reads a dict's ``"features"``.

The tests after them keep properties that held.
"""

import math

import numpy as np
import pytest
import torch

import fastvq
import fastvq.testing as ft
from tests.utils import generator, raises_invalid


def _levels(rows):
    """Plain-Python collision level: number of earlier equal rows."""
    seen, out = {}, []
    for r in rows:
        r = tuple(r)
        out.append(seen.get(r, 0))
        seen[r] = seen.get(r, 0) + 1
    return out


def _entropy64(counts):
    n = sum(counts)
    return 0.0 if n == 0 else -sum((c / n) * math.log(c / n + 1e-10) for c in counts)


def _run_check_with(monkeypatch, module_name, attr, fake, op):
    import importlib

    import fastvq.check as chk

    mod = importlib.import_module(module_name)
    monkeypatch.setattr(mod, attr, fake(getattr(mod, attr)))
    return chk.run_check([op], [torch.float32])


# --------------------------------------------------------------------------- findings


def test_i1_check_code_usage_catches_a_launcher_that_drops_later_blocks(monkeypatch, capsys):
    def fake(real):
        return lambda indices, k: real(indices[:1024], k)  # every program after the first is lost

    assert _run_check_with(monkeypatch, "fastvq.kernels.code_usage", "code_usage_fwd", fake, "code_usage") == 1


def test_i2_check_code_usage_catches_a_launcher_that_loses_the_overflow_bin(monkeypatch, capsys):
    def fake(real):
        def run(indices, k):
            counts = real(indices, k)
            counts[k] = 0  # out-of-range ids vanish: code_usage([7], 5) then passes silently
            return counts
        return run

    assert _run_check_with(monkeypatch, "fastvq.kernels.code_usage", "code_usage_fwd", fake, "code_usage") == 1


def test_i3_check_semantic_ids_catches_a_launcher_that_ignores_strides(monkeypatch, capsys):
    def fake(real):
        def run(codes):  # reads the codes as if they were row-major contiguous
            n, l = codes.shape
            flat = codes.as_strided((codes.numel(),), (1,), codes.storage_offset())
            return real(flat[: n * l].reshape(n, l)) if codes.numel() else real(codes)
        return run

    assert _run_check_with(monkeypatch, "fastvq.kernels.semantic_ids", "semantic_ids_fwd", fake, "semantic_ids") == 1


def test_i4_argmin_check_rejects_indices_of_the_wrong_length():
    torch.manual_seed(0)
    x, c = torch.randn(2, 8), torch.randn(10, 8)
    x[1] = 100.0  # far from every code: d_min of row 1 is large
    best = torch.cdist(x.double(), c.double()).argmin(1)
    with pytest.raises((AssertionError, ValueError)):  # no index for the one row
        ft.assert_argmin_within_bound(x[:1], c, best[:0])
    with pytest.raises((AssertionError, ValueError)):  # one index for two rows: passes
        ft.assert_argmin_within_bound(x, c, best[:1])
    y = torch.randn(2, 8)
    with pytest.raises((AssertionError, ValueError)):  # when it fails: IndexError building the message
        ft.assert_argmin_within_bound(y, c, (torch.cdist(y.double(), c.double()).argmin(1)[:1] + 1) % 10)


def test_i5_argmin_check_rejects_non_integer_indices():
    torch.manual_seed(0)
    x, c = torch.randn(20, 8), torch.randn(10, 8)
    best = torch.cdist(x.double(), c.double()).argmin(1)
    with pytest.raises((AssertionError, TypeError, ValueError)):
        ft.assert_argmin_within_bound(x, c, best.double() + 0.5)  # 19.5 is no code index


def test_i6_meter_batch_usage_does_not_alias_the_accumulator(backend, device):
    meter = fastvq.CodeUsageMeter(3)
    batch = meter.update(torch.tensor([0, 1], device=device))
    batch.counts.mul_(0)  # the caller owns what update() returned
    assert meter.compute().counts.tolist() == [1, 1, 0]


def test_i7_grad_check_passes_rounding_residue_of_an_all_zero_gradient():
    # 1 + 2^-30 - 1 - 2^-30 in float32, left to right: -2^-30; float64: 0. The residue is far
    # inside the sum's rounding bound (gamma_3 * sum|terms| = 3.6e-7), and below the floor given.
    terms = torch.tensor([1.0, 2.0**-30, -1.0, -(2.0**-30)])
    acc = torch.zeros((), dtype=torch.float32)
    for t in terms:
        acc = acc + t
    actual, exact = acc.reshape(1), terms.double().sum().reshape(1)
    assert float(actual) != 0.0 and float(exact) == 0.0
    ft.assert_grad_nondegenerate(actual, exact, reduce_len=4, floor=1e-8)


def test_i8_rqvae_semantic_ids_of_a_dict_is_read_or_named():
    torch.manual_seed(0)
    model = fastvq.nn.RQVAE(6, 8, 4, num_quantizers=2, num_embeddings=3)
    x = torch.randn(5, 6)
    try:
        got = model.semantic_ids({"features": x}, progress=False)
    except (TypeError, ValueError) as e:
        assert "dict" in str(e) or "Mapping" in str(e), str(e)  # not "a batch ... got str"
    else:
        assert torch.equal(got, model.semantic_ids(x, progress=False))


# --------------------------------------------------------------------------- what held


@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64], ids=str)
def test_semantic_ids_strided_and_extreme_values(backend, device, dtype):
    info = torch.iinfo(dtype)
    base = torch.tensor([[info.min, info.max, 0], [0, 0, 0], [info.min, info.max, 0], [info.max, 1, 2]] * 3,
                        dtype=dtype, device=device)
    codes = base.T.contiguous().T[:, ::2]  # column-major and strided
    out = fastvq.semantic_ids(codes)
    rows = codes.long().tolist()
    assert out.dtype == torch.int64 and out[:, :-1].tolist() == rows
    assert out[:, -1].tolist() == _levels(rows)


def test_semantic_id_stats_reads_or_infers_the_level(backend, device):
    codes = torch.tensor([[1, 2], [0, 2], [1, 2], [1, 2]], device=device)
    ids = fastvq.semantic_ids(codes)
    for given in (codes, ids[torch.tensor([3, 0, 2, 1], device=device)]):
        s = fastvq.semantic_id_stats(given)
        assert (s.num_items, s.num_unique, s.max_group_size, s.max_collisions) == (4, 2, 3, 2)
        assert s.collision_rate == 0.5
    assert fastvq.semantic_id_stats(ids).has_collision_level
    assert not fastvq.semantic_id_stats(ids, collision_level=False).has_collision_level
    assert fastvq.semantic_id_stats(ids, collision_level=np.bool_(False)).num_unique == 4
    with pytest.raises(ValueError, match="collision_level"):
        fastvq.semantic_id_stats(torch.tensor([[0], [0]], device=device), collision_level=True)
    with pytest.raises(TypeError, match="collision_level"):
        fastvq.semantic_id_stats(codes, collision_level=1)
    e = fastvq.semantic_id_stats(torch.zeros(0, 3, dtype=torch.long, device=device))
    assert (e.num_items, e.num_unique, e.collision_rate, e.max_group_size) == (0, 0, 0.0, 0)


def test_code_usage_against_float64(backend, device):
    idx = torch.randint(0, 40, (2100,), generator=generator(1), device=device)  # three 1024-blocks
    u = fastvq.code_usage(idx.to(torch.int16)[::2], 40)
    counts = [0] * 40
    for i in idx[::2].tolist():
        counts[i] += 1
    h = _entropy64(counts)
    assert u.counts.tolist() == counts and int(u.active_codes) == sum(c > 0 for c in counts)
    assert abs(float(u.entropy) - h) <= 1e-5 and abs(float(u.perplexity) - math.exp(h)) <= 1e-5 * math.exp(h)
    one = fastvq.code_usage(torch.zeros(3, dtype=torch.uint8, device=device), 1)
    assert float(one.entropy) == 0.0 and float(one.perplexity) == 1.0
    for bad in ([5], [-1]):
        with raises_invalid("outside"):
            fastvq.code_usage(torch.tensor(bad, device=device), 5)


def test_meter_pools_batches(backend, device):
    m = fastvq.CodeUsageMeter(5)
    m.update(torch.tensor([0, 1], device=device))
    m.update(torch.tensor([[1, 2], [2, 2]], dtype=torch.int8, device=device))
    u = m.compute()
    assert u.counts.tolist() == [1, 2, 3, 0, 0]
    assert abs(float(u.entropy) - _entropy64([1, 2, 3])) < 1e-6
    want = (math.exp(_entropy64([1, 1])) + math.exp(_entropy64([1, 3]))) / 2
    assert abs(float(m.mean_batch_perplexity) - want) < 1e-5
    m.update(torch.tensor([7], device=device))
    with pytest.raises(ValueError, match="outside"):
        m.compute()
    m.reset()
    assert m.compute().counts.tolist() == [0] * 5 and m.num_batches == 0


def test_bits_round_trip_and_bitcodes_eval(device):
    vals = torch.tensor([0, 1, 2**62, 2**63 - 1], device=device)
    assert fastvq.to_decimal(fastvq.to_bits(vals, 63)).tolist() == vals.tolist()
    assert fastvq.to_bits(torch.tensor([255], dtype=torch.uint8, device=device), 8).tolist() == [[1] * 8]
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        bc = fastvq.nn.Bitcodes(8, 5, 1.0).to(device=device, dtype=dtype).eval()
        x = torch.randn(7, 8, device=device, dtype=dtype)
        y, bits = bc(x)
        s = (x.double() @ bc.codebook.double().T).view(7, 5, 2)
        assert torch.equal(bits, (s[..., 1] > s[..., 0]).long())
        assert torch.equal(bc.from_bits(bits), y)
    for bad in ([16], [-1]):
        with raises_invalid("indices"):
            fastvq.to_bits(torch.tensor(bad, device=device), 4)
    with raises_invalid("0 or 1"):
        fastvq.to_decimal(torch.tensor([0.5, 1.0], device=device))


def test_testing_rejects_wrong_results():
    torch.manual_seed(0)
    x, c = torch.randn(30, 16), torch.randn(25, 16)
    d = torch.cdist(x.double(), c.double())
    best, second = d.argmin(1), d.topk(2, largest=False).indices[:, 1]
    ft.assert_argmin_within_bound(x, c, best)
    with pytest.raises(AssertionError):
        ft.assert_argmin_within_bound(x, c, torch.cat([second[:1], best[1:]]))
    e = torch.randn(50, dtype=torch.float64)
    ft.assert_close(e.bfloat16(), e, dtype=torch.bfloat16)
    far = e.bfloat16()
    for _ in range(3):
        far = torch.nextafter(far, torch.full_like(far, math.inf))
    with pytest.raises(AssertionError):
        ft.assert_close(far, e, dtype=torch.bfloat16)
    one = torch.ones(1, dtype=torch.float64)
    for act, exp in ((math.nan, 1.0), (1.0, math.nan), (math.inf, 1e30), (-math.inf, math.inf)):
        with pytest.raises(AssertionError):
            ft.assert_close(torch.tensor([act]), exp * one, dtype=torch.float32)
    with pytest.raises(AssertionError, match="shape"):
        ft.assert_close(torch.zeros(3), torch.zeros(3, 1, dtype=torch.float64), dtype=torch.float32)
    g = torch.randn(20, dtype=torch.float64)
    ft.assert_grad_nondegenerate(g.float(), g)
    for wrong in (torch.zeros(20), g.float() / 2, torch.where(torch.arange(20) == 3, 0.0, g.float())):
        with pytest.raises(AssertionError):
            ft.assert_grad_nondegenerate(wrong, g)
