"""Fuzz: the modules of fastvq.nn (VectorQuantizer, ResidualQuantizer, RQVAE, QREmbedding,
Bitcodes) on both backends: forward values against float64, losses and gradients finite where
representable, and codebook training that an empty batch, a NaN/inf row or an extreme
magnitude cannot poison (issue 9, item 2)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastvq
from tests.fuzz import _oracle as O
from tests.fuzz._bounds import UNIT, U, abs_slack, gamma
from tests.fuzz._gen import DTYPES, TSpec, fuzz_settings, sizes, special_kinds, tspecs
from tests.fuzz.test_fuzz_codebook_ops import _check_rq
from tests.fuzz.test_fuzz_train_ops import _qr_oracle

METRICS = ("l2", "cosine", "dot")


def _mse64(a64, b64):
    n = max(a64.numel(), 1)
    d = (a64 - b64) ** 2
    return d.sum() / n, gamma(n) * d.nan_to_num(0, 0, 0).sum() / n + abs_slack(n)


def _check_loss(op, name, loss, want, bound):
    """A loss in its dtype: the float64 value rounded (overflow -> inf), finite where representable."""
    O.check_values(op, name, loss.reshape(1), want.reshape(1), bound, loss.dtype)


# --------------------------------------------------------------------------- VectorQuantizer


@st.composite
def vq_case(draw, nonfinite=False):
    K = draw(sizes(1, 6, extra=(33,)))
    D = draw(sizes(1, 6, extra=(16,)))
    N = draw(sizes(0, 6, extra=(33,)))
    metric = draw(st.sampled_from(METRICS))
    grad = draw(st.sampled_from(("ste", "rotation")))
    dtype = draw(st.sampled_from(DTYPES))
    (sp,) = special_kinds(draw, nonfinite, 1)
    xs = draw(tspecs((N, D), dtype, specials=sp, dups=False))
    ws = draw(tspecs((K, D), torch.float32, specials="finite", layouts=("contiguous",)))
    return K, D, metric, grad, xs, ws


@given(case=vq_case())
@fuzz_settings(16)
def test_vector_quantizer_forward(backend, device, case):
    """Eval forward: indices the exact nearest codes (within the bound), quantized the code's
    value (straight-through rounding allowed), commitment loss mse(code, x) and its gradient
    against float64, finite wherever representable in the inputs' dtype."""
    K, D, metric, grad, xs, ws = case
    torch.manual_seed(xs.seed)
    vq = fastvq.nn.VectorQuantizer(K, D, metric=metric, grad=grad).to(device).eval()
    with torch.no_grad():
        vq.embeddings.weight.copy_(ws.build(device))
    x = xs.build(device).requires_grad_(True)
    q, commit, emb, idx = vq(x)
    op = f"VectorQuantizer[{backend},{metric},{grad}]"
    x64 = O.host(x).double()
    gx = None
    if x.shape[0] and bool(torch.isfinite(x64).all()):
        (gx,) = torch.autograd.grad(commit, x)
    _check_vq(op, metric, x.detach(), vq.embeddings.weight.detach(), idx, q.detach(), commit.detach(), gx)


@O.on_host
def _check_vq(op, metric, x, w, idx, q, commit, gx):
    x64, w64 = x.double(), w.double()
    d64 = O.distances64(x64, w64, metric)
    O.check_choice(op, idx, None, d64, O.bounds64(x64, w64, metric), O.finite_rows(x64), O.finite_rows(w64),
                   metric=metric)
    c64 = w64[idx]
    fin = O.finite_rows(x64)[:, None].expand_as(x64)
    # straight through: x + (code - x) in x's dtype, two roundings of magnitude |x| + |code|
    ste = 2 * (U + UNIT[x.dtype]) * (x64.abs() + c64.abs()).nan_to_num(0, 0, 0)
    O.check_values(op, "quantized", q, c64, ste, x.dtype, mask=fin)
    if gx is None:
        return  # an empty batch (mean over no element is 0/0: left open) or a non-finite one
    # mse(code, x) of the exact code; the module works in x's dtype (the code and x - code rounded
    # there), so each term carries that dtype's rounding of |x| + |code|
    want, bound = _mse64(c64, x64)
    mag = (x64.abs() + c64.abs()) ** 2
    _check_loss(op, "commitment_loss", commit, want, bound + 4 * UNIT[x.dtype] * float(mag.mean()))
    n = x64.numel()
    O.check_values(op, "grad(commitment_loss)", gx, 2 * (x64 - c64) / n,
                   (gamma(4) + 4 * UNIT[x.dtype]) * 2 * (x64.abs() + c64.abs()) / n + abs_slack(4), x.dtype)


@st.composite
def train_case(draw, residual: bool):
    K = draw(sizes(1, 6, extra=(33,)))
    D = draw(sizes(1, 5, extra=(16,)))
    L = draw(st.integers(1, 3)) if residual else 1
    ema = draw(st.booleans())
    opts = dict(
        ema=ema,
        decay=draw(st.sampled_from((0.0, 0.5, 0.99, 1.0))),
        dead_code_threshold=draw(st.sampled_from((0.0, 0.0, 1.0, 2.5))),
        kmeans_init=draw(st.booleans()),
        kmeans_iters=draw(st.integers(0, 3)),
    )
    if not residual:
        opts["metric"] = draw(st.sampled_from(METRICS))
    module_dtype = draw(st.sampled_from((torch.float32, torch.float32, torch.bfloat16, torch.float16)))
    batches = []
    for _ in range(draw(st.integers(1, 3))):
        N = draw(st.sampled_from((0, 1, 3, 8, 20)))
        dtype = module_dtype if draw(st.booleans()) else draw(st.sampled_from(DTYPES))
        batches.append(draw(tspecs((N, D), dtype, specials=draw(st.sampled_from((False, "finite", True))), dups=False)))
    return K, D, L, opts, module_dtype, batches


def _train_steps(op, module, codebook, batches, device):
    """Run training forwards; after each: the codebook and EMA state finite, EMA state float32,
    an empty batch changes nothing."""
    for s, spec in enumerate(batches):
        x = spec.build(device)
        before = {k: v.clone() for k, v in module.state_dict().items()}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module(x)
        state = module.state_dict()
        where = f"step {s} ({spec!r})"
        if x.shape[0] == 0:
            for k, v in before.items():
                if not torch.equal(v.nan_to_num(0, 1, -1), state[k].nan_to_num(0, 1, -1)):
                    O.fail(op, f"{where}: an empty batch changed {k}")
        cb = codebook()
        if not bool(torch.isfinite(cb).all()):
            O.fail(op, f"{where}: the codebook became non-finite: {cb.flatten()[~torch.isfinite(cb.flatten())][:4].tolist()}")
        for name in ("cluster_size", "embed_avg", "code_usage"):
            buf = getattr(module, name, None)
            if buf is None:
                continue
            if not bool(torch.isfinite(buf).all()):
                O.fail(op, f"{where}: buffer {name} became non-finite")
            if buf.dtype != torch.float32:
                O.fail(op, f"{where}: buffer {name} is {buf.dtype}; EMA state must stay float32")
        if getattr(module, "cluster_size", None) is not None and bool((module.cluster_size < 0).any()):
            O.fail(op, f"{where}: negative cluster_size")


@given(case=train_case(residual=False))
@fuzz_settings(16)
def test_vector_quantizer_training_cannot_be_poisoned(backend, device, case):
    """Training forwards with EMA / dead-code revival / k-means init on batches that are empty,
    hold NaN/inf rows or values up to the dtype's maximum: the codebook and the EMA buffers stay
    finite (and float32 for a bf16/fp16 module); an empty batch is a no-op."""
    K, D, _, opts, mdtype, batches = case
    torch.manual_seed(batches[0].seed)
    with warnings.catch_warnings():  # (generated options: decay without ema warns that it does nothing)
        warnings.simplefilter("ignore", UserWarning)
        vq = fastvq.nn.VectorQuantizer(K, D, **opts).to(device=device, dtype=mdtype).train()
    op = f"VectorQuantizer[{backend},{opts},{mdtype}]"
    _train_steps(op, vq, lambda: vq.embeddings.weight.detach(), batches, device)


# --------------------------------------------------------------------------- ResidualQuantizer


@st.composite
def rq_module_case(draw):
    L = draw(st.integers(1, 3))
    K = draw(sizes(1, 6, extra=(33,)))
    D = draw(sizes(1, 5, extra=(16,)))
    N = draw(sizes(0, 6, extra=(33,)))
    dtype = draw(st.sampled_from(DTYPES))
    xs = draw(tspecs((N, D), dtype, specials="finite", dups=False))
    cs = draw(tspecs((L, K, D), torch.float32, specials="finite", layouts=("contiguous",)))
    grad = draw(st.sampled_from(("ste", "rotation")))
    return L, K, D, xs, cs, grad


@given(case=rq_module_case())
@fuzz_settings(12)
def test_residual_quantizer_forward(backend, device, case):
    """Eval forward: codes the greedy exact argmins level by level, quantized == decode(codes)
    within rounding, the commitment loss finite wherever representable."""
    L, K, D, xs, cs, grad = case
    torch.manual_seed(xs.seed)
    rq = fastvq.nn.ResidualQuantizer(L, K, D, grad=grad).to(device).eval()
    with torch.no_grad():
        rq.codebooks.copy_(cs.build(device))
    x = xs.build(device)
    q, commit, emb, codes = rq(x)
    op = f"ResidualQuantizer[{backend},{grad}]"
    _check_rq(op, x, rq.codebooks.detach(), q.detach(), codes)
    _check_rq_module(op, x, rq.codebooks.detach(), codes, rq.decode(codes).detach(), commit.detach())


@O.on_host
def _check_rq_module(op, x, cb, codes, dec, commit):
    L, K, D = cb.shape
    x64 = x.double()
    fin = O.finite_rows(x64)[:, None].expand_as(x64)
    cb64 = cb.double()
    chosen = [cb64[lvl][codes[:, lvl]] for lvl in range(L)]
    q64 = sum(chosen) if x.shape[0] else torch.zeros(0, D, dtype=torch.float64)
    qabs = sum(c.abs() for c in chosen) if x.shape[0] else q64
    O.check_values(op, "decode(codes)", dec, q64, (L + 2) * U * qabs, dec.dtype, mask=fin)
    if bool(torch.isfinite(x64).all()) and x.shape[0]:
        # the seed's commitment loss: sum_l mse(q_l, r_l) with r_l the residual before level l
        r = x64.clone()
        want = torch.zeros((), dtype=torch.float64)
        bnd = 0.0
        for lvl in range(L):  # exact codes; the module's rounding to x's dtype goes in the bound
            c = chosen[lvl]
            m, b = _mse64(c, r)
            want, bnd = want + m, bnd + b + 4 * (lvl + 1) * UNIT[x.dtype] * float(((r.abs() + c.abs()) ** 2).mean())
            r = r - c
        _check_loss(op, "commitment_loss", commit, want, bnd)


@given(case=train_case(residual=True))
@fuzz_settings(12)
def test_residual_quantizer_training_cannot_be_poisoned(backend, device, case):
    K, D, L, opts, mdtype, batches = case
    torch.manual_seed(batches[0].seed)
    with warnings.catch_warnings():  # (generated options: decay without ema warns that it does nothing)
        warnings.simplefilter("ignore", UserWarning)
        rq = fastvq.nn.ResidualQuantizer(L, K, D, **opts).to(device=device, dtype=mdtype).train()
    op = f"ResidualQuantizer[{backend},L={L},{opts},{mdtype}]"
    _train_steps(op, rq, lambda: rq.codebooks.detach(), batches, device)


# --------------------------------------------------------------------------- RQVAE


@given(data=st.data())
@fuzz_settings(8)
def test_rqvae(backend, device, data):
    """Forward finite for finite features at moderate magnitudes (losses included), semantic
    ids distinct rows with codes in [0, K), in eval and after a training step."""
    in_dim, hid, lat = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 8)), data.draw(st.integers(1, 5))
    L, K = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 6))
    N = data.draw(st.integers(0, 20))
    log10 = data.draw(st.sampled_from((0, -3, 3)))
    seed = data.draw(st.integers(0, 999))
    torch.manual_seed(seed)
    model = fastvq.nn.RQVAE(in_dim, hid, lat, L, K).to(device)
    feats = TSpec((N, in_dim), log10=log10, seed=seed).build(device)
    op = f"RQVAE[{backend}]"
    rec, commit, emb, codes = model(feats)
    losses = model.compute_loss(feats, rec, commit, emb)
    for k, v in losses.items():
        if N and not bool(torch.isfinite(v).all()):
            O.fail(op, f"{k} is {v.item()!r} for finite features")
    if N:
        losses["total_loss"].backward()
        for name, p in model.named_parameters():
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                O.fail(op, f"gradient of {name} not finite")
    ids = model.semantic_ids(feats, batch_size=7, progress=False)
    if tuple(ids.shape) != (N, L + 1) or (N and not bool(((ids[:, :L] >= 0) & (ids[:, :L] < K)).all())):
        O.fail(op, f"semantic ids {tuple(ids.shape)} out of range")
    if N and torch.unique(ids, dim=0).shape[0] != N:
        O.fail(op, "semantic ids are not distinct rows")


# --------------------------------------------------------------------------- QREmbedding


@given(data=st.data())
@fuzz_settings(12)
def test_qr_embedding(backend, device, data):
    """Table sizes as documented (seed split int(sqrt(n)) x int(sqrt(n)), or ceil(n/c) x c), and
    the lookup equals the quotient-remainder composition in float64."""
    n = data.draw(st.integers(1, 200))
    op = data.draw(st.sampled_from(("add", "mult", "concat")))
    dim = data.draw(st.integers(1, 6)) if op != "concat" else data.draw(st.integers(2, 6))
    c = data.draw(st.one_of(st.none(), st.integers(1, 30)))
    torch.manual_seed(n)
    emb = fastvq.nn.QREmbedding(n, dim, num_collisions=c, op=op).to(device)
    Q, R = emb._emb_q.weight.shape[0], emb._emb_r.weight.shape[0]
    want_qr = (max(1, int(math.isqrt(n))),) * 2 if c is None else (-(-n // c), c)
    if (Q, R) != want_qr:
        O.fail("QREmbedding", f"tables {(Q, R)} for n={n}, num_collisions={c}; documented {want_qr}")
    ids = data.draw(st.lists(st.integers(-2**40, 2**40), max_size=10))
    out = emb(torch.tensor(ids, dtype=torch.int64).to(device))
    want, bound, *_ = _qr_oracle(emb._emb_q.weight.detach(), emb._emb_r.weight.detach(), op, ids, None, "sum", None)
    O.check_values(f"QREmbedding[{backend},{op}]", "out", out, want, bound, out.dtype)


# --------------------------------------------------------------------------- Bitcodes


@given(data=st.data())
@fuzz_settings(16)
def test_bitcodes_module(backend, device, data):
    """Eval: bit k is 1 iff codebook row 2k+1 has the larger inner product with x (ties 0), within
    the bound; y == from_bits(bits). Training: bits in {0, 1} and y == from_bits(bits) up to
    rounding, finite for finite x wherever the similarities are representable."""
    F = data.draw(st.integers(1, 6))
    nb = data.draw(st.integers(1, 6))
    temp = data.draw(st.sampled_from((1e-3, 0.5, 1.0, 10.0, 1e3)))
    dtype = data.draw(st.sampled_from(DTYPES))
    xs = data.draw(tspecs((data.draw(st.integers(0, 9)), F), dtype, specials=data.draw(st.sampled_from((False, "finite", True))), dups=False))
    training = data.draw(st.booleans())
    torch.manual_seed(xs.seed)
    bc = fastvq.nn.Bitcodes(F, nb, temp).to(device).train(training)
    x = xs.build(device)
    y, bits = bc(x)
    op = f"Bitcodes[{'train' if training else 'eval'},{dtype}]"
    if bits.dtype != torch.int64 or tuple(bits.shape) != (x.shape[0], nb):
        O.fail(op, f"bits {bits.dtype} {tuple(bits.shape)}")
    if x.shape[0] and not bool(((bits == 0) | (bits == 1)).all()):
        O.fail(op, f"bits not 0/1: {bits.tolist()}")
    _check_bitcodes(op, x, bc.codebook.detach(), y.detach(), bits, bc.from_bits(bits).detach(), training, nb, dtype)


@O.on_host
def _check_bitcodes(op, x, codebook, y, bits, fb, training, nb, dtype):
    x64, c64 = x.double(), codebook.double()
    fin = O.finite_rows(x64)
    s64 = -O.distances64(x64, c64, "dot")  # (N, 2 nb) inner products
    sb = O.bounds64(x64, c64, "dot") + 2 * UNIT[torch.promote_types(dtype, torch.float32)] * (x64.abs() @ c64.abs().T)
    for i in range(x.shape[0]):
        if not bool(fin[i]):
            continue
        if not training:
            for k in range(nb):
                s0, s1 = float(s64[i, 2 * k]), float(s64[i, 2 * k + 1])
                slack = float(sb[i, 2 * k] + sb[i, 2 * k + 1])
                want = 1 if s1 > s0 else 0
                if int(bits[i, k]) != want and abs(s1 - s0) > slack and max(abs(s0), abs(s1)) < 1e38:
                    O.fail(op, f"row {i} bit {k}: got {int(bits[i, k])}, inner products {s0!r} (0) and {s1!r} (1)")
        if not bool(torch.isfinite(y[i]).all()) and max(float(s64[i].abs().max()), 0) < 1e37:
            O.fail(op, f"row {i}: y not finite for a finite x: {y[i].tolist()}")
    tol = 4 * U * c64.abs().sum(0) + 2 * UNIT[y.dtype] * c64.abs().sum(0)
    for i in range(x.shape[0]):
        if bool(fin[i]) and bool(torch.isfinite(y[i]).all()):
            if bool(((y[i].double() - fb[i].double()).abs() > tol).any()):
                O.fail(op, f"row {i}: y {y[i].tolist()} != from_bits(bits) {fb[i].tolist()}")
