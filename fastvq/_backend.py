"""The one place that decides which implementation of an op runs.

Backends:
    ``"auto"``      Triton kernels for CUDA tensors, the pure-torch reference otherwise.
    ``"triton"``    always the Triton kernels. On CPU tensors this needs the Triton
                    interpreter (``TRITON_INTERPRET=1`` set before the process imports torch,
                    which imports Triton) and raises a ``RuntimeError`` saying so otherwise.
    ``"reference"`` always the pure-torch reference in :mod:`fastvq.reference`.

The backend is chosen, most specific first, by ``with fastvq.backend(name):``, by
``fastvq.set_backend(name)``, or by the environment variable ``FASTVQ_BACKEND``; the
default is ``"auto"``. A backend never silently falls back to another.

The choice is process-wide (not thread- or context-local) on purpose: autograd runs the
backward of CUDA tensors on its own worker threads, and the backward must run the same
backend as the forward did.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from typing import Callable, Iterator

import torch

#: The backend names :func:`fastvq.set_backend` and :func:`fastvq.backend` take: ``"auto"`` (Triton
#: for CUDA tensors, the pure-torch reference otherwise), ``"triton"`` or ``"reference"``.
BACKENDS = ("auto", "triton", "reference")

_global_backend: str | None = None  # set_backend()
_scoped_backend: list[tuple[object, str]] = []  # `with backend(...)` blocks: (token, name), innermost last
_SCOPE_LOCK = threading.Lock()


def _validate(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"unknown fastvq backend {name!r}; expected one of {BACKENDS}")
    return name.lower()


def get_backend() -> str:
    """The backend in force: the innermost ``with backend(...)``, else ``set_backend``,
    else ``$FASTVQ_BACKEND``, else ``"auto"``."""
    try:
        return _scoped_backend[-1][1]
    except IndexError:  # (no block; read without a lock: another thread may end its block meanwhile)
        pass
    if _global_backend is not None:
        return _global_backend
    env = os.environ.get("FASTVQ_BACKEND")
    if env:
        try:
            return _validate(env)
        except ValueError:
            raise ValueError(
                f"environment variable FASTVQ_BACKEND={env!r} is not a backend; expected one of {BACKENDS}"
            ) from None
    return "auto"


def set_backend(name: str | None) -> None:
    """Set the process-wide backend (``None`` clears it, so ``$FASTVQ_BACKEND``/"auto" apply)."""
    global _global_backend
    _global_backend = None if name is None else _validate(name)


@contextlib.contextmanager
def backend(name: str) -> Iterator[str]:
    """Run the enclosed block (forward *and* backward) with backend ``name``.

    The choice is process-wide, not per thread (a backward runs in autograd's own threads on a
    GPU and must see it): while blocks in several threads overlap, the one entered last is in
    force; each block's end removes its own entry, so the others keep theirs.

    Example::

        with fastvq.backend("reference"):
            idx, dist = fastvq.nearest_code(x, codebook)
    """
    entry = (object(), _validate(name))
    with _SCOPE_LOCK:
        _scoped_backend.append(entry)
    try:
        yield entry[1]
    finally:
        with _SCOPE_LOCK:
            _scoped_backend.remove(entry)  # (tuples of a fresh object: equal only to themselves)


def interpreter_enabled() -> bool:
    """True when the Triton interpreter is switched on in the environment."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def use_triton(op: str, *tensors: torch.Tensor) -> bool:
    """Decide, for op ``op`` on ``tensors``, whether the Triton kernel runs (True) or the
    reference (False). Raises ``RuntimeError`` when the ``"triton"`` backend cannot run."""
    name = get_backend()
    if name == "reference":
        return False
    on_cuda = all(t.is_cuda for t in tensors)
    if name == "auto":
        return on_cuda
    # name == "triton": never fall back.
    if on_cuda:
        return True
    devices = sorted({str(t.device) for t in tensors})
    if any(t.device.type not in ("cpu", "cuda") for t in tensors):
        raise RuntimeError(f"fastvq.{op}: backend 'triton' runs on CUDA or (interpreted) CPU tensors, got {devices}")
    if not interpreter_enabled():
        raise RuntimeError(
            f"fastvq.{op}: backend 'triton' was asked for on CPU tensors, which needs the Triton "
            "interpreter: set TRITON_INTERPRET=1 in the environment before the process imports torch, "
            "or use backend 'auto'/'reference' for CPU tensors"
        )
    from fastvq import kernels

    if not kernels.INTERPRETED:
        raise RuntimeError(
            f"fastvq.{op}: TRITON_INTERPRET=1 was set after Triton was imported (torch imports it at a first "
            "op or compile) or after fastvq's kernels were compiled for the GPU; set it in the environment "
            "before the process imports torch"
        )
    return True


def without_autocast(fn: Callable) -> Callable:
    """``fn`` run with autocast off: the body of every fastvq op and of its backward.

    A custom op has no autocast rule of its own, so under ``torch.autocast`` the aten ops inside
    a reference body (its matmuls) would run in the autocast dtype, bfloat16 for float32 inputs,
    while the Triton kernels ignore autocast: the backends would disagree and float32 inputs get
    bfloat16 answers. Every fastvq op computes in the promoted dtype of its inputs, with or
    without autocast, on both backends, forward and backward (cast the inputs to choose).
    """

    @functools.wraps(fn)
    def body(*args, **kwargs):
        # plain ``with`` blocks (torch.compile traces these; not an ExitStack: probe6 A1)
        cpu, cuda = torch.is_autocast_enabled("cpu"), torch.is_autocast_enabled("cuda")
        if cpu and cuda:
            with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
                return fn(*args, **kwargs)
        if cpu:
            with torch.autocast("cpu", enabled=False):
                return fn(*args, **kwargs)
        if cuda:
            with torch.autocast("cuda", enabled=False):
                return fn(*args, **kwargs)
        return fn(*args, **kwargs)

    return body


# Devices whose kernels' float atomics make a result depend on the order programs run in (the
# interpreter runs a CPU launch's programs one after another, in order).
ATOMIC_DEVICE_TYPES = ("cuda",)


def tf32_like_torch(t: torch.Tensor) -> bool:
    """Whether torch would run a float32 matmul on ``t``'s device with TF32 (as cdist and the seeds'
    matmuls do): the modules and the vector-quantize-pytorch patch search float32 that way, so
    ``torch.set_float32_matmul_precision("high")`` speeds their searches as it speeds torch's."""
    if t.device.type != "cuda":
        return False
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:  # torch without the fp32_precision API
        return bool(matmul.allow_tf32)
    if precision == "none":  # inherits the global setting
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return precision == "tf32"


def deterministic_requested(flag: bool) -> bool:
    """An op's ``deterministic`` argument, forced on by ``torch.use_deterministic_algorithms(True)``
    (as torch's own ops pick their deterministic implementation then)."""
    return bool(flag) or torch.are_deterministic_algorithms_enabled()


def atomics_nondeterministic(device: torch.device) -> bool:
    """Whether float atomics on ``device`` would break ``torch.use_deterministic_algorithms(True)``
    (the quantizer modules then take their statistics from the sorted ``code_statistics``)."""
    return device.type in ATOMIC_DEVICE_TYPES and torch.are_deterministic_algorithms_enabled()


def alert_nondeterministic(what: str, device: torch.device) -> None:
    """For a kernel that has no deterministic implementation (float atomics) about to run on
    ``device``: torch's standard alert, an error under ``torch.use_deterministic_algorithms(True)``
    (a warning with ``warn_only=True``), nothing otherwise."""
    if not atomics_nondeterministic(device):
        return
    msg = (f"{what} does not have a deterministic implementation, but you set "
           f"'torch.use_deterministic_algorithms(True)'. Turn determinism off around this call, or use "
           f"'torch.use_deterministic_algorithms(True, warn_only=True)' to be warned instead (README, known limits).")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(msg, UserWarning, stacklevel=2)
    else:
        raise RuntimeError(msg)
