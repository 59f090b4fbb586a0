"""Rounding bounds of the fuzz suite, from :mod:`fastvq.testing` (the one tolerance module).

All bounds are a-priori error bounds of float32 arithmetic, computed in float64 from the
inputs' magnitudes, so they hold at every scale (1e-30 .. 1e30), not only near 1:

* a length-``n`` dot product / sum accumulated in float32 errs by at most
  ``gamma(n) * sum |a_i b_i|``, with ``gamma(n) = FACTOR * gamma_{n+8}(u_fp32)``
  (``fastvq.testing.ACCUMULATION_FACTOR`` for tensor cores' truncating accumulation, ``+ 8``
  for the few operations of an epilogue: ``|x|^2 + |c|^2 - 2 x.c``, a scale, a division);
* every fp32 operation may also lose an absolute half subnormal spacing (``abs_slack``);
* the store into the output dtype adds ``fastvq.testing.OUTPUT_ROUNDING`` units of roundoff
  (``UNIT`` is fastvq.testing's table).

A distance is *representable* when its float64 value rounds to a finite float32; the contract
asks for the exact argmin only there (see _oracle.py).
"""

from __future__ import annotations

import torch

import fastvq.testing as ft

FACTOR = ft.ACCUMULATION_FACTOR
OUTPUT_ROUNDING = ft.OUTPUT_ROUNDING
UNIT = {dt: ft.unit_roundoff(dt) for dt in (torch.float64, torch.float32, torch.float16, torch.bfloat16)}
U = FACTOR * UNIT[torch.float32]  # one fp32 rounding, with the accumulation slack
F32_MAX = float(torch.finfo(torch.float32).max)
SUBNORMAL32 = float(torch.finfo(torch.float32).tiny * torch.finfo(torch.float32).eps)


def gamma(n: int) -> float:
    """Relative error bound of an fp32 reduction of length ``n`` plus a small epilogue."""
    return FACTOR * ft.gamma(n + 8, UNIT[torch.float32])


def abs_slack(n: int) -> float:
    """Absolute error of ``n``-ish fp32 operations near the underflow threshold."""
    return (3 * n + 8) * SUBNORMAL32
