"""``FASTVQ_AUTOTUNE=0`` pins every autotuned kernel to one config (for GPU test runs).

The config lists are fixed when the kernel modules are imported, and this process imports them
under the interpreter (conftest sets ``TRITON_INTERPRET``), so the GPU-side cases run in a fresh
subprocess without it.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

_PROBE = r"""
import importlib, json, os, pkgutil, triton
from fastvq import kernels
from fastvq.kernels import _common
mods = [importlib.import_module(f"fastvq.kernels.{m.name}") for m in pkgutil.iter_modules(kernels.__path__)]
out = {"interpreted": kernels.INTERPRETED}
for value in ("0", None):  # the switch is read at import: import, then reload with the other value
    if value is None:
        os.environ.pop("FASTVQ_AUTOTUNE")
    else:
        os.environ["FASTVQ_AUTOTUNE"] = value
    seen, cached = {}, {}
    for mod in mods:
        mod = importlib.reload(mod)
        for name, obj in vars(mod).items():
            if isinstance(obj, triton.runtime.autotuner.Autotuner):
                seen[f"{mod.__name__}.{name}"] = [id(c) for c in obj.configs]
                cached[f"{mod.__name__}.{name}"] = obj.cache_results
    out[str(value)] = {"kernels": seen, "cache_results": cached, "pinned": {k: id(c) for k, c in _common.PINNED_CONFIGS.items()},
                       "gpu": {k: [id(c) for c in v] for k, v in _common.GPU_CONFIGS.items()}}
print(json.dumps(out))
"""


@functools.lru_cache(maxsize=None)
def _probe() -> dict:
    """The autotuners' configs as a process without the interpreter (as on a GPU) sees them,
    with ``FASTVQ_AUTOTUNE=0`` (key "0") and unset (key "None")."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "FASTVQ_AUTOTUNE")}
    proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.splitlines()[-1])


# every autotuned kernel in kernels/*.py and the name its configs are registered under
AUTOTUNED = {
    "fastvq.kernels.nearest_code._nearest_code_fwd_kernel": "nearest_code",
    "fastvq.kernels.residual_quantize._residual_quantize_fwd_kernel": "residual_quantize",
    "fastvq.kernels.residual_quantize._residual_quantize_fwd_chunked_kernel": "residual_quantize_chunked",
    "fastvq.kernels.pairwise_kl_loss._pairwise_kl_loss_fwd_kernel": "pairwise_kl_loss_fwd",
    "fastvq.kernels.pairwise_kl_loss._pairwise_kl_loss_bwd_kernel": "pairwise_kl_loss_bwd",
}


def test_pinned_one_config_per_kernel():
    full = _probe()
    assert not full["interpreted"]
    out = full["0"]
    assert set(out["kernels"]) == set(AUTOTUNED), "an autotuned kernel this test does not know"
    for kernel, name in AUTOTUNED.items():
        assert out["kernels"][kernel] == [out["pinned"][name]], f"{kernel}: not pinned to its one config"


def test_autotune_by_default_sees_the_gpu_lists():
    out = _probe()["None"]
    for kernel, name in AUTOTUNED.items():
        configs = out["kernels"][kernel]
        assert configs == out["gpu"][name] and len(configs) > 1, kernel


def test_autotune_results_cached_on_disk():
    """Every autotuner keeps its timings on disk (Triton's cache_results), so a second process
    with the same shapes does not time the configs again (README, "Why the first call is slow")."""
    import triton

    if "cache_results" not in inspect.signature(triton.autotune).parameters:
        pytest.skip(f"triton {triton.__version__} has no autotune cache_results")
    cached = _probe()["None"]["cache_results"]
    assert cached == dict.fromkeys(AUTOTUNED, True)


def test_every_autotuner_goes_through_the_common_decorator(monkeypatch):
    # kernels/*.py decorate with kernels._common.autotune, never triton.autotune directly ...
    direct = [p.name for p in sorted((ROOT / "kernels").glob("*.py"))
              if p.name != "_common.py" and "triton.autotune(" in p.read_text()]
    assert not direct, f"use kernels._common.autotune: {direct}"
    # ... which passes cache_results=True where Triton has it
    import triton

    from fastvq.kernels import _common

    seen = {}
    monkeypatch.setattr(triton, "autotune", lambda **kwargs: seen.update(kwargs) or "decorator")
    assert _common.autotune(configs=["c"], key=["D"]) == "decorator"
    assert seen.get("cache_results") is (True if _common.AUTOTUNE_CACHE_RESULTS else None)
    assert seen["configs"] == ["c"] and seen["key"] == ["D"]


def test_interpreter_keeps_its_single_small_config(monkeypatch):
    # this process runs the kernels under the interpreter (conftest): one small config each,
    # whatever the switch says
    import importlib
    import pkgutil

    import triton

    from fastvq import kernels
    from fastvq.kernels import _common

    assert _common.INTERPRETED
    for info in pkgutil.iter_modules(kernels.__path__):
        mod = importlib.import_module(f"fastvq.kernels.{info.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, triton.runtime.autotuner.Autotuner):
                key = AUTOTUNED[f"{mod.__name__}.{name}"]
                assert len(obj.configs) == 1 and obj.configs[0] is not _common.PINNED_CONFIGS[key], name
    monkeypatch.setenv("FASTVQ_AUTOTUNE", "0")
    gpu, pinned, interp = [object(), object()], object(), object()
    assert _common.autotune_configs("probe", gpu, pinned, interp) == [interp]
    assert _common.GPU_CONFIGS.pop("probe") == gpu and _common.PINNED_CONFIGS.pop("probe") is pinned


@pytest.mark.parametrize("value,expected", [("0", False), ("off", False), ("1", True), ("", True), ("yes", True)])
def test_switch_values(monkeypatch, value, expected):
    from fastvq.kernels import _common

    monkeypatch.setenv("FASTVQ_AUTOTUNE", value)
    assert _common.autotune_enabled() is expected


@pytest.mark.parametrize("value", ["2", "maybe"])
def test_bad_value_names_the_variable(monkeypatch, value):
    from fastvq.kernels import _common

    monkeypatch.setenv("FASTVQ_AUTOTUNE", value)
    with pytest.raises(ValueError, match=f"FASTVQ_AUTOTUNE={value!r}"):
        _common.autotune_enabled()


def _python_fn(obj):
    """The Python function behind a jit function (a ``JITFunction``, or an ``InterpretedFunction``
    under the interpreter), through autotune / heuristics wrappers; None for anything else."""
    import types

    while obj is not None and not isinstance(obj, types.FunctionType):
        obj = getattr(obj, "fn", None)
    return obj


def _jit_source_closure(fn) -> str:
    """The source of a jit function's Python function ``fn`` and of every jit function it calls,
    transitively (names resolved in its module)."""
    import ast
    import textwrap

    seen, todo, parts = set(), [fn], []
    while todo:
        fn = todo.pop()
        if fn in seen:
            continue
        seen.add(fn)
        src = textwrap.dedent(inspect.getsource(fn))
        parts.append(src)
        for n in ast.walk(ast.parse(src)):
            value = fn.__globals__.get(n.id) if isinstance(n, ast.Name) else None
            if value is not None and hasattr(value, "fn") and _python_fn(value) is not None:
                todo.append(_python_fn(value))
    return "\n".join(parts)


def test_autotuned_kernels_with_atomics_reset_them_between_timed_launches():
    # The autotuner times every config by launching it on the caller's tensors; an output summed
    # with atomics must be zeroed around those launches (reset_to_zero), or the launch that counts
    # adds to the timed launches' sums (tests/ops/test_residual_quantize.py shows the effect)
    import importlib
    import pkgutil

    import triton

    from fastvq import kernels

    found = {}
    for m in pkgutil.iter_modules(kernels.__path__):
        mod = importlib.import_module(f"fastvq.kernels.{m.name}")
        for name, obj in vars(mod).items():
            if isinstance(obj, triton.runtime.autotuner.Autotuner):
                fn = _python_fn(obj)
                found[f"{m.name}.{name}"] = ("tl.atomic_" in _jit_source_closure(fn), list(obj.reset_to_zero),
                                             list(inspect.signature(fn).parameters))
    assert len(found) == 5, found  # nearest_code, the KL forward and backward, the two residual forwards
    assert sum(atomics for atomics, _, _ in found.values()) >= 2, found  # the residual forwards
    for name, (atomics, reset, params) in found.items():
        assert bool(reset) == atomics, (name, atomics, reset)
        assert set(reset) <= set(params), (name, reset)
