"""The decorator every fastvq op is registered with (the one place custom ops are made)."""

from __future__ import annotations

import inspect
from typing import Callable

import torch

from .._backend import without_autocast


def custom_op(name: str, *, mutates_args) -> Callable:
    """``torch.library.custom_op`` for fastvq's ops: the body, and the backward later given to
    ``register_autograd``, run :func:`without_autocast`."""

    def wrap(fn: Callable) -> Callable:
        body = without_autocast(fn)
        # the schema comes from the annotations, resolved in fn's module (they may be strings)
        sig = inspect.signature(fn, eval_str=True)
        body.__signature__ = sig
        body.__annotations__ = {**{k: p.annotation for k, p in sig.parameters.items()}, "return": sig.return_annotation}
        op = torch.library.custom_op(name, mutates_args=mutates_args)(body)
        register = op.register_autograd

        def register_autograd(backward, /, *, setup_context=None):
            return register(without_autocast(backward), setup_context=setup_context)

        op.register_autograd = register_autograd
        return op

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
