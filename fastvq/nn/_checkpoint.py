"""Quantizers under activation checkpointing (``torch.utils.checkpoint``, both variants).

A quantizer with EMA, dead-code revival or k-means init changes its state in its training
forward (the codebook in place, counters, the random stream). ``torch.utils.checkpoint`` runs
the forward of a region again inside the backward: that rerun would search the updated codebook
(its gradients would belong to a forward that never ran) and update everything a second time
(``use_reentrant=True`` reruns the whole forward). So each call of such a quantizer inside a
checkpointed region keeps, on the region's own record (the ``_CheckpointFrame`` of
``use_reentrant=False``, the autograd ``ctx`` of ``use_reentrant=True``), a copy of the codebook
it searched and the random state it left; the rerun of that call (the same region, the same
position among the module's calls in it, for this backward) searches that copy, routes the
codebook gradient to the parameter, updates nothing and leaves the random stream where the first
call did (when checkpoint preserved it: ``preserve_rng_state``, the default). The records live exactly as long as the region's autograd graph: nothing is kept on
the module (``copy.deepcopy``, ``state_dict`` see nothing), nothing is kept without
checkpointing.

Where a forward runs is read from the Python stack (the checkpoint functions' own frames), and
only when a cheap test says it may be inside a checkpoint (grad disabled, saved-tensor hooks
set, or a backward running): an ordinary training step pays three calls into torch's C
extension and never walks the stack. A forward run inside some other backward (a hook, a
custom Function) is an ordinary forward. Compiled code (``torch.compile``) is traced without
any of this, and cannot replay a first run: a quantizer compiled on its own and rerun by an
eager checkpoint raises (:func:`fastvq.ops.ema_update.refuse_checkpoint_rerun`), and so does a
compiled step whose backward reruns the quantizer of a checkpointed region
(:func:`fastvq.ops.ema_update.codebook_snapshot`), before anything is updated twice.
"""

from __future__ import annotations

import torch

from .._checkpoint_frames import _WATCHED, maybe_checkpointed, regions


_CALLS = "_fastvq_quantizer_calls"  # attribute on a region's record: {module: [_Call, ...]}
_REPLAYED = "_fastvq_quantizer_replayed"  # {(graph task, module): calls rerun so far}


class _Call:
    """One call of a quantizer in a checkpointed region: the codebook it searched (detached,
    ``(L, K, D)``) and the random states it found and left on its device."""

    __slots__ = ("codebook", "rng_in", "rng_out")

    def __init__(self):
        self.codebook = None
        self.rng_in = self.rng_out = None


class CheckpointCall:
    """What a quantizer's forward does about checkpointing: ``replay`` (a rerun: search
    :meth:`codebook`, update nothing) or record (a first run inside checkpointed regions)."""

    def __init__(self, call: _Call, replay: bool, device: torch.device):
        self._call = call
        self.replay = replay
        self._device = device
        # (compared as bytes on the host: no op that selective checkpointing's dispatch mode
        # would see in the rerun only)
        state = _get_rng_state(device).numpy().tobytes()
        if replay:  # the rerun starts where the first run started: checkpoint preserves the RNG
            self._restore = call.rng_out is not None and state == call.rng_in
        else:
            call.rng_in = state

    def codebook(self, live: torch.Tensor) -> torch.Tensor:
        """The codebook the first run searched, ``(L, K, D)``; with ``live`` (the parameter's
        view) requiring grad, its gradient reaches ``live``."""
        saved = self._call.codebook
        if live.requires_grad and torch.is_grad_enabled():
            return _Substitute.apply(live, saved)
        return saved

    def record(self, searched: torch.Tensor, codebook: torch.Tensor) -> None:
        """First run: keep the codebook it searched before the update (``searched``, when the
        step made its own copy, else a copy of ``codebook``)."""
        if not self.replay:
            self._call.codebook = (searched if searched is not codebook else codebook.clone()).detach()

    def finish(self) -> None:
        """At the end of the forward: a first run notes the random state it leaves on its
        device (where its draws are made); a rerun (which drew less: no k-means, no revival
        rows) restores it, so what follows in the region draws what it drew the first time. Only
        when the rerun started from the state the first run started from (checkpoint's
        ``preserve_rng_state``): otherwise the rerun's draws are not the first run's anyway, and
        restoring would rewind the generator for the rest of training."""
        if not self.replay:
            self._call.rng_out = _get_rng_state(self._device)
        elif self._restore:
            _set_rng_state(self._device, self._call.rng_out)


def _get_rng_state(device: torch.device):
    """The random state of ``device``'s default generator (a host tensor: no sync)."""
    if device.type == "cpu":
        return torch.get_rng_state()
    return torch.get_device_module(device.type).get_rng_state(device)


def _set_rng_state(device: torch.device, state) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.get_device_module(device.type).set_rng_state(state, device)


class _Substitute(torch.autograd.Function):
    """``saved``'s values, ``live``'s gradient (the rerun's codebook)."""

    @staticmethod
    def forward(ctx, live, saved):
        return saved.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def records_calls(mod) -> bool:
    """Whether the module's forward changes state that a rerun must not see or repeat."""
    return mod.ema or mod.dead_code_threshold > 0 or mod.kmeans_init


def begin(mod, device: torch.device) -> CheckpointCall | None:
    """Called at the start of a quantizer's forward on ``device`` (its inputs'); None outside
    checkpointed regions (and when compiling). Raises ``RuntimeError`` for a rerun of a call it cannot match."""
    if torch.compiler.is_compiling() or not maybe_checkpointed() or not records_calls(mod):
        return None  # (a quantizer that changes nothing in its forward reruns as it ran)
    if not _WATCHED:  # pragma: no cover - a torch whose checkpoint this module does not know
        if torch._C._current_graph_task_id() != -1:
            raise RuntimeError(f"fastvq.{mod._owner}: {_UNKNOWN}")
        return None
    rerun, forwards = regions()
    if rerun is not None:
        record, task = rerun
        calls = getattr(record, _CALLS, {}).get(mod) if record is not None else None
        if calls is None:
            raise RuntimeError(f"fastvq.{mod._owner}: {_UNMATCHED}")
        replayed = _attribute(record, _REPLAYED)
        i = replayed.get((task, mod), 0)
        replayed[(task, mod)] = i + 1
        if i >= len(calls) or calls[i].codebook is None:
            raise RuntimeError(f"fastvq.{mod._owner}: {_UNMATCHED}")
        call, replay = calls[i], True
    elif not forwards:
        return None
    else:
        call, replay = _Call(), False
    for record in forwards:  # (a rerun's nested checkpoints: their own reruns replay this call too)
        _attribute(record, _CALLS).setdefault(mod, []).append(call)
    return CheckpointCall(call, replay, device)


def _attribute(record, name: str) -> dict:
    value = getattr(record, name, None)
    if value is None:
        value = {}
        setattr(record, name, value)
    return value


_UNMATCHED = (
    "torch.utils.checkpoint reruns a call of this quantizer that its checkpointed forward did not make "
    "(the module's options or calls changed between the forward and the backward?); the rerun cannot "
    "reproduce it. Checkpoint the layers around the quantizer instead.")
_UNKNOWN = (
    "this torch's torch.utils.checkpoint is not one fastvq knows, so a rerun of this quantizer's forward "
    "(which updates its codebook) cannot be told from a first run. Checkpoint the layers around the "
    "quantizer instead, or run it in eval mode.")
