"""The decorator every fastvq op is registered with (the one place custom ops are made)."""

from __future__ import annotations

import inspect
from typing import Callable

import torch
import torch._C._functorch as _functorch
import torch.autograd.forward_ad as _fwad

from .._backend import without_autocast


class _Op:
    """A fastvq custom op: calls the ``torch.library`` op, and once it has an autograd formula
    refuses inputs that carry a forward-mode tangent (``torch.func.jvp`` / ``jacfwd``,
    ``torch.autograd.forward_ad``). torch's generated autograd of a library custom op has no
    forward formula and drops such a tangent, so the result's tangent would silently be zero
    (fuzzD D1). Every other attribute is the op's (``register_fake``, ``_opoverload``, ...)."""

    def __init__(self, op, name: str):
        self._op, self._owner, self._differentiable = op, name.split("::")[-1], False

    def __getattr__(self, attr):
        if attr == "_op":  # (not set yet: copy.copy builds the object without __init__)
            raise AttributeError(attr)
        return getattr(self._op, attr)

    def register_autograd(self, backward, /, *, setup_context=None):
        self._differentiable = True
        return self._op.register_autograd(without_autocast(backward), setup_context=setup_context)

    def __call__(self, *args, **kwargs):
        if self._differentiable and _fwad._current_level >= 0:
            refuse_tangents(self._owner, *args, *kwargs.values())
        return self._op(*args, **kwargs)


def _tangent(t: torch.Tensor):
    """``t``'s forward-mode tangent at the current dual level, looking through ``vmap``'s batched
    wrappers (``unpack_dual`` has no batching rule: a vmap inside a dual level raised; review8)."""
    while _functorch.is_batchedtensor(t):
        t = _functorch.get_unwrapped(t)
    return _fwad.unpack_dual(t).tangent


def refuse_tangents(owner: str, *args) -> None:
    """Raise ``RuntimeError`` if a tensor among ``args`` (or in a list among them) carries a
    forward-mode tangent at the current dual level."""
    for a in args:
        for t in (a if isinstance(a, (list, tuple)) else (a,)):
            if isinstance(t, torch.Tensor) and _tangent(t) is not None:
                raise RuntimeError(
                    f"fastvq.{owner}: forward-mode AD (torch.func.jvp, jacfwd, torch.autograd.forward_ad) is not "
                    f"supported: fastvq's ops have reverse-mode gradients only (README, known limits); an input "
                    f"carries a tangent that the op would drop. Use reverse mode (backward, torch.func.vjp / jacrev "
                    f"outside a transform of the gradient) or the reference formula.")


def custom_op(name: str, *, mutates_args) -> Callable:
    """``torch.library.custom_op`` for fastvq's ops: the body, and the backward later given to
    ``register_autograd``, run :func:`without_autocast`; a differentiable op refuses
    forward-mode tangents (:class:`_Op`)."""

    def wrap(fn: Callable) -> Callable:
        body = without_autocast(fn)
        # the schema comes from the annotations, resolved in fn's module (they may be strings)
        sig = inspect.signature(fn, eval_str=True)
        body.__signature__ = sig
        body.__annotations__ = {**{k: p.annotation for k, p in sig.parameters.items()}, "return": sig.return_annotation}
        return _Op(torch.library.custom_op(name, mutates_args=mutates_args)(body), name)

    return wrap


def first_order_only(op, owner: str) -> None:
    """Give ``op``, a backward op, an autograd formula that refuses: a second backward through
    it (``create_graph=True``, a gradient penalty) raises a ``RuntimeError`` naming the public
    op, where torch would name the internal op and say no formula was registered. A first-order
    backward never runs it (the backward op is called with grad mode off)."""

    def refuse(ctx, *grads):
        raise RuntimeError(f"fastvq.{owner}: double backward (create_graph=True, e.g. a gradient penalty) is not "
                           f"supported: fastvq's ops are first-order only (README, known limits)")

    op.register_autograd(refuse)
