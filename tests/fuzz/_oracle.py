"""Float64 oracles and contract checks of the fuzz suite.

Written from the ops' documented definitions, never from ``fastvq.reference``. The numeric
contract (issue 9, item 1) they assert:

* a value that is NaN in exact arithmetic is NaN; one whose exact value is +-inf, or that
  overflows float32, is that infinity (never NaN, 0 or a made-up finite number);
* a NaN or infinite code is never chosen for a finite row while a finite code exists, and
  a code at NaN distance never while one at a non-NaN distance exists (a NaN-aware min);
* for finite inputs the chosen index is the exact argmin wherever distances are
  representable, within the rounding bound of :mod:`tests.fuzz._bounds`; exact ties (exact
  duplicate codes, small-integer inputs where every float32 operation is exact) go to the
  smallest index; indices always lie in ``[0, K)``;
* cosine distances lie in ``[0, 2]`` at every magnitude; l2 distances are never negative.
"""

from __future__ import annotations

import functools
import math

import torch

from ._bounds import F32_MAX, OUTPUT_ROUNDING, UNIT, abs_slack, gamma
from ._gen import HOST


def host(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached on the host, where every float64 oracle runs (whatever the test's device)."""
    return t.detach().to(HOST)


def on_host(fn):
    """Run an oracle/check on the host: tensor arguments are moved there and new tensors are
    made there (``torch.set_default_device`` may point at the GPU during the suite)."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        args = [host(a) if isinstance(a, torch.Tensor) else a for a in args]
        kwargs = {k: host(v) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        with torch.device(HOST):
            return fn(*args, **kwargs)

    return run

# --------------------------------------------------------------------------- distances


@on_host
def finite_rows(t64: torch.Tensor) -> torch.Tensor:
    return t64.isfinite().all(-1) if t64.shape[-1] > 0 else torch.ones(t64.shape[:-1], dtype=torch.bool)


@on_host
def nan_rows(t64: torch.Tensor) -> torch.Tensor:
    return t64.isnan().any(-1) if t64.shape[-1] > 0 else torch.zeros(t64.shape[:-1], dtype=torch.bool)


def _unit_rows(v: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit length in float64, scaling by the largest |entry| first (exact for
    every finite magnitude); zero rows stay zero, non-finite rows become NaN."""
    if v.shape[-1] == 0:
        return v
    s = v.abs().amax(-1, keepdim=True)
    fin = v.isfinite().all(-1, keepdim=True)
    safe = torch.where((s > 0) & fin, s, torch.ones_like(s))
    w = v / safe
    n = w.norm(dim=-1, keepdim=True)
    w = torch.where(n > 0, w / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(w))
    return torch.where(fin, w, torch.full_like(w, math.nan))


@on_host
def distances64(x64: torch.Tensor, c64: torch.Tensor, metric: str) -> torch.Tensor:
    """``(N, K)`` float64 distances by the documented definitions, computed elementwise (so
    ``inf * 0`` and ``inf - inf`` give NaN as in exact extended arithmetic)."""
    if metric == "l2":
        return ((x64[:, None, :] - c64[None, :, :]) ** 2).sum(-1)
    if metric == "dot":
        return -(x64[:, None, :] * c64[None, :, :]).sum(-1)
    if metric == "cosine":
        xn, cn = _unit_rows(x64), _unit_rows(c64)
        return 1.0 - (xn[:, None, :] * cn[None, :, :]).sum(-1)
    raise ValueError(metric)


@on_host
def bounds64(x64: torch.Tensor, c64: torch.Tensor, metric: str) -> torch.Tensor:
    """``(N, K)`` a-priori bound on |computed - exact| of each float32 distance."""
    D = x64.shape[-1]
    nx = torch.nan_to_num(x64, nan=0.0, posinf=0.0, neginf=0.0).norm(dim=-1)
    nc = torch.nan_to_num(c64, nan=0.0, posinf=0.0, neginf=0.0).norm(dim=-1)
    if metric == "l2":
        return gamma(D) * (nx[:, None] + nc[None, :]) ** 2 + abs_slack(D)
    if metric == "dot":
        return gamma(D) * nx[:, None] * nc[None, :] + abs_slack(D)
    return torch.full((x64.shape[0], c64.shape[0]), 2 * gamma(D), dtype=torch.float64)


# --------------------------------------------------------------------------- checks


class ContractError(AssertionError):
    pass


def fail(op: str, msg: str):
    raise ContractError(f"{op}: {msg}")


def check_value(op: str, where: str, got: float, exact: float, bound: float, *, lo=None, hi=None) -> None:
    """One float32 output against its float64 exact value (see the module docstring)."""
    if math.isnan(exact):
        if not math.isnan(got):
            fail(op, f"{where}: NaN in exact arithmetic, got {got!r}")
        return
    if math.isnan(got):
        fail(op, f"{where}: got NaN, exact value {exact!r}")
    if math.isinf(exact):
        if got != exact:
            fail(op, f"{where}: exact value {exact!r}, got {got!r}")
        return
    if abs(exact) - bound > F32_MAX * (1 + 2.0**-24):  # overflows float32 whatever the rounding
        want = math.copysign(math.inf, exact)
        if got != want:
            fail(op, f"{where}: {exact!r} overflows float32, must be {want!r}, got {got!r}")
        return
    if math.isinf(got):
        if abs(exact) + bound < F32_MAX:
            fail(op, f"{where}: got {got!r}, exact value {exact!r} is representable (bound {bound:.3g})")
        return
    if abs(got - exact) > bound + OUTPUT_ROUNDING * UNIT[torch.float32] * abs(exact):
        fail(op, f"{where}: got {got!r}, exact {exact!r}, |error| {abs(got - exact):.3g} > bound {bound:.3g}")
    if lo is not None and got < lo:
        fail(op, f"{where}: got {got!r} < {lo}")
    if hi is not None and got > hi:
        fail(op, f"{where}: got {got!r} > {hi}")


@on_host
def check_choice(op: str, idx: torch.Tensor, dist: torch.Tensor | None, d64: torch.Tensor, b64: torch.Tensor,
                 x_fin: torch.Tensor, c_fin: torch.Tensor, *, metric: str = "l2", exact: bool = False,
                 lenient_rows: torch.Tensor | None = None) -> None:
    """Check a nearest-code choice row by row.

    ``idx (N,)``, ``dist (N,)`` (or None): the op's outputs. ``d64 (N, K)``: exact distances;
    ``b64 (N, K)``: their rounding bounds. ``x_fin (N,)``/``c_fin (K,)``: finite rows / codes.
    ``exact``: every float32 operation is exact (small integers), so the index must be the
    first exact argmin and the distance exact. ``lenient_rows``: rows whose value the contract
    leaves open (cosine of an infinite vector): only range checks there.
    """
    N, K = d64.shape
    assert idx.shape == (N,), (idx.shape, N)
    if N and not bool(((idx >= 0) & (idx < K)).all()):
        bad = int(((idx < 0) | (idx >= K)).nonzero()[0, 0])
        fail(op, f"row {bad}: index {int(idx[bad])} outside [0, {K})")
    lo, hi = {"l2": (0.0, None), "cosine": (0.0, 2.0), "dot": (None, None)}[metric]
    for i in range(N):
        k = int(idx[i])
        row = d64[i]
        got = float(dist[i]) if dist is not None else None
        if bool(x_fin[i]) and bool(c_fin.any()):
            if not bool(c_fin[k]):
                fail(op, f"row {i}: chose non-finite code {k} for a finite row while a finite code exists")
            row = torch.where(c_fin, row, math.nan)  # the non-finite codes are out of the race
        if dist is None and not bool(x_fin[i]):  # no distance output: a non-finite row's code is free
            continue
        if lenient_rows is not None and bool(lenient_rows[i]):
            if got is not None and not math.isnan(got) and ((lo is not None and got < lo) or (hi is not None and got > hi)):
                fail(op, f"row {i}: distance {got!r} outside [{lo}, {hi}]")
            continue
        if not bool(x_fin[i]) and not bool(row.isnan().all()):
            # an infinite row: which code it takes is the op's documented choice; the distance
            # reported is that code's exact one (+-inf, or NaN where inf - inf / inf * 0 occurs)
            if got is not None:
                check_value(op, f"row {i} (code {k}) distance", got, float(d64[i, k]), float(b64[i, k]), lo=lo, hi=hi)
            continue
        non_nan = ~row.isnan()
        if not bool(non_nan.any()):  # every distance NaN in exact arithmetic
            if got is not None and not math.isnan(got):
                fail(op, f"row {i}: every distance is NaN in exact arithmetic, got {got!r}")
            continue
        dk = float(d64[i, k])
        if math.isnan(dk):
            fail(op, f"row {i}: chose code {k} at distance NaN while a non-NaN distance exists")
        best = int(torch.where(non_nan, row, math.inf).argmin()) if bool(non_nan.any()) else k
        dmin = float(row[best])
        if math.isinf(dmin) and dmin < 0:
            if dk != dmin:
                fail(op, f"row {i}: chose code {k} at {dk!r}, the minimum is -inf (code {best})")
        elif abs(dmin) - float(b64[i, best]) <= F32_MAX and not (metric == "dot" and dmin < -F32_MAX):
            slack = float(b64[i, k]) + float(b64[i, best])
            if exact:
                first = int((row == dmin).nonzero()[0, 0])
                if k != first:
                    fail(op, f"row {i}: exact arithmetic, chose code {k} at {dk!r}, first argmin is {first} at {dmin!r}")
            elif dk > dmin + slack:
                fail(op, f"row {i}: chose code {k} at {dk!r}, code {best} is nearer at {dmin!r} (bound {slack:.3g})")
        elif metric == "dot" and dmin < -F32_MAX and not dk < -F32_MAX * (1 - 2**-20):
            fail(op, f"row {i}: the minimum overflows to -inf (code {best}), chose code {k} at {dk!r}")
        if got is not None:
            check_value(op, f"row {i} (code {k}) distance", got, dk, 0.0 if exact else float(b64[i, k]), lo=lo, hi=hi)


@on_host
def check_first_duplicate(op: str, idx: torch.Tensor, c64: torch.Tensor) -> None:
    """Exact ties: a code identical to an earlier one is never chosen (the earlier wins)."""
    K = c64.shape[0]
    if K < 2 or c64.shape[-1] == 0:
        first = torch.zeros(K, dtype=torch.long)
    else:
        eq = (c64[:, None, :] == c64[None, :, :]).all(-1)  # NaN rows equal nothing
        first = eq.int().argmax(1)
    for i, k in enumerate(idx.tolist()):
        if c64.shape[-1] == 0 and k != 0:
            fail(op, f"row {i}: D = 0, every code ties at distance 0, chose {k} not 0")
        if c64.shape[-1] > 0 and int(first[k]) != k:
            fail(op, f"row {i}: chose code {k}, an exact duplicate of the earlier code {int(first[k])}")


@on_host
def check_semihard(op: str, idx: torch.Tensor, dist: torch.Tensor, d64: torch.Tensor, b64: torch.Tensor,
                   dp: torch.Tensor, bp: torch.Tensor, a_fin: torch.Tensor, n_fin: torch.Tensor) -> None:
    """Semi-hard mining: the nearest negative strictly farther than the positive
    (``|a - n|^2 > |a - p|^2``), the hardest where none is; both compared within their rounding
    bounds (``b64`` for the negatives, ``bp`` for the positive's distance ``dp``). For a finite
    anchor the non-finite negatives are out of the race while a finite one exists."""
    N, M = d64.shape
    if N and not bool(((idx >= 0) & (idx < M)).all()):
        fail(op, f"index outside [0, {M}): {idx.tolist()}")
    for i in range(N):
        k = int(idx[i])
        if bool(a_fin[i]) and bool(n_fin.any()) and not bool(n_fin[k]):
            fail(op, f"row {i}: chose non-finite negative {k} for a finite anchor while a finite one exists")
        row = d64[i].clone()
        if bool(a_fin[i]) and bool(n_fin.any()):
            row[~n_fin] = math.nan
        non_nan = ~row.isnan()
        if not bool(non_nan.any()):
            if not math.isnan(float(dist[i])):
                fail(op, f"row {i}: every distance is NaN in exact arithmetic, got {float(dist[i])!r}")
            continue
        if not bool(a_fin[i]):  # an infinite anchor: its choice is documented; the distance is that one's
            check_value(op, f"row {i} (negative {k}) distance", float(dist[i]), float(d64[i, k]), float(b64[i, k]), lo=0.0)
            continue
        if math.isnan(float(row[k])):
            fail(op, f"row {i}: chose negative {k} at NaN distance while a non-NaN distance exists")
        check_value(op, f"row {i} (negative {k}) distance", float(dist[i]), float(d64[i, k]), float(b64[i, k]), lo=0.0)
        b = b64[i]
        lo_p, hi_p = float(dp[i] - bp[i]), float(dp[i] + bp[i])
        sure = non_nan & (row - b > hi_p)
        if not hi_p <= F32_MAX:  # |a - p|^2 overflows (or is NaN): nothing is farther in float32
            sure[:] = False
        maybe = non_nan & (row + b >= lo_p)
        hard = int(torch.where(non_nan, row, math.inf).argmin())
        if bool(sure.any()):
            best = int(torch.where(sure, row, math.inf).argmin())
            if not bool(maybe[k]):
                fail(op, f"row {i}: chose negative {k} at {float(row[k])!r}, not farther than the positive "
                         f"({float(dp[i])!r}), while negative {best} at {float(row[best])!r} is")
            if float(row[best]) - float(b[best]) <= F32_MAX and float(row[k]) > float(row[best] + b[k] + b[best]):
                fail(op, f"row {i}: chose negative {k} at {float(row[k])!r}, negative {best} at "
                         f"{float(row[best])!r} is nearer and farther than the positive ({float(dp[i])!r})")
        elif not bool(maybe[k]):
            if float(row[hard]) - float(b[hard]) <= F32_MAX and float(row[k]) > float(row[hard] + b[k] + b[hard]):
                fail(op, f"row {i}: no negative is farther than the positive, chose {k} at {float(row[k])!r}, "
                         f"the hardest is {hard} at {float(row[hard])!r}")


@on_host
def small_ints(t64: torch.Tensor) -> bool:
    """All finite entries are integers of magnitude <= 4 (so l2/dot distances of up to 64
    features are computed exactly in float32, and ties are exact)."""
    v = t64[t64.isfinite()]
    return bool(((v == v.round()) & (v.abs() <= 4)).all())


@on_host
def check_values(op: str, name: str, got: torch.Tensor, want: torch.Tensor, bound: torch.Tensor | float,
                 dtype: torch.dtype, *, mask: torch.Tensor | None = None) -> None:
    """Elementwise: ``got`` (stored in ``dtype``) against float64 ``want`` with absolute error
    bound ``bound`` (plus the final rounding into ``dtype``). NaN exactly where ``want`` is NaN;
    an exact infinity, or a value that overflows ``dtype``, is that infinity; a representable
    value is finite and within the bound. ``mask``: the elements to check (default all)."""
    want = want.double()
    bound = torch.as_tensor(bound, dtype=torch.float64).expand(want.shape).reshape(-1)
    got, want = got.double().reshape(-1), want.reshape(-1)
    assert got.numel() == want.numel(), (op, name, got.numel(), want.numel())
    keep = torch.ones_like(want, dtype=torch.bool) if mask is None else mask.reshape(-1)
    dmax, unit, tiny = float(torch.finfo(dtype).max), UNIT[dtype], float(torch.finfo(dtype).tiny)
    for e in keep.nonzero().reshape(-1).tolist():
        w, gv, bd = float(want[e]), float(got[e]), float(bound[e])
        where = f"{name}[{e}]"
        if math.isnan(w):
            if not math.isnan(gv):
                fail(op, f"{where}: NaN in exact arithmetic, got {gv!r}")
            continue
        if math.isnan(gv):
            fail(op, f"{where}: got NaN, exact value {w!r}")
        over = abs(w) - bd > dmax * (1 + unit)
        if math.isinf(w) or over:
            if gv != math.copysign(math.inf, w):
                fail(op, f"{where}: exact value {w!r} is not representable in {dtype}, must be "
                         f"{math.copysign(math.inf, w)!r}, got {gv!r}")
            continue
        if math.isinf(gv):
            if abs(w) + bd < dmax:
                fail(op, f"{where}: got {gv!r}, exact value {w!r} is representable in {dtype} (bound {bd:.3g})")
            continue
        if abs(gv - w) > bd + OUTPUT_ROUNDING * unit * abs(w) + tiny:
            fail(op, f"{where}: got {gv!r}, exact {w!r}, |error| {abs(gv - w):.3g} > bound {bd:.3g}")
