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


def round_pair(hi: torch.Tensor, lo: torch.Tensor, dtype: torch.dtype, exact_terms: bool = True) -> torch.Tensor:
    """``hi + lo`` (float64) rounded once to ``dtype`` (to nearest even); NaN and +-inf ``hi``
    pass through. ``exact_terms=False``: the terms carry a rounding of their own ("mean"'s
    ``1 / len``), so the pair is not the exact sum and rounding to odd would keep that error
    where the exact sum is a tie (a bfloat16 mean of three bfloat16 values, exactly halfway,
    came out the odd neighbour): to nearest float32, then to nearest ``dtype``, as the kernels'
    float32 path rounds."""
    if not exact_terms:
        h = torch.where(torch.isfinite(hi), hi + lo, hi)
        return h.to(torch.float32).to(dtype) if dtype != F64 else h
    if hi.dim() and hi.numel() > ROUND_CHUNK and hi.shape[0] > 1:  # (its temporaries: a chunk of rows at a time)
        step = max(1, ROUND_CHUNK // max(1, hi[0].numel()))
        return torch.cat([round_pair(h, l, dtype) for h, l in zip(hi.split(step), lo.split(step))])
    fin = torch.isfinite(hi)
    h, err = _two_sum(hi, lo)
    lo = torch.where(fin, err, torch.zeros_like(hi))  # h + lo == hi + lo exactly
    h = torch.where(fin, h, hi)
    if dtype == F64:
        return h
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
