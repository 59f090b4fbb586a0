"""Every op, every tensor argument: a stride-2 or an expanded (stride 0) view gives what the same
values packed give, on both backends (probe finding P10: qr_lookup's launchers read the small
index tensors as packed vectors)."""

import pytest
import torch

import fastvq
from tests.utils import assert_close, generator, randn


def _ints(*shape, hi, seed):
    return torch.randint(0, hi, shape, generator=generator(seed))


# op name -> (function of the arguments, the arguments); every tensor among them is varied
CASES = {
    "nearest_code": (fastvq.nearest_code, lambda: [randn(7, 5, seed=1), randn(6, 5, seed=2)]),
    "topk_codes": (lambda x, c: fastvq.topk_codes(x, c, 2), lambda: [randn(7, 5, seed=1), randn(6, 5, seed=2)]),
    "sample_code": (lambda x, c: fastvq.sample_code(x, c, 1.0, seed=3),
                    lambda: [randn(7, 5, seed=1), randn(6, 5, seed=2)]),
    "mine_negatives": (fastvq.mine_negatives, lambda: [randn(7, 5, seed=1), randn(7, 5, seed=2), randn(6, 5, seed=3)]),
    "pairwise_sqdist": (fastvq.pairwise_sqdist, lambda: [randn(7, 5, seed=1), randn(6, 5, seed=2)]),
    "pairwise_kl_loss": (lambda p, t: fastvq.pairwise_kl_loss(p, t, 1.0), lambda: [randn(7, 5, seed=1), randn(7, 5, seed=2)]),
    "rotation_trick": (fastvq.rotation_trick, lambda: [randn(7, 5, seed=1), randn(7, 5, seed=2)]),
    "code_usage": (lambda i: fastvq.code_usage(i, 6), lambda: [_ints(9, hi=6, seed=1)]),
    "code_statistics": (lambda x, i, w: fastvq.code_statistics(x, i, 4, weights=w, return_skipped=True),
                        lambda: [randn(9, 5, seed=1), _ints(9, hi=4, seed=2), randn(9, seed=3).abs()]),
    "code_statistics_atomic": (lambda x, i, w: fastvq.code_statistics(x, i, 4, weights=w, deterministic=False),
                               lambda: [randn(9, 5, seed=1), _ints(9, hi=4, seed=2), randn(9, seed=3).abs()]),
    "residual_quantize": (fastvq.residual_quantize, lambda: [randn(7, 5, seed=1), randn(2, 4, 5, seed=2)]),
    "residual_quantize_step": (lambda x, c, w, k: fastvq.residual_quantize_step(x, c, weights=w, codes=k),
                               lambda: [randn(7, 5, seed=1), randn(2, 4, 5, seed=2), randn(7, seed=3).abs(),
                                        _ints(7, 2, hi=4, seed=4)]),
    "residual_decode": (fastvq.residual_decode, lambda: [_ints(7, 2, hi=4, seed=1), randn(2, 4, 5, seed=2)]),
    "semantic_ids": (fastvq.semantic_ids, lambda: [_ints(9, 2, hi=3, seed=1)]),
    "semantic_id_stats": (fastvq.semantic_id_stats, lambda: [_ints(9, 2, hi=3, seed=1)]),
    "to_bits": (lambda i: fastvq.to_bits(i, 3), lambda: [_ints(9, hi=8, seed=1)]),
    "to_decimal": (fastvq.to_decimal, lambda: [_ints(9, 3, hi=2, seed=1)]),
    "qr_lookup": (lambda i, q, r: fastvq.qr_lookup(i, q, r),
                  lambda: [_ints(9, hi=1000, seed=1), randn(5, 4, seed=2), randn(3, 4, seed=3)]),
    "qr_lookup_bags": (lambda i, q, r, o, w: fastvq.qr_lookup(i, q, r, offsets=o, per_sample_weights=w),
                       lambda: [_ints(9, hi=1000, seed=1), randn(5, 4, seed=2), randn(3, 4, seed=3),
                                torch.tensor([0, 2, 2, 6]), randn(9, seed=4)]),
}


def _stride2(t):
    """Same values, every dimension's stride doubled (a view into a twice-as-long buffer)."""
    big = torch.zeros(t.numel() * 2, dtype=t.dtype, device=t.device)
    big[::2] = t.reshape(-1)
    return big[::2].view(t.shape) if t.dim() <= 1 else big.view(*t.shape[:-1], 2 * t.shape[-1])[..., ::2]


def _expanded(t):
    """Stride 0 in the first dimension: row 0 repeated (offsets: kept sorted by repeating 0)."""
    return t[:1].expand(t.shape)


def _flat(out):
    if isinstance(out, torch.Tensor):
        return [out]
    return [t for o in out for t in _flat(o)] if isinstance(out, (tuple, list)) else []


@pytest.mark.parametrize("layout", ["stride2", "expanded"])
@pytest.mark.parametrize("name", list(CASES))
def test_strided_arguments_match_packed(backend, name, layout):
    fn, make = CASES[name]
    args = make()
    for i, a in enumerate(args):
        if a.numel() <= 1:
            continue
        view = _stride2(a) if layout == "stride2" else _expanded(a)
        assert not view.is_contiguous()
        packed = [*args[:i], view.contiguous(), *args[i + 1:]]
        varied = [*args[:i], view, *args[i + 1:]]
        want, got = _flat(fn(*packed)), _flat(fn(*varied))
        assert len(want) == len(got)
        for k, (g, w) in enumerate(zip(got, want)):
            msg = f"{name}: argument {i} {layout}, output {k}"
            if w.dtype.is_floating_point:  # BLAS may round differently on another layout (reference)
                assert_close(g, w, reduce_len=a.shape[-1], msg=msg)
            else:
                assert torch.equal(g, w), msg
