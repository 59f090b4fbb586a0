"""Fuzz: rotation_trick, qr_lookup (+ bags), pairwise_kl_loss on both backends: values and
gradients against float64 computations of the documented formulas."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import fastvq
from tests.fuzz import _oracle as O
from tests.fuzz._bounds import F32_MAX, UNIT, U, abs_slack, gamma
from tests.fuzz._gen import DTYPES, TSpec, fuzz_settings, host_generator, sizes, special_kinds, tspecs

# --------------------------------------------------------------------------- rotation_trick

EPS_NORM, EPS_ANTIPODAL = 1e-6, 1e-3  # documented in fastvq.rotation_trick


def _rotation_grad64(e64, q64, g64):
    """(rotated, plain, ambiguous) per the docstring, float64: ``lambda R^T g`` where the
    rotation is defined, ``g`` where it is not, and the rows within rounding of a threshold
    (either answer is right there)."""
    D = e64.shape[-1]
    a = e64.norm(dim=-1, keepdim=True)
    b = q64.norm(dim=-1, keepdim=True)
    one = torch.ones_like(a)
    eh = e64 / torch.where(a > 0, a, one)
    qh = q64 / torch.where(b > 0, b, one)
    s = eh + qh
    ns = s.norm(dim=-1, keepdim=True)
    w = s / torch.where(ns > 0, ns, one)
    rot = (b / torch.where(a > 0, a, one)) * (g64 - 2 * (g64 * w).sum(-1, keepdim=True) * w
                                              + 2 * (g64 * qh).sum(-1, keepdim=True) * eh)
    defined = (a >= EPS_NORM) & (b >= EPS_NORM) & (ns >= EPS_ANTIPODAL)
    tol = 1e-3 + gamma(D)
    near = ((a - EPS_NORM).abs() <= tol * EPS_NORM) | ((b - EPS_NORM).abs() <= tol * EPS_NORM) \
        | ((ns - EPS_ANTIPODAL).abs() <= 16 * gamma(D))
    return rot, defined.squeeze(-1), near.squeeze(-1), (b / torch.where(a > 0, a, one)).squeeze(-1)


@st.composite
def rotation_case(draw, nonfinite):
    N = draw(sizes(0, 5, extra=(33,)))
    D = draw(sizes(0, 6, extra=(16, 100)))
    dtype = draw(st.sampled_from(DTYPES))
    qdtype = dtype if draw(st.integers(0, 3)) else draw(st.sampled_from(DTYPES))
    sp_e, sp_q = special_kinds(draw, nonfinite, 2)
    es = draw(tspecs((N, D), dtype, specials=sp_e, dups=False))
    qs = draw(tspecs((N, D), qdtype, specials=sp_q, dups=False))
    mode = draw(st.sampled_from(("independent", "near", "antipodal")))
    return es, qs, mode


@O.on_host
def _rotation_inputs(es, qs, mode, device):
    e, q = es.build(), qs.build()
    if mode != "independent" and e.numel():  # q close to +-e: the edge of the rotation
        g = host_generator(qs.seed)
        noise = 10.0 ** -torch.randint(1, 8, (1,), generator=g).item()
        sign = 1.0 if mode == "near" else -1.0
        e64 = e.double()
        q64 = sign * e64 * (1 + noise * torch.randn(e.shape, generator=g, dtype=torch.float64))
        big = float(torch.finfo(q.dtype).max)
        q = q64.clamp(-big, big).where(e64.isfinite(), q64).to(q.dtype)  # finite e: finite q
    return e.to(device), q.to(device)


@O.on_host
def _check_rotation(op, e, q, out, ge, g):
    dtype = torch.promote_types(e.dtype, q.dtype)
    if out.dtype != dtype or out.shape != q.shape:
        O.fail(op, f"output {out.dtype} {tuple(out.shape)}, expected {dtype} {tuple(q.shape)}")
    if not torch.equal(out.nan_to_num(0, 1, -1), q.to(dtype).nan_to_num(0, 1, -1)) or \
            not torch.equal(out.isnan(), q.isnan()):
        O.fail(op, "forward value is not q bit for bit")
    if ge.dtype != e.dtype or ge.shape != e.shape:
        O.fail(op, f"grad_e {ge.dtype} {tuple(ge.shape)}, expected {e.dtype} {tuple(e.shape)}")
    e64, q64, g64 = e.double(), q.double(), g.double()
    N, D = e.shape
    if D == 0:
        return
    rot, defined, near, lam = _rotation_grad64(e64, q64, g64)
    plain = g64
    fin = O.finite_rows(e64) & O.finite_rows(q64) & O.finite_rows(g64)
    gnorm = g64.nan_to_num(0, 0, 0).norm(dim=-1, keepdim=True)
    # near-antipodal rows: w = (e^ + q^) / |e^ + q^| carries the rounding of e^ + q^ divided by its norm
    ns = (e64 / e64.norm(dim=-1, keepdim=True) + q64 / q64.norm(dim=-1, keepdim=True)).norm(dim=-1, keepdim=True)
    cond = 1 + 2 / ns.nan_to_num(1.0).clamp(min=EPS_ANTIPODAL)
    bound = 8 * gamma(D) * torch.where(defined, lam, torch.ones_like(lam))[:, None] * gnorm * cond + abs_slack(D)
    for i in range(N):
        if not bool(fin[i]):
            ef, qf, gf = (bool(O.finite_rows(t[i:i + 1])[0]) for t in (e64, q64, g64))
            if not (ef and qf):  # no rotation of / to a non-finite vector: NaN in exact arithmetic
                if not bool(ge[i].isnan().all()):
                    O.fail(op, f"row {i}: e or q not finite, the exact gradient is NaN, got {ge[i].tolist()[:4]}")
            elif not gf and bool(ge[i].isfinite().all()):
                O.fail(op, f"row {i}: a non-finite upstream gradient became the finite {ge[i].tolist()[:4]}")
            continue
        cands = [rot[i] if bool(defined[i]) else plain[i]]
        if bool(near[i]):
            cands = [rot[i], plain[i]]
        errs = []
        for want in cands:
            try:
                O.check_values(op, f"grad_e row {i}", ge[i], want, bound[i], e.dtype)
                break
            except O.ContractError as err:
                errs.append(err)
        else:
            raise errs[0]


@given(case=rotation_case(nonfinite=False))
@fuzz_settings(16)
def test_rotation_trick_finite(backend, device, case):
    """Forward exactly q; gradient to e = lambda R^T g (float64) where the rotation is defined,
    g where it is not (thresholds documented), finite wherever the inputs are finite and the
    exact gradient is representable, at |e|, |q| from 1e-30 to 1e30 (D = 0 included)."""
    es, qs, mode = case
    e, q = _rotation_inputs(es, qs, mode, device)
    e.requires_grad_(True)
    out = fastvq.rotation_trick(e, q)
    g = TSpec(tuple(out.shape), out.dtype, seed=es.seed + 1).build(device)
    (ge,) = torch.autograd.grad(out, e, g)
    _check_rotation(f"rotation_trick[{backend}]", e.detach(), q, out.detach(), ge, g)


@given(case=rotation_case(nonfinite=True))
@fuzz_settings(12)
def test_rotation_trick_nonfinite(backend, device, case):
    """A NaN/inf e (or upstream gradient) gives a NaN gradient row, never a made-up finite one."""
    es, qs, mode = case
    e, q = _rotation_inputs(es, qs, mode, device)
    e.requires_grad_(True)
    out = fastvq.rotation_trick(e, q)
    g = TSpec(tuple(out.shape), out.dtype, seed=es.seed + 1).build(device)
    (ge,) = torch.autograd.grad(out, e, g)
    _check_rotation(f"rotation_trick[{backend}]", e.detach(), q, out.detach(), ge, g)


# --------------------------------------------------------------------------- qr_lookup


@st.composite
def qr_case(draw, nonfinite):
    Q = draw(st.integers(1, 5))
    R = draw(st.integers(1, 5))
    op = draw(st.sampled_from(("add", "mult", "concat")))
    dq = draw(sizes(0, 5, extra=(17,)))
    dr = draw(sizes(0, 5)) if op == "concat" else dq
    dtype = draw(st.sampled_from(DTYPES))
    sp_q, sp_r = special_kinds(draw, nonfinite, 2)
    sp = True if nonfinite else "finite"
    qs = draw(tspecs((Q, dq), dtype, specials=sp_q, layouts=("contiguous", "strided", "transposed")))
    rs = draw(tspecs((R, dr), dtype, specials=sp_r, layouts=("contiguous", "strided", "transposed")))
    n = draw(sizes(0, 8, extra=(40,)))
    ids = draw(st.lists(st.one_of(st.integers(0, 30), st.integers(-2**63, 2**63 - 1)), min_size=n, max_size=n))
    id_dtype = torch.int64 if any(abs(i) >= 2**31 for i in ids) else draw(st.sampled_from((torch.int64, torch.int32)))
    bags = draw(st.booleans())
    offsets = psw = None
    mode = "sum"
    if bags:
        nb = draw(st.integers(0, 4))
        cuts = sorted(draw(st.lists(st.integers(0, n), min_size=nb, max_size=nb)))
        offsets = [0] + cuts if nb else []
        mode = draw(st.sampled_from(("sum", "mean")))
        if mode == "sum" and draw(st.booleans()):
            psw = draw(tspecs((n,), dtype, specials=sp, layouts=("contiguous",)))
    return qs, rs, op, ids, id_dtype, offsets, mode, psw


@O.on_host
def _qr_oracle(qw, rw, op, ids, offsets, mode, psw):
    """float64 output, |terms| (for bounds) and the per-item composed vectors."""
    Q, R = qw.shape[0], rw.shape[0]
    q64, r64 = qw.double(), rw.double()
    items, mags, qi, ri = [], [], [], []
    for i in ids:
        h = i % (Q * R)  # python ints: exact for every int64 id, non-negative
        a, b = h // R, h % R
        qi.append(a), ri.append(b)
        if op == "add":
            items.append(q64[a] + r64[b]), mags.append(q64[a].abs() + r64[b].abs())
        elif op == "mult":
            items.append(q64[a] * r64[b]), mags.append((q64[a] * r64[b]).abs())
        else:
            items.append(torch.cat([q64[a], r64[b]])), mags.append(torch.cat([q64[a], r64[b]]).abs())
    dim = qw.shape[1] + (rw.shape[1] if op == "concat" else 0)
    items = torch.stack(items) if items else torch.zeros(0, dim, dtype=torch.float64)
    mags = torch.stack(mags) if mags else torch.zeros(0, dim, dtype=torch.float64)
    if offsets is None:
        return items, U * mags, items, qi, ri, None, None
    n, B = len(ids), len(offsets)
    bag_of = [0] * n
    scale = [1.0] * n
    for b in range(B):
        end = offsets[b + 1] if b + 1 < B else n
        for i in range(offsets[b], end):
            bag_of[i] = b
            if mode == "mean":
                scale[i] = 1.0 / (end - offsets[b])
    if psw is not None:
        scale = psw.double().tolist()
    out = torch.zeros(B, dim, dtype=torch.float64)
    mag = torch.zeros(B, dim, dtype=torch.float64)
    for i in range(n):
        if i < (offsets[0] if B else n):
            continue
        out[bag_of[i]] += scale[i] * items[i]
        mag[bag_of[i]] += (abs(scale[i]) * mags[i]).nan_to_num(0, 0, 0)
    counts = [sum(1 for i in range(n) if bag_of[i] == b) for b in range(B)]
    return out, gamma(max(counts, default=1)) * mag, items, qi, ri, bag_of, scale


@given(case=qr_case(nonfinite=False))
@fuzz_settings(16)
def test_qr_lookup(backend, device, case):
    """Plain and bag lookups at every magnitude and int64 id (negative, > 2^31): the composed,
    pooled float64 value (overflow -> +-inf, inf*0 -> NaN); gradients of both tables and of the
    per-sample weights against float64 sums."""
    qs, rs, op, ids, id_dtype, offsets, mode, psws = case
    qw = qs.build(device).requires_grad_(True)
    rw = rs.build(device).requires_grad_(True)
    ids_t = torch.tensor(ids, dtype=torch.int64).to(id_dtype).to(device)
    off_t = None if offsets is None else torch.tensor(offsets, dtype=torch.int64).to(device)
    psw = None if psws is None else psws.build(device).requires_grad_(True)
    name = f"qr_lookup[{backend},{op},{'bags-' + mode if offsets is not None else 'plain'}]"
    out = fastvq.qr_lookup(ids_t, qw, rw, op, offsets=off_t, mode=mode, per_sample_weights=psw)
    want, bound, items, qi, ri, bag_of, scale = _qr_oracle(qw.detach(), rw.detach(), op, ids, offsets, mode, psw)
    if out.dtype != qw.dtype or tuple(out.shape) != tuple(want.shape):
        O.fail(name, f"output {out.dtype} {tuple(out.shape)}, expected {qw.dtype} {tuple(want.shape)}")
    O.check_values(name, "out", out, want, bound, qw.dtype)
    # backward
    g = TSpec(tuple(out.shape), torch.float32, seed=qs.seed + 7).build().to(out.dtype)
    inputs = [qw, rw] + ([psw] if psw is not None else [])
    grads = torch.autograd.grad(out, inputs, g.to(device), allow_unused=True)
    _check_qr_grads(name, qw.detach(), rw.detach(), psw, g, grads, op, ids, offsets, items, qi, ri, bag_of, scale)


@O.on_host
def _check_qr_grads(name, qw, rw, psw, g, grads, op, ids, offsets, items, qi, ri, bag_of, scale):
    """Table gradients (float64 index_add of the upstream rows) and per-sample-weight gradients
    (composed item . bag gradient)."""
    grads = [None if t is None else O.host(t) for t in grads]
    g64 = g.double()
    q64, r64 = qw.double(), rw.double()
    gq = torch.zeros_like(q64)
    gr = torch.zeros_like(r64)
    mq, mr = torch.zeros_like(q64), torch.zeros_like(r64)
    dq = q64.shape[1]
    for i in range(len(ids)):
        if bag_of is None:
            gi, s = g64[i], 1.0
        else:
            if not offsets or i < offsets[0]:
                continue
            gi, s = g64[bag_of[i]], scale[i]
        gi = gi * s
        a, b = qi[i], ri[i]
        if op == "add":
            tq, tr = gi, gi
        elif op == "mult":
            tq, tr = gi * r64[b], gi * q64[a]
        else:
            tq, tr = gi[:dq], gi[dq:]
        gq[a] += tq
        gr[b] += tr
        mq[a] += tq.abs().nan_to_num(0, 0, 0)
        mr[b] += tr.abs().nan_to_num(0, 0, 0)
    O.check_values(name, "grad_q", grads[0], gq, gamma(len(ids) + 1) * mq, qw.dtype)
    O.check_values(name, "grad_r", grads[1], gr, gamma(len(ids) + 1) * mr, rw.dtype)
    if psw is not None:
        gw = torch.stack([(items[i] * g64[bag_of[i]]).sum() if offsets and i >= offsets[0] else torch.tensor(0.0, dtype=torch.float64)
                          for i in range(len(ids))]) if ids else torch.zeros(0, dtype=torch.float64)
        mw = torch.stack([(items[i] * g64[bag_of[i]]).abs().nan_to_num(0, 0, 0).sum() if offsets and i >= offsets[0]
                          else torch.tensor(0.0, dtype=torch.float64) for i in range(len(ids))]) if ids else torch.zeros(0, dtype=torch.float64)
        O.check_values(name, "grad_per_sample_weights", grads[2], gw, (gamma(items.shape[-1] + 2) + 2 * UNIT[qw.dtype]) * mw,
                       psw.dtype)


@given(case=qr_case(nonfinite=True))
@fuzz_settings(12)
def test_qr_lookup_nonfinite(backend, device, case):
    """NaN/inf table rows propagate to exactly the outputs that use them (NaN for inf*0 and
    inf - inf), nothing else."""
    qs, rs, op, ids, id_dtype, offsets, mode, psws = case
    qw, rw = qs.build(device), rs.build(device)
    ids_t = torch.tensor(ids, dtype=torch.int64).to(id_dtype).to(device)
    off_t = None if offsets is None else torch.tensor(offsets, dtype=torch.int64).to(device)
    psw = None if psws is None else psws.build(device)
    name = f"qr_lookup[{backend},{op},{'bags-' + mode if offsets is not None else 'plain'}]"
    out = fastvq.qr_lookup(ids_t, qw, rw, op, offsets=off_t, mode=mode, per_sample_weights=psw)
    want, bound, *_ = _qr_oracle(qw, rw, op, ids, offsets, mode, psw)
    O.check_values(name, "out", out, want, bound, qw.dtype)


# --------------------------------------------------------------------------- pairwise_kl_loss


@st.composite
def kl_case(draw, nonfinite):
    B = draw(sizes(0, 6, extra=(17, 40)))
    Dp = draw(sizes(0, 5, extra=(16,)))
    Dt = draw(sizes(0, 5, extra=(33,)))
    dtype = draw(st.sampled_from(DTYPES))
    tdtype = dtype if draw(st.integers(0, 3)) else draw(st.sampled_from(DTYPES))
    sp_p, sp_t = special_kinds(draw, nonfinite, 2)
    ps = draw(tspecs((B, Dp), dtype, specials=sp_p, ints=False))
    ts = draw(tspecs((B, Dt), tdtype, specials=sp_t, ints=False))
    collinear = draw(st.integers(0, 3)) == 0  # rows +-v: all logits of a row equal and hugely negative
    T = draw(st.sampled_from((1.0, 0.1, 0.05, 10.0, 1e-3, 1e3)))
    return ps, ts, collinear, T


@O.on_host
def _kl_inputs(ps, ts, collinear, device):
    p, t = ps.build(), ts.build()
    if collinear and p.shape[0] >= 2:
        g = host_generator(ps.seed)
        signs = torch.where(torch.rand(p.shape[0], generator=g) < 0.5, -1.0, 1.0).double()
        signs[0] = 1.0
        signs[1:] = -1.0 if p.shape[0] == 2 or bool(torch.rand(1, generator=g) < 0.5) else signs[1:]
        v = p.double()[0]
        p = (signs[:, None] * v[None, :]).to(p.dtype)
    return p.to(device), t.to(device)


@O.on_host
def _kl64(p64, t64, T, dtype=torch.float32):
    """loss, grad of the loss in pred, bounds, and whether every logit is representable in fp32.
    ``dtype``: pred's; a 16-bit pred adds the rounding of ``G + G^T`` to it (see gbound)."""
    B, Dp = p64.shape
    Dt = t64.shape[1]
    S = (p64[:, None, :] * p64[None, :, :]).sum(-1) / T
    Tt = (t64[:, None, :] * t64[None, :, :]).sum(-1) / T
    eye = torch.eye(B, dtype=torch.bool)
    S = S.masked_fill(eye, -math.inf)
    Tt = Tt.masked_fill(eye, -math.inf)
    lp = torch.log_softmax(S, 1)
    lq = torch.log_softmax(Tt, 1)
    pp, qq = lp.exp(), lq.exp()
    terms = torch.where(qq > 0, qq * (lq - lp), torch.zeros_like(qq))
    terms = torch.where(eye, 0.0, terms)
    loss = terms.sum() / B
    G = torch.where(eye, 0.0, pp - qq)
    H = G + G.T
    grad = (H @ p64) / (B * T)
    # bounds: logit errors (fp32 dot + scaling), propagated through log-softmax (2-Lipschitz)
    np_, nt_ = p64.norm(dim=-1), t64.norm(dim=-1)
    Sf, Tf = S.masked_fill(eye, 0).abs(), Tt.masked_fill(eye, 0).abs()
    Es = gamma(Dp) * (np_[:, None] * np_[None, :]) / T + 4 * U * Sf.amax(1, keepdim=True)
    Et = gamma(Dt) * (nt_[:, None] * nt_[None, :]) / T + 4 * U * Tf.amax(1, keepdim=True)
    # plus the rounding of the log-normalisers lse and of s - lse (absolute, ~ U * |lse|)
    lse_p, lse_t = torch.logsumexp(S, 1).nan_to_num(0, 0, 0), torch.logsumexp(Tt, 1).nan_to_num(0, 0, 0)
    es = Es.amax(1) + 4 * U * (lse_p.abs() + math.log(B) + 1)
    et = Et.amax(1) + 4 * U * (lse_t.abs() + math.log(B) + 1)
    # a logit error of at most e moves a softmax entry by a factor within exp(+-2e), and stays in [0, 1]
    dp = (pp * torch.expm1(2 * es[:, None]).clamp(max=1e300)).clamp(max=1.0) + U
    dq = (qq * torch.expm1(2 * et[:, None]).clamp(max=1e300)).clamp(max=1.0) + U
    gap = torch.where(eye, 0.0, (lq - lp).abs()).nan_to_num(0, 0, 0)
    lbound = (2 * (es + et) + (dq * (gap + 2 * (es + et)[:, None])).sum(1) + gamma(2 * B) * terms.abs().sum(1)).sum() / B \
        + abs_slack(B * B)
    dG = torch.where(eye, 0.0, dp + dq)
    gbound = ((dG + dG.T + gamma(B) * H.abs()) @ p64.abs()) / (B * T) + abs_slack(B)
    if dtype in (torch.float16, torch.bfloat16):
        # The gradient's sum_j h_ij pred_j (h = G + G^T as computed, |h| <= |H| + dG + dG^T) is a
        # 16-bit tensor-core dot on the Triton backend (README, "Precision"): pred is exact in its
        # dtype, h is rounded to it, relative UNIT[dtype] per entry while the scaled h is normal
        # (fp16: h * 2^14 down to 2^-28; bf16: h * 2^-e has fp32's range), absolutely half a
        # subnormal spacing below (fp16: 2^-25 / 2^14 in h's units), then accumulated in fp32.
        hmag = H.abs() + dG + dG.T
        sub = 2.0**-39 if dtype == torch.float16 else 2.0**-100
        gbound = gbound + ((UNIT[dtype] * hmag + sub * (~eye)) @ p64.abs()) / (B * T)
    ok = bool((Sf.amax() if B else 0) < F32_MAX / 4 and (Tf.amax() if B else 0) < F32_MAX / 4)
    return loss, grad, float(lbound), gbound, ok


@O.on_host
def _check_kl(op, p, t, T, loss, grad, g=1.0):
    """``loss`` and ``grad`` (the gradient of ``g * loss`` in ``p``; ``None``: unchecked) against
    :func:`_kl64`: NaN exactly where the exact loss is, +inf where the exact value overflows
    float32, within the bounds where it is representable (logits beyond float32 included)."""
    if loss.dtype != torch.float32 or loss.shape != ():
        O.fail(op, f"loss {loss.dtype} {tuple(loss.shape)}, expected a 0-d float32")
    B = p.shape[0]
    if B <= 1:
        if float(loss) != 0.0 or (grad is not None and bool((grad != 0).any())):
            O.fail(op, f"B = {B}: loss {float(loss)!r} and gradient must be 0")
        return
    p64, t64 = p.double(), t.double()
    want, gwant, lbound, gbound, _ = _kl64(p64, t64, T, p.dtype)
    fin = bool(p64.isfinite().all() and t64.isfinite().all())
    if not fin:  # NaN in exact arithmetic (a non-finite embedding): NaN out
        if not math.isnan(float(loss)) and math.isnan(float(want)):
            O.fail(op, f"non-finite inputs make the exact loss NaN, got {float(loss)!r}")
        return
    O.check_value(op, "loss", float(loss), float(want), lbound, lo=0.0)  # a KL is >= 0: never negative
    if grad is not None:
        O.check_values(op, "grad_pred", grad, gwant * g, gbound * abs(g), p.dtype)


@given(case=kl_case(nonfinite=False))
@fuzz_settings(16)
def test_pairwise_kl_loss_finite(backend, device, case):
    """Loss and gradient in pred against float64 (diagonal excluded exactly) wherever the inputs
    are finite: within the bounds where the exact value is representable (logits beyond float32
    and all logits of a row far below -1e30 included: collinear rows), +inf where the exact loss
    overflows, every temperature, B = 0/1 give 0."""
    ps, ts, collinear, T = case
    p, t = _kl_inputs(ps, ts, collinear, device)
    p.requires_grad_(True)
    loss = fastvq.pairwise_kl_loss(p, t, T)
    (grad,) = torch.autograd.grad(loss, p) if p.shape[0] else (torch.zeros_like(p),)
    _check_kl(f"pairwise_kl_loss[{backend},T={T}]", p.detach(), t, T, loss.detach(), grad)


@given(case=kl_case(nonfinite=True))
@fuzz_settings(12)
def test_pairwise_kl_loss_nonfinite(backend, device, case):
    """A NaN/inf embedding makes the loss NaN, never a finite made-up number."""
    ps, ts, collinear, T = case
    p, t = _kl_inputs(ps, ts, collinear, device)
    loss = fastvq.pairwise_kl_loss(p, t, T)
    _check_kl(f"pairwise_kl_loss[{backend},T={T}]", p, t, T, loss, None)
