"""Rotation trick (Fifty et al. 2024, sec. 4.2): forward copy, fused one-pass backward.

Forward: the value is ``q``; ``_rotation_trick_fwd_kernel`` copies it (BLOCK_N rows x BLOCK_D
columns per program), converting to the output dtype.

Backward: each program owns BLOCK_N rows. Every row is scaled before it is normalised: with
``m_x = max |x|`` and ``x1 = x / m_x`` (entries in [-1, 1], so no square overflows or
underflows), in float32,

    a1 = |e1|, b1 = |q1|, e^ = e1/a1, q^ = q1/b1, s = e^ + q^, w = s/|s|
    r1 = g1 - 2 (g1.w) w + 2 (g1.q^) e^                 # R^T g / m_g, entries O(1)
    grad_e = r1 * F,   F = (m_q / m_e) (b1 / a1) m_g     # float64: lambda |g| never overflows

Rows with ``|e|`` or ``|q|`` below ``eps_norm`` or ``|s|`` below ``eps_antipodal`` take ``g``
(straight through). A NaN or infinite entry in ``e`` or ``q`` makes ``a1`` or ``b1`` NaN (an
infinite ``m_x`` turns its own entry into ``inf * 0``), and the row's gradient is NaN. When the
whole row fits (D <= BLOCK_D) it is loaded once; wider rows loop over D in three sweeps (scaled
norms with a running maximum; ``|s|^2``, ``g1.s``, ``g1.q^``; write), re-reading from cache.
"""

import torch
import triton
import triton.language as tl

from ._common import (flat_grid, flat_program_id, g_scale, grad_factor, inv_pos, launcher, next_pow2, rcp_rn,
                      rotation_grad_rows, scaled_sumsq, tile_offsets, unit_scales)

MAX_BLOCK_D = 4096  # widest row held whole in registers; wider rows loop over D


@triton.jit
def _rotation_trick_fwd_kernel(
    p_q, p_out, N, D, N_D_TILES,
    stride_qn, stride_qd, stride_on, stride_od,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    o_n, o_d = tile_offsets(N_D_TILES, BLOCK_N, BLOCK_D)
    m = (o_n < N)[:, None] & (o_d < D)[None, :]
    b_q = tl.load(p_q + o_n[:, None] * stride_qn + o_d[None, :] * stride_qd, mask=m)
    tl.store(p_out + o_n[:, None] * stride_on + o_d[None, :] * stride_od, b_q.to(p_out.dtype.element_ty), mask=m)


@triton.jit
def _load_tiles(p_e, p_q, p_g, o_n, m_n, d0, D, stride_en, stride_ed, stride_qn, stride_qd, stride_gn, stride_gd,
                BLOCK_D: tl.constexpr):
    """The float32 ``(BLOCK_N, BLOCK_D)`` tiles of e, q and g at columns ``d0 ..`` (padding 0),
    with the columns and the mask."""
    o_d = d0 + tl.arange(0, BLOCK_D)
    m = m_n[:, None] & (o_d < D)[None, :]
    b_e = tl.load(p_e + o_n[:, None] * stride_en + o_d[None, :] * stride_ed, mask=m, other=0.0).to(tl.float32)
    b_q = tl.load(p_q + o_n[:, None] * stride_qn + o_d[None, :] * stride_qd, mask=m, other=0.0).to(tl.float32)
    b_g = tl.load(p_g + o_n[:, None] * stride_gn + o_d[None, :] * stride_gd, mask=m, other=0.0).to(tl.float32)
    return b_e, b_q, b_g, o_d, m


@triton.jit
def _store_grad(p_de, o_n, o_d, m, b_r1, b_g, b_f, b_ok, b_bad, stride_dn, stride_dd):
    """``grad_e = r1 * F`` where the rotation applies, ``g`` where it does not, NaN in a row
    with a non-finite entry in e or q."""
    b_rot = (b_r1.to(tl.float64) * b_f[:, None]).to(tl.float32)
    b_de = tl.where(b_ok[:, None], b_rot, b_g)
    b_de = tl.where(b_bad[:, None], float("nan"), b_de)
    tl.store(p_de + o_n[:, None] * stride_dn + o_d[None, :] * stride_dd, b_de.to(p_de.dtype.element_ty), mask=m)


@triton.jit
def _rotation_trick_bwd_kernel(
    p_e, p_q, p_g, p_de, N, D, EPS_N, EPS_S,
    stride_en, stride_ed, stride_qn, stride_qd, stride_gn, stride_gd, stride_dn, stride_dd,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE: tl.constexpr,
):
    pid = flat_program_id()
    o_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    zero = tl.zeros((BLOCK_N,), dtype=tl.float32)
    if SINGLE:
        b_e, b_q, b_g, o_d, m = _load_tiles(p_e, p_q, p_g, o_n, m_n, 0, D, stride_en, stride_ed, stride_qn, stride_qd,
                                            stride_gn, stride_gd, BLOCK_D)
        b_de = rotation_grad_rows(b_e, b_q, b_g, EPS_N, EPS_S)
        tl.store(p_de + o_n[:, None] * stride_dn + o_d[None, :] * stride_dd, b_de.to(p_de.dtype.element_ty), mask=m)
    else:
        # sweep 1: scaled norms of e and q, max |g|
        b_me, b_sse, b_mq, b_ssq, b_mg = zero, zero, zero, zero, zero
        b_ne2 = zero.to(tl.float64)
        b_nq2 = zero.to(tl.float64)
        for d0 in range(0, D, BLOCK_D):
            b_e, b_q, b_g, o_d, m = _load_tiles(p_e, p_q, p_g, o_n, m_n, d0, D, stride_en, stride_ed, stride_qn,
                                                stride_qd, stride_gn, stride_gd, BLOCK_D)
            b_me, b_sse, b_ne2 = scaled_sumsq(b_me, b_sse, b_ne2, b_e)
            b_mq, b_ssq, b_nq2 = scaled_sumsq(b_mq, b_ssq, b_nq2, b_q)
            b_mg = tl.maximum(b_mg, tl.max(tl.abs(b_g), axis=1))
        b_a1, b_b1, b_ok, b_ia, b_ib = unit_scales(b_me, b_sse, b_ne2, b_mq, b_ssq, b_nq2, EPS_N)
        b_pg, b_ig = g_scale(b_mg)
        # sweep 2: |s|^2, g1.s, g1.q^
        b_ss = zero
        b_gs = zero
        b_gq = zero
        for d0 in range(0, D, BLOCK_D):
            b_e, b_q, b_g, o_d, m = _load_tiles(p_e, p_q, p_g, o_n, m_n, d0, D, stride_en, stride_ed, stride_qn,
                                                stride_qd, stride_gn, stride_gd, BLOCK_D)
            b_qh = b_q * b_ib[:, None]
            b_s = b_e * b_ia[:, None] + b_qh
            b_g1 = (b_g * b_pg[:, None]) * b_ig[:, None]
            b_ss += tl.sum(b_s * b_s, axis=1)
            b_gs += tl.sum(b_g1 * b_s, axis=1)
            b_gq += tl.sum(b_g1 * b_qh, axis=1)
        b_ns = tl.sqrt_rn(b_ss)
        b_ok = b_ok & (b_ns >= EPS_S)
        b_ins = rcp_rn(tl.where(b_ok, b_ns, 1.0))  # (no 1/0 for the rows not ok)
        b_gw = b_gs * b_ins
        b_f, b_bad = grad_factor(b_me, b_mq, b_mg, b_a1, b_b1, b_ok)
        # sweep 3: write
        for d0 in range(0, D, BLOCK_D):
            b_e, b_q, b_g, o_d, m = _load_tiles(p_e, p_q, p_g, o_n, m_n, d0, D, stride_en, stride_ed, stride_qn,
                                                stride_qd, stride_gn, stride_gd, BLOCK_D)
            b_eh = b_e * b_ia[:, None]
            b_w = (b_eh + b_q * b_ib[:, None]) * b_ins[:, None]
            b_r1 = (b_g * b_pg[:, None]) * b_ig[:, None] - 2.0 * b_gw[:, None] * b_w + 2.0 * b_gq[:, None] * b_eh
            _store_grad(p_de, o_n, o_d, m, b_r1, b_g, b_f, b_ok, b_bad, stride_dn, stride_dd)


@launcher
def rotation_trick_fwd(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``(N, D), (N, D) -> (N, D)``: a copy of ``q`` (same dtype as ``q``)."""
    assert e.dim() == 2 and e.shape == q.shape, (e.shape, q.shape)
    N, D = q.shape
    # allocate
    out = torch.empty((N, D), dtype=q.dtype, device=q.device)
    if N == 0 or D == 0:
        return out
    # launch
    BLOCK_D = min(next_pow2(D), 256)
    BLOCK_N = max(1, min(4096 // BLOCK_D, next_pow2(N)))
    n_d_tiles = triton.cdiv(D, BLOCK_D)
    _rotation_trick_fwd_kernel[flat_grid(triton.cdiv(N, BLOCK_N) * n_d_tiles)](
        q, out, N, D, n_d_tiles, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
    )
    return out


@launcher
def rotation_trick_bwd(
    e: torch.Tensor, q: torch.Tensor, grad: torch.Tensor, eps_norm: float, eps_antipodal: float,
    block_d: int | None = None,
) -> torch.Tensor:
    """``(N, D)`` x3 -> gradient to ``e``, ``(N, D)`` in ``e.dtype``. Rows with ``|e|`` or
    ``|q|`` below ``eps_norm``, or ``|e^ + q^|`` below ``eps_antipodal``, take ``grad``.
    ``block_d`` forces the D tile (a power of two); rows wider than it take the looping path."""
    assert e.dim() == 2 and e.shape == q.shape == grad.shape, (e.shape, q.shape, grad.shape)
    N, D = e.shape
    # allocate
    de = torch.empty((N, D), dtype=e.dtype, device=e.device)
    if N == 0 or D == 0:
        return de
    # launch
    BLOCK_D = block_d or min(next_pow2(D), MAX_BLOCK_D)
    BLOCK_N = max(1, min(4096 // BLOCK_D, next_pow2(N), 64))
    _rotation_trick_bwd_kernel[flat_grid(triton.cdiv(N, BLOCK_N))](
        e, q, grad, de, N, D, float(eps_norm), float(eps_antipodal),
        e.stride(0), e.stride(1), q.stride(0), q.stride(1), grad.stride(0), grad.stride(1),
        de.stride(0), de.stride(1),
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, SINGLE=D <= BLOCK_D,
    )
    return de
