"""The CUDA behaviour of the input checks that run on the device (``fastvq._checks.assert_async``).

A few ops check values without reading them on the host (out-of-range codes, ids or offsets,
negative or non-finite weights, bits other than 0 or 1, bad candidate rows, bad masks): a
``ValueError`` at once on the CPU, an asynchronous device-side assert on CUDA, by design (no
host sync in a training step). A device-side assert ends the CUDA context of its process, so in
the test processes tests/_device_asserts.py reads those checks on the host and raises the CPU's
ValueError (``tests.utils.raises_invalid`` is the tests' ``pytest.raises`` for them). Here each
op's real CUDA behaviour is checked in a fresh ``python -c`` process with
``CUDA_LAUNCH_BLOCKING=1``: a valid call succeeds, then the invalid one ends the process with a
device-side assert raised from ``assert_async`` and nothing else wrong.

Without CUDA the same snippets run in-process (``test_snippets_raise_on_the_cpu``): the valid
call passes and the invalid one raises the op's ValueError, so CI checks the table itself.
"""

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

import fastvq
import tests.utils
from tests.utils import DEVICE, raises_invalid

pytestmark = pytest.mark.about_devices("runs the device-checked ops on CUDA in subprocesses, and on the CPU")

ROOT = pathlib.Path(__file__).resolve().parents[1]

# op -> (setup, a valid call, the same call with invalid input, the CPU's ValueError message).
# The snippets see ``torch``, ``fastvq`` and ``dev`` (the device name) and build everything on dev.
CASES = {
    "code_statistics": (
        "x = torch.randn(4, 3, device=dev)",
        "fastvq.code_statistics(x, torch.tensor([0, 1, 4, 2], device=dev), 5)",
        "fastvq.code_statistics(x, torch.tensor([0, 1, 5, 2], device=dev), 5)",
        r"code_statistics.*num_codes=5",
    ),
    "code_usage": (
        "",
        "fastvq.code_usage(torch.tensor([0, 1, 4], device=dev), 5)",
        "fastvq.code_usage(torch.tensor([0, -1, 4], device=dev), 5)",
        r"code_usage: 1 indices are outside \[0, 5\)",
    ),
    "residual_quantize_step-codes": (
        "from fastvq.ops.residual_quantize import residual_quantize_step\n"
        "x, cb = torch.randn(4, 3, device=dev), torch.randn(2, 5, 3, device=dev)\n"
        "codes = torch.zeros(4, 2, dtype=torch.long, device=dev)",
        "codes[2, 1] = 4; residual_quantize_step(x, cb, codes=codes)",
        "codes[2, 1] = 5; residual_quantize_step(x, cb, codes=codes)",
        r"residual_quantize_step: codes must lie in \[0, 5\)",
    ),
    "residual_quantize_step-candidate_rows": (
        "from fastvq.ops.residual_quantize import residual_quantize_step\n"
        "x, cb = torch.randn(4, 3, device=dev), torch.randn(2, 5, 3, device=dev)",
        "residual_quantize_step(x, cb, candidate_rows=torch.tensor([3, 0], device=dev))",
        "residual_quantize_step(x, cb, candidate_rows=torch.tensor([1, 1], device=dev))",
        r"candidate_rows must be distinct row indices in \[0, 4\)",
    ),
    "residual_quantize_step-weights": (
        "from fastvq.ops.residual_quantize import residual_quantize_step\n"
        "x, cb = torch.randn(4, 3, device=dev), torch.randn(2, 5, 3, device=dev)",
        "residual_quantize_step(x, cb, weights=torch.tensor([1.0, 2.0, 0.0, 0.5], device=dev))",
        "residual_quantize_step(x, cb, weights=torch.tensor([1.0, 2.0, float('nan'), 0.5], device=dev))",
        r"residual_quantize_step: weights must be finite and >= 0",
    ),
    "qr_lookup": (
        "ids, q, r = torch.tensor([1, 2, 3, 4], device=dev), torch.randn(4, 4, device=dev), torch.randn(5, 4, device=dev)",
        "fastvq.qr_lookup(ids, q, r, offsets=torch.tensor([0, 2, 2], device=dev))",
        "fastvq.qr_lookup(ids, q, r, offsets=torch.tensor([0, 3, 2], device=dev))",
        r"qr_lookup.*non-decreasing",
    ),
    "to_bits": (
        "",
        "fastvq.to_bits(torch.tensor([0, 15, 9], device=dev), 4)",
        "fastvq.to_bits(torch.tensor([0, 16, 9], device=dev), 4)",
        r"to_bits: indices must lie in \[0, 2\*\*4\)",
    ),
    "to_decimal": (
        "",
        "fastvq.to_decimal(torch.tensor([[0, 1, 1]], device=dev))",
        "fastvq.to_decimal(torch.tensor([[0, 2, 1]], device=dev))",
        r"to_decimal: bits must be 0 or 1",
    ),
    "Bitcodes": (
        "m = fastvq.nn.Bitcodes(8, 5, 1.0).to(dev)",
        "m.from_bits(torch.tensor([[0, 1, 1, 0, 1]], device=dev))",
        "m.from_bits(torch.tensor([[0, 1, 2, 0, 1]], device=dev))",
        r"Bitcodes.*0 or 1",
    ),
    "VectorQuantizer": (
        "m = fastvq.nn.VectorQuantizer(6, 4).to(dev).train()\nx = torch.randn(2, 5, 4, device=dev)",
        "m(x, torch.ones(2, 5, device=dev))",
        "m(x, torch.full((2, 5), -1.0, device=dev))",
        r"^fastvq\.VectorQuantizer: mask must be finite and >= 0",
    ),
    "ResidualQuantizer": (
        "m = fastvq.nn.ResidualQuantizer(2, 6, 4, ema=True).to(dev).train()\nx = torch.randn(2, 5, 4, device=dev)",
        "m(x, torch.ones(2, 5, device=dev))",
        "m(x, torch.full((2, 5), float('nan'), device=dev))",
        r"^fastvq\.ResidualQuantizer: mask must be finite and >= 0",
    ),
}


def _script(case: str) -> str:
    """The subprocess (default backend: the Triton kernels on CUDA): the valid call, a sync, a
    marker; then the invalid call and a sync."""
    setup, good, bad, _ = CASES[case]
    return "\n".join(["import torch, fastvq, fastvq.nn", "dev = 'cuda'", setup, good, "torch.cuda.synchronize()",
                      "print('VALID CALL OK', flush=True)", bad, "torch.cuda.synchronize()",
                      "print('INVALID CALL PASSED', flush=True)"])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device-side assert is CUDA's")
@pytest.mark.parametrize("case", list(CASES))
def test_invalid_input_is_a_device_side_assert_on_cuda(case):
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TRITON_INTERPRET", None)
    run = subprocess.run([sys.executable, "-c", _script(case)], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    out = f"--- stdout\n{run.stdout}\n--- stderr\n{run.stderr}"
    assert "VALID CALL OK" in run.stdout, f"{case}: the valid call failed\n{out}"
    assert "INVALID CALL PASSED" not in run.stdout and run.returncode != 0, f"{case}: no device-side assert\n{out}"
    assert "device-side assert triggered" in run.stderr, out
    # one exception, the CUDA error, raised (the launches block) from fastvq's assert_async
    raised = re.findall(r"^([A-Za-z_][\w.]*(?:Error|Exception)):", run.stderr, re.M)
    assert raised in (["torch.AcceleratorError"], ["RuntimeError"]), f"{case}: {raised}\n{out}"
    assert re.search(r'_checks\.py", line \d+, in assert_async', run.stderr), f"{case}: not from assert_async\n{out}"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's check, in-process: "
                                                      "test_invalid_input_is_a_device_side_assert_on_cuda runs these")
@pytest.mark.parametrize("case", list(CASES))
def test_snippets_raise_on_the_cpu(case, backend):
    setup, good, bad, match = CASES[case]
    scope = {"torch": torch, "fastvq": fastvq, "dev": DEVICE}
    exec(setup, scope)
    exec(good, scope)
    with pytest.raises(ValueError, match=match):
        exec(bad, scope)


def test_raises_invalid_is_pytest_raises_on_the_cpu():
    with raises_invalid("fastvq.op: bad", device="cpu") as info:
        raise ValueError("fastvq.op: bad value")
    assert info.type is ValueError
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        with raises_invalid("bad", device="cpu"):
            pass
    with pytest.raises(AssertionError, match="Regex pattern did not match"):
        with raises_invalid("other", device="cpu"):
            raise ValueError("bad")


def test_raises_invalid_on_cuda(monkeypatch):
    # where tests/_device_asserts.py reads the check on the host: pytest.raises, as on the CPU
    monkeypatch.setattr(tests.utils, "_checked_on_host", lambda: True)
    with pytest.raises(pytest.fail.Exception, match="DID NOT RAISE"):
        with raises_invalid("bad", device="cuda"):
            pass
    # where it would stay a device-side assert: the call never runs, the rest of the test skips
    monkeypatch.setattr(tests.utils, "_checked_on_host", lambda: False)
    ran = []
    with pytest.raises(pytest.skip.Exception, match="test_device_asserts.py"):
        with raises_invalid("bad", device="cuda"):
            ran.append(1)
    monkeypatch.setattr(tests.utils, "DEVICE", "cuda")  # the default: the suite's device
    with pytest.raises(pytest.skip.Exception, match="device-side assert"):
        with raises_invalid("bad"):
            ran.append(2)
    assert ran == []


def test_checked_on_host_follows_the_wrapper(monkeypatch):
    import fastvq._checks
    from tests import _device_asserts

    assert tests.utils._checked_on_host() == hasattr(fastvq._checks.assert_async, "original")
    monkeypatch.setattr(fastvq._checks, "assert_async", _device_asserts._host_checked(fastvq._checks.assert_async))
    assert tests.utils._checked_on_host()
    from fastvq.bench.traffic import metering

    with metering():  # a dispatch mode: the wrapper stays asynchronous there
        assert not tests.utils._checked_on_host()
