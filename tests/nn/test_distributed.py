"""EMA codebooks under torch.distributed: 2 CPU ranks on gloo.

Each rank trains on its half of every batch; the EMA statistics are all-reduced, so after
several steps both ranks hold the same codebooks, equal to one process that saw the whole
batches. Random choices (dead-code re-seeding, k-means starting points) are rank 0's,
broadcast, so the ranks agree even when their random generators do not.
"""

import datetime
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import fastvq
from fastvq import distributed as fdist
from fastvq.nn import ResidualQuantizer, VectorQuantizer
from tests.utils import assert_close

pytestmark = pytest.mark.about_devices("gloo ranks train on CPU tensors in spawned processes")

WORLD = 2
STEPS = 4
N_PER_RANK, D, K, L = 12, 4, 6, 2
TIMEOUT_S = 90  # a hung collective fails the test instead of the CI job


def _modules(case: str):
    torch.manual_seed(1234)  # the same initial codebooks everywhere
    if case == "ema":
        return {
            "vq": VectorQuantizer(K, D, ema=True),
            "rq": ResidualQuantizer(L, K, D, ema=True),
        }
    return {  # "random": everything that draws random numbers during training
        "vq": VectorQuantizer(K, D, ema=True, dead_code_threshold=1.0, kmeans_init=True, kmeans_iters=3),
        "vq_grad": VectorQuantizer(K, D, dead_code_threshold=1.0, kmeans_init=True, kmeans_iters=3),
        "rq": ResidualQuantizer(L, K, D, ema=True, dead_code_threshold=1.0, kmeans_init=True, kmeans_iters=3),
        "vq_km0": VectorQuantizer(K, D, kmeans_init=True, kmeans_iters=0),  # starting points only
    }


def _batch(step: int) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(100 + step)
    return torch.randn(WORLD * N_PER_RANK, D, generator=g) * 2.0


def _train(modules, rows: slice) -> dict:
    for step in range(STEPS):
        x = _batch(step)[rows]
        for m in modules.values():
            m(x.clone().requires_grad_(True))
    return {name: {k: v.clone() for k, v in m.state_dict().items()} for name, m in modules.items()}


# (case, backend). The ranks hold CPU tensors: the triton run needs the interpreter, so it runs where CI runs
# (no CUDA); on a GPU machine the kernels are exercised by every other test instead.
RUNS = [("ema", "reference"), ("ema", "triton"), ("random", "reference")]
if torch.cuda.is_available():
    RUNS.remove(("ema", "triton"))


def _worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=TIMEOUT_S // 2),
    )
    # count the codes re-seeded, so the test knows the random path really ran
    from fastvq.nn import _codebook

    reseeded = []
    real_expire = _codebook.expire_dead_codes_

    def counting_expire(*args, **kwargs):
        n = real_expire(*args, **kwargs)
        reseeded.append(n)
        return n

    _codebook.expire_dead_codes_ = counting_expire
    try:
        states = {}
        for case, backend_name in RUNS:  # one spawn for every run: starting processes is the cost
            modules = _modules(case)
            torch.manual_seed(rank)  # the ranks' random streams differ from here on
            reseeded.clear()
            with fastvq.backend(backend_name):
                states[case, backend_name] = _train(modules, slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK))
            states[case, backend_name]["num_reseeded"] = sum(reseeded)
        torch.save(states, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def rank_states(tmp_path_factory) -> list[dict]:
    """Run the 2-rank job once for all tests here; each rank's states, keyed by (case, backend)."""
    out_dir = tmp_path_factory.mktemp("ranks")
    ctx = mp.start_processes(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers did not finish within {TIMEOUT_S} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.slow
@pytest.mark.parametrize("backend_name", [b for c, b in RUNS if c == "ema"])
def test_ema_ranks_agree_with_single_process(rank_states, backend_name):
    ranks = [{k: v for k, v in states["ema", backend_name].items() if k != "num_reseeded"} for states in rank_states]
    with fastvq.backend(backend_name):
        single = _train(_modules("ema"), slice(None))  # one process, both halves of every batch
    for name, state in single.items():
        for key, value in state.items():
            assert torch.equal(ranks[0][name][key], ranks[1][name][key]), f"{name}.{key} differs across ranks"
            assert_close(ranks[0][name][key], value, reduce_len=WORLD * N_PER_RANK, msg=f"{name}.{key}")
    # the statistics really were summed: one rank's half alone gives a different state
    alone = _train(_modules("ema"), slice(0, N_PER_RANK))
    for name in single:
        assert not torch.allclose(alone[name]["cluster_size"], single[name]["cluster_size"])


@pytest.mark.slow
def test_random_choices_agree_across_ranks(rank_states):
    ranks = [dict(states["random", "reference"]) for states in rank_states]
    num_reseeded = [r.pop("num_reseeded") for r in ranks]
    # the dead-code path must really have run (else this test checks little), equally everywhere
    assert num_reseeded[0] > 0 and num_reseeded[0] == num_reseeded[1], num_reseeded
    for name in ranks[0]:
        for key, value in ranks[0][name].items():
            assert torch.equal(value, ranks[1][name][key]), f"{name}.{key} differs across ranks"
        assert bool(ranks[0][name]["initted"])


def test_helpers_are_noops_without_process_group():
    assert not fdist.is_distributed()
    assert fdist.get_rank() == 0 and fdist.get_world_size() == 1
    a, b = torch.arange(3.0), torch.ones(2, 2)
    fdist.all_reduce_sum_(a, b)
    fdist.broadcast_(a, b)
    assert torch.equal(a, torch.arange(3.0)) and torch.equal(b, torch.ones(2, 2))
