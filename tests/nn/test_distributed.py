"""Data-parallel codebooks under torch.distributed: 2 and 3 CPU ranks on gloo.

One job per world size runs every scenario (starting processes is the cost). Each step, the
ranks split one global batch between them, and the split changes from step to step: even,
uneven, a rank with every row, ranks (rank 0 too) with none, an all-empty step, and NaN rows
on one rank only. The EMA statistics are all-reduced, so every rank holds, bitwise, the same
codebooks, equal to one process that saw the whole batches; random choices (dead-code revival,
k-means starting points) come from a fixed-size exchange of candidate rows that every rank
resolves identically, so the ranks agree even though their random generators do not. A hung
collective fails the test at the timeout instead of hanging CI.
"""


import pytest
import torch

import fastvq
from fastvq import distributed as fdist
from fastvq.nn import ResidualQuantizer, VectorQuantizer
from tests._ranks import on_the_ranks_device, one_process_backend, ranks_fixture, serve, world_cells  # noqa: F401 (autouse)
from tests.utils import assert_close

pytestmark = pytest.mark.about_devices("gloo ranks train on CPU tensors in spawned processes")

D, K, L = 4, 6, 2
ROWS = 24  # rows in each step's global batch
TIMEOUT_S = 120  # the whole job, per world size; a hung collective fails the test instead of CI
WORLDS = (2, 3)

def _runs(world: int) -> list[tuple[str, str]]:
    """(case, backend) pairs each job runs: the interpreted triton backend only at 2 ranks (the
    collectives do not depend on the backend; the interpreter is the slow part)."""
    return [("ema", "reference"), ("random", "reference")] + ([("ema", "triton")] if world == 2 else [])


def _modules(case: str):
    torch.manual_seed(1234)  # the same initial codebooks everywhere
    if case == "ema":
        return {
            "vq": VectorQuantizer(K, D, ema=True),
            "rq": ResidualQuantizer(L, K, D, ema=True),
        }
    # "random": everything that draws random numbers during training. The EMA quantizers'
    # threshold is ROWS: no code's EMA count reaches it, so revival runs at every step with
    # rows (k-means starts from K distinct rows and at 1.0 left no code dead)
    return {
        "vq": VectorQuantizer(K, D, ema=True, dead_code_threshold=float(ROWS), kmeans_init=True, kmeans_iters=3),
        "vq_grad": VectorQuantizer(K, D, dead_code_threshold=1.0, kmeans_init=True, kmeans_iters=3),
        "rq": ResidualQuantizer(L, K, D, ema=True, dead_code_threshold=float(ROWS), kmeans_init=True,
                                kmeans_iters=3),
        "vq_km0": VectorQuantizer(K, D, kmeans_init=True, kmeans_iters=0),  # starting points only
    }


def _cuts(world: int) -> list[list[int]]:
    """Per step, where the global batch is cut between ranks (rank r gets rows cut[r]:cut[r+1])."""
    R = ROWS
    if world == 2:
        steps = [[0, 0, 0], [0, 0, R], [0, R, R], [0, 5, R], [0, 12, R], [0, 19, R]]
    else:
        steps = [[0, 0, 0, 0], [0, 0, 0, R], [0, 3, 3, R], [0, R, R, R], [0, 10, 17, R], [0, 8, 16, R]]
    # step 0: nobody has a row (k-means must wait, EMA must not move); step 1: rank 0 has none
    return steps


def _batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(ROWS, D, generator=g) * 2.0
    x[-3:-1] = float("nan")  # NaN rows, always in the last rank's share
    x[-1, 1] = float("inf")
    return x


def _nonfinite_rows(world: int) -> int:
    """The NaN/inf rows in all the steps' batches (3 in each that has rows)."""
    return sum(3 for cut in _cuts(world) if cut[-1] > 0)


def _train(modules, world: int, rank: int | None, ranks: tuple[int, int] | None = None, steps: int | None = None
           ) -> dict:
    """Train on each step's rows for ``rank`` (all of them for ``rank=None``; those of the ranks
    ``ranks[0]`` to ``ranks[1] - 1`` when given), the first ``steps`` steps (all by default);
    the states, non-persistent counters included."""
    for step, cut in enumerate(_cuts(world)[:steps]):
        x = _batch(step)[: cut[-1]]
        if rank is not None:
            x = x[cut[rank] : cut[rank + 1]]
        elif ranks is not None:
            x = x[cut[ranks[0]] : cut[ranks[1]]]
        for m in modules.values():
            m(x.clone().requires_grad_(True))
    out = {}
    for name, m in modules.items():
        out[name] = {k: v.clone() for k, v in m.state_dict().items()}
        out[name]["nonfinite_rows"] = m.nonfinite_rows.clone()
        if m.codes_revived is not None:
            out[name]["codes_revived"] = m.codes_revived.clone()
    return out


GROUP_STEPS = 3  # steps the lone rank of the process-group scenario trains (the others: all)


def _states(rank: int, world: int) -> dict:
    states = {}
    for case, backend_name in _runs(world):  # one spawn for every scenario
        modules = _modules(case)
        torch.manual_seed(rank)  # the ranks' random streams differ from here on
        with fastvq.backend(backend_name):
            states[case, backend_name] = _train(modules, world, rank)
    if world == 3:  # process groups: ranks 1 and 2 share their codebooks, rank 0 trains alone
        import torch.distributed as dist

        from fastvq.nn._codebook import offer_candidates

        # (every rank makes every group; in the pair, group ranks 0, 1 are global ranks 1, 2)
        pair, alone = dist.new_group([1, 2]), dist.new_group([0])
        for case in ("ema", "random"):
            modules = _modules(case)
            for m in modules.values():
                m.process_group = alone if rank == 0 else pair
            torch.manual_seed(rank)
            with fastvq.backend("reference"):
                # rank 0 stops early: ranks 1 and 2 must not wait for it (fuzzE D1: they synced
                # over every rank, so they hung; given equal steps, they mixed in its rows)
                states["groups", case] = _train(modules, world, rank, steps=GROUP_STEPS if rank == 0 else None)
        if rank > 0:  # the exchange and broadcast_ index the pair by group rank, not global rank
            mine = torch.full((1, 3, D), float(rank))
            states["groups", "offers"] = offer_candidates(mine, 8, group=pair)
            shared = torch.full((2,), float(rank))
            fdist.broadcast_(shared, src=1, group=pair)  # group rank 1: global rank 2
            states["groups", "broadcast"] = shared
    return states


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    serve(rank, world, port, out_dir, TIMEOUT_S, _states)


# one job per world size: (world, each rank's results keyed by (scenario, backend))
ranks = ranks_fixture(_worker, WORLDS, TIMEOUT_S, "ranks")


def _assert_ranks_identical(states: list[dict], what: str) -> None:
    for name in states[0]:
        for key, value in states[0][name].items():
            if value.is_floating_point():
                assert torch.isfinite(value).all(), f"{what}: {name}.{key} is not finite"
            for r, other in enumerate(states[1:], 1):
                assert torch.equal(other[name][key], value), f"{what}: {name}.{key} differs on rank {r}"


@pytest.mark.slow
@world_cells("backend_name", lambda world: [b for case, b in _runs(world) if case == "ema"], WORLDS)
def test_ema_ranks_agree_with_single_process(ranks, backend_name):
    world, rank_states = ranks
    per_rank = [states["ema", backend_name] for states in rank_states]
    _assert_ranks_identical(per_rank, f"ema/{backend_name}")
    with one_process_backend(backend_name):
        single = _train(_modules("ema"), world, None)  # one process, all the rows of every step
    for name, state in single.items():
        for key, value in state.items():
            if value.is_floating_point():
                assert_close(per_rank[0][name][key], value, reduce_len=ROWS, msg=f"{name}.{key}")
            else:
                assert torch.equal(per_rank[0][name][key], value), f"{name}.{key}"
    # every NaN row of the last rank was left out and counted, on every rank
    assert int(per_rank[0]["vq"]["nonfinite_rows"]) == _nonfinite_rows(world) > 0
    # the statistics really were summed: one rank's share alone gives a different state
    with one_process_backend(backend_name):
        alone = _train(_modules("ema"), world, world - 1)
    assert not torch.allclose(alone["vq"]["cluster_size"], single["vq"]["cluster_size"])


@pytest.mark.slow
def test_random_choices_agree_across_ranks(ranks):
    world, rank_states = ranks
    per_rank = [states["random", "reference"] for states in rank_states]
    _assert_ranks_identical(per_rank, "random")
    state = per_rank[0]
    for name in state:
        assert bool(state[name]["initted"]), name  # k-means waited for the first step with rows
    # revival really ran (else this test checks little), equally everywhere
    assert int(state["vq"]["codes_revived"]) > 0 and int(state["rq"]["codes_revived"]) > 0
    assert int(state["vq"]["nonfinite_rows"]) >= _nonfinite_rows(world)  # + what k-means left out


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [3], indirect=True, ids=["world3"])  # (the scenario runs at 3 ranks)
def test_process_groups_keep_their_ranks_apart(ranks):
    world, rank_states = ranks
    ema = [states["groups", "ema"] for states in rank_states]
    _assert_ranks_identical(ema[1:], "groups/ema, ranks 1 and 2")
    _assert_ranks_identical([states["groups", "random"] for states in rank_states[1:]], "groups/random")
    with one_process_backend("reference"):
        pair = _train(_modules("ema"), world, None, ranks=(1, 3))  # the rows of ranks 1 and 2
        alone = _train(_modules("ema"), world, 0, steps=GROUP_STEPS)
    for got, want, what in ((ema[1], pair, "ranks 1 and 2"), (ema[0], alone, "rank 0")):
        for name, state in want.items():
            for key, value in state.items():
                if value.is_floating_point():
                    assert_close(got[name][key], value, reduce_len=ROWS, msg=f"{what}: {name}.{key}")
                else:
                    assert torch.equal(got[name][key], value), f"{what}: {name}.{key}"
    assert not torch.allclose(ema[0]["vq"]["cluster_size"], ema[2]["vq"]["cluster_size"])
    # every valid offer is a row a rank of the pair holds (its rank number in every entry): both
    # ranks' rows, the same on both; the 2 invalid slots (6 rows for 8 offers) are zeros
    (cands, valid), other = rank_states[1]["groups", "offers"], rank_states[2]["groups", "offers"]
    assert torch.equal(cands, other[0]) and torch.equal(valid, other[1])
    assert valid.tolist() == [[True] * 6 + [False] * 2]
    assert sorted(cands[0, :6, 0].tolist()) == [1.0] * 3 + [2.0] * 3
    assert bool((cands[0, :6] == cands[0, :6, :1]).all()) and not cands[0, 6:].any()
    assert rank_states[1]["groups", "broadcast"].tolist() == rank_states[2]["groups", "broadcast"].tolist() == [2.0] * 2


def test_process_group_option():
    import copy
    import pickle

    vq = VectorQuantizer(K, D, ema=True)
    assert vq.process_group is None and ResidualQuantizer(L, K, D, process_group=None).process_group is None
    with pytest.raises(TypeError, match="VectorQuantizer: process_group must be a torch.distributed ProcessGroup"):
        VectorQuantizer(K, D, process_group="world")
    with pytest.raises(TypeError, match="ResidualQuantizer: process_group must be"):
        ResidualQuantizer(L, K, D).process_group = 0
    with pytest.raises(ValueError, match="VectorQuantizer: process_group is torch.distributed's NON_GROUP_MEMBER"):
        vq.process_group = -100  # what dist.new_group returns on a rank outside the group
    assert pickle.loads(pickle.dumps(vq)).process_group is None and copy.deepcopy(vq).process_group is None
    import datetime

    import torch.distributed as dist

    from tests._ranks import free_port

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=30))
    try:
        vq.process_group = group = dist.new_group([0])
        assert copy.deepcopy(vq).process_group is group  # a handle of this process: shared
        with pytest.raises(TypeError, match="process_group is set cannot be pickled"):
            pickle.dumps(vq)
        vq(torch.randn(5, D))  # a one-rank group: trains as one process does
        assert abs(float(vq.cluster_size.sum()) - 5 * (1 - vq.decay)) < 1e-6  # the 5 rows, once
    finally:
        dist.destroy_process_group()


def test_candidate_exchange_without_process_group():
    from fastvq.nn._codebook import offer_candidates

    x = torch.randn(2, 5, 3)
    x[0, 1] = float("nan")
    w = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0])
    cands, valid = offer_candidates(x, 6, w)
    assert cands.shape == (2, 6, 3) and valid.tolist() == [[True] * 3 + [False] * 3, [True] * 4 + [False] * 2]
    for level in range(2):  # valid ones first, distinct rows of weight 1 that are finite
        good = [i for i in range(5) if w[i] and torch.isfinite(x[level, i]).all()]
        picked = [int((x[level] == c).all(-1).nonzero()[0]) for c in cands[level][valid[level]]]
        assert sorted(picked) == good


def test_helpers_are_noops_without_process_group():
    assert not fdist.is_distributed()
    assert fdist.get_rank() == 0 and fdist.get_world_size() == 1
    a, b = torch.arange(3.0), torch.ones(2, 2)
    fdist.all_reduce_sum_(a, b)
    fdist.broadcast_(a, b)
    assert torch.equal(a, torch.arange(3.0)) and torch.equal(b, torch.ones(2, 2))
    assert torch.equal(fdist.all_gather(a), a.unsqueeze(0))
