"""The README's usage snippet runs as written, under both backends."""

import pathlib
import re

import torch

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_usage_snippet_runs(backend):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python block"
    torch.manual_seed(0)
    scope: dict = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)  # noqa: S102
    assert scope["indices"].shape == (8, 100) and scope["ids"].shape == (800, 5)
    assert scope["e"].grad is not None and torch.isfinite(scope["e"].grad).all()


def test_readme_names_the_test_command_that_ci_runs():
    ci = (README.parent / ".ci" / "run").read_text()
    command = [line for line in ci.splitlines() if line.startswith("python3 -m venv")][0]
    assert command in README.read_text()
