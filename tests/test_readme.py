"""The README's usage snippet runs as written, under both backends."""

import json
import os
import pathlib
import re
import sys

import torch

import fastvq
from tests import _background

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _run_snippet(backend: str) -> dict:
    """Run the README's first python block under ``backend``; what the test checks of its names."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    torch.manual_seed(0)
    scope: dict = {}
    with fastvq.backend(backend):
        exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102
    return {"indices": list(scope["indices"].shape), "ids": list(scope["ids"].shape),
            "e_grad_finite": scope["e"].grad is not None and bool(torch.isfinite(scope["e"].grad).all())}


def _snippet_job(scratch: str):
    """The interpreted (CPU) triton run: a minute of one core, so beside the suite (tests/_background.py)."""
    code = ("import json, os; os.environ['TRITON_INTERPRET'] = '1'\n"
            "from tests import _interpreter_speed; _interpreter_speed.install()\n"
            "from tests.test_readme import _run_snippet\n"
            "print('RESULT ' + json.dumps(_run_snippet('triton')))\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return [sys.executable, "-c", code], env, str(README.parent), 900


if not torch.cuda.is_available():
    _background.register("readme-triton", "tests/test_readme.py::test_usage_snippet_runs[triton]", _snippet_job)


def test_usage_snippet_runs(backend):
    if backend == "triton" and not torch.cuda.is_available():
        job = _background.result("readme-triton")
        lines = [line for line in job.stdout.splitlines() if line.startswith("RESULT ")]
        assert job.returncode == 0 and lines, job.stderr[-4000:]
        got = json.loads(lines[-1][len("RESULT "):])
    else:
        got = _run_snippet(backend)
    assert got["indices"] == [8, 100] and got["ids"] == [800, 5]
    assert got["e_grad_finite"]


def test_readme_names_the_test_command_that_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    command = [line for line in ci.splitlines() if line.startswith("python3 -m venv")][0]
    assert command in README.read_text()
