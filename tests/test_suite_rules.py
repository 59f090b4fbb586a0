"""Rules that keep the suite runnable on either device (and reproducible), checked on its source.

The same tests run on CUDA tensors on a GPU machine and under the Triton interpreter on CPU: the
device comes from the ``device`` fixture or the helpers' default (``tests.utils.DEVICE``; on CUDA
also ``torch.set_default_device``). A hard-coded device in a test would make it test the wrong
device (or fail with a device mismatch) on the other machine, so the test files may not contain:

- the strings ``"cpu"``, ``"cuda"``, ``"cuda:N"`` (use the ``device`` fixture);
- ``.cpu()`` / ``.cuda()`` calls (use ``.to(device)``, or ``.numpy(force=True)``);
- ``torch.Generator()`` without a device (use ``tests.utils.generator(seed)``).

A test that is about devices (multi-GPU placement, a device name as bad input) says so with
``@pytest.mark.about_devices("why")`` on the function (a module-level ``pytestmark`` for a whole
file); the reason is required.
"""

import ast
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.about_devices("scans the suite for device literals")

TESTS = pathlib.Path(__file__).resolve().parent
DEVICE_STRINGS = {"cpu", "cuda"}


def _is_exempt_marker(dec: ast.expr) -> bool:
    # @pytest.mark.about_devices("reason")
    return (isinstance(dec, ast.Call) and isinstance(dec.func, ast.Attribute) and dec.func.attr == "about_devices"
            and len(dec.args) == 1 and isinstance(dec.args[0], ast.Constant)
            and isinstance(dec.args[0].value, str) and dec.args[0].value.strip() != "")


def _module_exempt(tree: ast.Module) -> bool:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in node.targets):
            vals = node.value.elts if isinstance(node.value, (ast.List, ast.Tuple)) else [node.value]
            if any(_is_exempt_marker(v) for v in vals):
                return True
    return False


def violations(source: str, filename: str = "<test>") -> list[str]:
    """Hard-coded devices in ``source`` outside ``about_devices`` tests, as ``file:line: what``."""
    tree = ast.parse(source)
    if _module_exempt(tree):
        return []
    exempt: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and any(
                _is_exempt_marker(d) for d in node.decorator_list):
            exempt.update(id(n) for n in ast.walk(node))
    found = []
    for node in ast.walk(tree):
        if id(node) in exempt:
            continue
        what = None
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            v = node.value
            if v in DEVICE_STRINGS or (v.startswith("cuda:") and v[5:].isdigit()):
                what = f"device literal {v!r}"
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr in ("cpu", "cuda") and not node.args and not node.keywords:
                what = f".{node.func.attr}()"
            elif (node.func.attr == "Generator" and isinstance(node.func.value, ast.Name)
                  and node.func.value.id == "torch" and not node.args
                  and not any(k.arg == "device" for k in node.keywords)):
                what = "torch.Generator() without a device (use tests.utils.generator(seed))"
        if what:
            found.append(f"{filename}:{node.lineno}: {what}")
    return found


def test_no_hard_coded_devices_in_tests():
    found = []
    for path in sorted(TESTS.rglob("test_*.py")):
        found += violations(path.read_text(), str(path.relative_to(TESTS.parent)))
    assert not found, ("tests must take their device from the `device` fixture or the helpers' default "
                       "(or be marked @pytest.mark.about_devices(\"why\")):\n" + "\n".join(found))


@pytest.mark.parametrize("code", [
    'x = torch.randn(3, device="cuda")',
    "x = torch.randn(3).cuda()",
    "y = x.cpu()",
    "d = torch.device('cpu')",
    'x = randn(4, device="cuda:1")',
    "g = torch.Generator().manual_seed(0)",
    'def test_a():\n    x = torch.zeros(2, device="cpu")',
    'class T:\n    def test_b(self):\n        return "cuda"',
], ids=lambda c: c.split("\n")[-1].strip()[:40])
def test_the_scan_catches(code):
    assert violations(code)


@pytest.mark.parametrize("code", [
    "x = torch.randn(3, device=device)",
    'x = torch.randn(3, device="meta")',
    "g = torch.Generator(device=device).manual_seed(0)",
    "ok = torch.cuda.is_available()",
    '"""Runs on cpu or cuda: a docstring names them freely."""',
    '@pytest.mark.about_devices("placement on the second GPU")\ndef test_c():\n    x = randn(2, device="cuda:1")',
    'pytestmark = pytest.mark.about_devices("compiles for sm_90")\nx = "cuda"',
], ids=lambda c: c.split("\n")[-1].strip()[:40])
def test_the_scan_allows(code):
    assert not violations(code)


def test_the_exemption_needs_a_reason():
    assert violations('@pytest.mark.about_devices()\ndef test_d():\n    x = "cpu"')
    assert violations('@pytest.mark.about_devices("")\ndef test_d():\n    x = "cpu"')


# --------------------------------------------------------------------------- seeded randomness


def test_every_test_is_seeded_from_its_node_id(request, seeded):
    from tests.conftest import seed_of
    from tests.utils import randn

    assert seeded == seed_of(request.node.nodeid) == request.node.fastvq_seed
    first = randn(5)  # no seed: drawn from the test's stream
    torch.manual_seed(seeded)
    assert torch.equal(randn(5), first)
    assert seed_of("tests/a.py::test_x") != seed_of("tests/a.py::test_y")


def test_a_failure_prints_the_seed_that_replays_it(tmp_path, monkeypatch):
    # a throwaway suite using this conftest: a test that fails and shows a value it drew, one that hangs
    (tmp_path / "conftest.py").write_text("from tests.conftest import *  # noqa: F401,F403\n")
    (tmp_path / "test_draw.py").write_text(
        "import time\n\nfrom tests.utils import randn\n\n"
        "def test_draw():\n    v = float(randn(1))\n    assert v > 1e9, f'drew {v!r}'\n\n"
        "def test_hangs():\n    time.sleep(60)\n")

    def run(shift):
        env = {**os.environ, "PYTHONPATH": str(TESTS.parent), "FASTVQ_TEST_SEED": shift, "FASTVQ_TEST_TIMEOUT": "1"}
        out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:timeout",
                              str(tmp_path)], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300).stdout
        assert "2 failed" in out, out
        # the per-test timeout (gpu_run.sh's fallback when pytest-timeout is missing) fails a hung test
        assert "TimeoutExpired: test_draw.py::test_hangs ran longer than FASTVQ_TEST_TIMEOUT=1 s" in out, out
        return re.search(r"AssertionError: drew (\S+)", out).group(1), out

    v0, out = run("0")
    assert re.search(r"fastvq seed.*\n.*seed \d+ \(node id hash \+ FASTVQ_TEST_SEED=0\); replay: "
                     r"FASTVQ_TEST_SEED=0 python -m pytest 'test_draw.py::test_draw'", out), out
    from tests.conftest import seed_of
    from tests.utils import randn

    torch.manual_seed(seed_of("test_draw.py::test_draw"))
    assert repr(float(randn(1))) == v0  # the printed seed replays the draw
    monkeypatch.setenv("FASTVQ_TEST_SEED", "5")  # another shift, another draw
    torch.manual_seed(seed_of("test_draw.py::test_draw"))
    assert repr(float(randn(1))) != v0


def _strict_xfails_without_raises(tree: ast.AST):
    """Line numbers of ``xfail(..., strict=True)`` calls that do not name ``raises=``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and (getattr(node.func, "attr", None) or getattr(node.func, "id", None)) == "xfail":
            kw = {k.arg: k.value for k in node.keywords}
            strict = kw.get("strict")
            if isinstance(strict, ast.Constant) and strict.value is True and "raises" not in kw:
                yield node.lineno


def test_compiles_work_after_a_test_clears_dynamos_map_of_torch_functions(monkeypatch):
    """``torch.distributed.init_process_group`` clears TorchDynamo's cached map of torch functions;
    rebuilt by name under one test's poisoning wrapper of ``torch.empty_like``, it broke every
    compile of a later test (a new wrapper: dynamo inlined it and met torch's builtin, not in the
    map). The ``poison_empty`` fixture rebuilds the map from torch's own functions first
    (``conftest.rebuild_dynamo_rules``)."""
    import torch._dynamo
    from tests.conftest import _TORCH_EMPTY_LIKE, rebuild_dynamo_rules

    rules = torch._dynamo.trace_rules
    rules.clear_lru_cache()  # as init_process_group does
    rules.get_torch_obj_rule_map()  # rebuilt under this test's wrapper
    assert _TORCH_EMPTY_LIKE not in rules.get_torch_obj_rule_map()
    rebuild_dynamo_rules()  # what the next test's fixture does before it patches
    assert _TORCH_EMPTY_LIKE in rules.get_torch_obj_rule_map()
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: _TORCH_EMPTY_LIKE(*a, **k))  # the next test's wrapper
    torch._dynamo.reset()
    step = torch.compile(lambda x: torch.empty_like(x).fill_(2.0) * x, fullgraph=True, backend="eager")
    x = torch.arange(3.0)
    assert torch.equal(step(x), 2 * x)
    torch._dynamo.reset()


def test_every_strict_xfail_names_what_it_raises():
    # A known limit pinned as a strict xfail says which error shows it: without ``raises=`` a new,
    # unrelated error (a TypeError in the test, an import change) counted as the expected failure
    # (taudit F6)
    found = [f"{path.relative_to(TESTS)}:{line}" for path in sorted(TESTS.rglob("*.py"))
             for line in _strict_xfails_without_raises(ast.parse(path.read_text()))]
    assert not found, f"strict xfails without raises=: {found}"
    caught = list(_strict_xfails_without_raises(ast.parse('@pytest.mark.xfail(strict=True, reason="r")\ndef t(): pass')))
    assert caught == [1]  # (the scan finds the unmarked form)
