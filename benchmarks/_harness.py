"""pytest-benchmark front end over :mod:`fastvq.bench.cases` (the same cases and providers as
`python -m fastvq bench`). Run: ``pytest benchmarks/ --benchmark-only`` (add
``--benchmark-json=benchmarks/results/NAME.json`` to keep the numbers).

On CUDA the full shapes run and each call is synchronised; without CUDA the small shapes run
and the ``fastvq`` provider is skipped (interpreted kernels measure nothing useful).
"""

import pytest
import torch

from fastvq.bench.cases import CASE_BUILDERS

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"


def bench_op(op: str):
    cases = CASE_BUILDERS[op](DEVICE, quick=not CUDA)
    params = []
    for case in cases:
        for provider in [*case.providers, *case.peers]:
            params.append(pytest.param(case, provider, id=f"{case.label}-{provider}"))

    @pytest.mark.parametrize("case,provider", params)
    def test(benchmark, case, provider):
        if provider in case.skip:
            pytest.skip(case.skip[provider])
        if provider == "fastvq" and not CUDA:
            pytest.skip("no CUDA: the Triton kernels would only be interpreted")
        fn = {**case.providers, **case.peers}[provider]
        inputs = case.make(DEVICE)
        benchmark.extra_info.update(op=case.op, shape=case.shape, dtype=str(case.dtype), provider=provider,
                                    device=torch.cuda.get_device_name() if CUDA else "cpu")

        def call():
            out = fn(*inputs)
            if CUDA:
                torch.cuda.synchronize()
            return out

        benchmark(call)

    test.__name__ = f"test_bench_{op}"
    return test
