"""On CUDA, an op's invalid-input check (:func:`fastvq._checks.assert_async`) is a device-side
assert: it ends the CUDA context of the process it fires in, so one test that feeds an op bad
input on purpose would make every later test in its process fail (the H200 run of 2026-12-04:
2,333 errors after a few such tests). :func:`install` (tests/conftest.py, CUDA only) reads the
check on the host first, in tests only, and raises the ``ValueError`` the CPU raises, so those
tests assert the same messages on both devices. It stays asynchronous where a test watches for
host syncs (a sync-debug mode, the traffic meter's dispatch mode) or torch.compile traces.
tests/test_device_asserts.py checks the real CUDA behaviour, a device-side assert, in
subprocesses."""

from __future__ import annotations

import sys

import torch


def _host_checked(original):
    def assert_async(op, ok, detail):
        if (type(ok) is torch.Tensor and ok.is_cuda and torch.cuda.get_sync_debug_mode() == 0
                and not torch.compiler.is_compiling()
                and torch.utils._python_dispatch._get_current_dispatch_mode() is None
                and not bool(ok)):
            raise ValueError(f"fastvq.{op}: {detail()}")
        return original(op, ok, detail)

    assert_async.original = original
    return assert_async


def install() -> None:
    """Replace ``assert_async`` in fastvq._checks and in every fastvq module that imported it."""
    import fastvq._checks as checks

    original = getattr(checks.assert_async, "original", checks.assert_async)
    wrapped = _host_checked(original)
    for name, mod in list(sys.modules.items()):
        if (name == "fastvq" or name.startswith("fastvq.")) and getattr(mod, "assert_async", None) is original:
            mod.assert_async = wrapped
