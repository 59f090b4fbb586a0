"""The CUDA behaviour of an op's invalid-input check, which tests/_device_asserts.py replaces in
the test processes: a device-side assert (no host sync), reported at the next synchronisation,
after which the process's CUDA context is unusable. Each case runs in its own Python process."""

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

GOOD_AND_BAD = {  # op: (a valid call, an invalid one), on CUDA tensors
    "code_usage": ("fastvq.code_usage(torch.tensor([0, 4], device='cuda'), 5)",
                   "fastvq.code_usage(torch.tensor([0, 5], device='cuda'), 5)"),
    "residual_quantize_step": (
        "fastvq.residual_quantize_step(torch.randn(4, 3, device='cuda'), torch.randn(2, 5, 3, device='cuda'), "
        "codes=torch.zeros(4, 2, dtype=torch.long, device='cuda'))",
        "fastvq.residual_quantize_step(torch.randn(4, 3, device='cuda'), torch.randn(2, 5, 3, device='cuda'), "
        "codes=torch.full((4, 2), 5, dtype=torch.long, device='cuda'))"),
    "code_statistics": (
        "fastvq.code_statistics(torch.randn(4, 3, device='cuda'), torch.tensor([0, 1, 2, 4], device='cuda'), 5)",
        "fastvq.code_statistics(torch.randn(4, 3, device='cuda'), torch.tensor([0, 1, 2, 5], device='cuda'), 5)"),
}


def _run(call: str) -> subprocess.CompletedProcess:
    code = f"import torch, fastvq\nout = {call}\ntorch.cuda.synchronize()\nprint('ok')\n"
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env,
                          cwd=ROOT)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the device-side assert is CUDA's")
@pytest.mark.parametrize("op", list(GOOD_AND_BAD))
def test_invalid_input_is_a_device_side_assert_on_cuda(op):
    good, bad = GOOD_AND_BAD[op]
    ok = _run(good)
    assert ok.returncode == 0 and ok.stdout.strip().endswith("ok"), ok.stderr[-2000:]
    res = _run(bad)
    assert res.returncode != 0, f"{op}: the invalid call ran to the end"
    assert "device-side assert" in res.stderr, res.stderr[-2000:]
