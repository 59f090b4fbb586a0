"""tests/_background.py: a job that runs too long, or outlives the session, leaves nothing running."""

import subprocess
import time

from tests import _background


def _running(pattern: str) -> int:
    return int(subprocess.run(["pgrep", "-fc", pattern], capture_output=True, text=True).stdout.strip() or 0)


def test_a_timed_out_job_stops_with_its_children():
    """probe6 B1: kill() stopped only the direct child; communicate() then waited for the
    grandchild holding the pipes (30 s for a 1 s timeout)."""
    _background.register("test-timeout", "no/such/test.py::", lambda d: (["bash", "-c", "sleep 7.25 & sleep 31.5"],
                                                                           None, d, 1))
    t0 = time.perf_counter()
    job = _background.result("test-timeout")
    assert job.returncode == -9 and time.perf_counter() - t0 < 10
    assert _running("sleep 7.25") == 0 and _running("sleep 31.5") == 0


def test_stopping_the_session_stops_a_job_and_its_children():
    # a grandchild in a process group of its own (as gpu_run.sh's `timeout` makes), and a child
    job = _background.Job("test-stop", "", lambda d: (["bash", "-c", "setsid sleep 40.25 & sleep 41.5"], None, d, 100))
    _background._JOBS["test-stop"] = job
    try:
        import threading

        thread = threading.Thread(target=_background._run, args=(job,), daemon=True)
        thread.start()
        while job.proc is None:
            time.sleep(0.05)
        time.sleep(0.3)
        _background._kill(job.proc)
        thread.join(10)
        assert not thread.is_alive()
        assert _running("sleep 40.25") == 0 and _running("sleep 41.5") == 0
    finally:
        _background._JOBS.pop("test-stop", None)
