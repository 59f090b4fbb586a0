"""sample_code: one code per row drawn with probability softmax(-distance / temperature), fused
Gumbel-max sampling without the N x K matrix, not differentiable."""

from __future__ import annotations

from typing import Optional

import torch

from .._backend import use_triton
from ._custom_op import custom_op
from ..reference.sample_code import sample_code_ref
from .._checks import check_int_arg, read_temperature, temperature_arg
from ._search import search_inputs


def _t_bounds() -> dict:
    """T from 0 to float32's largest (beyond, it is +inf in float32). (Literals made at each call:
    under torch.compile, dynamic=True, a module-level float was traced as a symbol, which the
    argument check cannot format.)"""
    return {"minimum": 0.0, "maximum": 3.4028234663852886e38}


@custom_op("fastvq::sample_code", mutates_args=())
def _sample_code_op(x: torch.Tensor, codebook: torch.Tensor, seed: torch.Tensor, temperature: float,
                    temperature_t: Optional[torch.Tensor], metric: str,
                    allow_tf32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # x (H, N, D), codebook (H, K, D), seed () int64 -> (H, N) int64, (H, N) float32
    temperature = read_temperature("sample_code", temperature, temperature_t, **_t_bounds())
    if temperature == 0.0:  # (a tensor's 0, read here; a number's is routed before the op)
        from .nearest_code import _nearest_code_op

        return _nearest_code_op(x, codebook, metric, allow_tf32)
    if use_triton("sample_code", x, codebook):
        from ..kernels.nearest_code import sample_code_fwd

        return sample_code_fwd(x, codebook, seed, temperature, metric, allow_tf32)
    return sample_code_ref(x, codebook, temperature, metric, seed=seed, allow_tf32=allow_tf32)


@_sample_code_op.register_fake
def _(x, codebook, seed, temperature, temperature_t, metric, allow_tf32):
    shape = x.shape[:2]
    return x.new_empty(shape, dtype=torch.int64), x.new_empty(shape, dtype=torch.float32)


def _seed(seed, generator, device) -> torch.Tensor:
    if seed is not None and generator is not None:
        raise ValueError("fastvq.sample_code: pass a seed or a generator, not both")
    if isinstance(seed, torch.Tensor):
        if seed.dim() != 0 or seed.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"fastvq.sample_code: a seed tensor must be a 0-d int64/int32 tensor, got "
                            f"{seed.dtype} of shape {tuple(seed.shape)}")
        if seed.device.type == "meta" and torch.device(device).type != "meta":
            raise ValueError(f"fastvq.sample_code: seed is a tensor on the meta device, which holds no value, beside "
                             f"inputs on {device}")
        return seed.to(device=device, dtype=torch.int64)
    if seed is not None:
        seed = check_int_arg("sample_code", "seed", seed, minimum=-(2**63), maximum=2**63 - 1)
        # (a fill, not torch.tensor: that copies host memory to the device, a sync on CUDA)
        return torch.full((), seed, dtype=torch.int64, device=device)
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"fastvq.sample_code: generator must be a torch.Generator, got {type(generator).__name__}")
        drawn = torch.randint(0, 2**62, (), dtype=torch.int64, device=generator.device, generator=generator)
        if drawn.device != torch.device(device) and drawn.device.type == "cpu":  # read on the host, then a fill
            return torch.full((), int(drawn), dtype=torch.int64, device=device)
        return drawn.to(device)
    return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)


def sample_code(
    x: torch.Tensor, codebook: torch.Tensor, temperature: float, metric: str = "l2", *, seed=None,
    generator: torch.Generator | None = None, allow_tf32: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one code per row of ``x`` with probability ``softmax(-distance / temperature)`` over the
    codebook: Gumbel-max sampling fused into the nearest-code search (``argmin_k distance_k /
    temperature - g_k`` with Gumbel noise ``g`` generated in the kernel), no ``N x K`` matrix.

    Args:
        x: ``(..., D)`` float32/float16/bfloat16 (``(H, ..., D)`` with ``H`` codebooks), as for
            :func:`fastvq.nearest_code`.
        codebook: ``(K, D)`` or ``(H, K, D)``, as for :func:`fastvq.nearest_code`.
        temperature: a real number from ``0`` to float32's largest, ``3.4e38`` (a larger or
            non-finite one raises ``ValueError``), a Python number or a one-element floating-point
            tensor (read when the op runs: a CPU tensor costs no device sync, a CUDA one does).
            ``0`` is the nearest code (no noise; exactly :func:`fastvq.nearest_code`). Under
            ``torch.compile`` a Python number becomes such a tensor (float64), a graph input: a
            changing temperature compiles at most twice with ``backend="eager"``; ``inductor``
            and ``aot_eager`` (and ``dynamic=False``) compile once per value: pass a tensor there.
        metric: ``"l2"`` (squared Euclidean), ``"euclidean"`` (``|x - c|``: the logits of
            vector-quantize-pytorch's Euclidean codebook are ``-|x - c|``), ``"cosine"``
            (``1 - cos``) or ``"dot"`` (``-<x, c>``).
        seed: an int in [-2**63, 2**63) (a signed 64-bit value) or a 0-d int64 tensor: the same seed and inputs give the
            same codes on a backend (the two backends draw the same noise; a sample may differ
            between them only where float32 rounding of ``distance / temperature - g`` differs).
        generator: a ``torch.Generator`` to draw the seed from, instead of ``seed``. With
            neither, the seed comes from torch's global generator (``torch.manual_seed`` makes
            runs reproducible; under ``torch.compile`` prefer this or ``seed``).
        allow_tf32: as for :func:`fastvq.nearest_code`.

    Returns:
        ``(indices, distances)`` of shape ``x.shape[:-1]``: int64 in ``[0, K)``, the sampled code,
        and its float32 distance, computed directly. Non-finite rows and codes follow
        :func:`fastvq.nearest_code` (a code with a NaN or infinite entry has probability 0 for a
        finite row while a finite code exists). A row whose ``distance / temperature`` factor
        per unit of its float32 scores (the scores are taken in a power-of-two unit of the row,
        :func:`fastvq.nearest_code`) passes 2^124 takes its nearest code: the noise, scaled down
        with the scores so that neither overflows, would leave float32's normal range (the
        temperature is then more than 2^100 times below the scores' unit). The factor is formed
        from ``T``'s mantissa and exponent apart, so a temperature below float32's normal range
        samples as softmax does where the distances are as tiny (dot entries ~1e-20 at
        ``T = 1e-40``: 0.88 / 0.12; ``1 / T`` overflowed float32 and took the nearest code; fuzzA).
        Not differentiable.

    Example::

        >>> codebook = torch.randn(512, 64)
        >>> idx, dist = fastvq.sample_code(torch.randn(100, 64), codebook, temperature=0.5, seed=0)
        >>> idx.shape
        torch.Size([100])
    """
    x3, c3, lead, allow_tf32 = search_inputs("sample_code", x, codebook, metric, allow_tf32)
    temperature, temperature_t = temperature_arg("sample_code", temperature, x3, **_t_bounds())
    seed_t = _seed(seed, generator, x3.device)
    if temperature_t is None and temperature == 0.0:
        from .nearest_code import _nearest_code_op

        indices, distances = _nearest_code_op(x3, c3, metric, allow_tf32)
    else:
        indices, distances = _sample_code_op(x3, c3, seed_t, temperature, temperature_t, metric, allow_tf32)
    return indices.reshape(lead), distances.reshape(lead)
