"""Tolerances derived from floating-point error analysis, for parity tests of low-precision kernels.

This is the one tolerance module of fastvq: its own tests, ``python -m fastvq check`` and your
parity tests use the same criteria. It needs only torch (no pytest).

How a result is judged
----------------------
Compute the expected value in **float64 on the same rounded inputs** the kernel saw (``x.double()``
of the bf16/fp16/fp32 tensors you passed, not of the values before they were rounded). The only
differences left are then the kernel's own roundings, bounded elementwise by::

    bound = FACTOR * (e_ops + gamma(n, u_acc) * (1 + e_ops)) * magnitude   # operand rounding, accumulation
          + OUTPUT_ROUNDING * unit_roundoff(out_dtype) * |expected|       # the store in the output dtype
          + tiny                                                          # underflow (subnormal spacing)

* ``u = unit_roundoff(dtype)``: 2^-53 float64, 2^-24 float32, 2^-11 float16 and tf32 operands,
  2^-8 bfloat16 (:data:`UNIT_ROUNDOFF`).
* ``gamma(n, u) = n u / (1 - n u)``, ``n`` the reduction length (``reduce_len``), ``u_acc`` the
  accumulator's unit roundoff: float32 for every fastvq kernel (they load, upcast and accumulate
  in fp32), float64 for float64. ``magnitude`` is the sum of ``|terms|`` of the reduction; it
  defaults to ``|expected|``, which is right only when no cancellation occurs (pass it for dot
  products and differences).
* ``e_ops``: rounding of the operands inside the kernel. 0 for fp16/bf16 operands (their products
  are exact in fp32) and for fp32 with ``precision="ieee"`` (the product rounding is part of
  ``gamma``); ``2 u_tf32 + u_tf32^2`` for ``precision="tf32"`` (both operands rounded to 11 bits);
  ``3 * 2^-22`` for ``precision="tf32x3"`` (each fp32 operand split into two tf32 parts, three
  exact products: fastvq's float32 search on GPUs with TF32 tensor cores; :data:`TF32X3_ERROR`).
* ``FACTOR = 4`` (:data:`ACCUMULATION_FACTOR`): the analysis assumes round-to-nearest, which GPU
  tensor cores do not promise for their fp32 accumulation: measured on Volta to Hopper they add
  with truncation (round toward zero: x2) and align the products of a block to the largest
  exponent before adding, dropping low bits (another x2). On a CPU the factor is slack.
* ``OUTPUT_ROUNDING = 2`` (:data:`OUTPUT_ROUNDING`): a GPU store rounds to nearest (one ``u``);
  Triton 3.8's interpreter truncates float32 -> bfloat16 (up to ``2 u``).

The bound is a worst case: a correct kernel's typical error is far below it, while a wrong one
(a second-nearest code, a zero gradient, a bf16 result a few ulps off) exceeds it.

Functions
---------
=====================================  ===================================================
:func:`unit_roundoff`                  ``u`` of a dtype or of ``"tf32"``
:func:`gamma`                          ``n u / (1 - n u)``
:func:`error_bound`                    the elementwise bound above, as a float64 tensor
:func:`error_ratio`                    worst ``|actual - expected| / bound`` (<= 1 passes)
:func:`assert_close`                   raises naming the worst element, its bound and ratio
:func:`distances64`                    float64 distances with their sums of ``|terms|``
:func:`argmin_ratio`                   per-row ratio for a nearest-code choice
:func:`assert_argmin_within_bound`     every row's code within the rounding bound of the minimum
:func:`grad_ratio`                     worst ratio of a gradient's two criteria
:func:`assert_grad_nondegenerate`      non-zero where the exact gradient is, close in norm
:func:`describe`                       the table of figures, as ``python -m fastvq check`` prints it
=====================================  ===================================================

Example (a bf16 matmul-shaped kernel against float64 on the same inputs)::

    import torch, fastvq.testing as ft
    a = torch.randn(64, 256, dtype=torch.bfloat16)
    b = torch.randn(256, 32, dtype=torch.bfloat16)
    out = (a.float() @ b.float()).bfloat16()                   # stands for your kernel
    exact = a.double() @ b.double()
    ft.assert_close(out, exact, dtype=torch.bfloat16, reduce_len=256,
                    magnitude=a.double().abs() @ b.double().abs())
"""

from __future__ import annotations

import math
import numbers
from typing import Union

import torch

from ._checks import check_metric
from ._names import MODULE_METRICS

__all__ = [
    "ACCUMULATION_FACTOR", "OUTPUT_ROUNDING", "TF32X3_ERROR", "UNIT_ROUNDOFF", "unit_roundoff", "gamma", "error_bound",
    "error_ratio", "assert_close", "distances64", "argmin_ratio", "assert_argmin_within_bound", "grad_ratio",
    "assert_grad_nondegenerate", "describe", "search_precision",
]

DTypeLike = Union[torch.dtype, str]

#: Unit roundoff (half the machine epsilon) per storage/compute format: the check's table.
UNIT_ROUNDOFF = {
    torch.float64: 2.0**-53,
    torch.float32: 2.0**-24,
    "tf32": 2.0**-11,  # tf32 operands: float32 range, 10 stored mantissa bits
    torch.float16: 2.0**-11,
    torch.bfloat16: 2.0**-8,
}

#: Slack on the accumulation term for GPU tensor cores' non-round-to-nearest fp32 accumulation.
ACCUMULATION_FACTOR = 4.0
#: Units of roundoff allowed for the final store (2: the Triton 3.8 interpreter truncates to bf16).
OUTPUT_ROUNDING = 2.0

_ALIASES = {
    "float64": torch.float64, "fp64": torch.float64, "double": torch.float64,
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "ieee": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "tf32": "tf32", "tf32x3": "tf32x3",
}

#: Relative error of one float32 product computed as three TF32 products (``precision="tf32x3"``):
#: ``a = a_hi + a_lo + r_a`` with ``|r_a| <= 2^-22 |a|`` (both parts rounded to nearest), and
#: ``a_lo b_lo`` (at most ``2^-22 |a b|``) left out. (Below float32's normal range the parts keep
#: TF32's fixed spacing 2^-136: :func:`argmin_ratio` adds that floor for dot and cosine.)
TF32X3_ERROR = 3 * 2.0**-22


def _fmt(dtype: DTypeLike, precision: bool = False) -> DTypeLike:
    """The format ``dtype`` names; ``"tf32x3"`` only where a way to multiply is asked for
    (``precision=True``): it is no storage format (``ValueError`` elsewhere)."""
    if isinstance(dtype, str) and dtype.lower() == "tf32x3" and not precision:
        raise ValueError("fastvq.testing: 'tf32x3' is a way to multiply float32 operands, not a format; pass it "
                         "as precision= (its error per product is TF32X3_ERROR)")
    if isinstance(dtype, torch.dtype):
        if dtype not in UNIT_ROUNDOFF:
            raise ValueError(f"fastvq.testing: no unit roundoff for dtype {dtype}; "
                             f"expected one of float64, float32, float16, bfloat16 or 'tf32'")
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _ALIASES:
        return _ALIASES[dtype.lower()]
    raise ValueError(f"fastvq.testing: unknown precision {dtype!r}; expected a torch floating dtype "
                     f"or one of {sorted(_ALIASES)}")


def _storage_dtype(name: str, dtype: DTypeLike) -> torch.dtype:
    """The torch dtype ``dtype`` names, for an argument that is a storage format (not ``"tf32"``)."""
    fmt = _fmt(dtype)
    if not isinstance(fmt, torch.dtype):
        raise ValueError(f"fastvq.testing: {name} names the dtype values are stored in (float64, float32, float16, "
                         f"bfloat16), got {dtype!r}: a way to multiply float32 operands, error_bound's precision=")
    return fmt


def _tensor(name: str, t) -> torch.Tensor:
    """``t`` if it is a dense real tensor, else the error naming ``name`` (a gradient that never
    arrived is ``None``; a sparse one, e.g. ``QREmbedding(sparse=True)``'s, wants ``.to_dense()``)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastvq.testing: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.layout != torch.strided or t.is_nested:
        raise ValueError(f"fastvq.testing: {name} must be a dense tensor, got layout {t.layout}"
                         f"{' (nested)' if t.is_nested else ''}; pass {name}.to_dense()")
    if t.is_complex():
        raise TypeError(f"fastvq.testing: {name} must be real, got {t.dtype}")
    return t


def _nonnegative(name: str, v, positive: bool = False) -> float:
    """``v`` as a float: a real number, not NaN, at least 0 (above 0 where ``positive``); inf passes
    (an infinite bound certifies only an exact match)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"fastvq.testing: {name} must be a real number, got {type(v).__name__}")
    v = float(v)
    if math.isnan(v) or v < 0 or (positive and v == 0):
        raise ValueError(f"fastvq.testing: {name} must be {'> 0' if positive else '>= 0'}, got {v}")
    return v


def unit_roundoff(dtype: DTypeLike) -> float:
    """Unit roundoff ``u`` of a floating format: the largest relative error of one rounding.

    ``dtype``: a torch dtype (float64, float32, float16, bfloat16) or a name (``"tf32"``,
    ``"bf16"``, ``"fp16"``, ``"fp32"``, ``"ieee"`` = float32).

    >>> unit_roundoff(torch.bfloat16) == 2**-8
    True
    """
    return UNIT_ROUNDOFF[_fmt(dtype)]


def gamma(n: float, u: float) -> float:
    """Higham's ``gamma_n = n u / (1 - n u)``: relative error bound of ``n`` roundings (inf once ``n u >= 1``).

    >>> gamma(256, 2**-24) < 1.6e-5
    True
    """
    n = max(float(n), 0.0)
    nu = n * u
    return math.inf if nu >= 1.0 else nu / (1.0 - nu)


def _subnormal(dtype: torch.dtype) -> float:
    fi = torch.finfo(dtype)
    return fi.tiny * fi.eps  # smallest positive subnormal of an IEEE-like format


def _operand_error(dtype: torch.dtype, precision: DTypeLike | None) -> float:
    """Relative error of one product from rounding the operands inside the kernel."""
    if precision is None:
        return 0.0
    p = _fmt(precision, precision=True)
    if p == "tf32" and dtype == torch.float32:
        u = UNIT_ROUNDOFF["tf32"]
        return 2 * u + u * u
    if p == "tf32x3" and dtype == torch.float32:
        return TF32X3_ERROR
    if isinstance(p, torch.dtype) and p != dtype and UNIT_ROUNDOFF[p] > UNIT_ROUNDOFF[dtype]:
        u = UNIT_ROUNDOFF[p]  # operands rounded to a narrower format than they are stored in
        return 2 * u + u * u
    return 0.0


def _as_tensor(v, like: torch.Tensor) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach().to(device=like.device, dtype=torch.float64)
    return torch.full((), float(v), dtype=torch.float64, device=like.device)


def error_bound(expected: torch.Tensor, *, dtype: torch.dtype, reduce_len: float | list = 1,
                magnitude: torch.Tensor | float | list | None = None, precision: DTypeLike | None = None,
                out_dtype: torch.dtype | None = None, accumulate: torch.dtype | None = None,
                factor: float = ACCUMULATION_FACTOR) -> torch.Tensor:
    """Elementwise bound on ``|kernel result - expected|``, float64, shaped like ``expected``.

    Args:
        expected: the float64 result on the same rounded inputs (any shape).
        dtype: the dtype of the kernel's operands (float32, float16, bfloat16, float64).
        reduce_len: the length ``n`` of the longest chain of additions behind one element
            (D for a dot product over D features; 1 for an elementwise op). A list of lengths
            (with a list of magnitudes) sums one such term per error source, e.g. a dot product
            of length D feeding a softmax over B terms: ``reduce_len=[D, B]``.
        magnitude: sum of ``|terms|`` of that reduction, broadcastable to ``expected``
            (default ``|expected|``); a list when ``reduce_len`` is one.
        precision: how fp32 operands are multiplied: ``None``/``"ieee"`` exactly rounded,
            ``"tf32"`` with both operands rounded to tf32 first, ``"tf32x3"`` as three tf32
            products of the operands' two-part splits (:data:`TF32X3_ERROR` per product).
        out_dtype: dtype the result is stored in (default ``dtype``).
        accumulate: accumulator dtype (default float32; float64 when ``dtype`` is float64).
        factor: slack on the accumulation term (default :data:`ACCUMULATION_FACTOR`).

    Not differentiable (a criterion, not a loss).
    """
    expected = _tensor("expected", expected)
    dtype = _storage_dtype("dtype", dtype)
    out_dtype = _storage_dtype("out_dtype", out_dtype) if out_dtype is not None else dtype
    factor = _nonnegative("factor", factor, positive=True)
    for n in (reduce_len if isinstance(reduce_len, (list, tuple)) else [reduce_len]):
        _nonnegative("reduce_len", n)
    acc = _fmt(accumulate) if accumulate is not None else (torch.float64 if dtype == torch.float64 else torch.float32)
    exp = expected.detach().to(torch.float64)
    e_ops = _operand_error(dtype, precision)
    if isinstance(reduce_len, (list, tuple)):  # several error sources: sum of their terms
        mags = magnitude if isinstance(magnitude, (list, tuple)) else None
        if mags is None or len(mags) != len(reduce_len):
            raise ValueError("fastvq.testing: with a list of reduce_len, magnitude must be a list of the same length "
                             f"(got {len(reduce_len)} lengths and {magnitude!r})")
        terms = list(zip(reduce_len, mags))
    else:
        terms = [(reduce_len, magnitude)]
    total = torch.zeros_like(exp)
    for n, m in terms:
        mag = exp.abs() if m is None else _as_tensor(m, exp).abs()
        total = total + (e_ops + gamma(n, UNIT_ROUNDOFF[acc]) * (1.0 + e_ops)) * mag
    longest = max(max(float(n), 1.0) for n, _ in terms)
    tiny = _subnormal(out_dtype) + longest * _subnormal(acc)
    return factor * total + OUTPUT_ROUNDING * UNIT_ROUNDOFF[out_dtype] * exp.abs() + tiny


def _overflows(exp: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Where ``exp`` rounds to +-inf in ``out_dtype``: from the midpoint between its largest
    value and the next power of two on (``max`` + half an ulp: a tie rounds to the even
    neighbour, which is inf, ``max`` having an odd significand)."""
    fi = torch.finfo(out_dtype)
    half_ulp = math.ldexp(fi.eps / 2, math.frexp(fi.max)[1] - 1)  # 2^103 float32, 2^119 bf16, 16 fp16
    return exp.abs() >= fi.max + half_ulp


def _errors(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor, out_dtype: torch.dtype):
    """(ratio per element, human note per special case) with NaN/inf semantics folded in."""
    act = actual.detach().to(torch.float64)
    exp = expected.detach().to(device=act.device, dtype=torch.float64)
    act, exp, bound = torch.broadcast_tensors(act, exp, bound.to(act.device))
    err = (act - exp).abs()
    ratio = err / bound
    ratio = torch.where((err == 0), torch.zeros_like(ratio), ratio)
    # NaN expected: NaN required. inf (or overflow of the output dtype) expected: that inf required.
    nan_exp = exp.isnan()
    inf_exp = exp.isinf() | (_overflows(exp, out_dtype) & exp.isfinite())
    want_inf = torch.where(exp > 0, math.inf, -math.inf)
    ok_special = torch.where(nan_exp, act.isnan(), act == want_inf)
    # an overflowing expected value may also come out as the largest finite value within bound
    ok_special = ok_special | (~nan_exp & ~exp.isinf() & (ratio <= 1) & bound.isfinite())
    ratio = torch.where(nan_exp | inf_exp, torch.where(ok_special, 0.0, math.inf), ratio)
    ratio = torch.where(~nan_exp & act.isnan(), math.inf, ratio)  # a made-up NaN always fails
    # a bound that is NaN or inf (a magnitude computed from inputs holding inf: inf * 0, inf * c)
    # certifies nothing for a finite expected value but an exact match
    ratio = torch.where(ratio.isnan(), math.inf, ratio)
    ratio = torch.where(~nan_exp & ~inf_exp & (err > 0) & ~bound.isfinite(), math.inf, ratio)
    return ratio, act, exp


def error_ratio(actual: torch.Tensor, expected: torch.Tensor, **bound_kwargs) -> float:
    """Worst ``|actual - expected| / error_bound(expected, **bound_kwargs)`` (0 when empty; <= 1 passes).

    NaN expected requires NaN; an infinite expected value requires that infinity; a finite one
    that overflows the output dtype requires that infinity too, or the dtype's largest finite
    value of its sign where that is within the bound (a long sum whose exact value lies just
    beyond the range may round below it: ``reduce_len=1000`` admits ``max`` for ``3.403e38`` in
    float32, ``reduce_len=1`` does not); a NaN where a number is expected gives ``inf``.
    """
    actual, expected = _tensor("actual", actual), _tensor("expected", expected)
    if actual.shape != expected.shape:
        raise ValueError(f"fastvq.testing: actual shape {tuple(actual.shape)} != expected shape {tuple(expected.shape)}")
    bound = error_bound(expected, **bound_kwargs)
    out_dtype = _fmt(bound_kwargs.get("out_dtype") or bound_kwargs["dtype"])
    ratio, _, _ = _errors(actual, expected, bound, out_dtype)
    return float(ratio.max()) if ratio.numel() else 0.0


def _where(flat_index: int, shape) -> tuple:
    return tuple(int(i) for i in torch.unravel_index(torch.tensor(flat_index), tuple(shape))) if len(shape) else ()


def assert_close(actual: torch.Tensor, expected64: torch.Tensor, *, dtype: torch.dtype, reduce_len: float | list = 1,
                 magnitude: torch.Tensor | float | list | None = None, precision: DTypeLike | None = None,
                 out_dtype: torch.dtype | None = None, accumulate: torch.dtype | None = None,
                 factor: float = ACCUMULATION_FACTOR, name: str = "") -> None:
    """Raise ``AssertionError`` unless every element of ``actual`` is within :func:`error_bound`.

    ``actual``: the kernel's result (any float dtype); ``expected64``: float64 on the same rounded
    inputs, same shape. The other arguments are :func:`error_bound`'s. The message names how many
    elements fail, the worst one (index, actual, expected, error), its bound and the ratio.

    >>> x = torch.randn(10, 3, dtype=torch.bfloat16)
    >>> assert_close(x.sum(1, dtype=torch.float32).bfloat16(), x.double().sum(1), dtype=torch.bfloat16,
    ...              reduce_len=3, magnitude=x.double().abs().sum(1))
    """
    actual, expected64 = _tensor("actual", actual), _tensor("expected64", expected64)
    if actual.shape != expected64.shape:
        raise AssertionError(f"{name or 'fastvq.testing.assert_close'}: shape {tuple(actual.shape)} "
                             f"!= expected {tuple(expected64.shape)}")
    bound = error_bound(expected64, dtype=dtype, reduce_len=reduce_len, magnitude=magnitude, precision=precision,
                        out_dtype=out_dtype, accumulate=accumulate, factor=factor)
    ratio, act, exp = _errors(actual, expected64, bound, _fmt(out_dtype) if out_dtype is not None else _fmt(dtype))
    if ratio.numel() == 0 or not (ratio > 1).any():
        return
    bad = int((ratio > 1).sum())
    flat = ratio.reshape(-1)
    worst = int(torch.where(flat.isnan(), math.inf, flat).argmax())
    b = torch.broadcast_to(bound.to(act.device), act.shape).reshape(-1)[worst]
    a, e = act.reshape(-1)[worst], exp.reshape(-1)[worst]
    prec = f", precision {precision}" if precision is not None else ""
    raise AssertionError(
        f"{name or 'fastvq.testing.assert_close'}: {bad} of {ratio.numel()} elements exceed their rounding bound "
        f"(dtype {str(_fmt(dtype)).replace('torch.', '')}, reduce_len {reduce_len}{prec}, factor {factor:g}); "
        f"worst at index {_where(worst, act.shape)}: actual {float(a):.9g}, expected {float(e):.9g}, "
        f"|error| {float((a - e).abs()):.3g}, bound {float(b):.3g}, ratio {float(flat[worst]):.3g}"
    )


# --------------------------------------------------------------------------- argmin


def _check_search_args(x, codebook, metric: str) -> None:
    """ValueError / TypeError naming what is wrong with a search's ``x (..., D)``, ``codebook
    (K, D)`` and ``metric`` (torch's own errors named none; fuzzH)."""
    for name, t in (("x", x), ("codebook", codebook)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"fastvq.testing: {name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() < 1:
        raise ValueError("fastvq.testing: x must be (..., D), got a 0-d tensor")
    if codebook.dim() != 2 or codebook.shape[1] != x.shape[-1]:
        raise ValueError(f"fastvq.testing: codebook must be (K, D) with x's D = {x.shape[-1]}, got shape "
                         f"{tuple(codebook.shape)}")
    check_metric("testing", metric, MODULE_METRICS)


def distances64(x: torch.Tensor, codebook: torch.Tensor, metric: str):
    """Float64 ``(distances (N, K), sum of |terms| (N, K), reduction length)`` of rows ``x`` ``(N, D)``
    to every code of ``codebook`` ``(K, D)``: l2 ``|x|^2 - 2 x.c + |c|^2`` (n = D + 2; formed as
    ``sum (x - c)^2`` where the expansion cancels, near a code), cosine
    ``1 - x.c / (|x||c|)`` (0 for a zero vector's cosine; n = 2D + 8), dot ``-x.c`` (n = D). The
    magnitudes are what :func:`error_bound` needs for a kernel's fp32 distances. ``x`` may be
    ``(..., D)``: the distances and magnitudes are then ``(..., K)``."""
    _check_search_args(x, codebook, metric)
    lead = x.shape[:-1]
    # (explicit row count: reshape(-1, 0) is ambiguous at D = 0; review10)
    d, mag, n = _distances64_rows(x.reshape(math.prod(lead), x.shape[-1]), codebook, metric)
    return d.reshape(*lead, d.shape[-1]), mag.reshape(*lead, mag.shape[-1]), n


def _distances64_rows(x: torch.Tensor, codebook: torch.Tensor, metric: str):
    """:func:`distances64` of rows ``x (N, D)``."""
    x64, c64 = x.detach().double(), codebook.detach().double()
    ax, ac = x64.abs(), c64.abs()
    D = x64.shape[-1]
    xc, axc = x64 @ c64.T, ax @ ac.T
    if metric == "l2":
        xx, cc = (x64 * x64).sum(-1, keepdim=True), (c64 * c64).sum(-1)[None, :]
        d, mag = xx - 2 * xc + cc, xx + 2 * axc + cc
        # The expansion cancels near a code (a row equal to a code gave 1e46 at |x| ~ 1e30, not 0;
        # fuzzH): where it lost more than 20 of float64's bits, the distance is formed directly.
        near = (d.abs() <= 2.0**-20 * mag) & mag.isfinite()
        if bool(near.any()):
            rows, codes = near.nonzero(as_tuple=True)
            step = max(1, 2**22 // max(D, 1))
            for a in range(0, rows.numel(), step):
                i, j = rows[a : a + step], codes[a : a + step]
                d[i, j] = (x64[i] - c64[j]).square().sum(-1)
        return d, mag, D + 2
    if metric == "dot":
        return -xc, axc, D
    if metric == "cosine":
        nx, nc = x64.norm(dim=-1, keepdim=True), c64.norm(dim=-1)[None, :]
        inv = torch.where(nx > 0, 1 / nx, 0.0) * torch.where(nc > 0, 1 / nc, 0.0)
        # dot (D terms) plus both norms (D terms and a square root each) plus scaling: 2D + 8 roundings
        return 1.0 - xc * inv, axc * inv, 2 * D + 8
    raise AssertionError(f"fastvq.testing: metric {metric!r} passed check_metric")  # (checked by the caller)


def search_precision(dtype: torch.dtype):
    """The ``precision=`` that bounds fastvq's own distance kernels (the searches, residual
    quantization, ``pairwise_sqdist``) on ``dtype`` operands: float32 as three TF32 products of
    split operands (``"tf32x3"``; its bound covers the exact
    dot that GPUs without TF32 and ``$FASTVQ_FP32_DOT=ieee`` run), 16-bit operands multiply
    exactly (``None``).

    >>> search_precision(torch.float32), search_precision(torch.bfloat16)
    ('tf32x3', None)
    """
    return "tf32x3" if dtype == torch.float32 else None


def _scaling_floor(x2: torch.Tensor, codebook: torch.Tensor, metric: str, unit: float) -> torch.Tensor:
    """The absolute floor of dot and cosine scores taken on power-of-two scaled operands, ``(N, K)``
    float64: a row scaled to ``[1, 2)`` (unit ``2^e <= max|x|``), a code as it is (unit 1) or, in a
    codebook outside ``[2^-20, 2^20]``, scaled to its own ``[1, 2)`` (unit ``<= max|c|``), each
    entry of an operand, and each product, is kept only down to ``unit`` of the operands' units.
    TF32's spacing below float32's normal range is 2^-136: an entry of a split ("tf32x3") or
    rounded ("tf32") operand loses up to 2^-137 (``unit = 2^-136``); a scaled bfloat16 entry below
    2^-133 is flushed to 0 (``unit = 2^-132``); float32 and float16 products below 2^-149
    (``unit = 2^-148``). The row ``[3e38, 1e-20]`` scores codes ``[0, -1]`` and ``[0, 1]`` alike
    (fuzzA). Per product at most ``unit max|x| max(1, max|c|)``: no relative bound covers it for
    entries ~2^126 below their row's largest (l2's ``|c|^2`` term dwarfs it)."""
    x64, c64 = x2.detach().double(), codebook.detach().double()
    n = x64.shape[-1]
    xm = x64.abs().amax(-1, keepdim=True) if n else x64.new_zeros((x64.shape[0], 1))
    cm = (c64.abs().amax(-1) if n else c64.new_zeros(c64.shape[0])).clamp_min(1.0)[None, :]
    if metric == "dot" and n and cm.numel():
        # dot scores every code of a rescaled codebook in one unit, 2^(e + bitlen(D - 1) - 124) for
        # the largest code's 2^e: a code far below it scores in float32's subnormals there, at
        # that unit's steps (fuzzJ: codes ~2^-143 beside one at 2^126, D = 17, tied apart)
        c_top = c64.abs().amax().nan_to_num(nan=0.0, posinf=0.0)
        cm = torch.maximum(cm, c_top * 2.0 ** ((n - 1).bit_length() - 123))
    floor = n * unit * xm * cm
    if metric == "cosine":
        nx, nc = x64.norm(dim=-1, keepdim=True), c64.norm(dim=-1)[None, :]
        floor = floor * torch.where(nx > 0, 1 / nx, 0.0) * torch.where(nc > 0, 1 / nc, 0.0)
    return torch.where(floor.isfinite(), floor, 0.0)


def argmin_ratio(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, metric: str = "l2",
                 precision: DTypeLike | None = None, *, factor: float = ACCUMULATION_FACTOR,
                 rounded_distance: bool = False):
    """Per-row ratio ``(d[chosen] - d_min) / allowed`` in float64; a row passes at ``<= 1``.

    ``x``: ``(N, D)`` (or ``(..., D)``), ``codebook``: ``(K, D)``, ``indices``: ``(N,)`` (or ``(...)``),
    all as the kernel saw them (``indices`` an integer tensor of shape ``x.shape[:-1]``, else a
    ``TypeError``/``ValueError``). ``d`` is the float64 distance on those inputs and ``b_k`` the
    rounding bound of the kernel's fp32 distance to code ``k`` (:func:`error_bound` with the
    reduction's sum of ``|terms|``). The kernel's choice ``j`` is consistent with rounding iff
    ``d_j - b_j <= min_k (d_k + b_k)``, so ``allowed = b_j + min_k(d_k + b_k) - d_min``. Exact
    ties (gap 0) pass either way. Rows with a NaN in ``x`` or no finite distance get 0; an index
    outside ``[0, K)`` or a non-finite chosen distance where a finite one exists gets ``inf``.
    ``rounded_distance``: the program argmins the distance itself, rounded to float32 (``1 - cos``
    for cosine, ``|x - c|^2`` with its ``|x|^2`` term): each ``b_k`` gains one unit roundoff of
    ``|d_k|`` (codes whose cosines differ below 2^-24 tie there). Off by default: fastvq's search
    scores leave the row's constant term out (``-(x.c)/|c|``, ``|c|^2 - 2 x.c``) and never round
    it in, so that allowance would pass its wrong codes (review9: cosines 1e-9 against 5e-8).

    Returns ``(ratio (N,), gap (N,), allowed (N,), d (N, K))``.
    """
    _check_search_args(x, codebook, metric)
    D = x.shape[-1]
    if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
        raise TypeError(f"fastvq.testing: indices must be an integer tensor, got {indices.dtype}")
    if indices.shape != x.shape[:-1]:
        raise ValueError(f"fastvq.testing: indices must have shape x.shape[:-1] = {tuple(x.shape[:-1])} (one per "
                         f"row of x), got {tuple(indices.shape)}")
    x2, idx = x.reshape(math.prod(x.shape[:-1]), D), indices.reshape(-1).long()
    dtype = _fmt(x.dtype)
    if precision is None:
        precision = "ieee" if dtype == torch.float32 else dtype
    d, mag, n = distances64(x2, codebook, metric)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    rel = factor * (_operand_error(dtype, precision) + gamma(n, UNIT_ROUNDOFF[acc]) * (1 + _operand_error(dtype, precision)))
    b = rel * mag + n * _subnormal(torch.float32)
    if rounded_distance:  # (one u of the computed distance: a program that argmins 1 - cos; fuzzH)
        b = b + UNIT_ROUNDOFF[acc] * d.abs()
    if metric in ("dot", "cosine") and d.numel():
        way = _fmt(precision, precision=True)
        unit = 2.0**-136 if way in ("tf32x3", "tf32") else 2.0**-132 if way == torch.bfloat16 else 2.0**-148
        b = b + _scaling_floor(x2, codebook, metric, unit)
    K = d.shape[1]
    in_range = (idx >= 0) & (idx < K)
    safe = idx.clamp(0, max(K - 1, 0))
    finite = d.isfinite()
    d_inf = torch.where(finite, d, math.inf)
    d_min = d_inf.min(1).values if K else torch.full((x2.shape[0],), math.inf, dtype=torch.float64)
    upper = torch.where(finite, d + b, math.inf).min(1).values if K else d_min
    if K:
        dj, bj = d.gather(1, safe[:, None]).squeeze(1), b.gather(1, safe[:, None]).squeeze(1)
    else:
        dj = bj = d_min
    gap = dj - d_min
    allowed = bj + (upper - d_min)
    ratio = torch.where(gap <= 0, 0.0, gap / allowed)
    skip = x2.detach().isnan().any(1) | ~d_min.isfinite()
    ratio = torch.where(skip, 0.0, ratio)
    ratio = torch.where(~skip & ~dj.isfinite(), math.inf, ratio)
    ratio = torch.where(in_range, ratio, math.inf)
    return ratio, gap, allowed, d


def assert_argmin_within_bound(x: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor, metric: str = "l2",
                               precision: DTypeLike | None = None, *, factor: float = ACCUMULATION_FACTOR,
                               name: str = "", rounded_distance: bool = False) -> None:
    """Raise unless each row's chosen code is within the rounding bound of the true minimum distance.

    For argmin under bf16/fp16/tf32 (and fp32), where near-ties may legitimately flip: row by row,
    the float64 distance of the chosen code may exceed the true minimum only by what the kernel's
    rounding can explain (:func:`argmin_ratio`). ``precision``: ``None`` (from ``x.dtype``; fp32 is
    exact-product ``"ieee"``), ``"tf32"`` or ``"tf32x3"`` (fastvq's float32 search on a GPU with
    TF32 tensor cores). A second-nearest code fails unless it is within the
    bound of the nearest. ``rounded_distance``: for a program that argmins its rounded float32
    distances (``1 - cos``), as :func:`argmin_ratio` says. The message names the worst row, both
    codes, the gap, its bound and ratio.

    >>> x, c = torch.randn(50, 16), torch.randn(40, 16)
    >>> idx = torch.cdist(x.double(), c.double()).argmin(1)
    >>> assert_argmin_within_bound(x, c, idx, "l2")
    """
    ratio, gap, allowed, d = argmin_ratio(x, codebook, indices, metric, precision, factor=factor,
                                          rounded_distance=rounded_distance)
    if ratio.numel() == 0 or not (ratio > 1).any():
        return
    bad = int((ratio > 1).sum())
    r = int(ratio.argmax())
    idx = indices.reshape(-1).long()
    K = d.shape[1]
    j = int(idx[r])
    best = int(torch.where(d[r].isfinite(), d[r], math.inf).argmin()) if K else -1
    what = (f"index {j} outside [0, {K})" if not 0 <= j < K else
            f"chose code {j} (distance {float(d[r, j]):.9g}), nearest is code {best} ({float(d[r, best]):.9g}): "
            f"gap {float(gap[r]):.3g}, bound {float(allowed[r]):.3g}, ratio {float(ratio[r]):.3g}")
    raise AssertionError(f"{name or 'fastvq.testing.assert_argmin_within_bound'}: {bad} of {ratio.numel()} rows "
                         f"chose a code farther than rounding explains ({metric}, {str(x.dtype).replace('torch.', '')}"
                         f"{', ' + str(precision) if precision is not None else ''}, factor {factor:g}); "
                         f"worst row {r}: {what}")


# --------------------------------------------------------------------------- gradients


def _grad_tolerances(exact: torch.Tensor, dtype, reduce_len, condition, rtol, floor):
    dtype = _storage_dtype("dtype", dtype)
    reduce_len, condition = _nonnegative("reduce_len", reduce_len), _nonnegative("condition", condition)
    rtol = None if rtol is None else _nonnegative("rtol", rtol, positive=True)
    floor = None if floor is None else _nonnegative("floor", floor)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    g = gamma(reduce_len, UNIT_ROUNDOFF[acc])
    # (no rounding, or a formula that amplifies nothing: no error, also where the other is inf)
    inner = 0.0 if condition == 0 or g == 0 else ACCUMULATION_FACTOR * condition * g
    if rtol is None:
        rtol = OUTPUT_ROUNDING * UNIT_ROUNDOFF[dtype] + inner
    if floor is None:  # from the finite elements (one inf would make every zero pass: probe6 T2)
        finite = exact[exact.isfinite()]
        scale = float(finite.abs().max()) if finite.numel() else 0.0
        floor = (inner * scale if scale else 0.0) + _subnormal(dtype)
    return rtol, floor


def grad_ratio(actual: torch.Tensor, exact: torch.Tensor, *, dtype: torch.dtype | None = None, reduce_len: float = 1,
               condition: float = 1.0, rtol: float | None = None, floor: float | None = None) -> dict:
    """The two gradient criteria as numbers: ``{"rel_err", "rtol", "ratio", "zeros", "nonfinite", "floor"}``.

    ``rel_err = |actual - exact|_2 / |exact|_2`` (``exact`` in float64 on the same rounded inputs);
    ``rtol`` defaults to ``OUTPUT_ROUNDING u(dtype) + FACTOR * condition * gamma(reduce_len, u_fp32)``
    (the store plus the fp32 work inside, ``condition`` being how much the formula amplifies it);
    ``zeros`` counts elements that are exactly 0 where ``|exact| > floor`` (default: the absolute
    error the fp32 work could make, ``FACTOR condition gamma max|exact|``, plus the dtype's
    smallest subnormal); ``nonfinite`` counts non-finite values where ``exact`` is finite;
    ``special`` counts elements where ``exact`` is not finite and ``actual`` is not the same
    value (NaN requires NaN, +-inf that infinity, as :func:`assert_close`), and where ``exact``
    is finite but beyond ``dtype``'s range and ``actual`` is neither that signed infinity nor the
    dtype's largest value of that sign.
    ``ratio`` is ``rel_err / rtol`` over the finite elements of ``exact``, or ``inf`` when
    ``zeros``, ``nonfinite`` or ``special`` is non-zero. An infinite ``rtol`` (``reduce_len``
    of ``2^24`` float32 roundings or more, an infinite ``condition``) certifies nothing but an
    exact match, as in :func:`assert_close`: ``ratio`` is 0 then, else ``inf``. ``reduce_len``,
    ``condition`` and ``floor`` must be ``>= 0``, ``rtol > 0`` (``ValueError``); ``actual`` and
    ``exact`` dense real tensors (a sparse gradient: ``.to_dense()``). Where ``exact`` is 0 everywhere (no scale
    for a relative error), ``ratio`` is 0 when every ``|actual| <= floor`` and ``inf`` otherwise:
    pass ``floor``, the absolute error the computation can make (the default is then the
    dtype's smallest subnormal).
    """
    actual, exact = _tensor("actual", actual), _tensor("exact", exact)  # (x.grad of None: a TypeError)
    dtype = dtype or actual.dtype
    act = actual.detach().to(torch.float64)
    ex = exact.detach().to(device=act.device, dtype=torch.float64)
    if act.shape != ex.shape:
        raise ValueError(f"fastvq.testing: gradient shape {tuple(act.shape)} != exact shape {tuple(ex.shape)}")
    rtol, floor = _grad_tolerances(ex, dtype, reduce_len, condition, rtol, floor)
    # a finite exact value beyond the dtype's range rounds to +-inf there (or stays at the largest
    # value): judged as that infinity, as assert_close does (fuzzH: a correctly rounded float16
    # gradient of 7e4 failed as "non-finite where exact is finite")
    fmt = _fmt(dtype)
    over = (ex.isfinite() & _overflows(ex, fmt)) if isinstance(fmt, torch.dtype) else torch.zeros_like(ex, dtype=torch.bool)
    top = torch.finfo(fmt).max if isinstance(fmt, torch.dtype) else math.inf
    # (float64 operands: two Python scalars would take torch's default dtype, where float64's
    # largest value overflows; fuzzO F3)
    over_ok = ((act == torch.where(ex > 0, ex.new_tensor(math.inf), -math.inf))
               | (act == torch.where(ex > 0, ex.new_tensor(top), -top)))
    fin = ex.isfinite() & ~over
    nonfinite = int((fin & ~act.isfinite()).sum())
    zeros = int(((act == 0) & fin & (ex.abs() > floor)).sum())
    special = int((~fin & ~over & ~torch.where(ex.isnan(), act.isnan(), act == ex)).sum()) + int((over & ~over_ok).sum())
    a, e = torch.where(fin, act, 0.0), torch.where(fin, ex, 0.0)
    den = float(e.norm())
    num = float((a - e).norm()) if nonfinite == 0 else math.inf
    if den > 0:
        rel = num / den
    else:  # an exact gradient of zeros has no scale: every |actual| within the floor passes
        rel = 0.0 if num == 0 or (math.isfinite(num) and float(a.abs().max()) <= floor) else math.inf
    if zeros or nonfinite or special:
        ratio = math.inf
    elif math.isinf(rtol):  # a bound beyond every error (gamma of 2^24 float32 roundings): only an exact match
        ratio = 0.0 if rel == 0 else math.inf
    else:
        ratio = rel / rtol
    return {"rel_err": rel, "rtol": rtol, "ratio": ratio, "zeros": zeros, "nonfinite": nonfinite,
            "special": special, "floor": floor}


def assert_grad_nondegenerate(actual: torch.Tensor, exact: torch.Tensor, *, dtype: torch.dtype | None = None,
                              reduce_len: float = 1, condition: float = 1.0, rtol: float | None = None,
                              floor: float | None = None, name: str = "") -> None:
    """Raise unless the gradient ``actual`` is non-zero wherever ``exact`` is, and close in relative norm.

    A tolerance alone lets an all-zero gradient pass when the exact one is small; this does not.
    ``actual``: a kernel's gradient (any float dtype, e.g. bf16), ``exact``: float64 on the same
    rounded inputs and upstream gradient. Criteria and defaults: :func:`grad_ratio`. The message
    names the first zero (or the worst element) with the exact value and the bound.

    >>> e = torch.randn(8, 5, dtype=torch.bfloat16)
    >>> assert_grad_nondegenerate((2 * e.float()).bfloat16(), 2 * e.double())
    """
    r = grad_ratio(actual, exact, dtype=dtype, reduce_len=reduce_len, condition=condition, rtol=rtol, floor=floor)
    if r["ratio"] <= 1:
        return
    act = actual.detach().to(torch.float64)
    ex = exact.detach().to(device=act.device, dtype=torch.float64)
    label = name or "fastvq.testing.assert_grad_nondegenerate"
    if r["zeros"]:
        where = int(((act == 0) & ex.isfinite() & (ex.abs() > r["floor"])).reshape(-1).int().argmax())
        raise AssertionError(
            f"{label}: {r['zeros']} of {act.numel()} elements are 0 where the exact gradient is not "
            f"(|exact| > floor {r['floor']:.3g}); first at index {_where(where, act.shape)}: exact "
            f"{float(ex.reshape(-1)[where]):.6g}; relative norm error {r['rel_err']:.3g} (rtol {r['rtol']:.3g})")
    if r["nonfinite"]:
        where = int((ex.isfinite() & ~act.isfinite()).reshape(-1).int().argmax())
        raise AssertionError(f"{label}: {r['nonfinite']} non-finite elements where the exact gradient is finite; "
                             f"first at index {_where(where, act.shape)}: actual {float(act.reshape(-1)[where])}, "
                             f"exact {float(ex.reshape(-1)[where]):.6g}")
    if r["special"]:
        where = int((~ex.isfinite() & ~torch.where(ex.isnan(), act.isnan(), act == ex)).reshape(-1).int().argmax())
        raise AssertionError(f"{label}: {r['special']} elements differ where the exact gradient is not finite "
                             f"(NaN requires NaN, +-inf that infinity); first at index {_where(where, act.shape)}: "
                             f"actual {float(act.reshape(-1)[where])}, exact {float(ex.reshape(-1)[where])}")
    diff = (act - ex).abs().reshape(-1)
    worst = int(diff.argmax())
    raise AssertionError(
        f"{label}: relative norm error {r['rel_err']:.3g} exceeds rtol {r['rtol']:.3g} (ratio {r['ratio']:.3g}); "
        f"worst element at index {_where(worst, act.shape)}: actual {float(act.reshape(-1)[worst]):.6g}, "
        f"exact {float(ex.reshape(-1)[worst]):.6g}")


def describe() -> str:
    """The criteria's figures as a small table (``python -m fastvq check`` prints it)."""
    rows = [("format", "u", "products in the kernel", "accumulator")]
    for fmt, note in ((torch.float32, "rounded (ieee)"), ("tf32", "operands rounded to tf32"),
                      ("tf32x3", "3 tf32 products: 3*2^-22 each"),
                      (torch.float16, "exact in fp32"), (torch.bfloat16, "exact in fp32")):
        u = UNIT_ROUNDOFF[torch.float32 if fmt == "tf32x3" else fmt]
        rows.append((str(fmt).replace("torch.", ""), f"2^{int(math.log2(u))}", note, "fp32"))
    w = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.append(f"bound = {ACCUMULATION_FACTOR:g} * (e_ops + gamma_n(u_acc)) * sum|terms| + "
                 f"{OUTPUT_ROUNDING:g} * u_out * |expected|, vs float64 on the same rounded inputs")
    return "\n".join(lines)
