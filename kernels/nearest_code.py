"""Nearest code search (l2 / cosine / dot) and fused negative mining, one streaming kernel.

Design
------
* Pre-pass ``_code_terms_kernel``: once per call, the per-code term ``|c|^2`` (l2) or
  ``1/|c|`` (cosine) into a ``(K,)`` float32 vector. Dot needs none.
* Main ``_nearest_code_fwd_kernel``: a program owns ``BLOCK_N`` rows of ``x``. Their
  ``|x|^2`` (and, when mining, ``|x - p|^2``) are summed once; when ``D <= RESIDENT_MAX_D``
  the whole ``(BLOCK_N, D)`` tile is loaded once and stays on chip. Codebook tiles of
  ``BLOCK_K`` codes stream past: ``x @ c.T`` on the tensor cores (fp32 accumulation), the
  score ``|c|^2 - 2 x.c`` / ``-(x.c)/|c|`` / ``-(x.c)`` is formed, and a running
  ``(min, index)`` per row in registers is updated. The ``N x K`` matrix never exists.
* Ties: ``tl.min(..., return_indices=True)`` breaks ties to the left inside a tile, and
  tiles (and splits) are merged with a strict ``<`` in increasing code order, so the
  smallest index wins, as ``torch.argmin`` does.
* Small ``N`` with large ``K``: the codebook is split over a second grid axis; each split
  writes a partial ``(min, index)`` and ``_nearest_code_reduce_kernel`` merges them in
  split order (strict ``<``). The split count comes from ``N``, ``K`` and the SM count.
* ``HAS_LOWER_BOUND`` (negative mining, semi-hard): the same pass also tracks the
  minimum over the codes with ``|x|^2 + score > |x - p|^2`` (strictly farther than the
  positive) and falls back to the unconstrained minimum where no code qualifies.
* NaN scores are skipped (treated as +inf), so indices always lie in ``[0, K)``.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._common import autotune_configs, dot_fp32, launcher, next_pow2, tl_input_precision

METRICS = {"l2": 0, "cosine": 1, "dot": 2}
STRATEGIES = ("hardest", "semi-hard")

# D up to this many features keeps the whole x tile on chip; larger D streams it in 64-wide chunks.
RESIDENT_MAX_D = 256
# Codebook split: only when the row blocks alone cannot fill the GPU; each split gets at
# least SPLIT_MIN_CODES codes; at most MAX_SPLITS splits.
SPLIT_MIN_CODES = 512
MAX_SPLITS = 128
_SPLIT_BLOCK_N = 64  # row-block size assumed when choosing the split count
_INTERPRETER_SMS = 4  # "SM count" under the Triton interpreter (CPU)


# --------------------------------------------------------------------------- helpers


@triton.jit
def _scores(b_xc, p_cterm, o_k, m_k, METRIC: tl.constexpr):
    """Scores whose row argmin is the nearest code; +inf for masked codes and NaN."""
    if METRIC == 0:
        b_cc = tl.load(p_cterm + o_k, mask=m_k, other=0.0)
        b_s = b_cc[None, :] - 2.0 * b_xc
    elif METRIC == 1:
        b_ic = tl.load(p_cterm + o_k, mask=m_k, other=0.0)
        b_s = -b_xc * b_ic[None, :]
    else:
        b_s = -b_xc
    return tl.where(m_k[None, :] & (b_s == b_s), b_s, float("inf"))


@triton.jit
def _merge_tile(b_best, b_idx, b_s, k0):
    """Fold a tile of scores into the running (min, index): left ties inside, strict < across."""
    b_tmin, b_targ = tl.min(b_s, axis=1, return_indices=True, return_indices_tie_break_left=True)
    m_better = b_tmin < b_best
    return tl.where(m_better, b_tmin, b_best), tl.where(m_better, k0 + b_targ.to(tl.int64), b_idx)


@triton.jit
def _store_result(p_idx, p_dist, o_n, m_n, b_best, b_idx, b_best_c, b_idx_c, b_xterm, K,
                  METRIC: tl.constexpr, HAS_LOWER_BOUND: tl.constexpr):
    """Pick constrained-or-fallback, turn the score into a distance, store."""
    if HAS_LOWER_BOUND:
        m_found = b_idx_c >= 0
        b_best = tl.where(m_found, b_best_c, b_best)
        b_idx = tl.where(m_found, b_idx_c, b_idx)
    if METRIC == 0:  # b_xterm = |x|^2
        b_dist = tl.maximum(b_xterm + b_best, 0.0)
    elif METRIC == 1:  # b_xterm = 1/|x| (0 for a zero row)
        b_dist = tl.minimum(tl.maximum(1.0 + b_best * b_xterm, 0.0), 2.0)
    else:
        b_dist = b_best
    b_idx = tl.minimum(tl.maximum(b_idx, 0), K - 1)
    tl.store(p_idx + o_n, b_idx, mask=m_n)
    tl.store(p_dist + o_n, b_dist, mask=m_n)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _code_terms_kernel(p_c, p_out, K, D, stride_ck, stride_cd,
                       METRIC: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """Once per call: ``|c|^2`` (l2) or ``1/|c|`` (cosine; 0 for a zero code)."""
    pid = tl.program_id(0).to(tl.int64)
    o_k = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    m_k = o_k < K
    b_cc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        b_c = tl.load(p_c + o_k[:, None] * stride_ck + o_d[None, :] * stride_cd,
                      mask=m_k[:, None] & (o_d < D)[None, :], other=0.0).to(tl.float32)
        b_cc += tl.sum(b_c * b_c, axis=1)
    if METRIC == 1:
        b_cc = tl.where(b_cc > 0, 1.0 / tl.sqrt_rn(tl.where(b_cc > 0, b_cc, 1.0)), 0.0)
    tl.store(p_out + o_k, b_cc, mask=m_k)


_DEFAULT_SMEM = 192 * 1024  # when the device cannot be asked (H100/H200 allow 227 KiB per block)


@functools.lru_cache(maxsize=None)
def _smem_limit(device: torch.device) -> int:
    """Shared memory one program may use on ``device`` (A100: 163 KiB, consumer GPUs: ~99 KiB)."""
    if device.type != "cuda":
        return _DEFAULT_SMEM
    try:
        index = device.index if device.index is not None else torch.cuda.current_device()
        return int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # an older/other driver API: keep the H100-sized budget
        return _DEFAULT_SMEM


def _prune_configs(configs, named_args, **kwargs):
    """Drop configs whose on-chip tiles clearly exceed the device's shared memory; keep at least one.

    Resident x (``ONE_D_BLOCK``): one ``BLOCK_N x D`` x tile plus ``num_stages`` codebook tiles
    (16-bit inputs: ``num_stages - 1``, as compiled for sm_90; fp32 holds all of them).
    Streamed D: both the x and the codebook chunks are pipelined, ``num_stages`` of each.
    Only a time saver: the autotuner also skips configs that run out of resources.
    """
    p_x = named_args["p_x"]
    elt = p_x.element_size()
    d = kwargs.get("BLOCK_D", 64)
    resident = kwargs.get("ONE_D_BLOCK", True)
    limit = _smem_limit(p_x.device)

    def smem(c):
        bn, bk, s = c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages
        if resident:
            return (bn + bk * (max(s - 1, 1) if elt == 2 else s)) * d * elt
        return (bn + bk) * s * d * elt

    kept = [c for c in configs if smem(c) <= limit]
    return kept or [min(configs, key=smem)]


def _configs():
    gpu = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
        for bn in (64, 128)
        for bk in (32, 64, 128)
        for w in (4, 8)
        for s in (2, 3)
    ]
    return autotune_configs("nearest_code", gpu,
                            pinned=triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=8, num_stages=2),
                            interpreter=triton.Config({"BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=1))


# Keyed on D and K (never N); SPLITS, the precision (ieee vs tf32 fp32 dots differ several-fold)
# and the mining bound change the best tile too. The autotuner adds the tensors' dtypes itself.
# Tuned per (D, K rounded up to a power of two, ...): a new batch of negatives (mining) or a
# slightly different codebook size reuses the tuning instead of re-running every config.
@triton.autotune(configs=_configs(), key=["D", "K_BUCKET", "SPLITS", "PRECISION", "HAS_LOWER_BOUND"],
                 prune_configs_by={"early_config_prune": _prune_configs})
@triton.jit
def _nearest_code_fwd_kernel(
    p_x, p_c, p_cterm, p_pos, p_idx, p_dist, p_pscore, p_pidx, p_pxterm,
    N, K, D, SPLITS, K_BUCKET,
    stride_xn, stride_xd, stride_ck, stride_cd, stride_pn, stride_pd,
    METRIC: tl.constexpr, HAS_LOWER_BOUND: tl.constexpr, WRITE_PARTIAL: tl.constexpr,
    ONE_D_BLOCK: tl.constexpr, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    pid_s = tl.program_id(1).to(tl.int64)
    o_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N

    # Row terms, once: |x|^2 and, when mining, the bound |x - p|^2.
    b_xx = tl.zeros((BLOCK_N,), dtype=tl.float32)
    b_lb = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        m_xd = m_n[:, None] & (o_d < D)[None, :]
        b_x = tl.load(p_x + o_n[:, None] * stride_xn + o_d[None, :] * stride_xd, mask=m_xd, other=0.0).to(tl.float32)
        b_xx += tl.sum(b_x * b_x, axis=1)
        if HAS_LOWER_BOUND:
            b_p = tl.load(p_pos + o_n[:, None] * stride_pn + o_d[None, :] * stride_pd, mask=m_xd, other=0.0)
            b_diff = b_x - b_p.to(tl.float32)
            b_lb += tl.sum(b_diff * b_diff, axis=1)
    if METRIC == 1:
        b_xterm = tl.where(b_xx > 0, 1.0 / tl.sqrt_rn(tl.where(b_xx > 0, b_xx, 1.0)), 0.0)
    else:
        b_xterm = b_xx

    # The x tile stays on chip while the codebook streams past.
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    if ONE_D_BLOCK:
        b_xt = tl.load(p_x + o_n[:, None] * stride_xn + o_d[None, :] * stride_xd,
                       mask=m_n[:, None] & m_d[None, :], other=0.0)
        if DOT_FP32:
            b_xt = b_xt.to(tl.float32)

    # This program's share of the codebook: whole BLOCK_K tiles, in increasing order.
    tiles_per_split = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLITS)
    k_start = pid_s * tiles_per_split * BLOCK_K
    k_end = tl.minimum(k_start + tiles_per_split * BLOCK_K, K)

    b_best = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    b_idx = tl.zeros((BLOCK_N,), dtype=tl.int64) + tl.minimum(k_start, K - 1)
    b_best_c = tl.full((BLOCK_N,), float("inf"), dtype=tl.float32)
    b_idx_c = tl.full((BLOCK_N,), -1, dtype=tl.int64)
    for k0 in range(k_start, k_end, BLOCK_K):
        o_k = k0 + tl.arange(0, BLOCK_K)
        m_k = o_k < k_end
        if ONE_D_BLOCK:
            b_c = tl.load(p_c + o_k[:, None] * stride_ck + o_d[None, :] * stride_cd,
                          mask=m_k[:, None] & m_d[None, :], other=0.0)
            if DOT_FP32:
                b_c = b_c.to(tl.float32)
            b_xc = tl.dot(b_xt, tl.trans(b_c), input_precision=PRECISION)
        else:
            b_xc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                o_dd = d0 + o_d
                m_dd = o_dd < D
                b_xd = tl.load(p_x + o_n[:, None] * stride_xn + o_dd[None, :] * stride_xd,
                               mask=m_n[:, None] & m_dd[None, :], other=0.0)
                b_cd = tl.load(p_c + o_k[:, None] * stride_ck + o_dd[None, :] * stride_cd,
                               mask=m_k[:, None] & m_dd[None, :], other=0.0)
                if DOT_FP32:
                    b_xd = b_xd.to(tl.float32)
                    b_cd = b_cd.to(tl.float32)
                b_xc = tl.dot(b_xd, tl.trans(b_cd), b_xc, input_precision=PRECISION)
        b_s = _scores(b_xc, p_cterm, o_k, m_k, METRIC)
        b_best, b_idx = _merge_tile(b_best, b_idx, b_s, k0)
        if HAS_LOWER_BOUND:  # only codes strictly farther than the positive
            m_far = (b_xx[:, None] + b_s) > b_lb[:, None]
            b_best_c, b_idx_c = _merge_tile(b_best_c, b_idx_c, tl.where(m_far, b_s, float("inf")), k0)

    if WRITE_PARTIAL:  # partials laid out [track][split][row]; split 0 also writes the row term
        o_p = pid_s * N + o_n
        tl.store(p_pscore + o_p, b_best, mask=m_n)
        tl.store(p_pidx + o_p, b_idx, mask=m_n)
        if HAS_LOWER_BOUND:
            o_pc = (pid_s + SPLITS) * N + o_n
            tl.store(p_pscore + o_pc, b_best_c, mask=m_n)
            tl.store(p_pidx + o_pc, b_idx_c, mask=m_n)
        tl.store(p_pxterm + o_n, b_xterm, mask=m_n & (pid_s == 0))
    else:
        _store_result(p_idx, p_dist, o_n, m_n, b_best, b_idx, b_best_c, b_idx_c, b_xterm, K,
                      METRIC, HAS_LOWER_BOUND)


@triton.jit
def _nearest_code_reduce_kernel(p_pscore, p_pidx, p_pxterm, p_idx, p_dist, N, K, SPLITS,
                                METRIC: tl.constexpr, HAS_LOWER_BOUND: tl.constexpr, BLOCK_N: tl.constexpr):
    """Merge the per-split partial (min, index) pairs in split order (strict <: smallest index wins)."""
    pid = tl.program_id(0).to(tl.int64)
    o_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    o_c = o_n + SPLITS * N  # the constrained track (SPLITS * N is small: splits only for small N)
    b_best = tl.load(p_pscore + o_n, mask=m_n, other=0.0)
    b_idx = tl.load(p_pidx + o_n, mask=m_n, other=0)
    b_best_c = b_best
    b_idx_c = b_idx
    if HAS_LOWER_BOUND:
        b_best_c = tl.load(p_pscore + o_c, mask=m_n, other=0.0)
        b_idx_c = tl.load(p_pidx + o_c, mask=m_n, other=-1)
    o_p = o_n
    for _ in range(1, SPLITS):
        o_p += N
        o_c += N
        b_s = tl.load(p_pscore + o_p, mask=m_n, other=float("inf"))
        b_i = tl.load(p_pidx + o_p, mask=m_n, other=0)
        m_better = b_s < b_best
        b_best = tl.where(m_better, b_s, b_best)
        b_idx = tl.where(m_better, b_i, b_idx)
        if HAS_LOWER_BOUND:
            b_s = tl.load(p_pscore + o_c, mask=m_n, other=float("inf"))
            b_i = tl.load(p_pidx + o_c, mask=m_n, other=-1)
            m_better = b_s < b_best_c
            b_best_c = tl.where(m_better, b_s, b_best_c)
            b_idx_c = tl.where(m_better, b_i, b_idx_c)
    b_xterm = tl.load(p_pxterm + o_n, mask=m_n, other=0.0)
    _store_result(p_idx, p_dist, o_n, m_n, b_best, b_idx, b_best_c, b_idx_c, b_xterm, K,
                  METRIC, HAS_LOWER_BOUND)


# --------------------------------------------------------------------------- launchers


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _INTERPRETER_SMS


def num_splits(N: int, K: int, device: torch.device) -> int:
    """Codebook splits: 1 when the row blocks fill the GPU (2 programs per SM), else enough
    splits to fill it, each with at least ``SPLIT_MIN_CODES`` codes, at most ``MAX_SPLITS``."""
    row_blocks = triton.cdiv(N, _SPLIT_BLOCK_N)
    want = 2 * _sm_count(device)
    if row_blocks >= want:
        return 1
    return max(1, min(triton.cdiv(want, row_blocks), triton.cdiv(K, SPLIT_MIN_CODES), MAX_SPLITS))


def _launch(x, codebook, metric, allow_tf32, positive, splits):
    N, D = x.shape
    K = codebook.shape[0]
    dev = x.device
    m = METRICS[metric]
    has_lb = positive is not None
    # allocate
    indices = torch.empty((N,), dtype=torch.int64, device=dev)
    distances = torch.empty((N,), dtype=torch.float32, device=dev)
    if N == 0:
        return indices, distances
    # launch: the pre-pass (per-code term, once per call) ...
    cterm = torch.empty((K,), dtype=torch.float32, device=dev) if m != 2 else distances
    if m != 2:
        BLOCK_KP = 64
        _code_terms_kernel[(triton.cdiv(K, BLOCK_KP),)](
            codebook, cterm, K, D, codebook.stride(0), codebook.stride(1),
            METRIC=m, BLOCK_K=BLOCK_KP, BLOCK_D=min(max(next_pow2(D), 16), 64),
        )
    # ... the streaming kernel ...
    S = num_splits(N, K, dev) if splits is None else max(1, int(splits))
    one_d = D <= RESIDENT_MAX_D
    BLOCK_D = max(next_pow2(D), 16) if one_d else 64
    tracks = 2 if has_lb else 1
    if S > 1:
        pscore = torch.empty((tracks, S, N), dtype=torch.float32, device=dev)
        pidx = torch.empty((tracks, S, N), dtype=torch.int64, device=dev)
        pxterm = torch.empty((N,), dtype=torch.float32, device=dev)
    else:
        pscore, pidx, pxterm = distances, indices, distances  # unused
    pos = positive if has_lb else x
    _nearest_code_fwd_kernel[lambda meta: (triton.cdiv(N, meta["BLOCK_N"]), S)](
        x, codebook, cterm, pos, indices, distances, pscore, pidx, pxterm,
        N, K, D, S, next_pow2(K),
        x.stride(0), x.stride(1), codebook.stride(0), codebook.stride(1), pos.stride(0), pos.stride(1),
        METRIC=m, HAS_LOWER_BOUND=has_lb, WRITE_PARTIAL=S > 1, ONE_D_BLOCK=one_d,
        PRECISION=tl_input_precision(x.dtype, allow_tf32), DOT_FP32=dot_fp32(x.dtype), BLOCK_D=BLOCK_D,
    )
    # ... and, when the codebook was split, the tiny merge of the partials.
    if S > 1:
        BLOCK_NR = 128
        _nearest_code_reduce_kernel[(triton.cdiv(N, BLOCK_NR),)](
            pscore, pidx, pxterm, indices, distances, N, K, S,
            METRIC=m, HAS_LOWER_BOUND=has_lb, BLOCK_N=BLOCK_NR,
        )
    return indices, distances


def _check(fn, x, codebook, metric):
    if x.dim() != 2 or codebook.dim() != 2 or x.shape[1] != codebook.shape[1]:
        raise ValueError(f"{fn}: expected (N, D) and (K, D), got {tuple(x.shape)} and {tuple(codebook.shape)}")
    if codebook.shape[0] == 0:
        raise ValueError(f"{fn}: the codebook is empty (K = 0), shape {tuple(codebook.shape)}")
    if x.dtype != codebook.dtype:
        raise TypeError(f"{fn}: dtypes differ: {x.dtype} and {codebook.dtype}")
    if metric not in METRICS:
        raise ValueError(f"{fn}: unknown metric {metric!r}; expected one of {tuple(METRICS)}")


@launcher
def nearest_code_fwd(x: torch.Tensor, codebook: torch.Tensor, metric: str = "l2", allow_tf32: bool = False,
                     splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, D), (K, D) -> (N,) int64 indices, (N,) float32 distances``. Same dtype and device.

    ``splits`` forces the number of codebook splits (default: :func:`num_splits`).
    """
    # check
    _check("nearest_code_fwd", x, codebook, metric)
    # allocate, launch
    return _launch(x, codebook, metric, allow_tf32, None, splits)


@launcher
def mine_negatives_fwd(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                       strategy: str = "hardest", splits: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, D), (N, D), (M, D) -> (N,) int64, (N,) float32`` squared distances. Same dtype and device.

    The nearest-code kernel (l2) with a per-row lower bound ``|a - p|^2`` for "semi-hard".
    """
    # check
    _check("mine_negatives_fwd", anchor, negatives, "l2")
    if positive.shape != anchor.shape or positive.dtype != anchor.dtype:
        raise ValueError(f"mine_negatives_fwd: positive {tuple(positive.shape)} {positive.dtype} does not match "
                         f"anchor {tuple(anchor.shape)} {anchor.dtype}")
    if strategy not in STRATEGIES:
        raise ValueError(f"mine_negatives_fwd: unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    # allocate, launch
    return _launch(anchor, negatives, "l2", False, positive if strategy == "semi-hard" else None, splits)
