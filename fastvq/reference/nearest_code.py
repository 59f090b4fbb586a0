"""Pure-torch reference for :func:`fastvq.nearest_code`: the test oracle and the CPU path.

It follows the kernel step by step (same scaling decisions, same scores, same epilogue), in
float32, in row chunks; the helpers here are shared with the other search references.
"""

from __future__ import annotations

import torch

from .._names import METRICS
from ._chunks import row_chunk
from ._exact_sum import pair_sum_lastdim, round_pair

TAME_EXP = 20  # codebooks whose max-abs values lie in [2^-20, 2^20] are searched unscaled


# --------------------------------------------------------------------------- exact powers of two


def pow2_exponent(m: torch.Tensor) -> torch.Tensor:
    """For float32 ``m >= 0``: int32 ``e`` with ``m * 2**-e`` in [1, 2), clamped to [-127, 126]."""
    biased = (m.float().contiguous().view(torch.int32) >> 23) & 0xFF
    return (biased - 127).clamp(-127, 126)


def exp2i(e: torch.Tensor) -> torch.Tensor:
    """``2.0 ** e`` as float32 for integer ``e``, rounded as float32 rounds it (as the kernels'
    ``exp2i``): exact for ``e`` in [-149, 127], +inf above 127, 0 below -149."""
    norm = (e.clamp(-127, 128) + 127) << 23  # e in [-126, 128]: the biased exponent; 128 -> +inf
    sub = torch.full_like(e, 0x400000) >> (-127 - e.clamp(-151, 0)).clamp(0, 23)  # e in [-150, -127]
    return torch.where(e > -127, norm, sub).to(torch.int32).view(torch.float32)


def max_abs(t: torch.Tensor) -> torch.Tensor:
    """Largest ``|t|`` along the last dim, NaN ignored (0 for an all-NaN or empty row)."""
    if t.shape[-1] == 0:
        return t.new_zeros(t.shape[:-1], dtype=torch.float32)
    return t.float().abs().nan_to_num(nan=0.0, posinf=float("inf")).amax(-1)


# --------------------------------------------------------------------------- the codebook pre-passes

# The l2 search works in one of three units per row ("bands"): |x - c|^2 - |x|^2 = |c|^2 - 2 x.c
# is scored as 2^-2L (|c|^2 - 2 x.c) with L = BAND_UNITS[band]; a row's band is that of the
# power of two of max(max|x|, smallest nonzero code max-abs): within 2^BAND_HALF of the unit,
# so that the scores that decide its nearest code neither underflow nor overflow float32.
BAND_UNITS = (0, 96, -96)
BAND_HALF = 48


def _mul_exp2(v: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``v * 2**e`` for an int32 ``e`` in [-252, 254] (2**e itself need not be a float32),
    rounded once: two exact half steps (each half a normal power of two)."""
    lo = e >> 1
    return (v * exp2i(lo)) * exp2i(e - lo)


def prepare_codebook(codebook: torch.Tensor, metric: str):
    """``(H, K, D)`` -> ``(codes, a, b, first, scale, c_min)``: the float32 codes the search
    multiplies with (a power-of-two scaled copy where the codebook's magnitudes leave [2^-20,
    2^20]: one scale per code; float16 never), the per-code
    score terms ``a``, ``b`` of shape ``(H, NB, K)`` (score = ``a + b * (x' . c')``: NB = 3 units
    for l2/euclidean, 1 otherwise; ``a`` NaN for a code with a non-finite entry), the ``(H,)``
    first finite code (``K`` if none), the ``(H,)`` int32 exponent ``E`` of dot's score unit
    (scores ``-(x'.c) 2^-E``; 0 where the codebook is not rescaled) and the ``(H,)`` smallest
    nonzero max-abs of a finite code (0 if none)."""
    H, K, D = codebook.shape
    c32 = codebook.float()
    m = max_abs(c32)
    bad = ~torch.isfinite(c32).all(-1)
    e = pow2_exponent(m)
    s = exp2i(-e)
    q = ((c32 * s[..., None]) ** 2).sum(-1)  # |c|^2 = q 2^(2e)
    good = ~bad
    c_max = torch.where(good, m, torch.zeros_like(m)).amax(-1)
    c_min = torch.where(good & (m > 0), m, torch.full_like(m, float("inf"))).amin(-1)
    ar = torch.arange(K, device=codebook.device).expand(H, K)
    first = torch.where(good, ar, torch.full_like(ar, K)).amin(-1)
    hi, lo = 2.0**TAME_EXP, 2.0**-TAME_EXP
    need = (c_max > hi) | (c_min < lo)
    if codebook.dtype == torch.float16:
        need = torch.zeros_like(need)
    scaled = (c32 * s[..., None]).to(codebook.dtype).float()  # the kernel stores the copy in the codebook's dtype
    codes = torch.where(need[:, None, None], scaled, c32)
    e_op = torch.where(need[:, None], e, torch.zeros_like(e))  # codes' = c 2^-e_op
    # dot's common unit 2^E: the largest code's score, |x' . c'| 2^(e_max - E) < 4 D 2^(124 - log2D),
    # cannot overflow, and each code keeps its own power of two in b = -2^(e - E)
    e_unit = torch.where(need, pow2_exponent(c_max) + (max(D - 1, 0).bit_length() - 124), torch.zeros_like(c_max,
                         dtype=torch.int32))
    if metric in ("l2", "euclidean"):
        # a = |c|^2 2^-2L = (q 2^(e-L)) 2^(e-L): exact but for the last rounding (q >= 1 for a
        # nonzero code; clamped exponents only where the result underflows to 0 or is +inf)
        a = torch.stack([(q * exp2i(e - L)) * exp2i(e - L) for L in BAND_UNITS], 1)
        b = torch.stack([-_mul_exp2(torch.full_like(q, 2.0), e_op - L) for L in BAND_UNITS], 1)
        # 0 where |c|^2 overflows the unit (a = +inf): |x'| < 2^50 sqrt(D) in any row's unit, so
        # the score is +inf, not inf - inf = NaN as with b = -2^128
        b = torch.where(a == float("inf"), torch.zeros_like(b), b)
    elif metric == "cosine":  # 1/|c'|: the scaled copy's, or s/|c s| for the codes as they are
        qc = q.clamp_min(1e-30)
        inv = torch.where(need[:, None], qc.rsqrt(), s / qc.sqrt())
        inv = torch.where(q > 0, inv, torch.zeros_like(inv))
        a, b = torch.zeros_like(q)[:, None], -inv[:, None]
    else:
        a, b = torch.zeros_like(q)[:, None], -_mul_exp2(torch.ones_like(q), e_op - e_unit[:, None])[:, None]
    a = a.masked_fill(bad[:, None], float("nan"))
    c_min = torch.where(c_min < float("inf"), c_min, torch.zeros_like(c_min))
    return codes, a, b, first, e_unit, c_min


def row_band(x: torch.Tensor, c_min: torch.Tensor) -> torch.Tensor:
    """The l2 unit band of each row (``x`` (n, D), ``c_min`` the codebook's 0-d smallest nonzero
    code max-abs): 0 unless max(max|x|, c_min) lies beyond 2^+-BAND_HALF; 0 for non-finite rows."""
    m = torch.maximum(max_abs(x), c_min)
    e = pow2_exponent(m)
    band = torch.where(e > BAND_HALF, 1, torch.where(e < -BAND_HALF, 2, 0))
    return torch.where(torch.isfinite(m), band, torch.zeros_like(band))


def scale_rows(x: torch.Tensor, metric: str, c_min: torch.Tensor | None = None):
    """``(x', band)``: the float32 rows the search multiplies with and each row's unit band.
    cosine and dot scale each row by a power of two (their argmin ignores a row's scale); l2
    scales it by its band's unit 2^-L (float16 never)."""
    x32 = x.float()
    band = torch.zeros(x.shape[:-1], dtype=torch.int64, device=x.device)
    if x.dtype == torch.float16:
        return x32, band
    if metric in ("cosine", "dot"):
        x32 = (x32 * exp2i(-pow2_exponent(max_abs(x32)))[..., None]).to(x.dtype).float()
    elif c_min is not None:
        band = row_band(x32, c_min)
        units = torch.tensor(BAND_UNITS, dtype=torch.int32, device=x.device)[band]
        x32 = (x32 * exp2i(-units)[..., None]).to(x.dtype).float()
    return x32, band


def row_unit(band: torch.Tensor) -> torch.Tensor:
    """``2^L`` of each row's band (float32): scores are in units of ``2^(2L)``."""
    units = torch.tensor(BAND_UNITS, dtype=torch.int32, device=band.device)[band]
    return exp2i(units)


def scores(x32: torch.Tensor, codes: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
           band: torch.Tensor) -> torch.Tensor:
    """``(n, K)`` float32 scores whose row argmin is the nearest code (NaN: never chosen):
    ``a[band] + b[band] * (x' . c')``, i.e. l2 ``2^-2L (|c|^2 - 2 x.c)``, cosine ``-(x.c)/|c|``,
    dot ``-(x.c)``; the row-constant terms are left out. ``x32``/``band`` as :func:`scale_rows`
    gives, ``codes``/``a``/``b`` one codebook's from :func:`prepare_codebook`."""
    xc = x32 @ codes.T
    if a.shape[0] == 1:
        return a[0] + b[0] * xc
    return a[band] + b[band] * xc


def argmin_first(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row ``(min, argmin)`` over the scores below +inf (NaN and +inf never win), index -1 where
    there is none; exact ties go to the smallest index (torch.argmin's rule)."""
    s = s.nan_to_num(nan=float("inf"), posinf=float("inf"), neginf=float("-inf"))
    idx = s.argmin(dim=1)
    best = s.gather(1, idx[:, None]).squeeze(1)
    return best, torch.where(best < float("inf"), idx, torch.full_like(idx, -1))


# --------------------------------------------------------------------------- the epilogue


def choose(x: torch.Tensor, idx: torch.Tensor, first: torch.Tensor, K: int) -> torch.Tensor:
    """The kernel's per-row override: a row with a NaN -> 0; a row with an infinite entry, or
    with no finite score (``idx == -1``) -> the first finite code (0 if none: ``first == K``)."""
    first = torch.where(first < K, first, torch.zeros_like(first))
    has_nan = x.isnan().any(-1)
    bad = ~torch.isfinite(x).all(-1)
    out = torch.where(bad | (idx < 0), first, idx)
    return torch.where(has_nan, torch.zeros_like(out), out)


def distance(x: torch.Tensor, c: torch.Tensor, metric: str) -> torch.Tensor:
    """The distance between matching rows of ``x`` and ``c`` (float32), computed directly:
    NaN where it is NaN, +inf where it overflows, scaled before squaring or normalising; dot's
    ``-(x.c)`` summed in float64, where the products of float32 values are exact (scaled by the
    rows' powers of two in float32, an entry far below its row's largest flushed to 0 or, kept
    as the smallest normal, counted as 2^(e_x + e_c - 126): [1, 0] . [1e-30, 3e38] gave -1,
    not -1e-30; fuzzA)."""
    x32, c32 = x.float(), c.float()
    if metric == "dot":  # -(x.c) from float64 products (each exact, nothing scaled or flushed), summed
        # extracted twice (pair_sum_lastdim) and rounded once (a plain float64 sum lost the products below 2^-53
        # of the largest: [1, 1, 1] . [2^100, 1, -2^100] gave 0, not -1; fuzzJ)
        # (negated after rounding, as the kernel: an exact 0 is -0.0 on both backends; review10)
        return -round_pair(*pair_sum_lastdim(x32.double() * c32.double()), torch.float32)
    if metric == "l2":
        return ((x32 - c32) ** 2).sum(-1)
    if metric == "euclidean":  # |x - c| = sqrt(sum((diff * 2^-e)^2)) * 2^e
        diff = x32 - c32
        e = pow2_exponent(max_abs(diff))
        return ((diff * exp2i(-e)[..., None]) ** 2).sum(-1).sqrt() * exp2i(e)
    e_x, e_c = pow2_exponent(max_abs(x32)), pow2_exponent(max_abs(c32))
    xs, cs = x32 * exp2i(-e_x)[..., None], c32 * exp2i(-e_c)[..., None]
    t = (xs * cs).sum(-1)
    den = (xs * xs).sum(-1).sqrt() * (cs * cs).sum(-1).sqrt()
    cos = torch.where(den == 0, torch.zeros_like(t), t / torch.where(den == 0, torch.ones_like(den), den))
    d = 1.0 - cos
    return torch.where(d.isnan(), d, d.clamp(0.0, 2.0))


def _check_metric(metric: str) -> None:
    if metric not in METRICS:
        raise ValueError(f"fastvq.nearest_code: unknown metric {metric!r}; expected one of {METRICS}")


def search_setup(x: torch.Tensor, codebook: torch.Tensor, metric: str, *per_row: int):
    """What the search references (nearest_code, sample_code, topk_codes) share: the metric check,
    the shapes and the outputs. ``x (..., D)`` with one codebook ``(K, D)`` is the case ``H = 1``;
    ``(H, ..., D)`` with ``(H, K, D)``, one codebook per leading index. Returns ``(x3 (H, N, D),
    cb (H, K, D), lead, indices, distances)``: ``lead = x.shape[:-1]``, and the int64 indices and
    float32 distances to fill, ``(H, N, *per_row)``."""
    _check_metric(metric)
    multi = codebook.dim() == 3
    cb = codebook if multi else codebook.unsqueeze(0)
    xs = x if multi else x.unsqueeze(0)
    x3 = xs.reshape(cb.shape[0], xs.shape[1:-1].numel(), cb.shape[2])  # not (H, -1, D): ambiguous when D == 0
    shape = (*x3.shape[:2], *per_row)
    indices = torch.empty(shape, dtype=torch.int64, device=x.device)
    distances = torch.empty(shape, dtype=torch.float32, device=x.device)
    return x3, cb, x.shape[:-1], indices, distances


def row_chunks(H: int, N: int, n_cols: int) -> list[tuple[int, int, int]]:
    """``(h, start, stop)`` for every chunk of rows of an ``(H, N, .)`` search, chunked for an
    ``(rows, n_cols)`` float32 scratch (:func:`row_chunk`; ``stop`` may pass ``N``)."""
    step = row_chunk(n_cols)
    return [(h, s, s + step) for h in range(H) for s in range(0, N, step)]


def nearest_code_ref(
    x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", *, allow_tf32: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`fastvq.nearest_code`: ``(..., D), (K, D)`` -> ``(...)`` indices and
    distances, or for ``H`` codebooks ``(H, ..., D), (H, K, D)`` -> ``(H, ...)``.

    Computed in float32 (``allow_tf32`` is accepted for signature parity and ignored: the
    reference is always exact fp32), in row chunks so that the scratch stays bounded; never
    a full ``N x K`` matrix. Same scaling, scores, ties and epilogue as the kernel.
    """
    x3, cb, lead, indices, distances = search_setup(x, codebook, metric)
    (H, N, _), K = x3.shape, cb.shape[1]
    codes, a, b, first, _, c_min = prepare_codebook(cb, metric)
    for h, s, e in row_chunks(H, N, K):
        rows = x3[h, s:e]
        xr, band = scale_rows(rows, metric, c_min[h])
        _, idx = argmin_first(scores(xr, codes[h], a[h], b[h], band))
        idx = choose(rows, idx, first[h].expand_as(idx), K)
        indices[h, s:e] = idx
        distances[h, s:e] = distance(rows, cb[h][idx], metric)
    return indices.reshape(lead), distances.reshape(lead)
