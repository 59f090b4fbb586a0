"""Subprocess jobs that start when collection ends and run beside the suite (test setup only).

A few tests check the output of a long subprocess that needs no GPU and little of this process:
the sm_90 compile of every kernel (tests/test_cuda_compile.py) and the CPU dry run of the GPU
script (tests/test_gpu_run.py). CI has 2 cores and the suite keeps one of them busy, so each
such test module registers its job here (:func:`register`); when collection ends, conftest
calls :func:`start_selected`, which queues the jobs of the tests that will run on one background
thread, one job at a time, in registration order. The test then calls :func:`result`, which
waits for its job (or runs it at once if it was never queued, e.g. under ``pytest --collect-only``
then a single test). ``FASTVQ_BACKGROUND_JOBS=0``, or a pytest-xdist worker, runs every job in
the test that asks for it. Under pytest-xdist (the README's test command: ``-n 2 --dist
loadfile --no-loadscope-reorder``: a file's tests share one worker, so its module fixtures and
its job run once) conftest orders the files with :func:`xdist_order`: first the files whose
tests wait for a job, so each job starts at once on one worker while the other runs the rest,
then the others, the most tests first, so that the last files to start are short.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from typing import Callable


@dataclasses.dataclass
class Job:
    name: str
    nodeid_prefix: str
    make: Callable[[str], tuple[list[str], dict, str, float]]  # scratch dir -> (cmd, env, cwd, timeout)
    done: threading.Event = dataclasses.field(default_factory=threading.Event)
    queued: bool = False
    returncode: int | None = None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0
    scratch: str | None = None
    proc: subprocess.Popen | None = None


_JOBS: dict[str, Job] = {}
_QUEUE: queue.Queue = queue.Queue()
_THREAD: threading.Thread | None = None
_LOCK = threading.Lock()
_STOPPING = threading.Event()


def register(name: str, nodeid_prefix: str, make: Callable[[str], tuple[list[str], dict, str, float]]) -> None:
    """Declare a job: ``make(scratch_dir)`` returns ``(cmd, env, cwd, timeout_s)``; it runs in the
    background when a collected test's node id starts with ``nodeid_prefix`` (``path::name``, the
    path relative to the repository; a node id relative to another folder matches by its end)."""
    if name not in _JOBS:
        _JOBS[name] = Job(name, nodeid_prefix, make)


def _run(job: Job) -> None:
    if _STOPPING.is_set():  # the session is over: start nothing new
        job.returncode, job.stderr = -1, "[session over]"
        job.done.set()
        return
    job.scratch = tempfile.mkdtemp(prefix=f"fastvq-{job.name}-")
    t0 = time.perf_counter()
    try:
        cmd, env, cwd, timeout = job.make(job.scratch)
        # its own process group, so that stopping it stops what it started (gpu_run.sh's pytest)
        job.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    start_new_session=True)
        try:
            job.stdout, job.stderr = job.proc.communicate(timeout=timeout)
            job.returncode = job.proc.returncode
        except subprocess.TimeoutExpired:
            _kill(job.proc)
            job.stdout, job.stderr = job.proc.communicate()
            job.returncode = -9
            job.stderr += f"\n[background job {job.name} killed after {timeout} s]"
    except Exception as e:  # noqa: BLE001 - reported to the test that waits for it
        job.returncode, job.stderr = -1, f"[background job {job.name} could not start: {e!r}]"
    finally:
        job.seconds = time.perf_counter() - t0
        job.done.set()


def _descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (``timeout`` puts its command in a process group of its own)."""
    try:
        out = subprocess.run(["ps", "-eo", "pid=,ppid="], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        parts = line.split()
        if len(parts) == 2:
            children.setdefault(int(parts[1]), []).append(int(parts[0]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def _kill(proc: subprocess.Popen) -> None:
    """Kill the job, its process group and every process below it (the job and all it started)."""
    below = _descendants(proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def _worker() -> None:
    while True:
        job = _QUEUE.get()
        if job is None:
            return
        _run(job)


def _matches(nodeid: str, prefix: str) -> bool:
    path, _, rest = nodeid.partition("::")
    want_path, _, want_rest = prefix.partition("::")
    return ("/" + want_path).endswith("/" + path) and rest.startswith(want_rest)


def wanted(nodeid: str) -> bool:
    """Whether the test ``nodeid`` waits for a registered job."""
    return any(_matches(nodeid, job.nodeid_prefix) for job in _JOBS.values())


def xdist_order(items: list) -> list:
    """``items`` file by file (each file's tests in their order): the files with a test that
    waits for a job first, then the rest by test count, most first (ties: collection order)."""
    files: dict[str, list] = {}
    for item in items:
        files.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    order = sorted(files.values(), key=lambda tests: (not any(wanted(t.nodeid) for t in tests), -len(tests)))
    return [item for tests in order for item in tests]


def start_selected(nodeids: list[str]) -> list[str]:
    """Queue the jobs some of ``nodeids`` will wait for; returns their names."""
    global _THREAD
    if os.environ.get("FASTVQ_BACKGROUND_JOBS", "1") == "0" or os.environ.get("PYTEST_XDIST_WORKER"):
        return []  # off, or pytest-xdist spreads the tests over the cores itself
    started = []
    with _LOCK:
        for job in _JOBS.values():
            if not job.queued and any(_matches(n, job.nodeid_prefix) for n in nodeids):
                job.queued = True
                _QUEUE.put(job)
                started.append(job.name)
        if started and _THREAD is None:
            _THREAD = threading.Thread(target=_worker, name="fastvq-background-jobs", daemon=True)
            _THREAD.start()
    return started


def result(name: str) -> Job:
    """The finished job ``name`` (waits for it; runs it here if it was never queued)."""
    job = _JOBS[name]
    with _LOCK:
        run_here = not job.queued
        job.queued = True
    if run_here:
        _run(job)
    job.done.wait()
    return job


def stop_all() -> None:
    """End of the session: stop the thread, kill what still runs, remove the scratch folders."""
    _STOPPING.set()
    _QUEUE.put(None)
    for job in _JOBS.values():
        if job.proc is not None:  # (a finished job's children may still run: the group goes too)
            _kill(job.proc)
        if job.scratch:
            shutil.rmtree(job.scratch, ignore_errors=True)
