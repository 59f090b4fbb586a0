"""Codebook machinery shared by VectorQuantizer and ResidualQuantizer.

Everything here works on level-stacked tensors: a codebook ``(L, K, D)``, EMA counts
``(L, K)`` and sums ``(L, K, D)``. A single codebook is the case ``L = 1`` (the module passes
``weight.unsqueeze(0)``, a view, so the in-place updates land in its own parameter).

- :func:`ema_update_` (:mod:`fastvq.ops.ema_update`, used as is): the seed EMAQuantizer's update
  (decay, Laplace smoothing), guarded: a level whose batch has no rows is left as it is, and no
  state becomes non-finite.
- :func:`offer_candidates`: a uniform random sample of every rank's valid rows, chosen in a
  fixed-size exchange; what dead-code revival and k-means start from.
- :func:`expire_dead_codes_`: revive codes whose (EMA) usage fell below a threshold, without
  a host sync.
- :func:`kmeans`: Lloyd's algorithm with ``fastvq.nearest_code`` / ``fastvq.code_statistics``.
- :class:`CodebookState`: the constructor options, the buffers and the training-time updates
  (statistics, EMA, dead codes, k-means init, the low-usage warning) that both modules mix in.

Robustness: rows that are not finite in the codebook's dtype (:func:`fastvq._checks.finite_limit`:
NaN, inf, or 1e10 for a float16 codebook) or have weight 0 in a mask never enter the
statistics, the revival candidates or k-means; the former are counted in the ``nonfinite_rows``
buffer. A k-means centroid or a revival candidate is finite in the codebook's dtype, and the
EMA update keeps a code whose new value is not (:func:`fastvq.ops.ema_update.ema_update_`). EMA
state is float32 whatever the module's dtype. Nothing on the training path reads a device
value on the host (k-means init reads it on the one batch that initialises).

Distributed: statistics are summed over ranks (:func:`fastvq.distributed.all_reduce_sum_`)
before they are used; random choices come from a fixed-size exchange of candidate rows
(:func:`fastvq.distributed.all_gather` of scores, one all-reduce of the rows) that every rank
resolves identically, so every rank
holds the same codebooks and runs the same collectives whatever its batch holds.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn

from .. import distributed as fdist
from .._backend import tf32_like_torch
from .._names import GRADS
from .._checks import (FLOAT_DTYPES, check_bool_arg, check_choice, check_int_arg, check_real_arg, check_tensor, finite_limit,
                       user_stacklevel, weights_detail)
from ..ops.code_statistics import code_statistics
from ..ops.ema_update import ema_update_
from ..ops.nearest_code import nearest_code


def allow_tf32(x: torch.Tensor) -> bool:
    """Whether a module's float32 search of ``x`` runs TF32 dots: as torch runs its own float32
    matmuls on ``x``'s device (the seeds' cdist and matmul). The one place the modules decide it,
    for the fused step, the cosine and dot searches and k-means alike."""
    return tf32_like_torch(x)


def search(x: torch.Tensor, codebook: torch.Tensor, metric: str) -> torch.Tensor:
    """``(N, D), (K, D) -> (N,)``: the codes of a module's search (``nearest_code`` with the
    modules' TF32 rule, :func:`allow_tf32`)."""
    return nearest_code(x, codebook, metric=metric, allow_tf32=allow_tf32(x))[0]


DEFAULT_DECAY = 0.99  # the modules' EMA decay and eps (the seeds' EMAQuantizer's)
DEFAULT_EPS = 1e-5

#: The settings that train a codebook well (measured in tests/nn/test_codebook_training.py);
#: the low-usage warning names them.
RECOMMENDED = {"kmeans_init": True, "dead_code_threshold": 1.0}

USAGE_WARMUP_STEPS = 100  # training steps before usage is first watched
USAGE_WINDOW_STEPS = 100  # steps per window (and at least 2 K rows per window)
USAGE_MIN_FRACTION = 1 / 8


def reset_size(threshold: float) -> float:
    """EMA count given to a revived code: the threshold, at least 1 (one vector)."""
    return max(float(threshold), 1.0)


def revival_limit(threshold: float, ema: bool, dtype: torch.dtype = torch.float32) -> float:
    """Largest max-abs of a revival candidate: finite in the codebook's ``dtype``
    (:func:`finite_limit`) and, with EMA, such that the revived code's ``embed_avg`` (the
    candidate times :func:`reset_size`) stays finite in float32 (with a 1% margin for the
    candidate's rounding to the codebook's dtype)."""
    ema_limit = torch.finfo(torch.float32).max / (1.01 * reset_size(threshold)) if ema else math.inf
    return min(ema_limit, finite_limit(dtype))


@torch.no_grad()
def offer_candidates(
    vectors: torch.Tensor,
    num: int,
    weights: torch.Tensor | None = None,
    anchors: tuple[torch.Tensor, torch.Tensor] | None = None,
    limit: float = math.inf,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num`` random valid rows per level, drawn from every rank's ``vectors``, the same on every rank
    (the ranks of ``group``, a process group; ``None``: the default one).

    ``vectors (L, N, D)`` (``N`` may differ between ranks, and be 0); ``weights`` ``(N,)`` or
    ``(L, N)`` (rows of weight 0 are never offered) or None; ``anchors``: None (offer the rows
    themselves) or ``(codebook (L, K, D), indices (L, N))``, then a row ``x`` with code ``c``
    is offered as the midpoint ``(c + x) / 2`` (what dead-code revival places: see
    :func:`expire_dead_codes_`). A row is valid when it has nonzero weight, it is finite and
    its offer is finite, its max-abs below ``limit`` (revival with EMA: :func:`revival_limit`).

    The exchange has a fixed size, so no rank waits on a size it must first read: each rank
    gives every valid row a random score and offers its ``num`` highest (padded with invalid
    ones); the ranks all-gather the scores ``(world, L, num)``, every rank keeps the ``num``
    highest of them (valid first), identically, and one all-reduce of ``(L, num, D)`` brings
    each kept row from its rank to its slot. Returns float32 ``(candidates (L, num, D), valid
    (L, num))``; the valid ones come first, and are distinct rows, a uniform random sample of
    all ranks' valid rows (all of them when there are fewer than ``num``), whichever ranks hold
    them. No host sync.
    """
    L, N, D = vectors.shape
    dev = vectors.device
    # (float32, never the default dtype: under a bfloat16 default the scores tied and topk took the
    # batch's first rows; fuzzN)
    score = torch.rand((L, N), dtype=torch.float32, device=dev)
    if weights is not None:
        score = torch.where((weights.reshape(1, N) if weights.dim() == 1 else weights) != 0, score, -1.0)
    # a row that is not finite takes no offer from a finite one (its midpoint is not finite either)
    finite = torch.linalg.vector_norm(vectors.float(), ord=float("inf"), dim=-1) < float("inf")
    score = torch.where(finite, score, -1.0)
    c = min(num, N)
    if c == 0:
        return exchange_offers(vectors.new_zeros((L, 0, D)), torch.zeros((L, 0), dtype=torch.float32, device=dev), num,
                               limit=limit, group=group)
    top, rows = score.topk(c, dim=1)
    picked = vectors.gather(1, rows.unsqueeze(-1).expand(L, c, D))
    if anchors is not None:
        codebook, indices = anchors
        anchors = (codebook, indices.long().gather(1, rows))
    return exchange_offers(picked, top, num, anchors, limit, group)


def pick_candidate_rows(n: int, num: int, device, weights: torch.Tensor | None = None):
    """The rows a rank offers for ``num`` candidates (see :func:`offer_candidates`), chosen before
    the vectors exist (the fused training step computes the residuals of just these rows):
    ``(rows (c,) int64, score (c,) float32)``, ``c = min(num, n)``, the rows of nonzero weight
    with the highest random scores first (score -1: weight 0, not valid). Their values are not
    known yet: a row among them that turns out not finite is dropped from the offer, so a batch
    holding such rows may offer fewer than ``num`` valid candidates though it has ``num`` valid
    rows (:func:`offer_candidates`, which sees the vectors, leaves such rows out first)."""
    score = torch.rand((n,), dtype=torch.float32, device=device)
    if weights is not None:
        score = torch.where(weights.reshape(n) != 0, score, -1.0)
    top, rows = score.topk(min(num, n))
    return rows, top


@torch.no_grad()
def exchange_offers(
    picked: torch.Tensor,
    score: torch.Tensor,
    num: int,
    anchors: tuple[torch.Tensor, torch.Tensor] | None = None,
    limit: float = math.inf,
    group=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The exchange of :func:`offer_candidates` (over ``group``) for rows already picked: ``picked (L, c, D)``
    this rank's vectors with their random ``score (L, c)`` (or ``(c,)``; negative: not valid),
    ``c <= num``; ``anchors`` None or ``(codebook (L, K, D), codes (L, c))`` (offer midpoints);
    ``limit``: offers whose max-abs is not below it are not valid. Returns ``(candidates (L,
    num, D), valid (L, num))`` float32, the same on every rank. No host sync: one all-gather
    of ``(L, num)`` scores and one all-reduce of ``(L, num, D)`` rows."""
    L, c, D = picked.shape
    dev = picked.device
    if c > 0:
        top = score.expand(L, c)
        picked = picked.float()
        if anchors is not None:
            codebook, codes = anchors
            base = codebook.gather(1, codes.long().unsqueeze(-1).expand(L, c, D)).float()
            mid = base + picked  # the midpoint, rounded once and without an intermediate overflow
            picked = torch.where(mid.abs() < float("inf"), 0.5 * mid, 0.5 * base + 0.5 * picked)
        # finite rows below the limit: one max-abs read (NaN propagates through the max)
        ok = (top >= 0) & (torch.linalg.vector_norm(picked, ord=float("inf"), dim=-1) < limit)
        rows, top = torch.where(ok.unsqueeze(-1), picked, 0.0), torch.where(ok, top, -1.0)
    else:
        rows = picked.new_zeros((L, 0, D), dtype=torch.float32)
        top = torch.full((L, 0), -1.0, dtype=torch.float32, device=dev)
    if c < num:  # fewer rows than offers: pad with invalid ones
        rows = torch.cat([rows, torch.zeros((L, num - c, D), dtype=torch.float32, device=dev)], 1)
        top = torch.cat([top, torch.full((L, num - c), -1.0, dtype=torch.float32, device=dev)], 1)
    # every rank's scores (W, L, num) -> the same num best on every rank, and whose they are
    pool = fdist.all_gather(top, group).transpose(0, 1).reshape(L, -1)  # (L, W * num)
    best, order = pool.topk(num, dim=1)
    mine = (order // num == fdist.get_rank(group)) & (best >= 0)
    candidates = torch.where(mine.unsqueeze(-1), rows.gather(1, (order % num).unsqueeze(-1).expand(L, num, D)), 0.0)
    fdist.all_reduce_sum_(candidates, group=group)  # each slot: one rank's row plus zeros, exactly the row
    return candidates, best >= 0


@torch.no_grad()
def expire_dead_codes_(
    codebook: torch.Tensor,
    usage: torch.Tensor,
    threshold: float,
    candidates: torch.Tensor,
    valid: torch.Tensor,
    embed_avg: torch.Tensor | None = None,
) -> torch.Tensor:
    """Revive, in place, every code whose ``usage`` is below ``threshold``; no host sync.

    ``codebook (L, K, D)``; ``usage (L, K)`` (the EMA ``cluster_size``, or the EMA of batch
    counts a module without EMA keeps); ``candidates (L, K, D)`` and ``valid (L, K)`` from
    :func:`offer_candidates` (valid ones first). The ``j``-th dead code of a level takes the
    ``j``-th candidate, its usage becomes :func:`reset_size` ``(threshold)`` and, with EMA, its
    ``embed_avg`` the new code times that size (so ``embed_avg / cluster_size`` is the new
    code). Dead codes beyond the valid candidates (a small or empty batch) wait for the next
    batch. Returns the number of codes revived per level, an int64 ``(L,)`` tensor (the same on
    every rank).

    The modules offer, before their EMA update, the midpoint between a random batch vector and
    the code it chose: a revived code splits a used code's cell. (A raw batch vector lies far
    out in high dimensions and is seldom anyone's nearest code: revived that way, a 64-d
    codebook of 512 keeps a third of its codes in use; with midpoints, 98%.)
    """
    L, K, D = codebook.shape
    dead = usage < threshold  # the same on every rank: usage comes from all-reduced counts
    slot = (torch.cumsum(dead, 1) - 1).clamp_(0, K - 1)  # the j-th dead code takes candidate j
    revive = dead & valid.gather(1, slot)
    new = candidates.gather(1, slot.unsqueeze(-1).expand(L, K, D))
    size = reset_size(threshold)
    # (where(..., out=): in place, one read of each operand and one write)
    new = new.to(codebook.dtype)
    torch.where(revive.unsqueeze(-1), new, codebook, out=codebook)
    usage.masked_fill_(revive, size)
    if embed_avg is not None:  # the new code (as the codebook holds it) times its count
        torch.where(revive.unsqueeze(-1), new.to(embed_avg.dtype).mul_(size), embed_avg, out=embed_avg)
    return revive.sum(1)


@torch.no_grad()
def kmeans(
    x: torch.Tensor, init: torch.Tensor, iters: int, metric: str = "l2", weights: torch.Tensor | None = None,
    limit: float = math.inf, group=None, owner: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """Lloyd's k-means on the valid rows of ``x (N, D)``, over all ranks of ``group`` (a process
    group; ``None``: the default one).

    A row is valid when its weight is nonzero and its max-abs is below ``limit`` (so finite;
    :func:`finite_limit` of the codebook's dtype: a row that dtype cannot hold is left out as
    not finite). Starts from ``K = init.shape[0]`` random valid rows of all ranks' ``x``
    (:func:`offer_candidates`: distinct when there are at least ``K``, else repeated), the same
    on every rank. Each of the ``iters`` steps assigns rows with :func:`fastvq.nearest_code`
    and moves each centroid to the mean of its valid rows from :func:`fastvq.code_statistics`
    (counts and sums all-reduced over ranks); a centroid with no rows, or whose mean is not
    below ``limit`` (float32 sums of rows near the float32 maximum overflow), stays where it
    is. Returns float32 ``(centroids (K, D), counts (K,), skipped ())``, the counts of the
    last assignment and the rows (all ranks) of nonzero weight left out as not valid;
    ``centroids`` and ``counts`` are None when no rank has a valid row. ``owner`` (a module's
    name) warns, naming the fix, when there are fewer valid rows than codes. Stops early at a fixed
    point (no row changed its code on any rank: the same result as running every step). Reads
    the number of valid candidates and, after each step from the second, the number of rows that
    changed code on the host (syncs on the batch that initialises only).
    """
    K, D = init.shape
    w = torch.ones(x.shape[:1], dtype=torch.float32, device=x.device) if weights is None else weights.float()
    bad = ~(torch.linalg.vector_norm(x.float(), ord=float("inf"), dim=-1) < limit)  # (NaN: bad)
    skipped = ((w != 0) & bad).sum().float()
    weights = torch.where(bad, 0.0, w)  # (the rows left out carry weight 0 from here on)
    fdist.all_reduce_sum_(skipped.view(1), group=group)
    # the largest weight of any rank (see below), read with the number of valid rows: one host read
    top = fdist.all_gather(weights.amax().view(1) if weights.numel() else weights.new_zeros(1), group).amax()
    candidates, valid = offer_candidates(x.unsqueeze(0), K, weights.unsqueeze(0), group=group)
    n_valid, huge = torch.stack([valid.sum(), (top > 2.0**64).long()]).tolist()
    if n_valid == 0:
        return None, None, skipped
    if owner is not None and n_valid < K:  # (a warm-up forward in train mode, a tiny first batch; fuzzO F1)
        warnings.warn(
            f"fastvq.{owner}: k-means init ran on a batch with {n_valid} valid rows (all ranks) for {K} codes, so "
            f"{K - n_valid} codes start as copies of other codes; the module is marked initialised and will not "
            f"run k-means again. Give it a first training batch of at least {K} rows (a warm-up call in train "
            f"mode counts; use eval mode for it), or set dead_code_threshold > 0 so unused codes are revived.",
            stacklevel=user_stacklevel(),
        )
    centroids = candidates[0, torch.arange(K, device=x.device) % n_valid]
    # Weights above 2^64 (any rank): a count can overflow float32 beside a finite sum (weights
    # of 1e38: a "mean" of 0 became a code; mutF). The statistics are then formed twice, as
    # given and with the weights scaled by the power of two that brings the largest into [1, 2)
    # (2^127 at most), and a cluster whose count overflowed takes the scaled mean (a mean does
    # not depend on the weights' scale; the scaled statistics alone lose weights 2^149 below the
    # largest, review14)
    big = torch.ldexp(torch.ones_like(top), torch.frexp(top)[1] - 1) if huge else None
    previous = None
    for step in range(max(iters, 1)):
        idx = search(x, centroids, metric)
        counts, sums = code_statistics(x, idx, K, weights=weights)
        scaled = [] if big is None else list(code_statistics(x, idx, K, weights=weights / big))  # (exact)
        # rows whose code changed since the last step, all ranks (summed with the statistics)
        changed = [] if previous is None else [(idx != previous).sum(dtype=torch.float32).view(1)]
        fdist.all_reduce_sum_(counts, sums, *scaled, *changed, group=group)
        if iters == 0:  # only the counts of the starting points were asked for
            break
        new = sums / counts.clamp_min(1e-30).unsqueeze(-1)
        if scaled:
            mean = scaled[1] / scaled[0].clamp_min(1e-30).unsqueeze(-1)
            new = torch.where(counts.isfinite().unsqueeze(-1), new, mean)
        move = (counts > 0) & (torch.linalg.vector_norm(new, ord=float("inf"), dim=-1) < limit)
        centroids = torch.where(move.unsqueeze(-1), new, centroids)
        # No row changed its code on any rank: the update gave back the same centroids, and every
        # later step would give these centroids and counts again (a fixed point), so stop. The
        # result is the same as after all ``iters`` steps; one host read per step, on the batch
        # that initialises only.
        if changed and float(changed[0]) == 0:
            break
        previous = idx
    return centroids, counts, skipped


def _fixed_at_construction(name: str) -> property:
    """A bool option stored as ``_<name>``, set once by the constructor (``_set_once``)."""
    return property(lambda self: self.__dict__[f"_{name}"], lambda self, value: self._set_once(name, value),
                    doc=f"``{name}``: fixed at construction (it decides the module's buffers).")


class _UsageMonitor:
    """Watches, in training, how many codes each level uses, and warns once when fewer than
    1/8 do. Never waits on the device: a window's count is copied to the host without blocking
    (a pinned buffer and an event on CUDA) and read when the copy has landed, a step or more
    later."""

    def __init__(self):
        self.steps = 0
        self.window_steps = 0
        self.window_rows = 0
        self.real_rows: torch.Tensor | None = None  # rows of nonzero weight this window (on the device)
        self.seen: torch.Tensor | None = None
        self.pending = None
        self.warned = False

    def __deepcopy__(self, memo):  # copies of a module watch afresh (nothing device-bound is shared)
        fresh = _UsageMonitor()
        fresh.warned = self.warned
        return fresh

    def __getstate__(self):  # torch.save(module): no CUDA event or pinned buffer in the pickle
        return {"warned": self.warned}

    def __setstate__(self, state):
        self.__init__()
        self.warned = state.get("warned", False)


def _after_load(module: "CodebookState", incompatible_keys) -> None:
    module._after_load_()


class CodebookState(nn.Module):
    """Base of the quantizer modules: options, EMA / dead-code / k-means buffers and updates.

    A subclass calls :meth:`_init_codebook_state` once its codebook exists, and implements
    :meth:`_codebook_parameter` (its codebook parameter, ``(K, D)`` or ``(L, K, D)``, as
    ``_single_codebook`` says). Buffers, shaped ``(K,)``
    / ``(K, D)`` for a single codebook and ``(L, K)`` / ``(L, K, D)`` for ``L`` levels:

    ``cluster_size``, ``embed_avg`` (``ema=True``; persistent, the seed EMAQuantizer's keys)
        EMA of code counts and of code sums; ``embed_avg`` starts as a copy of the codebook and
        ``cluster_size`` at zero, as in the seed. Always float32 (also after ``.half()``,
        ``.bfloat16()`` or under autocast).
    ``code_usage`` (``ema=False`` and ``dead_code_threshold > 0``; persistent, float32)
        EMA (same ``decay``) of code counts, for dead-code detection without EMA codebooks.
        Starts at :func:`reset_size`, like a freshly revived code.
    ``initted`` (``kmeans_init=True``; persistent)
        whether k-means has initialised the codebook.
    ``nonfinite_rows`` (always; not persistent: the state_dict is the seed's)
        int64 scalar: training rows (all ranks, all steps) left out of the codebook statistics,
        revival and k-means because they held a NaN or an infinity (for a residual quantizer,
        the most any level left out per step). Log it; a growing value means bad inputs. It
        counts where the codebook update reads the rows: every training step with ``ema=True``
        or ``dead_code_threshold > 0``, else only the batch that runs k-means init; a
        gradient-trained codebook without them reads no statistics (a NaN row makes its
        losses NaN instead).
    ``codes_revived`` (``dead_code_threshold > 0``; not persistent)
        int64 scalar: codes revived so far (all levels).

    The optional buffers are persistent only when the option that needs them is on, so with
    default options the state_dict has exactly the seed's keys. Loading a state_dict that lacks
    them (a seed checkpoint) fills them in: ``initted`` as True (a loaded codebook is not
    re-initialised), ``code_usage`` at :func:`reset_size`; a state_dict that has one the module
    does not use loads too (the entry is ignored). With ``load_state_dict(..., assign=True)``
    the EMA buffers are made float32 again (a half-precision checkpoint), and a module built on
    the meta device gets the buffers the state_dict does not hold (the counters) on its
    codebook's device.

    In training, the module warns once (``UserWarning``) when a level used fewer than 1/8 of
    its codes over a window of 100 steps (after 100 steps of warm-up), naming the settings that
    fix it; set ``warn_low_usage = False`` to silence it. Not watched under ``torch.compile``.
    """

    _OPTIONAL_BUFFERS = ("code_usage", "initted")
    _FLOAT32_BUFFERS = ("cluster_size", "embed_avg", "code_usage")
    warn_low_usage = True

    _codebook_name = "the codebook"

    def _check_inputs(self, inputs) -> None:
        """``TypeError``/``ValueError`` naming the module unless ``inputs`` is a float32, float16
        or bfloat16 ``(..., embedding_dim)`` tensor on the codebook's device (and the codebook one
        of those dtypes). Runs before anything reads the batch (k-means init)."""
        check_tensor(self._owner, "inputs", inputs)
        if inputs.dim() < 1 or inputs.shape[-1] != self.embedding_dim:
            raise ValueError(
                f"fastvq.{self._owner}: inputs must be (..., {self.embedding_dim}), got shape {tuple(inputs.shape)}"
            )
        # (its dtype and device only: .data in an eval forward became a constant that
        # torch.export refused, compileprobe P1)
        codebook = self._codebook_parameter()
        for name, t in (("inputs", inputs), (self._codebook_name, codebook)):
            if t.dtype not in FLOAT_DTYPES:
                raise TypeError(
                    f"fastvq.{self._owner}: {name} must be float32, float16 or bfloat16, got {t.dtype} "
                    "(float64 is not supported: cast the inputs and the module, e.g. .float())"
                )
        if inputs.device != codebook.device:
            raise ValueError(f"fastvq.{self._owner}: inputs are on {inputs.device}, the module on {codebook.device} "
                             f"(move the inputs, e.g. inputs.to({str(codebook.device)!r}))")

    def _init_codebook_state(
        self,
        owner: str,
        *,
        ema: bool,
        decay: float,
        eps: float,
        grad: str,
        dead_code_threshold: float,
        kmeans_init: bool,
        kmeans_iters: int,
        process_group=None,
    ) -> None:
        ema = check_bool_arg(owner, "ema", ema)
        kmeans_init = check_bool_arg(owner, "kmeans_init", kmeans_init)
        grad = check_choice(owner, "grad", grad, GRADS)
        self._owner = owner
        self.ema = ema
        self.decay = check_real_arg(owner, "decay", decay, minimum=0.0, maximum=1.0, float32=True)
        self.eps = check_real_arg(owner, "eps", eps, minimum=0.0, min_open=True, float32=True)
        self.grad = grad
        self.dead_code_threshold = dead_code_threshold
        # vector-quantize-pytorch's quantizers are EMA by default, decay their setting: a port that
        # keeps decay= but not ema=True trains its codebook by gradient, and without the codebook
        # loss never moves it (fuzzO F2). Revival's usage EMA reads decay; eps is the EMA's alone.
        unused = [f"{name}={value!r}" for name, value, default, used in (
            ("decay", self.decay, DEFAULT_DECAY, ema or self.dead_code_threshold > 0),
            ("eps", self.eps, DEFAULT_EPS, ema)) if value != default and not used]
        if unused:
            verb = "has" if len(unused) == 1 else "have"
            warnings.warn(f"fastvq.{owner}: {' and '.join(unused)} {verb} no effect without ema=True (the codebook "
                          f"trains by gradient: add the codebook loss, embedding_loss, to yours); for an EMA "
                          f"codebook, as vector-quantize-pytorch's default, pass ema=True",
                          stacklevel=user_stacklevel())
        self.kmeans_init = kmeans_init
        self.kmeans_iters = check_int_arg(owner, "kmeans_iters", kmeans_iters, 0)
        self.process_group = process_group

        weight = self._codebook_levels().detach()
        squeeze = self._single_codebook
        level_shape = weight.shape[1:2] if squeeze else weight.shape[:2]
        if ema:
            self.register_buffer("cluster_size", torch.zeros(level_shape, dtype=torch.float32))
            self.register_buffer("embed_avg", (weight[0] if squeeze else weight).float().clone())
        else:
            self.cluster_size = None
            self.embed_avg = None
        if not ema and self.dead_code_threshold > 0:
            usage = torch.full(level_shape, reset_size(self.dead_code_threshold), dtype=torch.float32)
            self.register_buffer("code_usage", usage)
        else:
            self.code_usage = None
        self.register_buffer("initted", torch.tensor(not kmeans_init), persistent=kmeans_init)
        self._kmeans_done = not kmeans_init  # host-side mirror of `initted` (read once, then kept)
        self._kmeans_checked = False
        self.register_buffer("nonfinite_rows", torch.zeros((), dtype=torch.int64), persistent=False)
        if self.dead_code_threshold > 0:
            self.register_buffer("codes_revived", torch.zeros((), dtype=torch.int64), persistent=False)
        else:
            self.codes_revived = None
        self._usage_monitor = _UsageMonitor()
        # (after the whole module has loaded: a VectorQuantizer's codebook is a child's parameter)
        self.register_load_state_dict_post_hook(_after_load)

    # -- options that decide the buffers --------------------------------------------------
    # ``ema`` and ``kmeans_init`` are fixed at construction (they decide which buffers exist);
    # ``dead_code_threshold`` may change (a schedule), but revival needs its buffers, so a module
    # built without it cannot turn it on later. The others (decay, eps, ...) are plain attributes.
    ema = _fixed_at_construction("ema")
    kmeans_init = _fixed_at_construction("kmeans_init")

    def _set_once(self, name: str, value) -> None:
        if f"_{name}" in self.__dict__:
            raise AttributeError(f"fastvq.{self._owner}: {name} is fixed at construction (it decides the module's "
                                 f"buffers); build a new module with {name}={value!r}")
        self.__dict__[f"_{name}"] = check_bool_arg(self._owner, name, value)

    @property
    def dead_code_threshold(self) -> float:
        return self._dead_code_threshold

    @dead_code_threshold.setter
    def dead_code_threshold(self, value) -> None:
        value = check_real_arg(self._owner, "dead_code_threshold", value, minimum=0.0, float32=True)
        # (codes_revived exists exactly when the module was built with revival on)
        if "_dead_code_threshold" in self.__dict__ and value > 0 and getattr(self, "codes_revived", None) is None:
            raise ValueError(f"fastvq.{self._owner}: dead_code_threshold can be set > 0 after construction only on a "
                             f"module built with dead_code_threshold > 0 (revival needs its buffers); build it with "
                             f"the threshold, or with any value > 0 and set 0 to pause revival, got {value!r}")
        self.__dict__["_dead_code_threshold"] = value

    @property
    def process_group(self):
        """The ``torch.distributed`` process group whose ranks the codebook is synced over
        (statistics, revival and k-means candidates); ``None``, the default: the default group
        (every rank). Give a ``DistributedDataParallel(..., process_group=g)`` model's quantizers
        that ``g``, or a one-rank group (``dist.new_group([rank])``) to train each rank's codebook
        alone. May be set at any time; every rank of the group must set the same."""
        handle = self.__dict__.get("_process_group")  # (absent in a module pickled before it existed)
        return None if handle is None else handle.group

    @process_group.setter
    def process_group(self, group) -> None:
        self.__dict__["_process_group"] = fdist.GroupHandle(group, self._owner)

    # -- subclass hooks -------------------------------------------------------------------
    _single_codebook = True

    def _codebook_parameter(self) -> torch.Tensor:  # pragma: no cover - abstract
        """The codebook parameter itself: ``(K, D)`` or ``(L, K, D)``."""
        raise NotImplementedError

    def _codebook_levels(self) -> torch.Tensor:
        """The codebook as an ``(L, K, D)`` view, for the in-place updates, which run under
        ``torch.no_grad()`` (not recorded by autograd). Not ``.data``: an update through the
        parameter bumps its version, so the backward of an earlier forward that saved it (an
        eval forward with grad, then a training step, then that backward) raises torch's
        "modified by an inplace operation" error instead of reading the updated codebook
        (fuzzL: input gradients 300x off, silently)."""
        return self._levels(self._codebook_parameter())

    def _levels(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else (t.unsqueeze(0) if self._single_codebook else t)

    # -- dtypes ---------------------------------------------------------------------------
    def _apply(self, fn, recurse=True):
        """``.to()``, ``.half()``, ``.bfloat16()``, ``.cuda()``...: the EMA buffers follow the
        device, but stay float32 (float64 if asked for); converted from the float32 values,
        not from a rounded copy."""
        kept = {name: self._buffers[name] for name in self._FLOAT32_BUFFERS if self._buffers.get(name) is not None}
        out = super()._apply(fn, recurse)
        for name, before in kept.items():
            after = self._buffers[name]
            dtype = torch.float64 if after.dtype == torch.float64 else torch.float32
            # (from a meta tensor, as `to_empty` makes: no values to convert, only storage)
            self._buffers[name] = after.to(dtype) if before.is_meta else before.to(device=after.device, dtype=dtype)
        return out

    # -- training-time updates ------------------------------------------------------------
    def _usage_levels(self) -> torch.Tensor | None:
        return self._levels(self.cluster_size if self.ema else self.code_usage)

    @property
    def _codebook_needs_vectors(self) -> bool:
        """Whether :meth:`_update_codebook_` reads ``vectors`` (EMA or dead-code revival on)."""
        return self.ema or self.dead_code_threshold > 0

    @torch.no_grad()
    def _update_codebook_(
        self, vectors: torch.Tensor | None, indices: torch.Tensor, mask: torch.Tensor | None = None,
        *, stats=None, offers=None,
    ) -> None:
        """After a training forward: EMA update, dead-code revival, usage watch. No host sync.

        ``vectors (L, N, D)``: what each level quantized (detached; any float dtype); may be
        None when :attr:`_codebook_needs_vectors` is False, or when ``stats`` and ``offers``
        (below) replace it. ``indices (L, N)``: its codes. ``mask``: None, or ``(N,)`` bool
        (padding: False rows are ignored) or float per-row weights, shared by the levels. Rows
        that are not finite in the codebook's dtype are left out and counted in
        ``nonfinite_rows``; a batch with no valid
        row (empty, all padding, all non-finite) changes nothing.

        A fused step that computed the statistics itself passes ``stats = (counts (L, K), sums
        (L, K, D), skipped (L,))`` (:func:`fastvq.residual_quantize_step`) and, for revival,
        ``offers = (picked (L, c, D), score (c,) or (L, c))``: for the rows
        :func:`pick_candidate_rows` chose, the midpoints of their vectors and the codes they
        chose, and their scores (negative where a row is not usable, per level where given so).
        """
        codebook = self._codebook_levels()
        L, K, _ = codebook.shape
        counts = None
        if self._codebook_needs_vectors:
            # (an attribute a schedule may set: checked here, on the host, for both EMAs; the
            # usage EMA of revival without EMA codebooks took a NaN decay and stayed NaN)
            decay = check_real_arg(self._owner, "decay", self.decay, minimum=0.0, maximum=1.0, float32=True)
            if mask is not None and mask.dim() != 1:
                mask = mask.reshape(-1)
            weights = mask  # the rows the statistics and candidates take (the usage watch counts `mask`'s)
            if stats is None:
                far = None
                if finite_limit(codebook.dtype) < math.inf:  # rows a 16-bit codebook cannot hold: as NaN rows
                    far = torch.linalg.vector_norm(vectors.float(), ord=float("inf"), dim=-1) >= finite_limit(
                        codebook.dtype)  # (L, N)
                    w = (torch.ones(far.shape, dtype=torch.float32, device=far.device) if mask is None
                         else mask.float().expand(far.shape))
                    weights = torch.where(far, 0.0, w)
                counts, sums, skipped = code_statistics(vectors, indices, K, weights=weights, return_skipped=True)
                if far is not None:
                    skipped = skipped + (far & (w != 0)).sum(-1, dtype=skipped.dtype)
            else:
                counts, sums, skipped = stats
            skipped = skipped.float()
            if self.dead_code_threshold > 0:  # offered now: the midpoints use the codes as chosen
                # (finite in the codebook's dtype; with EMA, a candidate times the revived size
                # must not overflow embed_avg)
                limit = revival_limit(self.dead_code_threshold, self.ema, codebook.dtype)
                if offers is None:
                    candidates, valid = offer_candidates(vectors, K, weights, anchors=(codebook, indices), limit=limit,
                                                         group=self.process_group)
                else:
                    picked, score = offers
                    candidates, valid = exchange_offers(picked, score, K, limit=limit, group=self.process_group)
            if self.ema:
                fdist.all_reduce_sum_(counts, sums, skipped, group=self.process_group)
                ema_update_(codebook, self._levels(self.cluster_size), self._levels(self.embed_avg), counts, sums,
                            decay, self.eps)
            else:
                fdist.all_reduce_sum_(counts, skipped, group=self.process_group)
                usage = self._levels(self.code_usage)
                live = counts.sum(-1, keepdim=True) > 0  # an empty batch leaves usage as it is
                new = usage.mul(decay).add_(counts, alpha=1 - decay)
                # a count that is not finite (a sum of huge row weights) keeps the code's usage, as
                # the EMA update keeps its state (fuzzI: weights of 1e38 made every usage inf)
                usage.copy_(torch.where(live & new.isfinite(), new, usage))
            self.nonfinite_rows.add_(skipped.amax().long())
            if self.dead_code_threshold > 0:
                revived = expire_dead_codes_(codebook, self._usage_levels(), self.dead_code_threshold, candidates,
                                             valid, self._levels(self.embed_avg))
                self.codes_revived.add_(revived.sum())
        self._watch_usage(indices, K, mask, counts)

    def _watch_usage(self, indices: torch.Tensor, K: int, mask, counts) -> None:
        m = self._usage_monitor
        if not self.warn_low_usage or m.warned or torch.compiler.is_compiling():
            return
        m.steps += 1
        if m.pending is not None:  # a window's count, copied earlier: read it once it has landed
            host, event, steps, rows = m.pending
            if event is None or event.query():
                m.pending = None
                *used, real = host.tolist()
                worst = min(range(len(used)), key=used.__getitem__)
                # (a window of padding only trains nothing: no collapse to report; fuzzI)
                if used[worst] < USAGE_MIN_FRACTION * K and real >= 2 * K:
                    m.warned = True
                    self._warn_low_usage(used[worst], K, worst, len(used), steps, real)
                    return
        if m.steps <= USAGE_WARMUP_STEPS:
            return
        L, N = indices.shape
        if (m.seen is None or m.seen.device != indices.device or m.seen.shape != (L, K + 1)
                or m.seen.is_inference()):
            # (outside inference mode: a step run under torch.inference_mode() must not leave an
            # inference tensor that the next training step cannot update in place)
            with torch.inference_mode(False):
                m.seen = torch.zeros((L, K + 1), dtype=torch.bool, device=indices.device)
                m.real_rows = torch.zeros((), dtype=torch.int64, device=indices.device)
            m.window_steps = m.window_rows = 0
        if counts is not None:
            m.seen[:, :K] |= counts > 0
        else:
            idx = indices if mask is None else torch.where(mask.reshape(1, N) != 0, indices, K)
            m.seen.scatter_(1, idx.long(), True)
        m.window_steps += 1
        m.window_rows += N
        m.real_rows.add_(N if mask is None else (mask.reshape(-1) != 0).sum())  # (no host read)
        if m.window_steps >= USAGE_WINDOW_STEPS and m.window_rows >= 2 * K and m.pending is None:
            used = torch.cat([m.seen[:, :K].sum(1), m.real_rows.view(1)])  # (L + 1,) int64: one copy
            if used.is_cuda:
                host = torch.empty(used.shape, dtype=torch.int64, device="cpu", pin_memory=True)
                host.copy_(used, non_blocking=True)
                event = torch.cuda.Event()
                event.record()
            else:
                host, event = used.clone(), None
            m.pending = (host, event, m.window_steps, m.window_rows)
            m.seen.zero_()
            m.real_rows.zero_()
            m.window_steps = m.window_rows = 0

    def _warn_low_usage(self, used: int, K: int, level: int, L: int, steps: int, rows: int) -> None:
        where = f" at level {level}" if L > 1 else ""
        current = {"kmeans_init": self.kmeans_init, "dead_code_threshold": self.dead_code_threshold}
        missing = {k: v for k, v in RECOMMENDED.items() if not current[k]}
        if missing:
            fix = ", ".join(f"{k}={v!r}" for k, v in missing.items())
            extra = "" if self.ema else " (with ema=True for an EMA codebook)"
            advice = (f"Construct it with {fix}{extra}, the settings that keep codebooks in use (see the "
                      f"README).")
        else:  # the recommended settings are on: the data, not the settings
            advice = (f"k-means init and dead-code revival are on, so the data probably holds fewer distinct "
                      f"vectors than codes, or each step has fewer rows per code than dead_code_threshold="
                      f"{self.dead_code_threshold!r}.")
        warnings.warn(
            f"fastvq.{self._owner}: only {used} of {K} codes{where} were used in the last {steps} training "
            f"steps ({rows} rows): the codebook has collapsed. {advice} Set `warn_low_usage = False` on the "
            f"module to silence this warning.",
            stacklevel=user_stacklevel(),
        )

    def _kmeans_init_pending(self) -> bool:
        """True while k-means init is on and has not run. Reads ``initted`` on the host once (a
        state_dict may have set it), then keeps the answer on the host: no sync per step."""
        if self._kmeans_done:
            return False
        if not self._kmeans_checked:
            self._kmeans_checked = True
            self._kmeans_done = bool(self.initted)
        return not self._kmeans_done

    @torch.no_grad()
    def _kmeans_init_(self, x: torch.Tensor, metric: str = "l2", mask: torch.Tensor | None = None) -> None:
        """Initialise every level by k-means: level 0 on the valid rows of ``x (N, D)``, level l
        on the residual left by levels < l. Sets the EMA state (or ``code_usage``) consistently
        and ``initted``. When no rank has a valid row (empty, padding, not finite in the
        codebook's dtype) nothing
        happens and the next batch tries again. Reads the host (the number of valid rows) on
        the batches until one initialises."""
        codebook = self._codebook_levels()
        cluster_size, embed_avg = self._levels(self.cluster_size), self._levels(self.embed_avg)
        usage = self._levels(self.code_usage)
        weights = None if mask is None else mask.reshape(-1)
        if weights is not None and weights.is_floating_point():
            # the step checks the weights on the device after this (no host read); the batch
            # that initialises reads the host anyway, and an infinite weight would leave NaN
            # counts in the EMA state for good (review14)
            detail = weights_detail("mask", weights)
            if detail is not None:
                raise ValueError(f"fastvq.{self._owner}: {detail}")
        residual = x.float()
        skipped_max = None
        iters = check_int_arg(self._owner, "kmeans_iters", self.kmeans_iters, 0)  # (an attribute: set later too)
        for level in range(codebook.shape[0]):
            # (rows that are not finite in the codebook's dtype are left out, and counted)
            centroids, counts, skipped = kmeans(residual, codebook[level], iters, metric, weights,
                                                finite_limit(codebook.dtype), self.process_group,
                                                # (revival replaces the copies: no warning then)
                                                owner=self._owner if level == 0 and not self.dead_code_threshold
                                                else None)
            skipped_max = skipped if skipped_max is None else torch.maximum(skipped_max, skipped)
            if centroids is None:  # no valid row on any rank (the same answer everywhere)
                if level == 0:
                    if not self._codebook_needs_vectors:
                        self.nonfinite_rows.add_(skipped_max.long())
                    return
                break
            codebook[level].copy_(centroids)
            # embed_avg / cluster_size is the centroid; where centroid * count would overflow
            # float32 (a centroid near the float32 maximum, or counts that are sums of huge row
            # weights), the count is lowered until it does not. (The cap for max-abs below 1 is
            # the count's own limit: f32max / (1.01 top) overflowed there, so weights of 1e38 left
            # an infinite count and a NaN embed_avg; fuzzI.)
            top = torch.linalg.vector_norm(centroids, ord=float("inf"), dim=-1)
            cap = torch.finfo(torch.float32).max / (1.01 * top.clamp_min(1.0))
            counts = torch.minimum(counts, cap)
            if cluster_size is not None:
                cluster_size[level].copy_(counts)
                embed_avg[level].copy_(centroids * counts.unsqueeze(-1))
            if usage is not None:
                usage[level].copy_(counts)
            if level + 1 < codebook.shape[0]:
                idx = search(residual, centroids, metric)
                residual = residual - centroids[idx]
        if not self._codebook_needs_vectors:  # else the update that follows counts this batch's rows
            self.nonfinite_rows.add_(skipped_max.long())
        self.initted.fill_(True)
        self._kmeans_done = self._kmeans_checked = True

    def _maybe_kmeans_init_(self, x: torch.Tensor, metric: str = "l2", mask: torch.Tensor | None = None) -> None:
        """In training, with ``kmeans_init`` on and not done yet: :meth:`_kmeans_init_` on ``x (..., D)``
        (reshaped to rows only then: a layout that cannot be viewed as rows is copied for it alone)."""
        if self.training and self.kmeans_init and not self._kmeans_done:
            if torch.compiler.is_compiling():  # (initted and the valid row count are read on the host)
                raise RuntimeError(
                    f"fastvq.{self._owner}: k-means init reads the host and does not trace: run one training "
                    "batch eagerly (module(x), which initialises the codebook), then compile the module"
                )
            if self._kmeans_init_pending():
                self._kmeans_init_(x.reshape(-1, x.shape[-1]), metric, mask)

    # -- checkpoints ----------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._convert_state_dict_(state_dict, prefix)
        for name in self._OPTIONAL_BUFFERS:
            key = prefix + name
            buf = getattr(self, name, None)
            persistent = buf is not None and name not in self._non_persistent_buffers_set
            if persistent and key not in state_dict:
                if name == "initted":
                    state_dict[key] = torch.ones_like(buf)  # (True, on the buffer's device)
                else:
                    state_dict[key] = torch.full_like(buf, reset_size(self.dead_code_threshold))
            elif not persistent and key in state_dict:
                state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        self._kmeans_checked = False  # `initted` may have changed: read it again on the next step
        self._kmeans_done = not self.kmeans_init
        initted = self._buffers.get("initted")
        if self.kmeans_init and initted is not None and initted.device.type != "meta":
            # an initialised checkpoint: known now (one host read at load time, not at a step), so a
            # compiled step never reaches the k-means check (compileprobe P4: it raised there)
            if bool(initted):
                self._kmeans_done = self._kmeans_checked = True

    def _after_load_(self) -> None:
        """What ``load_state_dict(..., assign=True)`` leaves to fix: the loaded tensors replace the
        buffers as they are, so EMA state from a half-precision checkpoint is made float32 again
        (as :meth:`_apply` keeps it), and buffers the state_dict did not hold (the counters, which
        are not persistent) are created on the codebook's device when the module was built on
        the meta device (there they would never count, and could not be read). Every load then
        restarts the counters at 0 and sets a non-persistent ``initted`` (no k-means) to True:
        after ``to_empty`` they held uninitialised memory that no state_dict overwrites (a
        logged ``nonfinite_rows`` of 1.8e12 after one clean step; fuzzC)."""
        for name in self._FLOAT32_BUFFERS:
            buf = self._buffers.get(name)
            if buf is not None and buf.dtype not in (torch.float32, torch.float64):
                self._buffers[name] = buf.float()
        device = self._codebook_levels().device
        if device.type == "meta":
            return
        fresh = {"nonfinite_rows": lambda: torch.zeros((), dtype=torch.int64, device=device),
                 "codes_revived": lambda: torch.zeros((), dtype=torch.int64, device=device),
                 "initted": lambda: torch.tensor(True, device=device),  # (not persistent: no k-means)
                 "code_usage": lambda: torch.full(self._buffers["code_usage"].shape,
                                                  reset_size(self.dead_code_threshold), dtype=torch.float32,
                                                  device=device)}
        for name, make in fresh.items():
            buf = self._buffers.get(name)
            if buf is not None and buf.is_meta:
                self._buffers[name] = make()
        for name in ("nonfinite_rows", "codes_revived", "initted"):
            buf = self._buffers.get(name)
            if buf is not None and name in self._non_persistent_buffers_set:
                buf.fill_(name == "initted")  # (in place: a device fill, no host read)

    def _convert_state_dict_(self, state_dict, prefix) -> None:
        """Hook for a subclass to rewrite other layouts (a seed checkpoint) in place."""

    def _codebook_extra_repr(self) -> str:
        parts = [f"grad={self.grad!r}"]
        if self.ema:
            parts.append(f"ema=True, decay={self.decay}, eps={self.eps}")
        if self.dead_code_threshold > 0:
            parts.append(f"dead_code_threshold={self.dead_code_threshold}")
        if self.kmeans_init:
            parts.append(f"kmeans_init=True, kmeans_iters={self.kmeans_iters}")
        return ", ".join(parts)
