"""Small helpers shared by the launchers."""

import contextlib
import dataclasses
import functools
import inspect
import math
import os
import warnings

import torch
import triton
import triton.language as tl

# --------------------------------------------------------------------------- the interpreter
# Whether the kernels run under Triton's interpreter (TRITON_INTERPRET=1, tensors on the CPU) is
# read here and nowhere else in kernels/ (tests/test_layering.py), once: Triton fixes it when a
# @triton.jit function is defined. Every way a kernel or launcher differs under the interpreter
# goes through one of the named helpers below, so each workaround of an interpreter bug has one
# place to be found, and dropped when Triton fixes it.


def _interpreter_on() -> bool:
    if hasattr(triton, "knobs"):
        on = bool(triton.knobs.runtime.interpret)
    else:
        on = os.environ.get("TRITON_INTERPRET", "0") in ("1", "true", "True")  # triton < 3.4
    if on:
        # Triton's own @jit library (tl.sigmoid, tl.max, ...) was fixed when triton.language was
        # imported: imported before the variable was set (torch imports Triton at a first op or
        # compile), it is compiled code the interpreter cannot call (claimprobe K3)
        from triton.language import standard

        on = type(standard.sigmoid).__name__ == "InterpretedFunction"
    return on


INTERPRETED: bool = _interpreter_on()


def _bf16_casts_like_a_gpu() -> bool:
    """Under the interpreter, make its bfloat16 <-> float32 casts give a GPU's bits.

    Triton's interpreter (3.6 and 3.8) converts floats with one generic routine that gets
    subnormals wrong both ways (bf16 1e-39 loads as 4.4e-39, 9e-41 as 0) and truncates
    float32 -> bfloat16 where a GPU rounds to nearest even. A bfloat16 is the top half of a
    float32, so both casts are exact bit operations: this wraps the routine for that one pair of
    types and leaves every other conversion to it. Returns whether the fix is in place (False when
    a Triton release no longer has the routine: then the README's interpreter caveat applies)."""
    import numpy as np
    from triton.runtime import interpreter

    convert = getattr(interpreter, "_convert_float", None)
    if convert is None or getattr(convert, "fastvq_bf16", False):
        return convert is not None

    def bf16_float32(data, src, dst, rounding_mode):
        if src == tl.bfloat16 and dst == tl.float32:
            return np.frombuffer(data.tobytes(), np.uint16).astype(np.uint32).reshape(data.shape) << 16
        if src == tl.float32 and dst == tl.bfloat16:
            u = np.frombuffer(data.tobytes(), np.uint32).reshape(data.shape)
            if rounding_mode != interpreter._ir.ROUNDING_MODE.RTZ:  # nearest even, as a GPU does
                nan = (u & 0x7FFFFFFF) > 0x7F800000
                u = np.where(nan, u | 0x00400000, u + 0x7FFF + ((u >> 16) & 1)).astype(np.uint32)
            return (u >> 16).astype(np.uint16)
        return convert(data, src, dst, rounding_mode)

    bf16_float32.fastvq_bf16 = True
    interpreter._convert_float = bf16_float32
    return True


INTERPRETER_BF16_EXACT: bool = INTERPRETED and _bf16_casts_like_a_gpu()


def _float_args_like_a_gpu() -> bool:
    """Under the interpreter, pass a Python ``float`` kernel argument as float32, as a GPU launch
    does (Triton types a float argument ``fp32``). The interpreter kept it as a float64 scalar, so
    a kernel that widens such an argument (``m``, ``scale64`` in pairwise_kl_loss, ``big_t`` in
    qr_lookup's atomic path) computed with float64 precision on the CPU and float32 precision on
    a GPU, and no CPU test could see behaviour that depends on the argument's float32 rounding
    (mutC, C30). ``tl.constexpr`` arguments are not converted (the interpreter passes them as
    given, as the compiler does). ``numpy.float64`` arguments too (a subclass of float, typed
    ``fp32`` by a launch). Returns whether the fix is in place."""
    import numpy as np
    from triton.runtime import interpreter

    convert = getattr(interpreter, "_implicit_cvt", None)
    if convert is None or getattr(convert, "fastvq_fp32", False):
        return convert is not None

    def float_as_fp32(arg):
        if isinstance(arg, float):  # numpy.float64 too (a subclass); not bool or int
            return tl.tensor(interpreter.TensorHandle(np.array([arg], dtype=np.float32), tl.float32), tl.float32)
        return convert(arg)

    float_as_fp32.fastvq_fp32 = True
    interpreter._implicit_cvt = float_as_fp32
    return True


INTERPRETER_FP32_ARGS: bool = INTERPRETED and _float_args_like_a_gpu()


_QUIET_MODULE = r"triton\.runtime\.interpreter"


def _quiet_interpreter_warnings() -> bool:
    """Under the interpreter, keep numpy's floating-point warnings out of a kernel's launch.

    The interpreter runs each block operation in numpy, which warns ("overflow encountered in
    multiply", "invalid value", "All-NaN slice") where a GPU computes the same inf or NaN
    silently; the kernels handle those values, so a parity run on the CPU printed noise that
    reads like a defect. Each launch runs under ``numpy.errstate`` that ignores floating-point
    errors (numpy's own reductions, behind ``tl.sum`` and ``tl.max``, warn from numpy's module,
    not the interpreter's) and makes sure one filter, for the interpreter module's
    RuntimeWarnings ("All-NaN slice"), is in ``warnings.filters`` (set once at import it was
    lost when the import ran inside ``warnings.catch_warnings``, as pytest's collection does; a
    user's filter placed before it still wins). Returns whether the launch hook is in place."""
    import numpy as np
    from triton.runtime import interpreter

    executor = getattr(interpreter, "GridExecutor", None)
    call = getattr(executor, "__call__", None)
    if call is None:
        return False
    if getattr(call, "_fastvq_quiet", False):
        return True

    def quiet_call(self, *args, **kwargs):
        if not any(f[0] == "ignore" and f[2] is RuntimeWarning and f[3] is not None and f[3].pattern == _QUIET_MODULE
                   for f in warnings.filters):
            warnings.filterwarnings("ignore", category=RuntimeWarning, module=_QUIET_MODULE)
        with np.errstate(over="ignore", invalid="ignore", divide="ignore", under="ignore"):
            return call(self, *args, **kwargs)

    quiet_call._fastvq_quiet = True
    executor.__call__ = functools.wraps(call)(quiet_call)
    return True


INTERPRETER_QUIET: bool = INTERPRETED and _quiet_interpreter_warnings()

INTERPRETER_SMS = 4  # the "SM count" launchers plan for under the interpreter (CPU)


def dot_fp32(dtype: torch.dtype) -> bool:
    """The ``DOT_FP32`` constexpr: Triton's interpreter (3.8) computes ``tl.dot`` on bfloat16
    blocks wrongly (fp16/fp32 are right), so under it kernels upcast bf16 dot operands to fp32.
    Never set on a GPU, where bf16 stays on the tensor cores."""
    return INTERPRETED and dtype == torch.bfloat16


def bf16_rne(dtype: torch.dtype) -> bool:
    """The ``BF16_RNE`` constexpr: Triton's interpreter (3.8) casts float32 -> bfloat16 by
    truncation, a GPU rounds to nearest even; under it, kernels that store or compare bf16 values
    round with :func:`round_bf16` first, so both give the same bits. Not needed (False) where
    :data:`INTERPRETER_BF16_EXACT` already makes the interpreter's casts round as a GPU does."""
    return INTERPRETED and not INTERPRETER_BF16_EXACT and dtype == torch.bfloat16


@triton.jit
def round_bf16(b):
    """float32 -> bfloat16, rounded to nearest even with integer ops (see :func:`bf16_rne`). A NaN
    stays a (quiet) NaN: rounding its bits carried 0x7FFFFFFF into the sign, -0.0 (round H)."""
    u = b.to(tl.uint32, bitcast=True)
    u = tl.where(b != b, u | 0x00400000, u + 0x7FFF + ((u >> 16) & 1))
    return (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def tf32_split(b):
    """float32 ``b`` as ``hi + lo``, two TF32 values (10 stored mantissa bits, the low 13 zero), each
    rounded to nearest (ties away from zero) with integer ops: ``|b - hi - lo| <= 2^-22 |b|`` (at
    least 2^-137: TF32's spacing below float32's normal range is 2^-136) and a
    product of two parts is exact in float32, on the tensor cores and under the interpreter alike
    (see :func:`dot_split_nt`). NaN stays NaN in ``hi`` (a GPU's NaN, 0x7FFFFFFF, would carry into
    the sign bit and round to -0), so a NaN operand still makes its products NaN; infinities stay
    infinite, and so do finite values from (2 - 2^-11) 2^127 on (``hi`` rounds up to +-inf): the
    search kernels scale rows and codes by powers of two first, and residual_quantize searches a
    row beyond 2^48 again scaled by 2^-96 (a code that large scores +inf either way)."""
    hi = ((b.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    hi = tl.where(b == b, hi, b)
    r = b - hi  # exact: at most 13 significant bits
    lo = ((r.to(tl.uint32, bitcast=True) + 0x1000) & 0xFFFFE000).to(tl.float32, bitcast=True)
    return hi, lo


@triton.jit
def dot_split_nt(b_a, b_al, b_b, b_acc, PRECISION: tl.constexpr):
    """``b_acc + b_a @ b_b^T``, float32. ``PRECISION == "tf32x3"``: ``(b_a, b_al)`` is the
    :func:`tf32_split` of ``a`` (split once by the caller when ``a`` stays on chip), ``b_b``
    (float32) is split here, and three TF32 products run on the tensor cores, the small ones first
    (``a_lo b_hi + a_hi b_lo + a_hi b_hi``): each product exact, the error per product at most
    ``3 * 2^-22`` relative (the omitted ``a_lo b_lo`` and the parts' rounding) besides the float32
    accumulation. Otherwise one ``tl.dot`` with that input precision (``b_al`` unused)."""
    if PRECISION == "tf32x3":
        b_bh, b_bl = tf32_split(b_b)
        b_out = tl.dot(b_al, tl.trans(b_bh), b_acc, input_precision="tf32")
        b_out = tl.dot(b_a, tl.trans(b_bl), b_out, input_precision="tf32")
        b_out = tl.dot(b_a, tl.trans(b_bh), b_out, input_precision="tf32")
    else:
        b_out = tl.dot(b_a, tl.trans(b_b), b_acc, input_precision=PRECISION)
    return b_out


@triton.jit
def dot_nt(b_a, b_b, b_acc, PRECISION: tl.constexpr, DOT_FP32: tl.constexpr):
    """``b_acc + b_a @ b_b^T`` (float32 accumulator); with ``DOT_FP32`` (:func:`dot_fp32`, the
    interpreter's bf16 ``tl.dot``) both operands are upcast to float32 first; ``"tf32x3"``: both
    split here (:func:`dot_split_nt`)."""
    if PRECISION == "tf32x3":
        b_ah, b_al = tf32_split(b_a)
        b_out = dot_split_nt(b_ah, b_al, b_b, b_acc, PRECISION)
    elif DOT_FP32:
        b_out = tl.dot(b_a.to(tl.float32), tl.trans(b_b.to(tl.float32)), b_acc, input_precision=PRECISION)
    else:
        b_out = tl.dot(b_a, tl.trans(b_b), b_acc, input_precision=PRECISION)
    return b_out


@functools.lru_cache(maxsize=None)
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; :data:`INTERPRETER_SMS` for the interpreter's CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS


def interpreter_or(interpreter, gpu):
    """``interpreter`` under the interpreter, else ``gpu``: the fixed tile sizes of a kernel that
    is not autotuned (small ones on the CPU, where every program runs one after the other). An
    autotuned kernel's configs come from :func:`autotune_configs`."""
    return interpreter if INTERPRETED else gpu


def tl_input_precision(dtype: torch.dtype, allow_tf32: bool = False, split_on=None) -> str:
    """The ``PRECISION`` constexpr of a dot: ``"tf32"`` (16-bit operands, or float32 with
    ``allow_tf32``); for float32 otherwise ``"tf32x3"`` when the kernel splits its operands itself
    (:func:`dot_split_nt`; its launcher passes the device as ``split_on``) and that device's target
    has TF32 tensor cores (sm_80 and later; under the interpreter, :data:`DEFAULT_TARGET`), else
    exact ``"ieee"`` (the FMA units; several times slower on a GPU). ``$FASTVQ_FP32_DOT=ieee``
    (read at every launch) keeps float32 on the exact dot everywhere."""
    if dtype != torch.float32 or allow_tf32:
        return "tf32"
    if split_on is not None and target_for(split_on).capability >= 80 and fp32_dot_mode() == "auto":
        return "tf32x3"
    return "ieee"


FP32_DOT_ENV = "FASTVQ_FP32_DOT"


def fp32_dot_mode() -> str:
    """``$FASTVQ_FP32_DOT``: ``"ieee"`` (exact float32 products on the FMA units: the results of
    fastvq before the split, several times slower) or ``"auto"`` (the default: float32 searches as
    three TF32 products where the kernel and the GPU can). The ops reject any other value
    (``fastvq._checks.check_fp32_dot_env``) before a launcher reads it."""
    return "ieee" if os.environ.get(FP32_DOT_ENV, "").strip().lower() == "ieee" else "auto"


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def rows_vectorise(*tensors) -> bool:
    """Whether Triton specialises these tensors' addresses as 16-byte aligned, base pointers at
    16 bytes, every stride but the last divisible by 16 and the last 1 (a strided column view,
    ``x[:, ::2]``, does not vectorise either; review10), so that row loads vectorise (``None``
    entries are skipped). Where they do not (rows of D = 100 or 300 16-bit values), Triton holds
    more registers per element: tiles sized for aligned rows spilled 112-848 B at 255 registers on
    sm_90 (fuzzK), so launchers take smaller tiles or more warps there."""
    return all(t.data_ptr() % 16 == 0 and all(s % 16 == 0 for s in t.stride()[:-1])
               and (t.stride(-1) == 1 or t.shape[-1] <= 1) for t in tensors if t is not None)


# CUDA's launch-grid limits: up to 2**31 - 1 programs on axis 0, 65,535 on axes 1 and 2. A launcher
# whose program count grows with the data launches flat_grid(n) and its kernel reads
# flat_program_id(). Read at call time, so a test can lower them and fold small grids.
GRID_LIMITS = [2**31 - 1, 65535, 65535]


def flat_grid(n_programs: int) -> tuple[int, int]:
    """A 2-D launch grid of at least ``n_programs`` programs within :data:`GRID_LIMITS`.

    Programs beyond ``n_programs`` exist when axis 0 is full: the kernel must leave them idle
    (mask on, or return when ``flat_program_id() >= n_programs``).
    """
    x = max(1, min(n_programs, GRID_LIMITS[0]))
    y = triton.cdiv(max(n_programs, 1), x)
    assert y <= GRID_LIMITS[1], f"{n_programs} programs exceed the launch grid"
    return (x, y)


@triton.jit
def flat_program_id():
    """The flat int64 id of this program in a :func:`flat_grid` launch."""
    return tl.program_id(0).to(tl.int64) + tl.program_id(1).to(tl.int64) * tl.num_programs(0)


@triton.jit
def tile_offsets(N_D_TILES, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """``(o_n, o_d)``: the int64 rows and the columns of this program's tile in a :func:`flat_grid`
    launch of ``(row block, D tile)`` programs, ``N_D_TILES`` D tiles per row block (the D tile
    varies fastest)."""
    pid = flat_program_id()
    pid_n = pid // N_D_TILES
    pid_d = pid % N_D_TILES
    return pid_n * BLOCK_N + tl.arange(0, BLOCK_N), pid_d * BLOCK_D + tl.arange(0, BLOCK_D)


def device_context(device: torch.device):
    """The context a launch runs in: Triton launches on the *current* CUDA device, so make it
    ``device`` (a no-op for CPU tensors under the interpreter)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def launcher(fn):
    """Decorator for every launcher: run ``fn`` on the device of its first tensor argument.

    Without it a launch on a multi-GPU node goes to whatever device is current, not the one the
    tensors live on. ``device_context`` is looked up at call time (tests spy on it).
    """

    @functools.wraps(fn)
    def run(*args, **kwargs):
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        if first is None:
            return fn(*args, **kwargs)
        with device_context(first.device):
            return fn(*args, **kwargs)

    return run


# --------------------------------------------------------------------------- autotuning

AUTOTUNE_ENV = "FASTVQ_AUTOTUNE"

# Every autotuned kernel's GPU configs and its pinned config, by kernel name, whatever the switch
# says (the sm_90/sm_80 compile check reads them).
GPU_CONFIGS: dict = {}
PINNED_CONFIGS: dict = {}


def autotune_enabled() -> bool:
    """``False`` when ``$FASTVQ_AUTOTUNE`` is ``0`` (or ``false``/``off``/``no``); on by default.

    Read when the kernel modules are imported (Triton fixes an autotuner's configs when it is
    defined), so set it before the first fastvq op runs.
    """
    value = os.environ.get(AUTOTUNE_ENV, "1").strip().lower()
    if value in ("0", "false", "off", "no"):
        return False
    if value in ("", "1", "true", "on", "yes"):
        return True
    raise ValueError(f"environment variable {AUTOTUNE_ENV}={value!r}: expected 1 (autotune, the default) "
                     f"or 0 (one pinned config per kernel)")


def autotune_configs(name: str, gpu: list, pinned, interpreter) -> list:
    """The configs an autotuned kernel is decorated with.

    * under the Triton interpreter: ``[interpreter]`` (one small config; the interpreter would run
      and time every config);
    * with ``FASTVQ_AUTOTUNE=0``: ``[pinned]``, one config that fits sm_80 and sm_90 in shared
      memory and without register-pressure spills at the benchmark shapes (compiled into
      benchmarks/results/sm90-static.json as ``pinned`` launches, checked by
      tests/test_resource_estimates.py), so a GPU test run does not autotune hundreds of keys;
      with one config Triton neither prunes nor benchmarks;
    * otherwise the full GPU list ``gpu``, pruned per launch by the kernel's resource estimate.
    """
    GPU_CONFIGS[name] = list(gpu)
    PINNED_CONFIGS[name] = pinned
    if INTERPRETED:
        return [interpreter]
    if not autotune_enabled():
        return [pinned]
    return list(gpu)


# Triton >= 3.2 can keep an autotuner's timings on disk, next to its compiled kernels (in
# ~/.triton/cache or $TRITON_CACHE_DIR), keyed on the Triton version, the target GPU
# architecture, the kernel's source, the tuning key and the configs kept by the prune: a second
# process with the same shapes reads the winning config instead of timing every config again.
# (Under the interpreter Triton turns it off itself; with one config there is nothing to time.)
AUTOTUNE_CACHE_RESULTS = "cache_results" in inspect.signature(triton.autotune).parameters


def autotune(configs: list, key: list, prune_configs_by: dict | None = None, reset_to_zero: list | None = None):
    """``triton.autotune`` for every autotuned fastvq kernel: ``configs`` from
    :func:`autotune_configs`, and the timings cached on disk (``cache_results=True``) where the
    installed Triton has the option. ``reset_to_zero``: the arguments a launch accumulates into
    with atomics (zero-filled by the launcher). The autotuner times every config by launching it
    many times on the caller's tensors; it zeroes these before each timed launch and after the
    timing, so the launch that counts starts from zeros (else its sums would carry every timed
    launch's too)."""
    extra = {"cache_results": True} if AUTOTUNE_CACHE_RESULTS else {}
    return triton.autotune(configs=configs, key=key, prune_configs_by=prune_configs_by, reset_to_zero=reset_to_zero,
                           **extra)


# --------------------------------------------------------------------------- jit helpers
# Shared by several kernels. Power-of-two scaling is exact for normal numbers (it only moves the
# exponent), so a scaled computation rounds exactly like the unscaled one wherever that one
# neither overflows nor underflows; it is how the search kernels "scale before they square".



@triton.jit
def exp2i(e):
    """``2.0 ** e`` as float32 for any int32 ``e``, rounded as float32 rounds it: exact for
    ``e`` in [-149, 127] (the subnormals 2**-149 .. 2**-127 included), +inf above 127, 0 below
    -149 (2**-150 is a tie that rounds to even, 0). Integer ops only (no float multiply, so no
    flush-to-zero mode can touch the subnormals)."""
    b_norm = (tl.minimum(e, 128) + 127) << 23  # e in [-126, 128]: the biased exponent; 128 -> +inf
    b_sub = (e * 0 + 0x400000) >> tl.minimum(tl.maximum(-127 - e, 0), 23)  # e in [-150, -127]
    return tl.where(e > -127, b_norm, b_sub).to(tl.float32, bitcast=True)


@triton.jit
def exp2i64(e):
    """``2.0 ** e`` as float64, exactly, for an int32 ``e`` in [-1022, 1023]."""
    return ((e.to(tl.int64) + 1023) << 52).to(tl.float64, bitcast=True)


FIX_SCAN = tl.constexpr(1024)  # indices a fix-up reads at once to find the rows of its group


TOP32 = tl.constexpr(1.7014118346046923e38)  # 2^127: float32's (and bfloat16's) top binade


@triton.jit
def nonfinite_rows(p_rows, m_k, D, FIX_R: tl.constexpr, BLOCK_D: tl.constexpr, BOUND: tl.constexpr = float("inf")):
    """Which of the ``FIX_R`` float32 rows ``p_rows + j D`` (``m_k``: those to look at) hold an
    element that is not finite (``BOUND``: not below it in magnitude): the rows (codes, table
    rows) whose atomic sum overflowed on the way (an overflowed partial sum never comes back:
    inf, or NaN with an opposite inf), and with ``BOUND = TOP32`` those that reached float32's
    top binade too (such a sum could stay at max where the exact one reaches the overflow
    midpoint: max, 2^102, 2^102). Read past L1 (``.cg``): other programs wrote them."""
    o_r = tl.arange(0, FIX_R)
    m_bad = o_r < 0
    for d0 in range(0, D, BLOCK_D):
        o_d = d0 + tl.arange(0, BLOCK_D)
        b_v = tl.load(p_rows + o_r[:, None] * D + o_d[None, :], mask=m_k[:, None] & (o_d < D)[None, :], other=0.0,
                      cache_modifier=".cg")
        m_bad = m_bad | (tl.max((~(tl.abs(b_v) < BOUND)).to(tl.int32), axis=1) > 0)
    return m_k & m_bad


@triton.jit
def add_rows_by_index(b_acc, b_t, b_idx, k0, FIX_R: tl.constexpr):
    """``b_acc (FIX_R, C)`` float64 plus, for each ``j``, the sum of the rows of the terms
    ``b_t (rows, C)`` whose index (code, table row) ``b_idx`` is ``k0 + j``; every other row of
    ``b_t`` is left out, whatever it holds."""
    o_r = tl.arange(0, FIX_R)
    for j in tl.static_range(FIX_R):
        b_j = tl.sum(tl.where((b_idx == k0 + j)[:, None], b_t, 0.0), axis=0)
        b_acc = tl.where((o_r == j)[:, None], b_acc + b_j[None, :], b_acc)
    return b_acc


# --------------------------------------------------------------------------- sums rounded once
# A float64 sum of float32 terms is not exact (terms max, 2^103 and -2^60 sum in float64 to the
# float32 rounding midpoint max + 2^103, where the exact sum is below it), and rounding a float32
# sum again to bfloat16 / float16 rounds twice (qrprobe QP3, QP5). Where a kernel's float64 redo
# must round once, it sums each block of terms in three parts (:func:`dd_sum`: two
# extractions), carries the blocks' running sum as three float64 parts ``(s, e, f)`` (:func:`dd_add`:
# ~159 bits, renormalised after each block) and rounds that once (:func:`round_dd`).


@triton.jit
def two_sum(a, b):
    """``(s, e)`` with ``s = fl(a + b)`` and ``s + e = a + b`` exactly (Knuth; any magnitudes)."""
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


DD_M = tl.constexpr(10)  # dd_sum's blocks: at most 2^10 - 2 terms


@triton.jit
def dd_split(b_t, axis: tl.constexpr):
    """One extraction, element by element: ``(q, t - q)`` with ``q`` the term at the precision of
    ``sigma = 2^(DD_M + E)`` (``2^E`` above the largest |term| along ``axis``), so the ``q`` of a
    block of at most ``2^DD_M - 2`` terms sum exactly in any order (Rump, Ogita and Oishi), and
    ``t - q`` (below ``2^-53 sigma``) is exact. A block with a NaN or infinite term: ``q = t``,
    remainder 0."""
    b_m = tl.max(tl.abs(b_t), axis=axis, keep_dims=True)
    fin = b_m < float("inf")
    b_e = (b_m.to(tl.int64, bitcast=True) >> 52) & 0x7FF  # the largest |term|'s biased exponent
    sigma = tl.where(fin, ((b_e + 1 + DD_M) << 52).to(tl.float64, bitcast=True), 0.0)
    b_q = tl.where(fin, (sigma + b_t) - sigma, b_t)
    return b_q, tl.where(fin, b_t - b_q, 0.0)


@triton.jit
def dd_sum(b_t, axis: tl.constexpr):
    """``(hi, mid, lo)``: the float64 sum of ``b_t`` along ``axis`` (at most ``2^DD_M - 2`` terms) in
    three parts, by two extractions (:func:`dd_split`), for :func:`dd_add`. The first keeps each
    term to ``2^(E - 43)`` (``2^E`` above the largest): their sum ``hi`` is exact; the second
    splits the remainders again at their own largest (to ``2^(E - 86)`` at most): their sum
    ``mid`` is exact too, and only what lies below that is summed plainly (``lo``): the parts
    are the exact sum to about ``n^2 2^-136`` of the largest term. One extraction with the
    remainders summed plainly lost a small remainder beside two that cancel: ``(1 + 2^-23)^2 +
    2^-100 - (1 + 2^-23)^2`` gave 0 (review10), and ``max, 2^103, 2^77, -2^-100, -2^77`` lost
    its ``-2^-100`` and rounded to +inf in ``qr_lookup``'s kernels (the exact sum rounds to max);
    adding ``mid`` and ``lo`` here lost ``lo`` where another block cancels ``mid`` (1, 2^-24,
    2^-60, 2^-130 then -2^-60: 1, exact 1 + 2^-23). Only maxima, sums and elementwise
    operations: no custom reduction (the interpreter runs those element by element). A NaN or
    infinite term: ``hi`` is the plain sum, the others 0."""
    b_q, b_r = dd_split(b_t, axis)
    b_q2, b_r2 = dd_split(b_r, axis)
    return tl.sum(b_q, axis=axis), tl.sum(b_q2, axis=axis), tl.sum(b_r2, axis=axis)


@triton.jit
def dd_renorm(b_s, b_e, b_f):
    """``(s, e, f)`` with the same exact sum, ``|e|`` within about half an ulp of ``s`` and ``|f|``
    of ``e`` (two error-free additions from the bottom, then one more: enough for the parts
    :func:`dd_add` leaves, whose ``e`` may lie far above ``s`` after ``s`` cancelled)."""
    e, f = two_sum(b_e, b_f)
    s, e = two_sum(b_s, e)
    e, f = two_sum(e, f)
    return s, e, f


@triton.jit
def dd_add(b_s, b_e, b_f, b_hi, b_mid, b_lo):
    """The running sum ``(b_s, b_e, b_f)`` (three float64 parts) plus a block's parts ``(b_hi,
    b_mid, b_lo)`` (:func:`dd_sum`), renormalised (:func:`dd_renorm`). Every addition is
    error-free but those into ``f``: the parts hold the running sum to about ``2^-159`` of the
    largest running sum (a pair, whose low part was summed plainly, held ``2^-106``: blocks (1,
    2^-60), (-1, 2^-130), (-2^-60) gave 0, exact 2^-130)."""
    s, t1 = two_sum(b_s, b_hi)
    e, t2 = two_sum(b_e, b_mid)
    e, t3 = two_sum(e, t1)
    n_s, n_e, n_f = dd_renorm(s, e, b_f + (b_lo + (t2 + t3)))
    return tl.where(tl.abs(s) < float("inf"), n_s, s), n_e, n_f  # (a NaN or +-inf s stays: its e is NaN)


@triton.jit
def round_dd(b_s, b_e, b_f, ODD32: tl.constexpr, b_tol=0.0, SNAP: tl.constexpr = False):
    """float32 of the running sum ``s + e + f`` (:func:`dd_add`) rounded once. ``ODD32`` False: to
    nearest even (rounded to odd at float64 first: 53 >= 24 + 2 bits, so the second rounding is
    exact). ``ODD32`` True: to odd at float32, for a table of bfloat16 or float16 that the store
    then rounds to nearest (24 >= 11 + 2). A sum ``s`` that is NaN or +-inf (a term was; its
    ``e`` is then NaN) passes through as it is. ``SNAP``: the parts are the exact sum only within
    ``b_tol`` (its terms carry a rounding of their own: "mean"'s quotients, :func:`two_prod`),
    and rounding to odd would keep that error where the exact sum is a tie (a bfloat16 mean of
    three bfloat16 values, exactly halfway, came out the odd neighbour): a sum within ``b_tol``
    of a point of float32's half-ulp grid (every float32, bfloat16 and float16 value and
    rounding midpoint lies on it) is that point (:func:`snap_half_ulp`), and every other sum
    is rounded once as above."""
    fin = (b_s == b_s) & (tl.abs(b_s) < float("inf"))
    s, e, f = dd_renorm(b_s, tl.where(fin, b_e, 0.0), tl.where(fin, b_f, 0.0))
    h, l = two_sum(s, e)
    l = l + f  # (the tail's sign is exact: h + l + f is the sum, |l + f| below h's ulp)
    z = b_s + b_e  # (an exact 0 keeps the sign the parts give it, as IEEE adds them: -0 + -0 is -0)
    h = tl.where(fin, tl.where(h == 0, tl.where(z == 0, z, 0.0), h), b_s)
    if SNAP:
        h, l = snap_half_ulp(h, l, fin, b_tol)
    if ODD32:
        f32 = h.to(tl.float32)
        d = h - f32.to(tl.float64)  # exact: f32 is h's float32 neighbour
        d = tl.where(d != 0, d, l)
        bits = f32.to(tl.int32, bitcast=True)
        fix = fin & (tl.abs(f32) < float("inf")) & (d != 0) & ((bits & 1) == 0)
        up = ((d > 0) == (f32 > 0)) | (f32 == 0)  # the magnitude moves toward the exact sum
        return tl.where(fix, tl.where(up, bits + 1, bits - 1), bits).to(tl.float32, bitcast=True)
    else:
        bits = h.to(tl.int64, bitcast=True)
        fix = fin & (l != 0) & ((bits & 1) == 0)
        up = (l > 0) == (h > 0)
        return tl.where(fix, tl.where(up, bits + 1, bits - 1), bits).to(tl.float64, bitcast=True).to(tl.float32)


@triton.jit
def snap_half_ulp(h, l, fin, b_tol):
    """``(h, l)`` (``h + l`` a float64 sum, ``|l|`` below half of ``h``'s ulp) moved to 0 where
    ``|h + l| <= b_tol`` (an exact 0 of terms that carry a rounding came out 2^-108: fuzzU), else
    to the nearest point ``P`` of float32's half-ulp grid at ``h`` (multiples of ``2^(E - 24)``,
    ``2^E <= |h|``, at least 2^-150) where ``|h + l - P| <= b_tol``: then ``(P, 0)``. An ``h`` of
    0 keeps its sign; one moved to 0 becomes +0, as IEEE sums to an exact 0."""
    b_e = (h.to(tl.int64, bitcast=True) >> 52) & 0x7FF
    u = (tl.maximum(b_e - 24, 1023 - 150) << 52).to(tl.float64, bitcast=True)
    big = u * 6755399441055744.0  # 1.5 * 2^52 * u: (h + big) - big rounds h to a multiple of u
    p = (h + big) - big
    p = tl.where(tl.abs(h + l) <= b_tol, 0.0, p)
    p = tl.where(h == 0, h, p)
    snap = fin & (tl.abs((h - p) + l) <= b_tol)  # (h - p is exact: |h - p| <= u / 2, or p = 0)
    return tl.where(snap, p, h), tl.where(snap, 0.0, l)


@triton.jit
def two_prod(a, b):
    """``(p, e)``: ``p = fl(a b)`` and ``p + e = a b`` exactly (Dekker; float64, no FMA: the
    interpreter's is not fused), for ``|a|, |b|`` below 2^995 and a product far above
    float64's subnormals."""
    ah, al = _split26(a)
    bh, bl = _split26(b)
    p = a * b
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


@triton.jit
def _split26(a):
    """Veltkamp: ``(hi, lo)``, ``a = hi + lo`` exactly, each of at most 26 significant bits."""
    c = a * 134217729.0  # 2^27 + 1
    hi = c - (c - a)
    return hi, a - hi


@triton.jit
def add_rows_by_index_dd(b_s, b_e, b_f, b_t, b_idx, k0, FIX_R: tl.constexpr):
    """:func:`add_rows_by_index` into the running sums ``(b_s, b_e, b_f)`` (each ``(FIX_R, C)``
    float64), each row's terms summed by :func:`dd_sum` and added by :func:`dd_add`; a row with no
    term in the block is skipped (a fix-up group's block often holds one or two of its rows)."""
    o_r = tl.arange(0, FIX_R)
    for j in tl.static_range(FIX_R):
        m_t = b_idx == k0 + j
        if tl.max(m_t.to(tl.int32), axis=0) > 0:
            b_hi, b_mid, b_lo = dd_sum(tl.where(m_t[:, None], b_t, 0.0), 0)
            n_s, n_e, n_f = dd_add(b_s, b_e, b_f, b_hi[None, :], b_mid[None, :], b_lo[None, :])
            m_j = (o_r == j)[:, None]
            b_s = tl.where(m_j, n_s, b_s)
            b_e = tl.where(m_j, n_e, b_e)
            b_f = tl.where(m_j, n_f, b_f)
    return b_s, b_e, b_f


def atomic_overflow_bound(n: int) -> float:
    """``2^t``: a float32 sum of at most ``n`` terms, each at most ``2^t`` in magnitude, stays
    below ``2^127`` in every partial sum, in any order: recursive summation's partial sums are
    at most ``sum |terms| (1 + 2^-24)^n <= n e^(n 2^-24) 2^t``, and ``t = 127 -
    ceil(log2(n e^(n 2^-24)))`` (``2^t`` = 2^114, about 2.1e34, for 4,096 items). Atomic sums
    (QR's backward, residual quantization's statistics and codebook gradient) flag a larger
    term; their fix-ups sum the rows that overflowed again in float64."""
    log2_growth = math.log2(max(n, 1)) + n * 2.0**-24 / math.log(2.0)
    return math.ldexp(1.0, 127 - max(0, math.ceil(log2_growth)))


@triton.jit
def pow2_exponent(m):
    """For a float32 ``m >= 0``: the int32 ``e`` with ``m * 2**-e`` in [1, 2) (normal ``m``),
    clamped to [-127, 126] so that ``2**-e`` is a normal float32. Subnormal and zero ``m`` give
    -127 (``m * 2**127 < 2``); inf/NaN give 126 (they stay inf/NaN when scaled)."""
    biased = (m.to(tl.int32, bitcast=True) >> 23) & 0xFF
    return tl.minimum(tl.maximum(biased - 127, -127), 126)


@triton.jit
def nan_max0(d):
    """``max(d, 0)`` that keeps NaN (``tl.maximum`` alone turns NaN into 0)."""
    return tl.maximum(d, 0.0, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def nan_clamp(d, lo, hi):
    """``min(max(d, lo), hi)`` that keeps NaN."""
    d = tl.maximum(d, lo, propagate_nan=tl.PropagateNan.ALL)
    return tl.minimum(d, hi, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def argmin_merge(b_best, b_idx, b_s, k0, BLOCK_K: tl.constexpr):
    """Fold a ``(BLOCK_N, BLOCK_K)`` tile of scores (codes ``k0 .. k0 + BLOCK_K - 1``) into the
    running per-row ``(min, index)``, once per tile.

    NaN-aware without a select: ``tl.min`` is a NaN-ignoring min (``min.f32``), and a NaN never
    equals the minimum, so a NaN score (a masked or non-finite code) is never chosen; a row whose
    tile is all NaN keeps its running pair. Exact ties go to the smallest index: the smallest
    column attaining the tile's minimum, and a later tile only wins when strictly smaller.
    ``b_idx`` int32 (-1 while no code has been chosen); ``b_best`` float32 (+inf at the start).
    """
    b_m = tl.min(b_s, axis=1)
    b_j = tl.min(tl.where(b_s == b_m[:, None], tl.arange(0, BLOCK_K)[None, :], BLOCK_K), axis=1)
    m_better = b_m < b_best
    return tl.where(m_better, b_m, b_best), tl.where(m_better, (k0 + b_j).to(tl.int32), b_idx)


@triton.jit
def argmin_merge_pair(b_best, b_idx, b_cand, b_cidx):
    """Merge a candidate ``(min, index)`` pair per row (e.g. a later split's partial) into the
    running one: strict ``<`` (the earlier, smaller-index one wins ties), NaN never wins."""
    m_better = b_cand < b_best
    return tl.where(m_better, b_cand, b_best), tl.where(m_better, b_cidx, b_idx)


# --------------------------------------------------------------------------- target GPUs
# What the early-prune functions of the autotuned kernels budget for. On CUDA the tensors'
# device decides (its compute capability); anywhere else (the CPU, a meta tensor) the
# documented default target, sm_90 (H100/H200), so a prune gives the same answer on a laptop as
# on the GPU it will run on. tests/_cuda_compile_worker.py compiles every config a prune keeps
# at the benchmark shapes for each target and checks the estimates below against ptxas.


@dataclasses.dataclass(frozen=True)
class Target:
    name: str  # "sm_90"
    capability: int  # 90
    smem: int  # bytes of shared memory one block may opt into
    sm_count: int  # streaming multiprocessors (the split heuristics assume it)
    max_regs: int = 255  # registers per thread before ptxas spills


TARGETS = {
    "sm_80": Target("sm_80", 80, 166912, 108),  # A100: 163 KiB opt-in per block
    "sm_90": Target("sm_90", 90, 232448, 132),  # H100/H200 SXM: 227 KiB opt-in per block
}
DEFAULT_TARGET = "sm_90"  # where the device cannot be asked (no CUDA)
_FORCED_TARGET: list = []  # stack of compile_target() blocks


@contextlib.contextmanager
def compile_target(name: str):
    """Make every prune budget for ``TARGETS[name]`` inside the block, whatever the device
    (the ahead-of-time compile check sweeps sm_80 and sm_90 on a CPU)."""
    _FORCED_TARGET.append(TARGETS[name])
    try:
        yield TARGETS[name]
    finally:
        _FORCED_TARGET.pop()


@functools.lru_cache(maxsize=None)
def _cuda_target(index: int) -> Target:
    major, minor = torch.cuda.get_device_capability(index)
    cap = 10 * major + minor
    known = TARGETS.get(f"sm_{cap}")
    props = torch.cuda.get_device_properties(index)
    try:
        smem = int(triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"])
    except Exception:  # an older/other driver API: the known figure, else the A100's (the smallest here)
        smem = known.smem if known else TARGETS["sm_80"].smem
    return Target(f"sm_{cap}", cap, smem, props.multi_processor_count)


def target_for(device) -> Target:
    """The GPU a launch on ``device`` is budgeted for: inside :func:`compile_target` that one;
    a CUDA device as it is; otherwise ``TARGETS[DEFAULT_TARGET]``."""
    if _FORCED_TARGET:
        return _FORCED_TARGET[-1]
    if getattr(device, "type", None) == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _cuda_target(index)
    return TARGETS[DEFAULT_TARGET]


def arch_family(target: Target) -> str:
    """``"sm_90"`` for Hopper and later (wgmma, TMA-style pipelining), ``"sm_80"`` below."""
    return "sm_90" if target.capability >= 90 else "sm_80"


def words_per_thread(rows: int, cols: int, num_warps: int, elt: int = 4) -> float:
    """32-bit registers a thread needs for its share of a ``rows x cols`` block of ``elt``-byte
    elements spread over ``num_warps`` warps."""
    return rows * cols * elt / (4 * 32 * num_warps)


def register_estimate(model, *words) -> int:
    """``base + sum(coef * words)``, rounded up: ``model = (base, (coef, ...))``, fitted per kernel
    to ptxas on the benchmark shapes so that it bounds the compiled count from above."""
    base, coefs = model
    assert len(coefs) == len(words), (coefs, words)
    return int(-(-(base + sum(c * w for c, w in zip(coefs, words))) // 1))


def fits_target(target: Target, shared: int, regs: int) -> bool:
    """An estimate fits: shared memory within the block's opt-in limit, and registers below the
    per-thread maximum (at 255 ptxas spills whatever no longer fits)."""
    return shared <= target.smem and regs < target.max_regs


def prune_by_estimate(configs, estimate, target: Target) -> list:
    """The configs whose ``estimate(config) -> {"shared": bytes, "regs": per thread}`` fits
    ``target``; if none does, the one that overshoots least (every launch keeps a config)."""
    est = {id(c): estimate(c) for c in configs}
    kept = [c for c in configs if fits_target(target, **est[id(c)])]
    if kept:
        return kept
    return [min(configs, key=lambda c: (max(0, est[id(c)]["shared"] - target.smem), est[id(c)]["regs"],
                                        est[id(c)]["shared"]))]


# --------------------------------------------------------------------------- the rotation trick
# (its gradient, shared by the rotation_trick kernel and the fused residual_quantize backward)


@triton.jit
def inv_pos(b_x):
    """``1 / x`` where ``x`` is a normal float32 (``>= 2^-126``), else 1: a zero, NaN or
    subnormal scale leaves the row as it is (``1 / x`` would overflow to inf there). Rows of
    ``e`` or ``q`` that small are far below ``EPS_N``: straight through whatever their sums."""
    return rcp_rn(tl.where(b_x >= 1.1754943508222875e-38, b_x, 1.0))


@triton.jit
def rcp_rn(b_x):
    """``1 / x`` rounded once, as torch and the interpreter divide. A plain ``/`` of float32
    compiles to ``div.full.f32`` on NVIDIA GPUs (up to 2 ulp off) and ``tl.sqrt`` to
    ``sqrt.approx.ftz`` (subnormals flushed to 0): the guarded scale-and-norm code of the
    rotation and the EMA divide must round as the CPU does (the H200 run of 2026-12-04: NaN
    gradients on rows near float32's maximum that the interpreter gave finite)."""
    return tl.math.div_rn(tl.full(b_x.shape, 1.0, tl.float32), b_x)


@triton.jit
def g_scale(b_mg):
    """``(pre, inv)`` with ``g1 = (g * pre) * inv = g / max |g|`` for every finite ``max |g|``,
    subnormal included (``pre = 2^64`` below ``2^-64``: ``max |g| * pre`` is then normal)."""
    b_pre = tl.where(b_mg < 5.421010862427522e-20, 1.8446744073709552e19, 1.0)
    return b_pre, inv_pos(b_mg * b_pre)


@triton.jit
def scaled_sumsq(b_m, b_ss, b_n2, b_x):
    """Running ``(max |x|, sum (x / max)^2, sum x^2 in float64)`` per row, updated with a
    (BLOCK_N, BLOCK_D) tile. The float64 sum decides the ``EPS_N`` test: a float32 value's
    square is exact in float64 and never overflows or underflows there, so this kernel and the
    float64 reference take the same branch (not only to within a float32 rounding)."""
    b_m_new = tl.maximum(b_m, tl.max(tl.abs(b_x), axis=1))
    b_inv = inv_pos(b_m_new)
    b_r = b_m * b_inv
    b_x1 = b_x * b_inv[:, None]
    b_x64 = b_x.to(tl.float64)
    return b_m_new, b_ss * b_r * b_r + tl.sum(b_x1 * b_x1, axis=1), b_n2 + tl.sum(b_x64 * b_x64, axis=1)


@triton.jit
def unit_scales(b_me, b_sse, b_ne2, b_mq, b_ssq, b_nq2, EPS_N):
    """From the scaled norms: ``a1``, ``b1``, whether both norms reach ``EPS_N`` (decided on the
    float64 sums of squares ``|e|^2``, ``|q|^2``), and the factors that make ``e^ = e * ia`` and
    ``q^ = q * ib`` (1 / the scale where a norm is too small)."""
    b_a1 = tl.sqrt_rn(b_sse)
    b_b1 = tl.sqrt_rn(b_ssq)
    eps = tl.zeros_like(b_ne2) + EPS_N  # float64, exactly the float32 EPS_N
    eps2 = eps * eps
    b_ok = (b_ne2 >= eps2) & (b_nq2 >= eps2)
    b_ia = rcp_rn(tl.where(b_ok, b_a1, 1.0)) * inv_pos(b_me)  # (no 1/0 for the rows not ok)
    b_ib = rcp_rn(tl.where(b_ok, b_b1, 1.0)) * inv_pos(b_mq)
    return b_a1, b_b1, b_ok, b_ia, b_ib


@triton.jit
def grad_factor(b_me, b_mq, b_mg, b_a1, b_b1, b_ok):
    """Per row: ``F = (m_q / m_e) (b1 / a1) m_g`` in float64 (used where ``b_ok``; 1 / 1 in the
    other rows, which divided 0 by 0), and whether ``e`` or ``q`` has a NaN or infinite entry
    (then ``a1`` or ``b1`` is NaN)."""
    b_bad = (b_a1 != b_a1) | (b_b1 != b_b1)
    b_me = tl.where(b_ok, b_me, 1.0)
    b_a1 = tl.where(b_ok, b_a1, 1.0)
    b_f = (b_mq.to(tl.float64) / b_me.to(tl.float64)) * (b_b1.to(tl.float64) / b_a1.to(tl.float64)) \
        * b_mg.to(tl.float64)
    return b_f, b_bad


@triton.jit
def rotation_grad_rows(b_e, b_q, b_g, EPS_N, EPS_S):
    """The rotation trick's gradient to ``e`` for a ``(rows, BLOCK_D)`` float32 block holding
    whole rows of ``e``, ``q`` and the upstream ``g`` (padding 0): ``lambda R^T g`` where both
    norms reach ``EPS_N`` and ``|e^ + q^| >= EPS_S``, else ``g``; NaN in a row with a NaN or
    infinite entry in ``e`` or ``q``. Every vector is scaled by its largest magnitude before it
    is squared or dotted, and ``lambda max|g|`` is applied last in float64: finite wherever the
    exact gradient is (``|q| / |e|`` and ``g`` near the float32 range included)."""
    zero = tl.zeros((b_e.shape[0],), dtype=tl.float32)
    zero64 = zero.to(tl.float64)
    b_me, b_sse, b_ne2 = scaled_sumsq(zero, zero, zero64, b_e)
    b_mq, b_ssq, b_nq2 = scaled_sumsq(zero, zero, zero64, b_q)
    b_mg = tl.max(tl.abs(b_g), axis=1)
    b_a1, b_b1, b_ok, b_ia, b_ib = unit_scales(b_me, b_sse, b_ne2, b_mq, b_ssq, b_nq2, EPS_N)
    b_eh = b_e * b_ia[:, None]
    b_qh = b_q * b_ib[:, None]
    b_s = b_eh + b_qh
    b_ns = tl.sqrt_rn(tl.sum(b_s * b_s, axis=1))
    b_ok = b_ok & (b_ns >= EPS_S)
    b_w = b_s * rcp_rn(tl.where(b_ok, b_ns, 1.0))[:, None]
    b_pg, b_ig = g_scale(b_mg)
    b_g1 = (b_g * b_pg[:, None]) * b_ig[:, None]
    b_gw = tl.sum(b_g1 * b_w, axis=1)
    b_gq = tl.sum(b_g1 * b_qh, axis=1)
    b_r1 = b_g1 - 2.0 * b_gw[:, None] * b_w + 2.0 * b_gq[:, None] * b_eh
    b_f, b_bad = grad_factor(b_me, b_mq, b_mg, b_a1, b_b1, b_ok)
    b_rot = (b_r1.to(tl.float64) * b_f[:, None]).to(tl.float32)
    b_de = tl.where(b_ok[:, None], b_rot, b_g)
    return tl.where(b_bad[:, None], float("nan"), b_de)

