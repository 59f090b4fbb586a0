"""Pure-torch reference of :func:`fastvq.qr_lookup` (quotient-remainder compositional embeddings).

``h = ids mod (Q*R)`` (non-negative, exact int64 arithmetic), row ``h // R`` of ``q_weight``
composed with row ``h % R`` of ``r_weight`` by ``op`` ("add", "mult" or "concat"), in float32,
stored in the tables' dtype. Bag form: every item is composed first, then the bag is pooled.

Sums and products of more than two table values (bag pooling, per-sample weights, 1 / len, the
gradients) are formed in float64 (:data:`EXACT`): every product of three float32 values and every
sum of them is then in range (float64 spans 2^-1074 .. 2^1024, three float32 factors at most
2^-447 .. 2^384), so a result representable in the tables' dtype comes out right, one that
overflows is +-inf and NaN appears only where exact arithmetic gives NaN. Each sum is carried
as an exact part and a remainder and rounded once to the tables' dtype (:mod:`._exact_sum`: a
plain float64 sum could land on a rounding midpoint, and torch's float64 -> bfloat16 / float16
conversion rounds twice; qrprobe QP3, QP5). The kernels reach the same numbers with a float32
fast path and a compensated float64 redo of the few bags and rows that need it.

:func:`qr_lookup_ref` is built from differentiable torch ops (it is the autograd oracle of the
tests); :func:`qr_lookup_bwd_ref` is the explicit backward the op runs under the reference
backend.
"""

from __future__ import annotations

import torch

from ._chunks import row_chunk
from ._exact_sum import (MEAN_TOL, pair_index_sum, pair_sum_lastdim, quotient_terms, reciprocal_pair, round_pair,
                         rounded_like)

EXACT = torch.float64  # where bags are pooled and gradients summed (see the module docstring)


def qr_indices(ids: torch.Tensor, Q: int, R: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(quotient rows, remainder rows)`` of ``ids``, int64, exact for every int64 id."""
    h = torch.remainder(ids.long(), Q * R)
    return torch.div(h, R, rounding_mode="floor"), torch.remainder(h, R)


def qr_out_dim(op: str, q_weight: torch.Tensor, r_weight: torch.Tensor) -> int:
    return q_weight.shape[1] + r_weight.shape[1] if op == "concat" else q_weight.shape[1]


def bag_layout(offsets: torch.Tensor, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(bag of each item (N,) int64, length of each bag (B,) int64)`` for 1-D ``offsets``."""
    offsets = offsets.long()
    ends = torch.cat([offsets[1:], offsets.new_full((1,), n_items)]) if offsets.numel() else offsets
    lengths = ends - offsets
    items = torch.arange(n_items, device=offsets.device)
    bag_of = torch.searchsorted(offsets, items, right=True) - 1
    return bag_of, lengths


def item_scale(bag_of, lengths, mode: str, per_sample_weights) -> torch.Tensor | None:
    """Factor of each item in its bag's pooled sum, float64 (None: all ones)."""
    if per_sample_weights is not None:
        return per_sample_weights.reshape(-1).to(EXACT)
    if mode == "mean" and bag_of is not None:
        return 1.0 / lengths.clamp_min(1).to(EXACT)[bag_of]
    return None


def mean_reciprocals(bag_of, lengths, mode: str, per_sample_weights) -> tuple | None:
    """``(hi, lo)`` (each ``(N, 1)`` float64) of every item's ``1 / len`` for an unweighted "mean"
    (:func:`._exact_sum.reciprocal_pair`), else None: its exact sums take each ``x / len`` as two
    terms (:func:`._exact_sum.quotient_terms`) and round within ``MEAN_TOL sum |p|``."""
    if mode != "mean" or bag_of is None or per_sample_weights is not None:
        return None
    hi, lo = reciprocal_pair(lengths.clamp_min(1))
    return hi[bag_of][:, None], lo[bag_of][:, None]


def _terms(t: torch.Tensor, rows: slice, inv: tuple | None) -> tuple:
    """The exact sums' terms of float64 terms ``t`` (items ``rows``): ``(t,)``, or for "mean"
    (``inv``) its quotients' two parts. (The leading part ``p = fl(t hi)`` is ``t`` times
    :func:`item_scale`'s ``1 / len``: ``sum |p|``, the rounding's tolerance, is summed beside.)"""
    if inv is None:
        return (t,)
    return quotient_terms(t, inv[0][rows], inv[1][rows])


def _compose(op: str, qv: torch.Tensor, rv: torch.Tensor) -> torch.Tensor:
    if op == "add":
        return qv + rv
    if op == "mult":
        return qv * rv
    return torch.cat([qv, rv], dim=-1)


def qr_lookup_ref(
    ids: torch.Tensor,
    q_weight: torch.Tensor,
    r_weight: torch.Tensor,
    op: str = "add",
    *,
    offsets: torch.Tensor | None = None,
    mode: str = "sum",
    per_sample_weights: torch.Tensor | None = None,
    deterministic: bool = True,
) -> torch.Tensor:
    """Reference for :func:`fastvq.qr_lookup` (no input checks; ``deterministic`` is unused).

    Plain form: ``ids.shape + (dim,)``. Bag form (1-D ``ids`` and ``offsets``): ``(B, dim)``.
    Differentiable (torch autograd) in both tables and in ``per_sample_weights``.
    """
    Q, R = q_weight.shape[0], r_weight.shape[0]
    dim = qr_out_dim(op, q_weight, r_weight)
    flat = ids.reshape(-1)
    N = flat.numel()
    qi, ri = qr_indices(flat, Q, R)
    math = torch.float64 if q_weight.dtype == torch.float64 else torch.float32
    step = row_chunk(dim)
    if offsets is None:
        parts = [
            _compose(op, q_weight[qi[s : s + step]].to(math), r_weight[ri[s : s + step]].to(math)).to(q_weight.dtype)
            for s in range(0, N, step)
        ]
        out = torch.cat(parts) if parts else q_weight.new_zeros((0, dim))
        return out.reshape(*ids.shape, dim)

    pooled = torch.zeros((offsets.shape[0], dim), dtype=EXACT, device=q_weight.device)
    if offsets.numel() == 0:  # no bags: no item is pooled anywhere
        return pooled.to(q_weight.dtype)
    bag_of, lengths = bag_layout(offsets, N)
    scale = item_scale(bag_of, lengths, mode, per_sample_weights)
    inv = mean_reciprocals(bag_of, lengths, mode, per_sample_weights)

    def items(exact: bool = False):  # float64: no item, weight or partial sum over- or underflows
        for s in range(0, N, step):
            rows = slice(s, s + step)
            qv, rv = q_weight[qi[rows]].to(EXACT), r_weight[ri[rows]].to(EXACT)
            # "add": q and r as separate terms (q + r rounds in float64 where they lie more than 53
            # bits apart: items (2^60, 1) and (-2^60, 0) summed to 0, exact 1; fuzzR)
            for c in (qv, rv) if op == "add" else (_compose(op, qv, rv),):
                if exact and inv is not None:  # ("mean"'s exact terms: each quotient as two)
                    for t in _terms(c.detach(), rows, inv):
                        yield bag_of[rows], t
                    continue
                if scale is not None:
                    c = c * scale[rows].to(EXACT)[:, None]
                yield bag_of[rows], c.detach() if exact else c

    absum = None if inv is None else torch.zeros_like(pooled)  # ("mean": sum |p| of the quotients)
    for rows, c in items():  # the differentiable sum (autograd's graph) ...
        pooled = pooled.index_add(0, rows, c)
        if absum is not None:
            absum.index_add_(0, rows, c.detach().abs())
    with torch.no_grad():  # ... and its value, rounded once
        hi, lo = pair_index_sum(tuple(pooled.shape), lambda: items(True), pooled.device)
    return rounded_like(pooled, round_pair(hi, lo, q_weight.dtype, None if absum is None else absum * MEAN_TOL))


def qr_lookup_bwd_ref(
    grad: torch.Tensor,
    ids: torch.Tensor,
    q_weight: torch.Tensor,
    r_weight: torch.Tensor,
    op: str,
    offsets: torch.Tensor | None,
    mode: str,
    per_sample_weights: torch.Tensor | None,
    sparse: bool = False,
    needs: tuple[bool, bool, bool] = (True, True, False),
) -> tuple:
    """Gradients of :func:`qr_lookup_ref` for upstream ``grad``: ``(q_rows, q_grad, r_rows,
    r_grad, w_grad)``, ``None`` where ``needs`` (quotient table, remainder table, per-sample
    weights) is False.

    ``grad`` is ``(N, dim)`` (plain, ``ids`` flattened) or ``(B, dim)`` (bags). Dense: each
    table's gradient in its shape and dtype, ``*_rows`` None. ``sparse=True``: ``*_rows`` are
    the touched rows (sorted, int64) and ``*_grad`` their gradients. Each item's term is formed
    and summed in float64 (:data:`EXACT`) by ``index_add_`` (sequential, so deterministic, on the
    CPU) as an exact part and a remainder, rounded once to the tables' dtype (:mod:`._exact_sum`).
    """
    Q, R = q_weight.shape[0], r_weight.shape[0]
    dq = q_weight.shape[1]
    flat = ids.reshape(-1)
    N = flat.numel()
    need_q, need_r, need_w = needs
    math = EXACT  # g * w * q: three factors, and sums of them
    gw = None if per_sample_weights is None else torch.zeros(N, dtype=math, device=q_weight.device)
    gw_lo = None if gw is None else torch.zeros_like(gw)
    if offsets is not None and offsets.numel() == 0:  # no bags: nothing flows back
        flat, N = flat[:0], 0
    qi, ri = qr_indices(flat, Q, R)
    if offsets is None or N == 0:
        bag_of, scale, inv = None, None, None
    else:
        bag_of, lengths = bag_layout(offsets, N)
        scale = item_scale(bag_of, lengths, mode, per_sample_weights)
        inv = mean_reciprocals(bag_of, lengths, mode, per_sample_weights)
    g2 = grad.reshape(grad.shape[0] if grad.dim() > 1 else -1, grad.shape[-1])
    step = row_chunk(grad.shape[-1])

    def terms(table: int, absum: torch.Tensor | None = None):
        """(rows, terms) per chunk of items: table 0 the quotient table's, 1 the remainder's; for
        "mean" each ``x / len`` as two terms (:func:`_terms`), ``sum |p|`` summed into ``absum``
        (zeroed first: a pass that forms the terms again sums it again)."""
        if absum is not None:
            absum.zero_()
        for s in range(0, N, step):
            rows = slice(s, min(s + step, N))
            g = (g2[rows] if bag_of is None else g2[bag_of[rows]]).to(math)
            if scale is not None and inv is None:
                g = g * scale[rows][:, None]
            if op == "add":
                t = g
            elif op == "mult":
                t = g * (r_weight[ri[rows]] if table == 0 else q_weight[qi[rows]]).to(math)
            else:
                t = g[:, :dq] if table == 0 else g[:, dq:]
            idx = (qi if table == 0 else ri)[rows]
            parts = _terms(t, rows, inv)
            if absum is not None:
                absum.index_add_(0, idx, parts[0].abs())
            for part in parts:
                yield idx, part

    if gw is not None:  # d out[bag] / d w_i = the composed item i . its bag's gradient
        for s in range(0, N, step):
            rows = slice(s, min(s + step, N))
            g = (g2[rows] if bag_of is None else g2[bag_of[rows]]).to(math)
            qv, rv = q_weight[qi[rows]].to(math), r_weight[ri[rows]].to(math)
            # ("add": q . g + r . g, each product exact; (q + r) . g rounded q + r first)
            prods = torch.cat([qv * g, rv * g], dim=-1) if op == "add" else _compose(op, qv, rv) * g
            gw[rows], gw_lo[rows] = pair_sum_lastdim(prods)
    out = []
    for table, (need, idx, w) in enumerate(((need_q, qi, q_weight), (need_r, ri, r_weight))):
        if not need:
            out += [None, None]
            continue
        # ("mean": sum |p| of the quotients, the rounding's tolerance, summed as the terms are formed)
        absum = None if inv is None else torch.zeros(tuple(w.shape), dtype=math, device=w.device)
        hi, lo = pair_index_sum(tuple(w.shape), lambda table=table, absum=absum: terms(table, absum), w.device)
        full = round_pair(hi, lo, w.dtype, None if absum is None else absum * MEAN_TOL)
        if sparse:
            touched = torch.unique(idx)  # sorted
            out += [touched, full[touched]]
        else:
            out += [None, full]
    out.append(round_pair(gw, gw_lo, per_sample_weights.dtype) if need_w and gw is not None else None)
    return tuple(out)
