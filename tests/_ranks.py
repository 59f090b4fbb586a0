"""Spawned gloo ranks for the data-parallel tests: one job per world size, a timeout that turns
a hung collective into a test failure."""

from __future__ import annotations

import contextlib
import datetime
import os
import socket
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(worker, world: int, out_dir: Path, timeout_s: float) -> list:
    """Run ``worker(rank, world, port, out_dir)`` on ``world`` spawned ranks, each saving its
    results to ``out_dir / f"rank{rank}.pt"``; returns them, in rank order. Fails the test when
    the ranks have not finished within ``timeout_s`` (and kills them)."""
    # the ranks hold CPU tensors (gloo): on a CUDA machine their Triton backend must interpret
    # too (the H200 run: every rank failed "backend 'triton' was asked for on CPU tensors").
    # Spawned processes take the environment as it is when they start; this one's is restored.
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        ctx = mp.start_processes(worker, args=(world, free_port(), str(out_dir)), nprocs=world, join=False,
                                 start_method="spawn")
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                pytest.fail(f"distributed workers ({world} ranks) did not finish within {timeout_s} s: a hang")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join(5)
    return [torch.load(Path(out_dir) / f"rank{r}.pt") for r in range(world)]


def ranks_fixture(worker, worlds, timeout_s: float, name: str):
    """A module-scoped fixture, one job per world size in ``worlds``: ``(world, [each rank's
    results])`` (assign it to the name the tests take, e.g. ``ranks = ranks_fixture(...)``)."""

    jobs = {}  # by world size: cells of :func:`world_cells` sort apart from the fixture's own

    @pytest.fixture(scope="module", params=worlds, ids=lambda w: f"world{w}")
    def ranks(request, tmp_path_factory):
        world = request.param
        if world not in jobs:
            try:
                jobs[world] = spawn_ranks(worker, world, tmp_path_factory.mktemp(f"{name}{world}"), timeout_s)
            except BaseException as e:  # a failed (timed out) job fails its other cells without a rerun
                jobs[world] = e
                raise
        if isinstance(jobs[world], BaseException):
            pytest.fail(f"the {name} job at {world} ranks failed in an earlier test: {jobs[world]!r}", pytrace=False)
        return world, jobs[world]

    return ranks


def world_cells(argnames: str, runs, worlds) -> pytest.MarkDecorator:
    """``parametrize`` the ``ranks`` fixture (indirectly) together with ``argnames`` (comma
    separated): each world size in ``worlds`` with the values its job runs, ``runs(world)`` (a
    value per cell, a tuple where ``argnames`` names several), so that no cell asks a job for
    results it did not produce (a cell that would skip on every machine). Cells of one world
    size share its job (the fixture is module-scoped and cached by world size)."""
    names = [n.strip() for n in argnames.split(",")]
    cells = []
    for world in worlds:
        for value in runs(world):
            values = value if len(names) > 1 else (value,)
            cells.append(pytest.param(world, *values, id="-".join([f"world{world}", *map(str, values)])))
    return pytest.mark.parametrize(["ranks", *names], cells, indirect=["ranks"])


@pytest.fixture(autouse=True)
def on_the_ranks_device():
    """Autouse in the test modules of the ranks (import it there): the tests' own one-process
    runs, which they compare with the ranks' results, build CPU tensors as the ranks do (CPU
    generators). On a CUDA machine torch's default device in the test process is CUDA, where
    ``torch.randn(..., generator=<a CPU generator>)`` fails."""
    with torch.device("cpu"):
        yield


@contextlib.contextmanager
def one_process_backend(name: str):
    """``fastvq.backend(name)`` for a test's one-process run on CPU tensors; skips the rest of
    the test where that backend cannot run on them: "triton" needs the Triton interpreter, which
    the test process of a CUDA machine does not run (its ranks do: :func:`spawn_ranks`)."""
    from fastvq._backend import interpreter_enabled

    if name == "triton" and not interpreter_enabled():
        pytest.skip("the one-process run of the triton backend on CPU tensors needs the Triton interpreter "
                    "(the ranks ran it; the CPU suite compares it)")
    import fastvq

    with fastvq.backend(name):
        yield


def serve(rank: int, world: int, port: int, out_dir: str, timeout_s: float, body) -> None:
    """A rank's side: join the gloo group (collectives time out at half the job's limit), run
    ``body(rank, world)`` on one thread and save what it returns for :func:`spawn_ranks`."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s // 2))
    try:
        torch.set_num_threads(1)
        torch.save(body(rank, world), Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
