"""benchmarks/gpu_run.sh cannot rot: its --dry-run (the same steps on CPU, one test per file,
a quick check and bench) runs here and leaves what the device tool can bring back."""

import importlib.util
import json
import os
import pathlib
import re
import xml.etree.ElementTree as ET

import pytest
import torch

from tests import _background

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _dry_run_job(scratch: str):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FASTVQ_", "PYTEST_"))}
    env["OUT"] = scratch
    env.setdefault("PYTHON", str(pathlib.Path(os.sys.executable)))
    return ["bash", str(ROOT / "benchmarks" / "gpu_run.sh"), "--dry-run"], env, str(ROOT), 300


if not torch.cuda.is_available():  # runs beside the suite (tests/_background.py)
    _background.register("gpu-run-dry-run", "tests/test_gpu_run.py::test_dry_run", _dry_run_job)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU smoke run (on a GPU run the real one)")
def test_dry_run():
    res = _background.result("gpu-run-dry-run")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (folder,) = pathlib.Path(res.scratch).iterdir()  # <date>-<slug>/, one level under $OUT
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}-dry-run-cpu", folder.name)
    files = sorted(p.name for p in folder.iterdir())
    # at most 8, names the device tool brings back; the plot needs matplotlib (the bench extra),
    # which the test extra does not install
    expected = ["bench.json", "bench.log", "bench.md", "bench.png", "check.txt", "env.txt", "tests.log", "tests.xml"]
    if importlib.util.find_spec("matplotlib") is None:
        expected.remove("bench.png")
    assert files == expected
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    env_txt = (folder / "env.txt").read_text()
    assert "torch" in env_txt and "triton" in env_txt and "git:" in env_txt
    suite = ET.parse(folder / "tests.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite[0]
    n_files = len(list((ROOT / "tests").rglob("test_*.py")))
    assert n_files // 2 <= int(suite.get("tests")) <= n_files  # one per file (minus deselected and skipped files)
    assert int(suite.get("failures")) == 0 and int(suite.get("errors")) == 0
    assert "all checks passed" in (folder / "check.txt").read_text()
    rows = json.loads((folder / "bench.json").read_text())["rows"]
    assert {r["op"] for r in rows} >= {"pairwise_sqdist"} and all(r.get("ms", 0) > 0 for r in rows)
    assert "tests exit 0, check exit 0" in res.stdout
