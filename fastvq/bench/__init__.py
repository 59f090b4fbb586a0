"""`python -m fastvq bench`: every op and training step against eager torch, torch.compile and the roofline.

:mod:`fastvq.bench.registry` holds the row groups (and says how to add one);
:mod:`fastvq.bench.cases` registers the op rows, :mod:`fastvq.bench.steps` the training-step
rows; :mod:`fastvq.bench.harness` times, tabulates, writes JSON/markdown and plots. The harness
and the row modules do not import each other: both import the registry.
"""

from .harness import run_bench  # noqa: F401
from .registry import Case, register  # noqa: F401
