"""probe4's findings (FINDINGS.md F1-F5) as regression tests, each checked against a float64
value worked out by hand in its docstring. They failed when written, marked ``xfail(strict=True)``;
each fix removed its marker (the strict marker turns a fixed test's pass into a failure). F2 on
Triton is still open (README known limits)."""

import pytest
import torch

import fastvq

from tests.utils import DEVICE, backend_cells


def _t(values, dtype=torch.float32):
    return torch.tensor(values, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_probe4_f3_fused_rotation_backward_no_overflow_of_lambda(request, backend, dtype):
    """|q| / |e| = 2.2e39 / 1.1e-3 is beyond float32, lambda R^T g is not: float64 gives
    about [-8.0e35, -4.4e36] (and fastvq.rotation_trick gives it on both backends)."""
    x = _t([[1e-3, 5e-4]], dtype).requires_grad_()
    cb = _t([[[1e36, 2e36]]], dtype)
    g = _t([[1e-3, -2e-3]], dtype)
    out = fastvq.residual_quantize_step(x, cb, grad="rotation")
    (out.quantized * g).sum().backward()
    expected = torch.tensor([[-7.99999969352252e35, -4.3999998314373904e36]], dtype=torch.float64)
    # (the float32 inputs' float64 value; bfloat16 rounds the inputs by up to 2^-9, taudit F9)
    rtol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(x.grad.double().to(expected.device), expected, rtol=rtol)


def test_probe4_f3_fused_rotation_backward_large_upstream_gradient(request, backend):
    """g = 2e38 in every element, |q| << |e|: float64 gives [5.33e27, 1.07e28, -5.33e27, 1.60e28]."""
    x = _t([[1e10, 2e10, -1e10, 3e10]]).requires_grad_()
    cb = torch.ones(1, 1, 4, device=DEVICE)
    g = torch.full((1, 4), 2e38, device=DEVICE)
    (fastvq.residual_quantize_step(x, cb, grad="rotation").quantized * g).sum().backward()
    expected = torch.tensor([[5.333332944365713e27, 1.0666665888731425e28, -5.333332944365714e27,
                              1.599999937923044e28]], dtype=torch.float64)
    assert torch.allclose(x.grad.double().to(expected.device), expected, rtol=1e-5)


@backend_cells("chunked", {"register": False}, {"chunked": True})
def test_probe4_f4_float16_residual_beyond_range_gets_the_nearest_code(backend, chunked):
    """fp16: level 0 leaves the float32 residual 70000 (beyond 65504); level 1's nearest code is
    60000, index 2. The kernel rounded the residual to float16 (inf) for its dot: every positive
    code scored -inf and the first, 10000, won. Rows 1-3: ordinary rows in the same block. Against a float64 greedy search."""
    x = _t([[60000.0], [3.0], [-2.0], [-60000.0]], torch.float16)
    cb = _t([[[-10000.0], [-10000.0], [-20000.0]], [[-60000.0], [10000.0], [60000.0]]], torch.float16)
    # float64 greedy (exact ties to the smaller index)
    r, want = x.double(), []
    assert float(r[0, 0] - cb[0, 0, 0].double()) > 65504  # row 0's level-1 residual: beyond float16
    for lvl in range(2):
        d = (r - cb[lvl].double().T) ** 2
        idx = d.argmin(1)
        want.append(idx)
        r = r - cb[lvl].double()[idx]
    want = torch.stack(want, 1).tolist()
    if chunked:
        from fastvq.kernels.residual_quantize import residual_quantize_fwd

        codes = residual_quantize_fwd(x, cb, max_register_d=1)["codes"]
    else:
        codes = fastvq.residual_quantize(x, cb)[1]
    assert codes.tolist() == want


def test_probe4_f4_kernel_spells_float16_max():
    from fastvq.kernels import residual_quantize as rq

    assert rq.FP16_WIDE_ROW.value == torch.finfo(torch.float16).max and rq.FP16_WIDE_EXP == 8
    assert rq.FP16_WIDE_SCALE.value == 2.0**-8 and rq.FP16_WIDE_DOT_SCALE.value == 2 * 2.0**8
    src = open(rq.__file__).read()
    assert src.count("> FP16_WIDE_ROW) | (b_idx < 0))") == 2  # register and chunked
    assert src.count("FP16_WIDE_SCALE") >= 3 and src.count("FP16_WIDE_DOT_SCALE)") == 2


def test_probe4_f2_step_statistics_sum_without_intermediate_overflow(backend):
    """Three rows on one code: -3e38 - 3e38 + 3e38 = -3e38, representable (the reference sums in
    float64 and rounds once); so the EMA module must update the code on both backends."""
    x = _t([[-3e38], [-3e38], [3e38]])
    cb = torch.zeros(1, 1, 1, device=DEVICE)
    out = fastvq.residual_quantize_step(x, cb, statistics=True)
    assert out.counts.tolist() == [[3.0]]
    assert out.sums.item() == pytest.approx(-3e38, rel=1e-6)


def test_probe4_f1_codebook_gradient_row_sum_without_intermediate_overflow(backend):
    """d embedding_loss / d c = sum_i 2 (c - x_i) / (N D) = (2/3)(3e38 + 3e38 - 3e38) = 2e38."""
    x = _t([[-3e38], [-3e38], [3e38]])
    cb = torch.zeros(1, 1, 1, device=DEVICE, requires_grad=True)
    fastvq.residual_quantize_step(x, cb).embedding_loss.backward()
    assert cb.grad.item() == pytest.approx(2e38, rel=1e-6)


def test_probe4_f1_codebook_gradient_overflow_is_inf_not_nan(backend):
    """10 (2/3)(3e38 + 3e38 - 3e38) = 2e39: beyond float32, so +inf (never NaN)."""
    x = _t([[-3e38], [-3e38], [3e38]])
    cb = torch.zeros(1, 1, 1, device=DEVICE, requires_grad=True)
    (10.0 * fastvq.residual_quantize_step(x, cb).embedding_loss).backward()
    assert cb.grad.item() == float("inf")


def test_probe4_f7_codebook_gradient_factor_does_not_underflow(backend):
    """1e-6 * 2 * 9.809e-45 * 1e38 / (1 + 9.8e-45) = 1.961818e-12, a normal float32."""
    x = _t([[-1e38], [0.0]])
    cb = torch.zeros(1, 1, 1, device=DEVICE, requires_grad=True)
    (1e-6 * fastvq.residual_quantize_step(x, cb, weights=_t([1e-44, 1.0])).embedding_loss).backward()
    assert cb.grad.item() == pytest.approx(1.961818e-12, rel=1e-5)


def test_probe4_f5_tiny_positive_weight_is_not_padding(backend):
    """Weights [1e38, 1e-8]: row 1 has a positive weight, so its quantized is its code (1.0); in
    the losses it weighs 2^-149 of the largest (float32's smallest subnormal once scaled, README
    known limits), never 0, and its statistics carry its weight as given, 1e-8 (they carried
    2^-22, the scaled weight scaled back, before f2probe S2)."""
    x = _t([[0.3], [0.7]])
    cb = _t([[[0.0], [1.0]]])
    w = _t([1e38, 1e-8])
    out = fastvq.residual_quantize_step(x, cb, weights=w, statistics=True)
    assert out.quantized[1].item() == 1.0
    assert out.counts[0, 1].item() == w[1].item()
    assert out.sums[0, 1].item() == pytest.approx(0.7 * 1e-8, rel=1e-6)
    assert out.counts[0, 0].item() == pytest.approx(1e38, rel=1e-6)


def test_probe4_f6_weighted_statistics_do_not_overflow_through_the_normalisation(backend):
    """Weights 0.75: sums = 0.75 * 3e38 + 0.75 * 1 = 2.25e38, representable (with weights 0.5 or 1.0
    the step gets it right)."""
    x = _t([[3e38], [1.0]])
    cb = torch.zeros(1, 1, 1, device=DEVICE)
    out = fastvq.residual_quantize_step(x, cb, weights=_t([0.75, 0.75]), statistics=True)
    assert out.counts.item() == pytest.approx(1.5)
    assert out.sums.item() == pytest.approx(2.25e38, rel=1e-6)


def test_probe6_w1_statistics_of_weights_beyond_2_127(backend):
    """A largest weight of 2e38: its scale-back factor was 2^128 = inf in float32, so every count
    came out inf (NaN for unused codes). Counts are the weights as given."""
    x = _t([[0.0], [1.0], [1.0]])
    cb = _t([[[0.0], [1.0], [5.0]]])
    out = fastvq.residual_quantize_step(x, cb, weights=_t([2e38, 1.0, 3.0]), statistics=True)
    assert out.counts[0].tolist() == pytest.approx([2e38, 4.0, 0.0], rel=1e-6)
    assert torch.isfinite(out.sums).all()


def test_probe6_w2_weight_op_metadata_under_a_float64_default():
    """The weight normalisation op's real and fake outputs agree under torch.set_default_dtype(float64)."""
    from fastvq.ops.residual_quantize import _normalised_weights_op

    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        w = torch.tensor([3e38, 1e-45, 0.0, 1.0], dtype=torch.float32)
        torch.library.opcheck(_normalised_weights_op._opoverload, (w, "residual_quantize_step", "weights"))
    finally:
        torch.set_default_dtype(previous)
