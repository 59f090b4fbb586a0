"""Quotient-remainder compositional embeddings: fused lookup (plain and bag) and scatter-add backward.

Forward: each program hashes its ids (``h = id mod (Q*R)``, non-negative, exact int64
arithmetic), gathers row ``h // R`` of the quotient table and row ``h % R`` of the remainder
table, composes them in float32 ("add", "mult" or "concat") and stores one output tile.
The bag kernel owns one bag x one D tile and sums its composed items (times their
per-sample weights, or divided by the bag length for "mean") before the single store.

Backward, deterministic (default): the launcher stable-sorts each table's row indices; one
program per (touched row, D tile) sums that row's gradient contributions in sorted order
(so in item order) in float32 and stores the row once: bitwise reproducible. The atomic
path (``deterministic=False``) scatters with float32 ``tl.atomic_add`` instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastvq.reference.qr_lookup import bag_layout, item_scale, qr_indices, qr_out_dim

from ._common import launcher, next_pow2

OP_CODES = {"add": 0, "mult": 1, "concat": 2}


@triton.jit
def _qr_hash(b_ids, M, R):
    b_ids = b_ids.to(tl.int64)
    b_h = b_ids % M
    b_h = tl.where(b_h < 0, b_h + M, b_h)  # C-style remainder on the GPU; floor mod is already >= 0
    b_qi = b_h // R
    return b_qi, b_h - b_qi * R


@triton.jit
def _qr_compose(
    p_qw, p_rw, b_qi, b_ri, m_n, o_d, DQ, DR,
    stride_qn, stride_qd, stride_rn, stride_rd, OP: tl.constexpr,
):
    """float32 (BLOCK, BLOCK_D) composed rows; zeros where ``m_n`` or the column is masked."""
    if OP == 2:  # concat: columns [0, DQ) from q, [DQ, DQ + DR) from r
        o_r = o_d - DQ
        m_q = m_n[:, None] & (o_d < DQ)[None, :]
        m_r = m_n[:, None] & ((o_r >= 0) & (o_r < DR))[None, :]
    else:
        o_r = o_d
        m_q = m_n[:, None] & (o_d < DQ)[None, :]
        m_r = m_q
    b_q = tl.load(p_qw + b_qi[:, None] * stride_qn + o_d[None, :] * stride_qd, mask=m_q, other=0.0).to(tl.float32)
    b_r = tl.load(p_rw + b_ri[:, None] * stride_rn + o_r[None, :] * stride_rd, mask=m_r, other=0.0).to(tl.float32)
    if OP == 1:
        b_c = b_q * b_r
    else:
        b_c = b_q + b_r
    return b_c


@triton.jit
def _qr_lookup_fwd_kernel(
    p_ids, p_qw, p_rw, p_out,
    N, M, R, DQ, DR, DOUT,
    stride_qn, stride_qd, stride_rn, stride_rd, stride_on, stride_od,
    OP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_n = o_n < N
    b_qi, b_ri = _qr_hash(tl.load(p_ids + o_n, mask=m_n, other=0), M, R)
    b_c = _qr_compose(p_qw, p_rw, b_qi, b_ri, m_n, o_d, DQ, DR, stride_qn, stride_qd, stride_rn, stride_rd, OP)
    m = m_n[:, None] & (o_d < DOUT)[None, :]
    tl.store(p_out + o_n[:, None] * stride_on + o_d[None, :] * stride_od, b_c.to(p_out.dtype.element_ty), mask=m)


@triton.jit
def _qr_lookup_bag_fwd_kernel(
    p_ids, p_offsets, p_psw, p_qw, p_rw, p_out,
    N, B, M, R, DQ, DR, DOUT,
    stride_qn, stride_qd, stride_rn, stride_rd, stride_on, stride_od,
    OP: tl.constexpr, HAS_W: tl.constexpr, MEAN: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_b = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    o_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    start = tl.load(p_offsets + pid_b).to(tl.int64)
    end = tl.load(p_offsets + pid_b + 1, mask=pid_b + 1 < B, other=N).to(tl.int64)
    b_acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for l0 in range(start, end, BLOCK_L):
        o_l = l0 + tl.arange(0, BLOCK_L)
        m_l = o_l < end
        b_qi, b_ri = _qr_hash(tl.load(p_ids + o_l, mask=m_l, other=0), M, R)
        b_c = _qr_compose(p_qw, p_rw, b_qi, b_ri, m_l, o_d, DQ, DR, stride_qn, stride_qd, stride_rn, stride_rd, OP)
        if HAS_W:
            b_w = tl.load(p_psw + o_l, mask=m_l, other=0.0).to(tl.float32)
            b_c = b_c * b_w[:, None]
        b_acc += b_c
    b_out = tl.sum(b_acc, axis=0)
    if MEAN:
        b_out = b_out / tl.maximum(end - start, 1).to(tl.float32)
    tl.store(p_out + pid_b * stride_on + o_d * stride_od, b_out.to(p_out.dtype.element_ty), mask=o_d < DOUT)


@triton.jit
def _qr_item_grad(
    p_g, p_item_row, p_scale, p_ow, p_oidx, b_item, m_l, o_d, D, COL_OFF,
    stride_gn, stride_gd, stride_own, stride_owd,
    HAS_ROW: tl.constexpr, HAS_SCALE: tl.constexpr, MULT: tl.constexpr,
):
    """float32 (BLOCK_L, BLOCK_D) gradient contribution of items ``b_item`` to their table row."""
    m = m_l[:, None] & (o_d < D)[None, :]
    if HAS_ROW:
        b_row = tl.load(p_item_row + b_item, mask=m_l, other=0)
    else:
        b_row = b_item
    b_g = tl.load(p_g + b_row[:, None] * stride_gn + (COL_OFF + o_d)[None, :] * stride_gd, mask=m, other=0.0)
    b_g = b_g.to(tl.float32)
    if HAS_SCALE:
        b_g = b_g * tl.load(p_scale + b_item, mask=m_l, other=0.0)[:, None]
    if MULT:
        b_oi = tl.load(p_oidx + b_item, mask=m_l, other=0)
        b_o = tl.load(p_ow + b_oi[:, None] * stride_own + o_d[None, :] * stride_owd, mask=m, other=0.0)
        b_g = b_g * b_o.to(tl.float32)
    return b_g


@triton.jit
def _qr_lookup_bwd_kernel(
    p_g, p_perm, p_item_row, p_scale, p_ow, p_oidx, p_seg_start, p_seg_end, p_seg_row, p_dw,
    D, COL_OFF,
    stride_gn, stride_gd, stride_own, stride_owd, stride_dn, stride_dd,
    HAS_ROW: tl.constexpr, HAS_SCALE: tl.constexpr, MULT: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """One (touched row, D tile) per program; items in the row's sorted segment, in order."""
    pid_s = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    o_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    start = tl.load(p_seg_start + pid_s)
    end = tl.load(p_seg_end + pid_s)
    b_acc = tl.zeros((BLOCK_L, BLOCK_D), dtype=tl.float32)
    for l0 in range(start, end, BLOCK_L):
        o_l = l0 + tl.arange(0, BLOCK_L)
        m_l = o_l < end
        b_item = tl.load(p_perm + o_l, mask=m_l, other=0)
        b_acc += _qr_item_grad(p_g, p_item_row, p_scale, p_ow, p_oidx, b_item, m_l, o_d, D, COL_OFF,
                               stride_gn, stride_gd, stride_own, stride_owd, HAS_ROW, HAS_SCALE, MULT)
    b_dw = tl.sum(b_acc, axis=0)
    row = tl.load(p_seg_row + pid_s)
    tl.store(p_dw + row * stride_dn + o_d * stride_dd, b_dw.to(p_dw.dtype.element_ty), mask=o_d < D)


@triton.jit
def _qr_lookup_bwd_atomic_kernel(
    p_g, p_idx, p_item_row, p_scale, p_ow, p_oidx, p_dw,
    N, D, COL_OFF,
    stride_gn, stride_gd, stride_own, stride_owd, stride_dn, stride_dd,
    HAS_ROW: tl.constexpr, HAS_SCALE: tl.constexpr, MULT: tl.constexpr,
    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """BLOCK_L items x one D tile per program, float32 atomic adds into their table rows."""
    pid_l = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    o_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    o_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_l = o_l < N
    b_g = _qr_item_grad(p_g, p_item_row, p_scale, p_ow, p_oidx, o_l, m_l, o_d, D, COL_OFF,
                        stride_gn, stride_gd, stride_own, stride_owd, HAS_ROW, HAS_SCALE, MULT)
    b_idx = tl.load(p_idx + o_l, mask=m_l, other=0)
    m = m_l[:, None] & (o_d < D)[None, :]
    tl.atomic_add(p_dw + b_idx[:, None] * stride_dn + o_d[None, :] * stride_dd, b_g, mask=m)


# ----------------------------------------------------------------------------- launchers


def _check(name, ids, q_weight, r_weight, op, offsets):
    if ids.dim() != 1 or ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{name}: expected 1-D int ids, got {tuple(ids.shape)} {ids.dtype}")
    if q_weight.dim() != 2 or r_weight.dim() != 2 or q_weight.dtype != r_weight.dtype:
        raise ValueError(f"{name}: expected 2-D tables of one dtype, got {tuple(q_weight.shape)} "
                         f"{q_weight.dtype} and {tuple(r_weight.shape)} {r_weight.dtype}")
    if op not in OP_CODES or (op != "concat" and q_weight.shape[1] != r_weight.shape[1]):
        raise ValueError(f"{name}: bad op {op!r} for widths {q_weight.shape[1]}, {r_weight.shape[1]}")
    if offsets is not None and offsets.dim() != 1:
        raise ValueError(f"{name}: offsets must be 1-D, got {tuple(offsets.shape)}")


def _block_d(D: int) -> int:
    return min(next_pow2(max(D, 1)), 128)


@launcher
def qr_lookup_fwd(
    ids: torch.Tensor,
    q_weight: torch.Tensor,
    r_weight: torch.Tensor,
    op: str,
    offsets: torch.Tensor | None = None,
    mode: str = "sum",
    per_sample_weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """``ids (N,)`` -> ``(N, dim)``, or with ``offsets (B,)`` -> ``(B, dim)``, in the tables' dtype."""
    # check
    _check("qr_lookup_fwd", ids, q_weight, r_weight, op, offsets)
    N = ids.shape[0]
    Q, R = q_weight.shape[0], r_weight.shape[0]
    DQ, DR = q_weight.shape[1], r_weight.shape[1]
    DOUT = qr_out_dim(op, q_weight, r_weight)
    ids = ids.contiguous()
    BLOCK_D = _block_d(DOUT)
    # allocate + launch
    if offsets is None:
        out = torch.empty((N, DOUT), dtype=q_weight.dtype, device=q_weight.device)
        if N == 0 or DOUT == 0:
            return out
        BLOCK_N = max(1, min(4096 // BLOCK_D, 64, next_pow2(N)))
        grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(DOUT, BLOCK_D))
        _qr_lookup_fwd_kernel[grid](
            ids, q_weight, r_weight, out, N, Q * R, R, DQ, DR, DOUT,
            q_weight.stride(0), q_weight.stride(1), r_weight.stride(0), r_weight.stride(1),
            out.stride(0), out.stride(1),
            OP=OP_CODES[op], BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
        )
        return out
    B = offsets.shape[0]
    out = torch.empty((B, DOUT), dtype=q_weight.dtype, device=q_weight.device)
    if B == 0 or DOUT == 0:
        return out
    offsets = offsets.long().contiguous()
    psw = per_sample_weights.contiguous() if per_sample_weights is not None else ids
    BLOCK_L = max(1, min(16, 4096 // BLOCK_D))
    grid = (B, triton.cdiv(DOUT, BLOCK_D))
    _qr_lookup_bag_fwd_kernel[grid](
        ids, offsets, psw, q_weight, r_weight, out, N, B, Q * R, R, DQ, DR, DOUT,
        q_weight.stride(0), q_weight.stride(1), r_weight.stride(0), r_weight.stride(1),
        out.stride(0), out.stride(1),
        OP=OP_CODES[op], HAS_W=per_sample_weights is not None, MEAN=mode == "mean",
        BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D,
    )
    return out


def _item_layout(ids, offsets, mode, per_sample_weights):
    """``(grad row of each item or None, float32 scale of each item or None)``."""
    if offsets is None:
        return None, None
    bag_of, lengths = bag_layout(offsets, ids.shape[0])
    scale = item_scale(bag_of, lengths, mode, per_sample_weights)
    return bag_of.contiguous(), None if scale is None else scale.contiguous()


def _table_specs(op, q_weight, r_weight, qi, ri):
    """Per table: (weight, its row of each item, other table, other table's row of each item, column offset)."""
    dq = q_weight.shape[1]
    return (
        (q_weight, qi, r_weight, ri, 0),
        (r_weight, ri, q_weight, qi, dq if op == "concat" else 0),
    )


def _bwd_items(ids, q_weight, r_weight, op, offsets, mode, per_sample_weights):
    """Both backward paths start here: check, drop the items when there are no bags, and map
    each item to its quotient row, remainder row, output row and scale."""
    _check("qr_lookup_bwd", ids, q_weight, r_weight, op, offsets)
    if offsets is not None and offsets.numel() == 0:  # no bags: no item reaches the output
        ids = ids[:0]
    ids = ids.contiguous()
    qi, ri = qr_indices(ids, q_weight.shape[0], r_weight.shape[0])
    item_row, scale = _item_layout(ids, offsets, mode, per_sample_weights)
    return ids, qi, ri, item_row, scale


@launcher
def qr_lookup_bwd_rows(
    grad: torch.Tensor,
    ids: torch.Tensor,
    q_weight: torch.Tensor,
    r_weight: torch.Tensor,
    op: str,
    offsets: torch.Tensor | None = None,
    mode: str = "sum",
    per_sample_weights: torch.Tensor | None = None,
    dense: bool = True,
    needs: tuple[bool, bool] = (True, True),
) -> list:
    """Deterministic sorted-segment backward.

    For each table (quotient, remainder; ``None`` where ``needs`` is False): ``dense=True`` gives
    the dense gradient (the table's shape and dtype, untouched rows zero); ``dense=False`` gives
    ``(rows, values)``, the sorted unique touched rows (int64) and their gradients ``(U, D)``.
    """
    ids, qi, ri, item_row, scale = _bwd_items(ids, q_weight, r_weight, op, offsets, mode, per_sample_weights)
    results = []
    for need, (w, idx, ow, oidx, col_off) in zip(needs, _table_specs(op, q_weight, r_weight, qi, ri)):
        if not need:
            results.append(None)
            continue
        D = w.shape[1]
        sorted_idx, perm = torch.sort(idx, stable=True)
        rows, counts = torch.unique_consecutive(sorted_idx, return_counts=True)
        seg_end = torch.cumsum(counts, 0)
        seg_start = seg_end - counts
        U = rows.shape[0]
        # allocate
        if dense:
            dw = torch.zeros(w.shape, dtype=w.dtype, device=w.device)
            dst_rows = rows
        else:
            dw = torch.empty((U, D), dtype=w.dtype, device=w.device)
            dst_rows = torch.arange(U, device=w.device)
        # launch
        if U > 0 and D > 0:
            BLOCK_D = _block_d(D)
            BLOCK_L = max(1, min(16, 4096 // BLOCK_D))
            grid = (U, triton.cdiv(D, BLOCK_D))
            _qr_lookup_bwd_kernel[grid](
                grad, perm, item_row if item_row is not None else perm, scale if scale is not None else grad,
                ow, oidx, seg_start, seg_end, dst_rows, dw,
                D, col_off,
                grad.stride(0), grad.stride(1), ow.stride(0), ow.stride(1), dw.stride(0), dw.stride(1),
                HAS_ROW=item_row is not None, HAS_SCALE=scale is not None, MULT=op == "mult",
                BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D,
            )
        results.append(dw if dense else (rows, dw))
    return results


@launcher
def qr_lookup_bwd(
    grad: torch.Tensor,
    ids: torch.Tensor,
    q_weight: torch.Tensor,
    r_weight: torch.Tensor,
    op: str,
    offsets: torch.Tensor | None = None,
    mode: str = "sum",
    per_sample_weights: torch.Tensor | None = None,
    deterministic: bool = True,
    needs: tuple[bool, bool] = (True, True),
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Dense ``(grad_q_weight, grad_r_weight)``; sorted segments (deterministic) or float32 atomics."""
    if deterministic:
        gq, gr = qr_lookup_bwd_rows(grad, ids, q_weight, r_weight, op, offsets, mode, per_sample_weights,
                                    dense=True, needs=needs)
        return gq, gr
    ids, qi, ri, item_row, scale = _bwd_items(ids, q_weight, r_weight, op, offsets, mode, per_sample_weights)
    N = ids.shape[0]
    results = []
    for need, (w, idx, ow, oidx, col_off) in zip(needs, _table_specs(op, q_weight, r_weight, qi, ri)):
        if not need:
            results.append(None)
            continue
        D = w.shape[1]
        # allocate
        dw = torch.zeros(w.shape, dtype=torch.float32, device=w.device)
        # launch
        if N > 0 and D > 0:
            BLOCK_D = _block_d(D)
            BLOCK_L = max(1, min(64, 4096 // BLOCK_D))
            grid = (triton.cdiv(N, BLOCK_L), triton.cdiv(D, BLOCK_D))
            _qr_lookup_bwd_atomic_kernel[grid](
                grad, idx, item_row if item_row is not None else idx, scale if scale is not None else grad,
                ow, oidx, dw, N, D, col_off,
                grad.stride(0), grad.stride(1), ow.stride(0), ow.stride(1), dw.stride(0), dw.stride(1),
                HAS_ROW=item_row is not None, HAS_SCALE=scale is not None, MULT=op == "mult",
                BLOCK_L=BLOCK_L, BLOCK_D=BLOCK_D,
            )
        results.append(dw.to(w.dtype))
    return results[0], results[1]
