"""Shared test setup: one suite for either device.

- The device: with CUDA, every test runs on CUDA tensors (the Triton kernels compiled for the
  GPU): ``torch.set_default_device("cuda")`` is set here, the helpers in tests/utils.py default
  to ``DEVICE``, and the ``device`` fixture returns it; ``gpu``-marked tests (large shapes, low
  precision) run. Autotuning is pinned to one config per kernel (``FASTVQ_AUTOTUNE=0``) so a
  bare machine does not tune hundreds of keys; the benchmark tunes. Without CUDA the kernels run
  under the Triton interpreter on CPU tensors (``TRITON_INTERPRET=1``, set before any fastvq
  kernel module is imported: Triton reads it when a kernel is defined) and ``gpu`` tests skip.
  tests/test_suite_rules.py keeps device literals out of the tests.
- ``backend`` runs a test once per backend ("reference", "triton").
- Every torch.empty / empty_like made while a test runs is poisoned (NaN for floats, a large
  negative sentinel for integers), so an output element a kernel forgets to write fails.
- Seeded randomness: before each test, torch's (CPU and CUDA), Python's and numpy's generators
  are seeded from the test's node id (``seed_of``), so ``randn()`` without a seed and bare
  ``torch.randn`` give the same values on every run. A failing test's report names its seed and
  the command that replays it; ``FASTVQ_TEST_SEED=n`` shifts every test's seed (try other draws).
- ``FASTVQ_TEST_TIMEOUT=s``: a test running longer than ``s`` seconds fails with a TimeoutError
  (SIGALRM; used by benchmarks/gpu_run.sh when pytest-timeout is not installed).
  ``FASTVQ_ONE_PER_FILE=1``: run only the first test of each file (gpu_run.sh --dry-run).
- The sm_90 compile and the GPU script's dry run are subprocesses that start when collection ends
  and run beside the suite on the second core (tests/_background.py). Under pytest-xdist (the
  README's command, ``-n 2 --dist loadfile --no-loadscope-reorder``) each worker runs such a job
  in the test that waits for it, and the files are ordered so those tests start first
  (``_background.xdist_order``).
- Under the interpreter, tests/_interpreter_speed.py removes repeated bookkeeping from Triton's
  interpreter (same results; ``FASTVQ_INTERPRETER_SPEEDUPS=0`` runs the interpreter untouched).
"""

import os
import random
import signal
import sys
import zlib

import torch

CUDA = torch.cuda.is_available()
if CUDA:
    os.environ.setdefault("FASTVQ_AUTOTUNE", "0")
else:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    # One intra-op thread (here and in subprocesses): the tensors are small, and beside the
    # background jobs (tests/_background.py) a second OpenMP thread spin-waits for a busy core
    # (tests/test_example.py: 12 s at 1 thread, 29 s at 2, on 2 cores with one busy).
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if os.environ["TRITON_INTERPRET"] == "1" and os.environ.get("FASTVQ_INTERPRETER_SPEEDUPS", "1") == "1":
        from tests import _interpreter_speed

        _interpreter_speed.install()  # same results, a third less interpreter time (see its docstring)

import pytest  # noqa: E402

import fastvq  # noqa: E402
from tests import _background  # noqa: E402
from tests.utils import BACKENDS, DEVICE  # noqa: E402

if CUDA:
    # an op's invalid-input check raises the CPU's ValueError in tests instead of a device-side
    # assert that would end the process's CUDA context (tests/_device_asserts.py)
    from tests import _device_asserts  # noqa: E402

    _device_asserts.install()
    # after fastvq's imports (its module-level tensors stay where they are), before collection
    # (tensors built in parametrize lists land on the GPU too). Not on CPU: the mode costs time.
    torch.set_default_device(DEVICE)

POISON_INT = -(2**31) + 7


def seed_of(nodeid: str) -> int:
    """The seed of a test: its node id hashed, shifted by ``$FASTVQ_TEST_SEED`` (default 0)."""
    return (zlib.crc32(nodeid.encode()) + int(os.environ.get("FASTVQ_TEST_SEED", "0"))) % (2**31 - 1)


@pytest.fixture(autouse=True)
def seeded(request):
    """Seed every generator a test may draw from; yields the seed."""
    seed = seed_of(request.node.nodeid)
    request.node.fastvq_seed = seed
    torch.manual_seed(seed)  # CPU and every CUDA device
    random.seed(seed)
    try:
        import numpy

        numpy.random.seed(seed)
    except ImportError:  # numpy is optional for the tests
        pass
    yield seed


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    seed = getattr(item, "fastvq_seed", None)
    if rep.failed and seed is not None:
        shift = os.environ.get("FASTVQ_TEST_SEED", "0")
        text = (f"seed {seed} (node id hash + FASTVQ_TEST_SEED={shift}); replay: "
                f"FASTVQ_TEST_SEED={shift} python -m pytest '{item.nodeid}'")
        if hasattr(rep.longrepr, "addsection"):  # in the traceback (and the junit XML's failure text)
            rep.longrepr.addsection("fastvq seed", text)
        else:
            rep.sections.append(("fastvq seed", text))


def pytest_configure(config):
    config.addinivalue_line("markers", "about_devices(reason): the test is about devices and may name one "
                                       "(exempt from tests/test_suite_rules.py)")


def _poison(t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():  # torch.empty(..., requires_grad=True) gives a leaf: fill it untracked
        if t.is_floating_point() or t.is_complex():
            t.fill_(float("nan"))
        elif t.dtype != torch.bool:
            t.fill_(POISON_INT if t.dtype not in (torch.int8, torch.uint8, torch.int16) else -1)
    return t


_TORCH_EMPTY, _TORCH_EMPTY_LIKE = torch.empty, torch.empty_like


def rebuild_dynamo_rules():
    """Make TorchDynamo's cached map of torch functions hold torch's own ``empty`` and
    ``empty_like`` again. ``torch.distributed.init_process_group`` clears that cache (a gloo test
    in this process does), and the next compile rebuilds it by name while a test's poisoning
    wrapper stands in for them: from then on every compile that reaches ``torch.empty_like``
    failed ("Attempted to call function marked as skipped"; test_compileprobe's bitcodes test
    after test_distributed's, in one process)."""
    rules = sys.modules.get("torch._dynamo.trace_rules")
    if rules is None or _TORCH_EMPTY_LIKE in rules.get_torch_obj_rule_map():
        return
    poisoned = torch.empty, torch.empty_like
    torch.empty, torch.empty_like = _TORCH_EMPTY, _TORCH_EMPTY_LIKE
    try:
        rules.clear_lru_cache()
        rules.get_torch_obj_rule_map()
    finally:
        torch.empty, torch.empty_like = poisoned


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    real_empty, real_empty_like = torch.empty, torch.empty_like
    rebuild_dynamo_rules()  # (before the patch: a cache cleared by an earlier test is rebuilt right)

    def empty(*args, **kwargs):
        return _poison(real_empty(*args, **kwargs))

    def empty_like(*args, **kwargs):
        return _poison(real_empty_like(*args, **kwargs))

    monkeypatch.setattr(torch, "empty", empty)
    monkeypatch.setattr(torch, "empty_like", empty_like)
    yield


@pytest.fixture
def unpoisoned(monkeypatch):
    """torch.empty as users have it: a counting test (the traffic meter, the sync probes) would
    see the suite's NaN poisoning of every new buffer as a write."""
    monkeypatch.setattr(torch, "empty", torch._C._VariableFunctions.empty)
    monkeypatch.setattr(torch, "empty_like", torch._C._VariableFunctions.empty_like)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test under each backend; yields the backend name. (A test parametrized with
    :func:`tests.utils.backend_cells` runs its kernel-only cells under "triton" alone.)"""
    with fastvq.backend(request.param):
        yield request.param


@pytest.fixture
def device():
    """The device every test runs on: "cuda" with CUDA, else "cpu" (the interpreter)."""
    return DEVICE


def pytest_collection_finish(session):
    """Start the long subprocess jobs of the selected tests beside the suite (tests/_background.py)."""
    if not session.config.option.collectonly:
        _background.start_selected([item.nodeid for item in session.items])


def pytest_sessionfinish(session, exitstatus):
    _background.stop_all()


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        items[:] = _background.xdist_order(items)
    if os.environ.get("FASTVQ_ONE_PER_FILE") == "1":  # a smoke run: the first runnable test of each file
        keep, seen = [], set()
        for item in items:
            path = str(item.fspath)
            if path not in seen and (CUDA or "gpu" not in item.keywords):
                seen.add(path)
                keep.append(item)
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class TimeoutExpired(Exception):
    """A test ran past ``$FASTVQ_TEST_TIMEOUT`` seconds."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    limit = float(os.environ.get("FASTVQ_TEST_TIMEOUT", "0") or 0)
    if limit <= 0 or not hasattr(signal, "setitimer") or item.config.pluginmanager.hasplugin("timeout"):
        yield
        return

    def expire(signum, frame):
        raise TimeoutExpired(f"{item.nodeid} ran longer than FASTVQ_TEST_TIMEOUT={limit:g} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, limit)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
