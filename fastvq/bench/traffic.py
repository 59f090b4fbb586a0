"""Traffic meter: what one training step (or one op call) moves, launches and syncs.

``python -m fastvq bench --traffic`` counts, for one training step (forward + backward +
codebook update) of every module and for each op's forward and backward, on any device (CPU
included, the Triton kernels then run under the interpreter):

- **glue passes**: the bytes read and written by torch (aten) ops outside our Triton kernels,
  in units of the step's activation tensor (``N x D`` of the quantizer input; a pass is one
  read or one write of it). Aten ops inside custom ops' bodies count too: the meter runs the
  body of every custom op defined with ``torch.library`` (fastvq's and any other) with itself still active,
  so moving glue into a custom op hides nothing; ``tolist``/``numpy`` of a CPU tensor count as
  host syncs (they dispatch no aten op). Views (``view``, ``expand``, ``t``, ``detach`` ...) and allocations
  (``empty``) move nothing; an in-place op reads and writes its target (``copy_``, ``fill_``,
  ``zero_`` and ``out=`` arguments are only written).
- **kernel passes**: every Triton launch counts each of its distinct tensor arguments once (the
  bytes the tensor spans: an expanded, stride-0 tensor counts its storage, not its view; a
  tensor passed twice, e.g. as an unused placeholder, counts once).
- **launches**: Triton kernel launches (aten ops are not counted as launches).
- **host syncs**: ``.item()``/``int(t)``/``bool(t)`` (``_local_scalar_dense``, ``is_nonzero``,
  ``equal``), ops with data-dependent output shapes (``nonzero``, ``unique*``,
  ``masked_select``, boolean-mask indexing, ``repeat_interleave`` without ``output_size``,
  ``bincount``) and device-to-host copies. They are counted on CPU too, where they are free:
  on a GPU each one stalls the host until the device catches up.

Every count comes from a :class:`torch.utils._python_dispatch.TorchDispatchMode` (each aten op
the step dispatches) and from a hook on Triton's launch entry points (``JITFunction.run`` on a
GPU, ``InterpretedFunction.run`` under the interpreter); the interpreter's own copies of the
arguments to and from the host are not counted. A step is run once to warm up (autotuning,
k-means init, caches) and measured on its second run.

The table lists glue passes split into forward (which includes a module's codebook update: the
modules update EMA state and revive dead codes in their training forward) and backward, then
kernel passes, the total, launches and syncs. ``benchmarks/results/traffic.json`` holds the same
numbers plus, per case, the aten ops that moved the most bytes and the syncs by op.

Example::

    >>> from fastvq.bench.traffic import measure
    >>> t = measure(lambda phase: my_step(phase), unit_bytes=x.numel() * x.element_size())
    >>> t.total_passes, t.launches, t.syncs
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import threading
from collections import Counter, defaultdict
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_flatten

from .._checks import UsageError

aten = torch.ops.aten

# .item() / int(t) / bool(t) / comparisons read on the host
_SCALAR_READS = {"item", "_local_scalar_dense", "is_nonzero", "equal", "allclose", "tolist"}
# output shape depends on the values: the host must wait for them
_DATA_DEPENDENT = {"nonzero", "unique", "_unique", "_unique2", "unique_consecutive", "unique_dim",
                   "unique_dim_consecutive", "masked_select", "bincount", "argwhere"}
# allocations: no bytes moved
_ALLOC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted"}
# ops that return an alias though their schema says not (a copying reshape's _unsafe_view
# follows its copy: booking it too counted that copy twice, syncprobe Y8)
_ALIASES = {"_unsafe_view"}
# in-place ops that only write their target
_WRITE_ONLY = {"copy_", "fill_", "zero_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_"}


def span_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor spans in memory: ``numel * itemsize`` for a dense tensor, less for an
    expanded (stride-0) one, 0 when empty."""
    if t.numel() == 0:
        return 0
    if t.layout != torch.strided:
        return t.numel() * t.element_size()
    extent = 1 + sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride()))
    return min(extent, t.numel()) * t.element_size()


def _tensors(tree) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


@dataclasses.dataclass
class PhaseCounts:
    glue_bytes: int = 0
    kernel_bytes: int = 0
    launches: int = 0
    syncs: int = 0
    glue_ops: Counter = dataclasses.field(default_factory=Counter)  # aten op -> bytes
    sync_ops: Counter = dataclasses.field(default_factory=Counter)  # aten op -> count
    kernels: Counter = dataclasses.field(default_factory=Counter)  # kernel name -> launches
    largest_alloc: int = 0  # elements of the largest tensor any op or launcher produced


class TrafficMeter(TorchDispatchMode):
    """Counts glue bytes, Triton launches and host syncs per phase (see the module docstring).

    Use :func:`metering` rather than this class directly: it also hooks the Triton launchers.
    ``meter.phase`` names the phase the following ops are booked to.
    """

    def __init__(self):
        super().__init__()
        self.phase = "fwd"
        self.counts: dict[str, PhaseCounts] = defaultdict(PhaseCounts)
        self._lock = threading.Lock()

    # -- aten ops ---------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opdef = _custom_opdef(func)
        if opdef is not None:
            # our custom op: run its body with the meter still active, so its aten ops count
            with self:
                return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        self._book(func, args, kwargs, out)
        return out

    def _book(self, func, args, kwargs, out) -> None:
        name = func._schema.name.split("::")[-1]
        c = self.counts[self.phase]
        outs = _tensors(out)
        with self._lock:
            for t in outs:
                c.largest_alloc = max(c.largest_alloc, t.numel())
            sync = self._is_sync(name, func, args, kwargs)
            if sync:
                c.syncs += 1
                c.sync_ops[name] += 1
            if func.is_view or name in _ALLOC or name in _ALIASES or name.startswith("sym_"):
                return
            nbytes = 0
            written_args = set()
            for i, a in enumerate(func._schema.arguments):
                val = kwargs.get(a.name) if a.kwarg_only else (args[i] if i < len(args) else kwargs.get(a.name))
                ts = _tensors(val)
                if not ts:
                    continue
                is_write = a.alias_info is not None and a.alias_info.is_write
                if is_write:
                    written_args.update(id(t) for t in ts)
                if is_write and (name in _WRITE_ONLY or a.is_out):
                    continue
                nbytes += sum(span_bytes(t) for t in ts)
            nbytes += sum(span_bytes(t) for t in outs)
            if nbytes:
                c.glue_bytes += nbytes
                c.glue_ops[name] += nbytes

    @staticmethod
    def _is_sync(name, func, args, kwargs) -> bool:
        if name in _SCALAR_READS or name in _DATA_DEPENDENT:
            return True
        if name == "repeat_interleave":  # tensor repeats: the output size is their sum
            repeats = args[1] if len(args) > 1 else kwargs.get("repeats", args[0] if args else None)
            return isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None
        if name in ("index", "index_put", "index_put_", "_index_put_impl_"):
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            return any(isinstance(t, torch.Tensor) and t.dtype in (torch.bool, torch.uint8) for t in indices or ())
        if name in ("_to_copy", "copy_", "to"):  # device -> host
            ts = _tensors((args, kwargs))
            dst = kwargs.get("device")
            if name == "copy_" and len(ts) >= 2:
                return ts[1].device.type != "cpu" and ts[0].device.type == "cpu"
            return bool(ts) and ts[0].device.type != "cpu" and dst is not None and torch.device(dst).type == "cpu"
        return False

    # -- Triton launches --------------------------------------------------------------------
    def _launch(self, name: str, args, kwargs) -> None:
        c = self.counts[self.phase]
        with self._lock:
            c.launches += 1
            c.kernels[name] += 1
            # a tensor passed twice (an unused placeholder aliasing a real argument) is read once
            seen = {(t.data_ptr(), span_bytes(t)) for t in _tensors((args, kwargs))}
            c.kernel_bytes += sum(b for _, b in seen)


def _custom_opdef(func):
    """The CustomOpDef of a custom op defined with ``torch.library`` (fastvq's or any other: syncprobe Y1, a
    user's op booked as one read and one write hid its body), else None."""
    from torch._library.custom_ops import _maybe_get_opdef

    return _maybe_get_opdef(func)


_ACTIVE: list[TrafficMeter] = []


def _patch_launchers():
    """Wrap Triton's launch entry points so the active meters book each launch (every meter of
    a nested ``metering()`` once, as each sees the block's aten ops); returns an undo. Called by
    the outermost block only (syncprobe Y4: a nested one wrapped the wrapper, booked each launch
    twice to the inner meter and none to the outer)."""
    import triton.runtime.jit as jit

    targets = [jit.JITFunction]
    try:
        from triton.runtime.interpreter import InterpretedFunction

        targets.append(InterpretedFunction)
    except ImportError:  # pragma: no cover
        pass
    saved = []
    for cls in targets:
        real = cls.__dict__["run"]

        def run(self, *args, _real=real, **kwargs):
            if not _ACTIVE or kwargs.get("warmup"):
                return _real(self, *args, **kwargs)
            for meter in list(_ACTIVE):
                meter._launch(getattr(self, "__name__", type(self).__name__), args, kwargs)
            with _disable_current_modes():  # the interpreter's host copies are not glue
                return _real(self, *args, **kwargs)

        cls.run = run
        saved.append((cls, real))

    def undo():
        for cls, real in saved:
            cls.run = real

    return undo


def _patch_host_reads():
    """``Tensor.tolist`` / ``Tensor.numpy`` of a CPU tensor dispatch no aten op (on CUDA they copy
    to the host, which the meter sees): book each as a host sync to the active meters
    (syncprobe Y2, claimprobe K7). Returns an undo; called by the outermost block only."""
    # A wrapper already in place (one that outlived its block: a monkeypatch entered before a
    # meter and undone after it restores the meter's wrapper) is kept, not wrapped again: each
    # read books once.
    saved = {name: torch.Tensor.__dict__.get(name) for name in ("tolist", "numpy")
             if not getattr(getattr(torch.Tensor, name), "_fastvq_host_read", False)}

    def wrap(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if _ACTIVE and self.device.type == "cpu":
                for meter in list(_ACTIVE):
                    c = meter.counts[meter.phase]
                    with meter._lock:
                        c.syncs += 1
                        c.sync_ops[name] += 1
            return real(self, *args, **kwargs)

        read._fastvq_host_read = True
        return read

    for name in saved:
        setattr(torch.Tensor, name, wrap(name))

    def undo():
        for name, real in saved.items():
            if real is None:
                delattr(torch.Tensor, name)
            else:
                setattr(torch.Tensor, name, real)

    return undo


@contextlib.contextmanager
def metering():
    """``with metering() as meter:`` counts every aten op and Triton launch of the block. Only the
    outermost block patches the launchers and host reads; the patches book to every active meter."""
    meter = TrafficMeter()
    undos = [_patch_launchers(), _patch_host_reads()] if not _ACTIVE else []
    _ACTIVE.append(meter)
    try:
        with meter:
            yield meter
    finally:
        _ACTIVE.pop()
        for undo in reversed(undos):
            undo()


@dataclasses.dataclass
class Traffic:
    """Counts of one measured call, in passes over ``unit_bytes`` (see the module docstring)."""

    unit_bytes: int
    phases: dict  # phase -> PhaseCounts

    def _sum(self, field_name, phases=None):
        return sum(getattr(c, field_name) for p, c in self.phases.items() if phases is None or p in phases)

    def glue(self, *phases) -> float:
        return self._sum("glue_bytes", phases or None) / self.unit_bytes

    @property
    def glue_passes(self) -> float:
        return self.glue()

    @property
    def kernel_passes(self) -> float:
        return self._sum("kernel_bytes") / self.unit_bytes

    @property
    def total_passes(self) -> float:
        return self.glue_passes + self.kernel_passes

    @property
    def launches(self) -> int:
        return self._sum("launches")

    @property
    def syncs(self) -> int:
        return self._sum("syncs")

    @property
    def largest_alloc(self) -> int:
        return max((c.largest_alloc for c in self.phases.values()), default=0)

    def sync_ops(self) -> Counter:
        out = Counter()
        for c in self.phases.values():
            out.update(c.sync_ops)
        return out

    def top_glue(self, n: int = 8) -> list:
        out = Counter()
        for c in self.phases.values():
            out.update(c.glue_ops)
        return [(op, round(b / self.unit_bytes, 3)) for op, b in out.most_common(n)]

    def kernels(self) -> Counter:
        out = Counter()
        for c in self.phases.values():
            out.update(c.kernels)
        return out

    def as_dict(self) -> dict:
        return {
            "glue_passes": round(self.glue_passes, 3),
            "glue_fwd": round(self.glue("fwd"), 3),
            "glue_bwd": round(self.glue("bwd"), 3),
            "kernel_passes": round(self.kernel_passes, 3),
            "total_passes": round(self.total_passes, 3),
            "launches": self.launches,
            "syncs": self.syncs,
            "sync_ops": dict(self.sync_ops()),
            "kernels": dict(self.kernels()),
            "largest_alloc_elements": self.largest_alloc,
            "top_glue_ops": self.top_glue(),
        }


def measure(step: Callable[[TrafficMeter | None], object], unit_bytes: int, warmup: int = 1) -> Traffic:
    """Run ``step(meter)`` ``warmup`` times unmetered (``meter=None``), then once metered.

    ``step`` sets ``meter.phase = "bwd"`` before its backward (when ``meter`` is not None);
    everything before that is booked to ``"fwd"``.
    """
    for _ in range(warmup):
        step(None)
    with metering() as meter:
        step(meter)
    return Traffic(unit_bytes=unit_bytes, phases=dict(meter.counts))


# ==================================================================================== cases
N, D = 4096, 64  # the shape: fp32, 4096 rows of 64


def _gen(seed):
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def _randn(*shape, device, seed, scale=1.0, requires_grad=False):
    t = (torch.randn(*shape, generator=_gen(seed)) * scale).to(device)
    return t.requires_grad_(requires_grad)


def _set_phase(meter, phase):
    if meter is not None:
        meter.phase = phase


def _module_step(module, x, upstream, loss_weights=(1.0, 1.0)):
    """A training step of a quantizer: forward (with its codebook update), then backward of
    ``(quantized * upstream).sum() + w_c * commitment + w_e * embedding`` given as gradients
    (the user's loss arithmetic is not the module's traffic)."""

    def step(meter):
        module.zero_grad(set_to_none=True)
        x.grad = None
        quantized, commit, emb, _ = module(x)
        _set_phase(meter, "bwd")
        outs, grads = [quantized], [upstream]
        for loss, w in zip((commit, emb), loss_weights):
            if loss.requires_grad:
                outs.append(loss)
                grads.append(torch.full_like(loss, w))
        torch.autograd.backward(outs, grads)

    return step


@dataclasses.dataclass
class TrafficCase:
    """One row: ``build(device, scale)`` -> ``(step, unit_bytes)``. ``scale`` divides the row
    count and the codebook sizes alike (module rows), so the pass counts stay those of the named
    shape while the interpreter runs ``scale`` (or ``scale**2``) times less work."""

    name: str
    kind: str  # "module" or "op"
    build: Callable[[str, int], tuple]
    note: str = ""


def _vq_case(name, **kwargs):
    def build(device, s):
        from ..nn import VectorQuantizer

        torch.manual_seed(0)
        vq = VectorQuantizer(512 // s, D, **kwargs).to(device).train()
        x = _randn(N // s, D, device=device, seed=1, requires_grad=True)
        g = _randn(N // s, D, device=device, seed=2)
        return _module_step(vq, x, g, (0.25, 1.0)), x.numel() * x.element_size()

    return TrafficCase(name, "module", build)


def _rq_case(name, levels, **kwargs):
    def build(device, s):
        from ..nn import ResidualQuantizer

        torch.manual_seed(0)
        rq = ResidualQuantizer(levels, 256 // s, D, **kwargs).to(device).train()
        x = _randn(N // s, D, device=device, seed=1, requires_grad=True)
        g = _randn(N // s, D, device=device, seed=2)
        return _module_step(rq, x, g, (0.25, 1.0)), x.numel() * x.element_size()

    return TrafficCase(name, "module", build)


def _rqvae_case(name):
    def build(device, s):
        from ..nn import RQVAE

        torch.manual_seed(0)
        model = RQVAE(768, 512, D, num_quantizers=3, num_embeddings=256 // s).to(device).train()
        features = _randn(N // s, 768, device=device, seed=1)
        with torch.no_grad():
            latent = model.encoder(features)
        latent.requires_grad_(True)
        g = _randn(N // s, D, device=device, seed=2, scale=1e-3)
        return (_module_step(model.quantizer, latent, g, (model.commitment_cost, 1.0)),
                latent.numel() * latent.element_size())

    return TrafficCase(name, "module", build)


def _bitcodes_case(name):
    def build(device, s):
        from ..nn import Bitcodes

        torch.manual_seed(0)
        model = Bitcodes(D, 16, 1.0).to(device).train()
        x = _randn(N // s, D, device=device, seed=1, requires_grad=True)
        g = _randn(N // s, D, device=device, seed=2)

        def step(meter):
            model.zero_grad(set_to_none=True)
            x.grad = None
            y, _ = model(x)
            _set_phase(meter, "bwd")
            y.backward(g)

        return step, x.numel() * x.element_size()

    return TrafficCase(name, "module", build)


def _qr_embedding_case(name):
    def build(device, s):
        from ..nn import QREmbedding

        torch.manual_seed(0)
        rows = 1_000_000 // (s * s)  # tables of sqrt(rows) rows: their size scales like the ids
        emb = QREmbedding(rows, 32).to(device).train()
        ids = torch.randint(0, rows, (N // s,), generator=_gen(1)).to(device)
        g = _randn(N // s, 32, device=device, seed=2)

        def step(meter):
            emb.zero_grad(set_to_none=True)
            out = emb(ids)
            _set_phase(meter, "bwd")
            out.backward(g)

        return step, g.numel() * g.element_size()

    return TrafficCase(name, "module", build)


def _op_case(name, make, call, unit, backward=None):
    """``make(device, s)`` -> inputs; ``call(*inputs)`` -> output(s); ``unit(*inputs)`` -> bytes;
    ``backward(out, *inputs)`` runs the backward when given."""

    def build(device, s):
        inputs = make(device, s)

        def step(meter):
            for t in inputs:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.grad = None
            out = call(*inputs)
            if backward is not None:
                _set_phase(meter, "bwd")
                backward(out, *inputs)

        return step, unit(*inputs)

    return TrafficCase(name, "op", build)


def _nbytes(t):
    return t.numel() * t.element_size()


def op_cases() -> list[TrafficCase]:
    """Each op's forward (and backward where it has one). The pairwise ops (B x B work) run at
    B = 256 whatever the scale."""
    import torch.nn.functional as F

    import fastvq

    def nc(dev, s):
        return _randn(N // s, D, device=dev, seed=1), _randn(512 // s, D, device=dev, seed=2)

    def ps(dev, s):
        return _randn(256, D, device=dev, seed=1), _randn(256, D, device=dev, seed=2)

    def mn(dev, s):
        return (_randn(256, D, device=dev, seed=1), _randn(256, D, device=dev, seed=2),
                _randn(512, D, device=dev, seed=3))

    def rq(dev, s):
        return (_randn(N // s, D, device=dev, seed=1, requires_grad=True),
                _randn(8, 256 // s, D, device=dev, seed=2, scale=0.35), _randn(N // s, D, device=dev, seed=3))

    def cs(dev, s):
        k = 512 // s
        return _randn(N // s, D, device=dev, seed=1), torch.randint(0, k, (N // s,), generator=_gen(2)).to(dev), k

    def rot(dev, s):
        return (_randn(N // s, D, device=dev, seed=1, requires_grad=True), _randn(N // s, D, device=dev, seed=2),
                _randn(N // s, D, device=dev, seed=3))

    def qr(dev, s):
        rows = 1000 // s
        ids = torch.randint(0, rows * rows, (N // s,), generator=_gen(1)).to(dev)
        return (ids, _randn(rows, 32, device=dev, seed=2, requires_grad=True),
                _randn(rows, 32, device=dev, seed=3, requires_grad=True), _randn(N // s, 32, device=dev, seed=4))

    def kl(dev, s):
        pred = F.normalize(_randn(256, D, device=dev, seed=1), dim=1).requires_grad_(True)
        return pred, F.normalize(_randn(256, D, device=dev, seed=2), dim=1)

    def ints(high, *shape):
        return lambda dev, s: (torch.randint(0, high, (shape[0] // s, *shape[1:]), generator=_gen(1)).to(dev),)

    def usage(dev, s):  # the codebook size scales with N (claimprobe K1: 512 at every scale moved 5x)
        k = 512 // s
        return torch.randint(0, k, (N // s,), generator=_gen(1)).to(dev), k

    def sem(dev, s):  # 16^3 = 4096 ids for 4096 rows: v^3 = N / s keeps the share of distinct ids
        return (torch.randint(0, round(16 / s ** (1 / 3)), (N // s, 3), generator=_gen(1)).to(dev),)

    return [
        _op_case("nearest_code l2 (N=4096, D=64, K=512)", nc, lambda x, c: fastvq.nearest_code(x, c),
                 lambda x, c: _nbytes(x)),
        _op_case("topk_codes k=8 (N=4096, D=64, K=512)", nc, lambda x, c: fastvq.topk_codes(x, c, 8),
                 lambda x, c: _nbytes(x)),
        _op_case("sample_code l2 (N=4096, D=64, K=512)", nc, lambda x, c: fastvq.sample_code(x, c, 0.5, seed=0),
                 lambda x, c: _nbytes(x)),
        _op_case("pairwise_sqdist (256 x 256, D=64)", ps, fastvq.pairwise_sqdist, lambda a, b: _nbytes(a)),
        _op_case("mine_negatives semi-hard (256, M=512)", mn,
                 lambda a, p, n: fastvq.mine_negatives(a, p, n, "semi-hard"), lambda a, p, n: _nbytes(a)),
        _op_case("residual_quantize fwd+bwd (L=8, K=256)", rq, lambda x, c, g: fastvq.residual_quantize(x, c),
                 lambda x, c, g: _nbytes(x), backward=lambda out, x, c, g: out[0].backward(g)),
        _op_case("code_statistics (N=4096, K=512)", cs, fastvq.code_statistics, lambda x, i, k: _nbytes(x)),
        _op_case("rotation_trick fwd+bwd", rot, lambda e, q, g: fastvq.rotation_trick(e, q), lambda e, q, g: _nbytes(e),
                 backward=lambda out, e, q, g: out.backward(g)),
        _op_case("qr_lookup fwd+bwd (4096 ids, 1000-row tables)", qr, lambda i, q, r, g: fastvq.qr_lookup(i, q, r),
                 lambda i, q, r, g: _nbytes(g), backward=lambda out, i, q, r, g: out.backward(g)),
        _op_case("pairwise_kl_loss fwd+bwd (B=256, D=64)", kl, lambda p, t: fastvq.pairwise_kl_loss(p, t, 0.1),
                 lambda p, t: _nbytes(p), backward=lambda out, p, t: out.backward()),
        _op_case("to_bits + to_decimal (4096 x 16 bits)", ints(1 << 16, N),
                 lambda i: fastvq.to_decimal(fastvq.to_bits(i, 16)), _nbytes),
        _op_case("code_usage (N=4096, K=512)", usage, fastvq.code_usage, lambda i, k: _nbytes(i)),
        _op_case("semantic_ids (4096 x 3 codes)", sem, fastvq.semantic_ids, _nbytes),
    ]


def module_cases() -> list[TrafficCase]:
    """The training steps the issue's table tracks (fp32, N=4096, D=64)."""
    return [
        _vq_case("VectorQuantizer(512, 64) ste"),
        _vq_case("VectorQuantizer(512, 64, ema=True)", ema=True),
        _vq_case("VectorQuantizer(512, 64, grad='rotation')", grad="rotation"),
        _vq_case("VectorQuantizer(512, 64, ema, dead codes)", ema=True, dead_code_threshold=1.0),
        _vq_case("VectorQuantizer(512, 64) ste, dead codes", dead_code_threshold=1.0),
        _vq_case("VectorQuantizer(512, 64, ema, kmeans_init)", ema=True, kmeans_init=True),
        _vq_case("VectorQuantizer(512, 64, metric='cosine')", metric="cosine"),
        _rq_case("ResidualQuantizer(8, 256, 64)", 8),
        _rq_case("ResidualQuantizer(16, 256, 64)", 16),
        _rq_case("ResidualQuantizer(8, 256, 64, ema=True)", 8, ema=True),
        _rq_case("ResidualQuantizer(8, 256, 64) dead codes", 8, dead_code_threshold=1.0),
        _rq_case("ResidualQuantizer(8, 256, 64, grad='rotation')", 8, grad="rotation"),
        _rqvae_case("RQVAE quantizer (L=3, K=256, latent 64)"),
        _qr_embedding_case("QREmbedding(1M, 32), 4096 ids"),
        _bitcodes_case("Bitcodes(64, 16 bits)"),
    ]


def all_cases() -> list[TrafficCase]:
    return module_cases() + op_cases()


def find_case(name: str) -> TrafficCase:
    for case in all_cases():
        if case.name == name:
            return case
    raise KeyError(name)


MAX_SCALE = 64  # --traffic-scale's largest: the top-k row keeps k = 8 of its 512 // scale codes


def default_scale(device: str) -> int:
    """1 (the named shapes) on a GPU; 8 under the interpreter, where the full shapes take minutes."""
    return 1 if device == "cuda" else 8


def run_case(case: TrafficCase, device: str, scale: int = 1) -> Traffic:
    import fastvq

    with fastvq.backend("triton"):
        step, unit = case.build(device, scale)
        return measure(step, unit)


def format_table(results: list[tuple[TrafficCase, Traffic]]) -> str:
    head = (f"{'case':46} {'glue fwd':>8} {'glue bwd':>8} {'kernel':>7} {'total':>7} "
            f"{'launch':>6} {'syncs':>5}")
    lines = [head, "-" * len(head)]
    for case, t in results:
        lines.append(f"{case.name[:46]:46} {t.glue('fwd'):8.2f} {t.glue('bwd'):8.2f} {t.kernel_passes:7.2f} "
                     f"{t.total_passes:7.2f} {t.launches:6d} {t.syncs:5d}")
    lines.append("passes: bytes read + written / bytes of the activation (N x D input; QR: its output). glue: "
                 "torch ops outside the Triton kernels (fwd includes the codebook update); kernel: one pass per "
                 "tensor argument of each launch; syncs: host syncs (item, nonzero, unique, data-dependent "
                 "shapes, device-to-host copies).")
    return "\n".join(lines)


def _readable_traffic(path: str) -> dict | None:
    """A traffic.json's contents if it is one (a dict with a scale and a list of rows), else None."""
    try:
        with open(path) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return None
    ok = isinstance(old, dict) and "scale" in old and isinstance(old.get("rows"), list)
    return old if ok else None


def run_traffic(out_dir: str | None = None, names=None, scale: int | None = None) -> int:
    """Entry point of ``python -m fastvq bench --traffic``; returns an exit code.

    ``names``: only the cases whose name contains one of these strings. ``scale``: see
    :class:`TrafficCase` (default :func:`default_scale`)."""
    from .harness import environment

    device = "cuda" if torch.cuda.is_available() else "cpu"
    scale = default_scale(device) if scale is None else scale
    if scale > MAX_SCALE:  # (the first row it breaks ran after a minute of counting: fuzzH)
        raise UsageError(f"--traffic-scale {scale} is too large: at most {MAX_SCALE} (the top-k row keeps k = 8 of "
                         f"its 512 / scale codes)")
    every = all_cases()
    unmatched = [n for n in (names or ()) if not any(n in c.name for c in every)]
    if unmatched:
        raise UsageError(f"unknown traffic row(s) {unmatched}: with --traffic, --ops keeps the rows whose name "
                         f"contains one of its words (the timing groups of --list are other names; "
                         f"--list --traffic prints these rows): {[c.name for c in every]}")
    cases = [c for c in every if not names or any(n in c.name for n in names)]
    out_dir = out_dir or os.path.join(os.getcwd(), "benchmarks", "results")
    path = os.path.join(out_dir, "traffic.json")
    old = _readable_traffic(path) if names and os.path.exists(path) else None
    if names and os.path.exists(path) and (old is None or old.get("scale") != scale):
        # (a subset counted at another scale replaced the whole file with its rows, silently; review9)
        if old is None:
            raise UsageError(f"{path} cannot be read as a traffic.json: --ops updates the rows of one in place, and "
                             f"would replace the file with these {len(cases)} rows; count every row (no --ops), or "
                             f"--out another folder")
        raise UsageError(f"{path} was counted at --traffic-scale {old.get('scale')}: --ops updates its rows in place "
                         f"only at the same scale, and would replace the file's rows with these {len(cases)}; pass "
                         f"--traffic-scale {old.get('scale')}, count every row (no --ops), or --out another folder")
    if scale != 1:
        print(f"Counting at 1/{scale} of the named row counts and codebook sizes (about the same pass counts, "
              f"{scale}x less interpreted work); --traffic-scale 1 for the named shapes.\n")
    results = []
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.name}", file=sys.stderr, flush=True)  # (progress: ~90 s in all on a CPU)
        try:
            results.append((case, run_case(case, device, scale)))
        except ValueError as exc:  # only a size the scale took below 1 is a usage error (probe6 C2)
            if scale == 1 or "must be >= 1" not in str(exc):
                raise
            raise UsageError(f"--traffic-scale {scale} is too large for the row {case.name!r}: {exc}") from None
    print(format_table(results))
    os.makedirs(out_dir, exist_ok=True)
    env = environment()
    rows = [{"case": c.name, "kind": c.kind, **t.as_dict()} for c, t in results]
    if old is not None:  # a subset updates its rows of a file counted at the same scale
        # (the file's environment stays that of its other rows; an updated row carries its own)
        new = {r["case"]: {**r, "environment": env} for r in rows}
        kept = [r for r in old["rows"] if r.get("case") not in new]
        rows = [new.pop(r.get("case"), r) for r in old["rows"]] + list(new.values())
        env = old.get("environment", env) if kept else env  # (every row counted again: this run's)
        print(f"\n(--ops: {len(results)} row(s) updated in place, each with its own environment; the file's "
              f"other {len(rows) - len(results)} kept)")
    with open(path, "w") as f:
        json.dump({"environment": env, "scale": scale,
                   "shape": {"N": N // scale, "D": D, "dtype": "float32"}, "rows": rows},
                  f, indent=1, default=str)
    print(f"\nwrote {path}")
    return 0
