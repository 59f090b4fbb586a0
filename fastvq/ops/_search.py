"""What the search ops (nearest_code, topk_codes, sample_code, mine_negatives, pairwise_sqdist)
share: the metric names and the numeric contract. The one place the metric names are defined;
kernels keep only their internal name -> id mapping.
"""

from __future__ import annotations

import numbers

#: Distance metrics of the search ops. ``"l2"``: squared Euclidean ``|x - c|^2``;
#: ``"euclidean"``: ``|x - c|`` (same order as l2); ``"cosine"``: ``1 - cos(x, c)`` (a zero
#: vector has cosine 0 with anything, so distance 1); ``"dot"``: ``-<x, c>`` (the nearest code is
#: the one with the largest inner product).
METRICS = ("l2", "cosine", "dot", "euclidean")

NUMERIC_CONTRACT = """\
Numeric contract (every search op, both backends, float32/float16/bfloat16 inputs):
distances are computed in float32 and never made up. The returned distance is the distance
from the row to the returned code, computed directly from the two vectors and rounded once:
NaN exactly where that distance is NaN (a NaN entry; inf - inf), +inf where it overflows
float32 (dot: -inf where <x, c> overflows), never 0 or another finite stand-in; l2 >= 0 and
cosine in [0, 2] at every magnitude (rows and codes are scaled by powers of two before they are
squared or normalised). Indices always lie in [0, K). A code with a NaN or infinite entry is
never chosen for a finite row while the codebook has a finite code. For finite inputs the
index is the exact nearest code up to float32 rounding of the search (codes whose distances
differ by less than about 1e-6 (|x|^2 + max|c|^2) for l2, 1e-6 for cosine, may swap; exact ties
go to the smallest index), also where every distance overflows float32; a row so far from the
codebook that the search itself overflows (|x| beyond about 2^100 times the largest code) is
equally near every code within float32 and gets the first finite code. A row with a NaN entry
gets index 0 and distance NaN. A row with an infinite entry (and no NaN) gets the first finite
code, at its true distance (l2: +inf). A finite row when no code is finite gets index 0 at its
true distance (NaN or +inf)."""


def check_int(op: str, name: str, value, minimum: int | None = None, maximum: int | None = None) -> int:
    """``value`` as an ``int``: a bool, a non-integral float or any other type raises a named error."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, float)):
        raise TypeError(f"fastvq.{op}: {name} must be an int, got {type(value).__name__} {value!r}")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"fastvq.{op}: {name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"fastvq.{op}: {name} must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"fastvq.{op}: {name} must be <= {maximum}, got {value}")
    return value
