"""Every Triton kernel compiles for an H100 (sm_90), ahead of time, on a machine with no GPU.

The rest of the suite runs the kernels under the Triton interpreter, which accepts code the
GPU compiler rejects (type errors, unsupported ops, layouts, shared memory the tiles do not fit
in). Here ``tests/_cuda_compile_worker.py`` compiles a representative subset for sm_90 with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` and the ptxas bundled in
the triton wheel: every ``@triton.jit`` kernel of ``kernels/*.py``, every dtype and constexpr the
launchers pass, one config each (the prune-kept ones for the autotuned kernels), each through
ptxas to a cubin; shared memory is the final kernel's (after the pipeliner has added its stage
buffers). It runs in a subprocess without ``TRITON_INTERPRET`` (which conftest sets for this
process, and which Triton reads when a kernel is defined).

Checks: every job compiles; every kernel in kernels/*.py is covered; what the autotuner can
run fits in the 227 KiB of shared memory an sm_90 block can have; 16-bit and tf32 dots use the
tensor cores, as ``wgmma`` when the tile has at least 64 rows. Every autotune config the prunes
keep at the benchmark shapes, for sm_90 and sm_80 and triton 3.8 and 3.6, is compiled by hand
into ``benchmarks/results/sm90-static.json`` and checked by tests/test_resource_estimates.py.
``FASTVQ_CUDA_COMPILE_REPORT=path`` writes the table of shared memory / registers / spills per
job there. Run beside the rest of the suite (tests/_background.py).

The compile record: compiling all of it takes about four minutes of one core, for kernels that
most commits do not touch. ``tests/sm90-compile-record.json`` holds each job's compiled results
under a key that hashes everything the compile reads (Triton's own compile-cache key: the loaded
kernel's source and every jit function and global it reads, the Triton build, target, ptxas
version, options and compiler environment variables; and the bytes of the worker); a job whose key is there is read from it, any other is
compiled now, and a fixed sample of about one job in 16 is compiled as well and must match the
record. ``test_compile_record_is_current`` fails on a mismatch and while some job had to be
compiled: after
changing a kernel, a launcher or the worker, regenerate it (about 2 minutes on 2 cores)::

    env -u TRITON_INTERPRET .venv/bin/python tests/_cuda_compile_worker.py --update-record

``test_edge_launches_compile_for_sm90``: the launchers called with edge shapes (sizes of 1, odd
D, transposed / strided / unaligned inputs), whose specialisations the subset above never
compiles; a representative subset of them, pinned configs, a second background job.
"""

from __future__ import annotations

import ast
import json
import os
import sys
from pathlib import Path

import pytest

from tests import _background

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "_cuda_compile_worker.py"
H100_SMEM = 232448  # 227 KiB: the most shared memory one block can opt into on sm_90


def _ptxas() -> Path | None:
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    return path if path.is_file() else None


pytestmark = pytest.mark.skipif(_ptxas() is None, reason="triton's bundled ptxas (nvidia backend) is missing")


def _kernels_in_source() -> set[str]:
    """``module.name`` of every ``@triton.jit`` function named ``*_kernel`` in kernels/*.py."""
    found = set()
    for path in sorted((ROOT / "kernels").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name.endswith("_kernel"):
                if any("jit" in ast.unparse(d) for d in node.decorator_list):
                    found.add(f"{path.stem}.{node.name}")
    return found


def _worker_env(scratch: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(Path(scratch) / "triton-cache")  # a job not in the record compiles for real, never from a triton cache
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def _jobs() -> int:
    return max(1, min((os.cpu_count() or 1) - 1, 8))  # beside the suite (tests/_background.py): leave it one core


RECORD = Path(__file__).resolve().parent / "sm90-compile-record.json"
REGEN = "env -u TRITON_INTERPRET .venv/bin/python tests/_cuda_compile_worker.py --update-record"


def _compile_job(scratch: str):
    return ([sys.executable, str(WORKER), "--jobs", str(_jobs()), "--record", str(RECORD)], _worker_env(scratch),
            str(ROOT), 1800)


def _edges_job(scratch: str):
    return ([sys.executable, str(WORKER), "--edges", "--ci", "--all", "--jobs", str(_jobs()), "--record", str(RECORD)],
            _worker_env(scratch), str(ROOT), 1800)


_background.register("cuda-compile", "tests/test_cuda_compile.py::", _compile_job)
_background.register("cuda-compile-edges", "tests/test_cuda_compile.py::test_edge_launches_compile", _edges_job)


@pytest.fixture(scope="module")
def compiled():
    job = _background.result("cuda-compile")
    lines = [json.loads(line) for line in job.stdout.splitlines() if line.startswith("{")]
    summary = next((r for r in lines if r.get("summary")), None)
    assert job.returncode == 0 and summary is not None, (
        f"compile worker failed (rc {job.returncode}):\n{job.stderr[-6000:]}")
    records = sorted((r for r in lines if not r.get("summary") and not r.get("verify")),
                     key=lambda r: (r["kernel"], r["variant"]))
    report = _report(records, summary)
    print(report)
    if os.environ.get("FASTVQ_CUDA_COMPILE_REPORT"):
        Path(os.environ["FASTVQ_CUDA_COMPILE_REPORT"]).write_text(report)
    return records, summary


def _report(records, summary) -> str:
    rows = [f"{'kernel':46s} {'smem KiB':>8s} {'regs':>4s} {'stack':>5s} {'mma':6s} {'s':>5s}  variant"]
    for r in records:
        mma = "wgmma" if r.get("wgmma") else "mma" if r.get("mma_sync") else "-" if r["dot"] else ""
        note = " [pruned by the autotuner: may exceed]" if r["pruned"] else ""
        if r.get("ok") and r["shared"] > H100_SMEM:
            note += " [OVER 227 KiB]"
        if not r.get("ok"):
            note += f" [FAILED: {r['error'][:200]}]"
        rows.append(f"{r['kernel']:46s} {r.get('shared', 0) / 1024:8.1f} {r.get('reg', ''):>4} "
                    f"{r.get('stack', ''):>5} {mma:6s} {r['seconds']:5.1f}  {r['variant']}{note}")
    rows.append(f"{summary['jobs']} jobs, {summary['failed']} failed, {summary['seconds']} s")
    return "\n".join(rows)


def test_every_kernel_compiles_for_sm90(compiled):
    records, summary = compiled
    failed = [r for r in records if not r["ok"]]
    assert not failed, "GPU compile errors:\n" + "\n\n".join(
        f"{r['kernel']} [{r['variant']}]:\n{r['traceback']}" for r in failed[:5])
    assert summary["jobs"] == len(records)


def test_every_kernel_is_covered(compiled):
    records, summary = compiled
    in_source = _kernels_in_source()
    assert in_source, "no @triton.jit *_kernel found in kernels/*.py"
    covered = {r["kernel"] for r in records}
    missing = sorted(in_source - covered)
    assert not missing, f"kernels with no compile job in tests/_cuda_compile_worker.py: {missing}"
    assert set(summary["all_kernels"]) <= covered


def test_runnable_configs_fit_in_shared_memory(compiled):
    records, _ = compiled
    over = [f"{r['kernel']} [{r['variant']}]: {r['shared']} B" for r in records
            if r["ok"] and not r["pruned"] and r["shared"] > H100_SMEM]
    assert not over, f"configs the autotuner keeps but that need more than {H100_SMEM} B of shared memory:\n" + \
        "\n".join(over)


def test_low_precision_dots_use_tensor_cores(compiled):
    records, _ = compiled
    no_tc = [f"{r['kernel']} [{r['variant']}]" for r in records
             if r["ok"] and r["tensor_cores"] and not (r["wgmma"] or r["mma_sync"])]
    assert not no_tc, "16-bit / tf32 tl.dot without tensor-core MMA:\n" + "\n".join(no_tc)
    no_wgmma = [f"{r['kernel']} [{r['variant']}]" for r in records
                if r["ok"] and r["expect_wgmma"] and not r["wgmma"]]
    assert not no_wgmma, "tiles of >= 64 rows that do not use wgmma on sm_90:\n" + "\n".join(no_wgmma)
    # the matmul-shaped kernels really reach wgmma in bf16
    for kernel in ("nearest_code._nearest_code_fwd_kernel", "residual_quantize._residual_quantize_fwd_kernel",
                   "residual_quantize._residual_quantize_fwd_chunked_kernel",
                   "pairwise_kl_loss._pairwise_kl_loss_fwd_kernel", "pairwise_kl_loss._pairwise_kl_loss_bwd_kernel",
                   "pairwise_sqdist._pairwise_sqdist_fwd_kernel"):
        bf16 = [r for r in records if r["kernel"] == kernel and r["variant"].startswith("bf16")]
        assert any(r.get("wgmma") for r in bf16), f"{kernel}: no bf16 variant uses wgmma"


# The kernels whose float32 arithmetic may round as the GPU's fast instructions do: the pairwise
# KL loss's exponentials and logarithms (ex2/lg2.approx: within 2 ulp, far inside its bound) and
# its forward's one per-row division. Every other kernel divides and takes square roots rounded
# once (tl.math.div_rn, tl.sqrt_rn), as torch and the interpreter do: the H200 run of 2026-12-04
# gave NaN rotation gradients on rows near float32's maximum where div.full / sqrt.approx.ftz ran.
APPROX_ALLOWED = {
    "pairwise_kl_loss._pairwise_kl_loss_fwd_kernel": {"ex2.approx", "lg2.approx", "div.full"},
    "pairwise_kl_loss._pairwise_kl_loss_bwd_kernel": {"ex2.approx", "lg2.approx"},
}
# Gumbel sampling with the euclidean metric takes a square root per distance element: the fast
# one there (a sampled code's logits within 2 ulp; the fused search's codes never depend on it)
APPROX_ALLOWED_SAMPLE = {"sqrt.approx"}


def test_float32_division_and_square_roots_round_as_on_the_cpu(compiled):
    records, _ = compiled
    bad = []
    for r in records:
        if not r["ok"]:
            continue
        allowed = APPROX_ALLOWED.get(r["kernel"], set()) | (APPROX_ALLOWED_SAMPLE if "SAMPLE" in r["variant"] else set())
        extra = [i for i in r["approx"] if not any(i.startswith(a) for a in allowed)]
        if extra:
            bad.append(f"{r['kernel']} [{r['variant']}]: {extra}")
    assert not bad, "approximate float32 instructions (use tl.math.div_rn / tl.sqrt_rn):\n" + "\n".join(bad)


def _edges_lines():
    job = _background.result("cuda-compile-edges")
    return job, [json.loads(line) for line in job.stdout.splitlines() if line.startswith("{")]


def test_compile_record_is_current(compiled):
    """Every job's results came from tests/sm90-compile-record.json: the record was compiled from
    the kernels, launchers and worker as they are now, with this triton (its keys hash them all,
    ``_cuda_compile_worker.record_key``). A job whose key is not there was compiled above, so the
    checks still hold for it; this test then asks for the record to be regenerated, which keeps
    this module's compiles at a few seconds instead of four minutes of one core."""
    records, summary = compiled
    assert summary.get("verified", 0) >= 1 and summary.get("verify_mismatches") == 0, (
        f"{summary.get('verify_mismatches')} of {summary.get('verified')} sampled jobs compiled to something else "
        f"than {RECORD.name} says (see the worker's 'verify' lines): regenerate it with\n    {REGEN}")
    _, edges = _edges_lines()
    stale = [f"{r['kernel']} [{r['variant']}]" for r in records if not r.get("reused")]
    stale += [f"{r['kernel']} {r['calls'][0]}" for r in edges if not r.get("summary") and "calls" in r
              and not r.get("reused")]
    assert not stale, (f"{len(stale)} compile jobs are not in {RECORD.name} (a kernel, launcher or the worker "
                       f"changed, or another triton): they were compiled now and checked; regenerate the record "
                       f"(about 2 minutes on 2 cores):\n    {REGEN}\nfirst: " + "\n".join(stale[:5]))


def test_edge_launches_compile_for_sm90():
    """The CI subset of the edge-shaped launches (``_cuda_compile_worker.edge_launches(ci=True)``:
    sizes of 1, odd D, transposed / strided / unaligned inputs, the launches that failed to
    compile on the H200 run with triton 3.6) compile for sm_90 with each autotuned kernel's pinned
    config. The whole edge set (about 2,200 launches, ~30 min of one core per triton version) is
    a dev command, run with both versions after a kernel or launcher change::

        env -u TRITON_INTERPRET .venv/bin/python tests/_cuda_compile_worker.py --edges
        env -u TRITON_INTERPRET .venv36/bin/python tests/_cuda_compile_worker.py --edges
    """
    job, lines = _edges_lines()
    summary = next((r for r in lines if r.get("summary")), None)
    assert summary is not None, f"edge compile worker failed (rc {job.returncode}):\n{job.stderr[-6000:]}"
    failed = [r for r in lines if not r.get("summary") and not r.get("ok")]
    assert not failed, "edge launches that do not compile for sm_90:\n" + "\n\n".join(
        f"{r.get('kernel', '')} {r.get('calls', r.get('call'))}:\n{r['error'][-1500:]}" for r in failed[:5])
    assert job.returncode == 0 and summary["launches"] >= 50, summary
    launched = {r["kernel"] for r in lines if not r.get("summary")}
    missing = sorted(_kernels_in_source() - launched)
    assert not missing, f"kernels no edge launch reaches: {missing}"


def test_no_edge_launch_spills_at_the_register_cap():
    """The edge-shaped launches in the compile record (kept current by
    test_compile_record_is_current) stay below ptxas's 255-register cap or compile without
    spilling: rows whose loads do not vectorise (D = 100 or 300 in 16 bits) spilled 112-848 B at
    the cap in pairwise_sqdist, qr_lookup's backward, the mining reduce and top-k until their
    launchers took smaller tiles or more warps there (fuzzK; ``kernels._common.rows_vectorise``).
    Small spills below the cap (ptxas's launch-bound choice) are counted, not refused, as in
    benchmarks/results/sm90-static.json."""
    edges = json.loads(RECORD.read_text())["edges"]
    at_cap = {key: (r["regs"], r["spill"]) for key, r in edges.items() if r.get("spill") and r.get("regs", 0) >= 255}
    assert not at_cap, f"edge launches spilling at 255 registers (record keys: regs, spill B): {at_cap}"
