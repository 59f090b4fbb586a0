"""fastvq.ops.ema_update.ema_update_: the seed's EMA codebook update, guarded, fused on Triton."""

import pytest
import torch

import fastvq
from fastvq.ops.ema_update import ema_update_
from fastvq.reference.ema_update import ema_update_ref_
from tests.utils import assert_close, generator, randn


def _state(L, K, D, dtype=torch.float32, seed=0, device=None):
    codebook = randn(L, K, D, seed=seed, device=device).to(dtype)
    cluster_size = randn(L, K, seed=seed + 1, device=device).abs() * 5
    embed_avg = randn(L, K, D, seed=seed + 2, device=device) * 3
    counts = torch.randint(0, 4, (L, K), generator=generator(seed + 3, device), device=device).float()
    sums = randn(L, K, D, seed=seed + 4, device=device) * counts.unsqueeze(-1)
    return codebook, cluster_size, embed_avg, counts, sums


def _seed_update(codebook, cluster_size, embed_avg, counts, sums, decay, eps):
    """The seed EMAQuantizer's arithmetic, per level, unguarded, float64."""
    K = codebook.shape[1]
    cs = cluster_size.double() * decay + counts.double() * (1 - decay)
    ea = embed_avg.double() * decay + sums.double() * (1 - decay)
    n = cs.sum(-1, keepdim=True)
    smoothed = (cs + eps) / (n + K * eps) * n
    return ea / smoothed.unsqueeze(-1), cs, ea


@pytest.mark.parametrize("eps", [1e-5, 0.5])  # (0.5: the smoothing's own terms beyond the tolerance; mutA M07)
@pytest.mark.parametrize("L,K,D", [(1, 7, 5), (3, 33, 60), (2, 5, 1100)], ids=["L1-K7-D5", "L3-K33-D60", "D1100"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_matches_the_seed_update(backend, device, L, K, D, dtype, eps):
    codebook, cs, ea, counts, sums = _state(L, K, D, dtype, device=device)
    want_code, want_cs, want_ea = _seed_update(codebook, cs, ea, counts, sums, 0.9, eps)
    ema_update_(codebook, cs, ea, counts, sums, 0.9, eps)
    assert_close(cs, want_cs, reduce_len=3)
    assert_close(ea, want_ea, reduce_len=3)
    assert_close(codebook, want_code, reduce_len=K + 8)


def test_guards(backend, device):
    L, K, D = 3, 6, 4
    codebook, cs, ea, counts, sums = _state(L, K, D, device=device)
    counts[1] = 0  # level 1 saw no rows: nothing changes there
    sums[1] = 0
    sums[0, 2, 1] = float("inf")  # a code whose batch sums overflowed keeps its EMA state
    sums[0, 3, 0] = float("nan")
    cs[2, 4] = 1e-30  # ... and one whose new value overflows keeps its value
    counts[2, 4] = 0
    ea[2, 4] = 3e38
    sums[2, 4] = 0
    before = [t.clone() for t in (codebook, cs, ea)]
    ema_update_(codebook, cs, ea, counts, sums, 0.99, 1e-5)
    for new, old in zip((codebook, cs, ea), before):
        assert torch.equal(new[1], old[1])
        assert new.isfinite().all()
    for k in (2, 3):
        assert cs[0, k] == before[1][0, k] and torch.equal(ea[0, k], before[2][0, k])
    assert torch.equal(codebook[2, 4], before[0][2, 4])
    assert not torch.equal(codebook[0, 0], before[0][0, 0])  # the others did move


@pytest.mark.parametrize("case", ["total-beyond-float32", "code-far-below-the-total"])
def test_smoothing_near_float32s_range_is_rounded_once(backend, device, case):
    # fuzzP: the total n and the smoothing were float32. Two codes counting 2e38 each (finite)
    # made n = inf and kept every code's old value while its EMA state moved on; a code counting
    # 1.2e-3 beside one of 3e38 got a subnormal quotient (cs + eps) / (n + K eps) that lost its
    # bits: 6.99896 for a mean of 7. Both are now the float64 arithmetic rounded once
    if case == "total-beyond-float32":
        counts, sums = torch.tensor([[2e38, 2e38]]), torch.tensor([[[2e38], [-2e38]]])
    else:
        counts, sums = torch.tensor([[1.2345e-3, 3e38]]), torch.tensor([[[1.2345e-3 * 7.0], [3e38]]])
    counts, sums = counts.to(device), sums.to(device)
    codebook = torch.tensor([[[1.0], [2.0]]], device=device)
    cluster_size, embed_avg = torch.zeros(1, 2, device=device), torch.zeros(1, 2, 1, device=device)
    want, _, _ = _seed_update(codebook, cluster_size, embed_avg, counts, sums, 0.0, 1e-5)
    ema_update_(codebook, cluster_size, embed_avg, counts, sums, 0.0, 1e-5)
    assert_close(codebook, want, dtype=torch.float32, reduce_len=4)


def test_smoothing_is_the_seeds_float32_arithmetic_bit_for_bit(device):
    # the fallback above runs only where the seed's formula fails: elsewhere the smoothed counts
    # are the seed's float32 ones exactly (drop-in training; review14)
    from fastvq.reference.ema_update import ema_decisions

    for K, eps, seed in ((1, 1e-5, 0), (7, 1e-5, 1), (512, 1e-3, 2), (64, 1e-12, 3)):
        cs = randn(3, K, seed=seed, device=device).abs() * 10
        counts = randn(3, K, seed=seed + 10, device=device).abs().round()
        sums = randn(3, K, 2, seed=seed + 20, device=device)
        _, _, new_cs, smoothed = ema_decisions(cs, counts, sums, 0.9, eps)
        n = new_cs.sum(-1, keepdim=True)
        assert torch.equal(smoothed, (new_cs + eps) / (n + K * eps) * n), (K, eps)


def test_smoothing_with_an_eps_near_float32s_range(backend, device):
    # review14: eps = 1e38 at K = 1024 (K eps overflows float32) took a fallback whose float32
    # ratio n / (n + K eps) was subnormal: 4.5e-3 off. The fallback is float64 throughout now
    counts = torch.full((1, 1024), 0.01 / 1024, device=device)  # (n = 0.01: the ratio ~1e-43)
    sums = (counts * 7.0).unsqueeze(-1).contiguous()
    codebook = torch.zeros(1, 1024, 1, device=device)
    cluster_size, embed_avg = torch.zeros(1, 1024, device=device), torch.zeros(1, 1024, 1, device=device)
    want, _, _ = _seed_update(codebook, cluster_size, embed_avg, counts, sums, 0.0, 1e38)
    ema_update_(codebook, cluster_size, embed_avg, counts, sums, 0.0, 1e38)
    assert_close(codebook, want, dtype=torch.float32, reduce_len=4)


def test_strided_codebook_view(backend, device):
    # a VectorQuantizer passes weight.data.unsqueeze(0); a transposed parameter is strided too
    codebook, cs, ea, counts, sums = _state(2, 9, 6, device=device)
    want = codebook.clone()
    ema_update_ref_(want, cs.clone(), ea.clone(), counts, sums, 0.95, 1e-5)
    storage = codebook.transpose(1, 2).contiguous()  # (L, D, K)
    view = storage.transpose(1, 2)
    assert not view.is_contiguous()
    ema_update_(view, cs, ea, counts, sums, 0.95, 1e-5)
    assert_close(view, want, reduce_len=16)


def test_triton_launches_one_kernel(monkeypatch, device):
    from fastvq.kernels import ema_update as kmod
    from tests.utils import count_kernel_launches

    launched = count_kernel_launches(monkeypatch, kmod, "_ema_update_kernel")
    with fastvq.backend("triton"):
        ema_update_(*_state(2, 5, 3, device=device), 0.99, 1e-5)
    assert launched == ["_ema_update_kernel"]


def test_opcheck(device):
    codebook, cs, ea, counts, sums = _state(2, 5, 3, device=device)
    keep = torch.ones(2, 5, dtype=torch.bool, device=device)
    keep[0, 1] = False
    live = torch.tensor([True, False], device=device)
    smoothed = cs + 1.0
    for name in ("reference", "triton"):
        with fastvq.backend(name):
            torch.library.opcheck(torch.ops.fastvq.ema_update_rows_.default,
                                  (codebook.clone(), ea.clone(), sums, keep, live, smoothed, 0.99))


def test_codebook_snapshot_opcheck(device):
    # the copy a compiled training step's backward reads (fake, autograd: identity gradient)
    codebook = _state(2, 5, 3, device=device)[0].requires_grad_()
    torch.library.opcheck(torch.ops.fastvq.codebook_snapshot.default, (codebook,))


def test_refuse_checkpoint_rerun_opcheck(device):
    # the check a compiled training step keeps before its codebook update: outside a
    # checkpoint's rerun a copy of the counts (fake and real agree)
    counts = _state(2, 5, 3, device=device)[3]
    torch.library.opcheck(torch.ops.fastvq.refuse_checkpoint_rerun.default, (counts, "VectorQuantizer"))


@pytest.mark.parametrize(
    "change,err,match",
    [
        (dict(decay=float("nan")), ValueError, "decay"),
        (dict(decay=1.5), ValueError, "decay"),
        (dict(decay=True), TypeError, "decay"),
        (dict(eps=0.0), ValueError, "eps"),
        (dict(eps=float("inf")), ValueError, "eps"),
        (dict(eps=1e39), ValueError, "eps must be finite in float32"),
        (dict(cluster_size="half"), TypeError, "cluster_size"),
        (dict(cluster_size="double"), TypeError, r"cluster_size \(EMA state\) must be float32, got torch.float64"),
        (dict(embed_avg="strided"), ValueError, "embed_avg must be contiguous"),
        (dict(counts="short"), ValueError, "counts must have shape"),
        (dict(sums="int"), TypeError, "sums"),
    ],
    ids=["decay-nan", "decay-1.5", "decay-bool", "eps-0", "eps-inf", "eps-beyond-float32", "cluster-size-fp16", "cluster-size-fp64",
         "embed-avg-strided",
         "counts-shape", "sums-int"],
)
def test_bad_input(backend, device, change, err, match):
    # the modules check decay and eps themselves; a direct caller gets the same named errors on
    # both backends (the Triton launcher's bare asserts were the only check before)
    codebook, cs, ea, counts, sums = _state(2, 5, 3, device=device)
    args = dict(codebook=codebook, cluster_size=cs, embed_avg=ea, counts=counts, sums=sums, decay=0.9, eps=1e-5)
    for name, value in change.items():
        args[name] = {"half": cs.half(), "double": cs.double(), "strided": ea.transpose(0, 1).contiguous().transpose(0, 1),
                      "short": counts[:, :4], "int": sums.long()}.get(value, value) if isinstance(value, str) else value
    before = codebook.clone()
    with pytest.raises(err, match=f"ema_update_.*{match}"):
        ema_update_(**args)
    assert torch.equal(codebook, before)


def test_decay_and_eps_are_used_as_the_checked_floats(backend, device):
    # mutE: the checks passed an int eps of 10**30 or 2**63 and a Fraction decay, then the raw
    # arguments reached torch (OverflowError, TypeError); the op now uses the floats it checked
    import fractions

    for decay, eps in ((0.5, 10**30), (0.5, 2**63), (fractions.Fraction(1, 2), 1e-5)):
        codebook, cs, ea, counts, sums = _state(1, 3, 2, device=device)
        want = codebook.clone(), cs.clone(), ea.clone()
        ema_update_(*want, counts, sums, 0.5, float(eps))
        ema_update_(codebook, cs, ea, counts, sums, decay, eps)
        assert all(torch.equal(a, b) for a, b in zip((codebook, cs, ea), want)), (decay, eps)


def test_codes_of_no_features(backend, device):
    # D = 0 (code_statistics allows it): the counts still update, nothing else to do (the inf
    # norm of an empty row raised inside torch; fuzzB)
    L, K = 2, 3
    cluster_size = torch.ones(L, K, device=device)
    counts = torch.tensor([[2.0, 0.0, 1.0], [0.0, 0.0, 0.0]], device=device)
    cb, ea = torch.zeros(L, K, 0, device=device), torch.zeros(L, K, 0, device=device)
    ema_update_(cb, cluster_size, ea, counts, torch.zeros(L, K, 0, device=device), 0.9, 1e-5)
    want = torch.tensor([[0.9 + 0.2, 0.9, 0.9 + 0.1], [1.0, 1.0, 1.0]], device=device)  # (level 1: no rows, unchanged)
    assert_close(cluster_size, want, torch.float32)


@pytest.mark.parametrize("view", ["levels", "features", "as_strided"])
def test_overlapping_in_place_targets_are_refused(backend, device, view):
    # fuzzD D2: an expanded codebook was written by every level (the Triton programs race on a
    # GPU; the reference raised torch's error, not one naming fastvq's argument).
    L, K, D = 2, 4, 3
    base = randn(L, K, D, device=device)
    cb = {"levels": base[:1].expand(L, K, D), "features": base[..., :1].expand(L, K, D),
          # rows 2 elements apart but 3 wide: row k's last element is row k+1's second
          "as_strided": base.view(-1).as_strided((L, K, D), (K * D, 2, 1))}[view]
    cs, ea = torch.rand(L, K, device=device), randn(L, K, D, device=device)
    counts, sums = torch.rand(L, K, device=device) * 2, randn(L, K, D, device=device)
    before = base.clone()
    with pytest.raises(ValueError, match="codebook is updated in place, but its elements may share memory"):
        ema_update_(cb, cs, ea, counts, sums, 0.9, 1e-5)
    assert torch.equal(base, before)
    with pytest.raises(ValueError, match="cluster_size is updated in place"):
        ema_update_(base, cs[:, :1].expand(L, K), ea, counts, sums, 0.9, 1e-5)
    # an empty expanded view holds nothing that could overlap (review8)
    empty = torch.zeros(1, K, 0, device=device).expand(L, K, 0)
    ema_update_(empty, cs, ea[..., :0].contiguous(), counts, sums[..., :0], 0.9, 1e-5)
    # a strided view without overlap is fine (columns 0, 2 of 4: the stride exceeds the reach)
    wide = randn(L, K, 2 * D, device=device)
    ema_update_(wide[..., ::2], cs, ea, counts, sums, 0.9, 1e-5)


@pytest.mark.parametrize("name", ["codebook", "cluster_size", "embed_avg"])
def test_negative_views_and_inference_tensors_are_refused_alike(backend, device, name):
    # fuzzL L4, L5: a torch._neg_view target gave "Expected Tensor but got None" on both
    # backends; an inference tensor outside inference mode: the reference raised torch's error,
    # the Triton kernels wrote it anyway. Both named now, and nothing is written
    L, K, D = 2, 4, 3
    args = {"codebook": randn(L, K, D, device=device), "cluster_size": torch.rand(L, K, device=device),
            "embed_avg": randn(L, K, D, device=device)}
    counts, sums = torch.rand(L, K, device=device) * 2, randn(L, K, D, device=device)
    before = {k: v.clone() for k, v in args.items()}
    neg = dict(args, **{name: torch._neg_view(args[name])})
    with pytest.raises(ValueError, match=f"{name} is updated in place, but it is a negative view"):
        ema_update_(neg["codebook"], neg["cluster_size"], neg["embed_avg"], counts, sums, 0.9, 1e-5)
    with torch.inference_mode():
        frozen = args[name].clone()
    inf = dict(args, **{name: frozen})
    with pytest.raises(RuntimeError, match=f"{name} is an inference tensor"):
        ema_update_(inf["codebook"], inf["cluster_size"], inf["embed_avg"], counts, sums, 0.9, 1e-5)
    assert all(torch.equal(args[k], before[k]) for k in args) and torch.equal(frozen, before[name])
    with torch.inference_mode():  # inside inference mode an inference tensor may be updated
        ema_update_(inf["codebook"], inf["cluster_size"], inf["embed_avg"], counts, sums, 0.9, 1e-5)
