"""Small helpers shared by the launchers."""

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
