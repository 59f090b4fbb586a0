"""Sums of float64 terms rounded once to a table's dtype (the references' side of
``kernels/_common.py round_dd``).

A float64 sum of float32 products is not exact: terms ``max``, ``2^103`` and ``-2^60`` sum in
float64 to ``max + 2^103``, the float32 rounding midpoint, and round to +inf where the exact sum
(below the midpoint) rounds to ``max`` (qrprobe QP5). And torch converts float64 to bfloat16 or
float16 through float32, rounding twice (QP3). Here each sum is carried as a pair ``hi + lo``
with ``hi`` exact: every term ``t`` of a row is split at ``sigma = 2^(M + E)`` (``2^E`` above the
row's largest |term| in that column, ``2^M >= n + 2`` for its ``n`` terms) into ``q = (sigma + t)
- sigma`` and ``t - q``; the ``q`` sum exactly in any order (Rump, Ogita and Oishi's
extraction). The remainders, each below ``2^-53 sigma``, are split again at ``sigma 2^(M - 53)``
(:func:`pair_index_sum`, :func:`pair_sum_lastdim`): their parts sum exactly too, and
what is left sums within about ``n^2 2^(2M - 158)`` of the largest term (a plain sum of the first
remainders lost 2^-130 between 2^-60 and -2^-60; mutG B-2), so the pair is the exact sum within
that and about ``2^-106`` of itself. :func:`round_pair` then rounds ``hi + lo`` once: to odd
at float64 then to nearest float32, or to odd at float32 then to nearest bfloat16 / float16 (a
rounding to odd with two more bits than the target makes the second rounding exact).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable

import torch

F64 = torch.float64


def _split(t: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, t - q)`` of float64 terms at ``sigma`` (broadcast). A NaN or infinite term makes its
    row's ``q`` sum NaN or +-inf (the plain sum's value) and its remainder NaN, which
    :func:`round_pair` ignores where the pair's ``hi`` is not finite."""
    q = (sigma + t) - sigma
    return q, t - q


def _sigma(amax: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """``sigma`` for sums whose largest |term| is ``amax`` over ``count`` terms (any finite power
    of two where ``amax`` is not finite: that sum is not finite either)."""
    _, e = torch.frexp(amax.nan_to_num_(0.0, 0.0, 0.0))  # amax < 2^e (amax is not used again)
    e += torch.ceil(torch.log2(count.to(F64) + 2.0)).to(torch.int32)
    return torch.ldexp(amax.fill_(1.0), e)


ROUND_CHUNK = 1 << 20  # round_pair rounds this many elements at a time
CACHE_BYTES = 1 << 26  # pair_index_sum keeps the first pass's terms up to this size (else forms them again)


def pair_index_sum(shape: tuple, chunks: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
                   device, summing: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)`` float64, ``shape`` ``(rows, cols)``: for every row, the sum of the float64 term
    rows ``chunks()`` yields for it as ``(row index (n,), terms (n, cols))``, extracted twice (see
    the module's docstring; three float64 ``shape`` sums beside ``sigma``). Two passes over the
    terms (the largest term and the count of each row first: maxima and counts, in any order);
    the first pass's terms are kept for the second up to :data:`CACHE_BYTES`, beyond which
    ``chunks`` is called again. The second pass's ``index_add_`` runs inside ``summing()`` (e.g.
    torch's deterministic mode)."""
    amax = torch.zeros(shape, dtype=F64, device=device)
    count = torch.zeros(shape[0], dtype=F64, device=device)
    kept, size = [], 0
    for idx, t in chunks():
        amax.scatter_reduce_(0, idx[:, None].expand(t.shape), t.abs(), "amax")
        count.index_add_(0, idx, torch.ones(idx.shape, dtype=F64, device=device))
        if kept is not None:
            size += t.numel() * t.element_size() + idx.numel() * idx.element_size()
            kept = kept + [(idx, t)] if size <= CACHE_BYTES else None
    # the remainders (each below 2^-53 sigma) are split again, at sigma 2^(M - 53) (2^M >= n + 2),
    # as pair_sum_lastdim splits them: their plain sum lost a small one where larger
    # ones cancelled (2^-60, 2^-130, -2^-60 gave 0: a code's sum 1 + 2^-24 + 2^-130 rounded to 1
    # where the kernel gives 1 + 2^-23; mutG B-2)
    down = torch.exp2(torch.ceil(torch.log2(count + 2.0)) - 53.0)[:, None]  # (exact powers of two)
    sigma = _sigma(amax, count[:, None])
    del amax, count
    hi = torch.zeros(shape, dtype=F64, device=device)
    mid = torch.zeros(shape, dtype=F64, device=device)
    lo = torch.zeros(shape, dtype=F64, device=device)
    with summing():
        for idx, t in (kept if kept is not None else chunks()):
            s = sigma[idx]
            q, r = _split(t, s)
            hi.index_add_(0, idx, q)
            q, r = _split(r, s.mul_(down[idx]))
            mid.index_add_(0, idx, q)
            lo.index_add_(0, idx, r)
    del sigma, down
    return _join(hi, mid, lo)


def pair_sum_lastdim(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)``: the sums of float64 ``t`` along its last dimension, as a pair, the remainders
    split again as :func:`pair_index_sum` and the kernels' ``dd_sum`` do (terms of up to 53 bits
    that cancel, products of two float32 values, left low bits in remainders that a plain sum
    lost where the rest cancelled; the per-sample weights' gradient, which split once, gave
    +inf for the README's max, 2^103, 2^77, -2^-100, -2^77 spread over 200 columns)."""
    def split(v):
        amax = v.abs().amax(-1, keepdim=True) if v.shape[-1] else v.new_zeros(v.shape[:-1] + (1,))
        return _split(v, _sigma(amax, torch.full_like(amax, v.shape[-1])))

    q, r = split(t)
    q2, r2 = split(r)
    return _join(q.sum(-1), q2.sum(-1), r2.sum(-1))


def _join(hi: torch.Tensor, mid: torch.Tensor, lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair of two extractions' sums: ``hi`` and ``mid`` exact, ``lo`` what is left;
    ``(s, e)`` with ``s = fl(hi + mid)`` and ``e = (hi + mid - s) + lo`` (:func:`_two_sum`'s
    error). In place, consuming all three (they can be the size of a code table: an
    out-of-place pair held six more such buffers at once). A NaN or infinite term: ``hi`` is the
    plain sum's value (kept: ``mid`` is zeroed there), ``e`` NaN, which :func:`round_pair`
    ignores."""
    mid.masked_fill_(~torch.isfinite(hi), 0.0)
    s = hi + mid
    bb = s - hi
    mid.sub_(bb)  # b - bb
    hi.sub_(bb.neg_().add_(s)).add_(mid)  # (a - (s - bb)) + (b - bb): the error of s
    return s, hi.add_(lo)


def _two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, e)``: ``s = fl(a + b)`` and ``s + e = a + b`` exactly (Knuth), as the kernels' two_sum."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


def two_prod(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, e)``: ``p = fl(a b)`` and ``p + e = a b`` exactly (Dekker, as the kernels'
    ``two_prod``: float64, ``|a|, |b|`` below 2^995, the product far above the subnormals)."""
    def split(v):
        c = v * 134217729.0  # 2^27 + 1 (Veltkamp)
        hi = c - (c - v)
        return hi, v - hi

    (ah, al), (bh, bl) = split(a), split(b)
    p = a * b
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


def reciprocal_pair(n: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hi, lo)`` float64 with ``hi + lo`` within about 2^-104 of ``1 / n`` (``n`` positive
    integers, exact in float64): ``hi`` rounded once and ``lo = hi r`` with ``r = 1 - n hi``
    formed exactly (``1 / n = hi (1 + r + r^2 ...)``, ``|r| <= 2^-53``)."""
    n = n.to(F64)
    hi = 1.0 / n
    p, e = two_prod(n, hi)
    return hi, hi * ((1.0 - p) - e)  # (1 - p is exact: p lies within 2^-52 of 1)


def quotient_terms(x: torch.Tensor, hi: torch.Tensor, lo: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p, e)``: float64 ``x / n`` for exact terms ``x`` as two terms, ``p = fl(x hi)`` and ``e``
    the rest, within about 2^-103 of it (``(hi, lo)`` from :func:`reciprocal_pair`, broadcast):
    a "mean" sum of them is rounded by :func:`round_pair` with ``tol = MEAN_TOL sum |p|``, as the
    kernels' ``_mean_terms`` do."""
    p, e = two_prod(x, hi)
    return p, torch.where(x.isfinite(), e + x * lo, 0.0)  # (+-inf, NaN: p carries it)


MEAN_TOL = 2.0**-100  # (kernels/qr_lookup.py MEAN_TOL)


def _snap_half_ulp(h: torch.Tensor, lo: torch.Tensor, fin: torch.Tensor, tol: torch.Tensor):
    """The kernels' ``snap_half_ulp``: ``(0, 0)`` where ``|h + lo| <= tol`` (+0, or ``h``'s own zero),
    else ``(P, 0)`` where ``h + lo`` lies within ``tol`` of ``P``, the nearest point of float32's
    half-ulp grid at ``h``; else ``(h, lo)``."""
    _, e = torch.frexp(h.nan_to_num(0.0, 0.0, 0.0))  # 2^(e - 1) <= |h| < 2^e
    u = torch.ldexp(torch.ones_like(h), (e - 25).clamp_min(-150))
    big = u * 6755399441055744.0  # 1.5 * 2^52 * u
    p = (h + big) - big
    p = torch.where((h + lo).abs() <= tol, torch.zeros_like(p), p)
    p = torch.where(h == 0, h, p)
    snap = fin & (((h - p) + lo).abs() <= tol)
    return torch.where(snap, p, h), torch.where(snap, torch.zeros_like(lo), lo)


def round_pair(hi: torch.Tensor, lo: torch.Tensor, dtype: torch.dtype, tol: torch.Tensor | None = None) -> torch.Tensor:
    """``hi + lo`` (float64) rounded once to ``dtype`` (to nearest even); NaN and +-inf ``hi``
    pass through. ``tol`` (broadcast to ``hi``): the pair is the exact sum only within it (its
    terms carry a rounding of their own: "mean"'s quotients, :func:`quotient_terms`), and
    rounding to odd would keep that error where the exact sum is a tie (a bfloat16 mean of three
    bfloat16 values, exactly halfway, came out the odd neighbour): a sum within ``tol`` of a point
    of float32's half-ulp grid (every float32, bfloat16 and float16 value and rounding midpoint)
    is that point, as the kernels' ``round_dd`` ``SNAP`` rounds."""
    if hi.dim() and hi.numel() > ROUND_CHUNK and hi.shape[0] > 1:  # (its temporaries: a chunk of rows at a time)
        step = max(1, ROUND_CHUNK // max(1, hi[0].numel()))
        tols = [None] * len(hi.split(step)) if tol is None else tol.expand_as(hi).split(step)
        return torch.cat([round_pair(h, l, dtype, t) for h, l, t in zip(hi.split(step), lo.split(step), tols)])
    fin = torch.isfinite(hi)
    h, err = _two_sum(hi, lo)
    lo = torch.where(fin, err, torch.zeros_like(hi))  # h + lo == hi + lo exactly
    h = torch.where(fin, h, hi)
    if dtype == F64:
        return h
    if tol is not None:
        h, lo = _snap_half_ulp(h, lo, fin, tol)
    if dtype == torch.float32:  # to odd at float64, then to nearest
        bits = h.contiguous().view(torch.int64)
        fix = fin & (lo != 0) & ((bits & 1) == 0)
        up = (lo > 0) == (h > 0)
        return torch.where(fix, torch.where(up, bits + 1, bits - 1), bits).view(F64).to(torch.float32)
    f = h.to(torch.float32)  # to odd at float32, then to nearest bfloat16 / float16
    d = h - f.to(F64)  # exact: f is h's float32 neighbour
    d = torch.where(d != 0, d, lo)
    bits = f.contiguous().view(torch.int32)
    fix = fin & torch.isfinite(f) & (d != 0) & ((bits & 1) == 0)
    up = ((d > 0) == (f > 0)) | (f == 0)
    return torch.where(fix, torch.where(up, bits + 1, bits - 1), bits).view(torch.float32).to(dtype)


class _Rounded(torch.autograd.Function):
    """``value`` forward (the sum rounded once), and the gradient of ``x`` (the differentiable
    float64 sum it rounds) backward."""

    @staticmethod
    def forward(ctx, x, value):
        return value

    @staticmethod
    def backward(ctx, grad):
        return grad.to(F64), None


def rounded_like(x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` carrying ``x``'s gradient (identity), for differentiable references."""
    return _Rounded.apply(x, value) if x.requires_grad else value
