"""Pure-torch reference of :func:`fastvq.qr_lookup` (quotient-remainder compositional embeddings).

``h = ids mod (Q*R)`` (non-negative, exact int64 arithmetic), row ``h // R`` of ``q_weight``
composed with row ``h % R`` of ``r_weight`` by ``op`` ("add", "mult" or "concat"), in float32,
stored in the tables' dtype. Bag form: every item is composed first, then the bag is pooled.

Sums and products of more than two table values (bag pooling, per-sample weights, 1 / len, the
gradients) are formed in float64 (:data:`EXACT`): every product of three float32 values and every
sum of them is then in range (float64 spans 2^-1074 .. 2^1024, three float32 factors at most
2^-447 .. 2^384), so a result representable in the tables' dtype comes out right, one that
overflows is +-inf and NaN appears only where exact arithmetic gives NaN. The kernels reach the
same numbers with a float32 fast path and a float64 redo of the few bags and rows that need it.

:func:`qr_lookup_ref` is built from differentiable torch ops (it is the autograd oracle of the
tests); :func:`qr_lookup_bwd_ref` is the explicit backward the op runs under the reference
backend.
"""

from __future__ import annotations

import torch

from ._chunks import row_chunk

OPS = ("add", "mult", "concat")
MODES = ("sum", "mean")
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
    for s in range(0, N, step):  # float64: no item, weight or partial sum over- or underflows
        c = _compose(op, q_weight[qi[s : s + step]].to(EXACT), r_weight[ri[s : s + step]].to(EXACT))
        if scale is not None:
            c = c * scale[s : s + step].to(EXACT)[:, None]
        pooled = pooled.index_add(0, bag_of[s : s + step], c)
    return pooled.to(q_weight.dtype)


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
    CPU), rounded once to the tables' dtype.
    """
    Q, R = q_weight.shape[0], r_weight.shape[0]
    dq = q_weight.shape[1]
    flat = ids.reshape(-1)
    N = flat.numel()
    need_q, need_r, need_w = needs
    math = EXACT  # g * w * q: three factors, and sums of them
    gq = torch.zeros(q_weight.shape, dtype=math, device=q_weight.device)
    gr = torch.zeros(r_weight.shape, dtype=math, device=r_weight.device)
    gw = None if per_sample_weights is None else torch.zeros(N, dtype=math, device=q_weight.device)
    if offsets is not None and offsets.numel() == 0:  # no bags: nothing flows back
        flat, N = flat[:0], 0
    qi, ri = qr_indices(flat, Q, R)
    if offsets is None or N == 0:
        bag_of, scale = None, None
    else:
        bag_of, lengths = bag_layout(offsets, N)
        scale = item_scale(bag_of, lengths, mode, per_sample_weights)
    g2 = grad.reshape(grad.shape[0] if grad.dim() > 1 else -1, grad.shape[-1])
    step = row_chunk(grad.shape[-1])
    for s in range(0, N, step):
        rows = slice(s, min(s + step, N))
        g = (g2[rows] if bag_of is None else g2[bag_of[rows]]).to(math)
        if gw is not None:  # d out[bag] / d w_i = the composed item i
            gw[rows] = (_compose(op, q_weight[qi[rows]].to(math), r_weight[ri[rows]].to(math)) * g).sum(-1)
        if scale is not None:
            g = g * scale[rows][:, None]
        if op == "add":
            g_q, g_r = g, g
        elif op == "mult":
            g_q = g * r_weight[ri[rows]].to(math)
            g_r = g * q_weight[qi[rows]].to(math)
        else:
            g_q, g_r = g[:, :dq], g[:, dq:]
        gq.index_add_(0, qi[rows], g_q)
        gr.index_add_(0, ri[rows], g_r)
    out = []
    for need, full, idx, w in ((need_q, gq, qi, q_weight), (need_r, gr, ri, r_weight)):
        if not need:
            out += [None, None]
        elif sparse:
            touched = torch.unique(idx)  # sorted
            out += [touched, full[touched].to(w.dtype)]
        else:
            out += [None, full.to(w.dtype)]
    out.append(gw.to(per_sample_weights.dtype) if need_w and gw is not None else None)
    return tuple(out)
