import math

import pytest
import torch

import fastvq
from fastvq.reference.qr_lookup import qr_lookup_ref
from tests.utils import assert_close, generator, noncontiguous, randn

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
    # one float32 add/multiply/copy per element, one rounding: bit-exact with the reference.
    # Except: Triton 3.8's interpreter truncates float32 -> bfloat16 (a GPU rounds to nearest even).
    if backend == "triton" and dtype == torch.bfloat16 and _interpreted():
        return
    assert torch.equal(out, qr_lookup_ref(ids, qw, rw, op))
    assert torch.equal(out, _py_lookup(ids, qw, rw, op, torch.float32).to(dtype))


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
    with pytest.raises(err, match=f"qr_lookup.*{match}"):
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
                torch.library.opcheck(
                    torch.ops.fastvq.qr_lookup_bwd.default,
                    (g, ids, qw.detach(), rw.detach(), op, None, "sum", None, True, True, True),
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
                    torch.ops.fastvq.qr_lookup_bwd_sparse.default,
                    (randn(9, 5), ids, qw, rw, "add", None, "sum", None, need_q, need_r),
                )


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
        for t, r in zip(outs["triton"], outs["reference"]):
            assert_close(t, r, dtype, reduce_len=N)
