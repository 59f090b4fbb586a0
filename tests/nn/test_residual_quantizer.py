"""fastvq.nn.ResidualQuantizer against the seed MultiQuantizer (tests/seeds.py)."""

import pytest
import torch
import torch.nn as nn

import fastvq
from fastvq.nn import ResidualQuantizer
from tests import seeds
from tests.utils import assert_close, raises_invalid, randn

L, K, D = 3, 7, 5


def _seed_multi(seed=0, ema=False):
    torch.manual_seed(seed)
    m = seeds.MultiQuantizer(L, K, D)
    if ema:  # the seed's MultiQuantizer built from its EMAQuantizer, level by level
        m.quantizers = nn.ModuleList([seeds.EMAQuantizer(K, D) for _ in range(L)])
    return m


def _pair(seed=0, ema=False, **kwargs):
    ref = _seed_multi(seed, ema)
    ours = ResidualQuantizer(L, K, D, ema=ema, **kwargs)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("shape", [(11, D), (2, 3, D)], ids=["N11", "batch2x3"])
def test_matches_seed_values_and_grads(backend, shape):
    ref, ours = _pair()
    x = randn(*shape, seed=1)
    g = randn(*shape, seed=2)
    got = []
    for mod in (ref, ours):
        mod.zero_grad()
        xi = x.clone().requires_grad_(True)
        q, commit, emb, codes = mod(xi)
        ((q * g).sum() + 0.7 * commit + 1.3 * emb).backward()
        if isinstance(codes, list):
            codes = torch.stack(codes, -1)
            grad_cb = torch.stack([m.embeddings.weight.grad for m in mod.quantizers])
        else:
            grad_cb = mod.codebooks.grad
        got.append((q, commit, emb, codes, xi.grad, grad_cb))
    (q0, c0, e0, s0, gx0, gc0), (q1, c1, e1, s1, gx1, gc1) = got
    assert s1.dtype == torch.int64 and s1.shape == (*shape[:-1], L)
    assert torch.equal(s1, s0)
    assert_close(q1, q0)
    assert_close(c1, c0)
    assert_close(e1, e0)
    assert_close(gc1, gc0)
    assert gc1.abs().sum() > 0
    # the one deliberate difference: the seed's quantized hands x the upstream gradient L times
    assert_close(gx0 - gx1, (L - 1) * g)


def test_gradient_to_x_passes_once(backend):
    _, rq = _pair()
    x = randn(6, D, seed=3).requires_grad_(True)
    g = randn(6, D, seed=4)
    q, _, _, _ = rq(x)
    (q * g).sum().backward()
    assert_close(x.grad, g)
    assert rq.codebooks.grad is None  # quantized itself sends nothing to the codebooks


def test_ema_matches_seed_step_by_step(backend):
    ref, ours = _pair(seed=5, ema=True)
    assert not ours.codebooks.requires_grad
    for step in range(4):
        x = randn(19, D, seed=30 + step, scale=2.0)
        got = []
        for mod in (ref, ours):
            q, commit, emb, codes = mod(x.clone())
            if isinstance(codes, list):
                codes = torch.stack(codes, -1)
            got.append((q, commit, emb, codes))
        (q0, c0, e0, s0), (q1, c1, e1, s1) = got
        assert torch.equal(s1, s0), step
        assert_close(q1, q0)
        assert_close(c1, c0)
        assert e1.item() == 0.0 and e1.device == x.device
        seed_state = {
            "codebooks": torch.stack([m.embeddings.weight for m in ref.quantizers]),
            "cluster_size": torch.stack([m.cluster_size for m in ref.quantizers]),
            "embed_avg": torch.stack([m.embed_avg for m in ref.quantizers]),
        }
        for name, seed_t in seed_state.items():
            assert_close(getattr(ours, name), seed_t.detach(), reduce_len=19, msg=f"{name} step {step}")


def test_seed_checkpoints_load_strictly():
    ref = _seed_multi()
    rq = ResidualQuantizer(L, K, D)
    assert set(rq.state_dict()) == {"codebooks"}
    rq.load_state_dict(ref.state_dict(), strict=True)
    assert torch.equal(rq.codebooks, torch.stack([m.embeddings.weight for m in ref.quantizers]))
    ema = ResidualQuantizer(L, K, D, ema=True, kmeans_init=True)
    ema.load_state_dict(_seed_multi(ema=True).state_dict(), strict=True)
    assert bool(ema.initted)
    rq.load_state_dict(ema.state_dict(), strict=False)  # our own layout loads as-is
    with pytest.raises(RuntimeError):  # a level count that does not match fails loudly
        ResidualQuantizer(L + 1, K, D).load_state_dict(ref.state_dict(), strict=True)
    with pytest.raises(RuntimeError):  # EMA buffers into a module without EMA
        ResidualQuantizer(L, K, D).load_state_dict(ema.state_dict(), strict=True)


def test_decode(backend):
    torch.manual_seed(0)
    rq = ResidualQuantizer(L, K, D)
    x = randn(2, 5, D, seed=6)
    q, _, _, codes = rq(x)
    assert_close(rq.decode(codes), q, reduce_len=L)
    cb = rq.codebooks.detach()
    assert_close(rq.decode(codes[..., :1]), cb[0][codes[..., 0]])
    assert_close(rq.decode(codes[..., :2].int()), cb[0][codes[..., 0]] + cb[1][codes[..., 1]])
    assert rq.decode(codes[:0]).shape == (0, 5, D)
    # differentiable in the codebooks
    rq.decode(codes).sum().backward()
    expected = torch.stack([torch.bincount(codes[..., l].flatten(), minlength=K) for l in range(L)])
    assert_close(rq.codebooks.grad, expected[..., None].float().expand(L, K, D))


@pytest.mark.parametrize(
    "codes, exc",
    [
        (torch.zeros(3, L + 1, dtype=torch.long), ValueError),
        (torch.zeros(3, 0, dtype=torch.long), ValueError),
        (torch.full((3, L), K, dtype=torch.long), ValueError),
        (torch.full((3, L), -1, dtype=torch.long), ValueError),
        (torch.zeros(3, L), TypeError),
    ],
    ids=["too-many-levels", "no-levels", "code-too-big", "negative", "float"],
)
def test_decode_bad_codes(codes, exc):
    with pytest.raises(exc, match="ResidualQuantizer.decode"):
        ResidualQuantizer(L, K, D).decode(codes)


def test_decode_compiles_fullgraph_and_checks_range():
    # the range check reads the codes; a host read in Python broke fullgraph tracing
    torch._dynamo.reset()
    torch.manual_seed(0)
    rq = ResidualQuantizer(L, K, D)
    decode = torch.compile(rq.decode, fullgraph=True, backend="aot_eager")
    codes = torch.tensor([[0, K - 1, 2], [3, 0, K - 1]])
    assert_close(decode(codes), rq.decode(codes))
    assert_close(decode(codes[:, :2]), rq.decode(codes[:, :2]))
    with pytest.raises(ValueError, match=r"ResidualQuantizer.decode: codes must lie in \[0, 7\)"):
        decode(torch.tensor([[0, K, 1], [0, 0, 0]]))
    torch.library.opcheck(torch.ops.fastvq.residual_decode_rows.default, (codes, K))


def test_rotation_grad(backend):
    torch.manual_seed(0)
    rq = ResidualQuantizer(L, K, D, grad="rotation")
    x = randn(7, D, seed=7).requires_grad_(True)
    g = randn(7, D, seed=8)
    q, _, _, codes = rq(x)
    total = rq.decode(codes).detach()
    assert_close(q, total, reduce_len=L)
    (q * g).sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    (fastvq.rotation_trick(x2, total) * g).sum().backward()
    assert_close(x.grad, x2.grad)
    assert not torch.allclose(x.grad, g)


def test_dead_codes_reseeded_from_residuals(backend):
    torch.manual_seed(0)
    rq = ResidualQuantizer(2, 6, 3, dead_code_threshold=1.0)
    with torch.no_grad():
        rq.codebooks[1, 3:] = 100.0  # level 1: codes 3..5 never chosen
    x = randn(20, 3, seed=9)
    before = rq.codebooks.detach().clone()
    _, _, _, codes = rq(x)
    residual = x - before[0][codes[:, 0]]
    chosen = before[1][codes[:, 1]]
    mids = 0.5 * (chosen + residual)  # level 1's inputs, halfway to their codes
    cb = rq.codebooks.detach()
    for k in range(3, 6):
        assert (cb[1, k] == mids).all(-1).any(), k  # seeded from level 1's inputs
    counts = torch.stack([torch.bincount(codes[:, l], minlength=6) for l in range(2)])
    alive = counts > 0
    assert torch.equal(cb[alive], before[alive])
    assert torch.equal(rq.code_usage[~alive], torch.ones(int((~alive).sum())))


def test_dead_codes_reset_ema_state(backend):
    # EMA: cluster_size starts at 0 (the seed's), so after one step of decay 0.99 every code
    # picked fewer than 100 times is below threshold 1: all are re-seeded from the residual of
    # their own level (halfway to the code it chose), with cluster_size = 1 and embed_avg = code * 1 (so the code survives the
    # next EMA normalisation instead of being divided by ~eps)
    torch.manual_seed(0)
    rq = ResidualQuantizer(2, 6, 3, ema=True, dead_code_threshold=1.0)
    x = randn(20, 3, seed=9)
    before = rq.codebooks.detach().clone()
    _, _, _, codes = rq(x)
    residuals = [x, x - before[0][codes[:, 0]]]
    cb = rq.codebooks.detach()
    for level in range(2):
        chosen = before[level][codes[:, level]]
        mids = 0.5 * (chosen + residuals[level])  # each row halfway to the code it chose
        for k in range(6):
            assert (cb[level, k] == mids).all(-1).any(), (level, k)
    assert torch.equal(rq.cluster_size, torch.ones(2, 6))
    assert torch.equal(rq.embed_avg, cb)
    # next step: the re-seeded codes are ordinary EMA codes (finite, near the data)
    rq(randn(20, 3, seed=10))
    assert rq.codebooks.abs().max() < 20


@pytest.mark.parametrize("ema", [False, True], ids=["grad", "ema"])
def test_kmeans_init_per_level(backend, ema):
    torch.manual_seed(0)
    rq = ResidualQuantizer(2, 4, 3, kmeans_init=True, kmeans_iters=12, ema=ema)
    x = randn(30, 3, seed=10)
    _, _, _, codes = rq(x)
    assert rq.initted
    cb = rq.codebooks.detach()
    # each level is a Lloyd fixed point on what it quantizes (the residual, for level 1)
    residual = x
    for level in range(2):
        idx = codes[:, level]
        for k in range(4):
            if (idx == k).any():
                assert_close(cb[level, k], residual[idx == k].mean(0), reduce_len=30, msg=f"level {level} code {k}")
        if ema:
            assert_close(rq.cluster_size[level], torch.bincount(idx, minlength=4).float())
        residual = residual - cb[level][idx]


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(num_quantizers=0),
        dict(num_embeddings=0),
        dict(embedding_dim=0),
        dict(commitment_cost=float("inf")),
        dict(grad="rotate"),
        dict(decay=-0.1),
        dict(eps=-1.0),
        dict(dead_code_threshold=-0.5),
        dict(kmeans_iters=1.5),
        dict(dead_code_threshold=1e39),  # finite, but not in float32: every EMA step failed
        dict(eps=10**400),  # (float() of it raised OverflowError)
        dict(num_quantizers=10**19),
        dict(num_embeddings=2**61),
    ],
    ids=lambda kw: "-".join(f"{k}={v if not isinstance(v, int) or v < 2**64 else 'huge'}" for k, v in kw.items()),
)
def test_bad_constructor_args(kwargs):
    args = dict(num_quantizers=L, num_embeddings=K, embedding_dim=D)
    args.update(kwargs)
    with pytest.raises(ValueError, match=rf"ResidualQuantizer: .*\b{next(iter(kwargs))}\b"):
        ResidualQuantizer(**args)


@pytest.mark.parametrize(
    "kwargs", [dict(ema=None), dict(ema=1), dict(kmeans_init="yes"), dict(grad=1), dict(commitment_cost=True)],
    ids=lambda kw: "-".join(f"{k}={v!r}" for k, v in kw.items()),
)
def test_wrong_type_constructor_args(kwargs):
    """A wrong type is a TypeError naming the argument (as in the ops), not a ValueError."""
    args = dict(num_quantizers=L, num_embeddings=K, embedding_dim=D)
    args.update(kwargs)
    with pytest.raises(TypeError, match="ResidualQuantizer: " + next(iter(kwargs))):
        ResidualQuantizer(**args)


def test_integral_float_sizes_are_ints(backend):
    """Sizes follow the ops' rule (fastvq._checks.check_int_arg): an integral float is that int."""
    rq = ResidualQuantizer(2.0, 4.0, 3.0, ema=True, dead_code_threshold=1.0).train()
    assert (rq.num_quantizers, rq.num_embeddings, rq.embedding_dim) == (2, 4, 3)
    assert type(rq.num_quantizers) is int and rq.codebooks.shape == (2, 4, 3)
    x = randn(8, 3, seed=5)
    rq.to(x.device)(x)


def test_largest_float32_threshold_trains(backend):
    """dead_code_threshold = float32's maximum (the largest accepted) trains, with and without EMA."""
    big = torch.finfo(torch.float32).max
    for ema in (False, True):
        rq = ResidualQuantizer(2, 4, 3, ema=ema, dead_code_threshold=big).train()
        x = randn(8, 3, seed=6)
        rq.to(x.device)(x)
        assert rq.codebooks.isfinite().all()


def test_mask_errors_name_mask():
    """A NaN or negative mask weight is reported as the module's ``mask``, not as the op's
    internal ``weights`` argument."""
    rq = ResidualQuantizer(L, K, D, ema=True).train()
    x = randn(2, 5, D, seed=7)
    rq.to(x.device)
    for bad in (float("nan"), -1.0):
        with raises_invalid(r"^fastvq\.ResidualQuantizer: mask must be finite and >= 0"):
            rq(x, torch.full((2, 5), bad, device=x.device))


def test_issue_signature_positional():
    # issue 3: ResidualQuantizer(num_quantizers, num_embeddings, embedding_dim, commitment_cost=0.25,
    # ema=False, decay=0.99, ...)
    rq = ResidualQuantizer(L, K, D, 0.5, True, 0.9)
    assert rq.commitment_cost == 0.5 and rq.ema and rq.decay == 0.9 and hasattr(rq, "embed_avg")


@pytest.mark.about_devices("inputs on another device than the module (the meta device stands in)")
@pytest.mark.parametrize("kwargs", [{}, {"kmeans_init": True, "dead_code_threshold": 1.0}], ids=["plain", "kmeans"])
def test_inputs_on_another_device_name_the_module(backend, kwargs):
    """A ValueError naming the module and ``inputs`` (probe3 R8: the error named
    residual_quantize_step's ``x`` and ``codebooks``, or k-means init ran ``.item()`` on the
    batch first), raised before k-means init reads the batch."""
    rq = ResidualQuantizer(L, K, D, **kwargs).train()
    with pytest.raises(ValueError, match=r"^fastvq\.ResidualQuantizer: inputs are on meta, the module on "):
        rq(randn(6, D).to(torch.device("meta")))
    if rq.kmeans_init:
        assert not bool(rq.initted)  # the batch was not consumed
        rq(randn(30, D, seed=1))
        assert bool(rq.initted)


@pytest.mark.parametrize("case", ["float64-inputs", "double-module", "int-inputs"])
def test_unsupported_dtypes_raise_type_error_naming_the_module(backend, case):
    """As VectorQuantizer: a TypeError naming the module and ``inputs`` (or its codebooks), not
    residual_quantize_step's ``x`` (probe3 R8)."""
    rq = ResidualQuantizer(L, K, D)
    x = randn(4, D)
    if case == "float64-inputs":
        x = x.double()
    elif case == "double-module":
        rq = rq.double()
    else:
        x = torch.ones(4, D, dtype=torch.int64, device=x.device)
    name = "the codebooks" if case == "double-module" else "inputs"
    with pytest.raises(TypeError, match=rf"^fastvq\.ResidualQuantizer: {name}.* must be float32, float16 or bfloat16"):
        rq(x)


def test_bad_inputs():
    rq = ResidualQuantizer(L, K, D)
    with pytest.raises(ValueError, match="ResidualQuantizer"):
        rq(torch.randn(4, D - 1))
    with pytest.raises(TypeError, match="ResidualQuantizer"):
        rq(None)


def test_compiles_fullgraph():
    torch.manual_seed(0)
    rq = ResidualQuantizer(L, K, D, ema=True)
    ref = ResidualQuantizer(L, K, D, ema=True)
    ref.load_state_dict(rq.state_dict())
    x = randn(6, D, seed=12)
    q, commit, emb, codes = torch.compile(rq, fullgraph=True, backend="aot_eager")(x)
    q0, c0, e0, s0 = ref(x)
    assert torch.equal(codes, s0)
    assert_close(q, q0)
    assert_close(commit, c0)
    assert_close(rq.codebooks, ref.codebooks)
