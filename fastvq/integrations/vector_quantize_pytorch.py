"""Run vector-quantize-pytorch models on fastvq's ops, unchanged: ``patch()`` / ``unpatch()`` / ``patched()``.

vector-quantize-pytorch (VQP) finds nearest codes by building the full ``N x K`` distance matrix
(``-cdist`` or a dot product), takes its argmax, turns the codes into an ``N x K`` one-hot
matrix and multiplies it with the codebook (the quantized vectors) and with the inputs (the EMA
statistics). After :func:`patch`, the same models run the hot path on fastvq's ops instead,
without any ``N x K`` buffer; every model built before or after the call is affected (the
patch replaces methods of VQP's classes and functions of its modules, not instance state)::

    from fastvq.integrations import vector_quantize_pytorch as fastvq_vqp
    fastvq_vqp.patch()                      # or: with fastvq_vqp.patched(): ...

Routed through fastvq (one internal function per call, the only place that names its op):

==========================================  ====================================================
VQP call                                    fastvq
==========================================  ====================================================
``Codebook.forward``: the nearest code      :func:`fastvq.nearest_code`, ``"l2"`` for Euclidean
(``argmax(-cdist)`` / ``argmax(x . c)``),   codebooks and ``"dot"`` for ``use_cosine_sim`` (VQP
every head / separate-codebook layout       takes the plain dot product with its normalised
                                            codebook); all codebooks (``separate_codebook_per_head``)
                                            in one call
``topk=k`` (k <= 128; ResidualVQ's beam     :func:`fastvq.topk_codes`
search)
``stochastic_sample_codes`` in training     :func:`fastvq.sample_code` (Gumbel-max inside the
(Gumbel sampling at ``sample_codebook_      search, no ``N x K`` noise): metric ``"euclidean"``
temp``)                                     (VQP's logits are ``-|x - c|``) or ``"dot"``
the quantized vectors (``one_hot @         an index gather of the codebook rows
codebook``)                                 (``torch.nn.functional.embedding``, differentiable to
                                            a learnable codebook): fastvq has no gather op
EMA statistics (``one_hot.sum``,            :func:`fastvq.code_statistics`, all codebooks in one
``einsum(x, one_hot)``), padding masks       call, the mask as row weights (no host sync);
included; ``update_indices`` too            ``update_indices`` (EMA from given codes) too
k-means init (``kmeans``)                   :func:`fastvq.nearest_code` + :func:`fastvq.code_statistics`
rotation trick (``rotate_to``, VQ and       :func:`fastvq.rotation_trick`
SimVQ)
``SimVQ.forward`` (``cdist + argmin``)      :func:`fastvq.nearest_code` (``"l2"``) and the gather
==========================================  ====================================================

Left to VQP (exactly as it runs unpatched), because the result needs the distance matrix or
something a search cannot reproduce; each is counted under ``fallback.<reason>`` by :func:`counts`:

- ``straight_through_gumbel``: ``straight_through=True`` in training (the gradient flows through
  the softmax of all distances);
- ``stochastic_sampling``: sampling together with ``topk`` (VQP takes the top-k of noisy logits),
  or at a non-finite temperature;
- ``topk``: ``topk`` above 128;
- ``distances_used``: calls whose loss reads the distance matrix: ``indices=`` (the
  cross-entropy to given codes), ``commitment_use_cross_entropy_loss`` or
  ``codebook_diversity_loss_weight > 0`` in training;
- ``implicit_neural_codebook``: per-row codebooks (ResidualVQ's QINCo ``codebook_transform_fn``);
- ``affine_param``: codebooks with affine re-parameterisation;
- ``custom_sampler``: a ``Codebook`` built with its own ``gumbel_sample`` function;
- ``codebook_called_directly``: a ``Codebook`` called by code other than ``VectorQuantize``
  (``VectorQuantize`` knows whether its caller reads the distances; a bare ``Codebook`` does
  not, so it keeps returning them);
- ``rotation_dtype``, ``kmeans_args``, ``simvq_args``: float64 tensors or arguments VQP's
  functions accept that fastvq's ops do not (none in VQP's own calls).

Everything else in VQP (its losses, projections, dead-code replacement, EMA arithmetic, residual
and grouped levels) runs as it is, around the routed calls.

What differs from unpatched VQP, on purpose, and only there:

- Codes are the float32 nearest codes (distances computed in float32 even under
  autocast, on every device; VQP turns autocast off on CUDA only). Two codes whose distances
  differ by less than float32 rounding may come out the other way than in VQP (its
  ``sqrt(clamp(d^2, 1e-8))`` also ties codes closer than 1e-4 to a row; fastvq gives the
  smaller squared distance, exact ties to the smaller index, as VQP does).
- Sampled codes follow the same distribution as VQP's but are other draws (fastvq's Philox noise
  from one seed taken from torch's generator, where VQP draws ``N x K`` uniforms): after a
  sampled step, later random choices (dead-code replacement) differ from an unpatched run.
- Numbers are never made up: a code with a NaN never wins (VQP's ``argmax`` picks a NaN
  distance); a row of NaNs gets code 0; rows with a NaN or infinite entry are left out of the EMA
  statistics (in VQP one such row makes every code's sum NaN) and are never a k-means starting
  mean (VQP draws from every row, and a NaN mean stays a code for good). VQP's own dead-code
  replacement, which runs as it is, can still draw such a row as a new code.
- The quantized vectors and the EMA statistics are exact rows and exact float32 sums: with TF32
  on, VQP rounds them through its TF32 one-hot matmuls; the search follows the global TF32
  setting (``torch.backends.cuda.matmul.fp32_precision``) as VQP's distance matmul does.
- The rotation trick's output is the code exactly (VQP computes it as the rotated input, equal
  up to rounding); where the rotation is undefined (an input or code of norm < 1e-6, or an input
  within ~1e-3 rad of minus its code) the gradient is the straight-through one (VQP divides by
  the clamped norms there). See :func:`fastvq.rotation_trick`.

Supported VQP versions: :data:`SUPPORTED_VERSIONS` (what this module is tested against);
:func:`patch` refuses any other with :class:`UnsupportedVersionError`.
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import functools
import inspect
import math
import threading
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from .._checks import FLOAT_DTYPES, assert_async
from ..ops.code_statistics import code_statistics
from ..ops.nearest_code import nearest_code
from .._backend import tf32_like_torch as _tf32_enabled
from ..ops.rotation_trick import rotation_trick
from ..ops.sample_code import sample_code
from ..ops.topk_codes import MAX_K as TOPK_MAX_K
from ..ops.topk_codes import topk_codes

__all__ = [
    "SUPPORTED_VERSIONS",
    "UnsupportedVersionError",
    "patch",
    "unpatch",
    "patched",
    "is_patched",
    "counts",
    "reset_counts",
]

#: The vector-quantize-pytorch releases this integration is tested against.
SUPPORTED_VERSIONS = ("1.32.0",)

DISTRIBUTION = "vector-quantize-pytorch"


class UnsupportedVersionError(RuntimeError):
    """The installed vector-quantize-pytorch is not one of :data:`SUPPORTED_VERSIONS`."""


# ------------------------------------------------------------------------------ state

_LOCK = threading.RLock()
_blocks = 0  # patched() blocks running now (any thread)
_blocks_patched = False  # whether the first of them patched (then the last one unpatches)
_originals: dict[tuple[object, str], object] = {}  # (owner, name) -> the attribute before patch()
_installed: list[tuple[object, str, object]] = []  # (owner, name, replacement) as set by patch()
_signatures: dict[str, inspect.Signature] = {}
_counts: collections.Counter = collections.Counter()
_vqp = None  # the vector_quantize_pytorch.vector_quantize_pytorch module while patched

# Which Codebook the innermost patched VectorQuantize.forward lets route (or _KEEP: route none).
_ROUTE: contextvars.ContextVar = contextvars.ContextVar("fastvq_vqp_route", default=None)
_KEEP = object()


def counts() -> dict[str, int]:
    """How many VQP calls went through fastvq since the last :func:`reset_counts`, by kind.

    Keys: ``"search"`` (nearest-code searches, one per call whatever the number of codebooks),
    ``"topk"``, ``"sample"``, ``"gather"``, ``"statistics"`` (EMA statistics), ``"kmeans"``
    (k-means inits), ``"rotation"``, ``"simvq"`` (SimVQ forwards), and ``"fallback.<reason>"`` for
    each call left to VQP (the reasons are listed in the module docstring). Counted whether or not
    the module is patched now. Example::

        >>> fastvq_vqp.reset_counts(); vq(x); fastvq_vqp.counts()
        {'search': 1, 'gather': 1, 'statistics': 1, 'rotation': 1}
    """
    with _LOCK:
        return dict(_counts)


def reset_counts() -> None:
    """Set every counter of :func:`counts` back to zero."""
    with _LOCK:
        _counts.clear()


def _count(kind: str, n: int = 1) -> None:
    with _LOCK:
        _counts[kind] += n


def _original(owner, name: str):
    """VQP's own attribute: the one saved by patch(), or (once unpatched) the one in place."""
    try:
        return _originals[(owner, name)]
    except KeyError:
        return vars(owner)[name]


# ------------------------------------------------------------------ the routed calls
# One function per routed call: each is the only place that names the fastvq op it runs.


def _search(x: torch.Tensor, codebooks: torch.Tensor, metric: str, count: bool = True) -> torch.Tensor:
    """Nearest code per row of each codebook: ``x (H, N, D)``, ``codebooks (H, K, D)`` -> ``(H, N)`` int64.

    ``metric`` ``"l2"`` (argmin of the Euclidean distance) or ``"dot"`` (argmax of ``x . c``).
    One :func:`fastvq.nearest_code` call for all ``H`` codebooks (one launch). ``count``: book
    it in :func:`counts` (k-means's inner searches are part of its one ``kmeans`` call).
    """
    if count:
        _count("search")
    return nearest_code(x, codebooks, metric, allow_tf32=_tf32_enabled(x))[0]


#: The largest ``topk`` routed (:func:`fastvq.topk_codes`' maximum; larger ones stay on VQP).
MAX_TOPK = TOPK_MAX_K


def _search_topk(x: torch.Tensor, codebooks: torch.Tensor, metric: str, k: int) -> torch.Tensor:
    """The ``k`` nearest codes per row, nearest first: ``(H, N, D), (H, K, D)`` -> ``(H, N, k)`` int64,
    on :func:`fastvq.topk_codes` (one launch)."""
    _count("topk")
    return topk_codes(x, codebooks, k, metric, allow_tf32=_tf32_enabled(x))[0]


def _sample(x: torch.Tensor, codebooks: torch.Tensor, metric: str, temperature: float) -> torch.Tensor:
    """One code per row drawn with probability ``softmax(logits / temperature)``, VQP's logits being
    ``-|x - c|`` (``metric="euclidean"``) or ``x . c`` (``"dot"``): ``(H, N, D), (H, K, D)`` ->
    ``(H, N)`` int64, on :func:`fastvq.sample_code` (Gumbel-max in the search kernel, seeded from
    torch's global generator, so ``torch.manual_seed`` makes it reproducible)."""
    _count("sample")
    return sample_code(x, codebooks, temperature, metric, allow_tf32=_tf32_enabled(x))[0]


def _statistics(x: torch.Tensor, codes: torch.Tensor, num_codes: int, mask: torch.Tensor | None,
                count: bool = True):
    """EMA statistics of ``H`` codebooks at once: ``x (H, N, D)``, ``codes (H, N)``, ``mask (H, N)``
    bool or None -> float32 ``counts (H, K)``, ``sums (H, K, D)``; masked-out rows count nowhere.

    One :func:`fastvq.code_statistics` call (the mask as its row weights; no host sync).
    ``count``: as :func:`_search`'s.
    """
    if count:
        _count("statistics")
    return code_statistics(x, codes, num_codes, weights=mask)


def _gather(codebooks: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
    """Rows of each codebook: ``codebooks (H, K, D)``, ``codes (H, N)`` -> ``(H, N, D)``.

    Differentiable to ``codebooks`` (a learnable codebook gets the sum of its rows' gradients).
    """
    _count("gather")
    H, K, D = codebooks.shape
    if H == 1:
        return F.embedding(codes[0], codebooks[0]).unsqueeze(0)
    offsets = torch.arange(H, device=codes.device, dtype=codes.dtype).mul_(K).unsqueeze(1)
    return F.embedding(codes + offsets, codebooks.reshape(H * K, D))


def _rotate(src: torch.Tensor, tgt: torch.Tensor) -> torch.Tensor:
    """The rotation trick: the value of ``tgt``, the rotated gradient to ``src``."""
    _count("rotation")
    return rotation_trick(src, tgt)


# ------------------------------------------------------------- VQP's hot methods, patched


def _fp32_codebook_math(device: torch.device):
    """Autocast off for the codebook math on ``device`` (VQP's own guard covers CUDA only)."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def _expand_mask(mask: torch.Tensor, num_codebooks: int, rows: int) -> torch.Tensor:
    """VQP's padding mask ``(B, T)`` over the rows of each codebook: ``(H, B * heads * T)``,
    rows ordered batch, head, time (as VQP packs shared-codebook heads). A mask that is not bool is
    refused, as VQP refuses it (vqpprobe V2: a float mask weighted the EMA rows, and a forward
    updated the codebook before VQP's masked loss raised)."""
    if mask.dtype != torch.bool:
        raise TypeError(f"fastvq (vector-quantize-pytorch patch): mask must be a bool tensor, got {mask.dtype}")
    if mask.dim() != 2:  # (a bare unpack error before; fuzzO F6)
        raise ValueError(f"fastvq (vector-quantize-pytorch patch): mask must be (batch, sequence length), one bool "
                         f"per input vector, got shape {tuple(mask.shape)} for {rows} rows per codebook")
    b, t = mask.shape
    heads = rows // (b * t)
    return mask[:, None, :].expand(b, heads, t).reshape(1, b * heads * t).expand(num_codebooks, -1)


def _sampler_flags(codebook) -> tuple[bool, bool] | None:
    """``(stochastic, straight_through)`` of the codebook's sampler when it is VQP's own
    ``gumbel_sample`` (possibly a ``functools.partial`` of it, as ``VectorQuantize`` binds it);
    None for any other sampler."""
    fn, original = codebook.gumbel_sample, _vqp.gumbel_sample
    if fn is original:
        return False, False
    if isinstance(fn, functools.partial) and fn.func is original and not fn.args:
        kw = fn.keywords
        if set(kw) <= {"stochastic", "straight_through"}:
            return bool(kw.get("stochastic", False)), bool(kw.get("straight_through", False))
    return None


def _codebook_plan(codebook, args: dict) -> tuple[str | None, float | None]:
    """``(reason, temperature)``: why this ``Codebook.forward`` call stays on VQP (None: routed),
    and the temperature to sample codes at (None: the nearest code(s), no sampling)."""
    if args["codebook_transform_fn"] is not None:
        return "implicit_neural_codebook", None
    if codebook.affine_param:
        return "affine_param", None
    topk = args["topk"]
    if topk is not None and topk > MAX_TOPK:
        return "topk", None
    flags = _sampler_flags(codebook)
    if flags is None:
        return "custom_sampler", None
    stochastic, straight_through = flags
    temperature = args["sample_codebook_temp"]
    if temperature is None:
        temperature = codebook.sample_codebook_temp
    if not (codebook.training and temperature > 0):
        return None, None  # VQP takes the argmax (stochastic or not)
    if straight_through:  # the gradient flows through the softmax of every distance
        return "straight_through_gumbel", None
    if not stochastic:
        return None, None
    temperature = float(temperature)
    if topk is not None or not math.isfinite(temperature):  # sampled top-k: VQP's own
        return "stochastic_sampling", None
    return None, temperature


def _codebook_forward(self, x, *args, **kwargs):
    """``Codebook.forward``, routed when called from a patched ``VectorQuantize.forward`` whose
    caller does not read the distance matrix (which it then returns as ``None``)."""
    route = _ROUTE.get()
    original = _original(_vqp.Codebook, "forward")
    if route is not self:
        if route is not _KEEP:
            _count("fallback.codebook_called_directly")
        return original(self, x, *args, **kwargs)
    bound = _signatures["Codebook.forward"].bind(self, x, *args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    why, temperature = _codebook_plan(self, a)
    if why is not None:
        _count("fallback." + why)
        return original(self, x, *args, **kwargs)
    with _fp32_codebook_math(x.device):
        return _routed_codebook_forward(self, x, a, temperature)


def _routed_codebook_forward(codebook, x: torch.Tensor, a: dict, temperature: float | None):
    ema_update = codebook.ema_update if a["ema_update"] is None else a["ema_update"]
    single = x.ndim < 4  # (B, T, D) for one codebook, else (H, B, T, D)
    x = x.float()
    if single:
        x = x.unsqueeze(0)
    H, D = x.shape[0], x.shape[-1]
    lead = x.shape[1:-1]
    flat = x.reshape(H, -1, D)
    mask = a["mask"]
    if mask is not None:
        mask = _expand_mask(mask, H, flat.shape[1])

    codebook.init_embed_(flat, mask=mask)  # k-means init on the first batch (patched kmeans)
    embed = codebook.embed if codebook.learnable_codebook else codebook.embed.detach()
    embed = embed.to(flat.dtype)
    if codebook.vq_bridge is not None:
        embed = codebook.vq_bridge(embed)

    metric = "dot" if codebook.use_cosine_sim else "l2"
    k = a["topk"]
    # One codebook for a leading axis of H > 1 (ResidualVQ's beam search hands (B, T, beams, D)):
    # VQP broadcasts it; here the axis joins the rows.
    rows = flat.reshape(embed.shape[0], -1, D) if embed.shape[0] != H and embed.shape[0] == 1 else flat
    if temperature is not None:  # VQP's logits: -|x - c| (Euclidean) or x . c (cosine)
        codes = _sample(rows, embed, "dot" if codebook.use_cosine_sim else "euclidean", temperature)
    elif k is None:
        codes = _search(rows, embed, metric)  # (H, N)
    else:
        codes = _search_topk(rows, embed, metric, k)  # (H, N, k)
        lead = (*lead, k)
    quantized = _gather(embed, codes.reshape(embed.shape[0], -1))
    codes = codes.reshape(H, -1)

    if k is None and codebook.training and a["update_usage"] and not a["freeze_codebook"]:
        # VQP's own update, handed the codes instead of a one-hot matrix: the patched
        # track_cluster_size_and_embed_avg takes integer codes to fastvq's statistics.
        codebook.update_codebook(
            flat,
            codes,
            mask=mask,
            ema_update_weight=a["ema_update_weight"],
            accum_ema_update=a["accum_ema_update"],
            ema_update=ema_update,
        )

    quantized = quantized.reshape(H, *lead, D)
    codes = codes.reshape(H, *lead)
    if single:
        quantized, codes = quantized[0], codes[0]
    return quantized, codes, None


def _track_statistics(self, flatten, embed_onehot, *args, **kwargs):
    """``Codebook.track_cluster_size_and_embed_avg``: given integer codes ``(H, N)`` in place of
    the one-hot matrix (only the routed paths pass them), the statistics come from fastvq;
    a floating one-hot matrix (VQP's own paths) goes to VQP's original."""
    original = _original(_vqp.Codebook, "track_cluster_size_and_embed_avg")
    if embed_onehot.is_floating_point():
        return original(self, flatten, embed_onehot, *args, **kwargs)
    bound = _signatures["Codebook.track_cluster_size_and_embed_avg"].bind(self, flatten, embed_onehot, *args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if self.affine_param:  # never routed here (forward and update_indices keep affine codebooks on VQP)
        raise AssertionError("fastvq: integer codes reached an affine codebook's statistics")
    cluster_size, embed_sum = _statistics(flatten, embed_onehot, self.codebook_size, a["mask"])
    self.all_reduce_fn(cluster_size)
    self.all_reduce_fn(embed_sum)
    weight = a["ema_update_weight"]
    if callable(weight):
        weight = weight(embed_sum, cluster_size)
    if a["accum_ema_update"]:
        _vqp.accum_grad_(self.cluster_size, cluster_size)
        _vqp.accum_grad_(self.embed_avg, embed_sum)
    else:
        _vqp.ema_inplace(self.cluster_size, cluster_size, self.decay, weight)
        _vqp.ema_inplace(self.embed_avg, embed_sum, self.decay, weight)


def _codebook_update_indices(self, x, embed_ind, *args, **kwargs):
    """``Codebook.update_indices`` (EMA update from given codes, e.g. after beam search) on
    fastvq's statistics."""
    original = _original(_vqp.Codebook, "update_indices")
    if self.affine_param:
        _count("fallback.affine_param")
        return original(self, x, embed_ind, *args, **kwargs)
    bound = _signatures["Codebook.update_indices"].bind(self, x, embed_ind, *args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    x = x.float()
    if x.ndim < 4:
        x, embed_ind = x.unsqueeze(0), embed_ind.unsqueeze(0)
    H, D = x.shape[0], x.shape[-1]
    flat = x.reshape(H, -1, D)
    if embed_ind.dtype != torch.int64:
        # (vqprobe V1: float codes were truncated, 2.7 counted as code 2; fuzzG: int32 / uint8 codes
        # updated the EMA. VQP's F.one_hot refuses every dtype but int64)
        raise TypeError(f"fastvq (vector-quantize-pytorch patch): embed_ind must be an int64 tensor, as "
                        f"vector-quantize-pytorch requires, got {embed_ind.dtype}")
    # every code, masked-out rows' too, in [-1, K) as VQP's F.one_hot requires (fuzzG: 99 at a
    # masked-out row updated the EMA where VQP raised); checked without a host read
    K = self.codebook_size
    assert_async("integrations.vector_quantize_pytorch (Codebook.update_indices)", ((embed_ind >= -1) & (embed_ind < K)).all(),
                 lambda: f"embed_ind must lie in [-1, {K}) (vector-quantize-pytorch's one_hot; masked-out rows "
                         f"too), got values in [{int(embed_ind.min())}, {int(embed_ind.max())}]")
    codes = embed_ind.reshape(H, -1).long()
    codes = codes.masked_fill(codes == -1, 0)  # VQP counts dropped-out codes (-1) as code 0
    mask = a["mask"]
    if mask is not None:
        mask = _expand_mask(mask, H, flat.shape[1])
    self.update_codebook(
        flat,
        codes,
        mask=mask,
        ema_update_weight=a["ema_update_weight"],
        accum_ema_update=a["accum_ema_update"],
        ema_update=a["ema_update"],
    )


def _why_distances_needed(vq, a: dict) -> str | None:
    if a.get("indices") is not None:
        return "distances_used"
    if vq.training and (
        (vq.has_commitment_loss and vq.commitment_use_cross_entropy_loss) or vq.has_codebook_diversity_loss
    ):
        return "distances_used"
    return None


def _vector_quantize_forward(self, x, *args, **kwargs):
    """``VectorQuantize.forward``: lets its codebook route unless its loss reads the distances."""
    original = _original(_vqp.VectorQuantize, "forward")
    a = _signatures["VectorQuantize.forward"].bind(self, x, *args, **kwargs).arguments
    why = _why_distances_needed(self, a)
    if why is not None:
        _count("fallback." + why)
    token = _ROUTE.set(_KEEP if why is not None else self._codebook)
    try:
        return original(self, x, *args, **kwargs)
    finally:
        _ROUTE.reset(token)


def _kmeans(samples, num_clusters, num_iters=10, use_cosine_sim=False, sample_fn=None, all_reduce_fn=None):
    """VQP's ``kmeans`` (Lloyd's algorithm per codebook, ``samples (H, N, D)``) with the
    assignment on :func:`fastvq.nearest_code` and the new means from :func:`fastvq.code_statistics`."""
    original = _original(_vqp, "kmeans")
    if sample_fn is None:
        sample_fn = _vqp.batched_sample_vectors
    if all_reduce_fn is None:
        all_reduce_fn = _vqp.noop
    if num_iters < 1 or samples.dtype not in FLOAT_DTYPES:
        _count("fallback.kmeans_args")
        return original(samples, num_clusters, num_iters, use_cosine_sim, sample_fn, all_reduce_fn)
    _count("kmeans")
    metric = "dot" if use_cosine_sim else "l2"
    means = _finite_starts(sample_fn(samples, num_clusters), samples)
    for _ in range(num_iters):
        buckets = _search(samples, means, metric, count=False)  # (vqprobe V3: one kmeans call, not 11)
        counts_, sums = _statistics(samples, buckets, num_clusters, None, count=False)
        bins = counts_.long()
        all_reduce_fn(bins)
        empty = bins == 0
        new_means = (sums / bins.masked_fill(empty, 1).unsqueeze(-1)).to(samples.dtype)
        all_reduce_fn(new_means)
        if use_cosine_sim:
            new_means = _vqp.l2norm(new_means)
        means = torch.where(empty.unsqueeze(-1), means, new_means)
    return means, bins


def _finite_starts(means, samples):
    """VQP's starting means, with every one that is a row holding NaN or inf replaced by a finite
    row of its codebook's samples that is not already a mean (the i-th such mean by the i-th such
    row; when too few are left, by finite rows in turn): a NaN mean never wins a row, so its
    cluster would stay empty and keep it as a code for good, and a duplicate mean never wins one
    either (ties go to the smaller index). k-means runs on the initialising batch: this reads the
    host once (whether any drawn mean is not finite) and then only for such a draw; a codebook
    whose samples are all non-finite keeps VQP's draw."""
    bad = ~means.isfinite().all(-1)
    if not bool(bad.any()):
        return means
    means = means.clone()
    ok = samples.isfinite().all(-1)
    for h in range(means.shape[0]):
        n_bad = int(bad[h].sum())
        rows = samples[h][ok[h]]
        if not n_bad or not rows.shape[0]:
            continue
        taken = torch.zeros(rows.shape[0], dtype=torch.bool, device=rows.device)
        for mean in means[h][~bad[h]]:  # one drawn mean at a time: N x D, never N x K x D
            taken |= (rows == mean).all(-1)
        fresh = rows[~taken]
        pool = torch.cat([fresh, rows]) if fresh.shape[0] < n_bad else fresh
        means[h][bad[h]] = pool[torch.arange(n_bad, device=pool.device) % pool.shape[0]].to(means.dtype)
    return means


def _rotate_to(src, tgt):
    """VQP's ``rotate_to`` (the rotation trick) on :func:`fastvq.rotation_trick`."""
    if src.dtype not in FLOAT_DTYPES or tgt.dtype not in FLOAT_DTYPES or src.shape != tgt.shape:
        _count("fallback.rotation_dtype")
        return _original(_vqp, "rotate_to")(src, tgt)
    return _rotate(src, tgt)


def _simvq_forward(self, x, *args, **kwargs):
    """``SimVQ.forward``: the nearest code of its implicit codebook on :func:`fastvq.nearest_code`."""
    import vector_quantize_pytorch.sim_vq as sim_vq

    original = _original(sim_vq.SimVQ, "forward")
    if args or kwargs or x.dtype not in FLOAT_DTYPES:
        _count("fallback.simvq_args")
        return original(self, x, *args, **kwargs)
    _count("simvq")
    if self.channel_first:
        x = x.movedim(1, -1)
    shape = x.shape
    x = x.reshape(shape[0], -1, shape[-1])  # (B, T, D)
    codebook = self.codebook  # (K, D), differentiable to code_transform
    codes = _search(x.detach().float().reshape(1, -1, shape[-1]), codebook.detach().float().unsqueeze(0), "l2")
    quantized = _gather(codebook.unsqueeze(0), codes)[0].reshape(x.shape)
    commit_loss = (
        F.mse_loss(x.detach(), quantized) + F.mse_loss(x, quantized.detach()) * self.input_to_quantize_commit_loss_weight
    )
    if self.rotation_trick:
        quantized = _rotate_to(x, quantized)
    else:
        quantized = (quantized - x).detach() + x
    quantized = quantized.reshape(shape)
    codes = codes.reshape(shape[:-1])
    if self.channel_first:
        quantized = quantized.movedim(-1, 1)
    return quantized, codes, commit_loss * self.commitment_weight


# ------------------------------------------------------------------ patch / unpatch


def _installed_version() -> str | None:
    from importlib import metadata

    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def _check_version() -> str:
    version = _installed_version()
    if version is None:
        raise ImportError(
            f"fastvq.integrations.vector_quantize_pytorch: {DISTRIBUTION} is not installed; it supports "
            f"version {', '.join(SUPPORTED_VERSIONS)} (pip install {DISTRIBUTION}=={SUPPORTED_VERSIONS[-1]})"
        )
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersionError(
            f"fastvq.integrations.vector_quantize_pytorch: installed {DISTRIBUTION} {version} is not supported; "
            f"supported: {', '.join(SUPPORTED_VERSIONS)}. Nothing was patched."
        )
    return version


def _replacements() -> list[tuple[object, str, Callable]]:
    import vector_quantize_pytorch.sim_vq as sim_vq
    import vector_quantize_pytorch.vector_quantize_pytorch as vq

    return [
        (vq.VectorQuantize, "forward", _vector_quantize_forward),
        (vq.Codebook, "forward", _codebook_forward),
        (vq.Codebook, "track_cluster_size_and_embed_avg", _track_statistics),
        (vq.Codebook, "update_indices", _codebook_update_indices),
        (vq.Codebook, "update_ema_indices", _codebook_update_indices),  # VQP's alias of update_indices
        (vq, "kmeans", _kmeans),
        (vq, "rotate_to", _rotate_to),
        (sim_vq, "rotate_to", _rotate_to),
        (sim_vq.SimVQ, "forward", _simvq_forward),
    ]


def is_patched() -> bool:
    """Whether :func:`patch` is in force."""
    with _LOCK:
        return bool(_installed)


def patch() -> None:
    """Route vector-quantize-pytorch's hot path through fastvq (see the module docstring).

    Idempotent (a second call does nothing). Affects models built before and after the call.
    Raises :class:`UnsupportedVersionError` (naming the installed and the supported versions) for a
    VQP release other than :data:`SUPPORTED_VERSIONS`, and ``ImportError`` when VQP is not
    installed; nothing is changed then.

    Example::

        >>> from fastvq.integrations import vector_quantize_pytorch as fastvq_vqp
        >>> fastvq_vqp.patch()
        >>> quantized, indices, loss = vq(x)       # an existing VectorQuantize, now on fastvq
        >>> fastvq_vqp.unpatch()
    """
    global _vqp
    with _LOCK:
        if _installed:
            return
        _check_version()
        import vector_quantize_pytorch.vector_quantize_pytorch as vq

        plan = _replacements()
        _vqp = vq
        _signatures.update(
            {
                "Codebook.forward": inspect.signature(vq.Codebook.forward),
                "Codebook.track_cluster_size_and_embed_avg": inspect.signature(
                    vq.Codebook.track_cluster_size_and_embed_avg
                ),
                "Codebook.update_indices": inspect.signature(vq.Codebook.update_indices),
                "VectorQuantize.forward": inspect.signature(vq.VectorQuantize.forward),
            }
        )
        missing = [f"{getattr(o, '__name__', o)}.{n}" for o, n, _ in plan if n not in vars(o)]
        if missing:  # cannot happen with a supported release; refuse rather than half-patch
            raise UnsupportedVersionError(
                f"fastvq.integrations.vector_quantize_pytorch: {DISTRIBUTION} lacks {', '.join(missing)}; "
                "nothing was patched"
            )
        for owner, name, _ in plan:
            _originals[(owner, name)] = vars(owner)[name]
        for owner, name, replacement in plan:
            setattr(owner, name, replacement)
            _installed.append((owner, name, replacement))


def unpatch() -> None:
    """Restore vector-quantize-pytorch exactly: every patched attribute is again the very object
    it was before :func:`patch`. Does nothing when not patched."""
    with _LOCK:
        while _installed:
            owner, name, _ = _installed.pop()
            setattr(owner, name, _originals.pop((owner, name)))
        _originals.clear()


@contextlib.contextmanager
def patched() -> Iterator[None]:
    """``with patched():`` runs the block with :func:`patch` in force, then restores VQP unless
    it was already patched before the block. Blocks nest and overlap safely, also in different
    threads: the patch stays while any block runs, and the last block to end restores VQP when
    the first one patched it.

    Example::

        >>> with fastvq_vqp.patched():
        ...     loss = train_step(model, batch)     # VQP layers inside run on fastvq
    """
    global _blocks, _blocks_patched
    with _LOCK:
        if _blocks == 0:
            _blocks_patched = not _installed
        patch()
        _blocks += 1
    try:
        yield
    finally:
        with _LOCK:
            _blocks -= 1
            if _blocks == 0 and _blocks_patched:
                unpatch()
