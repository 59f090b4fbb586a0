"""float32 inputs are searched to float32 accuracy, also where the Triton kernels run the dot as
three TF32 products of split operands ("tf32x3", every GPU with TF32 tensor cores, and the
interpreter): on codebooks built of near-duplicate pairs, where one TF32 product (11-bit
operands) picks the farther code of a pair in a good share of the rows, every row's code is
within fastvq.testing's "tf32x3" rounding bound of the nearest (3 * 2^-22 per product besides the
float32 accumulation). Dropping the low parts of the split (one TF32 product of the high parts)
fails each Triton case here but residual_quantize's D-chunked one (float32 rows wider than 128
keep the exact "ieee" dot, held to the same criterion), pairwise_sqdist's included.
"""

import pytest
import torch

import fastvq
from fastvq.testing import argmin_ratio
from tests.utils import generator, randn


def _near_pairs(N, K, D, seed, eps=1e-3, device=None):
    """Rows and a codebook of K/2 pairs ``c, c + eps w``: a row's two nearest codes differ by about
    ``eps |x - c|``, ~1e-4 of the distances' magnitude: far above float32's rounding (and the
    "tf32x3" bound), well below one TF32 product's."""
    base = randn(K // 2, D, seed=seed, device=device)
    codes = torch.stack([base, base + eps * randn(K // 2, D, seed=seed + 1, device=device)], 1).reshape(K, D)
    pick = torch.randint(0, K // 2, (N,), generator=generator(seed + 2, device), device=base.device)
    x = base[pick] + 0.3 * randn(N, D, seed=seed + 3, device=device)
    return x, codes


def _spy_precision(monkeypatch, module, *names) -> list:
    """The ``PRECISION`` of every launch of the named autotuned kernels of ``module``, in order."""
    seen = []
    for name in names:
        kernel = getattr(module, name)

        def spy(*args, _real=kernel.run, **kwargs):
            seen.append(kwargs.get("PRECISION"))
            return _real(*args, **kwargs)

        monkeypatch.setattr(kernel, "run", spy)
    return seen


def _check(x, codes, idx, metric):
    ratio = argmin_ratio(x, codes, idx, metric, precision="tf32x3")[0]
    assert (ratio <= 1).all(), (f"{int((ratio > 1).sum())} of {ratio.numel()} rows chose a code farther than "
                                f"float32 rounding explains (worst ratio {float(ratio.max()):.3g})")


@pytest.mark.parametrize("metric", ["l2", "dot", "cosine"])
@pytest.mark.parametrize("layout", ["resident", "streamed"])
def test_nearest_code_float32_is_float32_accurate(backend, device, monkeypatch, metric, layout):
    import fastvq.kernels.nearest_code as knc

    D = 32
    if layout == "streamed":  # D in 32-wide chunks, the last one partial (as for any D > 64)
        monkeypatch.setattr(knc, "RESIDENT_MAX_D_X3", 16)
        D = 48
    x, codes = _near_pairs(256, 64, D, seed=D, device=device)
    idx, _ = fastvq.nearest_code(x, codes, metric)
    _check(x, codes, idx, metric)


def test_residual_quantize_float32_is_float32_accurate(backend, device):
    x, codes = _near_pairs(256, 64, 32, seed=5, device=device)
    for cbs in (codes[None], torch.stack([codes, 0.5 * codes])):  # the VectorQuantizer's L = 1; two levels
        _, idx = fastvq.residual_quantize(x, cbs)
        _check(x, cbs[0], idx[:, 0], "l2")
        if cbs.shape[0] == 2:  # the second level searches the residual the kernel formed
            _check(x - cbs[0][idx[:, 0]], cbs[1], idx[:, 1], "l2")


def test_residual_quantize_chunked_float32_is_float32_accurate(device):
    """The D-chunked kernel (D > 128 for float32; forced here at D = 48): the exact dot."""
    from fastvq.kernels.residual_quantize import residual_quantize_fwd

    x, codes = _near_pairs(256, 64, 48, seed=6, device=device)
    idx = residual_quantize_fwd(x, codes[None], max_register_d=1)["codes"]
    _check(x, codes, idx[:, 0], "l2")


def test_pairwise_sqdist_float32_is_float32_accurate(backend, device):
    """Every distance within the "tf32x3" bound of float64 (a.b's products as three TF32 products;
    D = 48: one full and one partial 32-wide chunk)."""
    import fastvq.testing as ft

    a, b = randn(40, 48, seed=21, device=device), randn(50, 48, seed=22, device=device)
    out = fastvq.pairwise_sqdist(a, b)
    a64, b64 = a.double(), b.double()
    aa, bb = (a64 * a64).sum(1, keepdim=True), (b64 * b64).sum(1)
    exact = (aa + bb - 2 * a64 @ b64.T).clamp_min(0)
    mag = aa + bb + 2 * a64.abs() @ b64.abs().T
    assert ft.error_ratio(out, exact, dtype=torch.float32, reduce_len=48 + 2, magnitude=mag,
                          precision="tf32x3") <= 1


@pytest.mark.parametrize("payload", [0x7FFFFFFF, 0x7FC00000, -1], ids=hex)
def test_nan_of_any_payload_is_a_nan_row(device, payload):
    """A row holding a NaN of any bit pattern (a GPU's arithmetic makes 0x7FFFFFFF, which the
    split's integer rounding would turn into -0 were it not kept NaN: test_common_helpers) takes
    the contract's code on both backends, at every level."""
    x, codes = _near_pairs(8, 16, 32, seed=9, device=device)
    x[3, 5] = torch.tensor([payload], dtype=torch.int64).to(torch.int32).view(torch.float32)[0]
    cbs = torch.stack([codes, 0.5 * codes])
    got = {}
    for be in ("triton", "reference"):
        with fastvq.backend(be):
            got[be] = (fastvq.nearest_code(x, codes)[0], fastvq.residual_quantize(x, cbs)[1])
    assert torch.equal(got["triton"][0], got["reference"][0])
    assert torch.equal(got["triton"][1], got["reference"][1]), (got["triton"][1][3], got["reference"][1][3])


def test_fp32_dot_env_forces_the_exact_dot(device, monkeypatch):
    """$FASTVQ_FP32_DOT=ieee keeps float32 on the exact dot (read at every launch: a benchmark times
    both in one run); the default splits; the ops refuse any other value with a ValueError naming
    the variable."""
    from fastvq.kernels import _common

    dev = torch.device(device)
    monkeypatch.delenv("FASTVQ_FP32_DOT", raising=False)
    split = "tf32x3" if _common.target_for(dev).capability >= 80 else "ieee"  # (no TF32 before sm_80)
    assert _common.tl_input_precision(torch.float32, split_on=dev) == split
    assert _common.tl_input_precision(torch.float32) == "ieee"  # (a kernel that does not split)
    assert _common.tl_input_precision(torch.float32, allow_tf32=True, split_on=dev) == "tf32"
    assert _common.tl_input_precision(torch.bfloat16, split_on=dev) == "tf32"
    # a dot search that only the exact dot gets right: the two codes differ by a float32 subnormal
    # (2^-140) that TF32's parts cannot hold (spacing 2^-136); a near-tie within the "tf32x3" bound
    t = 2.0**-140
    xs = torch.tensor([[0.0, 1.0]], device=device)
    cs = torch.tensor([[1.0, -t], [1.0, t]], device=device)
    import fastvq.kernels.residual_quantize as krq

    precisions = _spy_precision(monkeypatch, krq, "_residual_quantize_fwd_kernel")
    x, codes = _near_pairs(64, 32, 32, seed=11, device=device)
    with fastvq.backend("triton"):
        if split == "tf32x3":
            assert fastvq.nearest_code(xs, cs, "dot")[0].item() == 0  # (the split's near-tie)
            fastvq.residual_quantize(x, codes[None])
        monkeypatch.setenv("FASTVQ_FP32_DOT", " IEEE ")
        assert _common.tl_input_precision(torch.float32, split_on=dev) == "ieee"
        assert fastvq.nearest_code(xs, cs, "dot")[0].item() == 1
        _check(x, codes, fastvq.nearest_code(x, codes)[0], "l2")
        _check(x, codes, fastvq.residual_quantize(x, codes[None])[1][:, 0], "l2")
    assert precisions == ([split] if split == "tf32x3" else []) + ["ieee"]
    monkeypatch.setenv("FASTVQ_FP32_DOT", "tf32")  # the ops refuse it, on either backend
    for be in ("triton", "reference"):
        with fastvq.backend(be):
            with pytest.raises(ValueError, match="FASTVQ_FP32_DOT"):
                fastvq.nearest_code(x, codes)
            with pytest.raises(ValueError, match="FASTVQ_FP32_DOT"):
                fastvq.residual_quantize(x, codes[None])


def test_residual_split_only_where_its_tiles_were_measured(device, monkeypatch):
    """residual_quantize splits float32 only in the register variant with D <= 64 and L <= 8 (its
    listed tiles hold L = 8's registers); 9 levels, or 65 features, keep the exact dot."""
    from fastvq.kernels import _common
    import fastvq.kernels.residual_quantize as krq

    monkeypatch.delenv("FASTVQ_FP32_DOT", raising=False)
    split = "tf32x3" if _common.target_for(torch.device(device)).capability >= 80 else "ieee"
    seen = _spy_precision(monkeypatch, krq, "_residual_quantize_fwd_kernel", "_residual_quantize_fwd_chunked_kernel")
    for L, D, want in ((8, 64, split), (9, 64, "ieee"), (2, 65, "ieee")):
        seen.clear()
        with fastvq.backend("triton"):
            fastvq.residual_quantize(randn(20, D, seed=L, device=device), randn(L, 8, D, seed=D, device=device))
        assert seen == [want], (L, D, seen)
