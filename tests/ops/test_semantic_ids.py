import pytest
import torch

import fastvq
from tests.utils import count_kernel_launches, generator


def _brute_force(codes):
    """O(N^2) oracle: the number of earlier rows with the same codes."""
    rows = [tuple(r) for r in codes.tolist()]
    level = [sum(rows[j] == rows[i] for j in range(i)) for i in range(len(rows))]
    return torch.cat([codes.long(), torch.tensor(level, dtype=torch.int64).reshape(-1, 1)], dim=1)


def _codes(n, depth, high, dtype=torch.int64, low=0):
    return torch.randint(low, high, (n, depth)).to(dtype)


CASES = [  # (N, L, codes in [0, high))
    pytest.param(0, 3, 4, id="N0"),
    pytest.param(1, 3, 4, id="N1"),
    pytest.param(1, 1, 4, id="N1-L1"),
    pytest.param(60, 1, 3, id="N60-L1-many-collisions"),
    pytest.param(127, 3, 2, id="N127-L3-K2"),
    pytest.param(300, 4, 3, id="N300-L4-K3"),
    pytest.param(100, 2, 1000, id="N100-L2-K1000-few-collisions"),
    pytest.param(40, 1, 1, id="N40-all-equal"),
    pytest.param(9, 0, 1, id="L0"),
    pytest.param(33, 20, 2, id="L20"),
]


@pytest.mark.parametrize("N,L,high", CASES)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8], ids=str)
def test_matches_brute_force(backend, N, L, high, dtype):
    codes = _codes(N, L, high, dtype)
    out = fastvq.semantic_ids(codes)
    assert out.dtype == torch.int64 and out.shape == (N, L + 1)
    assert torch.equal(out, _brute_force(codes))
    if N:
        assert torch.unique(out, dim=0).shape[0] == N, "ids are not unique"


def test_seed_example(backend):
    out = fastvq.semantic_ids(torch.tensor([[1, 2], [0, 2], [1, 2], [1, 2]]))
    assert out.tolist() == [[1, 2, 0], [0, 2, 0], [1, 2, 1], [1, 2, 2]]


def test_negative_and_int16_codes(backend):
    codes = _codes(80, 2, 2, torch.int16, low=-2)
    assert torch.equal(fastvq.semantic_ids(codes), _brute_force(codes))


def test_noncontiguous(backend):
    codes = _codes(70, 6, 2)
    for view in (codes[:, ::2], codes.T.contiguous().T, codes[::3]):
        assert torch.equal(fastvq.semantic_ids(view), _brute_force(view))


def test_large_input_agrees_across_backends():
    codes = _codes(5000, 3, 6)  # ~23 items per code row
    with fastvq.backend("reference"):
        ref = fastvq.semantic_ids(codes)
    with fastvq.backend("triton"):
        tri = fastvq.semantic_ids(codes)
    assert torch.equal(ref, tri)
    assert torch.unique(ref, dim=0).shape[0] == 5000


@pytest.mark.parametrize("N,L,high", [(0, 2, 3), (1, 2, 3), (50, 2, 3), (64, 3, 1000), (20, 1, 1)],
                         ids=["N0", "N1", "N50", "no-collisions", "all-equal"])
def test_stats(backend, N, L, high):
    codes = _codes(N, L, high)
    s = fastvq.semantic_id_stats(codes)
    rows = [tuple(r) for r in codes.tolist()]
    sizes = {r: rows.count(r) for r in set(rows)}
    assert s.num_items == N and s.num_unique == len(sizes)
    assert s.collision_rate == pytest.approx((N - len(sizes)) / N if N else 0.0)
    assert s.max_group_size == max(sizes.values(), default=0)
    assert s.max_collisions == max(sizes.values(), default=1) - 1
    assert isinstance(s.num_unique, int) and isinstance(s.collision_rate, float)


def test_stats_known():
    s = fastvq.semantic_id_stats(torch.tensor([[1, 2], [0, 2], [1, 2], [1, 2]]))
    assert s == fastvq.SemanticIdStats(num_items=4, num_unique=2, collision_rate=0.5, max_group_size=3, max_collisions=2,
                                       has_collision_level=False)


def _seeded_codes(n, depth, high, seed):
    return torch.randint(0, high, (n, depth), generator=generator(seed))


@pytest.mark.parametrize("N,L,high", [(200, 3, 3), (64, 2, 1), (50, 4, 1000), (0, 2, 3)],
                         ids=["collisions", "all-equal", "few-collisions", "N0"])
def test_stats_of_semantic_ids_are_those_of_the_codes(backend, N, L, high):
    codes = _seeded_codes(N, L, high, seed=N + L)
    raw = fastvq.semantic_id_stats(codes, collision_level=False)
    ids = fastvq.semantic_ids(codes)
    auto, told = fastvq.semantic_id_stats(ids), fastvq.semantic_id_stats(ids, collision_level=True)
    want = {k: v for k, v in vars(raw).items() if k != "has_collision_level"}
    for got in (auto, told):
        assert {k: v for k, v in vars(got).items() if k != "has_collision_level"} == want
        assert got.has_collision_level
    # read as plain codes, the rows with their collision level are all distinct
    plain = fastvq.semantic_id_stats(ids, collision_level=False)
    assert plain.num_unique == N and plain.max_collisions == 0 and not plain.has_collision_level


def _stats_oracle(codes):
    """The statistics of the rows of ``codes``, counted in Python."""
    counts = {}
    for row in codes.tolist():
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    n, unique, big = codes.shape[0], len(counts), max(counts.values(), default=0)
    return dict(num_items=n, num_unique=unique, collision_rate=(n - unique) / n if n else 0.0,
                max_group_size=big, max_collisions=max(big - 1, 0))


def test_stats_of_a_shuffled_or_subset_id_table(backend):
    # probe3 R9: the level was recognised only in the order semantic_ids wrote it; a shuffled
    # loader or a split of the table was read as plain codes (0 collisions: issue 9's symptom),
    # and collision_level=True refused it
    codes = _seeded_codes(300, 2, 4, seed=5)
    ids = fastvq.semantic_ids(codes)
    perm = torch.randperm(300, generator=generator())
    for name, rows in (("shuffled", perm), ("reversed", torch.arange(299, -1, -1))):
        got = fastvq.semantic_id_stats(ids[rows])
        assert got.has_collision_level, name
        assert {k: v for k, v in vars(got).items() if k != "has_collision_level"} == _stats_oracle(codes), name
    split = perm[:120]  # a split holds some items of a group, not always the first
    assert not fastvq.semantic_id_stats(ids[split]).has_collision_level  # ambiguous: read as codes ...
    got = fastvq.semantic_id_stats(ids[split], collision_level=True)  # ... unless told
    assert got.has_collision_level
    assert {k: v for k, v in vars(got).items() if k != "has_collision_level"} == _stats_oracle(codes[split])
    with pytest.raises(ValueError, match="must be >= 0 and make every row distinct"):
        fastvq.semantic_id_stats(torch.cat([ids[split], ids[split[:1]]]), collision_level=True)  # a repeated row
    bad = ids[split].clone()
    bad[0, -1] = -1
    with pytest.raises(ValueError, match="must be >= 0"):
        fastvq.semantic_id_stats(bad, collision_level=True)


def test_stats_of_rqvae_semantic_ids_report_real_collisions():
    torch.manual_seed(0)
    model = fastvq.nn.RQVAE(input_dim=8, hidden_dim=16, latent_dim=4, num_quantizers=2, num_embeddings=3)
    x = torch.randn(300, 8)
    codes = model.semantic_ids(x, progress=False, with_collision_level=False)
    stats = fastvq.semantic_id_stats(model.semantic_ids(x, progress=False))
    assert stats.has_collision_level and stats.num_items == 300
    assert stats.num_unique == torch.unique(codes, dim=0).shape[0] < 300  # 9 possible code rows
    assert stats == fastvq.semantic_id_stats(codes).__class__(**{**vars(fastvq.semantic_id_stats(codes)),
                                                                 "has_collision_level": True})


def test_raw_codes_are_not_taken_for_a_collision_level(backend):
    codes = torch.tensor([[1, 2], [0, 2], [1, 2], [1, 2]])
    assert not fastvq.semantic_id_stats(codes).has_collision_level
    with pytest.raises(ValueError, match="semantic_id_stats: collision_level=True, but the last column"):
        fastvq.semantic_id_stats(codes, collision_level=True)
    with pytest.raises(ValueError, match="semantic_id_stats: collision_level=True needs a last column"):
        fastvq.semantic_id_stats(codes[:, :0], collision_level=True)
    with pytest.raises(TypeError, match="semantic_id_stats: collision_level must be True or False"):
        fastvq.semantic_id_stats(codes, collision_level="yes")


@pytest.mark.parametrize(
    "codes,err",
    [
        (torch.tensor([1, 2, 3]), ValueError),
        (torch.zeros(2, 3, 4, dtype=torch.int64), ValueError),
        (torch.rand(4, 2), TypeError),
        (torch.ones(4, 2, dtype=torch.bool), TypeError),
        ([[1, 2]], TypeError),
    ],
    ids=["1D", "3D", "float", "bool", "not-tensor"],
)
@pytest.mark.parametrize("fn", ["semantic_ids", "semantic_id_stats"])
def test_bad_input(codes, err, fn):
    with pytest.raises(err, match=fn):
        getattr(fastvq, fn)(codes)


def test_opcheck():
    codes = _codes(40, 3, 2)
    for name in ("reference", "triton"):
        with fastvq.backend(name):
            torch.library.opcheck(torch.ops.fastvq.semantic_ids.default, (codes,))
            torch.library.opcheck(torch.ops.fastvq.semantic_ids.default, (codes[:0].int(),))


@pytest.mark.gpu
def test_large_gpu():
    codes = torch.randint(0, 16, (1 << 20, 3))
    with fastvq.backend("triton"):
        tri = fastvq.semantic_ids(codes)
    with fastvq.backend("reference"):
        ref = fastvq.semantic_ids(codes)
    assert torch.equal(tri, ref)


def test_compile_fullgraph(backend):
    codes = _codes(20, 2, 3)
    compiled = torch.compile(fastvq.semantic_ids, fullgraph=True, backend="eager")
    assert torch.equal(compiled(codes), _brute_force(codes))



@pytest.mark.parametrize("name", ["reference", "triton"])
def test_triton_backend_really_launches_kernels(monkeypatch, name):
    from fastvq.kernels import semantic_ids as kmod

    launched = count_kernel_launches(monkeypatch, kmod, "_semantic_ids_fwd_kernel")
    with fastvq.backend(name):
        (fastvq.semantic_ids(torch.tensor([[1, 2], [1, 2]])), fastvq.semantic_id_stats(torch.tensor([[1, 2], [1, 2]])))
    # semantic_id_stats: one launch for the level of all columns (are the rows distinct?); they are
    # not, so the last column is a code and that level gives the statistics
    assert launched == (["_semantic_ids_fwd_kernel"] * 2 if name == "triton" else [])


@pytest.mark.about_devices("compares against a host-side oracle or exercises a specific device")
@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8], ids=str)
def test_extreme_code_values(backend, device, dtype):
    # the dtype's whole range, extremes included (uint8 255 is not -1): codes are copied, never wrapped
    info = torch.iinfo(dtype)
    vals = torch.tensor([info.min, info.max, 0, info.max, info.min], dtype=torch.int64)
    codes = torch.stack([vals, vals.flip(0)], dim=1).to(dtype)
    codes = torch.cat([codes, codes[:2]]).to(device)
    out = fastvq.semantic_ids(codes)
    assert torch.equal(out.cpu(), _brute_force(codes.cpu()))
    assert out[:, :2].tolist() == codes.long().tolist()
