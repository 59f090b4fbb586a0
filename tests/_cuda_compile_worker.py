"""Ahead-of-time CUDA compilation of the fastvq kernels for sm_90 (H100/H200) and sm_80 (A100),
without a GPU, through the ptxas bundled in the triton wheel.

Run without ``TRITON_INTERPRET`` (Triton decides interpreted vs compiled when a ``@triton.jit``
function is defined, so the kernel modules must be imported fresh, in a process that never had
it set). Five modes::

    env -u TRITON_INTERPRET .venv/bin/python tests/_cuda_compile_worker.py [--jobs N] [--filter SUBSTR] [--list]
    env -u TRITON_INTERPRET .venv/bin/python tests/_cuda_compile_worker.py --plan [--targets sm_90,sm_80]
    env -u TRITON_INTERPRET .venv/bin/python tests/_cuda_compile_worker.py --sweep \
        --update-json benchmarks/results/sm90-static.json --also .venv36/bin/python
    env -u TRITON_INTERPRET .venv/bin/python tests/_cuda_compile_worker.py --edges [--ci] [--all] [--filter SUBSTR]
    env -u TRITON_INTERPRET .venv36/bin/python tests/_cuda_compile_worker.py --edges   # triton 3.6, the GPU image's
    env -u TRITON_INTERPRET .venv/bin/python tests/_cuda_compile_worker.py --update-record

* default (CI, ``tests/test_cuda_compile.py``): a representative subset for sm_90, every kernel
  at least once and each dtype and constexpr the launchers pass, one config each. Each job is
  one ``triton.compile`` of one kernel, its arguments specialised as a contiguous launch
  specialises them (16-byte aligned pointers, unit strides as the constant 1, row strides
  divisible by 16, plus one unaligned variant of each main kernel), through ptxas to a cubin.
  One JSON line per job (last: a summary) with the shared memory from the compiled kernel's
  metadata, registers / spills (``cuobjdump --dump-resource-usage``) and whether the PTX uses
  ``wgmma`` or ``mma.sync``. ``--record tests/sm90-compile-record.json`` (CI) takes the results
  of the jobs whose key (:func:`record_key`: Triton's compile-cache key of the job and the bytes of
  this file) is in that file and compiles only the others (and a fixed sample, to compare).
* ``--plan``: every launch the benchmark shapes make (:func:`bench_launches`: the launchers
  called on meta tensors, Triton's launch intercepted), for each target: every autotune config,
  whether the kernel's early prune keeps it (budgeting for that target), the prune's estimate,
  and the specialisation Triton's own binder gives that launch; then the same shapes with each
  autotuned kernel pinned to its ``FASTVQ_AUTOTUNE=0`` config (config ``pinned ...``, what a GPU
  test run uses). Compiles nothing (seconds).
* ``--sweep``: compiles every launch of the plan the prunes keep, for each target, through
  ptxas; ``--update-json`` writes the records of this triton version to the JSON and ``--also``
  runs the same sweep with another interpreter (triton 3.6, the GPU image's version).
* ``--edges``: the edge-shaped launches (:func:`edge_launches`: every launcher called with sizes
  of 1, D not a multiple of 16, transposed / strided / unaligned inputs, each dtype and index
  dtype it accepts; ~2,200 unique specialisations, ~30 min of one core per triton version)
  compiled for sm_90 with each autotuned kernel's pinned config, the GPU test run's. One JSON
  line per failure (``--all``: per launch), one per launcher call that raised, then a summary;
  exit status 1 on any failure. Run it with both virtualenvs (triton 3.8, CI's; 3.6, the GPU
  image's) after changing a kernel or a launcher. ``--ci``: the subset
  ``tests/test_cuda_compile.py`` compiles (:func:`representative`: every argument's
  specialisation seen in the whole set at least once, ~120 launches); ``--record`` as above.
* ``--update-record``: compiles the default jobs and the ``--edges --ci`` subset and rewrites
  the compile record with their results (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import argparse
import functools
import json
import multiprocessing as mp
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
import dataclasses
from dataclasses import dataclass, field

if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
    sys.exit("_cuda_compile_worker: TRITON_INTERPRET must be unset (kernels would be interpreted)")
os.environ.pop("TRITON_INTERPRET", None)
# Every autotuner with its full GPU config list, whatever the caller's environment says (a CUDA
# test run sets FASTVQ_AUTOTUNE=0, and the workers it spawns inherit it): pinned launches are
# modelled explicitly (``capture(pinned=True)``).
os.environ["FASTVQ_AUTOTUNE"] = "1"

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from fastvq import kernels  # noqa: E402
from fastvq.reference.rotation_trick import EPS_ANTIPODAL, EPS_NORM  # noqa: E402

_ROTATION_EPS = dict(eps_norm=EPS_NORM, eps_antipodal=EPS_ANTIPODAL)  # what the op passes the residual backward
from fastvq.reference.pairwise_kl_loss import logit_scaling, row_max  # noqa: E402
from fastvq.kernels import (  # noqa: E402
    code_statistics,
    code_usage,
    ema_update,
    nearest_code,
    pairwise_kl_loss,
    pairwise_sqdist,
    qr_lookup,
    residual_quantize,
    rotation_trick,
    semantic_ids,
)

TARGET = GPUTarget("cuda", 90, 32)
H100_SMEM = 232448  # bytes one block may opt into on sm_90 (227 KiB)
DTYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
_CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


@dataclass
class Job:
    kernel: str  # "module._kernel_name"
    variant: str  # human-readable specialization
    fn: object  # the JITFunction
    ptrs: dict  # arg name -> "*bf16" ... (non-listed, non-constexpr args are i32)
    constexprs: dict  # declared constexprs and unit strides
    num_warps: int = 4
    num_stages: int = 3
    maxnreg: int | None = None  # a config's register limit (ptxas .maxnreg), as its launch passes it
    scalars: dict = field(default_factory=dict)  # arg name -> "fp32" / "i64" ...
    aligned: bool = True  # row strides / sizes named in `aligned_ints` divisible by 16
    aligned_ints: tuple = ()
    dot: bool = False  # the kernel's tiles go through tl.dot
    tensor_cores: bool = False  # 16-bit or tf32 dot operands: must run on the tensor cores ...
    rows: int = 0  # ... as wgmma when the dot's M (rows of its first operand) is >= 64
    pruned: bool = False  # the autotuner's early prune drops this config: too big is fine
    cost: float = 1.0  # rough compile-time guess, for scheduling the longest first

    @property
    def expect_wgmma(self):
        return self.tensor_cores and self.rows >= 64

    def source(self):
        fn = self.fn
        sig, const, attrs = {}, {}, {}
        for i, name in enumerate(fn.arg_names):
            if name in self.constexprs:
                sig[name] = "constexpr"
                const[name] = self.constexprs[name]
            elif name in self.ptrs:
                sig[name] = self.ptrs[name]
                attrs[(i,)] = [["tt.divisibility", 16]]
            else:
                sig[name] = self.scalars.get(name, "i32")
                if self.aligned and name in self.aligned_ints:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        unknown = set(self.constexprs) - set(fn.arg_names)
        if unknown:
            raise KeyError(f"{self.kernel}: no such arguments {sorted(unknown)}")
        return triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs)


def _jit(k):
    """The JITFunction under an Autotuner (or the JITFunction itself)."""
    while isinstance(k, (triton.runtime.autotuner.Autotuner, triton.runtime.autotuner.Heuristics)):
        k = k.fn
    return k


def _cfgs(k):
    """The autotune configs the kernel was decorated with (the GPU list in this process)."""
    return list(k.configs)


def _pick(configs, num_warps=None, num_stages=None, **kwargs):
    """The first config with these values (the middle one if the list no longer has it)."""
    for c in configs:
        if all(c.kwargs.get(k) == v for k, v in kwargs.items()) and num_warps in (None, c.num_warps) \
                and num_stages in (None, c.num_stages):
            return c
    return configs[len(configs) // 2]


def _cfg_label(c):
    kw = ",".join(f"{k}={v}" for k, v in c.kwargs.items())
    return f"{kw},w={c.num_warps},s={c.num_stages}"


_ELT = {"bf16": 2, "fp16": 2, "fp32": 4}
_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------- job lists


def _nearest_code_jobs():
    mod = nearest_code
    jobs = []
    unit = {"stride_xd": 1, "stride_cd": 1, "stride_pd": 1}
    unit_tk = {"stride_xd": 1, "stride_cd": 1}
    row_ints = ("stride_xh", "stride_xn", "stride_ch", "stride_ck", "stride_pn")

    def ptrs(dt):
        p = DTYPES[dt]
        return {"p_x": p, "p_c": p, "p_chat": p, "p_pos": p, "p_cterm": "*fp32", "p_meta": "*i32", "p_seed": "*i64", "p_idx": "*i64",
                "p_dist": "*fp32", "p_pscore": "*fp32", "p_pidx": "*i32"}

    # pre-passes
    for dt in DTYPES:
        for metric in (0, 1, 2):
            jobs.append(Job("nearest_code._code_terms_kernel", f"{dt},METRIC={metric}", mod._code_terms_kernel,
                            {"p_c": DTYPES[dt], "p_cterm": "*fp32", "p_pmax": "*fp32", "p_pmin": "*fp32",
                             "p_pfirst": "*i32"},
                            {"stride_cd": 1, "METRIC": metric, "NBANDS": 3 if metric in (0, 3) else 1,
                             "BLOCK_K": 64, "BLOCK_D": 64},
                            aligned_ints=("stride_ch", "stride_ck"), cost=0.5))
            jobs.append(Job("nearest_code._code_rescale_kernel", f"{dt},METRIC={metric}", mod._code_rescale_kernel,
                            {"p_c": DTYPES[dt], "p_chat": DTYPES[dt], "p_cterm": "*fp32", "p_pmax": "*fp32",
                             "p_pmin": "*fp32", "p_pfirst": "*i32", "p_meta": "*i32"},
                            {"stride_cd": 1, "METRIC": metric, "NBANDS": 3 if metric in (0, 3) else 1,
                             "CAN_SCALE": dt != "fp16", "TAME": 20, "BLOCK_K": 64, "BLOCK_D": 64, "BLOCK_B": 256},
                            aligned_ints=("stride_ch", "stride_ck"), cost=0.5))
    # merge of the split partials and the epilogue
    for metric, lb in ((0, False), (1, False), (2, False), (3, False), (0, True)):
        jobs.append(Job("nearest_code._nearest_code_reduce_kernel", f"METRIC={metric},HAS_LOWER_BOUND={lb}",
                        mod._nearest_code_reduce_kernel,
                        {"p_x": "*bf16", "p_c": "*bf16", "p_meta": "*i32", "p_pscore": "*fp32", "p_pidx": "*i32",
                         "p_idx": "*i64", "p_dist": "*fp32"},
                        {"stride_xd": 1, "stride_cd": 1, "METRIC": metric, "HAS_LOWER_BOUND": lb, "BLOCK_N": 64,
                         "BLOCK_D": 64},
                        aligned_ints=("stride_xh", "stride_xn", "stride_ch", "stride_ck"), cost=0.5))

    k = mod._nearest_code_fwd_kernel
    configs = _cfgs(k)

    def fwd(dt, prec, metric, lb, partial, one_d, block_d, cfg, pruned=False, aligned=True, tag="", sample=False):
        # whole code tiles and D == BLOCK_D (the unmasked path) unless unaligned or split
        even = aligned and not partial
        const = dict(unit if aligned else {}, EVEN_K=even, EVEN_D=even and one_d, METRIC=metric,
                     HAS_LOWER_BOUND=lb, SAMPLE=sample, WRITE_PARTIAL=partial,
                     ONE_D_BLOCK=one_d, SCALE_ROWS=dt != "fp16", PRECISION=prec,
                     DOT_FP32=False, NBANDS=3 if metric in (0, 3) else 1, BLOCK_D=block_d, **cfg.kwargs)
        var = (f"{dt}/{prec},METRIC={metric},LB={int(lb)},{'SAMPLE,' if sample else ''}PARTIAL={int(partial)},"
               f"{'EVEN,' if even else ''}"
               f"{'resident' if one_d else 'streamed'} BLOCK_D={block_d}{tag} | {_cfg_label(cfg)}")
        big = cfg.kwargs["BLOCK_N"] * cfg.kwargs["BLOCK_K"] * block_d / (64 * 64 * 64)
        return Job("nearest_code._nearest_code_fwd_kernel", var, _jit(k), ptrs(dt), const, cfg.num_warps,
                   cfg.num_stages, aligned=aligned, aligned_ints=row_ints, dot=True,
                   tensor_cores=prec != "ieee", rows=cfg.kwargs["BLOCK_N"], pruned=pruned,
                   cost=big * (6 if prec == "ieee" else 3 if prec == "tf32x3" else 1))

    # (Every config the prune keeps at the benchmark shapes: --sweep, benchmarks/results/sm90-static.json.)
    # The largest resident tile of each list once: bf16 and fp32 at D = 256.
    jobs.append(fwd("bf16", "tf32", 0, False, False, True, 256,
                    _pick(configs, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=2)))
    jobs.append(fwd("fp32", "ieee", 0, False, False, True, 256,
                    _pick(configs, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=2)))
    # Every constexpr the launcher passes, against each dtype, at one mid config.
    mid = _pick(configs, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=2)
    mid32 = _pick(configs, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=2)  # fp32's own list
    flag_sets = [  # (METRIC, HAS_LOWER_BOUND, WRITE_PARTIAL, ONE_D_BLOCK, BLOCK_D)
        (1, False, True, True, 128), (2, False, False, False, 64), (0, True, True, False, 64),
        (0, True, False, True, 64), (1, False, False, True, 16), (2, False, True, True, 32),
    ]
    for dt, prec in (("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "ieee"), ("fp32", "tf32")):
        for metric, lb, partial, one_d, block_d in (flag_sets if (dt, prec) != ("fp32", "tf32") else flag_sets[:2]):
            if lb and prec == "tf32" and dt == "fp32":
                continue  # mining never asks for tf32
            jobs.append(fwd(dt, prec, metric, lb, partial, one_d, block_d, mid if dt != "fp32" else mid32))
    jobs.append(fwd("fp16", "tf32", 0, False, False, True, 256,
                    _pick(configs, BLOCK_N=128, BLOCK_K=64, num_warps=8, num_stages=3)))
    # float32's plain search on TF32 tensor cores ("tf32x3", split operands): resident x up to
    # D = 64, streamed 32-wide chunks beyond; every metric, split and unaligned once
    x3 = _pick(configs, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=2)
    for metric, partial, one_d, block_d in ((0, False, True, 64), (1, True, True, 32), (2, False, False, 32),
                                            (3, True, False, 32), (0, False, True, 16)):
        jobs.append(fwd("fp32", "tf32x3", metric, False, partial, one_d, block_d, x3))
    jobs.append(fwd("fp32", "tf32x3", 0, False, False, True, 64, _pick(configs, BLOCK_N=64, BLOCK_K=32, num_warps=8),
                    aligned=False, tag=",unaligned"))  # (the tile the prune keeps there: nearest_code._X3_REGS)
    # Odd D: no divisibility on the row strides, nothing unit-stride specialized.
    jobs.append(fwd("bf16", "tf32", 0, False, False, True, 128, mid, aligned=False, tag=",unaligned"))
    # Gumbel-max sampling (every metric; split and streamed once each)
    for metric in (0, 1, 2):  # (euclidean sampling: the benchmark-shape sweep)
        jobs.append(fwd("bf16", "tf32", metric, False, False, True, 64, mid, sample=True))
    jobs.append(fwd("fp16", "tf32", 2, False, True, False, 64, mid, sample=True))
    jobs.append(fwd("fp32", "ieee", 3, False, False, True, 128, mid32, sample=True))
    # top-k: the launcher's fixed tiles (sm_90's; fp32's exact dot streams D in 32-wide chunks)
    tk = mod._topk_codes_fwd_kernel
    for dt, prec, metric, kp, bn, one_d, block_d in (("bf16", "tf32", 0, 16, 64, True, 64),
                                                     ("bf16", "tf32", 1, 128, 32, True, 256),
                                                     ("fp16", "tf32", 2, 2, 64, False, 64),
                                                     ("fp32", "ieee", 3, 8, 64, False, 32),
                                                     ("fp32", "tf32", 0, 16, 64, True, 128)):
        jobs.append(Job("nearest_code._topk_codes_fwd_kernel", f"{dt}/{prec},METRIC={metric},KP={kp},BLOCK_N={bn},"
                        f"{'resident' if one_d else 'streamed'} BLOCK_D={block_d}", tk,
                        {n: v for n, v in ptrs(dt).items() if n in tk.arg_names},
                        dict(unit_tk, METRIC=metric, ONE_D_BLOCK=one_d, SCALE_ROWS=dt != "fp16",
                             NBANDS=3 if metric in (0, 3) else 1, PRECISION=prec, DOT_FP32=False, KP=kp, BLOCK_N=bn, BLOCK_K=32 if dt == "fp32" else 64,
                             BLOCK_D=block_d, FIN_D=min(block_d, 32)),
                        8 if dt == "fp32" else 4, 1, aligned_ints=("stride_xh", "stride_xn", "stride_ch", "stride_ck"), dot=True,
                        tensor_cores=prec == "tf32", rows=bn, cost=2.0 * (6 if prec == "ieee" else 1)))
    return jobs


def _residual_quantize_jobs():
    mod = residual_quantize
    jobs = []
    common_unit = {"stride_xd": 1, "stride_cd": 1, "stride_qd": 1, "stride_ol": 1}
    row_ints = ("stride_xn", "stride_cl", "stride_ck", "stride_qn", "stride_on", "stride_wn")
    # flag sets the launcher passes: the plain op, and a training step (loss, EMA statistics,
    # revival candidates; with a padding mask, or with codes searched elsewhere)
    plain = dict(SEARCH=True, HAS_W=False, LOSS=False, STATS=False, CAND=False)
    train = dict(SEARCH=True, HAS_W=False, LOSS=True, STATS=True, CAND=True)
    masked = dict(train, HAS_W=True)
    given = dict(SEARCH=False, HAS_W=False, LOSS=True, STATS=False, CAND=False)

    def job(name, k, dt, cfg, block_d, block_l=8, pruned=False, aligned=True, tag="", chunked=False, flags=plain,
            prec=None):
        p = DTYPES[dt]
        ptrs = {"p_x": p, "p_cb": p, "p_q": p, "p_codes": "*i64",  # a flag that is off: a placeholder (q)
                "p_w": "*fp32" if flags["HAS_W"] else p, "p_sw": "*fp32" if flags["HAS_W"] and flags["STATS"] else p,
                "p_loss": "*fp32" if flags["LOSS"] else p,
                "p_counts": "*fp32" if flags["STATS"] else p, "p_sums": "*fp32" if flags["STATS"] else p,
                "p_skip": "*i32" if flags["STATS"] else p, "p_slot": "*i32" if flags["CAND"] else p,
                "p_cand": "*fp32" if flags["CAND"] else p, "p_cand_ok": "*i8" if flags["CAND"] else p}
        if chunked:
            ptrs["p_ws"] = "*fp32"
        # (float32: three TF32 products up to BLOCK_D = X3_MAX_D in the register variant, as the launcher)
        prec = prec or ("tf32x3" if dt == "fp32" and not chunked and block_d <= mod.X3_MAX_D
                        else "ieee" if dt == "fp32" else "tf32")
        # the statistics fix-up's whole rows: BLOCK_D; chunked, the narrowest D that runs chunked
        fix_d = block_d if not chunked else 2 * mod.register_d_limit(torch.float32 if dt == "fp32" else torch.bfloat16)
        const = dict(common_unit if aligned else {}, BLOCK_D=block_d, BLOCK_L=block_l, PRECISION=prec,
                     DOT_FP32=False, BF16_RNE=False, **mod.stats_fix_tiles(fix_d), **flags, **cfg.kwargs)
        big = cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_K"] * block_d / (64 * 64 * 64)
        on = "+".join(f for f in ("HAS_W", "LOSS", "STATS", "CAND") if flags[f]) + ("" if flags["SEARCH"] else "+GIVEN")
        return Job(f"residual_quantize.{name}",
                   f"{dt}{'/' + prec if prec == 'ieee' else ''},BLOCK_D={block_d},BLOCK_L={block_l}{tag}"
                   f"{',' + on if on else ''} | {_cfg_label(cfg)}",
                   _jit(k), ptrs, const, cfg.num_warps, cfg.num_stages, cfg.maxnreg,
                   scalars={"stat_lim": "fp32", "BIG_T": "fp32"}, aligned=aligned,
                   aligned_ints=row_ints, dot=True, tensor_cores=prec != "ieee" and flags["SEARCH"],
                   rows=cfg.kwargs["BLOCK_M"], pruned=pruned,
                   cost=big * (6 if dt == "fp32" else 1) + 0.5)

    # Register variant, as a training step, at the widest BLOCK_D it runs with (256; float32 128):
    # one config the prune keeps (every kept config at the benchmark shapes: --sweep).
    k = mod._residual_quantize_fwd_kernel
    configs = _cfgs(k)
    for dt, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        prec = "ieee" if dt == "fp32" else "tf32"  # (float32 rows wider than X3_MAX_D: the exact dot)
        block_d = mod.register_d_limit(dtype)
        kept = mod._prune_register_configs(configs, {"p_x": torch.empty(0, dtype=dtype, device="meta")},
                                           BLOCK_D=block_d, PRECISION=prec, LOSS=True, BLOCK_L=8)
        jobs.append(job("_residual_quantize_fwd_kernel", k, dt, kept[len(kept) // 2], block_d, flags=train,
                        tag=",kept", prec=prec))
    # float32 at BLOCK_D = X3_MAX_D: three TF32 products (its listed tiles, a 32-row one)
    x3 = mod._prune_register_configs(configs, {"p_x": torch.empty(0, dtype=torch.float32, device="meta")},
                                     BLOCK_D=mod.X3_MAX_D, PRECISION="tf32x3", LOSS=True, BLOCK_L=8)
    jobs.append(job("_residual_quantize_fwd_kernel", k, "fp32", x3[-1], mod.X3_MAX_D, flags=train, tag=",kept"))
    # 64-row tiles reach wgmma (bf16, BLOCK_D 64)
    kept = mod._prune_register_configs(configs, {"p_x": torch.empty(0, dtype=torch.bfloat16, device="meta")},
                                       BLOCK_D=64, PRECISION="tf32", LOSS=False, BLOCK_L=8)
    big = [c for c in kept if c.kwargs["BLOCK_M"] >= 64] or [_pick(configs, BLOCK_M=64, BLOCK_K=64, num_warps=4)]
    jobs.append(job("_residual_quantize_fwd_kernel", k, "bf16", big[0], 64, pruned=big[0] not in kept))
    small = configs[0]
    jobs.append(job("_residual_quantize_fwd_kernel", k, "fp32", x3[0], 64, flags=masked))
    jobs.append(job("_residual_quantize_fwd_kernel", k, "fp32", small, 64, flags=given, block_l=2))
    jobs.append(job("_residual_quantize_fwd_kernel", k, "fp32", small, 64, flags=masked, prec="ieee"))  # (no TF32)
    jobs.append(job("_residual_quantize_fwd_kernel", k, "bf16", small, 16, block_l=2))
    # float16: its own rescue of residuals beyond float16's range (FP16_WIDE_ROW)
    jobs.append(job("_residual_quantize_fwd_kernel", k, "fp16", small, 64, flags=masked))
    jobs.append(job("_residual_quantize_fwd_kernel", k, "bf16", _pick(configs, BLOCK_M=32, BLOCK_K=32, num_warps=4),
                    64, aligned=False, tag=",unaligned", flags=train))

    # D-chunked variant: BLOCK_D = CHUNK_D always; one config the chunked prune keeps per dtype.
    k = mod._residual_quantize_fwd_chunked_kernel
    for dt, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        kept = mod._prune_chunked_configs(_cfgs(k), {"p_x": torch.empty(0, dtype=dtype, device="meta")},
                                          PRECISION="ieee" if dt == "fp32" else "tf32", LOSS=True, BLOCK_L=8)
        jobs.append(job("_residual_quantize_fwd_chunked_kernel", k, dt, kept[len(kept) // 2], mod.CHUNK_D,
                        chunked=True, flags=train if dt == "bf16" else masked, tag=",kept"))
        if dt == "bf16":  # and float16, its own rescue (FP16_WIDE_ROW)
            jobs.append(job("_residual_quantize_fwd_chunked_kernel", k, "fp16", kept[len(kept) // 2], mod.CHUNK_D,
                            chunked=True, flags=masked))
        if dt == "bf16":  # 64-row tiles reach wgmma
            big = [c for c in kept if c.kwargs["BLOCK_M"] >= 64] or [_pick(_cfgs(k), BLOCK_M=64, BLOCK_K=32,
                                                                            num_warps=8)]
            jobs.append(job("_residual_quantize_fwd_chunked_kernel", k, dt, big[0], mod.CHUNK_D, chunked=True,
                            pruned=big[0] not in kept))

    # Backward: (BLOCK_M, BLOCK_D) as the launcher picks them; the rotation holds a whole row.
    k = mod._residual_quantize_bwd_kernel
    for dt in ("fp32", "bf16"):
        p = DTYPES[dt]
        for D, rotate, has_w in ((64, False, False), (64, True, True), (256, False, True), (1024, True, False),
                                 (4096, False, False)):
            block_d = max(mod.next_pow2(D), 16) if rotate else min(max(mod.next_pow2(D), 16), 128)
            block_m = max(1, min(64, 2048 // block_d))
            flags = dict(HAS_W=has_w, HAS_G=True, HAS_GC=True, HAS_GE=True, HAS_DX=True, ROTATE=rotate)
            jobs.append(Job("residual_quantize._residual_quantize_bwd_kernel",
                            f"{dt},D={D},BLOCK_M={block_m},BLOCK_D={block_d}" + (",ROTATE" if rotate else "")
                            + (",HAS_W" if has_w else ""),
                            k, {"p_x": p, "p_cb": p, "p_codes": "*i64", "p_w": "*fp32" if has_w else p, "p_g": p,
                                "p_gc": "*fp32", "p_ge": "*fp32", "p_dx": p, "p_dcb": "*fp32", "p_state": "*i32"},
                            {"stride_xd": 1, "stride_cd": 1, "stride_ol": 1, "stride_gd": 1, "stride_dd": 1,
                             "BLOCK_M": block_m, "BLOCK_D": block_d, "EPS_N": EPS_NORM if rotate else 0.0,
                             "EPS_S": EPS_ANTIPODAL if rotate else 0.0,
                             **mod.bwd_fix_tiles(block_d), **flags},
                            aligned_ints=("stride_xn", "stride_cl", "stride_ck", "stride_on", "stride_gn", "stride_dn"),
                            scalars={"BIG_T": "fp32"}, cost=0.8, num_warps=mod.bwd_num_warps(block_d),
                            maxnreg=mod.BWD_FIXUP_MAXNREG))  # (HAS_GE: the launch states it)
    return jobs


def _ema_update_jobs():
    m = ema_update
    jobs = []
    for dt in ("fp32", "bf16"):
        for block_d in (16, 64, 256, m.MAX_BLOCK_D):
            block_r = max(1, min(64, 4096 // block_d))
            jobs.append(Job("ema_update._ema_update_kernel", f"codebook {dt},BLOCK_R={block_r},BLOCK_D={block_d}",
                            m._ema_update_kernel,
                            {"p_ea": "*fp32", "p_sums": "*fp32", "p_cb": DTYPES[dt], "p_keep": "*i8", "p_live": "*i8",
                             "p_smoothed": "*fp32"},
                            {"stride_cd": 1, "BLOCK_R": block_r, "BLOCK_D": block_d, "BF16_RNE": False},
                            scalars={"decay": "fp32", "one_minus_decay": "fp32"},
                            aligned_ints=("D", "stride_cl", "stride_ck"), cost=0.3))
    return jobs


def _pairwise_kl_loss_jobs():
    mod = pairwise_kl_loss
    jobs = []
    row_ints = ("stride_pb", "stride_tb", "stride_xb", "stride_db", "stride_xpb", "stride_xtb")
    scalars = {"logit_mult": "fp32", "exp_mult": "fp32", "inv_c": "fp32", "grad_mult": "fp32"}
    for name, k, bwd in (("_pairwise_kl_loss_fwd_kernel", mod._pairwise_kl_loss_fwd_kernel, False),
                         ("_pairwise_kl_loss_bwd_kernel", mod._pairwise_kl_loss_bwd_kernel, True)):
        configs = _cfgs(k)
        for dt in DTYPES:
            p = DTYPES[dt]
            elt = _ELT[dt]
            prec = "ieee" if dt == "fp32" else "tf32"
            ptrs = {"p_pred": p, "p_target": p, "p_ep": "*i32", "p_et": "*i32", "p_kl": "*fp64", "p_lse_p": "*fp64",
                    "p_lse_t": "*fp64", "p_grad": "*fp32", "p_x": p, "p_xp": p, "p_xt": p, "p_dpred": p}
            ptrs = {a: v for a, v in ptrs.items() if a in _jit(k).arg_names}
            # the launcher's largest D chunks for this precision, and the configs the prune keeps for it
            block_d = mod.MAX_BLOCK_D[elt]
            extra = {"BLOCK_DO": mod.MAX_BLOCK_DO[elt], "H_SCALE": mod.H_SCALE_FP16 if dt == "fp16" else 1.0} \
                if bwd else {}
            kept = mod._prune_configs(configs, {"p_pred": torch.empty(0, dtype=_DTYPE[dt], device="meta")},
                                      BLOCK_DP=block_d, BLOCK_DT=block_d, **extra)
            for cfg in kept[:1]:
                const = dict(stride_pd=1, stride_td=1, BLOCK_DP=block_d, BLOCK_DT=block_d, PREC_P=prec, PREC_T=prec,
                             DOT_FP32_P=False, DOT_FP32_T=False, ROW_SCALED=dt != "fp16", **extra, **cfg.kwargs)
                if "stride_dd" in _jit(k).arg_names:
                    const["stride_dd"] = 1
                    const["stride_xd"] = 1
                for a in ("stride_xpd", "stride_xtd"):  # the raw inputs of the float64 logits, contiguous
                    if a in _jit(k).arg_names:
                        const[a] = 1
                big = cfg.kwargs["BLOCK_M"] * cfg.kwargs["BLOCK_N"] / (64 * 64)
                label = f"{dt},BLOCK_DP=BLOCK_DT={block_d}" + (f",BLOCK_DO={extra['BLOCK_DO']}" if bwd else "")
                jobs.append(Job(f"pairwise_kl_loss.{name}", f"{label} | {_cfg_label(cfg)}",
                                _jit(k), ptrs, const, cfg.num_warps, cfg.num_stages,
                                scalars={a: v for a, v in scalars.items() if a in _jit(k).arg_names},
                                aligned_ints=row_ints, dot=True, tensor_cores=dt != "fp32",
                                rows=cfg.kwargs["BLOCK_M"],
                                cost=big * (8 if dt == "fp32" else 2)))
    # narrow features (BLOCK_D = 16, the smallest wgmma K for 16-bit operands), bf16
    k = mod._pairwise_kl_loss_bwd_kernel
    cfg = _cfgs(k)[0]
    const = dict(stride_pd=1, stride_td=1, stride_xd=1, stride_xtd=1, stride_dd=1, BLOCK_DP=16, BLOCK_DT=16, BLOCK_DO=16,
                 PREC_P="tf32", PREC_T="tf32", DOT_FP32_P=False, DOT_FP32_T=False, H_SCALE=1.0, ROW_SCALED=True,
                 **cfg.kwargs)
    jobs.append(Job("pairwise_kl_loss._pairwise_kl_loss_bwd_kernel", f"bf16,BLOCK_D*=16 | {_cfg_label(cfg)}", _jit(k),
                    {"p_grad": "*fp32", "p_pred": "*bf16", "p_target": "*bf16", "p_ep": "*i32", "p_et": "*i32",
                     "p_lse_p": "*fp64", "p_lse_t": "*fp64", "p_x": "*bf16", "p_xt": "*bf16", "p_dpred": "*bf16"}, const,
                    cfg.num_warps,
                    cfg.num_stages, scalars={"logit_mult": "fp32", "grad_mult": "fp32"}, aligned_ints=row_ints,
                    dot=True,
                    tensor_cores=True,
                    rows=cfg.kwargs["BLOCK_M"]))
    return jobs


def _pairwise_sqdist_jobs():
    k = pairwise_sqdist._pairwise_sqdist_fwd_kernel
    jobs = []
    # the launcher's tiles: float32 (split "tf32x3", or exact) in 32-wide D chunks at 8 warps, 16-bit
    # in 64-wide at 4
    for dt, prec in (("bf16", "tf32"), ("fp16", "tf32"), ("fp32", "tf32x3"), ("fp32", "ieee"), ("fp32", "tf32")):
        for block_d in ((32, 16) if dt == "fp32" else (64, 16)):
            const = dict(stride_ad=1, stride_bd=1, stride_on=1, BLOCK_M=64, BLOCK_N=64, BLOCK_D=block_d,
                         GROUP=8, PRECISION=prec, DOT_FP32=False)
            jobs.append(Job("pairwise_sqdist._pairwise_sqdist_fwd_kernel", f"{dt}/{prec},BLOCK_D={block_d}", k,
                            {"p_a": DTYPES[dt], "p_b": DTYPES[dt], "p_out": "*fp32"}, const, 8 if dt == "fp32" else 4,
                            aligned_ints=("stride_am", "stride_bn", "stride_om"), dot=True,
                            tensor_cores=prec != "ieee", rows=64, cost=3 if prec != "tf32" else 1))
    return jobs


def _memory_bound_jobs():
    jobs = []
    # code_statistics (x any float dtype, indices int32/int64, weights float/bool(as u8)/none)
    m = code_statistics
    for dt, idx, w, single in (("bf16", "*i64", None, True), ("fp32", "*i32", "*fp32", True),
                               ("fp16", "*i64", "*u8", False), ("bf16", "*i64", "*bf16", False)):
        flags = {"HAS_W": w is not None, "SINGLE_D": single, "BLOCK_N": 16, "BLOCK_D": 256}
        wp = w or DTYPES[dt]
        var = f"{dt},idx={idx[1:]},w={(w or 'none').lstrip('*')},SINGLE_D={single}"
        jobs.append(Job("code_statistics._code_statistics_atomic_kernel", var, m._code_statistics_atomic_kernel,
                        {"p_x": DTYPES[dt], "p_idx": idx, "p_w": wp, "p_counts": "*fp64", "p_sums": "*fp64",
                         "p_bad": "*i32"},
                        {"stride_xd": 1, "stride_idx": 1, "stride_w": 1, **flags},
                        aligned_ints=("stride_xn", "stride_sk"), cost=0.5))
        jobs.append(Job("code_statistics._code_statistics_segment_kernel", var, m._code_statistics_segment_kernel,
                        {"p_x": DTYPES[dt], "p_w": wp, "p_perm": "*i64", "p_offsets": "*i32", "p_item_end": "*i32",
                         "p_pieces": "*i32", "p_multi_first": "*i32", "p_seg_of_item": "*i32",
                         "p_counts": "*fp32", "p_sums": "*fp32", "p_pcounts": "*fp64", "p_psums": "*fp64",
                         "p_bad": "*i32"},
                        {"stride_xd": 1, "stride_w": 1, **flags},
                        aligned_ints=("stride_xn", "stride_sk", "stride_pk"), cost=0.5))
    jobs.append(Job("code_statistics._code_statistics_merge_kernel", "fp64 partials",
                    m._code_statistics_merge_kernel,
                    {"p_multi_seg": "*i32", "p_multi_first": "*i32", "p_pieces": "*i32", "p_pcounts": "*fp64",
                     "p_psums": "*fp64", "p_counts": "*fp32", "p_sums": "*fp32"},
                    {"BLOCK_Q": m.MERGE_BLOCK_Q, "BLOCK_D": m.MERGE_BLOCK_D},
                    aligned_ints=("stride_sk", "stride_pk"), cost=0.3))
    # code_usage (any integer ids)
    for it in ("*i8", "*u8", "*i16", "*i32", "*i64"):
        jobs.append(Job("code_usage._code_usage_fwd_kernel", f"ids={it[1:]}", code_usage._code_usage_fwd_kernel,
                        {"p_idx": it, "p_counts": "*i64"}, {"stride_n": 1, "BLOCK_N": 1024}, cost=0.3))
    # semantic_ids (any integer codes)
    for it in ("*i64", "*i32", "*i16", "*u8"):
        jobs.append(Job("semantic_ids._semantic_ids_fwd_kernel", f"codes={it[1:]}",
                        semantic_ids._semantic_ids_fwd_kernel,
                        {"p_codes": it, "p_order": "*i64", "p_group": "*i64", "p_offsets": "*i64", "p_out": "*i64"},
                        {"stride_cl": 1, "stride_ol": 1, "BLOCK_N": 256, "BLOCK_L": 16},
                        aligned_ints=("stride_cn", "stride_on"), cost=0.3))
    # rotation_trick
    m = rotation_trick
    for dt in ("bf16", "fp32"):
        p = DTYPES[dt]
        jobs.append(Job("rotation_trick._rotation_trick_fwd_kernel", f"{dt},BLOCK_N=16,BLOCK_D=256",
                        m._rotation_trick_fwd_kernel, {"p_q": p, "p_out": p},
                        {"stride_qd": 1, "stride_od": 1, "BLOCK_N": 16, "BLOCK_D": 256},
                        aligned_ints=("stride_qn", "stride_on"), cost=0.3))
        for block_n, block_d, single in ((1, m.MAX_BLOCK_D, True), (64, 64, True), (1, m.MAX_BLOCK_D, False)):
            jobs.append(Job("rotation_trick._rotation_trick_bwd_kernel",
                            f"{dt},BLOCK_N={block_n},BLOCK_D={block_d},SINGLE={single}", m._rotation_trick_bwd_kernel,
                            {"p_e": p, "p_q": p, "p_g": p, "p_de": p},
                            {"stride_ed": 1, "stride_qd": 1, "stride_gd": 1, "stride_dd": 1,
                             "BLOCK_N": block_n, "BLOCK_D": block_d, "SINGLE": single},
                            scalars={"EPS_N": "fp32", "EPS_S": "fp32"},
                            aligned_ints=("stride_en", "stride_qn", "stride_gn", "stride_dn"), cost=0.5))
    # qr_lookup
    m = qr_lookup
    tabs = ("stride_qn", "stride_rn", "stride_on")
    for dt, ids in (("bf16", "*i64"), ("fp32", "*i32")):
        p = DTYPES[dt]
        for op in (0, 1, 2):
            jobs.append(Job("qr_lookup._qr_lookup_fwd_kernel", f"{dt},ids={ids[1:]},OP={op}", m._qr_lookup_fwd_kernel,
                            {"p_ids": ids, "p_qw": p, "p_rw": p, "p_out": p},
                            {"stride_qd": 1, "stride_rd": 1, "stride_od": 1, "OP": op, "BLOCK_N": 32,
                             "BLOCK_D": 128},
                            aligned_ints=tabs, cost=0.3))
        for op, has_w, mean in ((0, False, False), (1, True, False), (2, False, True)):
            jobs.append(Job("qr_lookup._qr_lookup_bag_fwd_kernel", f"{dt},OP={op},HAS_W={has_w},MEAN={mean}",
                            m._qr_lookup_bag_fwd_kernel,
                            {"p_ids": ids, "p_offsets": "*i64", "p_psw": p if has_w else ids, "p_qw": p, "p_rw": p,
                             "p_out": p},
                            {"stride_qd": 1, "stride_rd": 1, "stride_od": 1, "OP": op, "HAS_W": has_w,
                             "MEAN": mean, "BLOCK_L": 16, "BLOCK_D": 128},
                            aligned_ints=tabs, cost=0.3))
        # backward: the sort keys, the row kernel (dense and sparse), the atomic path, the weights' gradient
        grads = ("stride_gn", "stride_qn", "stride_rn", "stride_dqn", "stride_drn")
        for key in ("*i32", "*i64"):
            jobs.append(Job("qr_lookup._qr_keys_kernel", f"ids={ids[1:]},keys={key[1:]}", m._qr_keys_kernel,
                            {"p_ids": ids, "p_keys": key}, {"NEED_Q": True, "NEED_R": True, "BLOCK": 1024},
                            cost=0.3))
        for op, bags, mean, has_w, sparse in ((0, False, False, False, False), (1, True, True, False, False),
                                             (2, True, False, True, True)):
            flags = {"OP": op, "BAGS": bags, "MEAN": mean, "HAS_W": has_w}
            psw = p if has_w else p
            jobs.append(Job("qr_lookup._qr_rows_kernel", f"{dt},{flags},SPARSE={sparse}", m._qr_rows_kernel,
                            {"p_g": p, "p_ids": ids, "p_offsets": "*i64" if bags else ids, "p_psw": psw, "p_qw": p,
                             "p_rw": p, "p_sorted": "*i32", "p_perm": "*i64", "p_rows": "*i64", "p_dq": p, "p_dr": p},
                            {"stride_gd": 1, "stride_qd": 1, "stride_rd": 1, "stride_dqd": 1, "stride_drd": 1,
                             **flags, "SPARSE": sparse, "BLOCK_L": 16, "BLOCK_D": 128},
                            aligned_ints=grads, cost=0.5))
            atomic_ptrs = {"p_g": p, "p_ids": ids, "p_offsets": "*i64" if bags else ids, "p_psw": psw, "p_qw": p,
                           "p_rw": p, "p_dq": "*fp32", "p_dr": "*fp32", "p_state": "*i32"}
            jobs.append(Job("qr_lookup._qr_atomic_kernel", f"{dt},{flags}", m._qr_atomic_kernel, atomic_ptrs,
                            {"stride_gd": 1, "stride_qd": 1, "stride_rd": 1, "stride_dqd": 1, "stride_drd": 1,
                             "NEED_Q": True, "NEED_R": True, **flags, "BLOCK_L": 32, "BLOCK_D": 128},
                            scalars={"BIG_T": "fp32"}, aligned_ints=grads, cost=0.5))
            jobs.append(Job("qr_lookup._qr_atomic_fixup_kernel", f"{dt},{flags}", m._qr_atomic_fixup_kernel,
                            atomic_ptrs,
                            {"stride_gd": 1, "stride_qd": 1, "stride_rd": 1, "NEED_Q": True, "NEED_R": True,
                             **flags, "NARROW": dt != "fp32", **m.atomic_fix_tiles(128), "BLOCK_D": 128},
                            m.FIX_WARPS, aligned_ints=grads[:3], cost=0.5))
            if dt != "fp32":  # the half-precision tables' rounding of the float32 accumulators
                jobs.append(Job("qr_lookup._qr_atomic_narrow_kernel", f"{dt},{flags}", m._qr_atomic_narrow_kernel,
                                {**atomic_ptrs, "p_oq": p, "p_or": p},
                                {"stride_gd": 1, "stride_qd": 1, "stride_rd": 1, "NEED_Q": True, "NEED_R": True,
                                 **flags, **m.atomic_fix_tiles(128), "BLOCK_D": 128},
                                m.FIX_WARPS, aligned_ints=grads[:3], cost=0.5))
        jobs.append(Job("qr_lookup._qr_psw_grad_kernel", f"{dt}", m._qr_psw_grad_kernel,
                        {"p_g": p, "p_ids": ids, "p_offsets": "*i64", "p_qw": p, "p_rw": p, "p_dw": p},
                        {"stride_gd": 1, "stride_qd": 1, "stride_rd": 1, "OP": 1, "BLOCK_L": 32, "BLOCK_D": 128},
                        aligned_ints=("stride_gn", "stride_qn", "stride_rn"), cost=0.3))
    return jobs


def all_jobs():
    return (_nearest_code_jobs() + _residual_quantize_jobs() + _pairwise_kl_loss_jobs() + _pairwise_sqdist_jobs()
            + _memory_bound_jobs() + _ema_update_jobs())


def all_kernels():
    """Every ``@triton.jit`` kernel (``*_kernel``) defined in kernels/*.py, as "module.name"."""
    out = set()
    for mod in (code_statistics, code_usage, ema_update, nearest_code, pairwise_kl_loss, pairwise_sqdist, qr_lookup,
                residual_quantize, rotation_trick, semantic_ids):
        for name, obj in vars(mod).items():
            if name.endswith("_kernel") and isinstance(_jit(obj), triton.runtime.jit.JITFunction):
                out.add(f"{mod.__name__.rsplit('.', 1)[1]}.{name}")
    return sorted(out)


# --------------------------------------------------------------------------- benchmark-shape launches
# The launchers called as the benchmark calls them (fastvq/bench/cases.py, steps.py), on meta
# tensors (no memory; a real allocation's alignment: data_ptr 0, views offset by their
# elements), with Triton's launch intercepted: every autotuned kernel runs its early prune
# exactly as on a GPU (under compile_target: the target's budget) and each config, kept or
# not, is specialised by Triton's own binder for the target, as that launch would be.

M = 1 << 20


def _meta(*shape, dtype=torch.float32):
    return torch.empty(shape, dtype=dtype, device="meta")


def bench_launches():
    """(label, thunk) per benchmark launch; a thunk calls a launcher on meta tensors."""
    bf, f32 = torch.bfloat16, torch.float32
    nc, rq, kl, sq = nearest_code, residual_quantize, pairwise_kl_loss, pairwise_sqdist
    out = []
    name = {bf: "bf16", f32: "fp32", torch.float16: "fp16"}
    # nearest_code / its multi-codebook form / mining / sampling / top-k (cases.py)
    for n, d, k, dt in ((M, 256, 4096, bf), (M, 256, 4096, f32), (M, 256, 8192, bf), (M, 256, 8192, f32),
                        (M, 64, 1024, bf), (M, 64, 1024, f32), (256, 256, M, bf)):
        out.append((f"nearest_code {name[dt]} N={n} D={d} K={k}",
                    lambda n=n, d=d, k=k, dt=dt: nc.nearest_code_fwd(_meta(n, d, dtype=dt), _meta(k, d, dtype=dt))))
    # float32 row widths whose strides are not divisible by 16 (the "tf32x3" prune lists their
    # tiles apart: unaligned loads take more registers), resident at BLOCK_D 32 and 64, streamed
    for d in (24, 60, 100):
        out.append((f"nearest_code fp32 N={M} D={d} K=1024 (unaligned rows)",
                    lambda d=d: nc.nearest_code_fwd(_meta(M, d), _meta(1024, d))))
    for h, n, d, k, dt in ((8, 131072, 32, 1024, bf), (8, 131072, 32, 1024, f32), (4, 262144, 64, 4096, bf)):
        out.append((f"nearest_code {name[dt]} H={h} N={n} D={d} K={k}",
                    lambda h=h, n=n, d=d, k=k, dt=dt: nc.nearest_code_fwd(_meta(h, n, d, dtype=dt),
                                                                          _meta(h, k, d, dtype=dt))))
    for n, d, k, kk, dt in ((262144, 256, 4096, 8, bf), (262144, 256, 4096, 16, bf), (262144, 256, 4096, 16, f32)):
        out.append((f"topk_codes {name[dt]} N={n} D={d} K={k} k={kk}",
                    lambda n=n, d=d, k=k, kk=kk, dt=dt: nc.topk_codes_fwd(_meta(1, n, d, dtype=dt),
                                                                          _meta(1, k, d, dtype=dt), kk)))
    for n, d, k, dt in ((M, 256, 4096, bf), (M, 256, 4096, f32), (M, 64, 1024, bf)):
        out.append((f"sample_code euclidean {name[dt]} N={n} D={d} K={k}",
                    lambda n=n, d=d, k=k, dt=dt: nc.sample_code_fwd(
                        _meta(1, n, d, dtype=dt), _meta(1, k, d, dtype=dt), _meta(dtype=torch.int64), 1.0,
                        "euclidean")))
    for n, m, d, dt in ((65536, 65536, 256, bf), (65536, 65536, 256, f32)):
        out.append((f"mine_negatives semi-hard {name[dt]} N={n} M={m} D={d}",
                    lambda n=n, m=m, d=d, dt=dt: nc.mine_negatives_fwd(_meta(n, d, dtype=dt), _meta(n, d, dtype=dt),
                                                                       _meta(m, d, dtype=dt), "semi-hard")))
    for m, n, d, dt in ((16384, 16384, 256, bf), (16384, 16384, 256, f32)):
        out.append((f"pairwise_sqdist {name[dt]} M={m} N={n} D={d}",
                    lambda m=m, n=n, d=d, dt=dt: sq.pairwise_sqdist_fwd(_meta(m, d, dtype=dt), _meta(n, d, dtype=dt))))
    # residual quantization: the op (cases.py) and the training steps (steps.py: loss, EMA
    # statistics, revival candidates; L=1 is the VectorQuantizer's step)
    for L, n, d, k, dt in ((8, 262144, 256, 256, bf), (8, 262144, 256, 256, f32)):
        out.append((f"residual_quantize {name[dt]} L={L} N={n} D={d} K={k}",
                    lambda L=L, n=n, d=d, k=k, dt=dt: rq.residual_quantize_fwd(_meta(n, d, dtype=dt),
                                                                               _meta(L, k, d, dtype=dt))))
    for L, n, d, k in ((8, 262144, 64, 256), (1, 262144, 64, 512)):
        for tf32 in (False, True):  # (TF32: the modules under torch's "high" float32 matmul precision)
            out.append((f"residual_quantize step fp32{' tf32' * tf32} L={L} N={n} D={d} K={k} (loss, stats, candidates)",
                        lambda L=L, n=n, d=d, k=k, tf32=tf32: rq.residual_quantize_fwd(
                            _meta(n, d), _meta(L, k, d), loss=True, stats=True,
                            slots=_meta(n, dtype=torch.int32), num_slots=k, allow_tf32=tf32)))
    # pairwise KL loss, forward and backward (cases.py: D=128 both; steps.py: pred 32, target 128)
    for b, dp, dt_ in ((4096, 128, 128), (65536, 128, 128), (4096, 32, 128)):
        def fwd_bwd(b=b, dp=dp, dt_=dt_):
            pred, target = _meta(b, dp), _meta(b, dt_)
            scaling = logit_scaling(0.5)
            _, lse_p, lse_t = kl.pairwise_kl_loss_fwd(pred, target, 0.5, scaling, row_max(pred), row_max(target))
            kl.pairwise_kl_loss_bwd(_meta(), pred, target, lse_p, lse_t, 0.5, scaling)
        out.append((f"pairwise_kl_loss fwd+bwd fp32 B={b} Dp={dp} Dt={dt_}", fwd_bwd))
    return out


# --------------------------------------------------------------------------- edge launches
# Small and edge-shaped calls of every launcher: the specialisations Triton makes that the
# benchmark shapes never do (sizes equal to 1 become the constant 1, D not a multiple of 16,
# strides equal to 1 in unusual places or not divisible by 16, unaligned pointers), in each
# dtype and index dtype the launchers accept. The GPU run of 2026-12-04 failed to compile such
# launches that the interpreter runs (residual_quantize: K == 1, x of row stride 1, triton 3.6).

_F = (torch.float32, torch.bfloat16, torch.float16)
_NAME = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int32: "i32",
         torch.int64: "i64", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8", torch.bool: "bool"}


def _lay(shape, layout="c", dtype=torch.float32, device="meta"):
    """A tensor of ``shape`` in a layout: ``c`` contiguous, ``t`` the last two dims transposed
    (rows of stride 1), ``s`` every other element of a twice-as-wide row (inner stride 2, row
    stride 2D), ``p`` rows padded by one element (row stride D + 1: never divisible by 16), ``o``
    contiguous one element into its storage (an unaligned pointer)."""
    shape = tuple(shape)
    if layout == "c":
        return torch.empty(shape, dtype=dtype, device=device)
    if layout == "t":
        return torch.empty(shape[:-2] + (shape[-1], shape[-2]), dtype=dtype, device=device).transpose(-1, -2)
    if layout == "s":
        return torch.empty(shape[:-1] + (2 * shape[-1],), dtype=dtype, device=device)[..., ::2]
    if layout == "p":
        return torch.empty(shape[:-1] + (shape[-1] + 1,), dtype=dtype, device=device)[..., : shape[-1]]
    if layout == "o":
        n = 1
        for v in shape:
            n *= v
        return torch.empty(n + 1, dtype=dtype, device=device)[1:].view(shape)
    raise ValueError(layout)


def edge_launches():
    """(label, thunk) per edge-shaped launcher call (see above); thunks call launchers on meta
    tensors, on CPU ones where a launcher reads a value on the host (semantic_ids' unique, the
    sparse QR gradient's row count), small: the kernels are intercepted, never run."""
    nc, rq, kl, sq = nearest_code, residual_quantize, pairwise_kl_loss, pairwise_sqdist
    out = []

    def add(label, fn, *args, **kwargs):
        out.append((label, lambda: fn(*args, **kwargs)))

    # nearest_code: (H, N, D, K) sizes of 1, odd D, streamed D (> RESIDENT_MAX_D), forced splits
    # (the reduce kernel), every metric, each dtype, layouts of x and the codebook
    shapes = ((1, 1, 1, 1), (1, 5, 7, 3), (3, 2, 17, 1), (1, 3, 300, 2), (2, 1, 16, 5))
    for dt in _F:
        for tf32 in ((False, True) if dt == torch.float32 else (False,)):
            for H, N, D, K in (shapes[:2] if tf32 else shapes):
                small = (N, D) in ((1, 1), (5, 7))
                for metric in (("l2", "cosine", "dot", "euclidean") if small else ("l2",)):
                    for splits in ((None, 2) if small or D > 256 else (None,)):
                        tag = f"nearest_code {_NAME[dt]}{' tf32' * tf32} {metric} H={H} N={N} D={D} K={K} S={splits}"
                        add(tag, nc.nearest_code_fwd, _lay((H, N, D), dtype=dt), _lay((H, K, D), dtype=dt), metric,
                            tf32, splits)
        for lx, lc in (("t", "c"), ("s", "t"), ("p", "s"), ("o", "o"), ("c", "p")):
            for N, D, K in ((5, 7, 3), (4, 32, 2)):
                add(f"nearest_code {_NAME[dt]} x:{lx} cb:{lc} N={N} D={D} K={K}",
                    nc.nearest_code_fwd, _lay((N, D), lx, dt), _lay((K, D), lc, dt), "l2")
        for N, D, K, k in ((1, 1, 1, 1), (5, 7, 3, 2), (3, 300, 4, 3), (2, 17, 40, 1)):
            for metric in ("l2", "cosine", "dot", "euclidean"):
                add(f"topk_codes {_NAME[dt]} {metric} N={N} D={D} K={K} k={k}", nc.topk_codes_fwd,
                    _lay((1, N, D), dtype=dt), _lay((1, K, D), dtype=dt), k, metric)
                add(f"sample_code {_NAME[dt]} {metric} N={N} D={D} K={K}", nc.sample_code_fwd,
                    _lay((1, N, D), dtype=dt), _lay((1, K, D), dtype=dt), _meta(dtype=torch.int64), 0.5, metric)
            add(f"topk_codes {_NAME[dt]} x:t cb:s N={N} D={D} K={K} k={k}", nc.topk_codes_fwd,
                _lay((1, N, D), "t", dt), _lay((1, K, D), "s", dt), k)
        for N, D, M_ in ((1, 1, 1), (5, 7, 3), (3, 300, 2)):
            for strategy in ("hardest", "semi-hard"):
                for splits in (None, 2):
                    add(f"mine_negatives {_NAME[dt]} {strategy} N={N} D={D} M={M_} S={splits}", nc.mine_negatives_fwd,
                        _lay((N, D), dtype=dt), _lay((N, D), dtype=dt), _lay((M_, D), dtype=dt), strategy, splits)
            add(f"mine_negatives {_NAME[dt]} semi-hard p:t N={N} D={D} M={M_}", nc.mine_negatives_fwd,
                _lay((N, D), "s", dt), _lay((N, D), "t", dt), _lay((M_, D), "p", dt), "semi-hard")
        # pairwise_sqdist
        for M_, N, D in ((1, 1, 1), (5, 3, 7), (2, 70, 100)):
            for la, lb in (("c", "c"), ("t", "s"), ("p", "o")):
                add(f"pairwise_sqdist {_NAME[dt]} a:{la} b:{lb} M={M_} N={N} D={D}", sq.pairwise_sqdist_fwd,
                    _lay((M_, D), la, dt), _lay((N, D), lb, dt))

    # residual_quantize forward: (N, L, K, D), each flag, the chunked variant (max_register_d=1)
    i32, i64 = torch.int32, torch.int64
    for dt in _F:
        for N, L, K, D in ((1, 1, 1, 1), (5, 2, 3, 7), (3, 3, 1, 17), (4, 1, 2, 300), (2, 4, 5, 16), (6, 2, 3, 1)):
            for chunked in (False, True):
                mr = 1 if chunked else None
                for tf32 in ((False, True) if dt == torch.float32 and N < 4 else (False,)):
                    base = f"rq fwd {_NAME[dt]}{' tf32' * tf32}{' chunked' * chunked} N={N} L={L} K={K} D={D}"
                    x, cb = _lay((N, D), dtype=dt), _lay((L, K, D), dtype=dt)
                    add(base, rq.residual_quantize_fwd, x, cb, mr, allow_tf32=tf32)
                    add(base + " step", rq.residual_quantize_fwd, x, cb, mr, loss=True, stats=True,
                        slots=_meta(N, dtype=i32), num_slots=min(N, K), allow_tf32=tf32)
                    add(base + " weights", rq.residual_quantize_fwd, x, cb, mr, weights=_meta(N), loss=True,
                        stats=True, stat_weights=_meta(N), slots=_meta(N, dtype=i32), num_slots=1, allow_tf32=tf32)
                    add(base + " codes", rq.residual_quantize_fwd, x, cb, mr, codes=_meta(N, L, dtype=i64), loss=True,
                        allow_tf32=tf32)
                    add(base + " codes:t stats", rq.residual_quantize_fwd, x, cb, mr,
                        codes=_lay((N, L), "t", i64), stats=True, weights=_meta(N))
            for lx, lc in (("t", "c"), ("s", "t"), ("p", "s"), ("o", "o"), ("c", "p")):
                for chunked in (False, True):
                    add(f"rq fwd {_NAME[dt]} x:{lx} cb:{lc}{' chunked' * chunked} N={N} L={L} K={K} D={D}",
                        rq.residual_quantize_fwd, _lay((N, D), lx, dt), _lay((L, K, D), lc, dt),
                        1 if chunked else None, loss=True, stats=True)
    # residual_quantize backward: each input flag, the rotation, layouts of x, grad and codes
    for dt in _F:
        for N, L, K, D in ((1, 1, 1, 1), (5, 2, 3, 7), (3, 3, 1, 17), (4, 1, 2, 300), (2, 2, 2, 1000)):
            x, cb, codes = _lay((N, D), dtype=dt), _lay((L, K, D), dtype=dt), _meta(N, L, dtype=i64)
            g, gl = _lay((N, D), dtype=dt), _meta(L)
            base = f"rq bwd {_NAME[dt]} N={N} L={L} K={K} D={D}"
            add(base, rq.residual_quantize_bwd, x, cb, codes, grad=g)
            add(base + " all", rq.residual_quantize_bwd, x, cb, codes, weights=_meta(N), grad=g, grad_commit=gl,
                grad_embed=gl)
            add(base + " rotate", rq.residual_quantize_bwd, x, cb, codes, weights=_meta(N), grad=g, grad_commit=gl,
                grad_embed=gl, rotate=True, **_ROTATION_EPS)
            add(base + " rotate no w", rq.residual_quantize_bwd, x, cb, codes, grad=g, rotate=True, **_ROTATION_EPS)
            add(base + " embed only", rq.residual_quantize_bwd, x, cb, codes, grad_embed=gl, need_dx=False)
            add(base + " commit", rq.residual_quantize_bwd, x, cb, codes, grad_commit=gl)
            for lay in ("t", "s", "p", "o"):
                add(base + f" layouts:{lay} rotate", rq.residual_quantize_bwd, _lay((N, D), lay, dt),
                    _lay((L, K, D), lay, dt), _lay((N, L), lay, i64), grad=_lay((N, D), lay, dt), grad_commit=gl,
                    grad_embed=gl, rotate=True, **_ROTATION_EPS)

    # pairwise_kl_loss: forward and backward; B = 2 (the fewest rows that launch), feature sizes
    # of 1 and not multiples of 16, D beyond one chunk; temperatures whose scaling factors are 1
    # (0.5: fa = fb = 1; 0.2: fa = 1) or 0 (2.0): the kernels take them as int arguments
    for dt in _F:
        for B, DP, DT in ((2, 1, 1), (3, 7, 17), (5, 300, 16), (2, 16, 100)):
            for lay in (("c", "t", "s", "o") if B == 3 or DT == 100 else ("c",)):
                for T in ((0.5, 2.0, 0.2) if lay == "c" and DP < 300 else (0.5,)):
                    def fwd_bwd(pred=_lay((B, DP), lay, dt), target=_lay((B, DT), lay, dt), T=T):
                        scaling = logit_scaling(T)
                        _, lse_p, lse_t = kl.pairwise_kl_loss_fwd(pred, target, T, scaling, row_max(pred),
                                                                  row_max(target))
                        kl.pairwise_kl_loss_bwd(_meta(), pred, target, lse_p, lse_t, T, scaling)
                    out.append((f"pairwise_kl_loss {_NAME[dt]} {lay} T={T} B={B} Dp={DP} Dt={DT}", fwd_bwd))
    # code_statistics: both modes, index dtypes, weights float / bool / none, layouts of x and indices
    for dt in _F:
        for M_, D, K, NL in ((1, 1, 1, 1), (6, 7, 3, 3), (4, 300, 2, 4), (8, 16, 1, 2)):
            for idt in (i32, i64):
                for w in ((None, torch.float32, torch.bool, dt) if idt == i64 else (None,)):
                    for det in (True, False):
                        wt = None if w is None else _meta(NL, dtype=w)
                        add(f"code_statistics {_NAME[dt]} idx={_NAME[idt]} w={_NAME.get(w)} det={det} "
                            f"M={M_} D={D} K={K} NL={NL}", code_statistics.code_statistics_fwd,
                            _lay((M_, D), dtype=dt), _meta(M_, dtype=idt), K, NL, wt, det)
            for lay in ("t", "s", "p", "o"):
                for det in (True, False):
                    add(f"code_statistics {_NAME[dt]} x:{lay} idx:s det={det} M={M_} D={D}",
                        code_statistics.code_statistics_fwd, _lay((M_, D), lay, dt), _lay((1, M_), "s", i64)[0],
                        K, NL, _lay((1, M_), "s", torch.float32)[0], det)
    # ema_update: the codebook in each dtype and layout
    for dt in _F:
        for L, K, D in ((1, 1, 1), (2, 3, 7), (1, 2, 2000), (3, 1, 16)):
            for lay in ("c", "t", "s", "o"):
                add(f"ema_update {_NAME[dt]} cb:{lay} L={L} K={K} D={D}", ema_update.ema_update_fwd,
                    _lay((L, K, D), lay, dt), _meta(L, K, D), _meta(L, K, D), _meta(L, K, dtype=torch.int8),
                    _meta(L, dtype=torch.int8), _meta(L, K), 0.99)
    # rotation_trick: forward and backward (whole rows, the looping path, a forced tile)
    rt = rotation_trick
    for dt in _F:
        for N, D, bd in ((1, 1, None), (5, 7, None), (3, 5000, None), (2, 40, 16), (1, 16, None)):
            for lay in ("c", "t", "s", "o"):
                e, q, g = (_lay((N, D), lay, dt) for _ in range(3))
                add(f"rotation_trick fwd {_NAME[dt]} {lay} N={N} D={D}", rt.rotation_trick_fwd, e, q)
                add(f"rotation_trick bwd {_NAME[dt]} {lay} N={N} D={D} block_d={bd}", rt.rotation_trick_bwd, e, q, g,
                    1e-6, 1e-6, bd)
    # qr_lookup: forward (plain, bags, weights, mean), backward (sorted, atomic, sparse), every op,
    # id / offset dtypes, table layouts. The sparse gradient reads its row count: CPU tensors.
    ql = qr_lookup
    for dt in _F:
        for N, Q, R, D in ((1, 1, 1, 1), (5, 3, 2, 7), (4, 2, 3, 300)):
            for op in ("add", "mult", "concat"):
                for idt in (i32, i64):
                    for lay in (("c", "t", "o") if idt == i64 and op == "mult" and D < 300 else ("c",)):
                        qw, rw = _lay((Q, D), lay, dt), _lay((R, D + (op == "concat")), lay, dt)
                        ids = _meta(N, dtype=idt)
                        dout = 2 * D + 1 if op == "concat" else D
                        tag = f"qr {_NAME[dt]} {op} ids={_NAME[idt]} tables:{lay} N={N} Q={Q} R={R} D={D}"
                        add(tag + " fwd", ql.qr_lookup_fwd, ids, qw, rw, op)
                        for B in ((1,) if N == 1 else (2,)):
                            offs = _meta(B, dtype=idt)
                            add(tag + f" bag B={B} fwd", ql.qr_lookup_fwd, ids, qw, rw, op, offs, "sum",
                                _meta(N, dtype=dt))
                            add(tag + f" bag B={B} mean fwd", ql.qr_lookup_fwd, ids, qw, rw, op, offs, "mean")
                            add(tag + f" bag B={B} bwd", ql.qr_lookup_bwd, _lay((B, dout), lay, dt), ids, qw, rw, op,
                                offs, "mean", _meta(N, dtype=dt), needs=(True, True, True))
                            add(tag + f" bag B={B} atomic bwd", ql.qr_lookup_bwd, _lay((B, dout), lay, dt), ids, qw,
                                rw, op, offs, "sum", _meta(N, dtype=dt), deterministic=False)
                        g = _lay((N, dout), lay, dt)
                        add(tag + " bwd", ql.qr_lookup_bwd, g, ids, qw, rw, op)
                        add(tag + " bwd q only", ql.qr_lookup_bwd, g, ids, qw, rw, op, needs=(True, False, False))
                        add(tag + " bwd r only", ql.qr_lookup_bwd, g, ids, qw, rw, op, needs=(False, True, False))
                        add(tag + " atomic bwd", ql.qr_lookup_bwd, g, ids, qw, rw, op, deterministic=False)
                        add(tag + " sparse bwd", ql.qr_lookup_bwd, _lay((N, dout), lay, dt, "cpu"),
                            torch.zeros(N, dtype=idt), _lay((Q, D), lay, dt, "cpu"),
                            _lay((R, D + (op == "concat")), lay, dt, "cpu"), op, sparse=True)
    # code_usage and semantic_ids: every integer dtype, strided ids, L == 1 (semantic_ids' torch.unique: CPU)
    for it in (torch.int8, torch.uint8, torch.int16, i32, i64):
        for N in (1, 5):
            for lay in ("c", "s", "o"):
                add(f"code_usage {_NAME[it]} {lay} N={N}", code_usage.code_usage_fwd, _lay((1, N), lay, it)[0], 3)
        for N, L in ((1, 1), (5, 3), (300, 17)):
            for lay in ("c", "t", "s"):
                add(f"semantic_ids {_NAME[it]} {lay} N={N} L={L}", semantic_ids.semantic_ids_fwd,
                    _lay((N, L), lay, it, device="cpu").zero_())
    return out


def _features(launch) -> set:
    """What a launch specialises: each constexpr's value (the declared ones and the int arguments
    Triton fixed to 1), each pointer's dtype, each argument given 16-divisibility."""
    names = launch.src.fn.arg_names
    return {(k, repr(v)) for k, v in launch.args.items()} | {(names[i[0]], "div16") for i in launch.src.attrs}


# Edge calls that failed to compile before a fix (the H200 run, this sweep): always in the CI subset.
CI_ALWAYS = (
    "rq fwd fp32 x:t cb:c N=5 L=2 K=3 D=7",  # x rows not unit-stride (triton 3.6 layout pass)
    "rq fwd fp32 N=6 L=2 K=3 D=1",  # x row stride the constant 1 (D == 1)
    "rq fwd bf16 N=3 L=3 K=1 D=17",  # K == 1: the loop-carried first finite code
    "rq fwd fp32 x:s cb:t N=5 L=2 K=3 D=7",  # codebook codes not unit-stride (triton 3.6 layout pass)
    "rq fwd fp32 x:p cb:s N=5 L=2 K=3 D=7",
)


def representative(launches, always=CI_ALWAYS) -> list:
    """A few launches per kernel that together show every (argument, specialisation) pair of
    ``launches`` (greedy set cover, deterministic), and those of the ``always`` calls: the edge
    set's CI subset, ~5% of it."""
    by_kernel: dict = {}
    for launch in launches:
        by_kernel.setdefault(launch.kernel, []).append(launch)
    picked = []
    for group in by_kernel.values():
        feats = [_features(launch) for launch in group]
        todo = set().union(*feats)
        for i, launch in enumerate(group):
            if set(launch.calls) & set(always):
                picked.append(launch)
                todo -= feats[i]
        while todo:
            best = max(range(len(group)), key=lambda i: len(feats[i] & todo))
            picked.append(group[best])
            todo -= feats[best]
    return picked


def capture_edges(target_name: str, errors=None, ci: bool = False) -> list:
    """The launches of :func:`edge_launches` with each autotuned kernel's pinned config (what a
    GPU test run uses), and the kernels that are not autotuned; ``ci``: their
    :func:`representative` subset."""
    launches = capture(target_name, pinned=True, launches=edge_launches, plain=True, errors=errors)
    return representative(launches) if ci else launches


def _spec_key(kernel, signature, constexprs, attrs, options):
    import hashlib
    blob = json.dumps([kernel, signature, sorted((str(k), repr(v)) for k, v in constexprs.items()),
                       sorted((str(k), repr(v)) for k, v in attrs.items()), sorted(options.items())], default=repr)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=None)
def jit_source_hash(module) -> str:
    """A hash of the source of every ``@triton.jit`` function of a kernel module and of
    ``kernels/_common.py``: a kernel's compiled resources can only change when it changes (a
    launcher or prune edit does not change it; those change which launches there are)."""
    import hashlib
    import inspect

    from fastvq.kernels import _common

    srcs = []
    for mod in (module, _common):
        for name, obj in sorted(vars(mod).items()):
            fn = _jit(obj)
            if isinstance(fn, triton.runtime.jit.JITFunction) and fn.fn.__module__ == mod.__name__:
                srcs.append(inspect.getsource(fn.fn))
    return hashlib.sha1("\n".join(srcs).encode()).hexdigest()[:12]


@dataclass
class Launch:
    kernel: str
    key: str
    src: object
    options: dict
    config: str  # the autotune config ("" for a kernel that is not autotuned)
    kept: bool
    estimate: dict  # the prune's estimate {"shared": B, "regs": per thread}, for autotuned kernels
    calls: list  # the benchmark launches that produce it
    source: str = ""  # jit_source_hash of the kernel's module
    args: dict = field(default_factory=dict)  # the constexprs and pointer dtypes of the launch


PINNED = "pinned "  # the config label's prefix of a FASTVQ_AUTOTUNE=0 launch


def _tuner_name(tuner) -> str:
    """The autotune_configs name of an Autotuner (its configs are that name's GPU list)."""
    from fastvq.kernels import _common

    first = tuner.configs[0]
    for name, configs in _common.GPU_CONFIGS.items():
        if any(c is first for c in configs) or _common.PINNED_CONFIGS.get(name) is first:
            return name
    raise LookupError(f"autotuner of {tuner.fn.__name__}: its first config is in no autotune_configs list")


def _write_qr_keys(p_ids, p_keys, N, M, R, Q, R_BASE, NEED_Q, NEED_R, **_):
    """What ``_qr_keys_kernel`` writes, for an intercepted launch on CPU tensors: the sparse QR
    backward reads its keys back on the host to size the gradient, so its next launch
    specialises on them as on a GPU."""
    if p_keys.device.type != "cpu":
        return
    h = torch.remainder(p_ids[:N].long(), M)
    q = torch.div(h, R, rounding_mode="floor")
    if NEED_Q:
        p_keys[:N] = q
    if NEED_R:
        p_keys[R_BASE:R_BASE + N] = Q + h - q * R


def capture(target_name: str, pinned: bool = False, launches=None, plain: bool = False, errors=None) -> list:
    """Every launch of every benchmark call for ``target_name``, deduplicated by specialisation.

    With ``pinned``: each autotuned kernel runs its ``FASTVQ_AUTOTUNE=0`` config only (what a GPU
    test run uses at every shape; config labelled ``pinned ...``), and only those launches are
    returned (the fixed tiles are the same as without) unless ``plain`` (then the kernels that
    are not autotuned too). ``launches``: a function giving the (label, thunk) list (default
    :func:`bench_launches`). ``errors``: a list that collects ``(label, exception text)`` for the
    thunks that raise (else they propagate)."""
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction, create_function_from_signature

    from fastvq.kernels import _common

    tgt = _common.TARGETS[target_name]
    gpu = GPUTarget("cuda", tgt.capability, 32)
    backend = make_backend(gpu)
    found: dict = {}
    state: dict = {}

    def jit_run(self, *args, grid, warmup, **kwargs):
        binder = create_function_from_signature(self.signature, self.params, backend)
        bound, spec, options = binder(*args, **kwargs)
        opts, signature, constexprs, attrs = self._pack_args(backend, kwargs, bound, spec, options)
        opt_kw = {k: v for k, v in kwargs.items() if k not in self.arg_names and k not in ("debug", "instrumentation_mode")}
        name = f"{self.fn.__module__.rsplit('.', 1)[-1]}.{self.fn.__name__}"
        key = _spec_key(name, signature, constexprs, attrs, opt_kw)
        cfg = state.get("config")
        if key not in found:
            est = {}
            if cfg is not None and state["estimate"] is not None:
                est = state["estimate"](cfg, state["nargs"], **state["kwargs"])
            found[key] = Launch(name, key, ASTSource(fn=self, signature=signature, constexprs=constexprs, attrs=attrs),
                                opt_kw, (PINNED * pinned + _cfg_label(cfg)) if cfg is not None else "",
                                state.get("kept", True), est, [],
                                jit_source_hash(sys.modules[self.fn.__module__]),
                                {**{n: v for n, v in signature.items() if v.startswith("*")},
                                 **{self.arg_names[k[0]]: v for k, v in constexprs.items()
                                    if isinstance(v, (int, float, str, bool))}})
        else:  # kept by any call that launches it
            found[key].kept = found[key].kept or state.get("kept", True)
        found[key].calls.append(state["call"])
        if self.fn.__name__ == "_qr_keys_kernel":
            _write_qr_keys(*args, **kwargs)
        return None

    def tuner_run(self, *args, **kwargs):
        self.nargs = dict(zip(self.arg_names, args))
        if pinned:
            configs = kept = [_common.PINNED_CONFIGS[_tuner_name(self)]]
        else:
            configs = self.configs
            kept = self.prune_configs(kwargs) if len(self.configs) > 1 else list(self.configs)
        estimate = getattr(self.early_config_prune, "estimate", None)
        for c in configs:
            state.update(config=c, kept=c in kept, estimate=estimate, nargs=self.nargs,
                         kwargs={k: v for k, v in kwargs.items() if k not in ("grid", "warmup")})
            self.fn.run(*args, **kwargs, **c.all_kwargs())
        for k in ("config", "estimate", "nargs", "kwargs"):
            state.pop(k, None)
        state["kept"] = True
        self.nargs = None
        self.best_config = kept[0]  # (a launcher may read it after the launch)

    saved = (JITFunction.run, Autotuner.run, nearest_code.sm_count, torch.empty)
    JITFunction.run, Autotuner.run = jit_run, tuner_run
    nearest_code.sm_count = lambda device: tgt.sm_count  # the split heuristic as on that GPU

    def zeroed_empty(*args, **kwargs):
        # The intercepted launches write nothing (but _qr_keys_kernel's, _write_qr_keys): a
        # launcher that read another kernel's output on the host would specialise on whatever
        # memory held, differently run to run; CPU buffers start zeroed.
        t = saved[3](*args, **kwargs)
        return t.zero_() if t.device.type == "cpu" and not t.requires_grad else t

    torch.empty = zeroed_empty
    try:
        with _common.compile_target(target_name):
            for label, thunk in (launches or bench_launches)():
                state["call"] = label
                if errors is None:
                    thunk()
                    continue
                try:
                    thunk()
                except Exception as e:  # a launcher that cannot run this call: reported, not compiled
                    errors.append((label, f"{type(e).__name__}: {str(e)[:300]}"))
                for k in ("config", "estimate", "nargs", "kwargs"):
                    state.pop(k, None)
                state["kept"] = True
    finally:
        JITFunction.run, Autotuner.run, nearest_code.sm_count, torch.empty = saved
    return [f for f in found.values() if f.config or not pinned or plain]


def capture_all(target_name: str) -> list:
    """:func:`capture` with the autotune configs, then with the pinned ones."""
    return capture(target_name) + capture(target_name, pinned=True)


# --------------------------------------------------------------------------- compile


_JOBS: list = []


def _resources(cubin: bytes, tmpdir: str) -> dict:
    """Registers per thread, stack and local memory (spills) of the cubin's kernel."""
    path = os.path.join(tmpdir, f"fastvq_cc_{os.getpid()}.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    try:
        out = subprocess.run([_CUOBJDUMP, "--dump-resource-usage", path], capture_output=True, text=True).stdout
    finally:
        os.remove(path)
    res = {}
    for key in ("REG", "STACK", "LOCAL"):
        m = re.search(rf"\b{key}:(\d+)", out)
        if m:
            res[key.lower()] = int(m.group(1))
    return res


_APPROX = re.compile(r"\b(div\.(?:full|approx)\.\S*f32|rcp\.approx\.\S*f32|sqrt\.approx\.\S*f32|rsqrt\.approx\S*"
                     r"|ex2\.approx\.\S*f32|lg2\.approx\.\S*f32)")


def approx_math(ptx: str) -> list:
    """The float32 instructions of a kernel's PTX that do not round as the CPU does (Triton
    compiles ``/`` to ``div.full.f32``, ``tl.sqrt`` to ``sqrt.approx.ftz.f32``, ``tl.exp`` and
    ``tl.log`` to ``ex2``/``lg2.approx``; ``tl.math.div_rn`` and ``tl.sqrt_rn`` round once)."""
    return sorted({m.group(1) for m in _APPROX.finditer(ptx)})


# --------------------------------------------------------------------------- the compile record
# CI compiles every job above and the edge subset in about four minutes of one core, for
# kernels that do not change in most commits. tests/sm90-compile-record.json keeps each job's
# compiled results under a key of everything the compile reads (record_key: Triton's own
# compile-cache key and the bytes of this file). ``--record PATH`` takes a job's results from the
# file when its key is there, compiles the rest, and compiles a fixed sample of the others too
# (keys starting with 0) to compare with the record; ``--update-record`` compiles everything and
# rewrites the file. tests/test_cuda_compile.py fails while a job had to be compiled (the record
# is stale: regenerate) or a sampled one differs.
RECORD = os.path.join(_ROOT, "tests", "sm90-compile-record.json")
RECORD_REGEN = "env -u TRITON_INTERPRET .venv/bin/python tests/_cuda_compile_worker.py --update-record"
# the compiled results a record's sample check compares
_VERIFIED = ("ok", "shared", "reg", "stack", "local", "wgmma", "mma_sync", "approx")
# what a record keeps of a compile (the rest of a job's line comes from the job itself)
_COMPILED = ("ok", "shared", "reg", "stack", "local", "regs", "spill", "wgmma", "mma_sync", "approx", "error",
             "traceback")


@functools.lru_cache(maxsize=None)
def _file_sha(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha1(f.read()).hexdigest()[:16]


def record_key(kernel: str, src, options: dict, target_name: str = "sm_90") -> str:
    """The record key of compiling ``src`` (an ``ASTSource`` of ``kernel``, ``module._name``)
    with ``options`` for ``target_name``: Triton's own compile-cache key (the loaded function's
    source and every ``@triton.jit`` function and global it reads, the Triton build, the target,
    the ptxas version, the parsed options and the environment variables that change a compile)
    and the bytes of this file (what it reads of a compile)."""
    import hashlib

    from triton._C.libtriton import get_cache_invalidating_env_vars
    from triton.compiler.compiler import make_backend
    from triton.runtime.cache import get_cache_key

    from fastvq.kernels import _common

    backend = make_backend(GPUTarget("cuda", _common.TARGETS[target_name].capability, 32))
    parsed = backend.parse_options(dict(options))
    blob = json.dumps([get_cache_key(src, backend, parsed, get_cache_invalidating_env_vars()), kernel,
                       _file_sha(os.path.abspath(__file__))])
    return hashlib.sha1(blob.encode()).hexdigest()[:20]


def _job_options(job) -> dict:
    options = {"num_warps": job.num_warps, "num_stages": job.num_stages}
    if job.maxnreg is not None:
        options["maxnreg"] = job.maxnreg
    return options


def job_key(job) -> str:
    return record_key(job.kernel, job.source(), _job_options(job))


def load_record(path: str, section: str) -> dict:
    """``{key: compiled results}`` of one section ("jobs", "edges") of a record file ({} if none)."""
    try:
        with open(path) as f:
            return json.load(f).get(section, {})
    except FileNotFoundError:
        return {}


def write_record(path: str, section: str, records: dict) -> None:
    """Replace this triton version's entries of ``section`` by ``records`` (``{key: line}``)."""
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        data = {}
    data["label"] = ("Compiled on a CPU for sm_90 with the ptxas bundled in the triton wheel (not run on a GPU): "
                     "the results of tests/test_cuda_compile.py's compile jobs, keyed by everything a compile "
                     "reads (tests/_cuda_compile_worker.py, record_key).")
    data["regenerate"] = RECORD_REGEN
    kept = {k: v for k, v in data.get(section, {}).items() if v.get("triton") != triton.__version__}
    for k, rec in records.items():
        kept[k] = {"triton": triton.__version__, **{f: rec[f] for f in _COMPILED if f in rec}}
    data[section] = kept
    with open(path, "w") as f:  # one line per entry (diffs stay readable)
        f.write("{\n" + ",\n".join(
            f"{json.dumps(name)}: " + (json.dumps(value) if not isinstance(value, dict) else "{\n" + ",\n".join(
                f"{json.dumps(k)}: {json.dumps(v, sort_keys=True)}" for k, v in sorted(value.items())) + "\n}")
            for name, value in sorted(data.items())) + "\n}\n")


def _reused(rec: dict, found: dict) -> dict:
    """``rec`` (a job's own fields) completed with a record's compiled results."""
    rec.update({f: found[f] for f in _COMPILED if f in found}, reused=True, seconds=0.0)
    return rec


def _job_fields(job) -> dict:
    return {"kernel": job.kernel, "variant": job.variant, "num_warps": job.num_warps, "num_stages": job.num_stages,
            "dot": job.dot, "tensor_cores": job.tensor_cores, "expect_wgmma": job.expect_wgmma, "pruned": job.pruned}


def _compile(i: int) -> dict:
    job = _JOBS[i]
    rec = _job_fields(job)
    t0 = time.perf_counter()
    try:
        ck = triton.compile(job.source(), target=TARGET, options=_job_options(job))
        code = ck.asm["ptx"]
        rec.update(ok=True, shared=int(ck.metadata.shared))  # the final kernel's, after ptxas
        rec.update(_resources(ck.asm["cubin"], tempfile.gettempdir()))
        rec.update(wgmma="wgmma.mma_async" in code, mma_sync="mma.sync" in code, approx=approx_math(code))
    except Exception as e:  # a GPU-compile error: report it, with the tail of the traceback
        tb = traceback.format_exception(type(e), e, e.__traceback__)
        rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[-3000:]}", traceback="".join(tb)[-4000:])
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


_SWEEP: list = []  # (Launch, target name) jobs of a benchmark-shape sweep, read by forked workers


def _compile_launch(i: int) -> dict:
    launch, target_name = _SWEEP[i]
    from fastvq.kernels import _common

    tgt = _common.TARGETS[target_name]
    rec = {"kernel": launch.kernel, "key": launch.key, "target": target_name, "triton": triton.__version__,
           "config": launch.config, "kept": launch.kept, "calls": sorted(set(launch.calls)), "source": launch.source,
           "args": launch.args}
    t0 = time.perf_counter()
    try:
        ck = triton.compile(launch.src, target=GPUTarget("cuda", tgt.capability, 32), options=dict(launch.options))
        res = _resources(ck.asm["cubin"], tempfile.gettempdir())
        rec.update(ok=True, shared=int(ck.metadata.shared), regs=res.get("reg", 0),
                   spill=res.get("stack", 0) + res.get("local", 0), wgmma="wgmma.mma_async" in ck.asm["ptx"],
                   mma_sync="mma.sync" in ck.asm["ptx"])
    except Exception as e:
        rec.update(ok=False, error=f"{type(e).__name__}: {str(e)[-2000:]}")
    rec["seconds"] = round(time.perf_counter() - t0, 2)
    return rec


def _crashed(i: int) -> dict:
    launch, target_name = _SWEEP[i]
    return {"kernel": launch.kernel, "key": launch.key, "target": target_name, "triton": triton.__version__,
            "config": launch.config, "kept": launch.kept, "calls": sorted(set(launch.calls)), "source": launch.source,
            "args": launch.args, "ok": False, "error": "the compiler process crashed", "seconds": 0.0}


def sweep(targets, jobs: int, include_pruned: bool = False, emit=None, only: str = "", collect=None,
          reuse: dict | None = None) -> list:
    """Compile every launch of the benchmark shapes (the kept configs; all with ``include_pruned``)
    for each target, through ptxas. Returns one record per (launch, target). ``only``: the
    launches whose kernel name or calls contain it (a quick check; never for ``--update-json``).
    ``collect(target)``: the launches to compile (default :func:`capture_all`). ``reuse``: a
    compile record section (:func:`load_record`): a launch whose :func:`record_key` is in it takes
    its results from there instead of compiling (``"reused": true``); every record then carries
    its ``record_key``."""
    _SWEEP.clear()
    for t in targets:
        _SWEEP.extend((launch, t) for launch in (collect or capture_all)(t) if (launch.kept or include_pruned)
                      and only in " ".join([launch.kernel, *launch.calls]))
    out = []
    if reuse is not None:
        keys = [record_key(launch.kernel, launch.src, launch.options, t) for launch, t in _SWEEP]
        for i, key in enumerate(keys):
            if key in reuse:
                launch, t = _SWEEP[i]
                rec = {"kernel": launch.kernel, "key": launch.key, "target": t, "triton": triton.__version__,
                       "config": launch.config, "kept": launch.kept, "calls": sorted(set(launch.calls)),
                       "source": launch.source, "args": launch.args, "record_key": key}
                out.append(_reused(rec, reuse[key]))
                if emit:
                    emit(out[-1])
        todo = [(launch, t, key) for (launch, t), key in zip(_SWEEP, keys) if key not in reuse]
        _SWEEP[:] = [(launch, t) for launch, t, _ in todo]
        key_of = {(launch.key, t): key for (launch, t, key) in todo}
        fresh = sweep_compiled(jobs, emit)
        for rec in fresh:
            rec["record_key"] = key_of[(rec["key"], rec["target"])]
        return out + fresh
    return out + sweep_compiled(jobs, emit)


def sweep_compiled(jobs: int, emit=None) -> list:
    """Compile the launches in ``_SWEEP`` (:func:`sweep`)."""
    # the costliest first (float32 dots: the exact ones compile slowest), so a pool ends together
    order = sorted(range(len(_SWEEP)), key=lambda i: (_SWEEP[i][0].args.get("PRECISION") != "ieee",
                                                      "_fwd" not in _SWEEP[i][0].kernel))
    out = []
    if jobs > 1:
        # A compiler crash (an LLVM/MLIR abort) kills a pool process: the launches in flight are
        # retried one per fresh process, so the crashing one is named.
        ctx = mp.get_context("fork")
        retry = []
        with ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            futures = {pool.submit(_compile_launch, i): i for i in order}
            for fut in as_completed(futures):
                try:
                    out.append(fut.result())
                except BrokenProcessPool:
                    retry.append(futures[fut])
                    continue
                if emit:
                    emit(out[-1])
        for i in retry:
            with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                try:
                    out.append(pool.submit(_compile_launch, i).result())
                except BrokenProcessPool:
                    out.append(_crashed(i))
            if emit:
                emit(out[-1])
    else:
        for i in range(len(_SWEEP)):
            out.append(_compile_launch(i))
            if emit:
                emit(out[-1])
    return out


STATIC_LABEL = ("Compiled on a CPU with the ptxas bundled in the triton wheel, not measured on a GPU: registers "
                "per thread, spill bytes (stack + local) and shared memory per block of every launch the "
                "benchmark shapes make, every autotune config the kernels' early prune keeps and each "
                "autotuned kernel's FASTVQ_AUTOTUNE=0 config (labelled pinned), for each target.")
REGEN = ("env -u TRITON_INTERPRET .venv/bin/python tests/_cuda_compile_worker.py --sweep "
         "--update-json benchmarks/results/sm90-static.json --also .venv36/bin/python")


SMALL_SPILL = 64  # bytes: below the register limit ptxas keeps a value or two on the stack in some launches


def pressure_spill(r) -> bool:
    """A spill under register pressure: at the 255-register limit, or more than SMALL_SPILL bytes."""
    return r["spill"] > SMALL_SPILL or (r["spill"] > 0 and r["regs"] >= 255)


def summarize(records) -> dict:
    """Per target and triton version: compiled launches (unique specialisations), of them the
    autotune configs the prunes keep as (benchmark call, config) pairs, how many of each spill
    under register pressure (:func:`pressure_spill`), spill a few bytes below the limit, or
    exceed the target's shared memory."""
    from fastvq.kernels import _common

    summary = {}
    for r in records:
        s = summary.setdefault(f"{r['target']} triton {r['triton']}", dict.fromkeys(
            ("launches", "spilling", "small_spills", "over_shared", "failed", "kept_call_configs",
             "spilling_call_configs", "small_spill_call_configs", "over_shared_call_configs"), 0))
        n = len(r["calls"]) if r["config"] else 0
        s["launches"] += 1
        s["kept_call_configs"] += n
        if not r["ok"]:
            s["failed"] += 1
            continue
        spill, over = pressure_spill(r), r["shared"] > _common.TARGETS[r["target"]].smem
        small = r["spill"] > 0 and not spill
        s["spilling"] += spill
        s["small_spills"] += small
        s["over_shared"] += over
        s["spilling_call_configs"] += n * spill
        s["small_spill_call_configs"] += n * small
        s["over_shared_call_configs"] += n * over
    return summary


def update_json(path: str, records: list, seconds: float):
    """Replace this triton version's records in ``path`` (other versions' are kept)."""
    from fastvq.kernels import _common

    try:
        with open(path) as f:
            doc = json.load(f)
    except FileNotFoundError:
        doc = {}
    mine = {r["triton"] for r in records}
    keep = [r for r in doc.get("records", []) if r["triton"] not in mine]
    recs = sorted(keep + [{k: v for k, v in r.items() if k != "seconds"} for r in records],
                  key=lambda r: (r["triton"], r["target"], r["kernel"], r["config"], r["key"]))
    doc_summary = summarize(recs)
    seconds_by = dict(doc.get("sweep_seconds", {}))
    for v in mine:
        seconds_by[v] = seconds
    doc = {"label": STATIC_LABEL, "regenerate": REGEN,
           "targets": {n: dataclasses.asdict(t) for n, t in _common.TARGETS.items()},
           "summary": doc_summary, "sweep_seconds": seconds_by, "records": recs}
    with open(path, "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


def edges_main(jobs: int, only: str = "", every: bool = False, ci: bool = False, record: str = "",
               update_record: bool = False) -> int:
    """``--edges``: compile :func:`capture_edges` for sm_90; a JSON line per failure (with
    ``every``: per launch), one per launcher call that raised, then a summary line. ``record``:
    reuse that compile record's results (section "edges"); ``update_record``: compile every
    launch and write them there."""
    t0 = time.perf_counter()
    errors = []
    reuse = {} if update_record else load_record(record, "edges") if record else None
    recs = sweep(["sm_90"], jobs, only=only, collect=lambda t: capture_edges(t, errors, ci),
                 emit=lambda r: (every or not r["ok"]) and print(json.dumps(r), flush=True), reuse=reuse)
    if update_record and not only:
        write_record(record, "edges", {r["record_key"]: r for r in recs})
    for label, err in errors:
        print(json.dumps({"call": label, "ok": False, "error": f"the launcher raised: {err}"}), flush=True)
    failed = [r for r in recs if not r["ok"]]
    print(json.dumps({"summary": True, "triton": triton.__version__, "target": "sm_90", "ci_subset": ci,
                      "launches": len(recs), "reused": sum(bool(r.get("reused")) for r in recs),
                      "failed": len(failed), "launcher_errors": len(errors),
                      "kernels": sorted({r["kernel"] for r in recs}),
                      "failed_kernels": sorted({r["kernel"] for r in failed}),
                      "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    return 0 if not failed and not errors else 1


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--filter", default="", help="only the jobs (--sweep: launches) whose names contain it")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--sweep", action="store_true",
                    help="compile every launch of the benchmark shapes (kept configs) for --targets")
    ap.add_argument("--plan", action="store_true",
                    help="print the benchmark-shape launches (kept and pruned, with the prunes' estimates) as "
                         "JSON lines, compile nothing")
    ap.add_argument("--edges", action="store_true",
                    help="compile the edge-shaped launches (edge_launches: sizes of 1, odd D, strided, "
                         "transposed and unaligned inputs, each dtype; pinned configs) for sm_90; print one JSON "
                         "line per failure and a summary")
    ap.add_argument("--all", action="store_true", help="--edges: print a JSON line for every launch")
    ap.add_argument("--ci", action="store_true", help="--edges: only the representative subset (CI)")
    ap.add_argument("--targets", default="sm_90,sm_80")
    ap.add_argument("--pruned", action="store_true", help="--sweep: compile the configs the prunes drop too")
    ap.add_argument("--update-json", default="", help="--sweep: write the records to this JSON file")
    ap.add_argument("--also", default="", help="--sweep --update-json: then run the same sweep with this python "
                                               "(another triton version)")
    ap.add_argument("--record", default="", help="default mode and --edges: take the results of the jobs whose key "
                                                 "is in this compile record file instead of compiling them")
    ap.add_argument("--update-record", action="store_true",
                    help="compile the default jobs and the --edges --ci subset and write them to the compile record "
                         f"({os.path.relpath(RECORD, _ROOT)})")
    ap.add_argument("--update-jobs-record", action="store_true", help=argparse.SUPPRESS)  # (--update-record's)
    args = ap.parse_args(argv)
    here = os.path.join(_ROOT, "kernels")
    if os.path.realpath(os.path.dirname(kernels.__file__)) != os.path.realpath(here):
        sys.exit(f"_cuda_compile_worker: fastvq.kernels is imported from {os.path.dirname(kernels.__file__)}, not "
                 f"this checkout's {here} (a virtualenv installed from another checkout): install this one "
                 f"(pip install -e .)")
    assert not kernels.INTERPRETED, "kernels imported in interpreter mode"
    targets = [t for t in args.targets.split(",") if t]
    if args.plan:
        for t in targets:
            for launch in capture_all(t):
                print(json.dumps({"kernel": launch.kernel, "key": launch.key, "target": t, "config": launch.config,
                                  "source": launch.source,
                                  "kept": launch.kept, "estimate": launch.estimate, "calls": sorted(set(launch.calls))}))
        return 0
    if args.update_record:
        assert not args.filter and not args.edges, "--update-record compiles every job and the --edges --ci subset"
        cmd = [sys.executable, os.path.abspath(__file__), "--jobs", str(args.jobs), "--record", RECORD]
        rc = subprocess.call(cmd + ["--update-jobs-record"], stdout=subprocess.DEVNULL)
        rc |= subprocess.call(cmd + ["--edges", "--ci", "--update-jobs-record"], stdout=subprocess.DEVNULL)
        print(f"compile record -> {os.path.relpath(RECORD, _ROOT)} (exit status {rc})")
        return rc
    if args.edges:
        return edges_main(args.jobs, args.filter, args.all, args.ci, args.record, args.update_jobs_record)
    if args.sweep:
        assert not (args.filter and args.update_json), "--filter with --update-json would drop the other records"
        t0 = time.perf_counter()
        recs = sweep(targets, args.jobs, args.pruned, only=args.filter,
                     emit=lambda r: print(json.dumps(r), flush=True) if not args.update_json else
                     print(f"{r['target']} {r['kernel']} {r['config']} {r.get('regs')} regs {r.get('spill')} B spill "
                           f"{r.get('shared')} B shared {r['seconds']} s", file=sys.stderr, flush=True))
        seconds = round(time.perf_counter() - t0, 1)
        if args.update_json:
            update_json(args.update_json, recs, seconds)
            print(f"triton {triton.__version__}: {len(recs)} compiles in {seconds} s -> {args.update_json}")
            if args.also:
                cmd = [args.also, os.path.abspath(__file__), "--sweep", "--targets", args.targets,
                       "--jobs", str(args.jobs), "--update-json", args.update_json] + (["--pruned"] * args.pruned)
                return subprocess.call(cmd)
        return 0 if all(r["ok"] for r in recs) else 1

    _JOBS[:] = [j for j in all_jobs() if args.filter in f"{j.kernel} {j.variant}"]
    covered = sorted({j.kernel for j in _JOBS})
    if args.list:
        for j in _JOBS:
            print(j.kernel, "|", j.variant)
        return 0
    order = sorted(range(len(_JOBS)), key=lambda i: -_JOBS[i].cost)
    t0 = time.perf_counter()
    n_fail = 0
    keys = [job_key(j) for j in _JOBS]
    reuse = {} if args.update_jobs_record else load_record(args.record, "jobs") if args.record else {}
    done: dict = {}

    def emit(rec):
        nonlocal n_fail
        n_fail += not rec["ok"]
        done[(rec["kernel"], rec["variant"])] = rec
        print(json.dumps(rec), flush=True)

    for i in order:
        if keys[i] in reuse:
            emit(_reused(_job_fields(_JOBS[i]), reuse[keys[i]]))
    order = [i for i in order if keys[i] not in reuse]
    if args.jobs > 1:
        # A compiler crash (an LLVM/MLIR abort) kills a pool process: BrokenProcessPool for the jobs
        # in flight; those are then retried one per fresh process, so the crashing one is named.
        ctx = mp.get_context("fork")
        retry = []
        with ProcessPoolExecutor(args.jobs, mp_context=ctx) as pool:
            futures = {pool.submit(_compile, i): i for i in order}
            for fut in as_completed(futures):
                try:
                    emit(fut.result())
                except BrokenProcessPool:
                    retry.append(futures[fut])
        for i in sorted(retry, key=order.index):
            with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                try:
                    emit(pool.submit(_compile, i).result())
                except BrokenProcessPool:
                    emit({**_job_fields(_JOBS[i]), "ok": False, "error": "the compiler process crashed",
                          "traceback": "the compiler process crashed", "seconds": 0.0})
    else:
        for i in order:
            emit(_compile(i))
    if args.update_jobs_record and not args.filter:
        write_record(args.record, "jobs", {keys[i]: done[(j.kernel, j.variant)] for i, j in enumerate(_JOBS)})
    # a fixed sample of the jobs read from the record (keys starting with 0: about 1 in 16) is
    # compiled too, and must give what the record says (a record edited by hand, or made where
    # the compile differed in a way the key does not see, shows here)
    verified, mismatched = 0, 0
    for i in range(len(_JOBS)):
        if keys[i] in reuse and keys[i].startswith("0"):
            fresh, kept = _compile(i), reuse[keys[i]]
            diff = {f: (kept.get(f), fresh.get(f)) for f in _VERIFIED if kept.get(f) != fresh.get(f)}
            verified += 1
            if diff:
                mismatched += 1
                print(json.dumps({"verify": True, "kernel": _JOBS[i].kernel, "variant": _JOBS[i].variant,
                                  "record_vs_compiled": diff}), flush=True)
    print(json.dumps({"summary": True, "jobs": len(_JOBS), "failed": n_fail, "kernels": covered,
                      "reused": sum(bool(r.get("reused")) for r in done.values()),
                      "verified": verified, "verify_mismatches": mismatched,
                      "all_kernels": all_kernels(), "seconds": round(time.perf_counter() - t0, 1),
                      "smem_limit": H100_SMEM}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
