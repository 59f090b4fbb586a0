"""sm_90 registers, spills and shared memory of nearest_code's main kernel for float32 inputs with
``PRECISION`` "ieee" (exact, FMA units), "tf32" and "tf32x3" (three TF32 products; first Triton's
own, since 2026-12-04 the kernel's split, ``kernels/_common.py dot_split_nt``, the float32
default on TF32 GPUs), resident and streamed D, a few tiles. Compiled on a CPU through ptxas (no
GPU, nothing measured); results for triton 3.6 and 3.8 in benchmarks/results/fp32-precision-sm90.txt::

    env -u TRITON_INTERPRET .venv36/bin/python benchmarks/fp32_precision_probe.py
    PROBE_X3=1 env -u TRITON_INTERPRET .venv/bin/python benchmarks/fp32_precision_probe.py  # the split's tiles
    PROBE_LAYOUTS=1 env -u TRITON_INTERPRET .venv/bin/python benchmarks/fp32_precision_probe.py  # + .venv36

``PROBE_LAYOUTS=1``: the split's tiles (``CONFIGS_X3`` and ``X3_FALLBACK``) at launches the
benchmark shapes never make, for sm_90 and sm_80: masked D, row strides not divisible by 16, an
unaligned base pointer, each metric, split codebooks; captured from the launcher itself (Triton's
own specialisation of each launch), the prune's decision printed beside each (``kept``).
"""
import multiprocessing as mp
import os
import sys
from concurrent.futures import ProcessPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.argv = sys.argv[:1]
sys.path[:0] = [os.path.join(ROOT, "tests"), ROOT]
import _cuda_compile_worker as w  # noqa: E402
from triton import Config  # noqa: E402
UNIT = {"stride_xd": 1, "stride_cd": 1, "stride_pd": 1}
ROW_INTS = ("stride_xh", "stride_xn", "stride_ch", "stride_ck", "stride_pn")


def _ptrs(p):
    return {"p_x": p, "p_c": p, "p_chat": p, "p_pos": p, "p_cterm": "*fp32", "p_meta": "*i32", "p_seed": "*i64",
            "p_idx": "*i64", "p_dist": "*fp32", "p_pscore": "*fp32", "p_pidx": "*i32"}


PRECISIONS = ("ieee", "tf32", "tf32x3")
LAYOUTS = ((64, True, 64), (256, True, 256), (256, False, 32), (256, False, 64))
TILES = ((64, 64, 8, 2), (128, 64, 8, 2), (64, 32, 4, 2), (64, 64, 4, 2), (32, 32, 4, 2))
if os.environ.get("PROBE_X3"):  # the kernel's own split ("tf32x3"), the tiles its config list weighs
    PRECISIONS = ("tf32x3",)
    LAYOUTS = ((32, True, 32), (64, True, 64), (128, True, 128), (256, False, 32))
    TILES = ((64, 64, 8, 2), (64, 64, 8, 3), (128, 64, 8, 2), (64, 128, 8, 2), (64, 32, 4, 2), (64, 32, 8, 2),
             (64, 64, 4, 2), (128, 32, 8, 2), (32, 32, 4, 2))


def jobs():
    """One l2 search launch (unmasked tiles, three l2 bands) per precision, D layout and tile."""
    k = w.nearest_code._nearest_code_fwd_kernel
    out = []
    for prec in PRECISIONS:
        for D, one_d, bd in LAYOUTS:
            if prec == "ieee" and one_d and D == 256:
                continue  # (the launcher streams D for the exact dot)
            for bn, bk, nw, ns in TILES:
                const = dict(UNIT, EVEN_K=True, EVEN_D=one_d, METRIC=0, HAS_LOWER_BOUND=False, SAMPLE=False,
                             WRITE_PARTIAL=False, ONE_D_BLOCK=one_d, SCALE_ROWS=True, PRECISION=prec, DOT_FP32=False,
                             NBANDS=3, BLOCK_D=bd, BLOCK_N=bn, BLOCK_K=bk)
                label = f"fp32/{prec} D={D} {'resident' if one_d else 'streamed'} BLOCK_D={bd} {bn}x{bk} w{nw} s{ns}"
                out.append(w.Job("nearest_code._nearest_code_fwd_kernel", label, w._jit(k), _ptrs("*fp32"), const,
                                 nw, ns, aligned_ints=ROW_INTS, dot=True))
    return out


# (D, layout of x and the codebook (the worker's _lay), metric, forced splits)
LAYOUT_CALLS = [(24, "c", "l2", None), (24, "c", "cosine", None), (32, "p", "l2", None), (40, "c", "l2", None),
                (48, "c", "l2", None), (60, "c", "l2", None), (60, "c", "cosine", None), (60, "c", "l2", 4),
                (64, "p", "l2", None), (64, "o", "l2", None), (64, "c", "dot", None), (64, "c", "cosine", None),
                (64, "c", "l2", 4), (32, "c", "cosine", None), (100, "c", "l2", None), (256, "c", "cosine", None)]


def layouts_main():
    import json

    nc = w.nearest_code
    tiles = set(nc.CONFIGS_X3) | {nc.X3_FALLBACK}

    def launches():
        return [(f"D={d} layout={lay} {metric}{f' splits={sp}' if sp else ''}",
                 lambda d=d, lay=lay, metric=metric, sp=sp: nc.nearest_code_fwd(
                     w._lay((1 << 20, d), lay), w._lay((1024, d), lay), metric=metric, splits=sp))
                for d, lay, metric, sp in LAYOUT_CALLS]

    def tile(label):
        kv = dict(p.split("=") for p in label.replace(w.PINNED, "").split(","))
        return int(kv["BLOCK_N"]), int(kv["BLOCK_K"]), int(kv["w"]), int(kv["s"])

    def collect(target):
        return [launch for pinned in (False, True) for launch in w.capture(target, pinned=pinned, launches=launches)
                if launch.kernel.endswith("_nearest_code_fwd_kernel") and launch.args.get("PRECISION") == "tf32x3"
                and tile(launch.config) in tiles]

    print("triton", w.triton.__version__, "(compiled for sm_90 and sm_80 on a CPU, not measured)")
    recs = w.sweep(("sm_90", "sm_80"), jobs=2, include_pruned=True, collect=collect)
    for r in sorted(recs, key=lambda r: (r["target"], r["calls"], r["config"])):
        print(json.dumps({k: r.get(k) for k in ("target", "calls", "config", "kept", "regs", "spill", "shared",
                                                "wgmma", "ok", "error")}), flush=True)


def main():
    if os.environ.get("PROBE_LAYOUTS"):
        return layouts_main()
    w._JOBS[:] = jobs()
    print("triton", w.triton.__version__, "(compiled for sm_90 on a CPU, not measured)")
    with ProcessPoolExecutor(2, mp_context=mp.get_context("fork")) as pool:
        for rec in pool.map(w._compile, range(len(w._JOBS))):
            print(f"{rec['variant']:58s} ok={rec.get('ok')} reg={rec.get('reg')} stack={rec.get('stack')} "
                  f"smem={rec.get('shared')} wgmma={rec.get('wgmma')} mma.sync={rec.get('mma_sync')} "
                  f"{rec.get('error', '')[:80]}", flush=True)


if __name__ == "__main__":
    main()
