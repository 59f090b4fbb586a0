"""No search op allocates an N x K buffer (issue 10: the allocation spy on the CPU).

The modules' training steps are held to it in tests/nn/test_training_step.py and
tests/nn/test_syncprobe.py; here every search op is, on both backends and every metric: its
largest tensor (the meter's allocation spy, in elements) must be codebook- or row-sized. N and K
are chosen so that K x (D + 2) and N x k stay far below N x K / 4. The references (the oracle and
the CPU path) work through rows in chunks of a fixed scratch budget
(fastvq/reference/_chunks.py), lowered here so that a chunk is 8 rows: their largest tensor
is held to that budget.
"""

import pytest

import fastvq
from fastvq._names import METRICS
from fastvq.bench.traffic import measure
from tests.utils import randn

N, K, D = 192, 1024, 4


CASES = [(op, metric) for op in ("nearest_code", "topk_codes", "sample_code") for metric in METRICS]
CASES += [("mine_negatives", "l2")]  # (it searches l2)


@pytest.mark.parametrize("op, metric", CASES, ids=[f"{op}-{metric}" for op, metric in CASES])
def test_search_ops_allocate_nothing_n_by_k(monkeypatch, backend, device, op, metric):
    x, cb = randn(N, D, seed=1, device=device), randn(K, D, seed=2, device=device)
    call = {
        "nearest_code": lambda: fastvq.nearest_code(x, cb, metric=metric),
        "topk_codes": lambda: fastvq.topk_codes(x, cb, 8, metric=metric),
        "sample_code": lambda: fastvq.sample_code(x, cb, 0.5, metric=metric, seed=3),
        "mine_negatives": lambda: fastvq.mine_negatives(x, x.flip(0), cb, strategy="semi-hard"),
    }[op]
    budget = 8 * K
    monkeypatch.setattr("fastvq.reference._chunks.ROW_CHUNK_ELEMENTS", budget)
    t = measure(lambda meter: call(), N * D * 4, warmup=0)
    bound = N * K // 4 if backend == "triton" else budget
    assert 0 < t.largest_alloc <= bound, (t.largest_alloc, bound, N * K)
