"""The training step every quantizer module shares (VectorQuantizer, ResidualQuantizer, RQVAE's
quantizer): the mask check, the codebook a step searches, and :func:`_quantize_step`, one
:func:`fastvq.residual_quantize_step` followed by the module's codebook update. Modules go
through the ops; this is the one place their step is written.
"""

from __future__ import annotations

import torch

from .._backend import atomics_nondeterministic
from .._checks import check_row_weights
from ..ops.ema_update import codebook_snapshot, refuse_checkpoint_rerun
from ..ops.residual_quantize import _residual_quantize_step, level_inputs
from ._codebook import CodebookState, allow_tf32, pick_candidate_rows


def _check_mask(owner: str, mask, inputs: torch.Tensor) -> torch.Tensor | None:
    """``mask (...)``, bool (``True`` = a real row) or float weights, one per row of ``inputs``
    (float64 weights are taken as float32, the weights' dtype in the kernels)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"fastvq.{owner}: mask must be a torch.Tensor or None, got {type(mask).__name__}")
    # (sparse or nested: torch's reshape error, or another op's name; fuzzL L3)
    return check_row_weights(owner, "mask", mask, inputs, (inputs.shape[:-1],), x_name="inputs", float64=True)


def _codebook_for_step(codebook: torch.Tensor, inputs: torch.Tensor, update: bool) -> torch.Tensor:
    """The codebook a training step's op reads. When this forward updates the codebook in place
    (EMA, dead codes) and a backward will follow, a copy: the fused backward re-reads the codes
    the forward chose and must see them as they were (gradients reach the parameter through it).
    Compiled, the copy is an opaque op (:func:`fastvq.ops.ema_update.codebook_snapshot`): a
    ``clone`` was recomputed in the backward from the updated codebook."""
    if update and torch.is_grad_enabled() and (
            inputs.requires_grad or codebook.requires_grad or torch.compiler.is_compiling()):
        # (compiled, always: a checkpointed region's backward may rerun the step from the
        # copy, which then refuses to run on an updated codebook; fastvq.ops.ema_update)
        return codebook_snapshot(codebook)
    return codebook


def _quantize_step(mod: CodebookState, inputs, codebook, mask, codes=None, call=None):
    """A quantizer module's forward on its ``(L, K, D)`` codebook: one
    :func:`fastvq.residual_quantize_step` (which also returns, in training, the EMA statistics
    and the residuals of the rows offered for dead-code revival), then the codebook update.
    ``call``: :func:`fastvq.nn._checkpoint.begin`'s answer (None outside checkpointed regions);
    a rerun updates nothing. Returns ``(quantized, commitment_loss, embedding_loss, codes
    (..., L))``; no host sync."""
    replay = call is not None and call.replay
    update = mod.training and mod._codebook_needs_vectors and not replay
    n = inputs.numel() // inputs.shape[-1]
    rows = score = None
    if update and mod.dead_code_threshold > 0:
        rows, score = pick_candidate_rows(n, codebook.shape[1], inputs.device, mask)
    searched = _codebook_for_step(codebook, inputs, update)
    # Under torch.use_deterministic_algorithms(True) on a GPU the statistics come from the sorted
    # code_statistics instead of the step's float32 atomics (fed the levels' inputs formed in torch)
    sorted_stats = update and atomics_nondeterministic(inputs.device)
    # (the op's check of the mask's values, NaN or < 0, names the module's argument)
    step = _residual_quantize_step(
        inputs, searched, weights=mask, codes=codes, grad=mod.grad, statistics=update and not sorted_stats,
        candidate_rows=rows, weights_owner=mod._owner, weights_name="mask", allow_tf32=allow_tf32(inputs),
    )
    embedding_loss = step.embedding_loss
    if mod.ema:  # the codebook learns by EMA: no codebook loss (the seed returns 0)
        embedding_loss = torch.zeros((), dtype=step.commitment_loss.dtype, device=inputs.device)
    if call is not None:
        call.record(searched, codebook)  # (before the update: the codebook as searched)
    if mod.training and not replay:
        flat = step.codes.reshape(n, codebook.shape[0])
        stats = offers = vectors = None
        if update:
            if sorted_stats:  # (the codes pass the compiled graph's rerun check: stats does below)
                flat = refuse_checkpoint_rerun(flat, mod._owner)
                vectors = level_inputs(inputs.detach().reshape(n, -1), searched.detach(), flat)
            else:
                # (compiled, the update waits on a check that this is no checkpoint rerun: eagerly,
                # `call` replays the first run instead)
                stats = (refuse_checkpoint_rerun(step.counts, mod._owner), step.sums, step.skipped)
            if rows is not None:  # midpoints of the rows' vectors and their codes, where the op flags them ok
                # (a residual beyond the codebook's dtype, or held beyond float32, whose midpoint is
                # finite: fuzzP)
                offers = (step.candidates, torch.where(step.candidates_ok, score, -1.0))
        mod._update_codebook_(vectors, flat.T, mask, stats=stats, offers=offers)
    if call is not None:
        call.finish()
    return step.quantized, step.commitment_loss, embedding_loss, step.codes
