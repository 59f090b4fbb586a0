"""Test helpers: seeded random inputs on the suite's device, the tolerance helper, a launch spy.

``DEVICE`` is where the suite runs: ``"cuda"`` on a machine with CUDA (the Triton kernels run
compiled there), else ``"cpu"`` (the kernels run under the Triton interpreter). Every helper
defaults to it, and tests/conftest.py makes it torch's default device on CUDA, so a test that
names no device runs on the right one (tests/test_suite_rules.py forbids naming one).
"""

from __future__ import annotations

import contextlib

import pytest
import torch

import fastvq.testing as ft

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: The backends the ``backend`` fixture runs each test under (tests/conftest.py).
BACKENDS = ("reference", "triton")

#: The test file that checks, on CUDA, what :func:`raises_invalid` skips there.
DEVICE_ASSERT_TESTS = "tests/test_device_asserts.py"


def backend_cells(argname: str, shared: dict, kernel_only: dict):
    """``parametrize(("backend", argname))``: each backend with each value of ``shared``, the
    Triton backend alone with each value of ``kernel_only`` (a path only the kernels have, forced
    by the test), so that no cell skips on every device. ``shared`` and ``kernel_only`` map ids
    to values; a cell's id is ``<backend>-<id>``."""
    cells = [pytest.param(b, v, id=f"{b}-{i}") for b in BACKENDS for i, v in shared.items()]
    cells += [pytest.param("triton", v, id=f"triton-{i}") for i, v in kernel_only.items()]
    return pytest.mark.parametrize(("backend", argname), cells, indirect=["backend"])


@contextlib.contextmanager
def raises_invalid(match: str, device: str | None = None):
    """``pytest.raises(ValueError, match=match)`` around a call whose bad input fastvq checks on
    the device without a host sync (``fastvq._checks.assert_async``: out-of-range codes, ids or
    offsets, negative or non-finite weights, bits other than 0 or 1, bad candidate rows, masks).

    On the CPU (``device``, default the suite's) that check raises the ValueError at once: this
    is exactly ``pytest.raises``. On CUDA it is an asynchronous device-side assert, which ends
    the CUDA context of the whole test process (every later test in it errors). There the
    suite's processes read the check on the host first (tests/_device_asserts.py, installed by
    tests/conftest.py) and raise the same ValueError, so this is ``pytest.raises`` too, except
    where that wrapper stays asynchronous (a sync-debug mode, a dispatch mode such as the
    traffic meter) or is not installed: then the rest of the test is skipped and the call never
    runs. Put the bad call after the checks of valid input. tests/test_device_asserts.py
    checks the real device-side assert of each such op, in subprocesses."""
    if torch.device(device or DEVICE).type == "cpu" or _checked_on_host():
        with pytest.raises(ValueError, match=match) as info:
            yield info
        return
    pytest.skip(f"invalid input that fastvq checks on the device (assert_async): on CUDA a device-side assert "
                f"that would end this process's CUDA context; {DEVICE_ASSERT_TESTS} checks it in a subprocess")


def _checked_on_host() -> bool:
    """Whether an ``assert_async`` on CUDA tensors raises the ValueError here (tests/_device_asserts.py
    installed, outside the sync-debug and dispatch modes where it stays asynchronous)."""
    import fastvq._checks

    sync_debug = torch.cuda.is_available() and torch.cuda.get_sync_debug_mode() != 0
    return (hasattr(fastvq._checks.assert_async, "original") and not sync_debug
            and torch.utils._python_dispatch._get_current_dispatch_mode() is None)


def assert_close(actual, expected, dtype=None, reduce_len: float = 1, msg: str = "", magnitude=None) -> None:
    """:func:`fastvq.testing.assert_close` for comparisons whose sums of ``|terms|`` are not spelled
    out: every element's magnitude is ``max |expected|`` over the finite elements (the tests'
    inputs are unit-scale random numbers, so a sum's terms are about as large as the largest
    result), or 1 where every expected element is 0 (rounding residue of cancelling O(1)
    terms). It was ``max(max |expected|, 1)``: results far below 1 then passed as anything near
    0 (taudit F1: statistics of 7e-44 passed as zeros). ``magnitude``: the real sum of
    ``|terms|`` where it is larger (cancellation), as fastvq.testing takes it. ``dtype``: the
    operands' dtype (default: ``actual``'s); ``reduce_len``: the length of the longest chain of
    roundings behind an element."""
    expected = expected.detach().to(actual.device)
    if magnitude is None:
        finite = expected[expected.isfinite()]
        top = float(finite.abs().max()) if finite.numel() else 0.0
        magnitude = top if top > 0 else 1.0
    ft.assert_close(actual, expected, dtype=dtype or actual.dtype, reduce_len=reduce_len, magnitude=magnitude,
                    name=msg or "assert_close")


def _seed(seed: int | None) -> int:
    """``seed``, or the next draw of torch's global stream (which conftest seeds per test)."""
    return int(seed) if seed is not None else int(torch.randint(0, 2**31 - 1, (), device="cpu"))


def generator(seed: int | None = None, device: str | None = None) -> torch.Generator:
    """A ``torch.Generator`` on the suite's device (for ``torch.randint(..., generator=g)`` and friends)."""
    return torch.Generator(device=device or DEVICE).manual_seed(_seed(seed))


def randn(*shape, dtype=torch.float32, device: str | None = None, seed: int | None = None, scale: float = 1.0,
          requires_grad: bool = False) -> torch.Tensor:
    """Random normal input on ``device`` (default: the suite's). Drawn in float64 on the CPU from
    ``seed`` (or from the test's seeded stream), so a seed gives the same values on every device."""
    g = torch.Generator(device="cpu").manual_seed(_seed(seed))
    t = torch.randn(*shape, generator=g, dtype=torch.float64, device="cpu") * scale
    return t.to(device=device or DEVICE, dtype=dtype).requires_grad_(requires_grad)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """Same values as ``t``, with a last-dim stride of 2 (not contiguous)."""
    big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1], dtype=t.dtype, device=t.device)
    big[..., ::2] = t
    out = big[..., ::2]
    assert not out.is_contiguous() or t.shape[-1] <= 1
    return out


def count_kernel_launches(monkeypatch, module, *names) -> list:
    """Spy on the named ``@triton.jit`` kernels of ``module``; returns the list of names launched."""
    launched = []
    for name in names:
        kernel = getattr(module, name)

        def run(*args, _real=kernel.run, _name=name, **kwargs):
            launched.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", run)
    return launched


def two_config_autotuner(monkeypatch, module, name) -> list:
    """Put in place of the autotuned kernel ``module.name`` an autotuner of two configs (its first
    config at 1 and at 2 warps) with the kernel's key and ``reset_to_zero``, whose timer launches
    each config 3 times, as a GPU autotuner does, and ranks them by the order timed (no clock).
    Returns the list the timer appends to (one entry per config timed)."""
    import triton

    tuned = getattr(module, name)
    timed = []

    def do_bench(kernel_call, quantiles):
        for _ in range(3):
            kernel_call()
        timed.append(3)
        return [float(len(timed)), 0.0, 0.0]

    cfg = tuned.configs[0]
    configs = [triton.Config(dict(cfg.kwargs), num_warps=w, num_stages=cfg.num_stages) for w in (1, 2)]
    fresh = triton.autotune(configs=configs, key=list(tuned.keys), reset_to_zero=tuned.reset_to_zero,
                            do_bench=do_bench)(tuned.fn)
    monkeypatch.setattr(module, name, fresh)
    return timed


def stored(x32: torch.Tensor, dtype: torch.dtype, kernel: bool = True) -> torch.Tensor:
    """The values a store of float32 ``x32`` in ``dtype`` gives: round to nearest even (a GPU, and
    torch), except a Triton kernel's store to bfloat16 under an interpreter whose casts
    ``kernels._common`` could not fix (``INTERPRETER_BF16_EXACT`` False): it truncates."""
    from fastvq.kernels import _common

    if kernel and dtype == torch.bfloat16 and _common.INTERPRETED and not _common.INTERPRETER_BF16_EXACT:
        return (x32.float().view(torch.int32) & -65536).view(torch.float32).to(dtype)  # exact: low bits are 0
    return x32.to(dtype)


def assert_same_run(a: torch.Tensor, b: torch.Tensor, msg: str) -> None:
    """Two runs of the same training step gave ``a`` and ``b``: bitwise on the CPU (NaN where NaN).
    On a GPU the fused step's codebook gradient and EMA statistics sum with float32 atomics
    (README, "Known limits": not bitwise reproducible), so there a floating tensor may differ by
    summation-order rounding: relative 1e-5 of its largest finite magnitude (the H200 run of
    2026-12-04 saw last-bit differences); integer tensors (codes) stay bitwise."""
    assert a.dtype == b.dtype and a.shape == b.shape, f"{msg}: {a.dtype} {tuple(a.shape)} vs {b.dtype} {tuple(b.shape)}"
    if a.is_cuda and a.is_floating_point():
        scale = float(a.double().nan_to_num(0.0, 0.0, 0.0).abs().max()) if a.numel() else 0.0
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * scale, equal_nan=True,
                                   msg=lambda m: f"{msg}: beyond float32 summation-order rounding: {m}")
        return
    assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.isnan(), b.isnan())
                                 and torch.equal(a[~a.isnan()], b[~b.isnan()])), msg
