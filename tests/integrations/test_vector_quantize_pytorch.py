"""fastvq.integrations.vector_quantize_pytorch: patched VQP against unpatched VQP, and the patch itself.

Parity: the same model (deep-copied before patching, so the patch must take effect on models built
before it) runs training steps with an optimizer and an eval step, unpatched and patched, from the
same weights, inputs and random state. Codes must be identical except where the two chosen codes'
float64 distances differ by less than their float32 rounding bounds (``fastvq.testing``): then the
row is a legitimate near-tie, its token is left out of the comparisons of that step and the patched
model is re-synchronised to the unpatched one. Everything else is compared at rtol 1e-4. Each
config also states which calls must go through fastvq, counted by the integration, and which may
stay on VQP; a path that silently stops being routed fails.

The vendored upstream tests are in ``vqp_upstream/``.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

vqp = pytest.importorskip(
    "vector_quantize_pytorch", reason="vector-quantize-pytorch is not installed (pip install -e '.[test]')"
)

import fastvq  # noqa: E402
import fastvq.testing as ft  # noqa: E402
from fastvq.integrations import vector_quantize_pytorch as fv  # noqa: E402
from vector_quantize_pytorch import vector_quantize_pytorch as vqp_mod  # noqa: E402
from tests.utils import DEVICE, randn  # noqa: E402

from vector_quantize_pytorch import (  # noqa: E402  (after the skip)
    GroupedResidualVQ,
    ResidualSimVQ,
    ResidualVQ,
    SimVQ,
    VectorQuantize,
)

pytestmark = pytest.mark.skipif(
    fv._installed_version() not in fv.SUPPORTED_VERSIONS,
    reason=f"installed vector-quantize-pytorch {fv._installed_version()} is not one of {fv.SUPPORTED_VERSIONS}",
)

RTOL = 1e-4
B, T = 2, 48  # tokens per batch: B * T = 96 rows per codebook


# ------------------------------------------------------------------------ comparison helpers


def assert_close(actual, expected, name, rtol=RTOL):
    """rtol 1e-4 elementwise, with an absolute floor of rtol times the tensor's scale (entries that
    cancel to ~0 are compared at the scale of the tensor, not of themselves)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    scale = float(expected.abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale + 1e-12, msg=lambda m: f"{name}: {m}")


def _distance_and_bound(x, q, metric):
    """float64 distance of rows ``x`` to their codes ``q`` and its float32 rounding bound."""
    x64, q64 = x.double(), q.double()
    D = x64.shape[-1]
    if metric == "dot":
        d = -(x64 * q64).sum(-1)
        mag = (x64 * q64).abs().sum(-1)
        n = D
    else:
        d = ((x64 - q64) ** 2).sum(-1)
        mag = (x64 * x64).sum(-1) + 2 * (x64 * q64).abs().sum(-1) + (q64 * q64).sum(-1)
        n = D + 2
    bound = ft.error_bound(d, dtype=torch.float32, reduce_len=n, magnitude=mag)
    return d, bound


class Recorder:
    """Forward hooks on every VQP ``Codebook`` and ``SimVQ`` of a model: each call's input rows,
    chosen codes and their vectors, in call order, in one layout (see :meth:`canonical`)."""

    def __init__(self, model):
        self.calls = []
        self.handles = []
        self.heads = {}  # Codebook -> (heads, separate) of the VectorQuantize that owns it
        for m in model.modules():
            if isinstance(m, VectorQuantize):
                self.heads[id(m._codebook)] = (m.heads, m.separate_codebook_per_head)
        for module in {id(m): m for m in model.modules()}.values():
            if isinstance(module, vqp_mod.Codebook):
                self.handles.append(module.register_forward_hook(self._codebook, with_kwargs=True))
            elif isinstance(module, SimVQ):
                self.handles.append(module.register_forward_hook(self._simvq, with_kwargs=True))

    def _codebook(self, module, args, kwargs, output):
        quantize, codes, _ = output
        metric = "dot" if module.use_cosine_sim else "l2"
        heads = self.heads.get(id(module), (1, False))
        self.calls.append(self.canonical(args[0].detach().float(), quantize.detach(), codes.detach(), heads)
                          + (metric,))

    def _simvq(self, module, args, kwargs, output):
        _, codes, _ = output
        x = args[0].detach().float()  # (B, T, D), channel last
        codebook = module.codebook.detach()  # its parameters change only at the optimizer step
        self.calls.append(self.canonical(x, codebook[codes], codes.detach(), (1, False)) + ("l2",))

    @staticmethod
    def canonical(x, q, c, heads):
        """``(x, q (B, T, R, D), codes (B, T, R))``: the ``R`` codebook rows of each token
        ``(b, t)``, whatever VQP's layout: one codebook ``(B, T, D)``; top-k ``(B, T, k)`` codes;
        separate heads ``(H, B, T, D)``; shared heads packed ``(1, B * h, T, D)``; beam search
        ``(B, T, beams, D)`` (with top-k codes ``(B, T, beams, k)``)."""
        h, separate = heads
        if c.dim() == x.dim():  # top-k slots (..., k): one row per slot
            x = x.unsqueeze(-2).expand(*x.shape[:-1], c.shape[-1], x.shape[-1])
        elif x.dim() == 4 and h > 1:
            if separate:  # (H, B, T, ...)
                x, q, c = x.movedim(0, 2), q.movedim(0, 2), c.movedim(0, 2)
            else:  # (1, B * h, T, ...) -> (B, T, h, ...)
                x, q, c = (t[0].unflatten(0, (-1, h)).movedim(1, 2) for t in (x, q, c))
        B, T = c.shape[:2]
        return x.reshape(B, T, -1, x.shape[-1]), q.reshape(B, T, -1, q.shape[-1]), c.reshape(B, T, -1)

    def close(self):
        for h in self.handles:
            h.remove()


def degenerate_rows(x, q):
    """Rows where the rotation trick's gradient cannot be compared at rtol 1e-4:

    - where it is undefined and fastvq.rotation_trick deliberately passes the straight-through
      gradient (VQP divides by norms clamped at 1e-6 there): ``|q|`` below ``EPS_NORM`` or ``x``
      (nearly) opposite to ``q``, with a 10x margin;
    - where it is ill-conditioned: the gradient is scaled by ``|q| / |x|``, and a residual ``x``
      100x shorter than its code came from a cancellation (ResidualVQ after k-means init puts codes
      on data points), so the float32 rounding of the previous level's output (VQP's rotated value
      is ``q`` only up to rounding; fastvq's is ``q`` exactly) moves it by more than 1e-4 relative.
    """
    from fastvq.reference.rotation_trick import EPS_ANTIPODAL, EPS_NORM

    nx, nq = x.double().norm(dim=-1), q.double().norm(dim=-1)
    tiny = (nq < 10 * EPS_NORM) | (nx < 1e-2 * nq) | (nx < 10 * EPS_NORM)
    s = x.double() / nx.clamp_min(1e-300).unsqueeze(-1) + q.double() / nq.clamp_min(1e-300).unsqueeze(-1)
    return tiny | (s.norm(dim=-1) < 10 * EPS_ANTIPODAL)


def near_tie_tokens(ref: Recorder, pat: Recorder):
    """Compare the codes of matching Codebook calls. Returns two (B, T) masks: tokens whose codes
    differ (each first difference must be a near-tie within the rounding bound), and tokens with a
    row where the rotation trick's gradient cannot be compared (:func:`degenerate_rows`)."""
    assert len(ref.calls) == len(pat.calls), "the two models made different numbers of codebook calls"
    tainted = degenerate = None
    for (x, q_ref, c_ref, metric), (_, q_pat, c_pat, _) in zip(ref.calls, pat.calls):
        if tainted is None:
            tainted = torch.zeros(c_ref.shape[:2], dtype=torch.bool, device=x.device)
            degenerate = torch.zeros_like(tainted)
        degenerate |= degenerate_rows(x, q_ref).any(-1)
        diff = c_ref != c_pat  # (B, T, R)
        fresh = diff & ~tainted.unsqueeze(-1)
        if fresh.any():
            d_ref, b_ref = _distance_and_bound(x[fresh], q_ref[fresh], metric)
            d_pat, b_pat = _distance_and_bound(x[fresh], q_pat[fresh], metric)
            gap = (d_pat - d_ref).abs()
            allowed = b_ref + b_pat + 1e-8  # VQP's sqrt(clamp(d^2, 1e-8)) ties codes closer than that
            worst = int((gap / allowed).argmax())
            assert bool((gap <= allowed).all()), (
                f"a code differs beyond rounding: distance {float(d_pat[worst]):.9g} (patched) vs "
                f"{float(d_ref[worst]):.9g} (VQP), gap {float(gap[worst]):.3g} > bound {float(allowed[worst]):.3g}"
            )
        tainted |= diff.any(-1)
    return tainted, degenerate & ~tainted


# --------------------------------------------------------------------------- the harness


def run_parity(make, forward, *, steps=3, eval_steps=1, device=DEVICE, lr=0.05, seed=0, routed=(), allowed=(),
               lens=None, grad_input=True):
    """Train ``steps`` steps (SGD over the parameters that require grad) and run ``eval_steps``
    eval steps, unpatched and patched. ``forward(model, x, **kw)`` -> ``(quantized (B, T, dim),
    codes (B, T, ...), loss)``. ``routed``: kinds of fastvq call that must happen; ``allowed``:
    fallback reasons that may happen (any other fallback fails). Returns the number of steps
    compared in full (no near-tie)."""
    torch.manual_seed(seed)
    ref = make().to(device)
    pat = copy.deepcopy(ref)
    params = [p for p in ref.parameters() if p.requires_grad]
    opt_ref = torch.optim.SGD(params, lr=lr, momentum=0.9) if params else None
    opt_pat = torch.optim.SGD([p for p in pat.parameters() if p.requires_grad], lr=lr, momentum=0.9) if params else None
    kwargs = {} if lens is None else {"lens": lens.to(device)}
    fv.reset_counts()
    full = 0
    for step in range(steps + eval_steps):
        training = step < steps
        ref.train(training)
        pat.train(training)
        x = randn(B, T, DIM, seed=seed * 200 + 2 * step, device=device)
        gq = randn(B, T, DIM, seed=seed * 200 + 2 * step + 1, device=device)
        outs = []
        for model, opt, on in ((ref, opt_ref, False), (pat, opt_pat, True)):
            rec = Recorder(model)
            xi = x.clone().requires_grad_(grad_input and training)
            torch.manual_seed(seed * 1000 + step)  # k-means sampling, dead-code replacement
            with fv.patched() if on else _unpatched():
                q, codes, loss = forward(model, xi, **kwargs)
                if training:
                    if opt is not None:
                        opt.zero_grad(set_to_none=True)
                    ((q * gq).sum() + loss.sum()).backward()
                    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
                    if opt is not None:
                        opt.step()
                else:
                    grads = {}
            rec.close()
            outs.append((rec, q.detach(), codes, loss.detach(), xi.grad, grads,
                         {k: v.clone() for k, v in model.state_dict().items()}))
        (r0, q0, c0, l0, gx0, g0, s0), (r1, q1, c1, l1, gx1, g1, s1) = outs
        assert q1.shape == q0.shape and c1.shape == c0.shape and c1.dtype == c0.dtype
        assert r0.calls, "no codebook call was recorded"
        tainted, degenerate = near_tie_tokens(r0, r1)
        keep = ~tainted
        assert torch.equal(c1.reshape(B, T, -1)[keep], c0.reshape(B, T, -1)[keep]), f"step {step}: codes differ"
        assert_close(q1[keep], q0[keep], f"step {step}: quantized")
        assert_close(l1, l0, f"step {step}: loss")
        if gx0 is not None:
            assert_close(gx1[keep & ~degenerate], gx0[keep & ~degenerate], f"step {step}: input gradient")
            assert gx1.isfinite().all(), f"step {step}: non-finite input gradient"
        if tainted.any() or (gx0 is not None and degenerate.any()):
            # a legitimate near-tie, or gradients that differ where the rotation is undefined
            # (they reach the parameters): resynchronise and go on
            pat.load_state_dict(ref.state_dict())
            if opt_pat is not None:
                opt_pat.load_state_dict(opt_ref.state_dict())
            continue
        full += 1
        assert g1.keys() == g0.keys()
        for n in g0:
            assert_close(g1[n], g0[n], f"step {step}: gradient of {n}")
        assert s1.keys() == s0.keys()
        for n in s0:
            if s0[n].is_floating_point():
                assert_close(s1[n], s0[n], f"step {step}: state {n}")
            else:
                assert torch.equal(s1[n], s0[n]), f"step {step}: state {n}"
    made = fv.counts()
    missing = [k for k in routed if not made.get(k)]
    assert not missing, f"no {missing} call went through fastvq (calls: {made})"
    stray = [k for k in made if k.startswith("fallback.") and k[len("fallback."):] not in allowed]
    assert not stray, f"calls left to VQP that should go through fastvq: {stray} (calls: {made})"
    assert full >= (steps + eval_steps + 1) // 2, f"only {full} steps compared in full (near-ties in the others)"
    return made, full


class _unpatched:
    """Run a block with VQP unpatched (and fail if something left it patched)."""

    def __enter__(self):
        assert not fv.is_patched()

    def __exit__(self, *exc):
        return False


def vq_forward(model, x, **kw):
    q, codes, loss = model(x, **kw)
    return q, codes, loss


def topk1_forward(model, x, **kw):
    q, codes, loss = model(x, topk=1, **kw)
    return q[..., 0, :], codes, loss


def topk3_forward(model, x, **kw):
    q, codes, loss = model(x, topk=3, **kw)  # q (B, T, 3, D), codes (B, T, 3)
    return q.mean(-2), codes, loss


def grvq_forward(model, x, **kw):
    q, codes, loss = model(x, **kw)  # codes (G, B, T, Q), loss (G, Q)
    return q, codes.permute(1, 2, 0, 3), loss


DIM = 16
VQ = functools.partial(VectorQuantize, dim=DIM, codebook_size=32)

def cosine_unnormalised():
    """A cosine codebook whose rows are not unit vectors (set through VQP's ``codebook`` setter):
    VQP then searches by the plain dot product, not by the angle (nor the Euclidean distance)."""
    vq = VQ(use_cosine_sim=True)
    with torch.no_grad():
        vq.codebook = torch.randn(32, DIM) * torch.linspace(0.2, 3.0, 32).unsqueeze(1)
    return vq


# id -> (constructor, forward, fastvq calls that must happen, fallbacks that may, extra)
CASES = {
    "l2-ema-rotation": (VQ, vq_forward, {"search", "gather", "statistics", "rotation"}, (), {}),
    "cosine-ema-rotation": (functools.partial(VQ, use_cosine_sim=True), vq_forward,
                            {"search", "gather", "statistics", "rotation"}, (), {}),
    "cosine-unnormalised-codebook": (cosine_unnormalised, vq_forward, {"search", "gather", "statistics"}, (), {}),
    "l2-ste": (functools.partial(VQ, rotation_trick=False), vq_forward, {"search", "gather", "statistics"}, (), {}),
    "learnable-no-ema": (functools.partial(VQ, ema_update=False, learnable_codebook=True), vq_forward,
                         {"search", "gather", "rotation"}, (), {}),
    "kmeans-init": (functools.partial(VQ, kmeans_init=True, kmeans_iters=4), vq_forward,
                    {"kmeans", "search", "gather", "statistics"}, (), {}),
    "kmeans-init-cosine": (functools.partial(VQ, kmeans_init=True, kmeans_iters=4, use_cosine_sim=True), vq_forward,
                           {"kmeans", "search", "gather", "statistics"}, (), {}),
    "dead-codes": (functools.partial(VQ, threshold_ema_dead_code=2, decay=0.5), vq_forward,
                   {"search", "gather", "statistics"}, (), {}),
    "heads-shared": (functools.partial(VQ, heads=4, codebook_dim=4), vq_forward,
                     {"search", "gather", "statistics", "rotation"}, (), {}),
    "heads-separate": (functools.partial(VQ, heads=4, codebook_dim=4, separate_codebook_per_head=True), vq_forward,
                       {"search", "gather", "statistics", "rotation"}, (), {}),
    "heads-separate-cosine-kmeans": (functools.partial(VQ, heads=2, codebook_dim=8, separate_codebook_per_head=True,
                                                       use_cosine_sim=True, kmeans_init=True, kmeans_iters=3),
                                     vq_forward, {"kmeans", "search", "gather", "statistics"}, (), {}),
    "codebook-dim-projection": (functools.partial(VQ, codebook_dim=8), vq_forward,
                                {"search", "gather", "statistics", "rotation"}, (), {}),
    "orthogonal-reg": (functools.partial(VQ, orthogonal_reg_weight=0.5), vq_forward,
                       {"search", "gather", "statistics"}, (), {}),
    "in-place-optimizer": (functools.partial(VQ, ema_update=False, learnable_codebook=True,
                                             in_place_codebook_optimizer=lambda p: torch.optim.SGD(p, lr=0.1)),
                           vq_forward, {"search", "gather"}, (), {}),
    "mask": (VQ, vq_forward, {"search", "gather", "statistics"}, (), {"lens": torch.tensor([T, T // 3])}),
    "topk1": (VQ, topk1_forward, {"topk", "gather"}, (), {}),
    "topk3-cosine": (functools.partial(VQ, use_cosine_sim=True), topk3_forward, {"topk", "gather"}, (), {}),
    "residual-vq-beam-search": (functools.partial(ResidualVQ, dim=DIM, num_quantizers=3, codebook_size=32,
                                                  beam_size=2), vq_forward, {"topk", "gather", "statistics"}, (), {}),
    "residual-vq": (functools.partial(ResidualVQ, dim=DIM, num_quantizers=3, codebook_size=32), vq_forward,
                    {"search", "gather", "statistics", "rotation"}, (), {}),
    "residual-vq-shared-kmeans": (functools.partial(ResidualVQ, dim=DIM, num_quantizers=3, codebook_size=32,
                                                    shared_codebook=True, kmeans_init=True, kmeans_iters=3),
                                  vq_forward, {"kmeans", "search", "gather", "statistics"}, (), {}),
    "grouped-residual-vq": (functools.partial(GroupedResidualVQ, dim=DIM, groups=2, num_quantizers=2,
                                              codebook_size=32, use_cosine_sim=True), grvq_forward,
                            {"search", "gather", "statistics", "rotation"}, (), {}),
    "simvq": (functools.partial(SimVQ, dim=DIM, codebook_size=32), vq_forward, {"simvq", "search", "gather",
                                                                               "rotation"}, (), {}),
    "residual-simvq-ste": (functools.partial(ResidualSimVQ, dim=DIM, num_quantizers=2, codebook_size=32,
                                             rotation_trick=False), vq_forward, {"simvq", "search", "gather"}, (), {}),
    # left to VQP, counted, and still exactly VQP's result
    "sampled-topk": (functools.partial(VQ, stochastic_sample_codes=True, sample_codebook_temp=0.5), topk3_forward,
                     {"topk", "gather"}, ("stochastic_sampling",), {}),
    "diversity-loss": (functools.partial(VQ, codebook_diversity_loss_weight=0.1), vq_forward,
                       {"search", "gather"}, ("distances_used",), {}),
    "commitment-cross-entropy": (functools.partial(VQ, commitment_use_cross_entropy_loss=True), vq_forward,
                                 {"search", "gather"}, ("distances_used",), {}),
    "straight-through-gumbel": (functools.partial(VQ, straight_through=True, rotation_trick=False), vq_forward,
                                {"search", "gather"}, ("straight_through_gumbel",), {}),
    "affine-param": (functools.partial(VQ, affine_param=True), vq_forward, {"rotation"}, ("affine_param",), {}),
    "implicit-neural-codebook": (functools.partial(ResidualVQ, dim=DIM, num_quantizers=2, codebook_size=32,
                                                   implicit_neural_codebook=True), vq_forward,
                                 {"search", "gather"}, ("implicit_neural_codebook",), {}),
    # routed: a learnable codebook seen through a module (VQP's vq_bridge), no EMA
    "vq-bridge": (lambda: VQ(vq_bridge=torch.nn.Linear(DIM, DIM), learnable_codebook=True, ema_update=False),
                  vq_forward, {"search", "gather", "rotation"}, (), {}),
}

# one triton case per routed path (the kernels run interpreted on a CPU)
TRITON_CASES = ["l2-ema-rotation", "cosine-ema-rotation", "kmeans-init", "heads-separate", "mask", "topk1",
                "simvq", "residual-vq"]


@pytest.mark.parametrize("case", list(CASES))
def test_parity_reference(case, device):
    make, forward, routed, allowed, extra = CASES[case]
    with fastvq.backend("reference"):
        run_parity(make, forward, device=device, routed=routed, allowed=allowed, lens=extra.get("lens"))


@pytest.mark.parametrize("case", TRITON_CASES)
def test_parity_triton(case, device):
    make, forward, routed, allowed, extra = CASES[case]
    with fastvq.backend("triton"):
        run_parity(make, forward, steps=2, device=device, routed=routed, allowed=allowed, lens=extra.get("lens"))


@pytest.mark.parametrize("heads", [1, 3])
def test_update_indices_parity(backend, device, heads):
    """Codebook.update_indices (ResidualVQ's EMA update after beam search, or a user's manual one):
    given codes with -1 (VQP counts them as code 0) and a padding mask."""
    torch.manual_seed(0)
    ref = VectorQuantize(dim=DIM * heads, codebook_size=32, heads=heads, separate_codebook_per_head=heads > 1,
                         codebook_dim=DIM, threshold_ema_dead_code=0).to(device)
    pat = copy.deepcopy(ref)
    x = torch.randn(B, T, DIM * heads, device=device)
    codes = torch.randint(-1, 32, (B, T, heads) if heads > 1 else (B, T), device=device)
    mask = torch.rand(B, T, device=device) > 0.3
    ref.update_indices(x, codes, mask=mask)
    fv.reset_counts()
    with fv.patched():
        pat.update_indices(x, codes, mask=mask)
    assert fv.counts() == {"statistics": 1}
    for name in ("cluster_size", "embed_avg", "embed"):
        assert_close(getattr(pat._codebook, name), getattr(ref._codebook, name), name)


# ---------------------------------------------------------------- patch / unpatch / versions


def _attributes():
    """Every attribute the patch replaces, as (owner, name, value now)."""
    return [(owner, name, vars(owner)[name]) for owner, name, _ in fv._replacements()]


def test_patch_is_idempotent_and_unpatch_restores_every_attribute():
    before = _attributes()
    owners = {id(o): o for o, _, _ in before}
    everything = {id(o): dict(vars(o)) for o in owners.values()}
    assert not fv.is_patched()
    fv.patch()
    try:
        after = _attributes()
        assert all(now is not old for (_, _, old), (_, _, now) in zip(before, after)), "something was not patched"
        fv.patch()  # idempotent: the same replacements, the originals still saved
        assert all(again is now for (_, _, now), (_, _, again) in zip(after, _attributes()))
    finally:
        fv.unpatch()
    assert not fv.is_patched()
    for (owner, name, old), (_, _, now) in zip(before, _attributes()):
        assert now is old, f"{owner}.{name} is not the original object after unpatch()"
    for key, owner in owners.items():  # and nothing else of those classes/modules changed
        now = dict(vars(owner))
        assert now.keys() == everything[key].keys()
        assert all(now[k] is everything[key][k] for k in now), f"{owner} changed"
    fv.unpatch()  # unpatching twice is fine


def test_patched_context_restores_and_nests():
    original = vars(vqp_mod.Codebook)["forward"]
    with fv.patched():
        assert vars(vqp_mod.Codebook)["forward"] is not original
        with fv.patched():
            pass
        assert fv.is_patched(), "an inner patched() block unpatched the outer one"
    assert vars(vqp_mod.Codebook)["forward"] is original
    fv.patch()
    try:
        with fv.patched():
            pass
        assert fv.is_patched(), "patched() undid a patch() made before it"
    finally:
        fv.unpatch()
    with pytest.raises(ZeroDivisionError):
        with fv.patched():
            1 / 0
    assert not fv.is_patched()


@pytest.mark.parametrize("version", ["1.31.0", "1.32.1", "2.0.0"])
def test_refuses_other_versions_naming_both(monkeypatch, version):
    monkeypatch.setattr(fv, "_installed_version", lambda: version)
    with pytest.raises(fv.UnsupportedVersionError, match=version) as info:
        fv.patch()
    assert all(v in str(info.value) for v in fv.SUPPORTED_VERSIONS)
    assert not fv.is_patched()
    with pytest.raises(fv.UnsupportedVersionError):
        with fv.patched():
            pass
    assert not fv.is_patched()


def test_says_when_vqp_is_not_installed(monkeypatch):
    monkeypatch.setattr(fv, "_installed_version", lambda: None)
    with pytest.raises(ImportError, match="vector-quantize-pytorch is not installed"):
        fv.patch()
    assert not fv.is_patched()


def test_unpatched_vqp_makes_no_fastvq_call():
    torch.manual_seed(0)
    vq = VQ()
    with fv.patched():
        pass
    fv.reset_counts()
    vq(torch.randn(B, T, DIM))
    assert fv.counts() == {}


def test_direct_codebook_call_keeps_vqp_distances():
    """A bare Codebook (not called by VectorQuantize) keeps returning VQP's distance matrix."""
    torch.manual_seed(0)
    vq = VQ().eval()
    x = torch.randn(B, T, DIM)
    q0, i0, d0 = vq._codebook(x)
    fv.reset_counts()
    with fv.patched():
        q1, i1, d1 = vq._codebook(x)
    assert fv.counts() == {"fallback.codebook_called_directly": 1}
    assert torch.equal(d1, d0) and torch.equal(i1, i0) and torch.equal(q1, q0)


def test_sampler_bound_before_patch_is_read_per_call():
    """VectorQuantize binds its gumbel sampler per instance in __init__ (a functools.partial); the
    patch reads that instance state at each call, for models built before it: sampling in training
    is routed to fastvq.sample_code, gumbel straight-through stays on VQP, eval or temperature 0
    is the nearest code."""
    torch.manual_seed(0)
    sampling = VQ(stochastic_sample_codes=True, sample_codebook_temp=1.0)
    straight = VQ(straight_through=True, rotation_trick=False)
    x = torch.randn(B, T, DIM)
    with fv.patched():
        fv.reset_counts()
        sampling(x)
        assert fv.counts() == {"sample": 1, "gather": 1, "statistics": 1}
        fv.reset_counts()
        straight(x)
        assert fv.counts() == {"fallback.straight_through_gumbel": 1}
        fv.reset_counts()
        sampling(x, sample_codebook_temp=0.0)
        sampling.eval()
        straight.eval()
        sampling(x)
        straight(x)
        assert fv.counts() == {"search": 3, "gather": 3, "statistics": 1}


@pytest.mark.parametrize("backend_name, cosine", [("reference", False), ("reference", True), ("triton", False)],
                         ids=["reference-euclidean", "reference-cosine", "triton-euclidean"])
def test_sampled_codes_follow_vqps_distribution(backend_name, device, cosine):
    """Stochastic sampling draws other codes than VQP (other noise), from VQP's distribution:
    softmax(logits / temperature) with logits -|x - c| (not the squared distance) or x . c.
    One row repeated 2000 times; a chi-square test of the counts (fixed seed; 7 degrees of freedom,
    bound 29.9: p = 1e-4). (The metric is the only difference between the two on the triton
    backend: one kernel.)"""
    torch.manual_seed(0)
    vq = VectorQuantize(dim=4, codebook_size=8, stochastic_sample_codes=True, sample_codebook_temp=0.7,
                        use_cosine_sim=cosine, decay=1.0, rotation_trick=False).to(device).train()
    with torch.no_grad():
        codebook = randn(8, 4, seed=1, device=device)
        vq.codebook = torch.nn.functional.normalize(codebook, dim=-1) if cosine else codebook
    row = randn(1, 1, 4, seed=2, device=device)
    c64 = vq.codebook.double()
    r64 = row.double()[0, 0]
    logits = c64 @ torch.nn.functional.normalize(r64, dim=-1) if cosine else -(r64 - c64).norm(dim=-1)
    p = (logits / 0.7).softmax(-1)
    n = 2000
    assert float(p.min()) * n >= 5, "the test's codebook gives some code too few expected draws"
    fv.reset_counts()
    with fastvq.backend(backend_name), fv.patched():
        _, codes, _ = vq(row.expand(1, n, 4))
    assert fv.counts().get("sample") == 1
    observed = torch.bincount(codes.reshape(-1), minlength=8).double()
    chi2 = float(((observed - n * p) ** 2 / (n * p)).sum())
    assert chi2 < 29.9, f"sampled codes do not follow softmax(logits / T): chi-square {chi2:.1f}, counts {observed.tolist()}"


# --------------------------------------------------------------------- what a step allocates


class _LargestOutput(torch.utils._python_dispatch.TorchDispatchMode):
    """The largest tensor any op outside fastvq's custom ops produces (fastvq ops count as one)."""

    def __init__(self):
        super().__init__()
        self.largest, self.op = 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


@pytest.mark.parametrize("backend_name, heads", [("reference", 1), ("reference", 2), ("triton", 1)])
def test_patched_training_step_allocates_no_rows_by_codes_tensor(backend_name, heads, device):
    K = 512
    N = B * T * heads
    torch.manual_seed(0)
    vq = VectorQuantize(dim=DIM, codebook_size=K, heads=heads, separate_codebook_per_head=heads > 1,
                        codebook_dim=DIM // heads).to(device).train()
    x = torch.randn(B, T, DIM, device=device, requires_grad=True)

    def step():
        q, _, loss = vq(x)
        (q.square().sum() + loss).backward()

    with _LargestOutput() as unpatched:
        step()
    assert unpatched.largest >= N * K // heads  # VQP's distance (and one-hot) matrix: the check can fail
    with fastvq.backend(backend_name), fv.patched(), _LargestOutput() as patched:
        step()
    assert patched.largest < N * K // (4 * heads), f"{patched.op} made a tensor of {patched.largest} elements"


def test_autocast_codebook_math_stays_float32():
    """Under autocast (bf16) the routed search, statistics and gather run in float32 (VQP turns
    autocast off in its codebook forward; on CUDA the two agree, on a CPU VQP's guard does not
    apply and the patch is the one in float32)."""
    torch.manual_seed(0)
    vq = VQ(codebook_size=256)
    ref = copy.deepcopy(vq)
    x = torch.randn(4, 64, DIM)
    q0, i0, l0 = ref(x)  # float32, no autocast
    with fv.patched(), torch.autocast(DEVICE, dtype=torch.bfloat16):
        q1, i1, l1 = vq(x)
    assert q1.dtype == torch.float32
    assert torch.equal(i1, i0)
    assert_close(q1, q0, "quantized")
    assert_close(vq._codebook.embed_avg, ref._codebook.embed_avg, "EMA sums")
    assert_close(vq._codebook.cluster_size, ref._codebook.cluster_size, "EMA counts")


@pytest.mark.about_devices("the TF32 switch of CUDA tensors, read without a GPU")
def test_tf32_follows_the_global_setting(monkeypatch):
    class FakeCuda:
        device = torch.device("cuda")

    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert fv._tf32_enabled(FakeCuda())
        matmul.fp32_precision = "ieee"
        assert not fv._tf32_enabled(FakeCuda())
    finally:
        matmul.fp32_precision = before
    assert not fv._tf32_enabled(torch.zeros(1))  # CPU matmuls never use TF32

    seen = []
    for name in ("nearest_code", "topk_codes", "sample_code"):
        real = getattr(fv, name)
        monkeypatch.setattr(fv, name, lambda *a, _real=real, _name=name, **k: seen.append((_name, k["allow_tf32"]))
                            or _real(*a, **k))
    monkeypatch.setattr(fv, "_tf32_enabled", lambda t: True)
    x, codebooks = torch.randn(2, 5, 3), torch.randn(2, 4, 3)
    fv._search(x, codebooks, "l2")
    fv._search_topk(x, codebooks, "l2", 2)
    fv._sample(x, codebooks, "euclidean", 0.5)
    assert seen == [("nearest_code", True), ("topk_codes", True), ("sample_code", True)]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("seed", range(4))
def test_kmeans_init_never_starts_from_a_nonfinite_row(backend, bad, seed):
    """probe5 V1: VQP draws k-means starting means from every row; a NaN row drawn stayed a NaN
    code for good (its cluster never wins a row). Patched, the codebook is finite after init and
    a training step, with one bad row in the initialising batch."""
    torch.manual_seed(seed)
    m = VectorQuantize(dim=4, codebook_size=4, kmeans_init=True, kmeans_iters=3)
    x = randn(1, 8, 4, seed=seed)
    x[0, 3] = bad
    with fv.patched():
        m.train()
        m(x)
        m(randn(1, 8, 4, seed=seed + 10))
    assert m.codebook.isfinite().all(), m.codebook


def test_kmeans_replacement_starts_are_not_drawn_means():
    """probe6 V1: a non-finite drawn mean was replaced by the i-th finite row, possibly one already
    drawn (a duplicate code that never wins a row); the replacement takes rows not yet drawn."""
    samples = torch.tensor([[[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [float("nan"), 0.0], [float("inf"), 0.0]]])
    drawn = samples[:, [0, 1, 4, 5]]
    starts = fv._finite_starts(drawn, samples)
    assert starts.isfinite().all()
    assert len({tuple(r) for r in starts[0].tolist()}) == 4  # rows 0, 1 kept; 2, 3 replace the bad ones
