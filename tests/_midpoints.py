"""Sums whose exact value lies a tiny offset from a rounding midpoint, and the exact rounding
to compare them with (shared by the compensated-sum tests)."""

import math
from fractions import Fraction

import torch

_INT = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def nearest(x: Fraction, dtype: torch.dtype) -> float:
    """The exact sum ``x`` rounded to nearest even in ``dtype``, by comparing it with the
    neighbours of a first guess (independent of the code under test: no rounding to odd, no
    float64 of the sum); +-inf where it reaches the overflow midpoint."""
    if x < 0:  # (symmetric; the neighbours of a tiny negative guess would wrap past -0.0's bits)
        return -nearest(-x, dtype)
    big = torch.finfo(dtype).max
    ulp_max = Fraction(big) - Fraction(torch.tensor(big, dtype=dtype).view(_INT[dtype]).sub(1).view(dtype).item())
    if abs(x) >= Fraction(big) + ulp_max / 2:
        return float("inf") if x > 0 else float("-inf")
    guess = torch.tensor(float(x), dtype=torch.float64).to(dtype)  # within an ulp or two of the answer
    bits = int(guess.view(_INT[dtype]).item())
    cands = []
    for b in range(bits - 2, bits + 3):
        v = torch.tensor(b, dtype=_INT[dtype]).view(dtype)
        if torch.isfinite(v):
            cands.append((abs(Fraction(v.item()) - x), b & 1, v.item()))
    return min(cands)[2]  # nearest, ties to the even encoding


def midpoint_cases(gen, n_terms):
    """Term lists whose exact sums lie within a tiny offset of a rounding midpoint of float32,
    bfloat16 or float16, at magnitudes from 2^-100 (float32) to each dtype's overflow midpoint,
    in random order, padded with cancelling pairs of large terms (partial sums far beyond the sum)."""
    out = []
    for dtype, (lo_e, hi_e), mant in ((torch.float32, (-100, 127), 24), (torch.bfloat16, (-100, 127), 8),
                                      (torch.float16, (-10, 15), 11)):
        for _ in range(24):
            e = int(torch.randint(lo_e, hi_e + 1, (1,), generator=gen))
            v = Fraction(int(torch.randint(2 ** (mant - 1), 2**mant, (1,), generator=gen))) * Fraction(2) ** (e - mant + 1)
            if torch.rand(1, generator=gen) < 0.25:  # the largest finite value: the overflow midpoint
                v = Fraction(torch.finfo(dtype).max)
                e = math.frexp(torch.finfo(dtype).max)[1] - 1
            half_ulp = Fraction(2) ** (e - mant)
            tiny = Fraction(2) ** (e - mant - int(torch.randint(2, 40 if dtype == torch.float32 else 20, (1,), generator=gen)))
            sign = 1 if torch.rand(1, generator=gen) < 0.5 else -1
            terms = [v, half_ulp, sign * tiny]
            big = Fraction(2) ** min(e + 4, math.frexp(torch.finfo(dtype).max)[1] - 1)
            while len(terms) + 2 <= n_terms:
                terms += [big, -big]
            perm = torch.randperm(len(terms), generator=gen).tolist()
            out.append((dtype, [float(terms[i]) for i in perm]))
    return out


def small_remainder_rows(dtype):
    """Terms whose exact sum is decided by a small term between two larger ones that cancel,
    which a compensated sum loses when it splits its terms once and adds the remainders plainly
    (mutG B-2 in the references, the kernels' ``dd_sum`` until two extractions): the README's
    ``max, half ulp of max, 2^77, -2^-100, -2^77`` (just below the overflow midpoint: ``max``;
    without the ``-2^-100``: +inf) and ``1, half ulp of 1, 2^-60, 2^-130, -2^-60`` (just above
    the midpoint: ``1 + ulp``; without the ``2^-130``: 1), at ``dtype``'s precision. Every term
    is a power of two or the largest value, so it is exact in ``dtype``."""
    nmant = {torch.float32: 23, torch.bfloat16: 7}[dtype]  # (fraction bits)
    return [[float(torch.finfo(dtype).max), 2.0 ** (127 - nmant - 1), 2.0**77, -(2.0**-100), -(2.0**77)],
            [1.0, 2.0 ** -(nmant + 1), 2.0**-60, 2.0**-130, -(2.0**-60)]]
