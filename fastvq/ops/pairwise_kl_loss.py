"""pairwise_kl_loss: KL between the in-batch similarity softmaxes of pred and target rows."""

from __future__ import annotations

from typing import Optional

import torch

from .._backend import use_triton
from ._custom_op import custom_op, first_order_only
from .._checks import check_float, check_same_device, check_tensor, read_temperature, temperature_arg
from ..reference.pairwise_kl_loss import logit_scaling, pairwise_kl_loss_bwd_ref, pairwise_kl_loss_fwd_ref, row_max


def _kernel_operands(pred: torch.Tensor, target: torch.Tensor, temperature: float):
    """The kernels' operands: the inputs as given, except float16 rows at a temperature where their
    logits (``|x_i . x_j| <= 2^32 D``, unscaled on the float16 path) could come near float32's
    range, ``2^32 D / T >= 2^100`` (``T`` below about ``2^-68 D``): those take the float32 path,
    whose row scaling and float64 rescue form logits beyond float32 (a host decision from the
    shapes and ``T``; ordinary temperatures never reach it)."""
    if pred.dtype == torch.float16 and 2.0**32 * max(pred.shape[1], target.shape[1], 1) / temperature >= 2.0**100:
        return pred.float(), target.float()
    return pred, target


def _scaling(pred: torch.Tensor, target: torch.Tensor, temperature: float) -> tuple:
    """The kernels' logit scaling for ``T`` and the rows' length (as the reference decides it)."""
    return logit_scaling(temperature, max(pred.shape[1], target.shape[1]))


def _t_bounds() -> dict:
    """T and 1/T normal float32 numbers: the kernels scale by 1/T (its reciprocal subnormal or
    overflowing loses the gradient's precision or makes it +-inf). (Literals made at each call:
    under torch.compile, dynamic=True, the floats of a module-level dict were traced as
    symbols, which the argument check cannot format.)"""
    return {"minimum": 2.0**-125, "maximum": 2.0**125}


@custom_op("fastvq::pairwise_kl_loss", mutates_args=())
def _pairwise_kl_loss_op(
    pred: torch.Tensor, target: torch.Tensor, temperature: float, temperature_t: Optional[torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    temperature = read_temperature("pairwise_kl_loss", temperature, temperature_t, **_t_bounds())
    # The rows' max |x|: one O(B D) read of each input, on the device (no host sync), for both
    # the backends' row scaling and the finiteness check below.
    amax_p, amax_t = row_max(pred), row_max(target)
    if use_triton("pairwise_kl_loss", pred, target):
        from ..kernels.pairwise_kl_loss import pairwise_kl_loss_fwd

        loss, lse_p, lse_t = pairwise_kl_loss_fwd(*_kernel_operands(pred, target, temperature), temperature,
                                                  _scaling(pred, target, temperature), amax_p, amax_t)
    else:
        loss, lse_p, lse_t = pairwise_kl_loss_fwd_ref(pred, target, temperature, amax_p, amax_t)
    # A loss that overflows float32 comes back +inf; a NaN or inf in the inputs makes the loss NaN
    # (every input element enters some logit once B >= 2; a row's max |x| is NaN or inf then).
    # B <= 1 forms no logit: the loss is the empty mean, 0, whatever the values.
    if pred.shape[0] <= 1:
        return loss, lse_p, lse_t
    finite = torch.isfinite(amax_p).all() & torch.isfinite(amax_t).all()
    return torch.where(finite, loss, float("nan")), lse_p, lse_t


@_pairwise_kl_loss_op.register_fake
def _(pred, target, temperature, temperature_t):
    B = pred.shape[0]
    return (
        pred.new_empty((), dtype=torch.float32),
        pred.new_empty((3, B), dtype=torch.float64),
        pred.new_empty((3, B), dtype=torch.float64),
    )


@custom_op("fastvq::pairwise_kl_loss_backward", mutates_args=())
def _pairwise_kl_loss_bwd_op(
    grad: torch.Tensor,
    pred: torch.Tensor,
    target: torch.Tensor,
    lse_p: torch.Tensor,
    lse_t: torch.Tensor,
    temperature: float,
    temperature_t: Optional[torch.Tensor],
) -> torch.Tensor:
    temperature = read_temperature("pairwise_kl_loss", temperature, temperature_t, **_t_bounds())
    if use_triton("pairwise_kl_loss", pred, target):
        from ..kernels.pairwise_kl_loss import pairwise_kl_loss_bwd

        return pairwise_kl_loss_bwd(grad, *_kernel_operands(pred, target, temperature), lse_p, lse_t, temperature,
                                    _scaling(pred, target, temperature)).to(pred.dtype)
    return pairwise_kl_loss_bwd_ref(grad, pred, target, lse_p, lse_t, temperature)


@_pairwise_kl_loss_bwd_op.register_fake
def _(grad, pred, target, lse_p, lse_t, temperature, temperature_t):
    return torch.empty_like(pred, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    pred, target, temperature, temperature_t = inputs
    _, lse_p, lse_t = output
    ctx.save_for_backward(pred, target, lse_p, lse_t, temperature_t)
    ctx.temperature = temperature
    ctx.mark_non_differentiable(lse_p, lse_t)


def _backward(ctx, grad, _grad_lse_p, _grad_lse_t):
    pred, target, lse_p, lse_t, temperature_t = ctx.saved_tensors
    grad_pred = None
    if ctx.needs_input_grad[0]:
        grad_pred = _pairwise_kl_loss_bwd_op(grad, pred, target, lse_p, lse_t, ctx.temperature, temperature_t)
    return grad_pred, None, None, None


_pairwise_kl_loss_op.register_autograd(_backward, setup_context=_setup_context)
first_order_only(_pairwise_kl_loss_bwd_op, "pairwise_kl_loss")


def pairwise_kl_loss(pred: torch.Tensor, target: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL divergence between the in-batch similarity distributions of ``target`` and ``pred``.

    For rows ``i != j`` of a batch, ``s_ij = pred_i . pred_j / T`` and
    ``t_ij = target_i . target_j / T``. Each row takes a softmax over the *other* rows
    (its own diagonal is excluded exactly), ``p_i = softmax_j(s_ij)``, ``q_i = softmax_j(t_ij)``,
    and the loss is ``(1/B) sum_i KL(q_i || p_i)``: the same value as the pairwise-geometry
    training loss ::

        sim = pred @ pred.T; sim = torch.where(torch.eye(B) > 0, -1000, sim)   # same for target
        nn.KLDivLoss(reduction="batchmean", log_target=True)(
            F.log_softmax(sim_pred / T, 1), F.log_softmax(sim_target / T, 1))

    whose ``-1000`` diagonal is an approximation of exclusion that is exact only while
    ``exp(-1000 / T)`` underflows (``T`` up to about 1 for unit-norm rows); here the diagonal
    never enters, at any ``T``. The fused Triton kernel streams the batch in tiles with online
    log-sum-exps, so the ``B x B`` matrices are never stored: ``B = 65536`` costs three floats
    a row of memory. The rows are used as given (normalise them first, as the seed does).

    Args:
        pred: ``(B, Dp)`` float32/float16/bfloat16 embeddings being trained.
        target: ``(B, Dt)``, same device and batch size; any ``Dt``. A different float dtype
            is promoted with ``pred``'s. Treated as a constant: it gets no gradient.
        temperature: ``T`` in ``[2^-125, 2^125]`` (about 2.4e-38 to 4.3e37: ``T`` and ``1/T``
            normal float32 numbers), a Python number or a one-element floating-point tensor,
            read once on the host, so it gets no gradient (a tensor that requires grad is
            refused). A tensor is read when the op runs (a CPU tensor costs no device sync, a
            CUDA one does) and is checked then. Under ``torch.compile`` a Python number becomes
            such a tensor (float64), a graph input: with ``backend="eager"`` a schedule that
            changes it every epoch compiles at most twice; ``inductor`` and ``aot_eager`` (and
            ``dynamic=False``) compile once per value: pass a tensor there (at most twice).

    Returns:
        A 0-d float32 tensor, differentiable in ``pred``. ``B <= 1`` (no row has another
        row to compare with, so no logit is formed) gives ``0`` with a zero gradient, whatever
        the values (NaN or inf entries included).

    Numbers (both backends, every dtype; ordinary rows' logits and sums in float32): wherever the
    inputs are finite, the loss and its gradient follow the float64 computation (up to each
    logit's rounding: README, known limits) where they are representable in float32, at any
    magnitude of the inputs and of the logits
    ``pred_i . pred_j / T``, ``target_i . target_j / T``: each row is scaled by its own power of
    two before the dot products (so ``x_i . x_j`` may exceed float32 where ``/ T`` brings it back,
    ``T > 1``, and rows ~1e-20 beside a row ~3e38 keep their products); every pair of a row whose
    max ``|x|`` is near the float32 range for ``T`` (``>= 2^54`` at ``T = 1``, lower from 2^18
    features on) takes its logits
    from a float64 dot instead (products ~2^252 that cancel, or a tiny entry times a huge one, stay
    right: the error is float64's, ``D 2^-53 sum_k |x_ik x_jk| / T``), rounded once to float32
    where float32 holds it and beyond it to float32's 24 bits with float64's exponent (rows ~1e20:
    logits ~1e40), and everything
    such a logit enters (the row's largest logit, its softmax terms, its KL terms) is formed in
    float64, so a target whose logits lie beyond float32 gives its one-hot softmaxes and an
    ordinary loss, and ``target == pred`` gives 0 and a zero gradient. The rows' KLs are divided by
    ``B`` and summed in float64 and the loss rounded once: it is ``+inf`` exactly where the exact
    loss overflows float32 (pred's logits ~1e40 against an ordinary target), and the gradient,
    which is finite there, is still the exact one's. Logits all below -1e30 keep an exact
    logsumexp; a pair whose target weight is exactly 0 contributes exactly 0. float16 inputs at a
    temperature where their unscaled logits could reach float32's range (``2^32 D / T >= 2^100``)
    run the float32 kernels. From ``B = 2`` on a NaN or infinite input element makes the loss NaN.
    The loss is never negative: each row's KL (>= 0 exactly) that
    rounds below 0 counts as 0 (NaN stays NaN); the gradient is the KL's, not the clamp's (0).
    bf16/fp16 inputs: the backward's ``(G + G^T) @ pred`` is a
    16-bit tensor-core dot (``G + G^T`` rounded to the input dtype, float32 accumulation); the
    float16 one scales ``G + G^T`` by 2^14 first, so it does not underflow at large ``B`` or
    nearly equal softmaxes.

    Example::

        >>> pred = F.normalize(model(ids), dim=1)        # (B, 64)
        >>> target = F.normalize(actuals[ids_batch], dim=1)  # (B, 768)
        >>> loss = fastvq.pairwise_kl_loss(pred, target, temperature=0.1)
        >>> loss.backward()
    """
    op = "pairwise_kl_loss"
    check_tensor(op, "pred", pred, ndim=2)
    check_tensor(op, "target", target, ndim=2)
    check_float(op, "pred", pred)
    check_float(op, "target", target)
    check_same_device(op, pred=pred, target=target)
    if pred.shape[0] != target.shape[0]:
        raise ValueError(
            f"fastvq.{op}: pred and target must have the same number of rows, got pred {tuple(pred.shape)} "
            f"and target {tuple(target.shape)}"
        )
    temperature, temperature_t = temperature_arg(op, temperature, pred, **_t_bounds())
    if pred.dtype != target.dtype:
        dtype = torch.promote_types(pred.dtype, target.dtype)
        pred, target = pred.to(dtype), target.to(dtype)
    return _pairwise_kl_loss_op(pred, target.detach(), temperature, temperature_t)[0]
