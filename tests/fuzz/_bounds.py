"""Rounding bounds of the fuzz suite (local until ``fastvq.testing`` lands on this branch).

All bounds are a-priori error bounds of float32 arithmetic, computed in float64 from the
inputs' magnitudes, so they hold at every scale (1e-30 .. 1e30), not only near 1:

* a length-``n`` dot product / sum accumulated in float32 errs by at most
  ``gamma(n) * sum |a_i b_i|`` with ``gamma(n) = (n + 8) * U`` (``U = 2**-22``: twice fp32's
  unit roundoff, for tensor cores whose fp32 accumulation truncates; ``+ 8`` covers the few
  adds/multiplies of the epilogue);
* on a GPU, subnormal results may be flushed to zero, so every fp32 operation may also lose
  an absolute ``TINY = 2**-126``.

A distance is *representable* when its float64 value rounds to a finite float32 that is not
lost in the absolute ``TINY`` slack; the contract asks for the exact argmin only there.
"""

from __future__ import annotations

import math

import torch

U = 2.0**-22
TINY = 2.0**-126
F32_MAX = float(torch.finfo(torch.float32).max)
# unit roundoff of a final cast to the output dtype
UNIT = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float64: 2.0**-53}
DTYPE_MAX = {dt: float(torch.finfo(dt).max) for dt in UNIT}


def gamma(n: int) -> float:
    """Relative error bound of an fp32 reduction of length ``n`` (plus a small epilogue)."""
    return (n + 8) * U


def abs_slack(n: int) -> float:
    """Absolute error bound of ``n`` fp32 operations near the underflow threshold."""
    return (3 * n + 8) * TINY


def round_to(t64: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """IEEE round-to-nearest of float64 values into ``dtype`` (overflow gives +-inf), as float64."""
    return t64.to(dtype).double()
