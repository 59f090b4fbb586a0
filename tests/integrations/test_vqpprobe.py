"""vqpprobe: the vector-quantize-pytorch integration, patched against unpatched, beyond the parity grid.

Findings, each fixed (its test failed before the fix):

- V1: ``Codebook.update_indices`` patched takes float indices and truncates them (2.7 -> code 2);
  VQP refuses them, and no error names the argument.
- V2: a float padding mask goes into the patched EMA statistics as row weights (``weights=mask``,
  no dtype check): ``update_indices`` takes it silently (0.5 counts a row half), and a training
  forward with a 1.0/0.0 float mask updates ``cluster_size``, ``embed_avg`` and ``embed`` and only
  then fails in VQP's masked loss (IndexError); VQP raises TypeError with the codebook untouched.
- V3: ``counts()`` counts k-means's internal searches and statistics as VQP calls: one training
  step with ``kmeans_init=True, kmeans_iters=10`` reports ``search`` 11 and ``statistics`` 11
  ("EMA statistics"), where VQP made one search and one EMA update; a step left to VQP
  (``straight_through=True``, cross-entropy commitment) reports ``search`` 10 and ``statistics``
  10 beside its ``fallback`` key, as if its search had gone through fastvq.

Not filed (README, "Where fastvq deliberately differs": ``rotation_trick`` returns exactly ``q`` for
every input): with the rotation trick a zero input row comes out as its code (VQP: 0), and a row
with a NaN entry as a finite code (VQP: NaN; the NaN reaches the input gradient only);
``test_rotation_output_is_the_code_for_every_row`` holds that.

Everything else here passes: parity (codes, outputs, losses, input and parameter gradients, every
buffer after each step) of settings the grid in ``test_vector_quantize_pytorch.py`` leaves out,
both backends where a kernel is involved; that the patch adds no host sync; sampled codes of
several heads follow VQP's distribution; patch/unpatch around models built while patched.
"""

from __future__ import annotations

import contextlib
import copy
import functools

import pytest
import torch

vqp = pytest.importorskip("vector_quantize_pytorch", reason="vector-quantize-pytorch is not installed")

import fastvq  # noqa: E402
from fastvq.integrations import vector_quantize_pytorch as fv  # noqa: E402
from tests._syncs import count_host_syncs  # noqa: E402
from tests.utils import generator, raises_invalid, randn  # noqa: E402

V = vqp
pytestmark = pytest.mark.skipif(
    fv._installed_version() not in fv.SUPPORTED_VERSIONS,
    reason=f"installed vector-quantize-pytorch {fv._installed_version()} is not supported",
)

RTOL = 1e-4


def _flat(o):
    if isinstance(o, torch.Tensor):
        return [o]
    if isinstance(o, (tuple, list)):
        return [t for item in o for t in _flat(item)]
    return []


def _close(actual, expected, name):
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, (
        f"{name}: {tuple(actual.shape)} {actual.dtype} vs {tuple(expected.shape)} {expected.dtype}")
    if not actual.is_floating_point():
        assert torch.equal(actual, expected), f"{name}: {int((actual != expected).sum())} entries differ"
        return
    a, e = actual.detach().double(), expected.detach().double()
    fin = e[e.isfinite()]
    scale = float(fin.abs().max()) if fin.numel() else 0.0
    torch.testing.assert_close(a, e, rtol=RTOL, atol=RTOL * scale + 1e-12, equal_nan=True,
                               msg=lambda m: f"{name}: {m}")


def parity(make, fwd, inp, device, *, steps=3, evals=1, lr=0.05):
    """Train ``steps`` steps (SGD with momentum on every parameter that requires grad, a random
    linear loss of every float output) and ``evals`` eval steps, unpatched and patched, from the
    same weights and random state; every output, gradient and state entry must agree."""
    torch.manual_seed(0)
    ref = make().to(device)
    pat = copy.deepcopy(ref)
    opts = []
    for m in (ref, pat):
        ps = [p for p in m.parameters() if p.requires_grad]
        opts.append(torch.optim.SGD(ps, lr=lr, momentum=0.9) if ps else None)
    fv.reset_counts()
    for step in range(steps + evals):
        training = step < steps
        results = []
        for on, (m, opt) in enumerate(zip((ref, pat), opts)):
            m.train(training)
            x = inp(100 + step).to(device)
            if x.is_floating_point() and training:
                x.requires_grad_()
            torch.manual_seed(1000 + step)
            with fv.patched() if on else contextlib.nullcontext():
                outs = _flat(fwd(m, x))
                grads = {}
                if training:
                    if opt is not None:
                        opt.zero_grad(set_to_none=True)
                    loss = sum((t.float() * randn(t.numel(), seed=7 + j, device=device).reshape(t.shape)).sum()
                               for j, t in enumerate(outs) if t.is_floating_point() and t.requires_grad)
                    if isinstance(loss, torch.Tensor):
                        loss.backward()
                    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
                    if x.grad is not None:
                        grads["<input>"] = x.grad.clone()
                    if opt is not None:
                        opt.step()
            results.append((outs, grads, {k: v.clone() for k, v in m.state_dict().items()}))
        (o0, g0, s0), (o1, g1, s1) = results
        assert len(o0) == len(o1)
        for j, (a, b) in enumerate(zip(o1, o0)):
            _close(a, b, f"step {step}: output {j}")
        assert g0.keys() == g1.keys()
        for k in g0:
            _close(g1[k], g0[k], f"step {step}: gradient of {k}")
        assert s0.keys() == s1.keys()
        for k in s0:
            _close(s1[k], s0[k], f"step {step}: state {k}")
    return fv.counts()


def _x(*shape):
    return lambda s: randn(*shape, seed=s)


B, T, DIM = 2, 24, 16
X = _x(B, T, DIM)
VQ = functools.partial(V.VectorQuantize, dim=DIM, codebook_size=32)
RVQ = functools.partial(V.ResidualVQ, dim=DIM, num_quantizers=3, codebook_size=32)


def _mask():
    m = torch.ones(B, T, dtype=torch.bool)
    m[1, 10:] = False
    m[0, 3] = False
    return m


def call(**kw):
    return lambda m, x: m(x, **kw)


def masked(**kw):
    return lambda m, x: m(x, mask=_mask().to(x.device), **kw)


def bf16(s):
    return randn(B, T, DIM, seed=s).bfloat16()


# id -> (constructor, forward, input, fastvq calls that must happen)
CASES = {
    "image-fmap": (lambda: VQ(accept_image_fmap=True), call(), _x(B, DIM, 4, 6), {"search", "statistics"}),
    "3d-fmap": (lambda: VQ(accept_3d_fmap=True), call(), _x(B, DIM, 2, 3, 4), {"search", "statistics"}),
    "channel-first": (lambda: VQ(channel_last=False), call(), _x(B, DIM, T), {"search", "rotation"}),
    "one-token": (lambda: VQ(heads=2, codebook_dim=8), call(), _x(5, DIM), {"search", "statistics"}),
    "loss-breakdown": (VQ, call(return_loss_breakdown=True), X, {"search"}),
    "freeze-codebook": (lambda: VQ(freeze_codebook=True), call(), X, {"search", "gather"}),
    "dead-codes-separate-heads": (lambda: VQ(heads=2, codebook_dim=8, separate_codebook_per_head=True,
                                             threshold_ema_dead_code=2), call(), X, {"search", "statistics"}),
    "orthogonal-active-codes": (lambda: VQ(orthogonal_reg_weight=1.0, orthogonal_reg_active_codes_only=True,
                                           orthogonal_reg_max_codes=8), call(), X, {"search"}),
    "directional-reparam": (lambda: VQ(directional_reparam=True, threshold_ema_dead_code=1), call(), X,
                            {"search", "statistics"}),
    "sync-update-v": (lambda: VQ(learnable_codebook=True, ema_update=False, sync_update_v=0.5), call(), X,
                      {"search", "rotation"}),
    "manual-ema": (lambda: VQ(manual_ema_update=True), call(), X, {"statistics"}),
    "no-ema-dead-codes": (lambda: VQ(ema_update=False, threshold_ema_dead_code=2), call(), X, {"statistics"}),
    "ema-weight-tensor": (VQ, lambda m, x: m(x, ema_update_weight=torch.rand(
                              1, 32, generator=generator(3, x.device.type), device=x.device)), X, {"statistics"}),
    "ema-weight-callable": (VQ, call(ema_update_weight=lambda s, c: (c > 0).float()), X, {"statistics"}),
    "accum-ema-update": (VQ, call(accum_ema_update=True), X, {"statistics"}),
    "ema-update-false-per-call": (VQ, call(ema_update=False), X, {"search"}),
    "lens": (VQ, lambda m, x: m(x, lens=torch.tensor([T, 7], device=x.device)), X, {"statistics"}),
    "topk-mask": (VQ, masked(topk=2), X, {"topk"}),
    "sample-temp-zero-per-call": (lambda: VQ(stochastic_sample_codes=True), call(sample_codebook_temp=0.0), X,
                                  {"search"}),
    "sample-tiny-temperature": (lambda: VQ(stochastic_sample_codes=True, sample_codebook_temp=1e-9), call(), X,
                                {"sample"}),
    # learnable codebooks: gradients through the gather, per head and per top-k slot
    "learnable-separate-heads": (lambda: VQ(heads=2, codebook_dim=8, separate_codebook_per_head=True,
                                            learnable_codebook=True, ema_update=False), call(), X, {"gather"}),
    "learnable-shared-heads-in-place": (lambda: VQ(heads=2, codebook_dim=8, learnable_codebook=True, ema_update=False,
                                                   in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.1)),
                                        call(), X, {"search", "gather"}),
    "learnable-topk": (lambda: VQ(learnable_codebook=True, ema_update=False), call(topk=3), X, {"topk"}),
    "vq-bridge-separate-heads": (lambda: VQ(heads=2, codebook_dim=8, separate_codebook_per_head=True,
                                            vq_bridge=torch.nn.Linear(8, 8), learnable_codebook=True,
                                            ema_update=False), call(), X, {"search"}),
    # padding masks with heads (commitment_weight=0: VQP's own masked commitment loss fails with heads)
    "mask-shared-heads-dead-codes": (lambda: VQ(heads=2, codebook_dim=8, commitment_weight=0.0,
                                                threshold_ema_dead_code=1), masked(), X, {"statistics"}),
    "mask-separate-heads-kmeans-cosine": (lambda: VQ(heads=2, codebook_dim=8, separate_codebook_per_head=True,
                                                     commitment_weight=0.0, kmeans_init=True, kmeans_iters=2,
                                                     use_cosine_sim=True), masked(), X, {"kmeans", "statistics"}),
    "mask-no-zeros": (lambda: VQ(return_zeros_for_masked_padding=False), masked(), X, {"statistics"}),
    # low precision (the straight-through estimator: the rotation's output is the code exactly by design)
    "bf16-model": (lambda: VQ(codebook_dim=8, rotation_trick=False, threshold_ema_dead_code=1).bfloat16(), call(),
                   bf16, {"search", "statistics"}),
    "bf16-model-heads-kmeans": (lambda: VQ(codebook_dim=4, heads=2, separate_codebook_per_head=True,
                                           rotation_trick=False, kmeans_init=True, kmeans_iters=2).bfloat16(),
                                call(), bf16, {"kmeans", "search"}),
    "bf16-learnable": (lambda: VQ(rotation_trick=False, learnable_codebook=True, ema_update=False).bfloat16(),
                       call(), bf16, {"search"}),
    "fp16-input": (lambda: VQ(rotation_trick=False), call(), lambda s: randn(B, T, DIM, seed=s).half(),
                   {"search", "statistics"}),
    "fp64-model": (lambda: VQ(codebook_dim=8).double(), call(), lambda s: randn(B, T, DIM, seed=s).double(),
                   {"search", "statistics"}),
    # residual, grouped, hierarchical, SimVQ
    "rvq-quantize-dropout": (lambda: RVQ(quantize_dropout=True, quantize_dropout_cutoff_index=1),
                             call(return_all_codes=True), X, {"search", "statistics"}),
    "rvq-codebook-sizes": (lambda: V.ResidualVQ(dim=DIM, codebook_size=(8, 16, 32)), call(return_all_codes=True),
                           X, {"search", "statistics"}),
    "rvq-cosine-dead-codes": (lambda: RVQ(use_cosine_sim=True, threshold_ema_dead_code=1), call(), X,
                              {"search", "statistics"}),
    "rvq-mask": (lambda: RVQ(threshold_ema_dead_code=1), masked(), X, {"search", "statistics"}),
    "rvq-diveq": (lambda: RVQ(diveq=True, threshold_ema_dead_code=1), call(), X, {"search", "statistics"}),
    "rvq-quant-grad-frac": (lambda: RVQ(quant_grad_frac=0.5), call(), X, {"search", "rotation"}),
    "rvq-freeze-sampled": (lambda: RVQ(stochastic_sample_codes=True, sample_codebook_temp=1e-9),
                           call(freeze_codebook=True), X, {"sample"}),
    "beam-codebook-sizes": (lambda: V.ResidualVQ(dim=DIM, codebook_size=(8, 16, 32), beam_size=3), call(), X,
                            {"topk", "statistics"}),
    "beam-quantize-dropout": (lambda: RVQ(beam_size=2, quantize_dropout=True), call(), X, {"topk"}),
    "beam-shared-mask": (lambda: RVQ(beam_size=2, shared_codebook=True), masked(), X, {"topk", "statistics"}),
    "beam-weights-cosine": (lambda: RVQ(beam_size=2, beam_score_quantizer_weights=[1.0, 0.5, 0.25],
                                        use_cosine_sim=True), call(), X, {"topk"}),
    "beam-eval-size": (lambda: RVQ(beam_size=2, eval_beam_size=3), call(), X, {"topk"}),
    "grvq-mask-dropout": (lambda: V.GroupedResidualVQ(dim=DIM, groups=2, num_quantizers=2, codebook_size=16,
                                                      quantize_dropout=True), masked(), X, {"search"}),
    "hierarchical-kmeans": (lambda: V.HierarchicalVQ(dim=8, codebook_size=16, scales=(1, 2, 8)), call(),
                            _x(B, 8, 8), {"kmeans", "search", "statistics"}),
    "hierarchical-levels-mask": (lambda: V.HierarchicalVQ(dim=8, codebook_size=16, scales=(1, 2, 8),
                                                          shared_codebook=False, rotation_trick=True,
                                                          kmeans_init=False), masked(), _x(B, 8, T), {"search"}),
    "simvq-channel-first": (lambda: V.SimVQ(dim=DIM, codebook_size=32, channel_first=True), call(),
                            _x(B, DIM, 4, 6), {"simvq", "rotation"}),
    "simvq-one-token": (lambda: V.SimVQ(dim=DIM, codebook_size=32), call(), _x(5, DIM), {"simvq"}),
    "simvq-frozen-dim": (lambda: V.SimVQ(dim=DIM, codebook_size=32, frozen_codebook_dim=8,
                                         codebook_transform=torch.nn.Sequential(
                                             torch.nn.Linear(8, 32), torch.nn.ReLU(), torch.nn.Linear(32, DIM))),
                         call(), X, {"simvq"}),
    "residual-simvq-dropout": (lambda: V.ResidualSimVQ(dim=DIM, num_quantizers=3, codebook_size=32,
                                                       quantize_dropout=True), call(return_all_codes=True), X,
                               {"simvq"}),
    "random-projection": (lambda: V.RandomProjectionQuantizer(dim=DIM, num_codebooks=2, codebook_dim=8,
                                                              codebook_size=32), call(), X, {"search"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_parity_reference(case, device):
    make, fwd, inp, routed = CASES[case]
    with fastvq.backend("reference"):
        made = parity(make, fwd, inp, device)
    assert routed <= made.keys(), f"not routed: {routed - made.keys()} (calls: {made})"
    assert not [k for k in made if k.startswith("fallback.") and k != "fallback.rotation_dtype"], made


TRITON_CASES = {
    "odd-separate-heads-dead-codes": (lambda: V.VectorQuantize(dim=39, codebook_size=37, heads=3, codebook_dim=13,
                                                               separate_codebook_per_head=True,
                                                               threshold_ema_dead_code=1), call(), _x(3, 7, 39)),
    "odd-shared-heads-cosine": (lambda: V.VectorQuantize(dim=39, codebook_size=37, heads=3, codebook_dim=13,
                                                         use_cosine_sim=True), call(), _x(3, 7, 39)),
    "mask-separate-heads-sampled": (lambda: VQ(heads=2, codebook_dim=8, separate_codebook_per_head=True,
                                               commitment_weight=0.0, stochastic_sample_codes=True,
                                               sample_codebook_temp=1e-9), masked(), X),
    "beam-search": (lambda: V.ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=32, beam_size=2), call(), X),
}


@pytest.mark.parametrize("case", list(TRITON_CASES))
def test_parity_triton(case, device):
    make, fwd, inp = TRITON_CASES[case]
    with fastvq.backend("triton"):
        parity(make, fwd, inp, device, steps=1)


# ------------------------------------------------------------------------------- sampling


@pytest.mark.parametrize("shared", [False, True], ids=["separate", "shared"])
@pytest.mark.parametrize("cosine", [False, True], ids=["euclidean", "cosine"])
def test_sampled_codes_of_each_head_follow_vqps_distribution(shared, cosine, device):
    """softmax(logits / T) per head (VQP's logits: -|x - c| or x . c), separate and shared heads,
    one repeated row; chi-square with 7 degrees of freedom below 29.9 (p = 1e-4)."""
    torch.manual_seed(0)
    vq = V.VectorQuantize(dim=8, codebook_size=8, heads=2, codebook_dim=4, separate_codebook_per_head=not shared,
                          stochastic_sample_codes=True, sample_codebook_temp=0.7, use_cosine_sim=cosine, decay=1.0,
                          rotation_trick=False).to(device).train()
    with torch.no_grad():
        cb = randn(*vq._codebook.embed.shape, seed=1, device=device)
        vq._codebook.embed.copy_(torch.nn.functional.normalize(cb, dim=-1) if cosine else cb)
    codebook = vq._codebook.embed.detach().double().clone()  # the EMA update rewrites it
    row = randn(1, 1, 8, seed=2, device=device)
    n = 2000
    fv.reset_counts()
    with fastvq.backend("reference"), fv.patched():
        _, codes, _ = vq(row.expand(1, n, 8))
    assert fv.counts().get("sample") == 1
    for h in range(2):
        c = codebook[0 if shared else h]
        r = row[0, 0, 4 * h:4 * h + 4].double()
        logits = c @ torch.nn.functional.normalize(r, dim=-1) if cosine else -(r - c).norm(dim=-1)
        p = (logits / 0.7).softmax(-1)
        observed = torch.bincount(codes[0, :, h].reshape(-1), minlength=8).double()
        chi2 = float(((observed - n * p) ** 2 / (n * p)).sum())
        assert chi2 < 29.9, f"head {h}: chi-square {chi2:.1f}, counts {observed.tolist()}"


def test_heads_draw_independent_noise(device):
    """Two heads with the same codebook and the same input row agree on a sampled code about 1/K
    of the time (not always: each head has noise of its own)."""
    torch.manual_seed(0)
    vq = V.VectorQuantize(dim=8, codebook_size=8, heads=2, codebook_dim=4, separate_codebook_per_head=True,
                          stochastic_sample_codes=True, sample_codebook_temp=100.0, rotation_trick=False)
    vq = vq.to(device).train()
    with torch.no_grad():
        vq._codebook.embed.copy_(randn(1, 8, 4, seed=1, device=device).expand_as(vq._codebook.embed))
    half = randn(1, 1, 4, seed=2, device=device)
    with fv.patched():
        _, codes, _ = vq(torch.cat([half, half], -1).expand(1, 2000, 8))
    agree = float((codes[0, :, 0] == codes[0, :, 1]).double().mean())
    assert 0.08 < agree < 0.2, agree


@pytest.mark.parametrize("backend_name, temperature", [("reference", 1e-45), ("reference", 1e-300),
                                                       ("triton", 1e-300)])
def test_tiny_temperature_samples_the_nearest_code(backend_name, temperature, device):
    """VQP's logits / T overflow to -inf below ~1e-38 and its argmax gives code 0 to every row;
    the patched sampler gives the nearest code (the T -> 0 limit)."""
    torch.manual_seed(0)
    vq = V.VectorQuantize(dim=8, codebook_size=16, stochastic_sample_codes=True).to(device).train()
    x = randn(1, 200, 8, seed=3, device=device)
    nearest = ((x.double().unsqueeze(-2) - vq.codebook.double()) ** 2).sum(-1).argmin(-1)
    with fastvq.backend(backend_name), fv.patched():
        _, codes, _ = vq(x, sample_codebook_temp=temperature)
    assert torch.equal(codes, nearest)


def test_ema_sums_are_float32_roundings_of_the_exact_sums(backend, device):
    """update_indices with decay 0: embed_avg is each code's float64 sum rounded once to float32
    (rows spread over six orders of magnitude; VQP's one-hot matmul is 15 ulps off here)."""
    x = randn(1, 3000, 8, seed=1, device=device) * torch.logspace(-3, 3, 3000, device=device).view(1, -1, 1)
    codes = torch.randint(0, 4, (1, 3000), generator=generator(2, device), device=device)
    exact = torch.zeros(4, 8, dtype=torch.float64, device=device).index_add_(0, codes[0], x[0].double())
    vq = V.VectorQuantize(dim=8, codebook_size=4, decay=0.0).to(device)
    with fv.patched():
        vq.update_indices(x, codes)
    assert torch.equal(vq._codebook.embed_avg[0], exact.float())
    assert torch.equal(vq._codebook.cluster_size[0], torch.bincount(codes[0], minlength=4).float())


# --------------------------------------------------------------------------- syncs, patch state


@pytest.mark.parametrize("backend_name, case", [
    *(("reference", c) for c in ("mask", "separate-heads", "sampled", "topk", "beam", "simvq")),
    ("triton", "mask"), ("triton", "sampled"), ("triton", "topk")])
def test_patch_adds_no_host_sync(backend_name, case, device):
    mask = _mask().to(device)
    make, fwd = {
        "mask": (VQ, lambda m, x: m(x, mask=mask)),
        "separate-heads": (lambda: VQ(heads=2, codebook_dim=8, separate_codebook_per_head=True), call()),
        "sampled": (lambda: VQ(stochastic_sample_codes=True), call()),
        "topk": (VQ, call(topk=3)),
        "beam": (lambda: V.ResidualVQ(dim=DIM, num_quantizers=2, codebook_size=32, beam_size=2), call()),
        "simvq": (lambda: V.SimVQ(dim=DIM, codebook_size=32), call()),
    }[case]
    torch.manual_seed(0)
    m = make().to(device).train()
    x = randn(B, T, DIM, seed=1, device=device, requires_grad=True)
    syncs = []
    for on in (False, True):
        with fastvq.backend(backend_name), fv.patched() if on else contextlib.nullcontext(), \
                count_host_syncs() as s:
            _flat(fwd(m, x))[0].float().sum().backward()
        syncs.append(len(s))
    assert syncs[1] <= syncs[0], f"unpatched {syncs[0]} host syncs, patched {syncs[1]}"


def test_model_built_while_patched_trains_as_vqp_after_unpatch(device):
    """A model built and trained (k-means init) while patched, then unpatched, is VQP's again:
    same codes and buffers as its copy on VQP, and no fastvq call."""
    with fv.patched():
        torch.manual_seed(0)
        m = VQ(kmeans_init=True, kmeans_iters=2, threshold_ema_dead_code=1).to(device).train()
        m(randn(B, T, DIM, seed=1, device=device))
    assert not fv.is_patched()
    twin = copy.deepcopy(m)
    fv.reset_counts()
    for model in (m, twin):
        torch.manual_seed(5)
        model(randn(B, T, DIM, seed=2, device=device))
    assert fv.counts() == {}
    for k, v in m.state_dict().items():
        assert torch.equal(v, twin.state_dict()[k]), k


@pytest.mark.parametrize("model", ["vq", "vq-cosine", "simvq"])
def test_rotation_output_is_the_code_for_every_row(model, backend, device):
    """The documented difference (README): the rotation trick's value is the code for every row,
    a zero row and a row with a NaN entry included (VQP: 0 and NaN there); the NaN row's input
    gradient is NaN."""
    make = {"vq": lambda: VQ(), "vq-cosine": lambda: VQ(use_cosine_sim=True),
            "simvq": lambda: V.SimVQ(dim=DIM, codebook_size=32)}[model]
    torch.manual_seed(0)
    m = make().to(device).train()
    x = randn(B, 6, DIM, seed=1, device=device)
    x[0, 2] = 0.0
    x[1, 4, 5] = float("nan")
    codebook = (m.codebook if model == "simvq" else m._codebook.embed[0]).detach().clone()
    xi = x.clone().requires_grad_()
    with fv.patched():
        q, codes, _ = m(xi)
        q.sum().backward()
    assert torch.equal(q[0, 2], codebook[codes[0, 2]]) and q[0, 2].abs().max() > 0
    assert torch.equal(q[1, 4], codebook[0]) and int(codes[1, 4]) == 0
    assert xi.grad[1, 4].isnan().all() and xi.grad[0].isfinite().all()


def test_update_indices_refuses_out_of_range_codes(device):
    vq = VQ().to(device)
    x = randn(B, 6, DIM, seed=1, device=device)
    with fv.patched():
        with raises_invalid("indices", device):
            vq.update_indices(x, torch.full((B, 6), 32, device=device))
        with raises_invalid("indices", device):
            vq.update_indices(x, torch.full((B, 6), -2, device=device))


def _unpatched_and_patched(device):
    """A seeded VQ, its deep copy (to run patched) and a batch ``(B, 6, DIM)``."""
    torch.manual_seed(0)
    ref = VQ().to(device)
    return ref, copy.deepcopy(ref), randn(B, 6, DIM, seed=1, device=device)


def test_update_indices_refuses_what_vqps_one_hot_refuses(device):
    # fuzzG: int32 / uint8 codes, and a code out of range at a masked-out row, updated the EMA
    # where VQP's F.one_hot raises with the codebook untouched
    ref, pat, x = _unpatched_and_patched(device)
    mask = torch.ones(B, 6, dtype=torch.bool, device=device)
    mask[-1, 3:] = False
    far = torch.zeros(B, 6, dtype=torch.long, device=device)
    far[-1, 3:] = 99
    for call, refused in ((lambda m: m.update_indices(x, torch.zeros(B, 6, dtype=torch.int32, device=device)),
                           lambda: pytest.raises(TypeError, match="embed_ind must be an int64")),
                          (lambda m: m.update_indices(x, far, mask=mask),
                           lambda: raises_invalid("embed_ind must lie in", device))):  # (on CUDA: a device assert)
        with pytest.raises(RuntimeError, match="one_hot|num_classes"):
            call(ref)
        with fv.patched():
            with refused():
                call(pat)
        for key, value in ref.state_dict().items():
            assert torch.equal(pat.state_dict()[key], value), key


# ------------------------------------------------------------------------------------ findings


def test_update_indices_refuses_float_indices(device):
    ref, pat, x = _unpatched_and_patched(device)
    codes = torch.full((B, 6), 2.7, device=device)
    with pytest.raises(RuntimeError, match="one_hot"):
        ref.update_indices(x, codes)  # VQP: integer codes only
    with fv.patched():
        with pytest.raises((TypeError, ValueError), match="ind"):
            pat.update_indices(x, codes)  # patched: counted as 12 rows of code 2


def test_update_indices_refuses_float_mask(device):
    ref, pat, x = _unpatched_and_patched(device)
    codes = torch.zeros(B, 6, dtype=torch.long, device=device)
    mask = torch.full((B, 6), 0.5, device=device)
    with pytest.raises(TypeError):
        ref.update_indices(x, codes, mask=mask)  # VQP: the mask must be bool
    with fv.patched():
        with pytest.raises((TypeError, ValueError), match="mask"):
            pat.update_indices(x, codes, mask=mask)  # patched: code 0 gains 12 * 0.5 * (1 - decay)


def test_forward_with_float_mask_fails_before_touching_the_codebook(device):
    """A 1.0/0.0 float mask (a common padding mask): VQP raises TypeError in its statistics, the
    codebook untouched. Patched, the EMA runs with the mask as weights (cluster_size, embed_avg
    and embed change) and only VQP's masked loss then raises (IndexError, not naming the mask)."""
    torch.manual_seed(0)
    ref = VQ().to(device).train()
    pat = copy.deepcopy(ref)
    x = randn(B, 6, DIM, seed=1, device=device)
    mask = torch.ones(B, 6, device=device)
    mask[1, 3:] = 0
    before = {k: v.clone() for k, v in pat.state_dict().items()}
    with pytest.raises(TypeError):
        ref(x, mask=mask)
    assert all(torch.equal(v, before[k]) for k, v in ref.state_dict().items())
    with fv.patched():
        with pytest.raises(Exception) as info:
            pat(x, mask=mask)
    changed = [k for k, v in pat.state_dict().items() if not torch.equal(v, before[k])]
    assert not changed, f"the failed call ({info.type.__name__}) changed {changed}"
    assert info.type in (TypeError, ValueError), info.value


@pytest.mark.parametrize("fallback", [None, "straight_through_gumbel", "distances_used"])
def test_counts_of_a_kmeans_init_step(fallback, device):
    """One training step with k-means init (10 iterations). counts() should say what went
    through fastvq: one VQP kmeans call, and the step's own search and EMA statistics only when
    they were routed. It counts every k-means iteration as a search and as EMA statistics, so a
    step whose search and statistics were VQP's (a fallback) reports 'search': 10."""
    kw = {None: {}, "straight_through_gumbel": dict(straight_through=True, rotation_trick=False),
          "distances_used": dict(commitment_use_cross_entropy_loss=True)}[fallback]
    torch.manual_seed(0)
    vq = VQ(kmeans_init=True, kmeans_iters=10, **kw).to(device).train()
    fv.reset_counts()
    with fv.patched():
        vq(randn(B, T, DIM, seed=1, device=device))
    if fallback is None:  # one kmeans call, one search, one gather, one EMA statistics update
        expected = {"kmeans": 1, "search": 1, "gather": 1, "statistics": 1}
    else:  # the step's search and statistics ran on VQP
        expected = {"kmeans": 1, "fallback." + fallback: 1}
    assert fv.counts() == expected


@pytest.mark.parametrize("shape", [(B, 6, 1), (B,)], ids=["B-T-1", "B"])
def test_forward_with_a_mask_of_the_wrong_shape_names_it(device, shape):
    """fuzzO F6: a mask kept as (B, T, 1) for broadcasting, or (B,), failed inside the patch with
    Python's bare "too many values to unpack"; now a ValueError naming the mask and the shape it
    must have, before the codebook is touched."""
    torch.manual_seed(0)
    pat = VQ().to(device).train()
    x = randn(B, 6, DIM, seed=1, device=device)
    before = {k: v.clone() for k, v in pat.state_dict().items()}
    with fv.patched(), pytest.raises(ValueError, match=r"mask must be \(batch, sequence length\).*got shape"):
        pat(x, mask=torch.ones(shape, dtype=torch.bool, device=device))
    assert all(torch.equal(v, before[k]) for k, v in pat.state_dict().items())
