import math

import pytest
import torch

import fastvq
import fastvq.testing as ft
from fastvq.reference.qr_lookup import qr_indices, qr_lookup_ref
from tests.utils import assert_close, generator, noncontiguous, raises_invalid, randn, stored

OPS = ["add", "mult", "concat"]


def _tables(Q, R, D, op, dtype=torch.float32):
    dr = D + 3 if op == "concat" else D  # concat: unequal widths on purpose
    return randn(Q, D, dtype=dtype), randn(R, dr, dtype=dtype)


def _rand_ids(n, seed=0, lo=-(2**62), hi=2**62):
    g = generator(seed)
    return torch.randint(lo, hi, (n,), generator=g, dtype=torch.int64)


def _interpreted():
    from fastvq import kernels

    return kernels.INTERPRETED


def _py_rows(i: int, Q: int, R: int):
    h = i % (Q * R)  # Python ints: exact, floor mod (non-negative)
    return h // R, h % R


def _py_compose(op, qv, rv):
    return qv + rv if op == "add" else qv * rv if op == "mult" else torch.cat([qv, rv])


def _py_lookup(ids, qw, rw, op, math_dtype=torch.float64):
    """Per-item Python loop, indices by Python integer arithmetic, composed in ``math_dtype``."""
    Q, R = qw.shape[0], rw.shape[0]
    rows = []
    for i in ids.reshape(-1).tolist():
        a, b = _py_rows(i, Q, R)
        rows.append(_py_compose(op, qw[a].to(math_dtype), rw[b].to(math_dtype)))
    dim = qw.shape[1] + rw.shape[1] if op == "concat" else qw.shape[1]
    return torch.stack(rows).reshape(*ids.shape, dim) if rows else torch.zeros(*ids.shape, dim, dtype=math_dtype)


def _py_bags(ids, offsets, qw, rw, op, mode="sum", weights=None):
    Q, R = qw.shape[0], rw.shape[0]
    ids, offs = ids.tolist(), offsets.tolist()
    dim = qw.shape[1] + rw.shape[1] if op == "concat" else qw.shape[1]
    out = []
    for b, start in enumerate(offs):
        end = offs[b + 1] if b + 1 < len(offs) else len(ids)
        acc = torch.zeros(dim, dtype=torch.float64)
        for k in range(start, end):
            a, c = _py_rows(ids[k], Q, R)
            item = _py_compose(op, qw[a].double(), rw[c].double())
            acc += item * (weights[k].double() if weights is not None else 1.0)
        if mode == "mean" and end > start:
            acc /= end - start
        out.append(acc)
    return torch.stack(out) if out else torch.zeros(0, dim, dtype=torch.float64)


PLAIN_CASES = [  # (ids shape, Q, R, D)
    pytest.param((1,), 1, 1, 1, id="N1-Q1-R1-D1"),
    pytest.param((127,), 7, 13, 60, id="N127-Q7-R13-D60"),
    pytest.param((3, 11), 31, 3, 100, id="B3x11-Q31-R3-D100"),
    pytest.param((0,), 5, 5, 8, id="N0"),
]


@pytest.mark.parametrize("shape,Q,R,D", PLAIN_CASES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_plain_matches_python_loop(backend, shape, Q, R, D, op, dtype):
    qw, rw = _tables(Q, R, D, op, dtype)
    ids = _rand_ids(math.prod(shape), seed=D).reshape(shape)
    out = fastvq.qr_lookup(ids, qw, rw, op)
    dim = D + D + 3 if op == "concat" else D
    assert out.shape == (*shape, dim) and out.dtype == dtype
    # float32 compose of the stored values, one rounding to the table dtype
    assert_close(out, _py_lookup(ids, qw, rw, op), dtype=dtype)
    # one float32 add/multiply/copy per element, one rounding: bit-exact with that rounding of the
    # float32 compose (round to nearest even; Triton 3.8's interpreter truncates to bfloat16)
    assert torch.equal(out, stored(_py_lookup(ids, qw, rw, op, torch.float32), dtype, kernel=backend == "triton"))
    if not (backend == "triton" and dtype == torch.bfloat16 and _interpreted()):
        assert torch.equal(out, qr_lookup_ref(ids, qw, rw, op))


def test_seed_formula(backend):
    # the seed's QREmbedding: x mod div^2, q = floor(x / div), r = x mod div, emb_q(q) + emb_r(r)
    n, dim = 1000, 12
    div = int(math.sqrt(n))
    qw, rw = randn(div, dim), randn(div, dim)
    x = torch.cat([torch.arange(-50, 2000), _rand_ids(300, lo=-(2**40), hi=2**40)])
    xm = torch.remainder(x, div * div)
    seed = qw[torch.div(xm, div, rounding_mode="floor").long()] + rw[torch.remainder(xm, div).long()]
    assert torch.equal(fastvq.qr_lookup(x, qw, rw), seed)


@pytest.mark.parametrize("op", OPS)
def test_large_and_negative_ids_exact(backend, op):
    Q, R = 1009, 997  # primes: ids above 2^24 differ from their float32 roundings in row
    qw, rw = _tables(Q, R, 4, op)
    k = torch.arange(0, 40)
    ids = torch.cat([
        2**40 + k, 2**24 + 1 + k, -(2**40) - k, -1 - k, k,
        torch.tensor([2**63 - 1, -(2**63), 2**53 + 1, -(2**53) - 1, Q * R, Q * R - 1, -Q * R]),
    ])
    out = fastvq.qr_lookup(ids, qw, rw, op)
    expected = _py_lookup(ids, qw, rw, op)
    assert_close(out, expected, torch.float32)
    # one float32 add/multiply/copy per element: bit-exact, so any wrong row index shows
    assert torch.equal(out, _py_lookup(ids, qw, rw, op, torch.float32))


def test_int32_ids(backend):
    qw, rw = _tables(5, 7, 6, "add")
    ids = torch.tensor([-3, 0, 34, 35, 2**31 - 1], dtype=torch.int32)
    assert torch.equal(fastvq.qr_lookup(ids, qw, rw), fastvq.qr_lookup(ids.long(), qw, rw))


def test_noncontiguous_tables(backend):
    qw, rw = _tables(9, 4, 10, "mult")
    ids = _rand_ids(33)
    out = fastvq.qr_lookup(ids[::1], noncontiguous(qw), rw.T.contiguous().T, "mult")
    assert_close(out, _py_lookup(ids, qw, rw, "mult"), torch.float32)


BAG_OFFSETS = [
    pytest.param([0, 3, 3, 7], id="empty-middle"),
    pytest.param([0], id="one-bag"),
    pytest.param([0, 0, 12], id="empty-first-last"),
    pytest.param([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], id="singletons"),
    pytest.param([], id="no-bags"),
]


@pytest.mark.parametrize("offs", BAG_OFFSETS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "mode,weighted", [("sum", False), ("mean", False), ("sum", True)], ids=["sum", "mean", "weighted"]
)
def test_bags_match_python_loop(backend, offs, op, mode, weighted):
    qw, rw = _tables(5, 7, 9, op)
    ids = _rand_ids(12, lo=-1000, hi=1000)
    offsets = torch.tensor(offs, dtype=torch.int64)
    w = randn(12) if weighted else None
    out = fastvq.qr_lookup(ids, qw, rw, op, offsets=offsets, mode=mode, per_sample_weights=w)
    dim = 9 + 12 if op == "concat" else 9
    assert out.shape == (len(offs), dim)
    assert_close(out, _py_bags(ids, offsets, qw, rw, op, mode, w), torch.float32, reduce_len=12)


def test_mult_bags_compose_before_pooling(backend):
    # DLRM pools each table first and multiplies the pooled rows: (q1+q2)*(r1+r2) != q1*r1 + q2*r2
    qw, rw = torch.tensor([[1.0], [2.0]]), torch.tensor([[3.0], [5.0]])
    ids = torch.tensor([0, 3])  # (q0, r0) and (q1, r1)
    out = fastvq.qr_lookup(ids, qw, rw, "mult", offsets=torch.tensor([0]))
    assert torch.equal(out, torch.tensor([[1.0 * 3.0 + 2.0 * 5.0]]))


def _grads(fn, qw, rw, g, w=None):
    qw = qw.detach().clone().requires_grad_()
    rw = rw.detach().clone().requires_grad_()
    w = None if w is None else w.detach().clone().requires_grad_()
    fn(qw, rw, w).backward(g)
    return qw.grad, rw.grad, None if w is None else w.grad


GRAD_CASES = [  # (form, mode, weighted)
    pytest.param(None, "sum", False, id="plain"),
    pytest.param([0, 4, 4, 9, 17], "sum", False, id="bags-sum"),
    pytest.param([0, 4, 4, 9, 17], "mean", False, id="bags-mean"),
    pytest.param([0, 4, 4, 9, 17], "sum", True, id="bags-weighted"),
]


@pytest.mark.parametrize("offs,mode,weighted", GRAD_CASES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("deterministic", [True, False], ids=["sorted", "atomic"])
def test_backward_matches_autograd_float64(backend, offs, mode, weighted, op, deterministic):
    Q, R, D, N = 6, 4, 11, 23  # 24 hash slots for 23 ids: many repeated rows
    qw, rw = _tables(Q, R, D, op)
    ids = _rand_ids(N, lo=-100, hi=100)
    offsets = None if offs is None else torch.tensor(offs)
    w = randn(N) if weighted else None
    rows = N if offsets is None else len(offs)
    g = randn(rows, D + D + 3 if op == "concat" else D)

    def ours(a, b, ww):
        return fastvq.qr_lookup(ids, a, b, op, offsets=offsets, mode=mode, per_sample_weights=ww,
                                deterministic=deterministic)

    def ref(a, b, ww):
        return qr_lookup_ref(ids, a, b, op, offsets=offsets, mode=mode, per_sample_weights=ww)

    gq, gr, gw = _grads(ours, qw, rw, g, w)
    eq, er, ew = _grads(ref, qw.double(), rw.double(), g.double(), None if w is None else w.double())
    assert_close(gq, eq, torch.float32, reduce_len=N)
    assert_close(gr, er, torch.float32, reduce_len=N)
    if weighted:
        assert_close(gw, ew, torch.float32, reduce_len=D)
    # rows no id maps to get exact zeros
    qi = torch.remainder(ids, Q * R) // R
    untouched = torch.ones(Q, dtype=torch.bool)
    untouched[qi] = False
    assert not gq[untouched].any()


@pytest.mark.parametrize("op", OPS)
def test_deterministic_backward_is_bitwise_reproducible(backend, op):
    # heavy reuse: 400 ids on 3 x 2 rows, so every row sums ~70 contributions
    qw, rw = _tables(3, 2, 17, op, torch.float32)
    ids = _rand_ids(400)
    g = randn(400, qw.shape[1] + (rw.shape[1] if op == "concat" else 0), scale=1e3)
    fn = lambda a, b, w: fastvq.qr_lookup(ids, a, b, op)  # noqa: E731
    first = _grads(fn, qw, rw, g)
    for _ in range(2):
        again = _grads(fn, qw, rw, g)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    fn_atomic = lambda a, b, w: fastvq.qr_lookup(ids, a, b, op, deterministic=False)  # noqa: E731
    atomic = _grads(fn_atomic, qw, rw, g)
    assert_close(atomic[0] / 1e3, first[0] / 1e3, torch.float32, reduce_len=400)  # g is ~1e3
    assert_close(atomic[1] / 1e3, first[1] / 1e3, torch.float32, reduce_len=400)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_backward(backend, dtype):
    qw, rw = _tables(4, 5, 8, "add", dtype)
    ids = _rand_ids(50)
    g = randn(50, 8, dtype=dtype)
    gq, gr, _ = _grads(lambda a, b, w: fastvq.qr_lookup(ids, a, b), qw, rw, g)
    assert gq.dtype == dtype
    eq, er, _ = _grads(lambda a, b, w: qr_lookup_ref(ids, a, b), qw.double(), rw.double(), g.double())
    assert_close(gq, eq, dtype, reduce_len=50)
    assert_close(gr, er, dtype, reduce_len=50)


def test_sparse_grads_are_coalesced_and_equal_dense(backend):
    qw, rw = _tables(50, 6, 5, "mult")
    ids = _rand_ids(40, lo=0, hi=300)  # rows of q: 0..49 -> some untouched
    g = randn(40, 5)
    dq, dr, _ = _grads(lambda a, b, w: fastvq.qr_lookup(ids, a, b, "mult"), qw, rw, g)
    a, b = qw.clone().requires_grad_(), rw.clone().requires_grad_()
    flags = []
    a.register_hook(lambda t: flags.append(t.is_coalesced()))
    b.register_hook(lambda t: flags.append(t.is_coalesced()))
    fastvq.qr_lookup(ids, a, b, "mult", sparse=True).backward(g)
    assert flags == [True, True]  # what the backward hands to autograd
    for s, d, rows in ((a.grad, dq, torch.remainder(ids, 300) // 6), (b.grad, dr, torch.remainder(ids, 300) % 6)):
        assert s.layout == torch.sparse_coo
        assert torch.equal(s._indices()[0], torch.unique(rows))  # one entry per touched row, sorted
        assert torch.equal(s._values(), s.coalesce()._values())
        assert_close(s.to_dense(), d, torch.float32)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [
        (dict(ids=torch.tensor([1.0])), TypeError, "ids must be an integer"),
        (dict(ids=torch.tensor([True])), TypeError, "ids"),
        (dict(op="sub"), ValueError, "unknown op"),
        (dict(mode="max", offsets=torch.tensor([0])), ValueError, "unknown mode"),
        (dict(r_weight=torch.randn(5, 3)), ValueError, "one width"),
        (dict(q_weight=torch.randn(4)), ValueError, "2-D"),
        (dict(r_weight=torch.randn(5, 4, 1)), ValueError, "2-D"),
        (dict(q_weight=torch.randn(0, 4)), ValueError, "no rows"),
        (dict(q_weight=torch.empty(2**32, 0), r_weight=torch.empty(2**31, 0)), ValueError, r"must be < 2\*\*63"),
        (dict(r_weight=torch.randn(5, 4, dtype=torch.float16)), TypeError, "one dtype"),
        (dict(q_weight=torch.randn(4, 4, dtype=torch.float64), r_weight=torch.randn(5, 4, dtype=torch.float64)),
         TypeError, "float32"),
        (dict(offsets=torch.tensor([0, 3, 2])), ValueError, "non-decreasing"),
        (dict(offsets=torch.tensor([0, 9])), ValueError, "out of range"),
        (dict(offsets=torch.tensor([1, 2])), ValueError, r"offsets\[0\]"),
        (dict(offsets=torch.tensor([[0, 2]])), ValueError, "1-D"),
        (dict(offsets=torch.tensor([0.0])), TypeError, "offsets"),
        (dict(ids=torch.tensor([[1, 2]]), offsets=torch.tensor([0])), ValueError, "1-D ids"),
        (dict(offsets=torch.tensor([0]), mode="mean", per_sample_weights=torch.ones(4)), ValueError, "mode='sum'"),
        (dict(per_sample_weights=torch.ones(4)), ValueError, "offsets"),
        (dict(offsets=torch.tensor([0]), per_sample_weights=torch.ones(3)), ValueError, "shape of ids"),
        (dict(offsets=torch.tensor([0]), per_sample_weights=torch.ones(4, dtype=torch.int64)), TypeError, "per_sample"),
        (dict(ids=torch.tensor([1, 2, 3, 4], device="meta")), ValueError, "one device"),
        (dict(q_weight=[[1.0]]), TypeError, "q_weight"),
    ],
    ids=lambda v: None if isinstance(v, (dict, type)) else str(v)[:20],
)
def test_bad_input(kwargs, err, match):
    args = dict(ids=torch.tensor([1, 2, 3, 4]), q_weight=torch.randn(4, 4), r_weight=torch.randn(5, 4), op="add")
    args.update(kwargs)
    ids, qw, rw, op = args.pop("ids"), args.pop("q_weight"), args.pop("r_weight"), args.pop("op")
    # the offsets' values are checked on the device (no host sync): see raises_invalid
    on_device = match in ("non-decreasing", "out of range", r"offsets\[0\]")
    with raises_invalid(f"qr_lookup.*{match}") if on_device else pytest.raises(err, match=f"qr_lookup.*{match}"):
        fastvq.qr_lookup(ids, qw, rw, op, **args)


def test_opcheck():
    ids = _rand_ids(9, lo=-50, hi=50)
    offsets = torch.tensor([0, 2, 2, 6])
    w = randn(9)
    for name in ("reference", "triton"):
        with fastvq.backend(name):
            for op in OPS:
                qw, rw = _tables(3, 4, 5, op)
                qw.requires_grad_(), rw.requires_grad_()
                for offs, mode, ww in ((None, "sum", None), (offsets, "mean", None), (offsets, "sum", w)):
                    torch.library.opcheck(
                        torch.ops.fastvq.qr_lookup.default, (ids, qw, rw, op, offs, mode, ww, True, False)
                    )
                g = randn(9, qw.shape[1] + (rw.shape[1] if op == "concat" else 0))
                g4 = randn(4, g.shape[1])
                for offs, mode, ww, det, sparse, needs in (
                    (None, "sum", None, True, False, (True, True, False)),
                    (None, "sum", None, False, False, (False, True, False)),
                    (offsets, "mean", None, True, False, (True, False, False)),
                    (offsets, "sum", w, True, False, (True, True, True)),
                    (offsets, "sum", w, False, False, (False, False, True)),
                ):
                    torch.library.opcheck(
                        torch.ops.fastvq.qr_lookup_backward.default,
                        (g if offs is None else g4, ids, qw.detach(), rw.detach(), op, offs, mode, ww, det, sparse,
                         *needs),
                    )


def test_compile_fullgraph():
    qw, rw = _tables(4, 5, 6, "mult")
    ids = _rand_ids(10)
    offsets = torch.tensor([0, 3, 7])

    def f(ids, qw, rw, offsets):
        return fastvq.qr_lookup(ids, qw, rw, "mult", offsets=offsets, mode="mean").sum()

    with fastvq.backend("reference"):
        a, b = qw.clone().requires_grad_(), rw.clone().requires_grad_()
        torch.compile(f, fullgraph=True, backend="aot_eager")(ids, a, b, offsets).backward()
        c, d = qw.clone().requires_grad_(), rw.clone().requires_grad_()
        f(ids, c, d, offsets).backward()
        assert torch.equal(a.grad, c.grad) and torch.equal(b.grad, d.grad)


@pytest.mark.parametrize("offs", [None, [0, 2, 2, 5]], ids=["plain", "bags"])
def test_sparse_under_compile_fullgraph(backend, offs):
    # the sparse backward is a custom op too: compiled, it runs the same kernels as eager
    # (it used to call the Triton launcher on fake tensors and fail to trace)
    qw, rw = _tables(7, 5, 6, "mult")
    ids = _rand_ids(9, lo=-60, hi=60)
    offsets = None if offs is None else torch.tensor(offs)
    g = randn(9 if offs is None else len(offs), 6)

    def f(ids, a, b):
        return (fastvq.qr_lookup(ids, a, b, "mult", offsets=offsets, sparse=True) * g).sum()

    torch._dynamo.reset()
    a, b = qw.clone().requires_grad_(), rw.clone().requires_grad_()
    torch.compile(f, fullgraph=True, backend="aot_eager")(ids, a, b).backward()
    c, d = qw.clone().requires_grad_(), rw.clone().requires_grad_()
    f(ids, c, d).backward()
    for compiled, eager in ((a.grad, c.grad), (b.grad, d.grad)):
        assert compiled.layout == torch.sparse_coo
        assert torch.equal(compiled._indices(), eager._indices())
        assert torch.equal(compiled._values(), eager._values())


def test_sparse_opcheck():
    ids = _rand_ids(9, lo=-50, hi=50)
    qw, rw = _tables(3, 4, 5, "add")
    for name in ("reference", "triton"):
        with fastvq.backend(name):
            for need_q, need_r in ((True, True), (False, True)):
                torch.library.opcheck(
                    torch.ops.fastvq.qr_lookup_backward.default,
                    (randn(9, 5), ids, qw, rw, "add", None, "sum", None, True, True, need_q, need_r, False),
                )


# ---------------------------------------------------------------- backward design (issue 10)

BWD_FORMS = [  # (offsets, mode, weighted)
    pytest.param(None, "sum", False, id="plain"),
    pytest.param([0, 5, 5, 11], "sum", False, id="bags"),
    pytest.param([0, 5, 5, 11], "mean", False, id="bags-mean"),
    pytest.param([0, 5, 5, 11], "sum", True, id="bags-weighted"),
]


def _bwd_inputs(device, op, offs, weighted, seed=0):
    qw, rw = _tables(7, 5, 6, op)
    qw, rw = qw.to(device).requires_grad_(), rw.to(device).requires_grad_()
    ids = _rand_ids(17, seed=seed, lo=-80, hi=80).to(device)
    offsets = None if offs is None else torch.tensor(offs, device=device)
    w = randn(17, seed=seed + 1, device=device, requires_grad=True) if weighted else None
    return ids, qw, rw, offsets, w


def _bwd_call(device, op, offs, mode, weighted, deterministic=True, sparse=False, seed=0, inputs=None):
    ids, qw, rw, offsets, w = inputs or _bwd_inputs(device, op, offs, weighted, seed)
    out = fastvq.qr_lookup(ids, qw, rw, op, offsets=offsets, mode=mode, per_sample_weights=w,
                           deterministic=deterministic, sparse=sparse)
    return out, (qw, rw, w)


@pytest.mark.parametrize("offs,mode,weighted", BWD_FORMS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("deterministic", [True, False], ids=["sorted", "atomic"])
def test_backward_has_no_host_sync_and_at_most_one_sort(device, monkeypatch, offs, mode, weighted, op, deterministic):
    from fastvq.bench.traffic import metering

    # counted as users run it: the suite's NaN poisoning of torch.empty is a write the meter sees
    monkeypatch.setattr(torch, "empty", torch._C._VariableFunctions.empty)
    monkeypatch.setattr(torch, "empty_like", torch._C._VariableFunctions.empty_like)
    sorts = []
    real_sort = torch.sort
    monkeypatch.setattr(torch, "sort", lambda *a, **k: sorts.append(1) or real_sort(*a, **k))
    with fastvq.backend("triton"):
        out, leaves = _bwd_call(device, op, offs, mode, weighted, deterministic)
        g = randn(*out.shape, seed=3, device=device)
        with metering() as meter:
            out.backward(g)
    counts = meter.counts["fwd"]
    assert counts.syncs == 0, dict(counts.sync_ops)
    assert len(sorts) == (1 if deterministic else 0)
    # kernels only, but for the sort (sorted path) or the atomics' zeroed float32 accumulators
    assert set(counts.glue_ops) <= ({"sort"} if deterministic else {"zeros"}), dict(counts.glue_ops)
    launches = dict(counts.kernels)
    assert launches.pop("_qr_psw_grad_kernel", 0) == int(weighted)
    assert launches == ({"_qr_keys_kernel": 1, "_qr_rows_kernel": 1} if deterministic
                        else {"_qr_atomic_kernel": 1, "_qr_atomic_fixup_kernel": 1})


def test_atomic_backward_fix_up_has_no_host_sync(device, monkeypatch):
    # a backward that takes the fix-up (rows whose partial sums could overflow) reads nothing on
    # the host either and launches the same two kernels
    from fastvq.bench.traffic import metering

    monkeypatch.setattr(torch, "empty", torch._C._VariableFunctions.empty)
    monkeypatch.setattr(torch, "empty_like", torch._C._VariableFunctions.empty_like)
    q, r, ids, grad = _overflow_batch(device, "mult")
    q.requires_grad_(), r.requires_grad_()
    with fastvq.backend("triton"):
        out = fastvq.qr_lookup(ids, q, r, "mult", deterministic=False)
        with metering() as meter:
            out.backward(grad)
    counts = meter.counts["fwd"]
    assert counts.syncs == 0, dict(counts.sync_ops)
    assert dict(counts.kernels) == {"_qr_atomic_kernel": 1, "_qr_atomic_fixup_kernel": 1}
    assert torch.isfinite(q.grad[0]).all() and torch.isfinite(r.grad[:2]).all()


@pytest.mark.parametrize("offs,mode,weighted", BWD_FORMS)
def test_forward_has_no_host_sync(backend, device, offs, mode, weighted):
    # the bag offsets are validated on the device (assert_async), not read on the host
    from fastvq.bench.traffic import metering

    inputs = _bwd_inputs(device, "add", offs, weighted)
    with metering() as meter:
        _bwd_call(device, "add", offs, mode, weighted, inputs=inputs)
    assert meter.counts["fwd"].syncs == 0, dict(meter.counts["fwd"].sync_ops)


def test_sparse_backward_reads_the_host_once(device, monkeypatch):
    # the number of touched rows sizes a sparse gradient: read once (one .tolist() of two counts)
    from fastvq.bench.traffic import metering

    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.numel()) or real_tolist(t))
    with fastvq.backend("triton"):
        out, _ = _bwd_call(device, "mult", [0, 5, 5, 11], "sum", False, sparse=True)
        with metering() as meter:
            out.backward(randn(*out.shape, seed=4, device=device))
    assert reads == [2]
    # the meter sees that read (syncprobe Y2: tolist on the CPU) and nothing else reading the host
    assert dict(meter.counts["fwd"].sync_ops) == {"tolist": 1}


@pytest.mark.about_devices("compares against a host-side oracle or exercises a specific device")
def test_atomic_backward_uses_relaxed_atomics(monkeypatch):
    from fastvq import kernels

    if not kernels.INTERPRETED:
        pytest.skip("the atomic's memory order is read from the interpreter")
    from triton._C.libtriton import ir
    from triton.runtime.interpreter import InterpreterBuilder

    sems, ops = [], set()
    real = InterpreterBuilder.create_atomic_rmw

    def spy(self, rmw_op, ptr, val, mask, sem, scope):
        sems.append(sem)
        ops.add(rmw_op)
        return real(self, rmw_op, ptr, val, mask, sem, scope)

    monkeypatch.setattr(InterpreterBuilder, "create_atomic_rmw", spy)
    with fastvq.backend("triton"):
        out, _ = _bwd_call("cpu", "mult", None, "sum", False, deterministic=False)
        out.backward(randn(*out.shape, seed=5))
        out, _ = _bwd_call("cpu", "mult", None, "sum", False, deterministic=False)
        out.backward(randn(*out.shape, seed=5, scale=1e38))  # partial sums that may overflow: fixed up
    assert ops == {ir.ATOMIC_OP.FADD}, ops  # the fix-up sums in registers and stores: no atomics
    assert sems and all(s == ir.MEM_SEMANTIC.RELAXED for s in sems), set(sems)


@pytest.mark.parametrize("n_bags", [1, 2, 37, 100])
def test_many_bags_backward_matches_reference(backend, n_bags):
    # the kernels find each item's bag by binary search in offsets: every bag count, empty bags too
    g = generator(n_bags)
    N = 150
    offsets = torch.sort(torch.randint(0, N + 1, (n_bags,), generator=g)).values
    offsets[0] = 0
    ids = _rand_ids(N, seed=n_bags, lo=-500, hi=500)
    qw, rw = _tables(9, 11, 5, "mult")
    w = randn(N, seed=n_bags)
    gout = randn(n_bags, 5, seed=n_bags + 1)
    for mode, ww in (("mean", None), ("sum", w)):
        fn = lambda a, b, x: fastvq.qr_lookup(ids, a, b, "mult", offsets=offsets, mode=mode, per_sample_weights=x)  # noqa: E731
        ref = lambda a, b, x: qr_lookup_ref(ids, a, b, "mult", offsets=offsets, mode=mode, per_sample_weights=x)  # noqa: E731
        got = _grads(fn, qw, rw, gout, ww)
        want = _grads(ref, qw.double(), rw.double(), gout.double(), None if ww is None else ww.double())
        for a, b in zip(got, want):
            if b is not None:
                assert_close(a, b, torch.float32, reduce_len=N)


# ------------------------------------------------------------------- numbers (issue 9)


@pytest.mark.about_devices("compares against a host-side oracle or exercises a specific device")
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_nan_and_overflow_in_lookups(backend, device, op, dtype):
    big = torch.finfo(dtype).max
    qw, rw = _tables(4, 3, 5, op, dtype)
    qw, rw = qw.to(device), rw.to(device)
    qw[1, 2] = float("nan")
    qw[2] = big  # add: big + big/2 overflows; mult: big * r overflows where |r| > 1
    rw[0] = big / 2
    ids = torch.arange(12, device=device)  # every (q, r) pair once: q row = id // 3
    out = fastvq.qr_lookup(ids, qw, rw, op)
    exact = _py_lookup(ids.cpu(), qw.cpu(), rw.cpu(), op)  # float64
    got = out.cpu().double()
    # NaN exactly where exact arithmetic gives NaN; beyond the dtype's range, +-inf of the right sign
    assert torch.equal(got.isnan(), exact.isnan())
    over = exact.abs() > big * (1 + torch.finfo(dtype).eps / 2)  # rounds to inf
    assert over.any() or op == "concat"
    assert torch.equal(got[over], exact[over].sign() * float("inf"))
    fine = ~exact.isnan() & (exact.abs() <= big)
    assert torch.isfinite(got[fine]).all()
    assert_close(got[fine], exact[fine], dtype)


@pytest.mark.about_devices("compares against a host-side oracle or exercises a specific device")
def test_mean_bag_near_the_float32_limit_stays_finite(backend, device):
    # the mean of items at 3e38 is 3e38: the float32 sum overflows, the bag is summed again in float64
    qw = torch.full((2, 3), 1.5e38, device=device)
    rw = torch.full((2, 3), 1.5e38, device=device)
    out = fastvq.qr_lookup(torch.tensor([0, 1, 2, 3], device=device), qw, rw, offsets=torch.tensor([0], device=device),
                           mode="mean")
    assert torch.isfinite(out).all()
    assert_close(out.cpu(), torch.full((1, 3), 3e38), torch.float32)


def test_nan_gradients_stay_in_their_rows(backend, device):
    out, (qw, rw, _) = _bwd_call(device, "add", None, "sum", False)
    g = randn(*out.shape, seed=6, device=device)
    g[3, 1] = float("nan")
    out.backward(g)
    ids = _rand_ids(17, seed=0, lo=-80, hi=80)
    q3, r3 = _py_rows(ids[3].item(), 7, 5)
    assert torch.isnan(qw.grad[q3, 1]) and torch.isnan(rw.grad[r3, 1])
    assert torch.isnan(qw.grad).sum() == 1 and torch.isnan(rw.grad).sum() == 1


@pytest.mark.parametrize("offs", [None, [0, 2]], ids=["plain", "bags"])
@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_zero_width_tables(backend, device, offs, sparse):
    # D = 0: empty rows out, empty gradients back (the reference backward crashed here)
    qw = torch.zeros(3, 0, device=device, requires_grad=True)
    rw = torch.zeros(4, 0, device=device, requires_grad=True)
    ids = torch.tensor([1, 5, 7], device=device)
    offsets = None if offs is None else torch.tensor(offs, device=device)
    out = fastvq.qr_lookup(ids, qw, rw, offsets=offsets, sparse=sparse)
    assert out.shape == ((3, 0) if offs is None else (2, 0))
    out.sum().backward()
    assert qw.grad.shape == (3, 0) and rw.grad.shape == (4, 0)


@pytest.mark.parametrize(
    "kwargs,err,match",
    [(dict(deterministic="no"), TypeError, "deterministic must be True or False"),
     (dict(sparse=1), TypeError, "sparse must be True or False")],
    ids=["deterministic-str", "sparse-int"],
)
def test_bad_flags(kwargs, err, match):
    with pytest.raises(err, match=f"qr_lookup: {match}"):
        fastvq.qr_lookup(torch.tensor([1]), torch.randn(2, 3), torch.randn(2, 3), **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("op", OPS)
def test_large_gpu(dtype, op):
    Q, R, D, N = 1000, 1000, 128, 1 << 18
    qw = randn(Q, D, dtype=dtype)
    rw = randn(R, D + (3 if op == "concat" else 0), dtype=dtype)
    ids = _rand_ids(N)
    offsets = torch.sort(torch.randint(0, N, (4099,))).values
    offsets[0] = 0
    g_plain = randn(N, qw.shape[1] + (rw.shape[1] if op == "concat" else 0), dtype=dtype)
    g_bag = randn(4099, g_plain.shape[1], dtype=dtype)
    for offs, g in ((None, g_plain), (offsets, g_bag)):
        outs = {}
        for name in ("triton", "reference"):
            with fastvq.backend(name):
                fn = lambda a, b, w: fastvq.qr_lookup(ids, a, b, op, offsets=offs)  # noqa: E731
                outs[name] = (fastvq.qr_lookup(ids, qw, rw, op, offsets=offs), *_grads(fn, qw, rw, g)[:2])
        with fastvq.backend("triton"):
            again = _grads(lambda a, b, w: fastvq.qr_lookup(ids, a, b, op, offsets=offs), qw, rw, g)
        assert torch.equal(again[0], outs["triton"][1]) and torch.equal(again[1], outs["triton"][2])
        # float64 on the same tables and gradient; the same computation on |.| bounds the sums of |terms|
        fn64 = lambda a, b, w: qr_lookup_ref(ids, a, b, op, offsets=offs)  # noqa: E731
        exact = (fn64(qw.double(), rw.double(), None).detach(), *_grads(fn64, qw.double(), rw.double(), g.double())[:2])
        mag = (fn64(qw.double().abs(), rw.double().abs(), None).detach(),
               *_grads(fn64, qw.double().abs(), rw.double().abs(), g.double().abs())[:2])
        qi, ri = qr_indices(ids, Q, R)
        bag = torch.diff(offs, append=torch.tensor([N])).max() if offs is not None else 1
        n = int(max(torch.bincount(qi).max(), torch.bincount(ri).max(), bag)) + 2  # longest sum, + mean/compose
        for name in ("triton", "reference"):
            for what, t, e, m in zip(("out", "grad_q", "grad_r"), outs[name], exact, mag):
                ft.assert_close(t, e, dtype=dtype, reduce_len=n, magnitude=m, name=f"qr_lookup {name} {op} {what}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("op", ["add", "mult", "concat"])
def test_bag_mean_finite_where_the_mean_is_representable(backend, device, dtype, op):
    # F6: a bag mean composed q + r (or q * r) in float32 before taking 1 / len: -2.9e38 + -2.9e38
    # = -inf, though the mean over the bag of 4 is -2.175e38. Now such a bag is summed again in float64.
    q = torch.tensor([[-2.9e38, 1.0], [0.0, 1.0]], device=device, dtype=dtype)
    r = torch.tensor([[-2.9e38 if op != "mult" else 2.0, 1.0], [1.0, 1.0], [0.0, 2.0], [0.0, 3.0]],
                     device=device, dtype=dtype)
    ids = torch.tensor([0, 3, 5, 7], device=device)  # (q, r) rows (0, 0), (0, 3), (1, 1), (1, 3)
    out = fastvq.qr_lookup(ids, q, r, op, offsets=torch.tensor([0], device=device), mode="mean")
    q64, r64 = q.double()[[0, 0, 1, 1]], r.double()[[0, 3, 1, 3]]
    items = {"add": q64 + r64, "mult": q64 * r64, "concat": torch.cat([q64, r64], -1)}[op]
    exact = items.mean(0, keepdim=True)
    assert torch.isfinite(out).all(), out
    ft.assert_close(out, exact, dtype=dtype, reduce_len=4, magnitude=items.abs().mean(0, keepdim=True))


# ----------------------------------------- bag sums and gradients in the exact range (issue 9)


def _exact_qr(q, r, ids, op, offs, w, g):
    """float64 ``(out, grad_q, grad_r, grad_w)`` of a bag-sum lookup and ``|.|`` versions of each
    (the same computation on |inputs|: the sums of |terms| that size the rounding bound)."""

    def run(q64, r64, w64, g64):
        q64, r64 = q64.clone().requires_grad_(), r64.clone().requires_grad_()
        w64 = None if w64 is None else w64.clone().requires_grad_()
        out = qr_lookup_ref(ids, q64, r64, op, offsets=offs, per_sample_weights=w64)
        out.backward(g64)
        return out.detach(), q64.grad, r64.grad, None if w64 is None else w64.grad

    to64 = lambda t: None if t is None else t.detach().double()  # noqa: E731
    exact = run(to64(q), to64(r), to64(w), to64(g))
    mag = run(to64(q).abs(), to64(r).abs(), None if w is None else to64(w).abs(), to64(g).abs())
    return exact, mag


def _check_bag_contract(q, r, ids, op, offs, w, g, dtype, deterministic=True):
    """Output and every gradient against float64 (fastvq.testing: NaN only where exact, +-inf where
    the exact value overflows, else within the rounding bound of the sum of |terms|)."""
    qq, rr = q.clone().requires_grad_(), r.clone().requires_grad_()
    ww = None if w is None else w.clone().requires_grad_()
    out = fastvq.qr_lookup(ids, qq, rr, op, offsets=offs, per_sample_weights=ww, deterministic=deterministic)
    out.backward(g)
    got = (out.detach(), qq.grad, rr.grad, None if ww is None else ww.grad)
    (exact, mag), n = _exact_qr(q, r, ids, op, None if offs is None else offs, w, g), ids.numel() + 2
    for name, a, e, m in zip(("out", "grad_q", "grad_r", "grad_w"), got, exact, mag):
        if a is not None:
            ft.assert_close(a, e, dtype=dtype, reduce_len=max(n, q.shape[1] + 2), magnitude=m,
                            name=f"qr_lookup {op} {name}")
    return got


@pytest.mark.parametrize("deterministic", [True, False], ids=["sorted", "atomic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mult_weighted_bag_gradients_do_not_overflow(backend, device, dtype, deterministic):
    # the gradient of r is g * w * q: formed as (g * w) * q it overflowed (w = the dtype's largest
    # value) where the exact ~1e14 is representable (fuzz: grad_r inf, exact 1.02e14)
    big = torch.finfo(dtype).max
    q = torch.tensor([[1e-25, -2e-25], [3e-25, 1e-25]], dtype=dtype, device=device)
    r = torch.tensor([[1e18, 2e18], [-1e18, 1e18]], dtype=dtype, device=device)
    ids = torch.tensor([0, 1, 3, 2], device=device)  # (q, r) rows (0, 0), (0, 1), (1, 1), (1, 0)
    offs = torch.tensor([0, 2], device=device)
    w = torch.tensor([big, 0.5, -big, 2.0], dtype=dtype, device=device)
    g = torch.tensor([[1.5, -1.0], [0.75, 2.0]], dtype=dtype, device=device)
    _check_bag_contract(q, r, ids, "mult", offs, w, g, dtype, deterministic)


@pytest.mark.parametrize("weighted", [False, True], ids=["sum", "weighted"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mult_bag_sum_of_overflowing_items(backend, device, dtype, weighted):
    # items q * r of +-1e40 (beyond float32) summed in float32 gave inf - inf = NaN: an exact sum
    # that overflows must be +-inf, and one that cancels (0 here) must come out finite
    q = torch.tensor([[2e20, 1e20], [-1e20, -1e20]], dtype=dtype, device=device)
    r = torch.tensor([[1e20, 1e20]], dtype=dtype, device=device)
    ids = torch.tensor([0, 1], device=device)  # q rows 0, 1; r row 0
    offs = torch.tensor([0], device=device)
    w = torch.tensor([1.0, 2.0], dtype=dtype, device=device) if weighted else None
    g = torch.tensor([[1e-30, 2e-30]], dtype=dtype, device=device)
    _check_bag_contract(q, r, ids, "mult", offs, w, g, dtype)


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_weighted_bag_sum_cancels_without_overflow(backend, device, dtype, op):
    # Q1: weights +-3e38 on two equal items: the exact sum is 0, but (1 + 1) * 3e38 overflowed
    # float32 and the bag summed inf - inf = NaN
    q = torch.ones(1, 2, dtype=dtype, device=device)
    r = torch.ones(1, 2, dtype=dtype, device=device)
    ids = torch.tensor([0, 0], device=device)
    offs = torch.tensor([0], device=device)
    w = torch.tensor([3e38, -3e38], dtype=dtype, device=device)
    out = fastvq.qr_lookup(ids, q, r, op, offsets=offs, per_sample_weights=w)
    assert torch.equal(out, torch.zeros_like(out)), out
    _check_bag_contract(q, r, ids, op, offs, w, torch.ones_like(out), dtype)


@pytest.mark.parametrize("deterministic", [True, False], ids=["sorted", "atomic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_mult_weighted_bag_keeps_products_below_the_normal_range(backend, device, dtype, deterministic):
    # q * r = 1e-44 is a float32 subnormal (a few bits left); times w = 3e38 the lost bits show
    # (up to ~10% wrong); likewise g * q = 1e-46 underflows to 0 before the gradient of r takes w
    q = torch.tensor([[1e-26, 3e-26]], dtype=dtype, device=device)
    r = torch.tensor([[1e-18, 2e-18]], dtype=dtype, device=device)
    ids = torch.tensor([0, 0], device=device)
    offs = torch.tensor([0, 1], device=device)
    w = torch.tensor([3e38, 1e38], dtype=dtype, device=device)
    g = torch.tensor([[1e-20, 3e-20], [2e-20, 1e-20]], dtype=dtype, device=device)
    _check_bag_contract(q, r, ids, "mult", offs, w, g, dtype, deterministic)


@pytest.mark.parametrize("deterministic", [True, False], ids=["sorted", "atomic"])
@pytest.mark.parametrize("offs", [None, [0, 1, 2]], ids=["plain", "bags"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_gradient_rows_whose_partial_sums_overflow(backend, device, dtype, op, offs, deterministic):
    # a table row's gradient 3e38 + 3e38 - 3e38 = 3e38 is representable; summed in float32 it
    # was inf (the sorted backward, and the atomic one until its rows were summed again at a scale)
    q = torch.ones(1, 2, dtype=dtype, device=device)
    r = torch.ones(1, 2, dtype=dtype, device=device)
    ids = torch.tensor([0, 0, 0], device=device)
    offsets = None if offs is None else torch.tensor(offs, device=device)
    g = torch.tensor([[3e38, -1.0], [3e38, 1.0], [-3e38, 2.0]], dtype=dtype, device=device)
    g = torch.cat([g, g], -1) if op == "concat" else g
    _check_bag_contract(q, r, ids, op, offsets, None, g, dtype, deterministic)


def _overflow_batch(device, op):
    """300 items (several programs of the atomic backward) in three groups of q rows, each with
    its own r rows: q row 0 (r rows 0, 1) takes +-3e38 terms whose float32 partial sums overflow
    in item order (its exact sums are 0 and +-1.5e38, its r rows' +-3e38 and +-1.5e38), q row 1
    (r rows 2, 3) takes terms of ~1e-30 and q row 2 (r row 4) ordinary ones; the groups are
    interleaved, and an ordinary column sits beside the big ones."""
    big = [(1, 3e38)] * 26 + [(0, 3e38)] * 24 + [(1, -3e38)] * 25 + [(0, -3e38)] * 25  # (r row, g)
    h_big = torch.tensor([r for r, _ in big], device=device)
    g_big = torch.tensor([[v, -0.5 * v, 0.0] for _, v in big], device=device)
    g_big[:, 2] = randn(100, seed=12, device=device)
    h_tiny = 5 + 2 + torch.randint(0, 2, (100,), generator=generator(11), device=device)  # q row 1, r rows 2, 3
    g_tiny = randn(100, 3, seed=13, device=device, scale=1e-30)
    h_mid = torch.full((100,), 10 + 4, device=device)  # q row 2, r row 4
    g_mid = randn(100, 3, seed=14, device=device)
    ids = torch.stack([h_tiny, h_big, h_mid], 1).reshape(-1)  # interleaved; the big ones in order
    grad = torch.stack([g_tiny, g_big, g_mid], 1).reshape(-1, 3)
    q = torch.cat([torch.ones(1, 3, device=device), randn(2, 3, seed=15, device=device)])
    r = torch.cat([torch.ones(2, 3, device=device), randn(3, 3, seed=16, device=device)])
    if op == "concat":
        grad = torch.cat([grad, grad.flip(0)], -1)
    return q, r, ids, grad


@pytest.mark.parametrize("needs", ["q", "r"])
@pytest.mark.parametrize("deterministic", [True, False], ids=["sorted", "atomic"])
def test_overflowing_gradient_rows_of_one_table(backend, device, needs, deterministic):
    # one table's gradient only (the atomic fix-up then marks and sums that table's rows only)
    q, r, ids, grad = _overflow_batch(device, "mult")
    qq, rr = q.clone().requires_grad_(needs == "q"), r.clone().requires_grad_(needs == "r")
    out = fastvq.qr_lookup(ids, qq, rr, "mult", deterministic=deterministic)
    out.backward(grad)
    (exact, mag), n = _exact_qr(q, r, ids, "mult", None, None, grad), ids.numel() + 2
    got, want, m = (qq.grad, exact[1], mag[1]) if needs == "q" else (rr.grad, exact[2], mag[2])
    assert (rr.grad if needs == "q" else qq.grad) is None
    ft.assert_close(got, want, dtype=torch.float32, reduce_len=n, magnitude=m, name=f"qr_lookup grad_{needs}")


@pytest.mark.parametrize("deterministic", [True, False], ids=["sorted", "atomic"])
def test_overflowing_gradient_rows_with_nan_and_inf_terms(backend, device, deterministic):
    # in a row summed again, an infinite upstream gradient stays +-inf (inf - inf: NaN) and a NaN
    # stays NaN, in its own column only; the float64 oracle says where
    q, r, ids, grad = _overflow_batch(device, "add")
    grad[1, 2] = float("inf")  # q row 0, r row 1 (a big item), ordinary column
    grad[4, 2] = float("-inf")  # q row 0, r row 1: -inf + inf = NaN there
    grad[7, 2] = float("nan")  # q row 0, r row 1
    grad[3 * 26 + 1, 2] = float("inf")  # q row 0, r row 0: +inf there
    _check_bag_contract(q, r, ids, "add", None, None, grad, torch.float32, deterministic)


@pytest.mark.parametrize("form", ["plain", "bags", "weighted"])
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("deterministic", [True, False], ids=["sorted", "atomic"])
def test_overflowing_gradient_rows_beside_ordinary_ones(backend, device, op, form, deterministic):
    # float64 oracle: the rows whose partial sums overflow come out finite where exact, and the
    # rows of tiny and ordinary terms in the same backward keep their float32 accuracy
    q, r, ids, grad = _overflow_batch(device, op)
    offs, w = None, None
    if form != "plain":  # one item per bag: the same sums through the bag kernels
        offs = torch.arange(ids.shape[0], device=device)
    if form == "weighted":  # weights of 2 on the big items: partial sums of 6e38
        w = torch.ones(ids.shape[0], device=device)
        w[1::3] = 2.0
    _check_bag_contract(q, r, ids, op, offs, w, grad, torch.float32, deterministic)


def _stride2(t):
    """Same values as the 1-D ``t``, stride 2."""
    big = torch.zeros(2 * t.shape[0], dtype=t.dtype, device=t.device)
    big[::2] = t
    return big[::2]


STRIDED_CASES = [  # (offsets, weighted, layout of (ids, offsets, per_sample_weights))
    pytest.param(None, False, ("stride2", None, None), id="plain-ids-stride2"),
    pytest.param(None, False, ("int32-stride2", None, None), id="plain-int32-ids-stride2"),
    pytest.param(None, False, ("expanded", None, None), id="plain-ids-expanded"),
    pytest.param([0, 3, 3, 7], True, ("stride2", None, None), id="bags-ids-stride2"),
    pytest.param([0, 3, 3, 7], True, (None, "stride2", None), id="bags-offsets-stride2"),
    pytest.param([0, 3, 3, 7], True, (None, None, "stride2"), id="bags-weights-stride2"),
    pytest.param([0, 3, 3, 7], True, ("expanded", "stride2", "expanded"), id="bags-all-strided"),
    pytest.param([0, 3, 3, 7], False, ("int32-stride2", "stride2", None), id="bags-mean-int32"),
]


@pytest.mark.parametrize("offs,weighted,layout", STRIDED_CASES)
@pytest.mark.parametrize("op", ["add", "mult"])
@pytest.mark.parametrize("deterministic", [True, False], ids=["sorted", "atomic"])
def test_strided_index_tensors_match_contiguous(backend, offs, weighted, layout, op, deterministic):
    # P10: the Triton launchers read ids / offsets / per_sample_weights as contiguous; a stride-2
    # or expanded (stride 0) view gave other rows and other gradients than the same values packed
    ids_l, offs_l, w_l = layout
    N = 11
    qw, rw = _tables(5, 3, 6, op)
    ids = _rand_ids(N, lo=-50, hi=50)
    if ids_l == "expanded":
        ids = ids[3:4].expand(N)
    elif ids_l is not None and ids_l.startswith("int32"):
        ids = ids.int()
    offsets = None if offs is None else torch.tensor(offs)
    w = randn(N) if weighted else None
    if w is not None and w_l == "expanded":
        w = w[2:3].expand(N)
    mode = "sum" if weighted or offs is None else "mean"
    rows = N if offs is None else len(offs)
    g = randn(rows, 6)

    def run(i, o, ww):
        q = qw.detach().clone().requires_grad_()
        r = rw.detach().clone().requires_grad_()
        ww = None if ww is None else ww.detach().clone().requires_grad_()
        out = fastvq.qr_lookup(i, q, r, op, offsets=o, mode=mode, per_sample_weights=ww,
                               deterministic=deterministic)
        out.backward(g)
        return out.detach(), q.grad, r.grad, None if ww is None else ww.grad

    s_ids = _stride2(ids) if ids_l is not None and ids_l.endswith("stride2") else ids
    s_offs = _stride2(offsets) if offs_l == "stride2" else offsets
    s_w = _stride2(w) if w_l == "stride2" else w
    assert not (s_ids.is_contiguous() and (s_offs is None or s_offs.is_contiguous())
                and (s_w is None or s_w.is_contiguous()))
    want = run(ids.contiguous(), offsets, None if w is None else w.contiguous())
    got = run(s_ids, s_offs, s_w)
    for name, a, e in zip(["out", "q grad", "r grad", "w grad"], got, want):
        if e is None:
            assert a is None
        elif deterministic or name in ("out", "w grad"):
            assert torch.equal(a, e), (name, a, e)
        else:  # relaxed atomics: the order of the adds may differ
            assert_close(a, e, torch.float32, reduce_len=N, msg=name)


def test_atomic_table_gradient_at_the_float32_max_rounds_as_the_exact_sum(backend, device):
    """Terms max, 2^127, -2^127, -2^103, -2^103 on one quotient row sum exactly to max - 1 ulp (a
    float32 value): the atomic backward's fix-up (deterministic=False) once summed an overflowed
    row again in float32 at one power-of-two scale and rounded it to +inf (as f2probe T1); it
    sums in float64 now and rounds once."""
    ids = torch.arange(5, device=device)
    q = torch.zeros(1, 2, device=device, requires_grad=True)
    r = torch.zeros(8, 2, device=device, requires_grad=True)
    g = torch.zeros(5, 2, device=device)
    g[:, 0] = torch.tensor([3.4028235e38, 2.0**127, -(2.0**127), -(2.0**103), -(2.0**103)], device=device)
    fastvq.qr_lookup(ids, q, r, "add", deterministic=False).backward(g)
    exact = torch.tensor(g[:, 0].double().sum().item(), dtype=torch.float64).float().item()
    assert exact < float("inf") and q.grad[0, 0].item() == exact and q.grad[0, 1].item() == 0.0


@pytest.mark.parametrize("spread", [False, True], ids=["one-block", "blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_redone_sums_keep_a_small_remainder_beside_cancelling_ones(backend, device, dtype, spread):
    """tests/_midpoints.py small_remainder_rows as two columns: the README's max, half ulp of max,
    2^77, -2^-100, -2^77 (exact sum just below the overflow midpoint: max) and 1, half ulp of 1,
    2^-60, 2^-130, -2^-60 (just above the midpoint: 1 + ulp), through every float64 redo of the
    kernels: a bag's sum, a table row's gradient (deterministic, and the atomic fix-up), a
    per-sample weight's gradient (the terms along D; the rows as two items). The first column's
    float32 sum overflows in every order, so the redo runs for the whole tile. One split with
    the remainders summed plainly lost the -2^-100 (+inf); with the terms in different blocks
    (items 0, 1, 64, 128, 192 of 200; columns likewise) the running pair lost the 2^-130 (1)."""
    from fractions import Fraction

    from tests._midpoints import nearest, small_remainder_rows

    rows = small_remainder_rows(dtype)
    want = [nearest(sum(Fraction(v) for v in r), dtype) for r in rows]
    assert want == [rows[0][0], 1 + 2 * rows[1][1]]
    n = 200 if spread else 5
    pos = torch.tensor([0, 1, 64, 128, 192] if spread else list(range(5)), device=device)
    terms = torch.zeros(n, 2, device=device)
    terms[pos] = torch.tensor(rows, device=device).T
    offs = torch.zeros(1, dtype=torch.long, device=device)
    # a bag of n items, q rows holding the terms, r = 0
    out = fastvq.qr_lookup(torch.arange(n, device=device), terms.to(dtype),
                           torch.zeros(1, 2, device=device, dtype=dtype), "add", offsets=offs)
    assert out.tolist() == [want], out
    # n items on one q row, the terms their upstream gradients
    for det in (True, False):
        q1 = torch.zeros(1, 2, device=device, dtype=dtype, requires_grad=True)
        r1 = torch.zeros(n, 2, device=device, dtype=dtype, requires_grad=True)
        fastvq.qr_lookup(torch.arange(n, device=device), q1, r1, "add", deterministic=det).backward(terms.to(dtype))
        assert q1.grad.tolist() == [want], (det, q1.grad)
    # two items (one bag each) whose composed rows are the terms, bag gradients 1: each weight's
    # gradient is the sum of its row
    w = torch.ones(2, device=device, dtype=dtype, requires_grad=True)
    fastvq.qr_lookup(torch.arange(2, device=device), terms.T.contiguous().to(dtype),
                     torch.zeros(1, n, device=device, dtype=dtype), "add", offsets=torch.arange(2, device=device),
                     per_sample_weights=w).sum().backward()
    assert w.grad.tolist() == want, w.grad


def test_redone_add_sums_keep_q_and_r_apart(backend, device):
    """fuzzR finding 1: the float64 redo (and the reference) formed each "add" item's q + r, and
    (q + r) * w, in float64, which rounds where q and r lie far apart: items (q, r) = (2^60, 1),
    (-2^60, 0) summed to 0 (exact 1); (1, 0), (2^-24, 2^-100) to 1 (exact 1 + 2^-24 + 2^-100:
    1 + 2^-23); weighted items (1, 2^-24, w 1), (2^-30, 2^-60, w 1 + 2^-23), (-2^-30, 0, 1),
    (-2^-53, 0, 1), (-2^-60, 0, 1) to 1 (exact 1 + 2^-24 + 2^-83). The q and r rows are summed
    as separate terms now, each exact (a product of at most two float32 values); so is a
    per-sample weight's gradient q . g + r . g. Column 1 (max in every q row) overflows, so
    every bag is redone."""
    mx = torch.finfo(torch.float32).max
    bags = [([(2.0**60, 1.0), (-(2.0**60), 0.0)], None, 1.0),
            ([(1.0, 0.0), (2.0**-24, 2.0**-100)], None, 1 + 2.0**-23),
            ([(1.0, 2.0**-24), (2.0**-30, 2.0**-60), (-(2.0**-30), 0.0), (-(2.0**-53), 0.0), (-(2.0**-60), 0.0)],
             [1.0, 1 + 2.0**-23, 1.0, 1.0, 1.0], 1 + 2.0**-23)]
    for items, wv, want in bags:
        n = len(items)
        q = torch.tensor([[a, mx] for a, _ in items], device=device)
        r = torch.tensor([[b, 0.0] for _, b in items], device=device)
        ids = torch.arange(n, device=device) * (n + 1)  # item i -> (q row i, r row i)
        w = None if wv is None else torch.tensor(wv, device=device)
        out = fastvq.qr_lookup(ids, q, r, "add", offsets=torch.zeros(1, dtype=torch.long, device=device),
                               per_sample_weights=w)
        assert out.tolist() == [[want, float("inf")]], (items, out)
    # a per-sample weight's gradient: item 0's composed row (2^60 + 1, -2^60), bag gradient 1:
    # exact 1; item 1 (max, max) overflows in float32, so the block is redone
    q = torch.tensor([[2.0**60, -(2.0**60)], [mx, mx]], device=device)
    r = torch.tensor([[1.0, 0.0], [0.0, 0.0]], device=device)
    w = torch.ones(2, device=device, requires_grad=True)
    fastvq.qr_lookup(torch.tensor([0, 3], device=device), q, r, "add", offsets=torch.arange(2, device=device),
                     per_sample_weights=w).sum().backward()
    assert w.grad.tolist() == [1.0, float("inf")], w.grad


def _many_overflowed_rows(device):
    """2,500 items (three 1,024-id spans of the fix-up's scan), tables Q=20, R=3, D=160 (two
    128-column tiles). q rows 0..11 (three fix-up groups of 4 rows) each take 6 items
    spread over the spans, at positions k + 450 j: column 0 gets +-(3, 3, -1, -3, -3, 1.5)e38 (in
    item order 3e38 + 3e38 overflows; exact sum 0.5e38), column 140 the same negated, every other
    column ordinary values. The other 2,428 items go to q rows 12..19 with ordinary values but
    one 1e36 term on row 12 (beyond BIG_T = 2^115 at 2,500 items: marked, not overflowed)."""
    n, D = 2500, 160
    pattern = torch.tensor([3e38, 3e38, -1e38, -3e38, -3e38, 1.5e38], dtype=torch.float64)
    h = 12 * 3 + torch.randint(0, 8 * 3, (n,), generator=generator(21))
    g = randn(n, D, seed=22).double()
    big_rows = torch.zeros(n, dtype=torch.bool)
    for k in range(12):
        pos = k + 450 * torch.arange(6)
        h[pos] = k * 3 + torch.arange(6) % 3
        sign = 1.0 if k % 2 == 0 else -1.0  # the r rows' sums of the big columns cancel
        g[pos, 0], g[pos, 140] = sign * pattern, -sign * pattern
        big_rows[pos] = True
    g[torch.nonzero(~big_rows)[0], 0] = 1e36  # the first ordinary item: q row 12 or above
    q, r = randn(20, D, seed=23), randn(3, D, seed=24)
    return q.to(device), r.to(device), h.to(device), g.float().to(device)


def test_atomic_fix_up_sums_many_rows_over_spans_and_column_tiles_exactly(backend, device):
    # deterministic=False: the fix-up takes the overflowed rows 8 at a time, reads the ids span by
    # span and the columns tile by tile; each fixed row's terms (6 float32 values within 2^40 of
    # each other) sum exactly in float64, so every column of rows 0..11 equals the float64 sum
    # rounded once; every other row and the r table meet the float32 contract
    q, r, ids, g = _many_overflowed_rows(device)
    # one backward for both checks (it ran twice: once here, once with q alone requiring grad)
    _, grad_q, _, _ = _check_bag_contract(q, r, ids, "add", None, None, g, torch.float32, deterministic=False)
    want = torch.zeros(20, 160, dtype=torch.float64, device=device).index_add_(0, ids // 3, g.double())
    assert torch.isfinite(want).all()
    if grad_q.is_cuda:
        # the atomics' order is the GPU's: a row whose float32 sum happens not to overflow is not
        # fixed up and meets the float32 contract above (the H200 run of 2026-12-04: a row 2 ulp
        # from the exact sum); in item order, as the interpreter sums, every one of them overflows
        return
    assert torch.equal(grad_q[:12], want[:12].float()), (grad_q[:12] - want[:12]).abs().max()


@pytest.mark.about_devices("spies on the fix-up's calls under the interpreter")
@pytest.mark.parametrize("bad", ["inf", "nan"])
def test_atomic_backward_of_nonfinite_gradients_takes_no_fix_up(monkeypatch, bad):
    # a diverged step (every upstream gradient row holds a NaN or an inf) marks no row: a
    # non-finite term's row sums to NaN or +-inf in float32 as in exact arithmetic (only a finite
    # term beyond BIG_T can overflow a partial sum), so the fix-up returns at once instead of
    # summing every row again; the gradients still meet the contract
    from fastvq import kernels
    from fastvq.kernels import qr_lookup as k

    if not kernels.INTERPRETED:
        pytest.skip("the fix-up's calls are counted under the interpreter")
    calls = []
    real = k._qr_fix_table
    monkeypatch.setattr(k, "_qr_fix_table", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, r, ids, grad = _overflow_batch("cpu", "add")
    with fastvq.backend("triton"):
        fastvq.qr_lookup(ids, q.clone().requires_grad_(), r.clone().requires_grad_(), "add",
                         deterministic=False).backward(grad)
        assert calls, "the spy must see the fix-up of the overflow batch"
        calls.clear()
        g = randn(*grad.shape, seed=31)
        g[:, 1] = float(bad) if bad == "nan" else float("inf") * torch.sign(randn(grad.shape[0], seed=32))
        _check_bag_contract(q, r, ids, "add", None, None, g, torch.float32, deterministic=False)
    assert calls == []


# ------------------------------------------------------------------ mutation round C (mutC): behaviour no test pinned


def test_qr_atomic_fix_up_of_a_row_whose_sum_is_nan():
    # C61: nonfinite_rows (the atomic backward's fix-up: which marked rows to sum again) tested
    # |v| == inf only. A row with big finite terms (marked) and an opposite infinite term sums in
    # float32 to inf + -inf = NaN, where the exact sum is -inf: it must be summed again
    q = torch.ones(1, 2)
    r = torch.ones(1, 2)
    ids = torch.tensor([0, 0, 0])
    g = torch.tensor([[3e38, 1.0], [3e38, 2.0], [float("-inf"), 3.0]])
    for name in ("reference", "triton"):
        with fastvq.backend(name):
            for det in (True, False):
                qq = q.clone().requires_grad_()
                fastvq.qr_lookup(ids, qq, r, "add", deterministic=det).backward(g)
                assert torch.equal(qq.grad, torch.tensor([[float("-inf"), 6.0]])), (name, det, qq.grad)


def test_qr_bf16_bag_just_below_the_overflow_midpoint():
    # C44: the bag forward's float64 redo rounded to nearest at float32 for a bfloat16 table
    # (ODD32 False), then the store rounded again. The qrprobe cases' small term is at least a
    # float32 half-ulp there, so no test saw it. Exact sum bf16max + 2^119 - 2^90: below the
    # overflow midpoint bf16max + 2^119 by less than a float32 half-ulp (2^103): bf16max, not inf
    big = torch.finfo(torch.bfloat16).max
    terms = [big, 2.0**119, -(2.0**90)]
    q = torch.tensor(terms, dtype=torch.bfloat16)[:, None]
    assert q.double().flatten().tolist() == terms
    r = torch.zeros(1, 1, dtype=torch.bfloat16)
    for name in ("reference", "triton"):
        with fastvq.backend(name):
            out = fastvq.qr_lookup(torch.arange(3), q, r, "add", offsets=torch.zeros(1, dtype=torch.long))
        assert out.item() == big, (name, out.item())
