"""Codebook machinery shared by VectorQuantizer and ResidualQuantizer.

Everything here works on level-stacked tensors: a codebook ``(L, K, D)``, EMA counts
``(L, K)`` and sums ``(L, K, D)``. A single codebook is the case ``L = 1`` (the module passes
``weight.unsqueeze(0)``, a view, so the in-place updates land in its own parameter).

- :func:`ema_update_`: the seed EMAQuantizer's update, exactly (decay, Laplace smoothing).
- :func:`expire_dead_codes_`: re-seed codes whose (EMA) usage fell below a threshold.
- :func:`kmeans`: Lloyd's algorithm with ``fastvq.nearest_code`` / ``fastvq.code_statistics``.
- :class:`CodebookState`: the constructor options, the buffers and the training-time updates
  (statistics, EMA, dead codes, k-means init) that both modules mix in.

Distributed: statistics are summed over ranks (:func:`fastvq.distributed.all_reduce_sum_`)
before they are used, and whatever is random (re-seeding rows, k-means starting points) is
decided on rank 0 and broadcast, so every rank holds the same codebooks.
"""

from __future__ import annotations

import math
import numbers

import torch
import torch.nn as nn

from .. import distributed as fdist
from ..ops.code_statistics import code_statistics
from ..ops.nearest_code import nearest_code

GRADS = ("ste", "rotation")
METRICS = ("l2", "cosine", "dot")


def reset_size(threshold: float) -> float:
    """EMA count given to a re-seeded code: the threshold, at least 1 (one vector)."""
    return max(float(threshold), 1.0)


@torch.no_grad()
def ema_update_(
    codebook: torch.Tensor,
    cluster_size: torch.Tensor,
    embed_avg: torch.Tensor,
    counts: torch.Tensor,
    sums: torch.Tensor,
    decay: float,
    eps: float,
) -> None:
    """The seed EMAQuantizer's update, per level, in place.

    ``codebook (L, K, D)``, ``cluster_size (L, K)``, ``embed_avg (L, K, D)``; this batch's
    (already all-reduced) ``counts (L, K)`` and ``sums (L, K, D)``::

        cluster_size = decay * cluster_size + (1 - decay) * counts
        embed_avg    = decay * embed_avg    + (1 - decay) * sums
        n            = cluster_size.sum(-1)
        smoothed     = (cluster_size + eps) / (n + K * eps) * n          # Laplace smoothing
        codebook     = embed_avg / smoothed
    """
    K = codebook.shape[-2]
    cluster_size.mul_(decay).add_(counts.to(cluster_size.dtype), alpha=1 - decay)
    embed_avg.mul_(decay).add_(sums.to(embed_avg.dtype), alpha=1 - decay)
    n = cluster_size.sum(-1, keepdim=True)
    smoothed = (cluster_size + eps) / (n + K * eps) * n
    codebook.copy_(embed_avg / smoothed.unsqueeze(-1))


def _random_rows(n: int, k: int, device) -> torch.Tensor:
    """k row indices into n rows: distinct when n >= k, with replacement otherwise."""
    if n >= k:
        return torch.randperm(n, device=device)[:k]
    return torch.randint(n, (k,), device=device)


def candidate_rows(n: int, k: int, device) -> torch.Tensor:
    """``min(n, k)`` distinct random rows of a batch of ``n``: where dead codes are re-seeded from."""
    return torch.randperm(n, device=device)[: min(n, k)]


@torch.no_grad()
def expire_dead_codes_(
    codebook: torch.Tensor,
    usage: torch.Tensor,
    threshold: float,
    candidates: torch.Tensor,
    candidates_ok: torch.Tensor,
    embed_avg: torch.Tensor | None = None,
) -> torch.Tensor:
    """Re-seed, in place and without a host sync, every code whose ``usage`` is below ``threshold``.

    ``codebook (L, K, D)``; ``usage (L, K)`` (the EMA ``cluster_size``, or the EMA of batch
    counts a module without EMA keeps); ``candidates (L, S, D)``, level ``l``'s input vectors
    (residuals) of ``S`` random rows of this batch (:func:`candidate_rows`), and
    ``candidates_ok (L, S)`` which of them may be used (finite, not padding). Dead code ``k`` of
    level ``l`` becomes ``candidates[l, k % S]`` when that one is usable (else it stays dead until
    a later batch), its usage becomes :func:`reset_size` ``(threshold)`` and, with EMA, its
    ``embed_avg`` the new code times that size (so ``embed_avg / cluster_size`` is the new code).
    Rank 0's state is broadcast. Returns the number of codes re-seeded (on rank 0), a 0-d tensor
    of ``usage``'s dtype, the same on every rank.
    """
    L, K, D = codebook.shape
    S = candidates.shape[1]
    dead = usage < threshold  # the same mask on every rank: usage comes from all-reduced counts
    if S == 0:
        revive = torch.zeros_like(dead)
    else:
        if S != K:  # fewer rows than codes: code k takes row k % S
            pick = torch.arange(K, device=codebook.device) % S
            candidates, candidates_ok = candidates[:, pick], candidates_ok[:, pick]
        revive = dead & candidates_ok
        size = reset_size(threshold)
        codebook.copy_(torch.where(revive.unsqueeze(-1), candidates.to(codebook.dtype), codebook))
        usage.masked_fill_(revive, size)
        if embed_avg is not None:
            embed_avg.copy_(torch.where(revive.unsqueeze(-1), codebook.to(embed_avg.dtype) * size, embed_avg))
    num = revive.sum().to(usage.dtype)
    # Rank 0 decides (a rank with an empty batch re-seeded nothing; rank 0's state wins).
    fdist.broadcast_(*(t for t in (codebook, usage, embed_avg) if t is not None), num)
    return num


@torch.no_grad()
def kmeans(x: torch.Tensor, init: torch.Tensor, iters: int, metric: str = "l2") -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on the rows of ``x (N, D)``, over all ranks.

    Starts from ``K`` random rows of rank 0's ``x`` (distinct when it has at least ``K`` rows;
    ``init (K, D)`` itself when it has none), broadcast to every rank. Each of the ``iters``
    steps assigns rows with :func:`fastvq.nearest_code` and moves each centroid to the mean of
    its rows from :func:`fastvq.code_statistics` (counts and sums all-reduced over ranks); a
    centroid with no rows stays where it is (no k-means++ seeding: random rows, as is usual
    for VQ codebooks). Returns float32 ``(centroids (K, D), counts (K,))``, the counts
    of the last assignment.
    """
    K = init.shape[0]
    centroids = init.detach().float().clone()
    if x.shape[0] > 0:
        centroids = x[_random_rows(x.shape[0], K, x.device)].float()
    fdist.broadcast_(centroids)
    counts = torch.zeros(K, dtype=torch.float32, device=x.device)
    for _ in range(max(iters, 1)):
        idx, _ = nearest_code(x, centroids, metric=metric)
        counts, sums = code_statistics(x, idx, K)
        fdist.all_reduce_sum_(counts, sums)
        if iters == 0:  # only the counts of the starting points were asked for
            break
        hit = counts > 0
        centroids = torch.where(hit.unsqueeze(-1), sums / counts.clamp_min(1).unsqueeze(-1), centroids)
    return centroids, counts


def _check_int(name: str, owner: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"fastvq.{owner}: {name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_float(name: str, owner: str, value, lo: float, hi: float = math.inf, lo_open: bool = False) -> float:
    is_number = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not is_number or (value <= lo if lo_open else value < lo) or value > hi:
        bound = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi != math.inf else "")
        raise ValueError(f"fastvq.{owner}: {name} must be a finite number {bound}, got {value!r}")
    return float(value)


class CodebookState(nn.Module):
    """Base of the quantizer modules: options, EMA / dead-code / k-means buffers and updates.

    A subclass calls :meth:`_init_codebook_state` once its codebook exists, and implements
    :meth:`_codebook_levels` (its codebook as an ``(L, K, D)`` view). Buffers, shaped ``(K,)``
    / ``(K, D)`` for a single codebook and ``(L, K)`` / ``(L, K, D)`` for ``L`` levels:

    ``cluster_size``, ``embed_avg`` (``ema=True``; persistent, the seed EMAQuantizer's keys)
        EMA of code counts and of code sums; ``embed_avg`` starts as a copy of the codebook and
        ``cluster_size`` at zero, as in the seed.
    ``code_usage`` (``ema=False`` and ``dead_code_threshold > 0``; persistent)
        EMA (same ``decay``) of code counts, for dead-code detection without EMA codebooks.
        Starts at :func:`reset_size`, like a freshly re-seeded code.
    ``initted`` (``kmeans_init=True``; persistent)
        whether k-means has initialised the codebook.

    The optional buffers are persistent only when the option that needs them is on, so with
    default options the state_dict has exactly the seed's keys. Loading a state_dict that lacks
    them (a seed checkpoint) fills them in: ``initted`` as True (a loaded codebook is not
    re-initialised), ``code_usage`` at :func:`reset_size`; a state_dict that has one the module
    does not use loads too (the entry is ignored).
    """

    _OPTIONAL_BUFFERS = ("code_usage", "initted")

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
    ) -> None:
        if not isinstance(ema, bool):
            raise ValueError(f"fastvq.{owner}: ema must be a bool, got {ema!r}")
        if not isinstance(kmeans_init, bool):
            raise ValueError(f"fastvq.{owner}: kmeans_init must be a bool, got {kmeans_init!r}")
        if grad not in GRADS:
            raise ValueError(f"fastvq.{owner}: unknown grad {grad!r}; expected one of {GRADS}")
        self.ema = ema
        self.decay = _check_float("decay", owner, decay, 0.0, 1.0)
        self.eps = _check_float("eps", owner, eps, 0.0, lo_open=True)
        self.grad = grad
        self.dead_code_threshold = _check_float("dead_code_threshold", owner, dead_code_threshold, 0.0)
        self.kmeans_init = kmeans_init
        self.kmeans_iters = _check_int("kmeans_iters", owner, kmeans_iters, 0)

        weight = self._codebook_levels().detach()
        squeeze = self._single_codebook
        level_shape = weight.shape[1:2] if squeeze else weight.shape[:2]
        if ema:
            self.register_buffer("cluster_size", torch.zeros(level_shape, dtype=weight.dtype))
            self.register_buffer("embed_avg", (weight[0] if squeeze else weight).clone())
        else:
            self.cluster_size = None
            self.embed_avg = None
        if not ema and self.dead_code_threshold > 0:
            usage = torch.full(level_shape, reset_size(self.dead_code_threshold), dtype=weight.dtype)
            self.register_buffer("code_usage", usage)
        else:
            self.code_usage = None
        self.register_buffer("initted", torch.tensor(not kmeans_init), persistent=kmeans_init)

    # -- subclass hooks -------------------------------------------------------------------
    _single_codebook = True

    def _codebook_levels(self) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def _levels(self, t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else (t.unsqueeze(0) if self._single_codebook else t)

    # -- training-time updates ------------------------------------------------------------
    def _usage_levels(self) -> torch.Tensor | None:
        return self._levels(self.cluster_size if self.ema else self.code_usage)

    def _needs_update(self) -> bool:
        """Whether a training forward updates the codebook state (EMA or dead codes)."""
        return self.training and (self.ema or self.dead_code_threshold > 0)

    def _kmeans_pending(self) -> bool:
        """Whether k-means init has yet to run. Reads ``initted`` on the host only until it is
        set (then a Python flag answers), so a training step after the init batch has no sync."""
        if not (self.training and self.kmeans_init) or getattr(self, "_kmeans_done", False):
            return False
        self._kmeans_done = bool(self.initted)
        return not self._kmeans_done

    @torch.no_grad()
    def _update_codebook_(self, counts: torch.Tensor, sums: torch.Tensor, candidates=None, candidates_ok=None) -> None:
        """After a training forward: EMA update and dead-code re-seeding, without host syncs.

        ``counts (L, K)``, ``sums (L, K, D)``: this batch's statistics of what each level
        quantized; ``candidates (L, S, D)`` / ``candidates_ok (L, S)``: replacements for dead
        codes (see :func:`expire_dead_codes_`), needed when ``dead_code_threshold > 0``.
        """
        threshold = self.dead_code_threshold
        if not self.ema and threshold <= 0:
            return
        codebook = self._codebook_levels()
        if self.ema:
            fdist.all_reduce_sum_(counts, sums)
            ema_update_(codebook, self._levels(self.cluster_size), self._levels(self.embed_avg), counts, sums,
                        self.decay, self.eps)
        else:
            fdist.all_reduce_sum_(counts)
            self._levels(self.code_usage).mul_(self.decay).add_(counts.to(self.code_usage.dtype),
                                                                alpha=1 - self.decay)
        if threshold > 0:
            expire_dead_codes_(codebook, self._usage_levels(), threshold, candidates, candidates_ok,
                               self._levels(self.embed_avg))

    @torch.no_grad()
    def _kmeans_init_(self, x: torch.Tensor, metric: str = "l2") -> None:
        """Initialise every level by k-means: level 0 on ``x (N, D)``, level l on the residual
        left by levels < l. Sets the EMA state (or ``code_usage``) consistently and ``initted``."""
        n = torch.tensor([float(x.shape[0])], device=x.device)
        fdist.all_reduce_sum_(n)
        if n.item() == 0:  # nothing to learn from yet (on any rank): try again next batch
            return
        codebook = self._codebook_levels()
        cluster_size, embed_avg = self._levels(self.cluster_size), self._levels(self.embed_avg)
        usage = self._levels(self.code_usage)
        residual = x.float()
        for level in range(codebook.shape[0]):
            centroids, counts = kmeans(residual, codebook[level], self.kmeans_iters, metric)
            codebook[level].copy_(centroids)
            if cluster_size is not None:
                cluster_size[level].copy_(counts)
                embed_avg[level].copy_(centroids * counts.unsqueeze(-1))
            if usage is not None:
                usage[level].copy_(counts)
            if level + 1 < codebook.shape[0]:
                idx, _ = nearest_code(residual, centroids, metric=metric)
                residual = residual - centroids[idx]
        self.initted.fill_(True)
        self._kmeans_done = True

    # -- checkpoints ----------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        self._convert_state_dict_(state_dict, prefix)
        self._kmeans_done = False  # `initted` may change: read it again once
        for name in self._OPTIONAL_BUFFERS:
            key = prefix + name
            buf = getattr(self, name, None)
            persistent = buf is not None and name not in self._non_persistent_buffers_set
            if persistent and key not in state_dict:
                if name == "initted":
                    state_dict[key] = torch.tensor(True)
                else:
                    state_dict[key] = torch.full_like(buf, reset_size(self.dead_code_threshold))
            elif not persistent and key in state_dict:
                state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

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
