"""ema_update_: the EMA codebook update of a VectorQuantizer / ResidualQuantizer, in place, one
fused pass over the (L, K, D) state and no host sync."""

from __future__ import annotations

import torch

from .._backend import use_triton
from .._checkpoint_frames import in_checkpoint_rerun, in_compiled_backward
from ._custom_op import custom_op
from .._checks import check_float, check_inplace_target, check_real_arg, check_same_device, check_tensor
from ..reference.ema_update import ema_decisions, ema_update_ref_, ema_update_rows_ref_


@custom_op("fastvq::ema_update_rows_", mutates_args=("codebook", "embed_avg"))
def _ema_update_rows_op(codebook: torch.Tensor, embed_avg: torch.Tensor, sums: torch.Tensor, keep: torch.Tensor,
                        live: torch.Tensor, smoothed: torch.Tensor, decay: float) -> None:
    if use_triton("ema_update", codebook, embed_avg, sums):
        from ..kernels.ema_update import ema_update_fwd

        ema_update_fwd(codebook, embed_avg, sums, keep.to(torch.int8), live.to(torch.int8), smoothed, decay)
    else:
        ema_update_rows_ref_(codebook, embed_avg, sums, keep, live, smoothed, decay)


@_ema_update_rows_op.register_fake
def _(codebook, embed_avg, sums, keep, live, smoothed, decay):
    return None


@custom_op("fastvq::codebook_snapshot", mutates_args=())
def _codebook_snapshot_op(codebook: torch.Tensor) -> torch.Tensor:
    if in_compiled_backward():  # the partitioner reruns it: the codebook has been updated since
        raise RuntimeError(
            "fastvq: a compiled training step reruns a quantizer's forward in its backward (the quantizer is "
            "inside a torch.utils.checkpoint region of the compiled function), after the forward updated its "
            "codebook in place (EMA, dead-code revival): the rerun would search the updated codebook and its "
            "gradients would be wrong. Checkpoint the layers around the quantizer, or run the checkpointed "
            "step eagerly (fastvq replays the quantizer's first run there).")
    return codebook.clone()


@_codebook_snapshot_op.register_fake
def _(codebook):
    return torch.empty_like(codebook)


_codebook_snapshot_op.register_autograd(lambda ctx, grad: grad)


@custom_op("fastvq::refuse_checkpoint_rerun", mutates_args=())
def _refuse_checkpoint_rerun_op(counts: torch.Tensor, owner: str) -> torch.Tensor:
    if in_checkpoint_rerun():
        raise RuntimeError(
            f"fastvq.{owner}: torch.utils.checkpoint reruns this quantizer's training forward inside a compiled "
            "graph (the quantizer compiled on its own, in an eagerly checkpointed region): the rerun would update "
            "the codebook a second time and search the updated one, so its gradients would be wrong. Compile the "
            "whole step (the checkpoint inside the compiled function), leave the quantizer uncompiled inside the "
            "region, or checkpoint the layers around the quantizer.")
    return counts.clone()


@_refuse_checkpoint_rerun_op.register_fake
def _(counts, owner):
    return torch.empty_like(counts)


def refuse_checkpoint_rerun(counts: torch.Tensor, owner: str) -> torch.Tensor:
    """``counts`` (a step's EMA statistics, what the codebook update reads next), through an op
    that raises ``RuntimeError`` when it runs in the rerun of a ``torch.utils.checkpoint`` region.

    For a module compiled on its own: its compiled graph cannot tell a rerun from a first run
    (eagerly, :mod:`fastvq.nn._checkpoint` replays the first run instead), so it keeps this
    opaque op, whose body reads the Python stack when the graph runs, before the update that
    depends on it. Eagerly ``counts`` itself. Costs a copy of the ``(L, K)`` counts."""
    if torch.compiler.is_compiling():
        return _refuse_checkpoint_rerun_op(counts, owner)
    return counts


def codebook_snapshot(codebook: torch.Tensor) -> torch.Tensor:
    """A copy of ``codebook`` that a compiled graph keeps: the value a training step's backward
    reads when the same forward then updates the codebook in place (:func:`ema_update_`).

    Eagerly a plain ``clone``. Under ``torch.compile`` an opaque op: a ``clone`` there is
    recomputed in the backward from the graph input by the partitioner (cheap, recomputable),
    i.e. read after the in-place EMA update, which gave the gradients of the next step's
    codebook. Differentiable (identity gradient)."""
    if torch.compiler.is_compiling():
        return _codebook_snapshot_op(codebook)
    return codebook.clone()


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
    """The seed EMAQuantizer's codebook update, per level, in place, guarded, without a host sync.

    Args:
        codebook: ``(L, K, D)`` float32/float16/bfloat16, any strides whose elements do not
            overlap (e.g. a parameter's ``.data.unsqueeze(0)``; an ``expand``-ed view is a
            ``ValueError``), updated in place.
        cluster_size: ``(L, K)`` float32; embed_avg: ``(L, K, D)`` float32 contiguous: the EMA
            state, updated in place.
        counts, sums: this batch's (all-reduced) statistics, float32 ``(L, K)`` and ``(L, K, D)``
            (:func:`fastvq.code_statistics`, :func:`fastvq.residual_quantize_step`).
        decay, eps: the EMA decay and the Laplace-smoothing epsilon.

    The arithmetic is the seed's::

        cluster_size = decay * cluster_size + (1 - decay) * counts
        embed_avg    = decay * embed_avg    + (1 - decay) * sums
        n            = cluster_size.sum(-1)
        smoothed     = (cluster_size + eps) / (n + K * eps) * n
        codebook     = embed_avg / smoothed

    in float32, bit for bit, except where that fails: a level whose total overflows float32, or
    a code whose quotient ``(cluster_size + eps) / (n + K * eps)`` is subnormal (it lost its
    bits), takes ``(cluster_size + eps) * (n / (n + K * eps))``, ``n`` and the ratio in
    float64, the product rounded once; and guarded so that no state becomes non-finite: a
    level whose batch had no rows (``counts`` all 0) changes nothing; a code whose new count or
    batch sums are not finite keeps its EMA state; a code whose new value is not finite in the
    codebook's dtype keeps its value. The
    decisions are made on ``(L, K)`` tensors (one max-abs read of ``sums``); the ``(L, K, D)``
    update is one fused kernel on the Triton backend (one read of ``embed_avg`` and ``sums``,
    one write of ``embed_avg`` and of the codebook rows that change). Not differentiable.

    Example::

        >>> counts, sums = fastvq.code_statistics(x, idx, K)
        >>> ema_update_(codebook.unsqueeze(0), cluster_size[None], embed_avg[None], counts[None], sums[None], 0.99, 1e-5)
    """
    decay, eps = _check(codebook, cluster_size, embed_avg, counts, sums, decay, eps)  # (as Python floats)
    sums = sums.float().contiguous()
    live, keep, new_cs, smoothed = ema_decisions(cluster_size, counts, sums, decay, eps)
    cluster_size.copy_(new_cs)
    _ema_update_rows_op(codebook, embed_avg, sums, keep, live, smoothed, float(decay))


def _check(codebook, cluster_size, embed_avg, counts, sums, decay, eps) -> tuple[float, float]:
    op = "ema_update_"
    for name, t in (("codebook", codebook), ("cluster_size", cluster_size), ("embed_avg", embed_avg),
                    ("counts", counts), ("sums", sums)):
        check_tensor(op, name, t, ndim=2 if name in ("cluster_size", "counts") else 3)
        if name in ("cluster_size", "embed_avg") and t.dtype != torch.float32:  # (before check_float's list)
            raise TypeError(f"fastvq.{op}: {name} (EMA state) must be float32, got {t.dtype}")
        check_float(op, name, t)
    check_same_device(op, codebook=codebook, cluster_size=cluster_size, embed_avg=embed_avg, counts=counts, sums=sums)
    L, K, D = codebook.shape
    for name, t, shape in (("cluster_size", cluster_size, (L, K)), ("embed_avg", embed_avg, (L, K, D)),
                           ("counts", counts, (L, K)), ("sums", sums, (L, K, D))):
        if tuple(t.shape) != shape:
            raise ValueError(f"fastvq.{op}: {name} must have shape {shape} (from codebook), got {tuple(t.shape)}")
    for name, t in (("codebook", codebook), ("cluster_size", cluster_size), ("embed_avg", embed_avg)):
        check_inplace_target(op, name, t)
    if not embed_avg.is_contiguous():
        raise ValueError(f"fastvq.{op}: embed_avg must be contiguous (it is updated in place)")
    decay = check_real_arg(op, "decay", decay)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"fastvq.{op}: decay must lie in [0, 1], got {decay}")
    return decay, check_real_arg(op, "eps", eps, positive=True, float32=True)  # (as the modules: a float32 scalar)


__all__ = ["ema_update_", "ema_update_ref_", "codebook_snapshot", "refuse_checkpoint_rerun"]
