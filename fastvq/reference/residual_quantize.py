"""Pure-torch reference of :func:`fastvq.residual_quantize` and of its training-step form
:func:`fastvq.residual_quantize_step` (values, and the gradient of the step)."""

from __future__ import annotations

import functools

import torch

from ._chunks import row_chunk
from ._exact_sum import pair_index_sum, round_pair
from .rotation_trick import rotation_trick_bwd_ref


BIG = 2.0**48  # rows beyond this, or with no finite score, are searched again scaled by 2^-96
RESCALE = 2.0**-96
TINY = 2.0**-48  # rows below this whose best score is below TINY_SCORE: again, scaled by 2^96
TINY_SCORE = 2.0**-90


def _argmin_finite(score: torch.Tensor, finite: torch.Tensor):
    key = torch.where(finite & (score == score), score, torch.full_like(score, float("inf")))
    idx = key.argmin(-1)
    best = key.gather(1, idx[:, None]).squeeze(1)
    return idx, best == float("inf"), best


def _nearest(r: torch.Tensor, cb: torch.Tensor, cc: torch.Tensor, finite: torch.Tensor, first: torch.Tensor,
             rescue: bool = True, scaled: torch.Tensor | None = None, wide_exp: int = 0):
    """Nearest code of each row of ``r (n, D)`` float32 in ``cb (K, D)``: ``argmin |c|^2 - 2 r.c``
    over the finite codes, NaN scores as +inf, exact ties to the smallest index. A finite row
    beyond 2^48, or whose scores are all +inf, is searched again with ``r`` and ``cb`` scaled by
    2^-96 (exact: |c|^2 and 2 r.c of codes near it then neither overflow nor cancel); a finite
    row below 2^-48 whose best score is below 2^-90 (codes so near that |c|^2 and r.c underflow)
    again scaled by 2^96, among the codes that stay finite there (it keeps its first choice when
    none has a finite score); float16 codebooks never need either. Rows still without a finite
    score, and rows that are not finite (every distance +inf, though a score may come out
    -inf), take ``first``, the first finite code (0 when there is none). ``rescue``: False for a
    float16 codebook. ``scaled (n,)``: rows whose residual is held as ``r 2^wide_exp`` (its float32
    value overflowed, see :func:`residual_quantize_full_ref`): all beyond 2^48, searched again
    on ``r 2^(wide_exp - 96)``."""
    idx, lost, best = _argmin_finite(cc - 2.0 * (r @ cb.T), finite)
    r_fin = r.isfinite().all(-1)
    if rescue:
        r_max = r.abs().amax(-1)
        redo = r_fin & ((r_max > BIG) | lost)
        tiny = r_fin & ~redo & (r_max < TINY) & (best < TINY_SCORE)
        # (a float32 0-d operand: two Python scalars would give torch's default dtype; fuzzN)
        wide = r.new_tensor(2.0 ** (wide_exp - 96))
        rs = r * RESCALE if scaled is None else r * torch.where(scaled, wide, RESCALE)[:, None]
        cs = cb * RESCALE
        idx1, lost1, _ = _argmin_finite((cs * cs).sum(-1) - 2.0 * (rs @ cs.T), finite)
        idx, lost = torch.where(redo, idx1, idx), torch.where(redo, lost1, lost)
        rs, cs = r / RESCALE, cb / RESCALE  # (codes that overflow here are far from a tiny row)
        idx2, lost2, _ = _argmin_finite((cs * cs).sum(-1) - 2.0 * (rs @ cs.T), finite & cs.isfinite().all(-1))
        idx = torch.where(tiny & ~lost2, idx2, idx)
    # (a row with an infinite entry: every distance is +inf, though a score may come out -inf)
    return torch.where(lost | ~r_fin, first, idx)


def _next_residual(r: torch.Tensor, c: torch.Tensor, scaled: torch.Tensor, wide_exp: int):
    """``(r - c, scaled)``: the next residual of rows ``r (n, D)`` float32 after their codes ``c``,
    and which rows are held at scale ``2^-E`` (``E = wide_exp``) after it (see
    :func:`residual_quantize_full_ref`): a held row subtracts ``c 2^-E``; a finite residual and
    code whose difference overflows go on as ``r 2^-E - c 2^-E``, held; a held row whose residual
    is representable again goes back to scale 1 (exact)."""
    wide = 2.0**-wide_exp
    new = r - c * torch.where(scaled, r.new_tensor(wide), 1.0)[:, None]
    over = ~new.isfinite().all(-1) & r.isfinite().all(-1) & c.isfinite().all(-1)
    new, scaled = torch.where(over[:, None], r * wide - c * wide, new), scaled | over
    up = new * 2.0**wide_exp
    back = scaled & up.isfinite().all(-1)
    return torch.where(back[:, None], up, new), scaled & ~back


def _counted(usable: torch.Tensor, r: torch.Tensor, scaled: torch.Tensor, stat_limit: float) -> torch.Tensor:
    """Which rows a level's statistics and candidates count: weight nonzero and finite, residual
    below ``stat_limit`` (finite in the trained codebooks' dtype; NaN is not below), not held."""
    return usable & (r.abs().amax(-1) < stat_limit) & ~scaled


def _stat_terms(x, cb, codes, w_all, sw_all, stat_limit, step):
    """The statistics' terms, walking every row to each level again with its known codes:
    ``(segment (n,), terms (n, D + 1))`` per chunk and level, ``segment = level * K + code`` and
    the terms ``sw r`` and ``sw`` (exact in float64) of the rows that level counts (weight
    nonzero and finite, residual below ``stat_limit``, not held), else segment ``L * K`` and 0."""
    N, D = x.shape
    L, K, _ = cb.shape
    wide_exp = L.bit_length()
    for s in range(0, N, step):
        r = x[s : s + step].float()
        n = r.shape[0]
        w = torch.ones(n, dtype=torch.float32, device=x.device) if w_all is None else w_all[s : s + step]
        sw = (w if sw_all is None else sw_all[s : s + step]).double()
        usable = (w != 0) & w.isfinite()
        scaled = torch.zeros_like(usable)
        for lvl in range(L):
            idx = codes[s : s + step, lvl].long()
            use = _counted(usable, r, scaled, stat_limit)
            t = torch.cat([sw[:, None] * r.double(), sw[:, None]], 1)
            yield torch.where(use, lvl * K + idx, L * K), torch.where(use[:, None], t, 0.0)
            r, scaled = _next_residual(r, cb[lvl].index_select(0, idx), scaled, wide_exp)


@torch.no_grad()
def residual_quantize_full_ref(
    x: torch.Tensor,
    codebooks: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    codes: torch.Tensor | None = None,
    loss: bool = False,
    stats: bool = False,
    slots: torch.Tensor | None = None,
    num_slots: int = 0,
    stat_limit: float = float("inf"),
    stat_weights: torch.Tensor | None = None,
) -> dict:
    """Reference of the launcher ``fastvq.kernels.residual_quantize.residual_quantize_fwd``:
    ``x (N, D)``, ``codebooks (L, K, D)`` -> a dict with ``quantized (N, D)`` (dtype of ``x``) and
    ``codes (N, L)`` int64, plus, by request, ``level_sq (L,)`` (``loss``), ``counts (L, K)``,
    ``sums (L, K, D)``, ``skipped (L,)`` int32 (``stats``) and ``cand (L, S, D)``,
    ``cand_ok (L, S)`` int8 (``slots``). See that launcher for the meaning of each.

    Greedy, level by level: the residual starts as ``x`` in float32; level ``l`` picks the nearest
    finite code (``argmin_k |c_lk|^2 - 2 r.c_lk``, NaN-aware, see :func:`_nearest`) and subtracts
    it in float32. Where that overflows (x = 3e38 after a code of -2e38: a finite residual and
    code) the new residual is formed at scale ``2^-E`` instead, ``r 2^-E - c 2^-E`` (``E`` the bit
    length of ``L``: ``x`` less ``L`` codes is below ``(L + 1)`` times float32's max, so it never
    overflows again there), and the row goes on at that scale (its codes scaled as they are
    subtracted) until its residual is representable again (then multiplied back by ``2^E``).
    While held so, its residual is beyond float32: it enters no statistics or candidate (as a
    non-finite one), and its loss term is ``|r|^2 2^(2E)`` in float64. ``quantized`` is the
    float32 sum of the chosen codes in level order (where that
    is not finite, their float64 sum rounded once, as the kernel's ``_exact_code_sum``), NaN in
    the elements where ``x`` is not finite (as ``x + (q - x)``), cast to the dtype of ``x`` (``x``
    itself on rows of weight 0). The statistics' sums over rows are exact pairs rounded once
    (:func:`_stat_terms`, ``_exact_sum.pair_index_sum``).
    Works in row chunks: its extra memory is a ``(chunk, K)`` float32 scratch.
    """
    N, D = x.shape
    L, K, _ = codebooks.shape
    dev = x.device
    cb = codebooks.float()
    cc = (cb * cb).sum(-1)  # (L, K)
    finite = cb.isfinite().all(-1)  # (L, K)
    first = torch.where(finite.any(-1), finite.int().argmax(-1), 0)  # (L,)
    w_all = None if weights is None else weights.float()
    # the statistics' weights (as given: weights are scaled for the losses), float64: w r exact
    sw_all = w_all if stat_weights is None else stat_weights.float()
    search = codes is None
    quantized = torch.empty((N, D), dtype=x.dtype, device=dev)
    out_codes = torch.empty((N, L), dtype=torch.int64, device=dev) if search else codes
    level_sq = torch.zeros((L,), dtype=torch.float64, device=dev)
    skipped = torch.zeros((L,), dtype=torch.int64, device=dev)
    # one spare slot at the end takes the rows that fill none (no boolean indexing: no host sync)
    cand = torch.zeros((L, num_slots + 1, D), dtype=torch.float32, device=dev)
    cand_ok = torch.zeros((L, num_slots + 1), dtype=torch.int8, device=dev)
    wide_exp = L.bit_length()  # 2^E >= L + 1
    step = row_chunk(max(K, D))
    for s in range(0, N, step):
        r = x[s : s + step].float()
        n = r.shape[0]
        w = torch.ones(n, dtype=torch.float32, device=dev) if w_all is None else w_all[s : s + step]
        live = w != 0
        usable = live & w.isfinite()
        slot = None if slots is None else torch.where(slots[s : s + step] >= 0, slots[s : s + step].long(), num_slots)
        q = torch.zeros_like(r)
        q64 = torch.zeros_like(r, dtype=torch.float64)
        scaled = torch.zeros_like(live)  # rows whose residual is held at scale 2^-E
        for lvl in range(L):
            idx = (_nearest(r, cb[lvl], cc[lvl], finite[lvl], first[lvl], codebooks.dtype != torch.float16, scaled,
                            wide_exp) if search else out_codes[s : s + step, lvl])
            c = cb[lvl].index_select(0, idx)
            # (below stat_limit: finite, in the dtype of the codebooks being trained; NaN: not below)
            use = _counted(usable, r, scaled, stat_limit)
            if stats:  # (the sums: after the search, _stat_terms)
                skipped[lvl] += (live & ~use).sum()
            if slot is not None:
                # the midpoint of the residual and its code, rounded once, as the kernel's
                # _midpoint: r + c halved, or r/2 + c/2 where r + c overflows (never c + (r - c)/2:
                # r - c overflows where the midpoint does not)
                s_rc = r + c
                cand[lvl, slot] = torch.where(s_rc.abs() < float("inf"), 0.5 * s_rc, 0.5 * r + 0.5 * c)
                cand_ok[lvl, slot] = (use & c.isfinite().all(-1)).to(torch.int8)  # finite residual and code
            r, scaled = _next_residual(r, c, scaled, wide_exp)
            q = q + c
            q64 = q64 + c.double()
            if loss:
                # float64: |r|^2 may overflow float32 where the mean loss does not
                sq = (r.double() ** 2).sum(-1)
                sq = sq * torch.where(scaled, sq.new_tensor(4.0**wide_exp), 1.0)
                level_sq[lvl] += torch.where(live, w.double() * sq, 0.0).sum()
            if search:
                out_codes[s : s + step, lvl] = idx
        # the exact range: where the float32 sum overflowed (3e38 + 3e38 - 3e38), the float64 sum
        # rounded once (as the kernel's _exact_code_sum; here formed for every row: no host read)
        q = torch.where(q.isfinite(), q, q64.float())
        # NaN where the input is not finite, as the straight-through x + (q - x) gives there
        xs = x[s : s + step].float()
        q = torch.where(xs.isfinite(), q, float("nan"))
        quantized[s : s + step] = torch.where(live[:, None], q, xs).to(x.dtype)
    out = {"quantized": quantized, "codes": out_codes}
    if loss:
        out["level_sq"] = level_sq
    if stats:
        # each code's sums and count as an exact pair, rounded once (a float64 sum of residuals
        # max, 2^103, -2^60 is the float32 overflow midpoint and rounded to +inf; exact: max)
        terms = functools.partial(_stat_terms, x, cb, out_codes, w_all, sw_all, stat_limit, step)
        hi, lo = pair_index_sum((L * K + 1, D + 1), terms, dev)
        rounded = round_pair(hi[: L * K], lo[: L * K], torch.float32)
        out.update(counts=rounded[:, D].reshape(L, K).clone(), sums=rounded[:, :D].reshape(L, K, D).clone(),
                   skipped=skipped.int())
    if slots is not None:
        out.update(cand=cand[:, :num_slots].contiguous(), cand_ok=cand_ok[:, :num_slots].contiguous())
    return out


@torch.no_grad()
def residual_quantize_bwd_ref(
    x: torch.Tensor,
    codebooks: torch.Tensor,
    codes: torch.Tensor,
    *,
    weights: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
    grad_commit: torch.Tensor | None = None,
    grad_embed: torch.Tensor | None = None,
    rotate: bool = False,
    need_dx: bool = True,
):
    """Reference of ``fastvq.kernels.residual_quantize.residual_quantize_bwd``:
    ``dx = G(grad) + 2 w sum_l grad_commit[l] r_{l+1}`` (``G``: identity, or the rotation trick
    between ``x`` and the sum of the codes on rows of nonzero weight) and
    ``dcb[l, k] = 2 grad_embed[l] sum_{i: codes[i, l] = k} w_i (c_lk - r_il)``, float32: the
    terms from float64 residuals, summed in float64 and rounded once, so no partial sum
    overflows (the kernel's float32 atomics, and its fix-up for codes with a term beyond
    ``atomic_overflow_bound``). ``dx``: an element float32 cannot give (a residual beyond its
    range, e.g. ``x ~ -3e38`` quantized to ``c ~ 3e38``) is formed from float64 residuals and
    rounded once, so it is finite wherever the exact value is (as the kernel's wide rows).
    Returns ``(dx in x's dtype or None, dcb (L, K, D) float32 or None)``."""
    N, D = x.shape
    L, K, _ = codebooks.shape
    cb = codebooks.float()
    dx = torch.empty((N, D), dtype=x.dtype, device=x.device) if need_dx else None
    dcb = torch.zeros((L, K, D), dtype=torch.float64, device=x.device) if grad_embed is not None else None
    gc = None if grad_commit is None else grad_commit.float()
    ge = None if grad_embed is None else grad_embed.float()
    step = row_chunk(4 * D)
    for s in range(0, N, step):
        e = x[s : s + step].float()
        w = (torch.ones(e.shape[0], dtype=torch.float32, device=x.device) if weights is None
             else weights[s : s + step].float())
        live = w != 0
        r, acc, q = e, torch.zeros_like(e), torch.zeros_like(e)
        # the same in float64, for the elements float32 cannot give (x ~ -3e38 quantized to a
        # code ~ 3e38: r overflows, the gradient may not); formed for every row (no host read)
        r64, acc64, q64 = e.double(), torch.zeros_like(e, dtype=torch.float64), torch.zeros_like(e, dtype=torch.float64)
        for lvl in range(L):
            idx = codes[s : s + step, lvl]
            c = cb[lvl].index_select(0, idx)
            c64 = c.double()
            new = r - c
            if dcb is not None:  # (rows of weight 0 add nothing, even where c - r is not finite)
                t = (2.0 * ge[lvl]).double() * (w.double()[:, None] * (c64 - r64))
                dcb[lvl].index_add_(0, idx, torch.where(live[:, None], t, 0.0))
            r, r64 = new, r64 - c64
            if gc is not None:
                acc = acc + gc[lvl] * r
                acc64 = acc64 + gc[lvl].double() * r64
            q, q64 = q + c, q64 + c64
        if not need_dx:
            continue
        d = torch.where(live[:, None], 2.0 * w[:, None] * acc, 0.0)
        d = torch.where(d.isfinite(), d, ((2.0 * w).double()[:, None] * acc64).float())
        q = torch.where(q.isfinite(), q, q64.float())  # the sum of the codes, as the forward forms it
        if grad is not None:
            g = grad[s : s + step].float()
            if rotate:
                g = torch.where(live[:, None], rotation_trick_bwd_ref(e, q, g), g)
            d = d + g
        dx[s : s + step] = d.to(x.dtype)
    return dx, (None if dcb is None else dcb.float())


def residual_quantize_ref(x: torch.Tensor, codebooks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`fastvq.residual_quantize`: ``(..., D), (L, K, D) -> (quantized, codes)``.

    Greedy residual quantization, values only (no straight-through gradient: the public op adds
    it); see :func:`residual_quantize_full_ref` for the search (NaN-aware: a NaN or infinite code
    is never chosen while a finite one exists). ``quantized`` is the float32 sum of the chosen
    codes in level order (float64 where that is not finite; NaN where ``x`` is not), cast to the dtype of ``x``; ``codes``
    is int64 ``(..., L)``.
    """
    L, K, D = codebooks.shape
    lead = x.shape[:-1]
    out = residual_quantize_full_ref(x.reshape(lead.numel(), D), codebooks)
    return out["quantized"].reshape(*lead, D), out["codes"].reshape(*lead, L)
