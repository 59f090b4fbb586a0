"""Generated inputs for the fuzz suite.

A hypothesis strategy draws a small *description* of a tensor (:class:`TSpec`: shape, dtype,
magnitude, layout, non-finite placements, exact duplicates, a seed) and :meth:`TSpec.build`
turns it into the tensor. Drawing descriptions instead of elements keeps examples cheap, keeps
the falsifying example printed by hypothesis short and replayable
(``TSpec(...).build(device)``), and still shrinks (smaller shapes, fewer specials, magnitude
towards 1).

Magnitudes are drawn per tensor as a power of ten (``log10``) and optionally spread over the
rows (``spread`` decades, row ``i`` scaled by ``10**(log10 - spread * u_i)``), across the
range each dtype holds: fp32/bf16 ``1e-30 .. 1e30``, fp16 ``1e-7 .. 1.5e4`` (values clamped
to 65504, the fp16 maximum).
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch
from hypothesis import HealthCheck, Phase, settings
from hypothesis import strategies as st

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Inputs are generated on the host, so that the same example has the same values on every
# device; tests move them to the ``device`` fixture's device.
HOST = torch.device("cpu")


def host_generator(seed: int) -> torch.Generator:
    """A seeded generator on the host (where every fuzz input is drawn)."""
    return torch.Generator(device=HOST).manual_seed(int(seed))
FP16_MAX = 65504.0

# Decades drawn for each dtype (sampled_from shrinks towards the first entry, 0).
LOG10_MAGNITUDES = {
    torch.float32: (0, -3, 3, -10, 10, -18, 18, 19, 20, -20, 25, -25, 30, -30),
    torch.bfloat16: (0, -3, 3, -10, 10, 19, 20, -20, 30, -30),
    torch.float16: (0, -2, 2, 4, -4, -7),
}

LAYOUTS = ("contiguous", "strided", "transposed", "expanded")
SPECIALS = ("nan", "inf", "-inf", "zero-row", "max", "-max")
FINITE_SPECIALS = ("zero-row", "max", "-max")
NONFINITE_SPECIALS = ("nan", "inf", "-inf")


def fuzz_settings(max_examples: int, **kw):
    """Hypothesis settings of every fuzz property: derandomized (the same examples on every
    run and machine), no example database, no deadline (the Triton interpreter is slow and
    its first call per kernel compiles nothing but still warms caches).

    ``FASTVQ_FUZZ_SCALE`` multiplies every property's example count (default 1; a longer local
    run: ``FASTVQ_FUZZ_SCALE=10``). Shrinking is off by default so that a failing property
    costs one failing example, not hundreds of shrink steps under the interpreter; set
    ``FASTVQ_FUZZ_SHRINK=1`` to let hypothesis shrink a failure to a minimal example.
    """
    scale = float(os.environ.get("FASTVQ_FUZZ_SCALE", "1"))
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    if os.environ.get("FASTVQ_FUZZ_SHRINK", "0") not in ("", "0"):
        phases.append(Phase.shrink)
    return settings(
        max_examples=max(1, int(round(max_examples * scale))),
        derandomize=True,
        database=None,
        deadline=None,
        phases=phases,
        print_blob=True,
        report_multiple_bugs=False,
        suppress_health_check=list(HealthCheck),
        **kw,
    )


@dataclasses.dataclass(frozen=True)
class TSpec:
    """A reproducible description of one float tensor (see the module docstring)."""

    shape: tuple
    dtype: torch.dtype = torch.float32
    log10: int = 0
    spread: int = 0
    layout: str = "contiguous"
    specials: tuple = ()  # ((flat position, "nan" | "inf" | "-inf" | "max" | "-max" | "zero-row"), ...)
    dups: tuple = ()  # ((src, dst), ...): row dst (of the last matrix) is set to a copy of row src
    ints: bool = False  # small integers (every distance exact in fp32: exact ties)
    seed: int = 0

    def build(self, device=HOST) -> torch.Tensor:
        g = host_generator(self.seed)
        shape = tuple(self.shape)
        if self.ints:
            v = torch.randint(-3, 4, shape, generator=g, device=HOST).double()
        else:
            v = torch.randn(shape, generator=g, dtype=torch.float64, device=HOST)
            if len(shape) >= 1 and math.prod(shape) > 0:
                rows = shape[0] if len(shape) >= 2 else 1
                u = torch.rand((rows,), generator=g, dtype=torch.float64, device=HOST)
                scale = torch.pow(10.0, self.log10 - self.spread * u)
                v = v * (scale.reshape((rows,) + (1,) * (len(shape) - 1)) if len(shape) >= 2 else scale)
        if self.dtype == torch.float16:
            v = v.clamp(-FP16_MAX, FP16_MAX)
        if len(shape) >= 2:  # rows of the last matrix (codes of every level of an (L, K, D) stack)
            for src, dst in self.dups:
                if src < shape[-2] and dst < shape[-2]:
                    v[..., dst, :] = v[..., src, :]
        flat = v.reshape(-1)
        for pos, kind in self.specials:
            if flat.numel() == 0:
                break
            if kind == "zero-row" and len(shape) >= 2 and shape[0] > 0:
                v[pos % shape[0]] = 0.0
            elif kind != "zero-row":
                big = float(torch.finfo(self.dtype).max)  # the largest finite value of the dtype
                flat[pos % flat.numel()] = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf,
                                            "max": big, "-max": -big}[kind]
        t = v.to(self.dtype)
        return _layout(t, self.layout).to(device)

    def __repr__(self) -> str:  # replayable: TSpec(...).build(device)
        fields = [f"shape={tuple(self.shape)}", f"dtype={self.dtype}"]
        for f in dataclasses.fields(self):
            if f.name in ("shape", "dtype"):
                continue
            val = getattr(self, f.name)
            if val != f.default:
                fields.append(f"{f.name}={val!r}")
        return "TSpec(" + ", ".join(fields) + ")"


def _layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """Same values, other strides: every ``(..., D)`` layout the ops accept."""
    if t.dim() < 2 or t.numel() == 0 or layout == "contiguous":
        return t
    if layout == "strided":  # last-dim stride 2 and a padded row stride
        big = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1] + 1)
        big[..., : 2 * t.shape[-1] : 2] = t
        return big[..., : 2 * t.shape[-1] : 2]
    if layout == "transposed":  # column-major storage
        return t.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "expanded":  # zero row stride: every row is row 0 (read-only inputs only)
        return t[..., :1, :].expand(t.shape)
    raise ValueError(layout)


# ------------------------------------------------------------------------------ strategies

dtypes = st.sampled_from(DTYPES)


@st.composite
def tspecs(draw, shape, dtype=None, *, specials=True, layouts=LAYOUTS, ints=True, dups=True,
           magnitudes=True, max_specials=3):
    """A :class:`TSpec` of the given shape (``dtype`` drawn when None). ``specials``: False,
    True (NaN/inf/largest-finite/zero rows, in a third of the draws), ``"finite"``
    (largest-finite values and zero rows) or ``"nonfinite"`` (True's, plus always one NaN or
    +-inf when the tensor is not empty)."""
    dtype = draw(dtypes) if dtype is None else dtype
    shape = tuple(shape)
    numel = math.prod(shape)
    use_ints = ints and draw(st.integers(0, 5)) == 0
    log10 = spread = 0
    if magnitudes and not use_ints:
        log10 = draw(st.sampled_from(LOG10_MAGNITUDES[dtype]))
        spread = draw(st.sampled_from((0, 0, 1, 3, 8)))
    sp = ()
    if specials and numel > 0 and draw(st.integers(0, 2)) == 0:
        n = draw(st.integers(1, max_specials))
        sp = tuple(
            (draw(st.integers(0, numel - 1)), draw(st.sampled_from(FINITE_SPECIALS if specials == "finite" else SPECIALS)))
            for _ in range(n)
        )
    dp = ()
    if dups and len(shape) >= 2 and shape[-2] >= 2 and draw(st.booleans()):
        src = draw(st.integers(0, shape[-2] - 2))
        dst = draw(st.integers(src + 1, shape[-2] - 1))
        dp = ((src, dst),)
    layout = draw(st.sampled_from(layouts)) if len(shape) >= 2 else "contiguous"
    if specials == "nonfinite" and numel > 0:
        # one NaN or +-inf, applied last (a later "max" or zero row at its place overwrote it), in
        # row 0 of its matrix under the "expanded" layout (which repeats row 0): 481 of 3000
        # "nonfinite" tensors held none before (review13)
        pos = draw(st.integers(0, numel - 1))
        if layout == "expanded":
            rows_d = shape[-2] * shape[-1]
            pos = pos // rows_d * rows_d + pos % shape[-1]
        sp += ((pos, draw(st.sampled_from(NONFINITE_SPECIALS))),)
    seed = draw(st.integers(0, 2**16))
    return TSpec(shape, dtype, log10, spread, layout, sp, dp, use_ints, seed)


def special_kinds(draw, nonfinite: bool, n: int) -> list:
    """``specials=`` for the ``n`` inputs of a case: ``"finite"`` for each without ``nonfinite``;
    with it, True for each and ``"nonfinite"`` for one of them, drawn, so every example holds a
    NaN or an infinity unless that input is empty (with True alone a third of the inputs had any
    special and half of those were finite ones: 1 of 12 rotation examples had an inf, none a
    NaN; taudit F2)."""
    if not nonfinite:
        return ["finite"] * n
    kinds = [True] * n
    kinds[draw(st.integers(0, n - 1))] = "nonfinite"
    return kinds


def sizes(lo=0, hi=9, extra=()):
    """Small sizes, with odd/prime extras mixed in; shrinks towards ``lo``."""
    if extra:
        return st.one_of(st.integers(lo, hi), st.sampled_from(extra))
    return st.integers(lo, hi)
