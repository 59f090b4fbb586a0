"""Input checks shared by the ops: each raises ValueError/TypeError naming the problem."""

from __future__ import annotations

import math
import numbers
import os
import sys
from typing import Callable

import numpy as np
import torch

from . import _names

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def finite_limit(dtype: torch.dtype) -> float:
    """The magnitude from which a float32 value rounds to infinity in ``dtype``: its largest
    finite value plus half an ulp (float16 65520, bfloat16 2^128 - 2^119); ``inf`` for float32
    and wider. ``|v| < finite_limit(dtype)`` is exactly "``v.to(dtype)`` is finite"."""
    fi = torch.finfo(dtype)
    if fi.bits >= 32:
        return math.inf
    return float(fi.max) + 2.0 ** math.floor(math.log2(fi.max)) * fi.eps / 2


_QUIET_DIRS = tuple(os.path.dirname(m.__file__) + os.sep for m in (torch,)) + (
    os.path.dirname(os.path.abspath(__file__)) + os.sep,)


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the calling function that names the first
    frame outside fastvq and torch (the user's line: a forward reached through ``nn.Module``
    calls, ``torch.no_grad`` wrappers and hooks)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_QUIET_DIRS):
        frame, level = frame.f_back, level + 1
    return level


def check_tensor(op: str, name: str, t, ndim: int | None = None, min_ndim: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastvq.{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.is_nested or t.layout != torch.strided:  # (torch's own errors there name internal ops)
        kind = "a nested tensor" if t.is_nested else f"layout {t.layout}"
        raise TypeError(f"fastvq.{op}: {name} must be a dense (strided) tensor, got {kind}: convert it with "
                        f".to_dense() (or .to_padded_tensor() for a nested tensor)")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"fastvq.{op}: {name} must be {ndim}-D, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(f"fastvq.{op}: {name} must have at least {min_ndim} dims, got shape {tuple(t.shape)}")


def check_no_overlap(op: str, name: str, t: torch.Tensor) -> None:
    """Refuse an in-place target whose elements may share memory (an ``expand``-ed or
    ``as_strided`` view): a kernel's programs would race on it (fuzzD D2). Sufficient test: with
    the dims of size > 1 sorted by stride, each stride exceeds the largest offset the smaller
    ones reach (torch's own in-place check refuses only stride 0)."""
    if t.numel() == 0:  # (nothing to overlap: an empty expanded view is fine; review8)
        return
    reach = 0
    for stride, size in sorted((st, sz) for sz, st in zip(t.shape, t.stride()) if sz > 1):
        if stride <= reach:
            raise ValueError(f"fastvq.{op}: {name} is updated in place, but its elements may share memory (shape "
                             f"{tuple(t.shape)}, strides {tuple(t.stride())}): pass a tensor whose elements do not "
                             f"overlap (not an .expand()-ed view; .clone() one)")
        reach += stride * (size - 1)


def check_inplace_target(op: str, name: str, t: torch.Tensor) -> None:
    """Refuse an in-place target both backends cannot write alike: overlapping elements
    (:func:`check_no_overlap`), a negative-bit view (``torch._neg_view``: the kernels write its
    storage, torch's ops its negation; fuzzL L5 gave "Expected Tensor but got None"), or an
    inference tensor outside ``torch.inference_mode()`` (torch refuses to update one; the
    Triton kernels wrote it anyway: fuzzL L4)."""
    check_no_overlap(op, name, t)
    if torch.compiler.is_compiling():  # (is_neg / is_inference do not trace; a compiled graph has neither)
        return
    if t.is_neg():
        raise ValueError(f"fastvq.{op}: {name} is updated in place, but it is a negative view "
                         f"(torch._neg_view): pass .resolve_neg() of it, or a plain tensor")
    if t.is_inference() and not torch.is_inference_mode_enabled():
        raise RuntimeError(f"fastvq.{op}: {name} is an inference tensor (created under torch.inference_mode()) "
                           f"and is updated in place outside inference mode, which torch does not allow: .clone() it "
                           f"outside inference mode first")


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"fastvq.{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_int(op: str, name: str, t: torch.Tensor) -> None:
    if t.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"fastvq.{op}: {name} must be int64 or int32, got {t.dtype}")


def check_row_weights(owner: str, name: str, w, x: torch.Tensor, shapes: tuple, x_name: str = "x",
                      float64: bool = False) -> torch.Tensor:
    """Per-row weights or a padding mask of ``x``: a dense tensor, bool (``True`` = a real row) or
    float32 / float16 / bfloat16 weights (``float64``: float64 too, taken as float32, the weights'
    dtype in the kernels), one of ``shapes``, on ``x``'s device. Returns it detached. The values
    (finite, >= 0) are checked where they are read, without a host sync."""
    check_tensor(owner, name, w)
    accepted = (*FLOAT_DTYPES, torch.float64) if float64 else FLOAT_DTYPES
    if w.dtype != torch.bool and w.dtype not in accepted:
        listed = ", ".join(str(d).removeprefix("torch.") for d in accepted)
        raise TypeError(f"fastvq.{owner}: {name} must be bool (True = a real row) or floating-point weights "
                        f"({listed}), got {w.dtype}")
    if w.shape not in shapes:
        want = " or ".join(str(tuple(s)) for s in shapes)
        raise ValueError(f"fastvq.{owner}: {name} must have shape {want} (one per row of {x_name} "
                         f"{tuple(x.shape)}), got {tuple(w.shape)}")
    check_same_device(owner, **{x_name: x, name: w})
    return (w.float() if w.dtype == torch.float64 else w).detach()


def weights_ok(w: torch.Tensor) -> torch.Tensor:
    """Elementwise: the row weight is finite and >= 0 (False for NaN). No host read."""
    return (w >= 0) & (w < math.inf)


def weights_detail(name: str, w: torch.Tensor) -> str | None:
    """The complaint about row weights ``w`` that are not all finite and >= 0 (NaN included),
    naming ``name`` and the first offenders; None when they all are. Reads ``w`` on the host:
    call it where that costs nothing (on the CPU, after a failed :func:`assert_async`, on a
    batch that reads the host anyway)."""
    bad = ~weights_ok(w)
    return f"{name} must be finite and >= 0, got {w[bad][:4].tolist()}" if bool(bad.any()) else None


def check_same_device(op: str, **tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"fastvq.{op}: tensors must be on one device, got {listed}")


def check_last_dim(op: str, name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(
            f"fastvq.{op}: feature dims differ: {name_a} has D={a.shape[-1]} (shape {tuple(a.shape)}), "
            f"{name_b} has D={b.shape[-1]} (shape {tuple(b.shape)})"
        )


def check_choice(owner: str, name: str, value, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices`` (a tuple of :mod:`fastvq._names`): ``TypeError``
    unless it is a string, ``ValueError`` naming the choices unless it is one of them."""
    if not isinstance(value, str):
        raise TypeError(f"fastvq.{owner}: {name} must be a string, one of {choices}, got {type(value).__name__} "
                        f"{value!r}")
    if value not in choices:
        raise ValueError(f"fastvq.{owner}: unknown {name} {value!r}; expected one of {choices}")
    return value


def check_metric(op: str, metric, allowed: tuple[str, ...] = _names.METRICS) -> str:
    """:func:`check_choice` of a ``metric`` (default: every search metric)."""
    return check_choice(op, "metric", metric, allowed)


def check_index_range(op: str, name: str, t: torch.Tensor, high: int, low: int = 0) -> None:
    """ValueError unless every element of ``t`` is in ``[low, high)``. Reads the values on the
    host (one sync): not for a training path (there, count the bad values on the device and
    use :func:`assert_async`). Call it inside a custom op's body: that runs eagerly even under
    torch.compile, so compiled models are checked too."""
    if t.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.aminmax(t))
    if lo < low or hi >= high:
        raise ValueError(f"fastvq.{op}: {name} must lie in [{low}, {high}), got values in [{lo}, {hi}]")


class UsageError(ValueError):
    """A command-line value ``python -m fastvq`` cannot use (an unknown name, a bad size): it
    prints the message and exits 2, as argparse does."""


def assert_async(op: str, ok: torch.Tensor, detail: Callable[[], str]) -> None:
    """Raise unless the 0-d bool tensor ``ok`` is True, without reading it on the host.

    On the CPU, ``torch._assert_async`` checks it in place (no device to wait for) and a failure
    becomes ``ValueError("fastvq.<op>: " + detail())``: ``detail`` runs only then, so it may
    read values freely. On CUDA it is an asynchronous device-side assert (what torch's own index
    ops do): nothing waits for it, and a failure is reported at the next synchronisation as a
    CUDA error (the message cannot travel from the device; ``CUDA_LAUNCH_BLOCKING=1`` locates
    it). Works inside custom op bodies, so compiled graphs are checked too.
    """
    if ok.device.type != "cpu":
        torch._assert_async(ok, f"fastvq.{op}: invalid input (run on the CPU for the details)")
        return
    try:
        torch._assert_async(ok)
    except RuntimeError:
        raise ValueError(f"fastvq.{op}: {detail()}") from None


#: Default upper bound of :func:`check_int_arg`: the largest int64, the largest size or count a
#: tensor can have (a larger one is a ``ValueError`` naming the argument, not torch's overflow).
INT64_MAX = 2**63 - 1


def check_int_arg(owner: str, name: str, value, minimum: int | None = None, maximum: int | None = INT64_MAX) -> int:
    """``value`` as a Python int, for a size or count argument of ``owner`` (the one integer
    check of every op and module).

    Accepts Python/NumPy integers and integral floats (``1e6``, ``4.0``: the caller uses the
    returned int, never ``value`` itself). ``TypeError`` for bools and non-numbers;
    ``ValueError`` for non-integral or non-finite floats and values outside ``[minimum, maximum]``
    (``maximum`` defaults to the largest int64; ``None``: no bound).
    """
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, numbers.Real)):
        raise TypeError(f"fastvq.{owner}: {name} must be an int, got {type(value).__name__} {value!r}")
    if not isinstance(value, numbers.Integral):
        if not (math.isfinite(value) and float(value).is_integer()):
            raise ValueError(f"fastvq.{owner}: {name} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"fastvq.{owner}: {name} must be >= {minimum}, got {_short(value)}")
    if maximum is not None and value > maximum:
        raise ValueError(f"fastvq.{owner}: {name} must be <= {maximum}, got {_short(value)}")
    return value


def _short(value: int) -> str:
    """``value`` for a message: in full unless it has more than 40 digits."""
    text = str(value) if value.bit_length() < 130 else None
    if text is not None and len(text) <= 40:
        return text
    return f"an int of {value.bit_length()} bits"


def check_size_product(owner: str, args: str, *shape: int) -> None:
    """``ValueError`` naming ``args`` (the arguments that set ``shape``) when a float32 tensor
    of ``shape`` would overflow torch's int64 byte count (``VectorQuantizer(2**62, 3)``)."""
    if math.prod(shape) * 4 > 2**63 - 1:
        dims = " x ".join(map(str, shape))
        raise ValueError(f"fastvq.{owner}: {args} too large: a float32 tensor of ({dims}) elements cannot exist")


def check_real_arg(
    owner: str, name: str, value, positive: bool = False, *, minimum: float | None = None,
    maximum: float | None = None, min_open: bool = False, float32: bool = False,
) -> float:
    """``value`` as a finite Python float. ``TypeError`` for bools and non-numbers; ``ValueError``
    for NaN, +-inf, ints too large for a float (``10**400``), and values outside the bounds:
    ``positive=True`` (> 0), ``minimum`` (``>=``; ``>`` with ``min_open``), ``maximum``
    (``<=``); ``float32=True``: finite in float32 too (``|value| <= 3.4028235e38``), and a
    ``> 0`` bound holds for its float32 value (above ``2**-150``, which rounds to 0), for a value
    the module later uses as a float32 scalar."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"fastvq.{owner}: {name} must be a real number, got {type(value).__name__} {value!r}")
    if positive:
        minimum, min_open = 0.0, True
    parts = ["finite in float32" if float32 else "finite"]
    low = minimum
    if minimum is not None:
        parts.append(f"{'>' if min_open else '>='} {minimum}")
        if float32 and min_open and minimum == 0:  # float32 rounds (0, 2^-150] to 0
            low = 2.0**-150
            parts[-1] += " in float32"
    if maximum is not None:
        parts.append(f"<= {maximum}")
    bound = " and ".join(parts)
    try:
        as_float = float(value)
    except OverflowError:  # an int beyond the float range
        raise ValueError(f"fastvq.{owner}: {name} must be {bound}, got {_short(int(value))}") from None
    # Comparisons joined by &, not math.isfinite and `and` (the same answers, NaN included): under
    # torch.compile the float can be a symbol (dynamic=True; a temperature that changed between
    # calls; a tensor's .item()), which a comparison can trace and math.isfinite or bool() cannot.
    ok = abs(as_float) <= (torch.finfo(torch.float32).max if float32 else sys.float_info.max)
    if minimum is not None:
        ok = ok & ((as_float > low) if min_open else (as_float >= low))
    if maximum is not None:
        ok = ok & (as_float <= maximum)
    if torch.compiler.is_compiling() and not isinstance(ok, bool):  # a symbol: checked when the graph runs
        message = f"fastvq.{owner}: {name} must be {bound}"
        torch._check_value(ok, lambda: message)
    elif not ok:  # (a constant, compiled too: torch 2.11's dynamo cannot trace _check_value on one)
        # (compiled, the value may be a symbol whose bound is known: it cannot be formatted)
        got = "" if torch.compiler.is_compiling() else f", got {value!r}"
        raise ValueError(f"fastvq.{owner}: {name} must be {bound}{got}")
    return as_float


def temperature_arg(owner: str, value, inputs: torch.Tensor, **bounds) -> tuple[float, torch.Tensor | None]:
    """A temperature as an op takes it: ``(number, None)`` for a real number, checked here with
    :func:`check_real_arg` (``bounds``); ``(nan, t)`` for a 1-element float tensor, ``t`` 0-d
    and detached, not read here: the op reads and checks it when it runs
    (:func:`read_temperature`), so under ``torch.compile`` it is a graph input, and a value
    that changes between calls compiles nothing again. Compiled, a number (a symbol once it
    has changed: torch does not specialise floats) is checked, then returned as such a float64
    tensor, so the op does not take it as a constant. A tensor that requires grad is refused
    (its gradient would be dropped), and so is a ``meta`` tensor beside ``inputs`` that hold
    data (it has no value: the op would run its shape-only implementation on real tensors and
    return uninitialised memory)."""
    if not isinstance(value, torch.Tensor):
        number = check_real_arg(owner, "temperature", value, **bounds)
        if torch.compiler.is_compiling():
            return math.nan, torch.scalar_tensor(number, dtype=torch.float64)
        return number, None
    if value.numel() != 1:
        raise ValueError(f"fastvq.{owner}: temperature must be a number or a 1-element tensor, got shape "
                         f"{tuple(value.shape)}")
    if not value.dtype.is_floating_point:
        raise TypeError(f"fastvq.{owner}: a temperature tensor must be floating point, got {value.dtype}")
    if value.requires_grad:
        raise ValueError(f"fastvq.{owner}: temperature is read as a number and gets no gradient; got a tensor that "
                         f"requires grad (pass temperature.detach() to use it as a constant)")
    if value.layout != torch.strided:
        raise TypeError(f"fastvq.{owner}: temperature must be a number or a dense tensor, got layout {value.layout}")
    if value.device.type == "meta" and inputs.device.type != "meta":
        raise ValueError(f"fastvq.{owner}: temperature is a tensor on the meta device, which holds no value, beside "
                         f"inputs on {inputs.device}; pass a number or a tensor on the CPU or the inputs' device")
    return math.nan, value.detach().reshape(())


def read_temperature(owner: str, number: float, tensor: torch.Tensor | None, **bounds) -> float:
    """The temperature an op runs with (see :func:`temperature_arg`): ``number``, or the value of
    ``tensor`` read on the host (a CPU tensor costs no device sync; a CUDA one does) and checked
    as a number would be."""
    if tensor is None:
        return number
    return check_real_arg(owner, "temperature", tensor.item(), **bounds)


#: The variable that keeps float32 on the exact dot (read by the kernels at each launch:
#: ``fastvq.kernels._common.fp32_dot_mode``, which spells it itself: kernels import nothing of fastvq).
FP32_DOT_ENV = "FASTVQ_FP32_DOT"


def check_fp32_dot_env(owner: str) -> None:
    """``$FASTVQ_FP32_DOT``, if set, is ``auto`` or ``ieee`` (case and surrounding blanks aside):
    ``ValueError`` naming the variable otherwise (the kernels read it at each launch:
    ``fastvq.kernels._common.fp32_dot_mode``)."""
    value = os.environ.get(FP32_DOT_ENV)
    if value is not None and value.strip().lower() not in ("", "auto", "ieee"):
        raise ValueError(f"fastvq.{owner}: $FASTVQ_FP32_DOT must be 'auto' or 'ieee' (exact float32 dots), "
                         f"got {value!r}")


def check_bool_arg(owner: str, name: str, value) -> bool:
    """``value`` if it is a bool (NumPy bools too); ``TypeError`` otherwise (a string is truthy)."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"fastvq.{owner}: {name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)
