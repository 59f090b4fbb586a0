"""`python -m fastvq bench`: every op against eager torch, torch.compile and the roofline.

:mod:`fastvq.bench.harness` times and reports; :mod:`fastvq.bench.cases` says, per op, which
shapes run, what each provider calls and which ceiling (matmul or copy) the op is held to.
"""

from .harness import run_bench  # noqa: F401
