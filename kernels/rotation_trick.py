"""Rotation trick (Fifty et al. 2024, sec. 4.2): forward copy, fused one-pass backward.

Forward: the value is ``q``; ``_rotation_trick_fwd_kernel`` copies it (BLOCK_N rows x BLOCK_D
columns per program), converting to the output dtype.

Backward: each program owns BLOCK_N rows. When the whole row fits (D <= BLOCK_D) it loads
``e``, ``q``, ``g`` once and computes, in float32,

    a = |e|, b = |q|, e^ = e/a, q^ = q/b, s = e^ + q^, w = s/|s|
    grad_e = (b/a) * (g - 2 (g.w) w + 2 (g.q^) e^)

falling back to ``g`` on rows with ``a`` or ``b`` below ``EPS_NORM`` or ``|s|`` below
``EPS_ANTIPODAL``. Wider rows loop over D in three sweeps (norms; ``|s|^2``, ``g.s``, ``g.q``;
write), which re-read the row from cache.
"""

import torch
import triton
import triton.language as tl

from fastvq.reference.rotation_trick import EPS_ANTIPODAL, EPS_NORM

from ._common import launcher, next_pow2

MAX_BLOCK_D = 4096  # widest row held whole in registers; wider rows loop over D


@triton.jit
def _rotation_trick_fwd_kernel(
    p_q, p_out, N, D,
    stride_qn, stride_qd, stride_on, stride_od,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1).to(tl.int64)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m = (o_n < N)[:, None] & (o_d < D)[None, :]
    b_q = tl.load(p_q + o_n[:, None] * stride_qn + o_d[None, :] * stride_qd, mask=m)
    tl.store(p_out + o_n[:, None] * stride_on + o_d[None, :] * stride_od, b_q.to(p_out.dtype.element_ty), mask=m)


@triton.jit
def _rotation_trick_bwd_kernel(
    p_e, p_q, p_g, p_de, N, D,
    stride_en, stride_ed, stride_qn, stride_qd, stride_gn, stride_gd, stride_dn, stride_dd,
    EPS_N: tl.constexpr, EPS_S: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, SINGLE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    o_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    if SINGLE:
        o_d = tl.arange(0, BLOCK_D)
        m = m_n[:, None] & (o_d < D)[None, :]
        b_e = tl.load(p_e + o_n[:, None] * stride_en + o_d[None, :] * stride_ed, mask=m, other=0.0).to(tl.float32)
        b_q = tl.load(p_q + o_n[:, None] * stride_qn + o_d[None, :] * stride_qd, mask=m, other=0.0).to(tl.float32)
        b_g = tl.load(p_g + o_n[:, None] * stride_gn + o_d[None, :] * stride_gd, mask=m, other=0.0).to(tl.float32)
        b_a = tl.sqrt(tl.sum(b_e * b_e, axis=1))
        b_b = tl.sqrt(tl.sum(b_q * b_q, axis=1))
        b_ok = (b_a >= EPS_N) & (b_b >= EPS_N)
        b_ia = 1.0 / tl.where(b_ok, b_a, 1.0)
        b_ib = 1.0 / tl.where(b_ok, b_b, 1.0)
        b_eh = b_e * b_ia[:, None]
        b_qh = b_q * b_ib[:, None]
        b_s = b_eh + b_qh
        b_ns = tl.sqrt(tl.sum(b_s * b_s, axis=1))
        b_ok = b_ok & (b_ns >= EPS_S)
        b_w = b_s * (1.0 / tl.where(b_ok, b_ns, 1.0))[:, None]
        b_gw = tl.sum(b_g * b_w, axis=1)
        b_gq = tl.sum(b_g * b_qh, axis=1)
        b_lam = b_b * b_ia
        b_rot = b_lam[:, None] * (b_g - 2.0 * b_gw[:, None] * b_w + 2.0 * b_gq[:, None] * b_eh)
        b_de = tl.where(b_ok[:, None], b_rot, b_g)
        tl.store(p_de + o_n[:, None] * stride_dn + o_d[None, :] * stride_dd, b_de.to(p_de.dtype.element_ty), mask=m)
    else:
        # sweep 1: norms
        b_ee = tl.zeros((BLOCK_N,), dtype=tl.float32)
        b_qq = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m = m_n[:, None] & (o_d < D)[None, :]
            b_e = tl.load(p_e + o_n[:, None] * stride_en + o_d[None, :] * stride_ed, mask=m, other=0.0).to(tl.float32)
            b_q = tl.load(p_q + o_n[:, None] * stride_qn + o_d[None, :] * stride_qd, mask=m, other=0.0).to(tl.float32)
            b_ee += tl.sum(b_e * b_e, axis=1)
            b_qq += tl.sum(b_q * b_q, axis=1)
        b_a = tl.sqrt(b_ee)
        b_b = tl.sqrt(b_qq)
        b_ok = (b_a >= EPS_N) & (b_b >= EPS_N)
        b_ia = 1.0 / tl.where(b_ok, b_a, 1.0)
        b_ib = 1.0 / tl.where(b_ok, b_b, 1.0)
        # sweep 2: |s|^2, g.s, g.q^
        b_ss = tl.zeros((BLOCK_N,), dtype=tl.float32)
        b_gs = tl.zeros((BLOCK_N,), dtype=tl.float32)
        b_gq = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m = m_n[:, None] & (o_d < D)[None, :]
            b_e = tl.load(p_e + o_n[:, None] * stride_en + o_d[None, :] * stride_ed, mask=m, other=0.0).to(tl.float32)
            b_q = tl.load(p_q + o_n[:, None] * stride_qn + o_d[None, :] * stride_qd, mask=m, other=0.0).to(tl.float32)
            b_g = tl.load(p_g + o_n[:, None] * stride_gn + o_d[None, :] * stride_gd, mask=m, other=0.0).to(tl.float32)
            b_qh = b_q * b_ib[:, None]
            b_s = b_e * b_ia[:, None] + b_qh
            b_ss += tl.sum(b_s * b_s, axis=1)
            b_gs += tl.sum(b_g * b_s, axis=1)
            b_gq += tl.sum(b_g * b_qh, axis=1)
        b_ns = tl.sqrt(b_ss)
        b_ok = b_ok & (b_ns >= EPS_S)
        b_ins = 1.0 / tl.where(b_ok, b_ns, 1.0)
        b_gw = b_gs * b_ins
        b_lam = b_b * b_ia
        # sweep 3: write
        for d0 in range(0, D, BLOCK_D):
            o_d = d0 + tl.arange(0, BLOCK_D)
            m = m_n[:, None] & (o_d < D)[None, :]
            b_e = tl.load(p_e + o_n[:, None] * stride_en + o_d[None, :] * stride_ed, mask=m, other=0.0).to(tl.float32)
            b_q = tl.load(p_q + o_n[:, None] * stride_qn + o_d[None, :] * stride_qd, mask=m, other=0.0).to(tl.float32)
            b_g = tl.load(p_g + o_n[:, None] * stride_gn + o_d[None, :] * stride_gd, mask=m, other=0.0).to(tl.float32)
            b_eh = b_e * b_ia[:, None]
            b_w = (b_eh + b_q * b_ib[:, None]) * b_ins[:, None]
            b_rot = b_lam[:, None] * (b_g - 2.0 * b_gw[:, None] * b_w + 2.0 * b_gq[:, None] * b_eh)
            b_de = tl.where(b_ok[:, None], b_rot, b_g)
            tl.store(p_de + o_n[:, None] * stride_dn + o_d[None, :] * stride_dd, b_de.to(p_de.dtype.element_ty), mask=m)


def _check_2d(name, *ts):
    shape = ts[0].shape
    for t in ts:
        if t.dim() != 2 or t.shape != shape:
            raise ValueError(f"{name}: expected equal (N, D) shapes, got {[tuple(x.shape) for x in ts]}")


@launcher
def rotation_trick_fwd(e: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``(N, D), (N, D) -> (N, D)``: a copy of ``q`` (same dtype as ``q``)."""
    # check
    _check_2d("rotation_trick_fwd", e, q)
    N, D = q.shape
    # allocate
    out = torch.empty((N, D), dtype=q.dtype, device=q.device)
    if N == 0 or D == 0:
        return out
    # launch
    BLOCK_D = min(next_pow2(D), 256)
    BLOCK_N = max(1, min(4096 // BLOCK_D, next_pow2(N)))
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(D, BLOCK_D))
    _rotation_trick_fwd_kernel[grid](
        q, out, N, D, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D,
    )
    return out


@launcher
def rotation_trick_bwd(
    e: torch.Tensor, q: torch.Tensor, grad: torch.Tensor, block_d: int | None = None
) -> torch.Tensor:
    """``(N, D)`` x3 -> gradient to ``e``, ``(N, D)`` in ``e.dtype``. ``block_d`` forces the
    D tile (a power of two); rows wider than it take the looping path."""
    # check
    _check_2d("rotation_trick_bwd", e, q, grad)
    N, D = e.shape
    # allocate
    de = torch.empty((N, D), dtype=e.dtype, device=e.device)
    if N == 0 or D == 0:
        return de
    # launch
    BLOCK_D = block_d or min(next_pow2(D), MAX_BLOCK_D)
    single = D <= BLOCK_D
    BLOCK_N = max(1, min(4096 // BLOCK_D, next_pow2(N), 64))
    grid = (triton.cdiv(N, BLOCK_N),)
    _rotation_trick_bwd_kernel[grid](
        e, q, grad, de, N, D,
        e.stride(0), e.stride(1), q.stride(0), q.stride(1), grad.stride(0), grad.stride(1),
        de.stride(0), de.stride(1),
        EPS_N=EPS_NORM, EPS_S=EPS_ANTIPODAL,
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, SINGLE=single,
    )
    return de
