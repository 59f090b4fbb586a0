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
from typing import Callable

import torch

from .._checks import UsageError
from .registry import Case

PROVIDERS = ("reference", "compiled", "fastvq")


def git_sha() -> str:
    """``$FASTVQ_GIT_SHA`` (a copy of the tree without .git, as on a lent GPU machine), else git's."""
    if os.environ.get("FASTVQ_GIT_SHA"):
        return os.environ["FASTVQ_GIT_SHA"]
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
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def time_ms(fn: Callable[[], object], cuda: bool) -> float:
    """Median milliseconds of ``fn()``."""
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    fn()  # warm-up
    times = []
    deadline = time.perf_counter() + 1.0
    while len(times) < 3 or (time.perf_counter() < deadline and len(times) < 50):
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


def _runs(name: str, case: Case, cuda: bool, providers) -> bool:
    """Whether provider ``name`` of ``case`` is timed: never a Triton one without CUDA (it would
    only be interpreted); else the ones asked for (``None``: every provider and peer)."""
    if not cuda and name.startswith("fastvq"):
        return False
    return providers is None or name in providers


def measure_case(case: Case, device: str, providers=None) -> list[dict]:
    """Time the providers of ``case`` (:func:`_runs`); one row per provider (errors recorded, not raised)."""
    cuda = device == "cuda"
    torch.manual_seed(0)  # the same inputs on every run
    inputs = case.make(device)
    rows = []
    all_providers = dict(case.providers)
    all_providers.update(case.peers)
    for name, fn in all_providers.items():
        if not _runs(name, case, cuda, providers):
            continue
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
    if not cuda and case.unit_bytes:
        rows = _count_traffic(case, inputs, rows, providers)
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



def _count_traffic(case: Case, inputs, rows: list[dict], providers) -> list[dict]:
    """Without CUDA: each provider's passes over ``case.unit_bytes``, launches and host syncs
    (:mod:`fastvq.bench.traffic`), the Triton ones run interpreted (counted, never timed)."""
    from .traffic import measure

    by_name = {r["provider"]: r for r in rows}
    out = list(rows)
    for name, fn in {**case.providers, **case.peers}.items():
        if name in case.skip or "compiled" in name or (providers is not None and name not in providers):
            continue
        row = by_name.get(name)
        if row is None:
            row = {"op": case.op, "case": case.label, "shape": case.shape,
                   "dtype": str(case.dtype).replace("torch.", ""), "provider": name}
            out.append(row)
        try:
            t = measure(lambda meter, f=fn: f(*inputs), case.unit_bytes, warmup=0)  # (timed ones ran already)
            row.update(passes=round(t.total_passes, 2), launches=t.launches, syncs=t.syncs)
        except Exception as exc:  # noqa: BLE001
            row.setdefault("error", f"traffic: {type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}")
    return out


_COLUMNS = [  # (title, row -> value or None, format)
    ("case", lambda r: r["case"], "s"),
    ("provider", lambda r: r["provider"], "s"),
    ("ms", lambda r: r.get("ms"), ".3f"),
    ("TFLOP/s", lambda r: r.get("tflops"), ".3g"),
    ("GB/s", lambda r: r.get("gbs"), ".3g"),
    ("x ref", lambda r: r.get("speedup_vs", {}).get("reference"), ".3g"),  # (.2f showed 0.0046 as 0.00: fuzzH)
    ("x compiled", lambda r: r.get("speedup_vs", {}).get("compiled"), ".3g"),
    ("of ceiling", lambda r: r.get("frac_of_ceiling"), ".0%"),
    ("peak MiB", lambda r: r.get("peak_extra_mib"), ".0f"),
    ("passes", lambda r: r.get("passes"), ".1f"),
    ("syncs", lambda r: r.get("syncs"), "d"),
]
_LEGEND = ("x ref / x compiled: speed-up over the eager reference / torch.compile of it (same run); of ceiling: "
           "fraction of the matmul rate of the same shape and dtype, or of the device copy bandwidth, measured in "
           "this run; peak MiB: peak extra device memory of one call; passes / syncs (CPU): reads and writes of the "
           "activation and host syncs of one call (python -m fastvq bench --traffic).")


def _cells(rows: list[dict]) -> tuple[list[str], list[list[str]], list[str]]:
    """Titles, cell strings and alignments of the columns that hold at least one value."""
    used = [c for c in _COLUMNS if c[2] == "s" or any(c[1](r) is not None for r in rows)]
    body = []
    for r in rows:
        line = []
        for title, get, spec in used:
            if spec != "s" and ("skipped" in r or "error" in r):
                line.append("")
                continue
            v = get(r)
            line.append("-" if v is None else format(v, spec))
        if "skipped" in r or "error" in r:
            line[2] = f"n/a ({r.get('skipped') or r.get('error')})"
        body.append(line)
    align = ["<" if spec == "s" else ">" for _, _, spec in used]
    return [c[0] for c in used], body, align


def format_table(rows: list[dict]) -> str:
    """The rows as an aligned text table (columns sized to their contents)."""
    titles, body, align = _cells(rows)
    width = [max([len(t)] + [len(b[i]) for b in body if not b[i].startswith("n/a")]) for i, t in enumerate(titles)]

    def line(cells):
        out = []
        for i, c in enumerate(cells):
            if c.startswith("n/a"):
                out.append(c)  # a reason runs on past the numeric columns
                break
            out.append(format(c, f"{align[i]}{width[i]}"))
        return "  ".join(out).rstrip()

    lines = [line(titles), "  ".join("-" * w for w in width)] + [line(b) for b in body]
    return "\n".join(lines + [_LEGEND])


def format_markdown(rows: list[dict], env: dict) -> str:
    """The rows as a markdown table, headed by the environment."""
    titles, body, align = _cells(rows)
    head = (f"fastvq bench on {env['device']} (torch {env['torch']}, triton {env['triton']}, git {env['git_sha']}, "
            f"float32 matmul precision {env.get('float32_matmul_precision', 'highest')}, {env['date']})\n\n")
    sep = ["---" if a == "<" else "---:" for a in align]
    md = ["| " + " | ".join(titles) + " |", "| " + " | ".join(sep) + " |"]
    md += ["| " + " | ".join(c.replace("|", "/") for c in b) + " |" for b in body]
    return head + "\n".join(md) + "\n\n" + _LEGEND + "\n"


def result_stem(env: dict, cuda: bool) -> str:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in env["device"])[:40]
    return f"bench-{'gpu' if cuda else 'cpu'}-{safe}-{env['git_sha']}"


def write_results(rows: list[dict], env: dict, out_dir: str, stem: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{stem}.json")
    with open(path, "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1, default=str)
    return path


def plot_results(rows: list[dict], env: dict, path: str) -> str | None:
    """Time per provider (left) and speed-up over the eager reference or fraction of the ceiling
    (right), one group of bars per case. ``None`` without matplotlib or without a timed row."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    timed = [r for r in rows if "ms" in r]
    if not timed:
        return None
    cases = list(dict.fromkeys(r["case"] for r in timed))
    provs = list(dict.fromkeys(r["provider"] for r in timed))
    by = {(r["case"], r["provider"]): r for r in timed}
    ceil = any("frac_of_ceiling" in r for r in timed)
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.35 * len(cases) * max(len(provs), 2) + 2), sharey=True)
    h = 0.8 / len(provs)
    for j, p in enumerate(provs):
        ys = [i - 0.4 + (j + 0.5) * h for i in range(len(cases))]
        ms = [by[(c, p)]["ms"] if (c, p) in by else float("nan") for c in cases]
        axes[0].barh(ys, ms, height=h, label=p)
        if ceil:
            right = [by[(c, p)].get("frac_of_ceiling", float("nan")) if (c, p) in by else float("nan") for c in cases]
        else:
            right = [by[(c, p)].get("speedup_vs", {}).get("reference", 1.0 if p == "reference" else float("nan"))
                     if (c, p) in by else float("nan") for c in cases]
        axes[1].barh(ys, right, height=h, label=p)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("ms per call (median, log scale)")
    axes[0].set_yticks(range(len(cases)), cases, fontsize=7)
    axes[0].invert_yaxis()
    axes[0].legend(loc="lower right", fontsize=7)
    if ceil:
        axes[1].set_xlim(0, 1)
        axes[1].set_xlabel("fraction of the ceiling (matmul rate or copy bandwidth, same run)")
    else:
        axes[1].axvline(1.0, color="k", lw=0.8)
        axes[1].set_xscale("log")
        axes[1].set_xlabel("speed-up over the eager reference (x, log scale)")
    fig.suptitle(f"fastvq bench on {env['device']} (torch {env['torch']}, triton {env['triton']}, {env['git_sha']})"
                 + ("" if torch.cuda.is_available() else ": CPU, torch providers only, host clock"))
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def run_bench(ops=None, quick: bool = False, out_dir: str | None = None, plot: bool = True, providers=None,
              name: str | None = None, check: bool = True) -> int:
    """Entry point of `python -m fastvq bench`. Returns a process exit code.

    ``ops``: group names (see :func:`fastvq.bench.registry.names`); ``providers``: only these
    providers (default all); ``name``: file stem of the JSON/markdown/plot (default
    ``bench-<gpu|cpu>-<device>-<sha>``); ``check``: without CUDA, run the interpreter parity check after.
    Raises ``ValueError`` listing the valid names for an unknown op.
    """
    import signal
    import sys
    import threading

    from tqdm.auto import tqdm

    from . import registry

    registry.check_names(ops)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    env = environment()
    out_dir = out_dir or os.path.join(os.getcwd(), "benchmarks", "results")
    if not cuda:
        print("No CUDA device: fastvq's Triton kernels cannot be timed here (on a CPU they only run under the "
              "interpreter, which measures nothing useful). Timing the torch providers (eager reference, "
              "torch.compile of it, the seeds' torch code) on small shapes, with a host clock: indicative only, "
              "no roofline.\n")
    notes: list[str] = []
    todo = registry.build_cases(device=device, quick=quick or not cuda, ops=ops, notes=notes)
    known = sorted({n for case in todo for n in (*case.providers, *case.peers)})
    unknown = sorted(set(providers or ()) - set(known))
    if unknown:
        raise UsageError(f"unknown provider(s) {unknown} for these rows; they have: {known}")
    for note in notes:
        print(note)
    stem = name or result_stem(env, cuda)
    os.makedirs(out_dir, exist_ok=True)
    md_path = os.path.join(out_dir, f"{stem}.md")
    rows: list[dict] = []
    interrupted = False

    def on_term(signum, frame):  # `timeout` sends SIGTERM: keep what was measured
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, on_term) if threading.current_thread() is threading.main_thread() else None
    # the bar appears only once a run has taken a few seconds (short runs print no bar)
    bar = tqdm(todo, desc="bench", unit="case", delay=3.0, file=sys.stderr, dynamic_ncols=True)
    try:
        for case in bar:
            bar.set_postfix_str(case.label[:50], refresh=False)
            rows.extend(measure_case(case, device, providers))
            write_results(rows, env, out_dir, stem)  # after every case: a cut-short run keeps its rows
            with open(md_path, "w") as f:
                f.write(format_markdown(rows, env))
    except KeyboardInterrupt:
        interrupted = True
        print(f"\ninterrupted after {len({r['case'] for r in rows})} of {len(todo)} cases; writing what was measured",
              file=sys.stderr)
    finally:
        bar.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(format_table(rows))
    path = write_results(rows, env, out_dir, stem)
    with open(md_path, "w") as f:
        f.write(format_markdown(rows, env))
    print(f"\nwrote {path} and {stem}.md")
    if plot:
        png = plot_results(rows, env, os.path.join(out_dir, f"{stem}.png"))
        print(f"wrote {png}" if png else "no plot: nothing was timed" if not any("ms" in r for r in rows)
              else "no plot: matplotlib is not installed")
    if interrupted:
        return 130
    if not cuda and check:
        from ..check import CHECKS, run_check

        selected = [o for o in ops if o in CHECKS] if ops else None
        if selected != []:
            print()
            return run_check(ops=selected)
    return 0
