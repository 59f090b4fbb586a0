"""`python -m fastvq check | bench` as a user runs them."""

import json
import subprocess
import sys

import pytest
import torch

from fastvq import check as check_mod
from fastvq.__main__ import main


def test_check_passes_and_prints_table(capsys):
    assert main(["check", "--ops", "pairwise_sqdist", "nearest_code", "--dtypes", "float32", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert out.count("PASS") == 4 and "FAIL" not in out and "all checks passed" in out


def test_check_fails_loudly(monkeypatch, capsys):
    monkeypatch.setitem(check_mod.CHECKS, "pairwise_sqdist", lambda device, dtype: 1.0)
    assert main(["check", "--ops", "pairwise_sqdist", "--dtypes", "float32"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_check_reports_a_crash_as_fail(monkeypatch, capsys):
    def boom(device, dtype):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(check_mod.CHECKS, "pairwise_sqdist", boom)
    assert main(["check", "--ops", "pairwise_sqdist", "--dtypes", "float32"]) == 1
    assert "kernel exploded" in capsys.readouterr().out


def test_unknown_op_is_named():
    with pytest.raises(ValueError, match="no_such_op"):
        main(["check", "--ops", "no_such_op"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour of bench")
def test_bench_on_cpu_says_so_and_times_only_torch(tmp_path, capsys):
    assert main(["bench", "--ops", "pairwise_sqdist", "--out", str(tmp_path), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "No CUDA device" in out and "all checks passed" in out
    (path,) = tmp_path.glob("bench-cpu-*.json")
    data = json.loads(path.read_text())
    assert {"device", "torch", "triton", "git_sha"} <= set(data["environment"])
    providers = {r["provider"] for r in data["rows"]}
    assert providers == {"reference", "compiled"}  # nothing interpreted is timed
    assert all(r["ms"] > 0 and "frac_of_ceiling" not in r for r in data["rows"])


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "fastvq", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "bench" in out.stdout and "check" in out.stdout
