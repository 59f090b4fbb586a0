import math

import pytest
import torch
from torch import nn

import fastvq
from tests.utils import assert_close


class SeedQREmbedding(nn.Module):
    """The seed's module (docs 000), re-typed: two int(sqrt(n))-row tables, ids wrapped mod div^2."""

    def __init__(self, num_embeddings, emb_dim, sparse=False):
        super().__init__()
        self._div = int(math.sqrt(num_embeddings))
        self._num_embeddings = self._div * self._div
        self._emb_q = nn.Embedding(self._div, emb_dim, sparse=sparse)
        self._emb_r = nn.Embedding(self._div, emb_dim, sparse=sparse)

    def forward(self, x):
        x = torch.remainder(x, self._num_embeddings)
        q = torch.div(x, self._div, rounding_mode="floor").long()
        r = torch.remainder(x, self._div).long()
        return self._emb_q(q) + self._emb_r(r)


def test_seed_checkpoint_loads_and_matches(backend):
    seed = SeedQREmbedding(1000, 16)
    ours = fastvq.nn.QREmbedding(1000, 16)
    assert set(ours.state_dict()) == {"_emb_q.weight", "_emb_r.weight"}
    ours.load_state_dict(seed.state_dict())
    x = torch.cat([torch.arange(-40, 1100), torch.tensor([2**40 + 3, -(2**50)])]).reshape(2, -1)
    assert torch.equal(ours(x), seed(x))
    # and the gradients agree
    g = torch.randn(*x.shape, 16)
    seed(x).backward(g)
    ours(x).backward(g)
    assert_close(ours._emb_q.weight.grad, seed._emb_q.weight.grad, torch.float32, reduce_len=x.numel())
    assert_close(ours._emb_r.weight.grad, seed._emb_r.weight.grad, torch.float32, reduce_len=x.numel())


@pytest.mark.parametrize("n,c", [(1000, 7), (10, 10), (10, 1), (97, 32)])
def test_dlrm_split(backend, n, c):
    emb = fastvq.nn.QREmbedding(n, 4, num_collisions=c, op="mult")
    assert emb._emb_q.weight.shape == (math.ceil(n / c), 4) and emb._emb_r.weight.shape == (c, 4)
    ids = torch.arange(n)
    expected = emb._emb_q.weight[ids // c] * emb._emb_r.weight[ids % c]
    assert torch.equal(emb(ids), expected)


def test_concat_widths(backend):
    emb = fastvq.nn.QREmbedding(100, 9, op="concat")
    assert emb._emb_q.weight.shape == (10, 4) and emb._emb_r.weight.shape == (10, 5)
    assert emb(torch.tensor([3, 55])).shape == (2, 9)
    emb2 = fastvq.nn.QREmbedding(100, (3, 6), op="concat")
    assert emb2.embedding_dim == 9 and emb2(torch.tensor([1])).shape == (1, 9)


def test_bag_forward(backend):
    emb = fastvq.nn.QREmbedding(64, 5, op="mult", mode="mean")
    ids, offsets = torch.tensor([1, 9, 63, 64, 2]), torch.tensor([0, 2, 2])
    out = emb(ids, offsets)
    items = emb(ids)
    assert_close(out, torch.stack([items[:2].mean(0), torch.zeros(5), items[2:].mean(0)]), torch.float32)


@pytest.mark.parametrize("opt_name", ["SparseAdam", "Adagrad"])
def test_sparse_training_step_changes_only_touched_rows(backend, opt_name):
    torch.manual_seed(0)
    emb = fastvq.nn.QREmbedding(400, 6, sparse=True)  # 20 x 20 tables
    opt = getattr(torch.optim, opt_name)(emb.parameters(), lr=0.1)
    ids = torch.tensor([[3, 45, 399], [401, 3, 250]])  # 401 wraps to 1
    before_q, before_r = emb._emb_q.weight.detach().clone(), emb._emb_r.weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        loss = emb(ids).square().sum()
        loss.backward()
        assert emb._emb_q.weight.grad.layout == torch.sparse_coo
        opt.step()
    h = torch.remainder(ids.reshape(-1), 400)
    for w, before, rows in ((emb._emb_q.weight, before_q, h // 20), (emb._emb_r.weight, before_r, h % 20)):
        touched = torch.zeros(20, dtype=torch.bool)
        touched[rows] = True
        changed = (w.detach() != before).any(1)
        assert torch.equal(changed, touched)


def test_sparse_matches_dense_step(backend):
    torch.manual_seed(1)
    dense, sparse = fastvq.nn.QREmbedding(50, 3), fastvq.nn.QREmbedding(50, 3, sparse=True)
    sparse.load_state_dict(dense.state_dict())
    ids = torch.tensor([0, 7, 7, 49, 23])
    dense(ids).pow(3).sum().backward()
    sparse(ids).pow(3).sum().backward()
    for d, s in ((dense._emb_q, sparse._emb_q), (dense._emb_r, sparse._emb_r)):
        assert_close(s.weight.grad.to_dense(), d.weight.grad, torch.float32)


@pytest.mark.parametrize(
    "args,kwargs,err",
    [((0, 4), {}, ValueError), ((10, 4), {"op": "sub"}, ValueError), ((10, 4), {"num_collisions": 0}, ValueError),
     ((10, (2, 3)), {}, ValueError), ((10, 4), {"mode": "max"}, ValueError), ((10, 0), {}, ValueError),
     ((True, 4), {}, TypeError), ((100, 4.5), {}, ValueError), ((100.5, 4), {}, ValueError),
     ((100, True), {}, TypeError), ((100, "4"), {}, TypeError), ((float("inf"), 4), {}, ValueError),
     ((100, 4), {"num_collisions": 2.5}, ValueError), ((100, 4), {"num_collisions": False}, TypeError),
     ((100, (2, 1.5)), {"op": "concat"}, ValueError), ((100, 1), {"op": "concat"}, ValueError),
     ((100, 4), {"op": 1}, TypeError), ((100, 4), {"sparse": "yes"}, TypeError),
     ((100, 4), {"deterministic": None}, TypeError)],
    ids=["n0", "op", "collisions0", "pair-without-concat", "mode", "dim0", "n-bool", "dim-nonintegral",
         "n-nonintegral", "dim-bool", "dim-str", "n-inf", "collisions-nonintegral", "collisions-bool",
         "pair-nonintegral", "concat-dim1", "op-int", "sparse-str", "deterministic-None"],
)
def test_bad_construction(args, kwargs, err):
    with pytest.raises(err, match="QREmbedding"):
        fastvq.nn.QREmbedding(*args, **kwargs)


def test_integral_float_sizes_are_accepted():
    emb = fastvq.nn.QREmbedding(1e6, 32.0, num_collisions=4.0)
    assert emb.num_embeddings == 10**6 and emb.embedding_dim == 32 and emb._emb_r.num_embeddings == 4


@pytest.mark.about_devices("compares against a host-side oracle or exercises a specific device")
def test_training_step_traffic_meets_issue_10_target(monkeypatch):
    # QREmbedding(1M, 32) with 4096 ids (counted at 1/8 of the named sizes: same passes): glue plus
    # one pass per kernel tensor argument <= 5.5 (6.4 before), no host sync (2 before), one sort
    from fastvq.bench import traffic

    # counted as users run it: the suite's NaN poisoning of torch.empty is a write the meter sees
    monkeypatch.setattr(torch, "empty", torch._C._VariableFunctions.empty)
    monkeypatch.setattr(torch, "empty_like", torch._C._VariableFunctions.empty_like)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = traffic.run_case(traffic.find_case("QREmbedding(1M, 32), 4096 ids"), device, traffic.default_scale(device))
    assert t.total_passes <= 5.5, (t.total_passes, t.top_glue())
    assert t.syncs == 0, dict(t.sync_ops())
    assert t.launches == 3, dict(t.kernels())
    assert list(t.top_glue(10)) == [("sort", pytest.approx(0.25, abs=0.01))]
