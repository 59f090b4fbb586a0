"""Pure-torch reference for :func:`fastvq.pairwise_kl_loss`, in row chunks.

Notation (the kernels use the same): for rows ``i != j`` of a batch of ``B``,
``s_ij = pred_i . pred_j / T`` and ``t_ij = target_i . target_j / T``. Row ``i`` takes a
softmax over ``j != i`` (its own diagonal excluded exactly), giving ``p_ij`` and ``q_ij`` with
log-normalisers ``lse_p[i]`` and ``lse_t[i]``, and

    loss = (1 / B) * sum_i sum_{j != i} q_ij * (log q_ij - log p_ij)

which is ``KL(target || pred)`` averaged over rows (``nn.KLDivLoss(reduction="batchmean",
log_target=True)``). A batch with ``B <= 1`` has no off-diagonal pair: its loss is 0. A loss
beyond float32 is +inf (the op turns the loss NaN for NaN/inf inputs).

The gradient is ``dL/dpred = (H @ pred) / (B * T)`` with ``H = G + G^T`` and
``G_ij = p_ij - q_ij`` off the diagonal, 0 on it. Only ``(chunk, B)`` blocks are ever held.

Scaling (the kernels do the same): a dot product ``x_i . x_j`` can overflow float32 where the
logit ``x_i . x_j / T`` does not (``T > 1``), and rows of very different magnitudes lose their
small products to underflow. So each row is scaled by its own power of two first,
``u_i = x_i 2^-e_i`` (``|u_i| < 1``; ``e_i`` clamped so that the factors below stay normal),
and the logit is ``(u_i . u_j) * R_i * C_j`` with ``R_i = m 2^(e_i + fa)``, ``C_j = 2^(e_j + fb)``
and ``1 / T = m 2^(fa + fb)``: exact powers of two, so the logit is rounded once, and
``R_i C_j`` is a normal float32 at every magnitude.

That float32 logit is right wherever neither row's exponent is clamped at the top (``|u| < 1``)
and ``R_i C_j < 2^110``: no product or sum overflows, and underflow costs at most ``2^-150 R_i C_j``
per rounding (``D 2^-40`` in all). A row outside that (pred's or target's ``e_i >= big``:
clamped at ``hi = 62 - fb``, or ``2 e_i + fa + fb >= 110``; ``max |x| >= 2^54`` at T = 1) can have
products beyond float32 that cancel to a representable logit, or its partner can hold an entry
``2^-149`` below its own maximum that ``u`` flushes to 0 though the product is large: every pair
of such a row takes both logits (pred's and target's) from the float64 dot of the rows as given
(float32/bf16 products are exact in float64; the sum is rounded to float64, error
``<= D 2^-53 sum_k |x_ik x_jk| / T``), scaled by the same float32 ``m``, rounded once to
float32 where float32 holds it and beyond it to float32's 24 significant bits with float64's
exponent (:func:`round24`; rows ~1e20: logits ~1e40). Such a
logit enters its row's largest logit, softmax and KL terms, so those are float64 too: here every
chunk is computed in float64 once any row is wide (the normalisers ``lse`` are float64 always),
behind one host read of whether any row is; the Triton kernels test the rows' exponents per tile
(no work per element otherwise), carry a row block's online state in float64 through a second
loop over the flagged pairs, and read the normalisers as float32 in their main loops (+inf
beyond float32: probability 0, as exactly).

The KL terms
``q_ij ((t_ij - lse_t) - (s_ij - lse_p))`` are formed at half scale (each bracket can reach
``-2 * float32max`` where the logits are float32) and the rows' KLs are divided by B and summed
in float64, so the loss is +inf exactly where it overflows float32.

Each row's KL is >= 0 in exact arithmetic, so a row whose computed KL rounds below 0 (its
exact KL is then within its rounding bound of 0: -4e-8 at T = 1000) counts as 0, and the loss is
never negative (NaN stays NaN). The clamp corrects the value, not the function: the gradient
stays that of the KL, ``G = P - Q``. The exact KL is smooth there and its slope is what training
follows; the gradient of ``max(KL, 0)`` would be 0 exactly where the rounding happened to fall
below 0, stopping the row at random, and the clamp would then decide a gradient that the exact
loss does not have.
"""

from __future__ import annotations

import math

import torch

from ._chunks import row_chunk


F32_MAX = float(torch.finfo(torch.float32).max)

# log2 of R_i C_j up to which a pair's logit may come from the float32 dot (module docstring)
WIDE_LOGIT_FACTOR = 110


def logit_scaling(temperature: float, d: int = 1):
    """``(m, fa, fb, lo, hi, big)``: ``1 / T = m 2^(fa + fb)`` (``m`` in [0.5, 1], rounded to float32
    as the kernels' factors hold it, so both backends and their float64 logits use one ``m``; ``fb - fa`` in
    {0, 1}), the clamp ``[lo, hi]`` of the row exponents that keeps ``2^(e + fa)``, ``2^(e + fb)`` in
    ``[2^-62, 2^62]`` (so ``R_i C_j`` is normal) and ``2^-e`` a normal float32, and ``big``: a row
    whose pred or target exponent is ``>= big`` takes the logits of all its pairs from float64
    (:func:`wide_rows`): every row clamped at ``hi``, and any ``e`` with ``2 e + fa + fb`` reaching
    :data:`WIDE_LOGIT_FACTOR`, so that two rows below it have ``R_i C_j < 2^110``. ``d``: the
    longer of the rows (``max(Dp, Dt)``): such a float32 logit is below ``d R_i C_j``, so from
    ``2^18`` features on the factor lowers to ``128 - bitlen(d)`` and the logit stays below 2^127."""
    m, f = math.frexp(1.0 / float(temperature))
    m = round(m * 2.0**24) / 2.0**24  # as float32 holds it (half to even; 1.0 stays exact)
    fa = f // 2
    fb = f - fa
    hi = min(126, 62 - fb)
    factor = min(WIDE_LOGIT_FACTOR, 128 - max(int(d), 1).bit_length())
    return m, fa, fb, max(-126, -62 - fa), hi, min(hi, -((fa + fb - factor) // 2))


def row_max(x: torch.Tensor) -> torch.Tensor:
    """``max_d |x_id|`` per row, float32 (0 for D = 0; NaN for a row with a NaN, inf for one with
    an inf): one read of ``x``. The op computes it once, for its finiteness check and the scaling."""
    if x.shape[1] == 0:  # D = 0: every logit is 0
        return torch.zeros(x.shape[0], dtype=torch.float32, device=x.device)
    # (aminmax, not vector_norm(x, inf): on CUDA that materialises |x|, an input-sized buffer:
    # 64 MB more peak memory at B = 65,536 rows of 256 on the H200 run)
    lo, hi = torch.aminmax(x, dim=1)
    return torch.maximum(hi, -lo).float()


def row_exponents(amax: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """int32 ``e_i`` with ``amax_i < 2^e_i`` (``>= 2^(e_i - 1)``), clamped to ``[lo, hi]`` (0 for
    a zero row; anything in range for a row that is not finite)."""
    return torch.frexp(amax).exponent.clamp(lo, hi).to(torch.int32)


def wide_rows(ep: torch.Tensor, et: torch.Tensor, big: int) -> torch.Tensor:
    """bool per row: its pred or target exponent (:func:`row_exponents`) is ``>= big``
    (:func:`logit_scaling`), so every pair ``(i, j)`` with row ``i`` or ``j`` flagged takes both its
    logits from float64 (module docstring). Per row, so the kernels' forward and backward, tiled
    differently, agree on every pair."""
    return torch.maximum(ep, et) >= big


def _scaled(x32: torch.Tensor, amax: torch.Tensor, temperature: float):
    """``(u, R, C, e)`` for the rows of ``x32`` (float32; ``amax``: their :func:`row_max`):
    ``x_i . x_j / T = (u_i . u_j) R_i C_j``, ``e`` the rows' exponents."""
    m, fa, fb, lo, hi, _ = logit_scaling(temperature)
    e = row_exponents(amax, lo, hi)
    one = torch.ones(e.shape, dtype=torch.float32, device=x32.device)
    u = x32 * torch.ldexp(one, -e)[:, None]
    return u, torch.ldexp(one, e + fa) * m, torch.ldexp(one, e + fb), e


def _wide_setup(p32, t32, ep, et, temperature: float):
    """``None`` if no row needs float64 logits (:func:`wide_rows`; one host read), else
    ``(p64, t64, scale, flags)``: the rows in float64, ``scale = m 2^(fa + fb)`` and the rows'
    flags."""
    m, fa, fb, _, _, big = logit_scaling(temperature, max(p32.shape[1], t32.shape[1]))
    flags = wide_rows(ep, et, big)
    if not bool(flags.any()):
        return None
    return p32.double(), t32.double(), math.ldexp(m, fa + fb), flags


def round24(x: torch.Tensor) -> torch.Tensor:
    """float64 ``x`` (finite) rounded to 24 significant bits, half away from zero, keeping float64's
    exponent: float32's precision beyond float32's range, for the wide logits that float32 cannot
    hold (the kernels do the same on the bits), so that two passes whose float64 dots round a few
    ulps apart still agree on the logit."""
    return ((x.contiguous().view(torch.int64) + (1 << 28)) & -(1 << 29)).view(torch.float64)


def _masked_sims(scaled, s: int, e: int, x64=None, scale=1.0, need=None) -> torch.Tensor:
    """Rows ``s:e`` of ``x x^T / T`` with the diagonal set to -inf, from :func:`_scaled` (float32);
    with ``need``: float64, the pairs ``need`` from the float64 rows ``x64`` times ``scale``,
    rounded once to float32 where float32 holds them and to float32's precision beyond
    (:func:`round24`)."""
    u, r, c, _ = scaled
    sim = (u[s:e] @ u.T) * (r[s:e, None] * c[None, :])
    if need is not None:  # the pairs a float32 dot of the scaled rows cannot form: float64
        w = (x64[s:e] @ x64.T) * scale
        w = torch.where(w.abs() <= F32_MAX, w.float().double(), round24(w))
        sim = torch.where(need, w, sim.double())
    rows = torch.arange(e - s, device=u.device)
    sim[rows, rows + s] = float("-inf")
    return sim


def _chunk_sims(sp_all, st_all, wide, s: int, e: int):
    """Rows ``s:e`` of the masked pred and target logits: float32, or float64 once any row is wide
    (:func:`_masked_sims`). A pair takes both its logits in float64 where either input's exponents
    call for it (the kernels do the same, so that their forward and backward, tiled differently,
    form the same logits)."""
    if wide is None:
        return _masked_sims(sp_all, s, e), _masked_sims(st_all, s, e)
    p64, t64, scale, flags = wide
    need = flags[s:e, None] | flags[None, :]
    return _masked_sims(sp_all, s, e, p64, scale, need), _masked_sims(st_all, s, e, t64, scale, need)


def _normalisers(sim: torch.Tensor) -> torch.Tensor:
    """``(2, rows)``: each row's largest entry ``m`` and ``log sum exp(sim - m)`` (-inf rows: m -inf)."""
    m = sim.amax(1)
    m_safe = torch.where(m == float("-inf"), 0.0, m)
    return torch.stack((m, (sim - m_safe[:, None]).exp().sum(1).log()))


def _probs(sim: torch.Tensor, norm: torch.Tensor) -> torch.Tensor:
    """``exp((sim - m) - log l)`` for the normalisers ``norm = (m, log l)`` of the rows."""
    return ((sim - norm[0, :, None]) - norm[1, :, None]).exp()


def pairwise_kl_loss_fwd_ref(pred: torch.Tensor, target: torch.Tensor, temperature: float,
                             amax_p: torch.Tensor | None = None, amax_t: torch.Tensor | None = None):
    """``(B, Dp), (B, Dt), T -> (loss, lse_p, lse_t)``: a 0-d float32 loss and the per-row
    log-normalisers the backward reuses, in two parts, and the rows' :func:`row_max` (``(3, B)``
    float64: the row's largest logit ``m`` (beyond float32 for a wide row's logits ~1e40), ``log sum_j exp(s_ij - m)`` (at logits ~1e38
    ``m + log(...)`` would round it away), and ``max |x_i|``, which the backward's scaling reuses).
    ``amax_p``/``amax_t``: the rows' :func:`row_max`, if the caller has them. Not differentiable;
    no checks."""
    B = pred.shape[0]
    lse_p = torch.zeros(3, B, dtype=torch.float64, device=pred.device)
    lse_t = torch.zeros(3, B, dtype=torch.float64, device=pred.device)
    lse_p[2] = row_max(pred.detach()) if amax_p is None else amax_p
    lse_t[2] = row_max(target.detach()) if amax_t is None else amax_t
    if B <= 1:
        return torch.zeros((), dtype=torch.float32, device=pred.device), lse_p, lse_t
    p32, t32 = pred.detach().float(), target.detach().float()
    sp_all, st_all = _scaled(p32, lse_p[2], temperature), _scaled(t32, lse_t[2], temperature)
    wide = _wide_setup(p32, t32, sp_all[3], st_all[3], temperature)
    kl_sum = torch.zeros((), dtype=torch.float64, device=pred.device)
    step = row_chunk(B)
    for s in range(0, B, step):
        e = min(s + step, B)
        sp, st = _chunk_sims(sp_all, st_all, wide, s, e)
        norm_p, norm_t = _normalisers(sp), _normalisers(st)  # in the sims' dtype
        lse_p[:2, s:e], lse_t[:2, s:e] = norm_p, norm_t
        q = _probs(st, norm_t)  # exactly 0 on the diagonal
        # log q - log p at half scale: each bracket lies in [-float32max, 0] where the logits are
        # float32, so their difference cannot overflow (at full scale it can)
        mp, lp = norm_p[0, :, None] * 0.5, norm_p[1, :, None] * 0.5
        mt, lt = norm_t[0, :, None] * 0.5, norm_t[1, :, None] * 0.5
        half = ((st * 0.5 - mt) - lt) - ((sp * 0.5 - mp) - lp)
        kl_row = torch.where(q == 0, 0.0, q * half).sum(1) * 2.0  # NaN q stays NaN; 0 weight is 0
        # a row whose logits overflowed float32 has a non-finite KL: it overflowed, +inf
        kl_row = torch.where(kl_row.abs() < float("inf"), kl_row, float("inf"))
        # a KL is >= 0 exactly: a row whose exact KL is ~0 can round slightly negative; 0 then
        # (NaN stays NaN). The value only: see the module docstring on the gradient at the clamp
        kl_row = torch.where(kl_row < 0, 0.0, kl_row)
        kl_sum += (kl_row / B).sum()  # divided first: B rows of ~float32max / B stay finite
    return kl_sum.float(), lse_p, lse_t  # +inf where the loss overflows float32


def pairwise_kl_loss_bwd_ref(
    grad: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    lse_p: torch.Tensor,
    lse_t: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Gradient of the loss in ``pred`` (``(B, Dp)``, pred's dtype), given the upstream 0-d
    ``grad`` and the forward's ``lse_p``/``lse_t``."""
    B = pred.shape[0]
    if B <= 1:
        return torch.zeros_like(pred)
    p32, t32 = pred.detach().float(), target.detach().float()
    sp_all, st_all = _scaled(p32, lse_p[2], temperature), _scaled(t32, lse_t[2], temperature)
    wide = _wide_setup(p32, t32, sp_all[3], st_all[3], temperature)
    out = torch.zeros(p32.shape, dtype=torch.float32, device=pred.device)
    # |(G + G^T) @ pred| <= (B + 1) max|pred|: G scaled by 2^-k, 2^k > B + 1 (exact), so the float32
    # sums cannot overflow where the gradient does not
    k = (B + 1).bit_length()
    step = row_chunk(B)
    for s in range(0, B, step):
        e = min(s + step, B)
        sp, st = _chunk_sims(sp_all, st_all, wide, s, e)
        norm_p, norm_t = lse_p[:2, s:e].to(sp.dtype), lse_t[:2, s:e].to(st.dtype)
        g = ((_probs(sp, norm_p) - _probs(st, norm_t)) * 2.0**-k).float()  # G[s:e], 0 on the diagonal
        out[s:e] += g @ p32  # G @ pred
        out += g.T @ p32[s:e]  # G^T @ pred
    # 1 / (T B 2^-k) ~ 2 / T formed in float64, rounded once (a float32 1/T, or 1/T / B, falls
    # into the subnormals or overflows at extreme temperatures)
    return (out * (grad.float() * (1.0 / float(temperature) / B / 2.0**-k))).to(pred.dtype)


def pairwise_kl_loss_ref(pred: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """Reference for :func:`fastvq.pairwise_kl_loss`: ``pred (B, Dp)`` and ``target (B, Dt)``
    (float32/float16/bfloat16), a temperature ``> 0`` -> a 0-d float32 loss, differentiable in
    ``pred`` through a chunked forward and :func:`pairwise_kl_loss_bwd_ref`. No input checks."""
    return _RefLoss.apply(pred, target, float(temperature))


class _RefLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, pred, target, temperature):
        loss, lse_p, lse_t = pairwise_kl_loss_fwd_ref(pred, target, temperature)
        ctx.save_for_backward(pred, target, lse_p, lse_t)
        ctx.temperature = temperature
        return loss

    @staticmethod
    def backward(ctx, grad):
        pred, target, lse_p, lse_t = ctx.saved_tensors
        return pairwise_kl_loss_bwd_ref(grad, pred, target, lse_p, lse_t, ctx.temperature), None, None
