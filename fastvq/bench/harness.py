"""Timing, ceilings, tables, JSON and plots for `python -m fastvq bench`.

On CUDA every provider is timed with ``triton.testing.do_bench`` (median of repeated runs after
warm-up); the ceilings are measured in the same run: a matmul of the op's shape and dtype for
distance kernels, a large device-to-device copy for memory-bound ones. Without CUDA the
harness says so, times only the torch providers on small shapes with a host clock (the Triton
kernels would only be interpreted), and runs the interpreter parity check instead.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

PROVIDERS = ("reference", "compiled", "fastvq")


@dataclass
class Case:
    """One benchmark row group: an op at one shape and dtype, with its providers.

    ``make(device)`` returns the inputs; each provider maps inputs to a result. ``flops`` or
    ``bytes`` (read + written, the fewest the op must move) give TFLOP/s or GB/s. ``ceiling``
    is "matmul" (``matmul_shape`` = (M, K, N) of the equivalent product) or "copy".
    """

    op: str
    shape: dict
    dtype: torch.dtype
    make: Callable[[str], tuple]
    providers: dict
    flops: float | None = None
    bytes: float | None = None
    ceiling: str = "copy"
    matmul_shape: tuple | None = None
    skip: dict = field(default_factory=dict)  # provider -> reason it cannot run at this shape
    peers: dict = field(default_factory=dict)  # extra providers (e.g. the seed's torch code)

    @property
    def label(self) -> str:
        dims = ",".join(f"{k}={v}" for k, v in self.shape.items())
        return f"{self.op}[{dims},{str(self.dtype).replace('torch.', '')}]"


def git_sha() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True, timeout=5).stdout.strip() or "unknown"
    except Exception:  # noqa: BLE001
        return "unknown"


def environment() -> dict:
    import triton

    dev = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()})"
    return {
        "device": dev,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "git_sha": git_sha(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def time_ms(fn: Callable[[], object], cuda: bool) -> float:
    """Median milliseconds of ``fn()``."""
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up
    times = []
    deadline = time.perf_counter() + 2.0
    while len(times) < 5 or (time.perf_counter() < deadline and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_extra_mib(fn: Callable[[], object]) -> float | None:
    """Peak device memory a call allocates beyond what was live before it (CUDA only)."""
    if not torch.cuda.is_available():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


_ceiling_cache: dict = {}


def matmul_tflops(m: int, k: int, n: int, dtype: torch.dtype, device: str) -> float:
    key = ("matmul", m, k, n, dtype)
    if key not in _ceiling_cache:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        out = torch.empty(m, n, device=device, dtype=dtype)
        ms = time_ms(lambda: torch.matmul(a, b, out=out), device == "cuda")
        _ceiling_cache[key] = 2.0 * m * k * n / (ms * 1e-3) / 1e12
        del a, b, out
    return _ceiling_cache[key]


def copy_gbs(device: str) -> float:
    """Device-to-device copy bandwidth (bytes read + written), measured once per run."""
    if "copy" not in _ceiling_cache:
        n = (1 << 30) // 4 if device == "cuda" else (1 << 26) // 4
        src = torch.randn(n, device=device)
        dst = torch.empty_like(src)
        ms = time_ms(lambda: dst.copy_(src), device == "cuda")
        _ceiling_cache["copy"] = 2.0 * src.numel() * 4 / (ms * 1e-3) / 1e9
        del src, dst
    return _ceiling_cache["copy"]


def measure_case(case: Case, device: str, providers=PROVIDERS) -> list[dict]:
    """Time every provider of ``case``; returns one row per provider (errors recorded, not raised)."""
    cuda = device == "cuda"
    inputs = case.make(device)
    rows = []
    all_providers = dict(case.providers)
    all_providers.update(case.peers)
    for name, fn in all_providers.items():
        if name not in providers and (name not in case.peers or (not cuda and name.startswith("fastvq"))):
            continue  # without CUDA, nothing that runs the (interpreted) Triton kernels is timed
        row = {"op": case.op, "case": case.label, "shape": case.shape, "dtype": str(case.dtype).replace("torch.", ""),
               "provider": name}
        if name in case.skip:
            row["skipped"] = case.skip[name]
            rows.append(row)
            continue
        try:
            call = (lambda f=fn: f(*inputs))
            row["ms"] = time_ms(call, cuda)
            mem = peak_extra_mib(call)
            if mem is not None:
                row["peak_extra_mib"] = round(mem, 1)
        except Exception as exc:  # noqa: BLE001  (a provider that fails is reported, not fatal)
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            if cuda:
                torch.cuda.empty_cache()
        rows.append(row)
    # throughput, ceiling fraction and speed-ups, all from numbers of this run
    ceiling = None
    try:
        if not cuda:
            pass  # a CPU has no meaningful matmul/copy roofline for these kernels
        elif case.ceiling == "matmul" and case.matmul_shape is not None:
            ceiling = matmul_tflops(*case.matmul_shape, case.dtype, device)
        elif case.ceiling == "copy":
            ceiling = copy_gbs(device)
    except Exception:  # noqa: BLE001
        ceiling = None
    timed = {r["provider"]: r["ms"] for r in rows if "ms" in r}
    for r in rows:
        if "ms" not in r:
            continue
        s = r["ms"] * 1e-3
        if case.flops:
            r["tflops"] = case.flops / s / 1e12
        if case.bytes:
            r["gbs"] = case.bytes / s / 1e9
        if ceiling:
            if case.ceiling == "matmul" and case.flops:
                r["matmul_tflops"] = ceiling
                r["frac_of_ceiling"] = r["tflops"] / ceiling
            elif case.ceiling == "copy" and case.bytes:
                r["copy_gbs"] = ceiling
                r["frac_of_ceiling"] = r["gbs"] / ceiling
        r["speedup_vs"] = {other: ms / r["ms"] for other, ms in timed.items() if other != r["provider"]}
    del inputs
    if cuda:
        torch.cuda.empty_cache()
    return rows


def format_table(rows: list[dict]) -> str:
    head = f"{'case':58} {'provider':22} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} {'xref':>6} {'xcomp':>6} {'ceil':>5} {'MiB':>8}"
    lines = [head, "-" * len(head)]

    def fmt(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    for r in rows:
        if "skipped" in r or "error" in r:
            why = r.get("skipped") or r.get("error")
            lines.append(f"{r['case'][:58]:58} {r['provider']:22} {'n/a':>9}  ({why})")
            continue
        sv = r.get("speedup_vs", {})
        lines.append(
            f"{r['case'][:58]:58} {r['provider']:22} {fmt(r['ms'], '9.3f')} {fmt(r.get('tflops'), '8.1f')} "
            f"{fmt(r.get('gbs'), '8.0f')} {fmt(sv.get('reference'), '6.1f')} {fmt(sv.get('compiled'), '6.1f')} "
            f"{fmt(r.get('frac_of_ceiling'), '5.2f')} {fmt(r.get('peak_extra_mib'), '8.0f')}"
        )
    lines.append("xref/xcomp: speed-up over the eager reference / torch.compile of it (same run); "
                 "ceil: fraction of the matmul rate of the same shape and dtype, or of the device copy "
                 "bandwidth, measured in this run; MiB: peak extra device memory of one call.")
    return "\n".join(lines)


def write_results(rows: list[dict], env: dict, out_dir: str, tag: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in env["device"])[:40]
    path = os.path.join(out_dir, f"bench-{tag}-{safe}-{env['git_sha']}.json")
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1, default=str)
    return path


def plot_results(rows: list[dict], env: dict, path: str) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fast = [r for r in rows if r["provider"] == "fastvq" and "ms" in r]
    if not fast:
        return None
    labels = [r["case"] for r in fast]
    vs_ref = [r["speedup_vs"].get("reference", float("nan")) for r in fast]
    vs_comp = [r["speedup_vs"].get("compiled", float("nan")) for r in fast]
    ceil = [r.get("frac_of_ceiling", float("nan")) for r in fast]
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.45 * len(fast) + 2), sharey=True)
    y = range(len(fast))
    axes[0].barh([i - 0.2 for i in y], vs_ref, height=0.4, label="vs eager reference")
    axes[0].barh([i + 0.2 for i in y], vs_comp, height=0.4, label="vs torch.compile")
    axes[0].set_xscale("log")
    axes[0].axvline(1.0, color="k", lw=0.8)
    axes[0].set_xlabel("speed-up (x)")
    axes[0].legend(loc="lower right")
    axes[0].set_yticks(list(y), labels, fontsize=7)
    axes[1].barh(list(y), ceil, height=0.5, color="tab:green")
    axes[1].set_xlim(0, 1)
    axes[1].set_xlabel("fraction of ceiling (matmul rate or copy bandwidth)")
    fig.suptitle(f"fastvq on {env['device']} (torch {env['torch']}, triton {env['triton']}, {env['git_sha']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_bench(ops=None, quick: bool = False, out_dir: str | None = None, plot: bool = True) -> int:
    """Entry point of `python -m fastvq bench`. Returns a process exit code."""
    from tqdm.auto import tqdm

    from . import cases as _cases

    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    env = environment()
    out_dir = out_dir or os.path.join(os.getcwd(), "benchmarks", "results")
    if not cuda:
        print("No CUDA device: fastvq's Triton kernels cannot be timed here (on a CPU they only run under the "
              "interpreter, which measures nothing useful). Timing the torch providers (eager reference, "
              "torch.compile of it, the seeds' torch code) on small shapes, with a host clock: indicative only, "
              "no roofline. Then running the interpreter parity check.\n")
    todo = _cases.all_cases(device=device, quick=quick or not cuda, ops=ops)
    rows: list[dict] = []
    for case in tqdm(todo, desc="bench", unit="case"):
        providers = PROVIDERS if cuda else ("reference", "compiled")
        rows.extend(measure_case(case, device, providers))
    print(format_table(rows))
    tag = "gpu" if cuda else "cpu"
    path = write_results(rows, env, out_dir, tag)
    print(f"\nwrote {path}")
    if plot and cuda:
        png = plot_results(rows, env, path[:-5] + ".png")
        if png:
            print(f"wrote {png}")
    if not cuda:
        from ..check import run_check

        print()
        return run_check(ops=ops)
    return 0
