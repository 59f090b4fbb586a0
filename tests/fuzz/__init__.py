"""Fuzz suite of fastvq (issue 9, item 5): every public op and module against float64.

Each property draws small descriptions of its inputs with hypothesis (``_gen.TSpec``: shape,
dtype, magnitude 1e-30 .. 1e30, layout, NaN/inf/largest-finite placements, exact duplicates,
a seed), builds them on the host, runs the op under each backend (the ``backend`` fixture) on
the ``device`` fixture's device, and checks the result against a float64 computation written
from the op's docstring (``_oracle``), within the rounding bounds of ``fastvq.testing``
(``_bounds``). The numeric contract it asserts is spelled out in ``_oracle``'s docstring.

Running it::

    python -m pytest tests/fuzz                              # CI: derandomized, same examples everywhere
    FASTVQ_FUZZ_SCALE=10 python -m pytest tests/fuzz         # ten times the examples
    FASTVQ_FUZZ_SHRINK=1 python -m pytest tests/fuzz -k nearest_code   # shrink a failure to a minimal one
    python -m tests.fuzz.explore -k nearest_code             # every distinct failure, not just the first

A falsifying example prints as ``TSpec(...)`` values: ``TSpec(...).build(device)`` rebuilds the
exact tensor.
"""
