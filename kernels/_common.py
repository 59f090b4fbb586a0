"""Small helpers shared by the launchers."""

import contextlib
import functools

import torch

from . import INTERPRETED

# Triton's interpreter (3.8) computes tl.dot on bfloat16 blocks wrongly; fp16/fp32 are right.
# Kernels take a DOT_FP32 constexpr and upcast dot operands when it is set. On a GPU it is
# never set, so bf16 stays on the tensor cores.


def dot_fp32(dtype: torch.dtype) -> bool:
    return INTERPRETED and dtype == torch.bfloat16


def tl_input_precision(dtype: torch.dtype, allow_tf32: bool = False) -> str:
    """``input_precision`` for tl.dot: exact ``"ieee"`` for fp32 unless tf32 was asked for."""
    if dtype == torch.float32 and not allow_tf32:
        return "ieee"
    return "tf32"


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


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


# --------------------------------------------------------------------------- jit helpers
# Shared by several kernels. Power-of-two scaling is exact for normal numbers (it only moves the
# exponent), so a scaled computation rounds exactly like the unscaled one wherever that one
# neither overflows nor underflows; it is how the search kernels "scale before they square".

import triton  # noqa: E402
import triton.language as tl  # noqa: E402


@triton.jit
def exp2i(e):
    """``2.0 ** e`` as float32, exactly, for an int32 ``e`` (clamped to [-126, 127])."""
    e = tl.minimum(tl.maximum(e, -126), 127)
    return ((e + 127) << 23).to(tl.float32, bitcast=True)


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
