"""`python -m fastvq check | bench` as a user runs them, and the bench registry."""

import ast
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

from fastvq import check as check_mod
from fastvq.__main__ import main
from fastvq.bench import harness, registry
from fastvq.bench.registry import OP_ROWS, PEER_ROWS, STEP_ROWS, Case, register

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_check_passes_and_prints_table(capsys):
    assert main(["check", "--ops", "pairwise_sqdist", "nearest_code", "--dtypes", "float32", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert len(re.findall(r"^\w+ +\w+ +PASS ", out, re.M)) == 4 and " FAIL " not in out and "all checks passed" in out


def test_check_fails_loudly(monkeypatch, capsys):
    monkeypatch.setitem(check_mod.CHECKS, "pairwise_sqdist", lambda device, dtype: 1.5)
    assert main(["check", "--ops", "pairwise_sqdist", "--dtypes", "float32"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_check_fails_on_a_second_nearest_code_and_a_zero_gradient(monkeypatch, capsys):
    import fastvq
    import fastvq.testing as ft

    def second_nearest(x, codebook, metric="l2", **kwargs):
        d = ft.distances64(x.reshape(-1, x.shape[-1]), codebook, metric)[0]
        idx = d.topk(2, dim=1, largest=False).indices[:, 1:]
        return idx.reshape(x.shape[:-1]), d.gather(1, idx).float().reshape(x.shape[:-1])

    monkeypatch.setattr(fastvq, "nearest_code", second_nearest)
    monkeypatch.setattr(fastvq, "rotation_trick", lambda e, q: q + 0.0 * e)  # forward exact, gradient zero
    assert main(["check", "--ops", "nearest_code", "rotation_trick", "--dtypes", "bfloat16"]) == 1
    out = capsys.readouterr().out
    assert re.findall(r"^(\w+) +bfloat16 +FAIL ", out, re.M) == ["nearest_code", "rotation_trick"]
    assert "2 check(s) FAILED" in out


def test_check_reports_a_crash_as_fail(monkeypatch, capsys):
    def boom(device, dtype):
        raise RuntimeError("kernel exploded")

    monkeypatch.setitem(check_mod.CHECKS, "pairwise_sqdist", boom)
    assert main(["check", "--ops", "pairwise_sqdist", "--dtypes", "float32"]) == 1
    assert "kernel exploded" in capsys.readouterr().out


@pytest.mark.parametrize("command", ["check", "bench"])
def test_unknown_name_lists_the_valid_ones(command, capsys):
    assert main([command, "--ops", "nearest_code", "no_such_op"]) == 2
    err = capsys.readouterr().err
    assert "'no_such_op'" in err and "valid names:" in err and "nearest_code" in err and "pairwise_sqdist" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("argv, says", [
    (["--providers", "nosuch", "--ops", "pairwise_sqdist", "--no-check"], "unknown provider(s) ['nosuch']"),
    (["--traffic", "--ops", "nosuch"], "unknown traffic row(s) ['nosuch']"),
    (["--traffic", "--traffic-scale", "0"], "--traffic-scale: must be a positive integer, got 0"),
    (["--traffic", "--traffic-scale", "-3"], "--traffic-scale: must be a positive integer, got -3"),
    (["--ops", "pairwise_sqdist", "--out", "/proc/no/such/folder"], "--out /proc/no/such/folder: cannot write there"),
    (["--traffic", "--ops", "VectorQuantizer(512, 64) ste", "--traffic-scale", "513"],
     "--traffic-scale 513 is too large: at most 64"),
], ids=["provider", "traffic-row", "scale-0", "scale-negative", "out", "scale-too-large"])
def test_bench_rejects_bad_arguments_by_name(argv, says, tmp_path, capsys):
    """probe5 CLI2: these ran with empty results (exit 0) or ended in a traceback."""
    if "--out" not in argv:
        argv = [*argv, "--out", str(tmp_path)]
    try:
        code = main(["bench", *argv])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing written


@pytest.mark.parametrize("argv, says", [
    (["--traffic", "--providers", "fastvq"], "--traffic does not take --providers"),
    (["--traffic", "--quick", "--no-plot"], "--traffic does not take --quick, --no-plot"),
    (["--list", "--providers", "reference"], "--list does not take --providers"),
    (["--list", "--out", "{tmp}/new"], "--list does not take --out"),
    (["--ops", "pairwise_sqdist", "--traffic-scale", "2"], "--traffic-scale needs --traffic"),
    (["--list", "--traffic", "--ops", "QR"], "--list does not take --ops"),  # (--list --traffic: the rows)
    (["--traffic", "--list", "--traffic-scale", "2"], "--list does not take --traffic-scale"),
    (["--ops", "pairwise_sqdist", "--name", "sub/stem"], "--name is a file stem, not a path"),
    (["--ops", "pairwise_sqdist", "--out", ""], "--out must not be empty"),
    (["--traffic", "--name", ""], "--name must not be empty"),
], ids=["traffic-providers", "traffic-timing-flags", "list-providers", "list-out", "scale-without-traffic",
        "list-traffic", "traffic-list", "name-path", "empty-out", "empty-name"])
def test_bench_rejects_options_it_would_ignore(argv, says, tmp_path, capsys, monkeypatch):
    """probe6 C: --providers was ignored without a word under --traffic and --list, and --out was
    made even for --list; probe7 C1, C3, C4: --list --traffic ran the traffic count, --name
    sub/stem ended in a traceback after the timing, and empty values passed as not given."""
    monkeypatch.chdir(tmp_path)  # (nothing may be written, here either)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    with pytest.raises(SystemExit) as exc:
        main(["bench", *argv])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("out", ["a/b", "new/../x"])
def test_bench_out_is_made_only_when_results_are_written(out, tmp_path, capsys, monkeypatch):
    """probe6 C: a run that fails (an unknown name) left its new --out folder behind, empty
    (probe7 C2: and "new/../x" left "new")."""
    monkeypatch.chdir(tmp_path)
    assert main(["bench", "--ops", "no_such_op", "--out", out]) == 2
    assert "no_such_op" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_bench_list_prints_groups_in_run_order(capsys):
    assert main(["bench", "--list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines]
    assert names[0] == "nearest_code" and "vector_quantizer_step" in names
    weights = [int(line.split()[2]) for line in lines]
    assert weights == sorted(weights)  # op rows first, then training steps, then peers


# --------------------------------------------------------------------------- registry


def _fake_cases(device, quick):
    def make(dev):
        return (torch.randn(64, 8, device=dev),)

    return [Case(op="fake op", shape={"N": 64}, dtype=torch.float32, make=make,
                 providers={"reference": lambda x: x * 2, "compiled": lambda x: x + 1, "fastvq": lambda x: x},
                 bytes=2 * 64 * 8 * 4)]


@pytest.fixture
def fake_groups():
    register("fake_step", _fake_cases, weight=STEP_ROWS)
    register("fake_peer", _fake_cases, weight=PEER_ROWS, requires=("surely_not_an_installed_package",))
    register("fake_op", _fake_cases, weight=OP_ROWS)
    yield
    for name in ("fake_step", "fake_peer", "fake_op"):
        registry.unregister(name)


def test_registry_orders_by_weight_and_skips_missing_packages(fake_groups, device):
    order = registry.names()
    assert order.index("fake_op") < order.index("fake_step") < order.index("fake_peer")
    assert order.index("pairwise_kl_loss") < order.index("fake_step")  # op rows before steps
    notes = []
    cases = registry.build_cases(device, True, ops=["fake_peer", "fake_step"], notes=notes)
    assert len(cases) == 1 and notes == ["skipped fake_peer: needs surely_not_an_installed_package (not installed)"]
    with pytest.raises(ValueError, match="already registered"):
        register("fake_op", lambda device, quick: [])
    with pytest.raises(ValueError, match="flops or bytes"):
        Case(op="x", shape={}, dtype=torch.float32, make=None, providers={})


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour of bench")
def test_bench_on_cpu_times_torch_only_and_writes_table_json_markdown_plot(fake_groups, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert main(["bench", "--ops", "fake_op", "fake_peer", "--out", str(tmp_path), "--name", "run"]) == 0
    out = capsys.readouterr().out
    assert "No CUDA device" in out and "skipped fake_peer" in out
    data = json.loads((tmp_path / "run.json").read_text())
    assert {"device", "torch", "triton", "git_sha", "date"} <= set(data["environment"])
    assert {r["provider"] for r in data["rows"]} == {"reference", "compiled"}  # nothing interpreted is timed
    assert all(r["ms"] > 0 and r["gbs"] > 0 and "frac_of_ceiling" not in r for r in data["rows"])
    assert (tmp_path / "run.png").stat().st_size > 1000  # a plot on every run that timed something
    md = (tmp_path / "run.md").read_text()
    assert "| case | provider | ms | GB/s |" in md and md.count("| fake op[N=64,float32] |") == 2
    # the table is aligned: every column starts at the same offset on every line
    table = out[out.index("case  "):].splitlines()[:4]
    starts = [line.index("reference") if "reference" in line else line.index("compiled") for line in table[2:]]
    assert starts[0] == starts[1] == table[0].index("provider")
    assert len({len(line) for line in table[1:4]}) == 1  # rule and both rows end on the same column


def test_bench_cut_short_keeps_its_rows(fake_groups, tmp_path):
    def two_cases(device, quick):
        first = _fake_cases(device, quick)[0]

        def interrupted(dev):
            raise KeyboardInterrupt  # what `timeout`'s SIGTERM becomes inside the bench

        second = Case(op="never", shape={}, dtype=torch.float32, make=interrupted, providers={}, bytes=1)
        return [first, second]

    register("fake_two", two_cases)
    try:
        assert harness.run_bench(ops=["fake_two"], out_dir=str(tmp_path), name="cut", check=False) == 130
    finally:
        registry.unregister("fake_two")
    rows = json.loads((tmp_path / "cut.json").read_text())["rows"]
    assert {r["op"] for r in rows} == {"fake op"} and (tmp_path / "cut.md").exists()


def test_progress_bar_shows_only_after_a_few_seconds(fake_groups, tmp_path, monkeypatch):
    import tqdm.auto

    seen = {}
    real = tqdm.auto.tqdm

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", spy)
    assert harness.run_bench(ops=["fake_op"], out_dir=str(tmp_path), plot=False, check=False) == 0
    assert 0 < seen["delay"] <= 5


def test_bench_and_cases_do_not_import_each_other():
    def imports(path):
        tree = ast.parse(path.read_text())
        out = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                out.add(("." * node.level) + (node.module or ""))
                out.update(("." * node.level) + a.name for a in node.names if node.module is None)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
        return out

    bench = ROOT / "fastvq" / "bench"
    harness_imports = imports(bench / "harness.py")
    assert not any(m.endswith("cases") or m.endswith("steps") for m in harness_imports), harness_imports
    for rows in ("cases.py", "steps.py"):
        assert not any(m.endswith("harness") for m in imports(bench / rows))
    assert not any(m.endswith(("harness", "cases", "steps")) for m in imports(bench / "registry.py"))


def test_no_pytest_benchmark_front_end():
    # `python -m fastvq bench` is the only one: no second harness that could time interpreted kernels
    assert not list((ROOT / "benchmarks").glob("bench_*.py"))
    assert not (ROOT / "benchmarks" / "_harness.py").exists()


def test_module_entry_point():
    out = subprocess.run([sys.executable, "-m", "fastvq", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "bench" in out.stdout and "check" in out.stdout


def test_output_into_a_closed_pipe_ends_quietly():
    """``python -m fastvq bench --list | head -1`` printed a BrokenPipeError traceback when
    ``head`` closed the pipe first (here: a pipe whose reader is closed before the start)."""
    r, w = os.pipe()
    os.close(r)
    try:
        out = subprocess.run([sys.executable, "-m", "fastvq", "bench", "--list"], stdout=w, stderr=subprocess.PIPE,
                             text=True)
    finally:
        os.close(w)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr


# --------------------------------------------------------------------------- what check covers


def _decorated_launchers():
    """(module, name) of every function decorated ``@launcher`` in kernels/*.py (read from the source)."""
    out = []
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.FunctionDef) and any(
                    (d.id if isinstance(d, ast.Name) else getattr(d, "attr", None)) == "launcher"
                    for d in node.decorator_list):
                out.append((f"fastvq.kernels.{path.stem}", node.name))
    return out


def test_default_check_runs_every_launcher(monkeypatch, capsys):
    # the ops import their launcher from its module when they run: a spy on the module attribute
    # sees every call the check makes (float32 only: which launchers run does not depend on dtype)
    import importlib

    launchers = _decorated_launchers()
    assert len(launchers) >= 17, launchers
    called = set()
    for mod_name, name in launchers:
        mod = importlib.import_module(mod_name)

        def spy(*args, _real=getattr(mod, name), _key=(mod_name, name), **kwargs):
            called.add(_key)
            return _real(*args, **kwargs)

        monkeypatch.setattr(mod, name, spy)
    assert main(["check", "--dtypes", "float32"]) == 0
    assert "all checks passed" in capsys.readouterr().out
    missing = [f"{m}.{n}" for m, n in launchers if (m, n) not in called]
    assert not missing, f"launchers the default check never runs: {missing}"


@pytest.mark.parametrize("wrong", ["grad_x", "grad_codebooks", "rotation_as_ste"])
def test_check_fails_on_a_wrong_residual_quantize_step_backward(wrong, monkeypatch, capsys):
    import fastvq

    real = fastvq.residual_quantize_step

    def off(x, codebooks, **kwargs):
        if wrong == "rotation_as_ste":
            kwargs["grad"] = "ste"  # values unchanged, the straight-through gradient where rotation was asked
        out = real(x, codebooks, **kwargs)
        if wrong == "grad_x":  # same values, 1.01 times the gradient reaching x through quantized
            return out._replace(quantized=out.quantized + 0.01 * (out.quantized - out.quantized.detach()))
        if wrong == "grad_codebooks":  # same values, 1.01 times the codebooks' gradient
            e = out.embedding_loss
            return out._replace(embedding_loss=e + 0.01 * (e - e.detach()))
        return out

    monkeypatch.setattr(fastvq, "residual_quantize_step", off)
    assert main(["check", "--ops", "residual_quantize_step", "--dtypes", "float32", "bfloat16"]) == 1
    out = capsys.readouterr().out
    assert re.findall(r"^residual_quantize_step +(\w+) +FAIL ", out, re.M) == ["float32", "bfloat16"], out


def test_bench_matmul_precision_applies_to_the_run_and_is_recorded(tmp_path, capsys):
    # --matmul-precision high: every float32 row of the run (fastvq's modules, the seeds, peers)
    # uses TF32 on a GPU, as a training script that sets it would; the results say which
    import json

    before = torch.get_float32_matmul_precision()
    try:
        assert main(["bench", "--ops", "pairwise_sqdist", "--quick", "--no-check", "--no-plot", "--out", str(tmp_path),
                     "--name", "b", "--matmul-precision", "high"]) == 0
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["environment"]["float32_matmul_precision"] == "high"
    assert "float32 matmul precision high" in (tmp_path / "b.md").read_text()
