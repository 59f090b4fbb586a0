"""The one dispatch point: backend selection, no silent fallback, kernels really launched."""

import os
import subprocess
import sys

import pytest
import torch

import fastvq
from fastvq import _backend
from fastvq.kernels import pairwise_sqdist as k_pairwise


@pytest.fixture
def count_launches(monkeypatch):
    calls = []
    real = k_pairwise.pairwise_sqdist_fwd

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(k_pairwise, "pairwise_sqdist_fwd", counting)
    return calls


def test_default_is_auto(monkeypatch):
    monkeypatch.delenv("FASTVQ_BACKEND", raising=False)
    fastvq.set_backend(None)
    assert fastvq.get_backend() == "auto"


def test_env_var_then_set_backend_then_context(monkeypatch):
    monkeypatch.setenv("FASTVQ_BACKEND", "reference")
    assert fastvq.get_backend() == "reference"
    try:
        fastvq.set_backend("triton")
        assert fastvq.get_backend() == "triton"
        with fastvq.backend("reference"):
            assert fastvq.get_backend() == "reference"
            with fastvq.backend("auto"):
                assert fastvq.get_backend() == "auto"
            assert fastvq.get_backend() == "reference"
        assert fastvq.get_backend() == "triton"
    finally:
        fastvq.set_backend(None)


@pytest.mark.about_devices("a device name is not a backend name")
@pytest.mark.parametrize("bad", ["cuda", "", "Triton2", None])
def test_unknown_backend(bad):
    with pytest.raises(ValueError, match="backend"):
        with fastvq.backend(bad):
            pass


def test_bad_env_var(monkeypatch):
    monkeypatch.setenv("FASTVQ_BACKEND", "fast")
    with pytest.raises(ValueError, match="FASTVQ_BACKEND"):
        fastvq.get_backend()


def test_triton_backend_launches_kernel(count_launches):
    a, b = torch.randn(5, 3), torch.randn(4, 3)
    with fastvq.backend("triton"):
        fastvq.pairwise_sqdist(a, b)
    assert len(count_launches) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU tensors only")
@pytest.mark.parametrize("name", ["auto", "reference"])
def test_cpu_tensors_use_reference(count_launches, name):
    with fastvq.backend(name):
        fastvq.pairwise_sqdist(torch.randn(5, 3), torch.randn(4, 3))
    assert count_launches == []


def test_triton_on_cpu_without_interpreter_raises(monkeypatch, count_launches):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with fastvq.backend("triton"):
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            fastvq.pairwise_sqdist(torch.randn(5, 3), torch.randn(4, 3))
    assert count_launches == []


def test_backward_follows_backend(monkeypatch):
    # the backward runs under the backend in force when it runs; here: the whole step in one block
    a = torch.randn(6, 4, requires_grad=True)
    with fastvq.backend("triton"):
        fastvq.pairwise_sqdist(a, torch.randn(3, 4)).sum().backward()
    assert a.grad is not None and torch.isfinite(a.grad).all()


def test_use_triton_is_the_only_dispatch():
    # every op module decides through _backend.use_triton, never on its own
    import pathlib

    ops = pathlib.Path(fastvq.__file__).parent / "ops"
    for f in ops.glob("*.py"):
        text = f.read_text()
        assert "is_cuda" not in text and "TRITON_INTERPRET" not in text, f"{f.name} dispatches by itself"


@pytest.fixture
def deterministic_mode():
    """``torch.use_deterministic_algorithms`` for one test, restored after it."""
    before, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    yield torch.use_deterministic_algorithms
    torch.use_deterministic_algorithms(before, warn_only=warn_only)


@pytest.mark.about_devices("the alert depends on the device type named, nothing runs there")
def test_alert_nondeterministic_follows_torchs_mode(deterministic_mode):
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    _backend.alert_nondeterministic("fastvq.x", cuda)  # mode off: nothing
    deterministic_mode(True)
    _backend.alert_nondeterministic("fastvq.x", cpu)  # the interpreter runs programs in order
    with pytest.raises(RuntimeError, match="fastvq.x does not have a deterministic implementation"):
        _backend.alert_nondeterministic("fastvq.x", cuda)
    deterministic_mode(True, warn_only=True)
    with pytest.warns(UserWarning, match="fastvq.x does not have a deterministic implementation"):
        _backend.alert_nondeterministic("fastvq.x", cuda)


@pytest.mark.about_devices("CPU launches stand in for CUDA ones (ATOMIC_DEVICE_TYPES patched)")
def test_atomic_kernels_alert_and_deterministic_flags_follow_torchs_mode(deterministic_mode, monkeypatch):
    # fuzzD: under torch.use_deterministic_algorithms(True) the float32 atomics ran silently
    from fastvq.kernels import code_statistics as k_stats
    from fastvq.kernels import qr_lookup as k_qr

    monkeypatch.setattr(_backend, "ATOMIC_DEVICE_TYPES", ("cuda", "cpu"))
    flags = []  # the deterministic argument each launcher got
    stats_fwd, qr_bwd = k_stats.code_statistics_fwd, k_qr.qr_lookup_bwd

    def spy_stats(*args):
        flags.append(args[5])
        return stats_fwd(*args)

    def spy_qr(*args):
        flags.append(args[8])
        return qr_bwd(*args)

    monkeypatch.setattr(k_stats, "code_statistics_fwd", spy_stats)
    monkeypatch.setattr(k_qr, "qr_lookup_bwd", spy_qr)
    g = torch.Generator().manual_seed(0)
    x, cb = torch.randn(6, 4, generator=g), torch.randn(1, 5, 4, generator=g)
    q, r = torch.randn(4, 3, generator=g, requires_grad=True), torch.randn(3, 3, generator=g, requires_grad=True)
    ids = torch.tensor([0, 5, 7, 5])
    with fastvq.backend("triton"):
        fastvq.residual_quantize_step(x, cb, statistics=True)  # mode off: no alert
        fastvq.code_statistics(x, torch.arange(6) % 5, 5, deterministic=False)
        fastvq.qr_lookup(ids, q, r, deterministic=False).sum().backward()
        assert flags == [False, False]
        deterministic_mode(True)
        with pytest.raises(RuntimeError, match="fastvq.residual_quantize_step's codebook statistics"):
            fastvq.residual_quantize_step(x, cb, statistics=True)
        step = fastvq.residual_quantize_step(x, cb.requires_grad_(True))  # no statistics: no alert
        with pytest.raises(RuntimeError, match="fastvq.residual_quantize_step's codebook gradient"):
            (step.quantized.sum() + step.embedding_loss).backward()
        fastvq.code_statistics(x, torch.arange(6) % 5, 5, deterministic=False)
        fastvq.qr_lookup(ids, q, r, deterministic=False).sum().backward()
        assert flags == [False, False, True, True]  # the sorted paths ran


@pytest.mark.about_devices("CPU launches stand in for CUDA ones (ATOMIC_DEVICE_TYPES patched)")
def test_quantizers_train_under_deterministic_mode_from_sorted_statistics(deterministic_mode, monkeypatch):
    # review8: under the mode the modules' fused atomic statistics raised, so no quantizer could
    # train; they now take the statistics from the sorted code_statistics, the same update
    from fastvq.kernels import code_statistics as k_stats
    from fastvq.nn import ResidualQuantizer, VectorQuantizer

    calls = []
    real = k_stats.code_statistics_fwd
    monkeypatch.setattr(k_stats, "code_statistics_fwd", lambda *a: calls.append(a[5]) or real(*a))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 4, generator=g)
    x[3] = float("nan")
    mask = torch.rand(40, generator=g) > 0.2
    mask[3] = True  # the NaN row is a real row: left out and counted, once per step
    for make in (lambda: VectorQuantizer(6, 4, ema=True, dead_code_threshold=1.0),
                 lambda: ResidualQuantizer(3, 6, 4, ema=True, dead_code_threshold=1.0),
                 lambda: ResidualQuantizer(2, 6, 4, dead_code_threshold=1.0)):  # usage EMA, grad-trained
        states = []
        for mode in (False, True):
            torch.manual_seed(1)
            m = make()
            monkeypatch.setattr(_backend, "ATOMIC_DEVICE_TYPES", ("cuda", "cpu") if mode else ("cuda",))
            deterministic_mode(mode)
            with fastvq.backend("triton"):
                for _ in range(2):
                    m(x, mask=mask)
            deterministic_mode(False)
            states.append({**m.state_dict(), "nonfinite_rows": m.nonfinite_rows, "codes_revived": m.codes_revived})
        for key, value in states[0].items():
            assert torch.allclose(states[1][key], value, rtol=1e-6, atol=1e-6), (make, key)
        assert int(states[1]["nonfinite_rows"]) == 2  # (EMA: every code starts dead and is revived)
        assert int(states[1]["codes_revived"]) > 0 or "cluster_size" not in states[1]
    assert calls and all(calls)  # the sorted path ran, for every module


@pytest.mark.about_devices("CPU launches stand in for CUDA ones (ATOMIC_DEVICE_TYPES patched)")
@pytest.mark.xfail(strict=True, raises=AssertionError, reason="known limit (README): deterministic mode's level inputs keep a residual "
                   "that overflowed float32 at +inf; the exact chain in torch cost 6x the passes")
@pytest.mark.parametrize("backend_name", ["reference", "triton"])
def test_deterministic_statistics_count_a_row_whose_residual_comes_back(deterministic_mode, monkeypatch,
                                                                        backend_name):
    # review9: x = 3e38 picks -2e38 at level 0; its residual 5e38 overflows float32 and is held
    # at a power-of-two scale, then 3e38 brings it back to 2e38, which the fused step's level 2
    # counts. The sorted path's level inputs stay +inf from level 1 on, so level 2's statistics
    # leave the row out (and count it in nonfinite_rows): the known limit this test holds
    states = []
    for mode in (False, True):
        torch.manual_seed(0)
        m = fastvq.nn.ResidualQuantizer(3, 1, 1, ema=True, decay=0.5).train()
        with torch.no_grad():
            m.codebooks.copy_(torch.tensor([[[-2e38]], [[3e38]], [[1.0]]]))
            m.embed_avg.copy_(m.codebooks * m.cluster_size.unsqueeze(-1))
        monkeypatch.setattr(_backend, "ATOMIC_DEVICE_TYPES", ("cuda", "cpu") if mode else ("cuda",))
        deterministic_mode(mode)
        with fastvq.backend(backend_name):
            m(torch.tensor([[3e38], [1.0]]))
        deterministic_mode(False)
        states.append({**m.state_dict(), "nonfinite_rows": m.nonfinite_rows})
    assert states[0]["cluster_size"][2, 0] > 0  # the fused step counts the row that came back
    for key, value in states[0].items():
        assert torch.equal(states[1][key], value), key


def test_import_from_source_tree_without_install(tmp_path):
    # PYTHONPATH=<repo> (how the GPU image runs it) must find fastvq.kernels in kernels/
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = "import fastvq.kernels.pairwise_sqdist as m, os; print(os.path.dirname(m.__file__))"
    env = dict(os.environ, PYTHONPATH=repo)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # (resolved: a checkout that links fastvq/kernels to ../kernels reaches the same files; taudit F8)
    assert os.path.realpath(out.stdout.strip()) == os.path.realpath(os.path.join(repo, "kernels"))


def test_source_tree_maps_only_kernels(tmp_path):
    # Only kernels/ is mapped into fastvq; the rest of the checkout (tests/, benchmarks/) is not.
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import importlib.util as u, fastvq\n"
        "print(u.find_spec('fastvq.tests') is None, u.find_spec('fastvq.benchmarks') is None)"
    )
    env = dict(os.environ, PYTHONPATH=repo)
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "True"]


def test_source_tree_finder_used_when_not_installed(monkeypatch):
    import importlib.util

    from fastvq import _source_tree

    monkeypatch.setattr(sys, "meta_path", [f for f in sys.meta_path if not isinstance(f, _source_tree._KernelsFinder)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.delitem(sys.modules, "fastvq.kernels", raising=False)
    _source_tree.map_kernels()
    finders = [f for f in sys.meta_path if isinstance(f, _source_tree._KernelsFinder)]
    assert len(finders) == 1
    spec = finders[0].find_spec("fastvq.kernels", None)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert spec.submodule_search_locations == [os.path.join(repo, "kernels")]
    assert finders[0].find_spec("fastvq.other", None) is None


def test_no_top_level_kernels_package_is_installed():
    tomllib = pytest.importorskip("tomllib")

    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(repo, "pyproject.toml"), "rb") as f:
        cfg = tomllib.load(f)["tool"]["setuptools"]
    assert "kernels" not in cfg["packages"]
    assert cfg["package-dir"]["fastvq.kernels"] == "kernels"
    assert all(p == "fastvq" or p.startswith("fastvq.") for p in cfg["packages"])


# ------------------------------------------------------------------ mutation round D (mutD): behaviour no test pinned


def test_backend_names_are_case_insensitive(monkeypatch):
    # D39: _validate accepts "Reference" (it lowers the name to check it) and must return the
    # lowered name: kept as given, get_backend() said "Reference", which use_triton reads as
    # neither "reference" nor "auto", so the Triton kernels ran where the reference was asked for.
    from fastvq._backend import use_triton

    x = torch.zeros(2, 3)
    with fastvq.backend("Reference"):
        assert fastvq.get_backend() == "reference"
        assert not use_triton("nearest_code", x)
    monkeypatch.setenv("FASTVQ_BACKEND", "REFERENCE")
    assert fastvq.get_backend() == "reference"
    try:
        fastvq.set_backend("Auto")
        assert fastvq.get_backend() == "auto"
    finally:
        fastvq.set_backend(None)


def test_a_backend_block_that_ends_first_removes_only_its_own_entry():
    # D40: blocks in two threads can end out of order (the docstring: "each block's end removes
    # its own entry, so the others keep theirs"); popping the innermost entry instead removed the
    # other thread's choice and left this one's in force.
    before = fastvq.get_backend()
    outer, inner = fastvq.backend("reference"), fastvq.backend("triton")
    outer.__enter__()
    inner.__enter__()
    try:
        outer.__exit__(None, None, None)  # (the thread that entered first ends first)
        assert fastvq.get_backend() == "triton"
    finally:
        inner.__exit__(None, None, None)
    assert fastvq.get_backend() == before
