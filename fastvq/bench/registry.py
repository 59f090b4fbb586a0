"""The benchmark's registry: which row groups ``python -m fastvq bench`` can run.

A *group* is a name (``--ops NAME`` selects it) and a builder ``builder(device, quick) -> list[Case]``
that returns the rows of that group for a device (``"cuda"`` or ``"cpu"``) at full (``quick=False``)
or small shapes. Groups run in order of ``weight``, then of registration, so that a run cut short
by a time limit loses the heaviest rows last:

======  =========================================  ==========================================
weight  rows                                       module
======  =========================================  ==========================================
0       one op's kernels (``OP_ROWS``)             :mod:`fastvq.bench.cases`
10      a module's training step (``STEP_ROWS``)   :mod:`fastvq.bench.steps`
20      peers from other packages (``PEER_ROWS``)  :mod:`fastvq.bench.vqp` (vector-quantize-pytorch)
======  =========================================  ==========================================

Adding rows
-----------
In the module of your group (one of :data:`BUILTIN_MODULES`, or your own module imported before
:func:`build_cases` runs)::

    from fastvq.bench.registry import STEP_ROWS, Case, register

    def my_step_cases(device, quick):
        return [Case(op="MyModule step", shape={"N": n}, dtype=torch.float32, make=...,
                     providers={"reference": ..., "fastvq": ...}, bytes=...)]

    register("my_step", my_step_cases, weight=STEP_ROWS, requires=("some_package",))

``requires`` names importable packages the rows need; when one is missing the group is skipped
with a one-line note, never an error (the GPU image has no vector-quantize-pytorch, say). A
provider called ``fastvq`` (or starting with ``fastvq``) runs Triton kernels: without CUDA it is
never timed. A name registered twice raises, so two modules cannot silently shadow each other.

This module imports neither the harness nor the row modules at import time; :func:`build_cases`
imports the built-in row modules when it first runs.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from dataclasses import dataclass, field
from typing import Callable

import torch

from .._checks import UsageError

OP_ROWS, STEP_ROWS, PEER_ROWS = 0, 10, 20

#: Row modules imported by :func:`load_builtin`; a missing one (not written yet) is skipped.
BUILTIN_MODULES = ("fastvq.bench.cases", "fastvq.bench.steps", "fastvq.bench.vqp")


@dataclass
class Case:
    """One benchmark row group: an op (or training step) at one shape and dtype, with its providers.

    ``make(device)`` returns the inputs; each provider maps ``*inputs`` to a result. ``flops`` or
    ``bytes`` (read + written, the fewest the op must move) give TFLOP/s or GB/s. ``ceiling``
    is "matmul" (``matmul_shape`` = (M, K, N) of the equivalent product) or "copy".
    ``unit_bytes`` (the bytes of the activation): without CUDA, each provider's passes over it,
    launches and host syncs are counted too (:mod:`fastvq.bench.traffic`; not for compiled ones,
    whose generated kernels the counter cannot see).
    """

    op: str
    shape: dict
    dtype: torch.dtype
    make: Callable[[str], tuple]
    providers: dict
    flops: float | None = None
    bytes: float | None = None
    ceiling: str = "copy"
    matmul_shape: tuple | None = None
    skip: dict = field(default_factory=dict)  # provider -> reason it cannot run at this shape
    peers: dict = field(default_factory=dict)  # extra providers (e.g. the seed's torch code)
    unit_bytes: float | None = None  # the activation's bytes: count traffic in passes over it (CPU)

    @property
    def label(self) -> str:
        dims = ",".join(f"{k}={v}" for k, v in self.shape.items())
        return f"{self.op}[{dims},{str(self.dtype).replace('torch.', '')}]"


    def __post_init__(self):
        if self.flops is None and self.bytes is None:
            raise ValueError(f"fastvq.bench.Case {self.op!r}: give flops or bytes, so that every timed row "
                             f"has a throughput")


def on_triton(fn: Callable) -> Callable:
    """Wrap ``fn`` to run under the Triton backend (a ``fastvq`` provider)."""
    import fastvq

    @functools.wraps(fn)
    def run(*args):
        with fastvq.backend("triton"):
            return fn(*args)

    return run


def exact_fp32(fn: Callable) -> Callable:
    """Wrap ``fn`` to run float32 on the exact FMA dot (``$FASTVQ_FP32_DOT=ieee`` around each
    call, a ``fastvq ieee`` provider): the search as fastvq ran it before the TF32 split, timed
    beside the default in the same run."""
    import os

    from .._checks import FP32_DOT_ENV

    @functools.wraps(fn)
    def run(*args, **kwargs):
        old = os.environ.get(FP32_DOT_ENV)
        os.environ[FP32_DOT_ENV] = "ieee"
        try:
            return fn(*args, **kwargs)
        finally:
            if old is None:
                del os.environ[FP32_DOT_ENV]
            else:
                os.environ[FP32_DOT_ENV] = old

    return run


def on_reference(fn: Callable) -> Callable:
    """Wrap ``fn`` to run under the pure-torch reference backend (eager)."""
    import fastvq

    @functools.wraps(fn)
    def run(*args):
        with fastvq.backend("reference"):
            return fn(*args)

    return run


def compiled(fn: Callable) -> Callable:
    """``torch.compile`` of ``fn`` (static shapes): the ``compiled`` provider."""
    return torch.compile(fn, dynamic=False)


def fits(nbytes: float, device: str, share: float = 0.6) -> bool:
    """Whether ``nbytes`` of scratch fits: under ``share`` of the free GPU memory, or 4 GiB on a CPU."""
    if device != "cuda":
        return nbytes < 4 * 2**30
    free, _ = torch.cuda.mem_get_info()
    return nbytes < share * free


@dataclass
class Group:
    name: str
    builder: Callable[[str, bool], list]
    weight: int = OP_ROWS
    requires: tuple = ()
    order: int = 0

    def missing(self) -> list[str]:
        """The required packages that cannot be imported here."""
        return [p for p in self.requires if importlib.util.find_spec(p) is None]


_GROUPS: dict[str, Group] = {}
_loaded = False


def register(name: str, builder: Callable[[str, bool], list], *, weight: int = OP_ROWS,
             requires: tuple | list = ()) -> Callable:
    """Register a row group; returns ``builder`` (so it can be used as a decorator's body).

    ``name``: the ``--ops`` name; ``builder(device, quick) -> list[Case]``; ``weight``: run order
    (``OP_ROWS``, ``STEP_ROWS``, ``PEER_ROWS``); ``requires``: packages the rows import.
    """
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ValueError(f"fastvq.bench.register: name must be a non-empty word, got {name!r}")
    if not callable(builder):
        raise TypeError(f"fastvq.bench.register: builder of {name!r} must be callable, got {type(builder).__name__}")
    if name in _GROUPS and _GROUPS[name].builder is not builder:
        raise ValueError(f"fastvq.bench.register: {name!r} is already registered (by "
                         f"{getattr(_GROUPS[name].builder, '__module__', '?')})")
    _GROUPS[name] = Group(name, builder, int(weight), tuple(requires), len(_GROUPS))
    return builder


def unregister(name: str) -> None:
    """Remove a group (tests use it to clean up)."""
    _GROUPS.pop(name, None)


def load_builtin() -> None:
    """Import the built-in row modules once (each registers its groups)."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:  # the module exists but an import inside it failed: say so
                raise


def groups() -> list[Group]:
    """Every registered group, in run order (weight, then registration)."""
    load_builtin()
    return sorted(_GROUPS.values(), key=lambda g: (g.weight, g.order))


def names() -> list[str]:
    return [g.name for g in groups()]


def check_names(ops) -> None:
    """Raise ``ValueError`` naming every unknown group and listing the valid names."""
    load_builtin()
    unknown = [o for o in (ops or ()) if o not in _GROUPS]
    if unknown:
        raise UsageError(f"unknown benchmark name(s) {', '.join(map(repr, unknown))}; valid names: "
                         f"{', '.join(names())}")


def build_cases(device: str, quick: bool, ops=None, notes: list | None = None) -> list[Case]:
    """The rows to run, heaviest groups last; groups whose ``requires`` are missing are skipped
    (a note is appended to ``notes``)."""
    check_names(ops)
    out = []
    for g in groups():
        if ops and g.name not in ops:
            continue
        missing = g.missing()
        if missing:
            if notes is not None:
                notes.append(f"skipped {g.name}: needs {', '.join(missing)} (not installed)")
            continue
        out.extend(g.builder(device, quick))
    return out
