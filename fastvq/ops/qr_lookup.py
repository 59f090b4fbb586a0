"""qr_lookup: quotient-remainder compositional embedding lookup (plain and bag form), differentiable."""

from __future__ import annotations

from typing import Optional

import torch

from .._backend import deterministic_requested, use_triton
from ._custom_op import custom_op, first_order_only
from .._checks import assert_async, check_bool_arg, check_choice, check_float, check_int, check_same_device, check_tensor
from .._names import QR_MODES, QR_OPS
from ..reference.qr_lookup import qr_lookup_bwd_ref, qr_lookup_ref, qr_out_dim

__all__ = ["qr_lookup"]


@custom_op("fastvq::qr_lookup", mutates_args=())
def _qr_lookup_op(
    ids: torch.Tensor,
    q_weight: torch.Tensor,
    r_weight: torch.Tensor,
    op: str,
    offsets: Optional[torch.Tensor],
    mode: str,
    per_sample_weights: Optional[torch.Tensor],
    deterministic: bool,
    sparse: bool,
) -> torch.Tensor:
    # ``deterministic`` and ``sparse`` only steer the backward.
    if offsets is not None:  # data checks here: the op body runs eagerly under torch.compile too
        _check_offsets("qr_lookup", offsets, ids.shape[0])
    if use_triton("qr_lookup", ids, q_weight, r_weight):
        from ..kernels.qr_lookup import qr_lookup_fwd

        return qr_lookup_fwd(ids, q_weight, r_weight, op, offsets, mode, per_sample_weights)
    return qr_lookup_ref(ids, q_weight, r_weight, op, offsets=offsets, mode=mode,
                         per_sample_weights=per_sample_weights).contiguous()


@_qr_lookup_op.register_fake
def _(ids, q_weight, r_weight, op, offsets, mode, per_sample_weights, deterministic, sparse):
    rows = ids.shape[0] if offsets is None else offsets.shape[0]
    return q_weight.new_empty((rows, qr_out_dim(op, q_weight, r_weight)))


@custom_op("fastvq::qr_lookup_backward", mutates_args=())
def _qr_lookup_bwd_op(
    grad: torch.Tensor,
    ids: torch.Tensor,
    q_weight: torch.Tensor,
    r_weight: torch.Tensor,
    op: str,
    offsets: Optional[torch.Tensor],
    mode: str,
    per_sample_weights: Optional[torch.Tensor],
    deterministic: bool,
    sparse: bool,
    need_q: bool,
    need_r: bool,
    need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(q_rows, q_grad, r_rows, r_grad, w_grad)``. Dense: ``*_grad`` have the tables' shapes and
    ``*_rows`` are empty; sparse: ``*_rows`` (U,) int64 the touched rows, ascending, and
    ``*_grad`` (U, dim) theirs. Whatever is not needed is empty."""
    needs = (need_q, need_r, need_w)
    if use_triton("qr_lookup", grad, ids, q_weight, r_weight):
        from ..kernels.qr_lookup import qr_lookup_bwd

        parts = qr_lookup_bwd(grad, ids, q_weight, r_weight, op, offsets, mode, per_sample_weights,
                              deterministic_requested(deterministic), sparse, needs)
    else:
        parts = qr_lookup_bwd_ref(grad, ids, q_weight, r_weight, op, offsets, mode, per_sample_weights,
                                  sparse, needs)
    q_rows, q_grad, r_rows, r_grad, w_grad = parts
    return (
        ids.new_empty((0,), dtype=torch.int64) if q_rows is None else q_rows,
        q_weight.new_empty((0, q_weight.shape[1])) if q_grad is None else q_grad,
        ids.new_empty((0,), dtype=torch.int64) if r_rows is None else r_rows,
        r_weight.new_empty((0, r_weight.shape[1])) if r_grad is None else r_grad,
        grad.new_empty((0,)) if w_grad is None else w_grad,
    )


@_qr_lookup_bwd_op.register_fake
def _(grad, ids, q_weight, r_weight, op, offsets, mode, per_sample_weights, deterministic, sparse,
      need_q, need_r, need_w):
    out = []
    for need, w in ((need_q, q_weight), (need_r, r_weight)):
        if sparse and need:
            rows = w.shape[0]  # a SymInt under dynamic shapes: then no static bound
            u = torch.library.get_ctx().new_dynamic_size(max=rows if isinstance(rows, int) else None)
        else:
            u = w.shape[0] if need else 0
        out += [ids.new_empty((u if sparse else 0,), dtype=torch.int64), w.new_empty((u, w.shape[1]))]
    out.append(per_sample_weights.new_empty(ids.shape) if need_w else grad.new_empty((0,)))
    return tuple(out)


def _setup_context(ctx, inputs, output):
    ids, q_weight, r_weight, op, offsets, mode, psw, deterministic, sparse = inputs
    ctx.save_for_backward(ids, q_weight, r_weight, offsets, psw)
    ctx.op, ctx.mode, ctx.deterministic, ctx.sparse = op, mode, deterministic, sparse


def _backward(ctx, grad):
    ids, q_weight, r_weight, offsets, psw = ctx.saved_tensors
    need_q, need_r, need_w = ctx.needs_input_grad[1], ctx.needs_input_grad[2], ctx.needs_input_grad[6]
    if not (need_q or need_r or need_w):
        return None, None, None, None, None, None, None, None, None
    q_rows, gq, r_rows, gr, gw = _qr_lookup_bwd_op(
        grad, ids, q_weight, r_weight, ctx.op, offsets, ctx.mode, psw, ctx.deterministic, ctx.sparse,
        need_q, need_r, need_w)
    if ctx.sparse:  # one entry per touched row, in order: coalesced
        gq = torch.sparse_coo_tensor(q_rows[None], gq, q_weight.shape, is_coalesced=True, check_invariants=False)
        gr = torch.sparse_coo_tensor(r_rows[None], gr, r_weight.shape, is_coalesced=True, check_invariants=False)
    return (None, gq if need_q else None, gr if need_r else None, None, None, None,
            gw if need_w else None, None, None)


_qr_lookup_op.register_autograd(_backward, setup_context=_setup_context)
first_order_only(_qr_lookup_bwd_op, "qr_lookup")


def _check_offsets(name: str, offsets: torch.Tensor, n_items: int) -> None:
    """Bags must start at item 0, be in order and end within the items. Checked on the device
    (:func:`fastvq._checks.assert_async`: a ``ValueError`` at once on the CPU, an asynchronous
    device-side assert on CUDA), so the bag form reads nothing on the host either."""
    if offsets.numel() == 0:
        return
    ok = (offsets[0] == 0) & (offsets[-1] <= n_items)
    if offsets.numel() > 1:
        ok = ok & (offsets[1:] >= offsets[:-1]).all()

    def detail():
        first, last = int(offsets[0]), int(offsets[-1])
        if first != 0:
            return f"offsets[0] must be 0, got {first}"
        if last > n_items:
            return f"offsets out of range: offsets[-1] = {last} > number of ids {n_items}"
        return f"offsets must be non-decreasing (bags in order), got {offsets.tolist()[:16]}"

    assert_async(name, ok, detail)


def qr_lookup(
    ids: torch.Tensor,
    q_weight: torch.Tensor,
    r_weight: torch.Tensor,
    op: str = "add",
    *,
    offsets: torch.Tensor | None = None,
    mode: str = "sum",
    per_sample_weights: torch.Tensor | None = None,
    deterministic: bool = True,
    sparse: bool = False,
) -> torch.Tensor:
    """Quotient-remainder compositional embedding lookup (Shi et al. 2020), plain or pooled in bags.

    With ``Q = q_weight.shape[0]`` and ``R = r_weight.shape[0]``, each id is hashed to
    ``h = ids mod (Q*R)`` (non-negative, like ``torch.remainder``, exact int64 arithmetic for
    every id, negative and > 2^24 included) and row ``h // R`` of ``q_weight`` is composed with
    row ``h % R`` of ``r_weight`` in float32 by ``op``: ``"add"``, ``"mult"`` (elementwise) or
    ``"concat"`` (width ``dq + dr``).

    Args:
        ids: int64/int32 ids, any shape (1-D in the bag form).
        q_weight: ``(Q, dq)`` quotient table, float32/float16/bfloat16.
        r_weight: ``(R, dr)`` remainder table, same dtype and device; ``dr == dq`` unless "concat".
        op: ``"add"`` | ``"mult"`` | ``"concat"``.
        offsets: 1-D int, bag ``b`` is ``ids[offsets[b]:offsets[b+1]]`` (the last to the end),
            like ``nn.EmbeddingBag``; ``offsets[0]`` must be 0, non-decreasing, at most ``len(ids)``.
        mode: bag pooling, ``"sum"`` | ``"mean"``. Every item is composed first, then pooled
            (pooling first, as DLRM does, is wrong for "mult"). Empty bags give zeros.
        per_sample_weights: ``ids``-shaped float weights, bag form with ``mode="sum"`` only.
        deterministic: the table gradients are a sorted segment reduction (default: one stable
            sort of the items' table rows, then one program per table row sums its items in item
            order, bitwise reproducible, no host sync) or, when False, relaxed float32 atomic adds
            (no sort; faster under heavy row reuse, run-to-run rounding differences). Under
            ``torch.use_deterministic_algorithms(True)`` the sorted reduction runs either way.
        sparse: table gradients as ``torch.sparse_coo`` tensors of the touched rows, one entry per
            row in sorted order (for ``torch.optim.SparseAdam`` / ``Adagrad``); always the sorted
            path; also under ``torch.compile``. The number of touched rows sizes the gradient, so
            the sparse backward reads it on the host (one sync; the dense backward has none).
            The backward flags them coalesced; autograd's zero-copy hand-over into ``.grad``
            (AccumulateGrad) drops that flag, so ``.grad.is_coalesced()`` reads False although
            the contents are coalesced (``nn.Embedding(sparse=True)`` is not).

    Returns:
        ``ids.shape + (dim,)`` (plain) or ``(len(offsets), dim)`` (bags), in the tables' dtype.
        Differentiable in ``q_weight``, ``r_weight`` and ``per_sample_weights``; not in ``ids``.

    Numbers (both backends, every dtype, every op and mode): composition, pooling and gradients
    round once to the tables' dtype. A bag sum or gradient whose exact value is representable
    comes out right (within float32 rounding) even where its terms or partial sums are not
    (``q * r`` = 1e40 items, weights of 3e38, ``g * w * q`` with ``w`` = 3e38): the Triton
    kernels sum in float32 and sum a bag or table row again in float64 where that result is not
    finite, a "mult" weight above 1 multiplies an underflowed product, or a result lies in its
    dtype's top binade (at least 2^127, 2^15 for float16: float32 kept max, 2^102, 2^102 at max
    where the exact sum rounds to +inf); the reference forms these sums in float64. Those
    float64 sums are compensated and rounded once (to odd first): near the overflow midpoint the
    result is the exact sum rounded to nearest ("mean": each ``x / len`` as two float64 terms,
    and a sum within 2^-100 of its terms' magnitudes of a rounding point taken to be that point,
    so exact ties round to even). An exact result beyond the dtype's range is
    ``+-inf``, never NaN nor a finite number. A NaN table
    entry gives NaN exactly where it is used (and ``inf - inf``, ``inf * 0`` give NaN).
    ``deterministic=False`` sums table rows with float32 atomics, to the same contract: a row
    that receives a finite term beyond about ``3.4e38 / len(ids)`` (only then can its partial
    sums overflow) and whose float32 sum is not finite or reaches 2^127 is summed again on the device in
    float64 and rounded once, by one extra program that reads the ids per group of 4 such rows
    (slower; an ordinary backward pays only its launch); bfloat16 / float16 tables are rounded
    from the float32 sums by one launch (in place of torch's conversion) that sums a row again
    where it reaches the dtype's top binade. Zero-width tables
    (``dq = 0``) give empty rows and empty gradients. Bag offsets are checked on the device; nothing but the sparse
    backward reads the host.

    Example::

        >>> q, r = torch.randn(1000, 64), torch.randn(1000, 64)        # 10^6 ids in 2*10^3 rows
        >>> fastvq.qr_lookup(torch.tensor([[3, 2**40 + 5]]), q, r).shape
        torch.Size([1, 2, 64])
        >>> fastvq.qr_lookup(torch.tensor([1, 2, 3]), q, r, "mult", offsets=torch.tensor([0, 2]), mode="mean").shape
        torch.Size([2, 64])
    """
    name = "qr_lookup"
    check_tensor(name, "ids", ids)
    check_tensor(name, "q_weight", q_weight)
    check_tensor(name, "r_weight", r_weight)
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise TypeError(f"fastvq.{name}: ids must be an integer tensor (int64/int32), got {ids.dtype}")
    check_int(name, "ids", ids)
    check_float(name, "q_weight", q_weight)
    check_float(name, "r_weight", r_weight)
    if q_weight.dtype != r_weight.dtype:
        raise TypeError(
            f"fastvq.{name}: q_weight and r_weight must have one dtype, got {q_weight.dtype} and {r_weight.dtype}"
        )
    for t_name, t in (("q_weight", q_weight), ("r_weight", r_weight)):
        if t.dim() != 2:
            raise ValueError(f"fastvq.{name}: {t_name} must be a 2-D table (rows, dim), got shape {tuple(t.shape)}")
        if t.shape[0] == 0:
            raise ValueError(f"fastvq.{name}: {t_name} has no rows (shape {tuple(t.shape)})")
    if q_weight.shape[0] * r_weight.shape[0] >= 2**63:  # ids mod Q*R is exact int64 arithmetic
        raise ValueError(f"fastvq.{name}: q_weight rows x r_weight rows must be < 2**63, got "
                         f"{q_weight.shape[0]} x {r_weight.shape[0]}")
    check_choice(name, "op", op, QR_OPS)
    check_choice(name, "mode", mode, QR_MODES)
    deterministic = check_bool_arg(name, "deterministic", deterministic)
    sparse = check_bool_arg(name, "sparse", sparse)
    if op != "concat" and q_weight.shape[1] != r_weight.shape[1]:
        raise ValueError(
            f"fastvq.{name}: op {op!r} needs tables of one width, got q_weight {tuple(q_weight.shape)} "
            f"and r_weight {tuple(r_weight.shape)} (use op='concat' for different widths)"
        )
    devices = {"ids": ids, "q_weight": q_weight, "r_weight": r_weight}
    if offsets is not None:
        check_tensor(name, "offsets", offsets)
        devices["offsets"] = offsets
    if per_sample_weights is not None:
        check_tensor(name, "per_sample_weights", per_sample_weights)
        devices["per_sample_weights"] = per_sample_weights
    check_same_device(name, **devices)

    if offsets is None:
        if per_sample_weights is not None:
            raise ValueError(f"fastvq.{name}: per_sample_weights needs the bag form (pass offsets)")
        shape = ids.shape
        out = _qr_lookup_op(ids.reshape(-1), q_weight, r_weight, op, None, mode, None, deterministic, sparse)
        return out.reshape(*shape, out.shape[-1])

    if offsets.is_floating_point() or offsets.dtype == torch.bool:
        raise TypeError(f"fastvq.{name}: offsets must be an integer tensor (int64/int32), got {offsets.dtype}")
    check_int(name, "offsets", offsets)
    if offsets.dim() != 1:
        raise ValueError(f"fastvq.{name}: offsets must be 1-D, got shape {tuple(offsets.shape)}")
    if ids.dim() != 1:
        raise ValueError(f"fastvq.{name}: the bag form (offsets given) needs 1-D ids, got shape {tuple(ids.shape)}")
    if per_sample_weights is not None:
        check_float(name, "per_sample_weights", per_sample_weights)
        if mode != "sum":
            raise ValueError(f"fastvq.{name}: per_sample_weights needs mode='sum' (like torch), got mode={mode!r}")
        if per_sample_weights.shape != ids.shape:
            raise ValueError(
                f"fastvq.{name}: per_sample_weights must have the shape of ids {tuple(ids.shape)}, "
                f"got {tuple(per_sample_weights.shape)}"
            )
    return _qr_lookup_op(ids, q_weight, r_weight, op, offsets, mode, per_sample_weights, deterministic, sparse)
