"""Where a forward runs with respect to ``torch.utils.checkpoint``: a first run inside
checkpointed regions, the rerun of one inside the backward, or neither; read from the Python
stack (the checkpoint functions' own frames, both ``use_reentrant`` variants). Shared by the
modules (:mod:`fastvq.nn._checkpoint`, which make a rerun repeat its first run) and the ops
(:func:`fastvq.ops.ema_update.refuse_checkpoint_rerun`, the check a compiled module keeps)."""

from __future__ import annotations

import inspect
import sys

import torch
import torch.utils.checkpoint as _tc


def _watched_code() -> dict:
    """The code objects of torch.utils.checkpoint whose frames mark a region: a checkpointed
    forward or the rerun of one, per variant. Empty when this torch spells them differently
    (then a quantizer that updates its codebook refuses to run inside any backward:
    :func:`fastvq.nn._checkpoint.begin`; tests/nn/test_codebook_training.py names the change)."""
    try:
        unpack = [c for c in _tc._checkpoint_hook.__init__.__code__.co_consts
                  if inspect.iscode(c) and c.co_name == "unpack_hook"]
        return {
            inspect.unwrap(_tc.checkpoint).__code__: "forward",  # use_reentrant=False, first run
            unpack[0]: "rerun",  # ... its rerun, from the unpack hook of a saved tensor
            _tc.CheckpointFunction.forward.__code__: "reentrant-forward",
            _tc.CheckpointFunction.backward.__code__: "reentrant-rerun",
        }
    except (AttributeError, IndexError):  # pragma: no cover - another torch
        return {}


_WATCHED = _watched_code()


def regions():
    """``(rerun, forwards)``: the innermost checkpoint rerun on the stack as ``(record, graph
    task)`` (None if none) and the records of the checkpointed forwards that run inside it (or
    on the whole stack), innermost first.

    A region's record is the object torch keeps for it as long as its graph lives: for
    ``use_reentrant=False`` the ``_CheckpointFrame`` (``new_frame`` of the generator that
    ``checkpoint`` holds as ``gen`` while the forward runs; ``frame`` of the unpack hook that
    reruns it, with the backward's ``gid``), for ``use_reentrant=True`` the autograd ``ctx``
    of ``CheckpointFunction`` (its ``backward`` reruns the region before it binds ``outputs``,
    then runs a backward of its own, in which a forward is not a rerun)."""
    forwards = []
    frame = sys._getframe(1)
    while frame is not None:
        kind = _WATCHED.get(frame.f_code)
        if kind is not None:
            local = frame.f_locals
            if kind == "forward":
                gen = local.get("gen")  # the generator that set up this region's hooks
                record = gen.gi_frame.f_locals.get("new_frame") if gen is not None and gen.gi_frame else None
                if record is not None:
                    forwards.append(record)
            elif kind == "rerun":  # (a record of None: a rerun no call can be matched to)
                return (local.get("frame"), local.get("gid", torch._C._current_graph_task_id())), forwards
            elif kind == "reentrant-forward":
                if local.get("ctx") is not None:
                    forwards.append(local["ctx"])
            elif "outputs" not in local:  # reentrant backward, still rerunning the region
                return (local.get("ctx"), torch._C._current_graph_task_id()), forwards
            # (a reentrant backward past its rerun: a forward in it runs inside some other backward)
        frame = frame.f_back
    return None, forwards


def maybe_checkpointed() -> bool:
    """Cheap test, false on an ordinary training step: a checkpointed forward runs with saved-
    tensor hooks set (``use_reentrant=False``) or without grad (``True``); a rerun inside a backward."""
    return (not torch.is_grad_enabled() or torch._C._current_graph_task_id() != -1
            or torch._C._autograd._top_saved_tensors_default_hooks(False) is not None)


def in_checkpoint_rerun() -> bool:
    """Whether the caller runs inside the rerun of a checkpointed region (cheap outside one)."""
    return maybe_checkpointed() and bool(_WATCHED) and regions()[0] is not None


def in_compiled_backward() -> bool:
    """Whether the caller runs in the backward of a compiled graph (AOTAutograd's
    ``CompiledFunction.backward``), nearer on the stack than any compiled forward: where the
    partitioner reruns forward ops of a checkpointed region. Cheap outside a backward."""
    if torch._C._current_graph_task_id() == -1:
        return False
    frame = sys._getframe(1)
    while frame is not None:
        code = frame.f_code
        if "_aot_autograd" in code.co_filename and "CompiledFunction" in code.co_qualname:
            return code.co_name in ("backward", "_backward_impl")
        frame = frame.f_back
    return False
