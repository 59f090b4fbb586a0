"""What the search ops (nearest_code, topk_codes, sample_code, mine_negatives, pairwise_sqdist)
share: their argument checks and the numeric contract (the metric names are
:data:`fastvq._names.METRICS`).
"""

from __future__ import annotations

import math

import torch


NUMERIC_CONTRACT = """\
Numeric contract (every search op, both backends, float32/float16/bfloat16 inputs):
distances are computed in float32 and never made up. The returned distance is the distance
from the row to the returned code, computed directly from the two vectors (l2, euclidean and
cosine as float32 sums, within fastvq.testing's bound of the exact value; dot's exact float64
products summed in three float64 parts (two extractions per tile of columns) and rounded once:
correct unless the exact sum lies within about n^2 2^-136 of the largest product plus 2^-159
of the largest partial sum of a rounding midpoint, n columns per tile): NaN exactly where that
distance is NaN (a NaN entry; inf - inf), +inf where it overflows float32 (dot: -inf where <x, c>
overflows), never 0 or another finite stand-in for a representable distance (l2 flushes terms
below 2^-150: distances below about 1e-38 can read 0); l2 >= 0, and cosine in [0, 2] at every
magnitude (euclidean's and cosine's rows and codes are scaled by powers of two before they are
squared or normalised). Indices always lie in [0, K). A code with a NaN or infinite entry is
never chosen for a finite row while the codebook has a finite code. For finite inputs the
index is the exact nearest code up to float32 rounding of the search (two codes whose distances
differ by less than about 1e-6 (|x| + |c|)^2 of either code for l2, 1e-6 for cosine, 1e-6 |x| |c|
for dot, may swap), whatever the spread of the code sizes (l2 scores each code in a
power-of-two unit chosen per row; dot keeps each code's own power of two in one unit per
codebook, exact for codes down to about 2^-250 times the largest), also where every distance
overflows float32. A row with a NaN entry
gets index 0 and distance NaN. A row with an infinite entry (and no NaN) gets the first finite
code, at its true distance (l2: +inf). A finite row when no code is finite gets index 0 at its
true distance (NaN or +inf).
Ties: equal computed float32 scores go to the smallest index, as torch.argmin. Codes that are
equal in exact arithmetic but whose scores are computed with different rounding (duplicate
codes, whose scores are accumulated in a different order by column or tile; the same row at
different positions of a tile) are near-ties within the rounding bound and may go either way,
on either backend: a later copy of a duplicate code can win, identical rows in one call can get
different (equally near) codes, and the two backends can differ there."""


def search_inputs(op: str, x, codebook, metric, allow_tf32):
    """Validate and shape the inputs of a search op.

    ``codebook`` ``(K, D)``: ``x`` ``(..., D)``, one codebook for every row. ``codebook``
    ``(H, K, D)``: ``x`` ``(H, ..., D)``, row ``x[h, ...]`` searched in ``codebook[h]``.
    Returns ``(x3 (H, N, D), codebook3 (H, K, D), lead, allow_tf32)``: detached, one promoted
    float dtype; ``lead`` is ``x.shape[:-1]``, the shape of the results; ``allow_tf32`` a bool.
    """
    from .._checks import (check_bool_arg, check_float, check_fp32_dot_env, check_metric, check_same_device,
                           check_tensor)

    check_tensor(op, "x", x, min_ndim=1)
    check_tensor(op, "codebook", codebook)
    if codebook.dim() not in (2, 3):
        raise ValueError(f"fastvq.{op}: codebook must be (K, D) or (H, K, D), got shape {tuple(codebook.shape)}")
    check_float(op, "x", x)
    check_float(op, "codebook", codebook)
    check_same_device(op, x=x, codebook=codebook)
    if x.shape[-1] != codebook.shape[-1]:
        raise ValueError(f"fastvq.{op}: feature dims differ: x has D={x.shape[-1]} (shape {tuple(x.shape)}), "
                         f"codebook has D={codebook.shape[-1]} (shape {tuple(codebook.shape)})")
    if codebook.shape[-2] == 0:
        raise ValueError(f"fastvq.{op}: codebook is empty (K = 0), shape {tuple(codebook.shape)}")
    multi = codebook.dim() == 3
    if multi and (x.dim() < 2 or x.shape[0] != codebook.shape[0]):
        raise ValueError(f"fastvq.{op}: with H = {codebook.shape[0]} codebooks (shape {tuple(codebook.shape)}) x must "
                         f"be (H, ..., D), got shape {tuple(x.shape)}")
    check_metric(op, metric)
    allow_tf32 = check_bool_arg(op, "allow_tf32", allow_tf32)  # (NumPy bools too, as every flag)
    check_fp32_dot_env(op)
    x, codebook = x.detach(), codebook.detach()
    if x.dtype != codebook.dtype:
        dtype = torch.promote_types(x.dtype, codebook.dtype)
        x, codebook = x.to(dtype), codebook.to(dtype)
    lead = x.shape[:-1]
    D = x.shape[-1]
    c3 = codebook if multi else codebook.unsqueeze(0)
    H = c3.shape[0]
    # explicit row counts: reshape(H, -1, D) is ambiguous (and raises) when D == 0 or H == 0
    # (math.prod, not Size.numel(): non-strict torch.export fixed a dynamic N there, fuzzL L2 as
    # compileprobe P6 for the residual step)
    x3 = x.reshape(H, (math.prod(lead) // H) if H else 0, D)
    return x3, c3, lead, allow_tf32
