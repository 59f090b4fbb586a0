"""f2probe: the residual-quantization forward's EMA statistics (probe4 F2, the fix-up of commit
44b0d1b) probed on both backends, against float64 sums of the residuals as the forward forms them
(float32 chain, a row whose ``r - c`` overflows held at scale ``2^-E``) and against the reference.

The Triton fix-up itself held on every case tried (see the f2probe FINDINGS report: ~1,850
random cases, held rows, several levels, float16/bfloat16, weights, slots, the autotuner): the
first tests below keep some of those cases as coverage. The findings were written as
``xfail(strict=True)``; each fix removed its marker:

- S1 (op, both backends, fixed): ``residual_quantize_step`` scaled weights whose max is below
  1/2 *up* to ``[0.5, 1)`` before the statistics, so a weighted sum that is finite with the
  weights as given overflowed (+inf), and a module's EMA then kept that code where it should
  move (the statistics now carry the weights as given: the kernels take them beside the
  scaled ones);
- S2 (op, both backends, fixed): weights far below the largest scaled into float32's
  subnormals, and their statistics lost their precision (a count off by a third where a weight
  scaled to 1.5 * 2^-149);
- R1 (reference, fixed): ``residual_quantize_full_ref`` formed ``w r`` in float32 before its
  float64 sum, so a term beyond float32 was +-inf, and opposite ones gave NaN where Triton gave
  the exact sum;
- T1 (Triton, minor, fixed): a fixed-up sum at or just below float32's max (max - 1 ulp, exactly
  representable; or max + 2^102, which rounds to max) came out +inf, and one beyond it (max +
  1.875 ulps) came out max: the fix-up's float32 re-sum rounded at the boundary;
- T2 (Triton, forward and backward fix-ups, fixed): one power-of-two scale per code, from its
  largest term over all columns, underflowed the code's columns of small terms (to 0 with
  weights ~3e38). Both fix-ups now sum a code's terms in float64 and round once;
- K1 (the forward and backward launchers, fixed): strided weights were read as contiguous.
"""

import pytest
import torch

import fastvq
import fastvq.testing as ft
from tests.utils import backend_cells, generator, randn, two_config_autotuner

F32_MAX = torch.finfo(torch.float32).max
M = 3.0e38


def _chain64(x, cb, codes, w, stat_lim):
    """Float64 ``(sums, sum |terms|, counts, skipped)`` of ``w r_l`` over the rows each level
    counts, ``r_l`` formed as the forward forms it (float32; a row whose ``r - c`` overflows held
    at scale ``2^-E`` until it is representable again, and left out while held)."""
    N, D = x.shape
    L, K, _ = cb.shape
    E = L.bit_length()
    wide = 2.0**-E
    r = x.float()
    scaled = torch.zeros(N, dtype=torch.bool, device=x.device)
    w = torch.ones(N, device=x.device) if w is None else w.float()
    want = torch.zeros(L, K, D, dtype=torch.float64, device=x.device)
    mag = torch.zeros_like(want)
    counts = torch.zeros(L, K, dtype=torch.float64, device=x.device)
    skipped = []
    usable = (w != 0) & w.isfinite()
    for lvl in range(L):
        c = cb[lvl].float()[codes[:, lvl]]
        use = usable & (r.abs().amax(-1) < stat_lim) & ~scaled  # (NaN: not below)
        t = torch.where(use[:, None], w.double()[:, None] * r.double(), 0.0)
        want[lvl].index_add_(0, codes[:, lvl], t)
        mag[lvl].index_add_(0, codes[:, lvl], t.abs())
        counts[lvl].index_add_(0, codes[:, lvl], torch.where(use, w.double(), 0.0))
        skipped.append(int(((w != 0) & ~use).sum()))
        new = r - c * torch.where(scaled, wide, 1.0)[:, None]
        over = ~new.isfinite().all(-1) & r.isfinite().all(-1) & c.isfinite().all(-1)
        new, scaled = torch.where(over[:, None], r * wide - c * wide, new), scaled | over
        up = new * 2.0**E
        back = scaled & up.isfinite().all(-1)
        r, scaled = torch.where(back[:, None], up, new), scaled & ~back
    return want, mag, counts, skipped


def _fwd(backend, x, cb, chunked, **kw):
    from fastvq.kernels.residual_quantize import residual_quantize_fwd
    from fastvq.reference.residual_quantize import residual_quantize_full_ref

    if backend == "triton":
        return residual_quantize_fwd(x, cb, max_register_d=1 if chunked else None, stats=True, **kw)
    return residual_quantize_full_ref(x, cb, stats=True, **kw)


def _assert_stats(out, x, cb, codes, w, stat_lim):
    """Statistics against :func:`_chain64`: no NaN (no term is NaN), +-inf exactly where the float64
    sum rounds beyond float32, the rest within float32's rounding of N-term sums."""
    N = x.shape[0]
    want, mag, counts, skipped = _chain64(x, cb, codes, w, stat_lim)
    s = out["sums"]
    inf, ok = want.float().isinf(), want.float().isfinite()
    assert not s.isnan().any(), s.isnan().nonzero()
    assert torch.equal(s[inf], want[inf].float()), (s[inf], want[inf])
    ft.assert_close(s[ok], want[ok], dtype=torch.float32, reduce_len=N, magnitude=mag[ok], name="sums")
    ft.assert_close(out["counts"], counts, dtype=torch.float32, reduce_len=N, magnitude=counts.abs(), name="counts")
    assert out["skipped"].tolist() == skipped
    return want, mag


# ------------------------------------------------------------------ coverage (these pass)

@backend_cells("chunked", {"register": False}, {"chunked": True})
def test_fixup_with_marks_at_every_level_held_rows_and_non_finite_rows(backend, device, chunked):
    # L = 4 (E = 3), N = 45 over two 32-row programs: code 0 (zeros) of every level takes six
    # rows whose -+3e38 terms overflow on the way (exact sums 0, +-3e38 or +-6e38: the last is
    # +-inf); rows held at level 0 (3e38 - (-2e38)) that come back at level 1 (+3e38) and then
    # sum into an overflowing code; a NaN row and an inf row on a marked code; rows of weight 0
    N, L, K, D = 45, 4, 3, 6
    x = randn(N, D, seed=11, device=device)
    cb = randn(L, K, D, seed=12, device=device)
    codes = torch.randint(1, K, (N, L), generator=generator(13, device), device=device)
    cb[:, 0] = 0.0
    sign = torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, -1.0], device=device)
    for lvl in range(L):
        rows = torch.arange(lvl, N, 7, device=device)[:6]
        codes[rows, lvl] = 0
        x[rows, lvl] = M * sign
    x[torch.arange(1, N, 7, device=device)[:6], 4] = M  # level 1's code 0, column 4: 6 * 3e38: +inf
    held = torch.tensor([2, 16, 30, 44], device=device)  # 3e38 - (-2e38) held, + (-3e38)... back at 2e38
    cb[0, 1, 5], cb[1, 1, 5] = -2.0e38, 3.0e38
    codes[held, 0], codes[held, 1], codes[held, 2] = 1, 1, 0
    x[held, 5] = M
    x[9, 2], x[23, 3] = float("nan"), float("inf")
    codes[9, 0], codes[23, 0] = 0, 0
    w = torch.rand(N, generator=generator(14, device), device=device) * 0.5 + 0.5
    w[7], w[21] = 0.0, 0.0
    lim = float(F32_MAX)
    out = _fwd(backend, x, cb, chunked, weights=w, codes=codes, stat_limit=lim)
    want, mag = _assert_stats(out, x, cb, codes, w, lim)
    assert ((mag > F32_MAX) & want.float().isfinite()).sum() >= 4 and want.float().isinf().any()  # (the case)


@pytest.mark.parametrize("chunked", [False, True], ids=["register", "chunked"])
def test_fixup_float16_codebooks_with_weights_beyond_float32(device, chunked):
    # float16 codebooks (stat_limit 65504) and weights ~1e34 through the kernel's own API: each term
    # w r (~6e38) overflows float32 though the sums over a code are finite (the fix-up's float64
    # terms), or exactly +-inf; searched codes
    from fastvq.kernels.residual_quantize import residual_quantize_fwd

    N, L, K, D = 37, 2, 3, 5
    x = randn(N, D, seed=21, device=device)
    cb = randn(L, K, D, seed=22, device=device)
    cb[0, 0] = 0.0
    cb[0, 0, 0] = 20.0  # rows (20, +-59000, 0, ..) pick code 0: the others have no column 1
    cb[0, 1:, 1] = 0.0
    rows = torch.tensor([0, 9, 18, 27, 36, 1], device=device)
    x[rows] = 0.0
    x[rows, 1] = 59000.0 * torch.tensor([1.0, 1.0, -1.0, -1.0, 1.0, -1.0], device=device)
    x[rows, 0] = 20.0
    w = torch.ones(N, device=device)
    w[rows] = torch.tensor([1.0, 1.0, 1.0, 1.0, 2.0, 2.5], device=device) * 1e34  # sum: -0.5 * 5.9e38
    x, cb = x.half(), cb.half()
    out = residual_quantize_fwd(x, cb, max_register_d=1 if chunked else None, weights=w, stats=True,
                                stat_limit=65504.0)
    assert (out["codes"][rows, 0] == 0).all()
    want, mag = _assert_stats(out, x, cb, out["codes"], w, 65504.0)
    assert mag[0, 0, 1] > 3e39 and want[0, 0, 1].float().isfinite()  # (overflow on the way only)


@pytest.mark.parametrize("chunked", [False, True], ids=["register", "chunked"])
def test_fixup_under_the_autotuners_timed_launches(monkeypatch, device, chunked):
    # as test_autotuning_does_not_add_its_timed_launches_to_the_statistics, on rows whose sums
    # overflow on the way: each timed launch runs the fix-up on zeroed state; the counted one
    # gives the untuned launch's statistics
    from fastvq.kernels import residual_quantize as rq

    name = "_residual_quantize_fwd_chunked_kernel" if chunked else "_residual_quantize_fwd_kernel"
    x = randn(37, 6, seed=31, device=device)
    cb = randn(2, 5, 6, seed=32, device=device)
    codes = torch.randint(1, 5, (37, 2), generator=generator(33, device), device=device)
    rows = torch.arange(0, 37, 5, device=device)[:8]
    codes[rows, 0] = 0
    x[rows, 0] = M * torch.tensor([1.0, 1.0, 1.0, -1.0, -1.0, -1.0, 1.0, -1.0], device=device)
    x[3, 1] = float("inf")
    kw = dict(max_register_d=1 if chunked else None, stats=True, codes=codes)
    want = rq.residual_quantize_fwd(x, cb, **kw)
    timed = two_config_autotuner(monkeypatch, rq, name)
    got = rq.residual_quantize_fwd(x, cb, **kw)
    assert len(timed) == 2
    for key in ("counts", "sums", "skipped"):
        assert torch.equal(got[key], want[key]), key
    _assert_stats(got, x, cb, codes, None, float(F32_MAX))


@pytest.mark.parametrize("module", ["vq", "rq"])
def test_ema_modules_train_a_step_on_rows_whose_sums_overflow_on_the_way(backend, device, module):
    # code 0 (zeros) takes 8 rows of -+3e38 in column 0 and two of 1e38 (exact sum 2e38, float32
    # partial sums overflow): one training step moves it, finite, on both backends alike
    K, D = 2, 3
    if module == "vq":
        mod = fastvq.nn.VectorQuantizer(K, D, ema=True).to(device)
        weight = mod.embeddings.weight
    else:
        mod = fastvq.nn.ResidualQuantizer(2, K, D, ema=True).to(device)
        weight = mod.codebooks
    init = torch.tensor([[0.0, 0.0, 0.0], [0.0, 10.0, 10.0]], device=device)
    weight.data.copy_(init.expand_as(weight))
    mod.embed_avg.copy_(init.expand_as(mod.embed_avg))
    N = 40
    x = torch.zeros(N, D, device=device)
    x[:, 1:] = 10.0 + randn(N, 2, seed=41, device=device)
    rows = torch.arange(0, N, 4, device=device)
    x[rows] = 0.0
    x[rows, 0] = torch.tensor([M, M, M, -M, -M, -M, M, -M, 1e38, 1e38], device=device)
    mod.train()
    mod(x)
    after = weight.data.reshape(-1, K, D)
    assert after.isfinite().all()
    # exact: embed_avg = 0.01 * 2e38; cluster_size = 0.01 * 10; smoothed ~ that count
    assert 1e37 < float(after[0, 0, 0]) < 4e37, after[0, 0]


# ------------------------------------------------------------------ findings (written as strict xfails, fixed)

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@backend_cells("chunked", {"register": False}, {"chunked": True})
def test_r1_weighted_terms_beyond_float32_are_summed_exactly(backend, device, dtype, chunked):
    """R1: the kernel's API takes any float32 weights. Terms ``w r`` beyond float32 whose sum is
    not: float32 rows 3e38, 3e38, -3e38 at weights 2, 1, 2 (sum 3e38; the second column 3e38,
    -3e38, 1: 3e38 + 2); float16 rows 6e4, 6e4, -6e4 at 1e34, 5e33, 1e34 (sum 3e38). Triton (the fix-up's
    float64 terms) gives them; the reference forms ``w[:, None] * r`` in float32 (inf) before its
    float64 sum: NaN (inf - inf) or inf."""
    if dtype == torch.float32:
        x = torch.tensor([[M, M], [M, -M], [-M, 1.0]], device=device)
        w = torch.tensor([2.0, 1.0, 2.0], device=device)
    else:
        x = torch.tensor([[6e4, 1.0], [6e4, 1.0], [-6e4, 1.0]], device=device)
        w = torch.tensor([1e34, 5e33, 1e34], device=device)
    w64 = w.double()
    x = x.to(dtype)
    cb = torch.zeros(1, 1, 2, dtype=dtype, device=device)
    codes = torch.zeros(3, 1, dtype=torch.int64, device=device)
    lim = float(torch.finfo(dtype).max)
    out = _fwd(backend, x, cb, chunked, weights=w, codes=codes, stat_limit=lim)
    want = (w64[:, None] * x.double()).sum(0)
    assert want.float().isfinite().all()
    assert not out["sums"].isnan().any() and out["sums"].isfinite().all(), out["sums"]
    _assert_stats(out, x, cb, codes, w, lim)


def test_r1_step_weights_beyond_2p127_give_no_nan_statistics(backend, device):
    """R1 on the op's path: weights >= 2^127 are scaled into [1, 2) (not [0.5, 1): their scale-back
    would be inf), so ``w r`` of a row of 3e38 is beyond float32. Rows 3e38 and -3e38 at weight
    1.5 * 2^127 each on one code: the exact sum is 0 (as given and scaled). Triton: 0; the
    reference: NaN (its float32 terms +inf and -inf)."""
    w = torch.tensor([1.5 * 2.0**127, 1.5 * 2.0**127, 1.0], device=device)
    x = torch.tensor([[M, 0.0], [-M, 0.0], [0.0, 100.0]], device=device)
    cb = torch.zeros(1, 2, 2, device=device)
    cb[0, 1, 1] = 100.0
    out = fastvq.residual_quantize_step(x, cb, weights=w, statistics=True)
    assert out.codes.flatten().tolist() == [0, 0, 1]
    assert out.sums[0, 0].tolist() == [0.0, 0.0], out.sums[0, 0]


@pytest.mark.parametrize("scale", [0.25, 1e-30], ids=["quarter", "tiny"])
def test_s1_step_statistics_with_small_weights_are_finite(backend, device, scale):
    """Rows 3e38, 3e38, 3e38 (column 0) on code 0 at weight 0.25 each: the statistics as given are
    2.25e38 (finite). The op scales the weights by 2 (max into [0.5, 1)): 4.5e38, +inf, scaled
    back: +inf. At weight 1e-30 (two rows: 6e8 as given) the scale is 2^99: +inf too."""
    n = 3 if scale == 0.25 else 2
    x = torch.zeros(n + 1, 2, device=device)
    x[:n, 0] = M
    x[n] = torch.tensor([0.0, 100.0], device=device)
    cb = torch.zeros(1, 2, 2, device=device)
    cb[0, 1, 1] = 100.0
    w = torch.full((n + 1,), scale, device=device)
    out = fastvq.residual_quantize_step(x, cb, weights=w, statistics=True)
    assert out.codes.flatten().tolist() == [0] * n + [1]
    want = (w.double()[:, None] * x.double())[:n].sum(0)
    assert want.float().isfinite().all()
    ft.assert_close(out.sums[0, 0], want, dtype=torch.float32, reduce_len=n + 1, magnitude=want.abs(), name="sums")


@pytest.mark.parametrize("module", ["vq", "rq"])
def test_s1_ema_module_with_small_mask_weights_moves_the_code(backend, device, module):
    """Rows 3e38, 3e38, 1e38 on code 0 and one row on code 1, mask 0.25 each: exact batch sums
    of code 0 are 1.75e38 (finite), so one step with decay 0.99 from zero EMA state moves code 0
    to ~2.3e38 (the rows' mean); with the overflowing sums it stays where its EMA state puts it (0)."""
    K, D = 2, 2
    if module == "vq":
        mod = fastvq.nn.VectorQuantizer(K, D, ema=True).to(device)
        weight = mod.embeddings.weight
    else:
        mod = fastvq.nn.ResidualQuantizer(1, K, D, ema=True).to(device)
        weight = mod.codebooks
    init = torch.tensor([[0.0, 0.0], [0.0, 100.0]], device=device)
    weight.data.copy_(init.expand_as(weight))
    mod.embed_avg.copy_(init.expand_as(mod.embed_avg))
    x = torch.tensor([[M, 0.0], [M, 0.0], [1e38, 0.0], [0.0, 100.0]], device=device)
    mask = torch.full((4,), 0.25, device=device)
    mod.train()
    mod(x, mask=mask)
    code0 = weight.data.reshape(-1, K, D)[0, 0]
    assert 2e38 < float(code0[0]) < 2.6e38, code0


def test_s2_step_statistics_keep_small_weights_as_given(backend, device):
    """Weights 2^126 and 1.5 * 2^-22 (a ratio of 1.5 * 2^-148; scaled: 0.5 and 1.5 * 2^-149, a tie
    that rounds to 2^-148): the count of the small row's code comes back 2^-21 = 4.77e-7 for
    3.58e-7, its sum likewise; "the statistics use them as given"."""
    w = torch.tensor([2.0**126, 1.5 * 2.0**-22], device=device)
    x = torch.tensor([[0.0, 0.0], [1.0, 100.0]], device=device)
    cb = torch.zeros(1, 2, 2, device=device)
    cb[0, 1] = torch.tensor([1.0, 100.0], device=device)
    out = fastvq.residual_quantize_step(x, cb, weights=w, statistics=True)
    assert out.codes.flatten().tolist() == [0, 1]
    ft.assert_close(out.counts[0], w.double(), dtype=torch.float32, reduce_len=2, magnitude=w.double(), name="counts")
    ft.assert_close(out.sums[0, 1], w.double()[1] * x.double()[1], dtype=torch.float32, reduce_len=2,
                    magnitude=w.double()[1] * x.double()[1].abs(), name="sums")


@pytest.mark.parametrize("case", ["half-ulp", "one-ulp-below", "overflows"])
@backend_cells("chunked", {"register": False}, {"chunked": True})
def test_t1_fixed_up_sum_at_the_float32_max_rounds_as_the_exact_one(backend, device, chunked, case):
    """T1: "half-ulp": terms max, 2^103, -2^102 on one code, exactly max + 2^102, under half an ulp
    (2^103) beyond max: it rounds to max (the reference: max). "one-ulp-below": terms max, 2^127,
    -2^127, -2^103, -2^103, exactly max - 2^104, a float32 value one ulp below max. Both: the
    float32 atomics overflow, the code is marked, the fix-up re-sums its terms scaled by 2^-s
    (s = 4 here) in float32, whose rounding reaches 2^(128-s), and scales back: +inf. The other
    way, "overflows": terms max, -2^103, max, -(max - 2^104), 1.375 * 2^104, exactly max +
    1.875 ulps (beyond float32: +inf, the reference's too), come back max. (The quantized sum's
    _exact_code_sum, float64, gets such sums right.)"""
    if case == "half-ulp":
        terms = [F32_MAX, 2.0**103, -(2.0**102)]
    elif case == "overflows":
        terms = [F32_MAX, -(2.0**103), F32_MAX, -(F32_MAX - 2.0**104), 11 * 2.0**101]
    else:
        terms = [F32_MAX, 2.0**127, -(2.0**127), -(2.0**103), -(2.0**103)]
    x = torch.tensor(terms, device=device)[:, None]
    cb = torch.zeros(1, 1, 1, device=device)
    codes = torch.zeros(len(terms), 1, dtype=torch.int64, device=device)
    out = _fwd(backend, x, cb, chunked, codes=codes)
    want = x.double().sum().float()
    assert want.isfinite() == (case != "overflows")
    assert out["sums"].item() == want.item(), out["sums"]


@backend_cells("chunked", {"register": False}, {"chunked": True})
def test_t2_fixed_up_code_keeps_its_small_columns(backend, device, chunked):
    """T2: the fix-up scales a marked code's whole row by one power of two, from its largest term
    over all D columns; a column of small terms beside a column of huge ones is scaled into
    float32's subnormals and loses its bits. Through the kernel's API (weights as given): column
    0's terms 9e76 (weights 3e38; its sum is +inf either way) set the scale 2^-132, and column 1's
    terms 1e-6 and 2e-6 (weight 1) become 0: its sum is 0 for 3e-6. Found by a random probe
    (bfloat16, weights up to 3e38: a column's sum 3.37988 for 3.37977). On the op's path (weights
    below 2) the scale is at most ~2^(130 - TOP): only terms below ~2^(TOP - 256) lose bits."""
    x = torch.tensor([[M, 0.0], [M, 0.0], [0.0, 1e-6], [0.0, 2e-6]], device=device)
    w = torch.tensor([3e38, 3e38, 1.0, 1.0], device=device)
    cb = torch.zeros(1, 1, 2, device=device)
    codes = torch.zeros(4, 1, dtype=torch.int64, device=device)
    out = _fwd(backend, x, cb, chunked, codes=codes, weights=w)
    t = w.double()[:, None] * x.double()
    assert out["sums"][0, 0, 0].item() == float("inf")  # (1.8e77: beyond float32)
    ft.assert_close(out["sums"][0, 0, 1:], t.sum(0)[1:], dtype=torch.float32, reduce_len=4,
                    magnitude=t.abs().sum(0)[1:], name="the small column's sum")


@pytest.mark.parametrize("chunked", [False, True], ids=["register", "chunked"])
def test_k1_kernel_launcher_strided_weights(device, chunked):
    """K1 (the kernel's API only: the op always passes a fresh contiguous tensor): weights
    ``big[::2]`` (stride 2) are read as ``big[:N]``: counts off by O(1). The launcher asserts the
    weights' shape and dtype, not their stride (and the forward kernel takes no weight stride)."""
    from fastvq.kernels.residual_quantize import residual_quantize_fwd
    from fastvq.reference.residual_quantize import residual_quantize_full_ref

    x = randn(40, 3, seed=51, device=device)
    cb = randn(2, 3, 3, seed=52, device=device)
    w = torch.rand(80, generator=generator(53, device), device=device)[::2]
    out = residual_quantize_fwd(x, cb, max_register_d=1 if chunked else None, weights=w, stats=True)
    ref = residual_quantize_full_ref(x, cb, weights=w, codes=out["codes"], stats=True)
    torch.testing.assert_close(out["counts"], ref["counts"], rtol=1e-5, atol=1e-5)


def test_t2_backward_fixed_up_code_keeps_its_small_columns(backend, device):
    """T2 in the backward's _dcb_fixup (the same _fix_terms scale): terms 2 ge w (c - r) of
    column 0 ~9e76 (weights 3e38), column 1's -1e-6 and -2e-6 (weight 1): Triton 0, the reference
    and float64 -3e-6."""
    from fastvq.kernels.residual_quantize import residual_quantize_bwd
    from fastvq.reference.residual_quantize import residual_quantize_bwd_ref

    x = torch.tensor([[M, 0.0], [M, 0.0], [0.0, 1e-6], [0.0, 2e-6]], device=device)
    w = torch.tensor([3e38, 3e38, 1.0, 1.0], device=device)
    cb = torch.zeros(1, 1, 2, device=device)
    codes = torch.zeros(4, 1, dtype=torch.int64, device=device)
    ge = torch.tensor([0.5], device=device)
    bwd = residual_quantize_bwd if backend == "triton" else residual_quantize_bwd_ref
    _, dcb = bwd(x, cb, codes, weights=w, grad_embed=ge, need_dx=False)
    t = w.double()[:, None] * (cb.double()[0, 0] - x.double())
    assert dcb[0, 0, 0].item() == float("-inf")
    ft.assert_close(dcb[0, 0, 1:], t.sum(0)[1:], dtype=torch.float32, reduce_len=4, magnitude=t.abs().sum(0)[1:],
                    name="the small column's gradient")


def test_k1_backward_launcher_strided_weights(device):
    """K1 in ``residual_quantize_bwd``: the same ``p_w + row`` load; the codebook gradient of
    weights ``big[::2]`` is off by O(1) against the reference."""
    from fastvq.kernels.residual_quantize import residual_quantize_bwd
    from fastvq.reference.residual_quantize import residual_quantize_bwd_ref

    x = randn(40, 3, seed=54, device=device)
    cb = randn(2, 3, 3, seed=55, device=device)
    codes = torch.randint(0, 3, (40, 2), generator=generator(56, device), device=device)
    w = torch.rand(80, generator=generator(57, device), device=device)[::2]
    ge = torch.ones(2, device=device)
    _, dcb = residual_quantize_bwd(x, cb, codes, weights=w, grad_embed=ge, need_dx=False)
    _, ref = residual_quantize_bwd_ref(x, cb, codes, weights=w, grad_embed=ge, need_dx=False)
    torch.testing.assert_close(dcb, ref, rtol=1e-5, atol=1e-5)
