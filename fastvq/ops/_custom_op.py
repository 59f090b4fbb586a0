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
