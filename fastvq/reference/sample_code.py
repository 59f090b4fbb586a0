"""Pure-torch reference for :func:`fastvq.sample_code`: the test oracle and the CPU path.

The Gumbel noise is the kernel's, bit for bit: Philox4x32-10 (Triton's ``tl.philox``) keyed by
the seed, counter ``(code // 4, row, codebook, row >> 32)``, word ``code % 4`` turned into a
uniform ``u = (r >> 8 + 0.5) 2^-24`` in (0, 1) and ``g = -log(-log(u))``.
"""

from __future__ import annotations

import math

import torch

from .nearest_code import (_mul_exp2, argmin_first, choose, distance, exp2i, max_abs, pow2_exponent,
                           prepare_codebook, row_chunks, row_unit, scale_rows, scores, search_setup)

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
# a row whose 1/temperature factor exceeds this is searched without noise: up to it the noise's
# factor 2^-(e + 2) (both terms scaled so that score * a' < score / 2) is a normal float32
NOISE_LIMIT = 2.0**124


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    p = b * a  # < 2^64: wraps in int64, which keeps all 64 bits
    return (p >> 32) & _M32, p & _M32


def philox(seed: torch.Tensor, c0, c1, c2, c3, rounds: int = 10):
    """Philox4x32 on int64 tensors holding uint32 values; ``seed`` an int64 tensor (0-d)."""
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(rounds):
        hi_b, lo_b = _mulhilo(_ROUND_B, c2)
        hi_a, lo_a = _mulhilo(_ROUND_A, c0)
        c0, c2, c1, c3 = hi_b ^ c1 ^ k0, hi_a ^ c3 ^ k1, lo_b, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0, c1, c2, c3


def gumbel(seed: torch.Tensor, rows: torch.Tensor, K: int, h: int) -> torch.Tensor:
    """``(len(rows), K)`` float32 Gumbel(0, 1) noise for rows ``rows`` (int64) of codebook ``h``:
    one Philox call per 4 codes (counter ``(code // 4, row, h, row >> 32)``), code ``k`` takes
    word ``k % 4``."""
    G = -(-K // 4)
    g = torch.arange(G, device=rows.device, dtype=torch.int64)[None, :]
    n = rows[:, None]
    shape = (rows.shape[0], G)
    words = philox(seed.to(rows.device), g.expand(shape), (n & _M32).expand(shape),
                   torch.full(shape, h, dtype=torch.int64, device=rows.device), (n >> 32).expand(shape))
    r = torch.stack(words, dim=-1).reshape(rows.shape[0], 4 * G)[:, :K]
    u = ((r >> 8).to(torch.float32) + 0.5) * 2.0**-24
    # (2^24 - 1) + 0.5 rounds to 2^24 in float32: u = 1 would be noise +inf (as the kernel's)
    u = u.clamp_max(1.0 - 2.0**-24)
    return -torch.log(-torch.log(u))


def row_factor(x: torch.Tensor, xs: torch.Tensor, metric: str, e_unit: torch.Tensor, unit: torch.Tensor,
               temperature: float):
    """Per row ``a`` with ``distance / temperature = a * score + (a row constant)``, as the kernel
    computes it (float32); ``xs`` the rows the search multiplies with, ``unit`` the rows' l2 unit
    ``2^L`` (scores in units of ``2^2L``), ``e_unit`` the exponent E of the codebook's dot unit."""
    # T = m 2^e with m in [1, 2): 1 / T never overflows (T below 2^-126 took the nearest code
    # where softmax of tiny distances does not; fuzzA)
    m, e = math.frexp(temperature)
    t = torch.tensor(2.0 * m, dtype=torch.float32, device=x.device)
    n_e = torch.full((x.shape[0],), -min(max(e - 1, -1000), 1000), dtype=torch.int32, device=x.device)
    if metric in ("l2", "euclidean"):
        return _mul_exp2(unit / t, n_e) * unit if metric == "l2" else _mul_exp2(unit / t, n_e)
    if metric == "cosine":
        nx = (xs * xs).sum(-1).sqrt()
        return torch.where(nx > 0, _mul_exp2(1.0 / (torch.where(nx > 0, nx, 1.0) * t), n_e), torch.zeros_like(nx))
    inv_t = (torch.ones_like(t) / t).expand(x.shape[0])  # -(x.c) = score 2^(e_x + E)
    if x.dtype == torch.float16:  # rows not scaled
        return _mul_exp2(inv_t, e_unit + n_e)
    e_x = pow2_exponent(max_abs(x.float()))
    return _mul_exp2(inv_t, e_x + e_unit + n_e)


def sample_code_ref(
    x: torch.Tensor, codebook: torch.Tensor, temperature: float, metric: str = "l2", *, seed: torch.Tensor,
    allow_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for :func:`fastvq.sample_code`: Gumbel-max sampling of one code per row with
    probability ``softmax(-distance / temperature)`` over the codebook, the noise drawn as the
    kernel draws it. ``temperature > 0``; ``seed`` a 0-d int64 tensor. Same shapes, scaling,
    non-finite rules and direct distances as :func:`fastvq.reference.nearest_code_ref`."""
    x3, cb, lead, indices, distances = search_setup(x, codebook, metric)
    (H, N, _), K = x3.shape, cb.shape[1]
    codes, ta, tb, first, e_unit, c_min = prepare_codebook(cb, metric)
    for h, s, e in row_chunks(H, N, K):
        rows = x3[h, s:e]
        xs, band = scale_rows(rows, metric, c_min[h])
        sc = scores(xs, codes[h], ta[h], tb[h], band)
        unit = row_unit(band)
        if metric == "euclidean":  # sqrt(|x|^2 + score), in the row's unit
            xx = ((rows.float() / unit[:, None]) ** 2).sum(-1)
            sc = torch.where(sc.isnan(), sc, (xx[:, None] + sc).clamp_min(0.0).sqrt())
        a = row_factor(rows, xs, metric, e_unit[h], unit, temperature)
        w = (a <= NOISE_LIMIT).to(torch.float32)  # also 0 where a is NaN
        a = torch.where(w > 0, a, torch.ones_like(a))
        # both terms times 2^-sh (a' < 1/2), as the kernel: score * a' cannot overflow float32
        sh = exp2i(-(pow2_exponent(a) + 2).clamp_min(0))
        a, w = a * sh, w * sh
        g = gumbel(seed, torch.arange(s, s + rows.shape[0], device=x.device), K, h)
        _, idx = argmin_first(sc * a[:, None] - w[:, None] * g)
        idx = choose(rows, idx, first[h].expand_as(idx), K)
        indices[h, s:e] = idx
        distances[h, s:e] = distance(rows, cb[h][idx], metric)
    return indices.reshape(lead), distances.reshape(lead)
