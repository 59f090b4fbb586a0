import pytest
import torch

import fastvq
import fastvq.testing as ft
from tests.utils import assert_close, count_kernel_launches, generator, noncontiguous, randn

METRICS = ["l2", "cosine", "dot"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]

CASES = [  # (N, K, D)
    pytest.param(1, 1, 1, id="N1-K1-D1"),
    pytest.param(5, 7, 2, id="N5-K7-D2"),
    pytest.param(127, 61, 60, id="N127-K61-D60"),
    pytest.param(33, 100, 100, id="N33-K100-D100"),
    pytest.param(3, 1000, 8, id="N3-K1000-D8-split"),  # small N, large K: the split-codebook path
    pytest.param(9, 37, 300, id="N9-K37-D300-streamD"),  # D > RESIDENT_MAX_D: x streamed in chunks
    pytest.param(0, 9, 16, id="N0"),
    pytest.param(40, 96, 32, id="N40-K96-D32-even"),  # whole code tiles, D == BLOCK_D: the unmasked path
]


def _check_nearest(x, c, metric, idx, dist):
    """The chosen code is the float64 nearest up to what the kernel's rounding explains
    (:func:`fastvq.testing.assert_argmin_within_bound`), and the returned distance is the float64
    distance at the chosen index within its rounding bound (:func:`fastvq.testing.error_bound`
    with that distance's sum of ``|terms|``): one oracle and one criterion, fastvq.testing's."""
    K = c.shape[0]
    assert idx.dtype == torch.int64 and dist.dtype == torch.float32
    assert idx.shape == x.shape[:-1] and dist.shape == x.shape[:-1]
    assert ((idx >= 0) & (idx < K)).all(), "index out of range"
    assert not dist.isnan().any(), "unwritten output element"
    if idx.numel() == 0:
        return
    precision = ft.search_precision(x.dtype)
    ft.assert_argmin_within_bound(x, c, idx, metric, precision)
    d64, mag, n = ft.distances64(x, c, metric)
    chosen = d64.gather(-1, idx[..., None]).squeeze(-1)
    ft.assert_close(dist, chosen, dtype=x.dtype, reduce_len=n, magnitude=mag.gather(-1, idx[..., None]).squeeze(-1),
                    precision=precision, out_dtype=torch.float32, name="distance at the chosen code")
    if metric == "l2":
        assert (dist >= 0).all()
    if metric == "cosine":
        assert ((dist >= 0) & (dist <= 2)).all()


@pytest.mark.parametrize("N,K,D", CASES)
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_parity(backend, N, K, D, metric, dtype):
    x, c = randn(N, D, dtype=dtype), randn(K, D, dtype=dtype)
    idx, dist = fastvq.nearest_code(x, c, metric)
    _check_nearest(x, c, metric, idx, dist)


def _int_codebook(K, D, seed=0):
    g = generator(seed)
    return torch.randint(-4, 5, (K, D), generator=g).float()


@pytest.mark.parametrize("metric", METRICS)
def test_exact_ties_pick_smallest_index(backend, metric):
    # Integer values: every dot product is exact in fp32, so duplicated codes tie exactly.
    # Duplicates inside one 32-code tile (3, 7), across tiles (40, 70) and in the last tile (199).
    K, D = 200, 12
    c = _int_codebook(K, D)
    target = torch.tensor([3.0, -2, 1, 4, 0, 1, -1, 2, 3, -3, 1, 2])
    # dot: 2*target has <x, c> = 100 > 4 * |target|_1 = 92, the most any other code reaches
    code = 2 * target if metric == "dot" else target
    for j in (199, 70, 40, 7, 3):
        c[j] = code
    x = target.expand(3, D)  # stride 0 rows, too
    idx, dist = fastvq.nearest_code(x, c, metric)
    assert idx.tolist() == [3, 3, 3]
    _check_nearest(x, c, metric, idx, dist)
    # and the duplicate that comes first wins even when it is not the first one written
    c[3] = -code
    idx, _ = fastvq.nearest_code(x, c, metric)
    assert idx.tolist() == [7, 7, 7]


def test_equidistant_distinct_codes_tie_to_smallest(backend):
    # x = 0; codes 5, 37, 180 are distinct permutations of one integer vector (same norm).
    c = _int_codebook(200, 6, seed=1) + 10.0  # all far away
    v = torch.tensor([1.0, 2, 0, 0, -1, 0])
    c[180], c[37], c[5] = v, v.roll(2), v.flip(0)
    x = torch.zeros(4, 6)
    for metric in ("l2", "dot"):
        idx, _ = fastvq.nearest_code(x, c, metric)
        assert idx.tolist() == ([5] * 4 if metric == "l2" else [0] * 4)  # dot: all 0, first code


@pytest.mark.parametrize("splits_min_codes", [32, 64])
def test_split_codebook_path(backend, monkeypatch, splits_min_codes, device):
    import fastvq.kernels.nearest_code as knc

    monkeypatch.setattr(knc, "SPLIT_MIN_CODES", splits_min_codes)
    N, K, D = 2, 700, 20
    assert knc.num_splits(N, K, torch.device(device)) > 2
    # Integer values (exact dot products): duplicates in different splits tie exactly.
    c = _int_codebook(K, D, seed=4)
    c[650] = c[333] = c[64]
    x = torch.stack([c[64] + 0.25, randn(D)])
    for metric in METRICS:
        idx, dist = fastvq.nearest_code(x, c, metric)
        _check_nearest(x, c, metric, idx, dist)
        if metric != "dot":
            assert idx[0].item() == 64


@pytest.mark.parametrize("K", [100, 128], ids=["K100", "K128-even"])
@pytest.mark.parametrize("splits", [1, 2, 7, 40])
def test_launcher_forced_splits(splits, K):
    # 7 and 40 splits of 100 codes leave empty splits (4 tiles of 32 under the interpreter);
    # K = 128: whole tiles, the unmasked path, split too.
    from fastvq.kernels.nearest_code import mine_negatives_fwd, nearest_code_fwd

    x, c = randn(17, 24), _int_codebook(K, 24, seed=5)
    c[90] = c[10]  # integer values: an exact tie across tiles / splits
    x[0] = c[10]
    for metric in METRICS:
        idx, dist = nearest_code_fwd(x, c, metric, splits=splits)
        _check_nearest(x, c, metric, idx, dist)
        if metric != "dot":
            assert idx[0].item() == 10
    a, p = randn(17, 24), randn(17, 24)
    ref = fastvq.reference.mine_negatives.mine_negatives_ref(a, p, c, "semi-hard")
    got = mine_negatives_fwd(a, p, c, "semi-hard", splits=splits)
    assert torch.equal(got[0], ref[0])
    assert_close(got[1], ref[1], torch.float32, 24)


def test_batch_dims(backend):
    x, c = randn(2, 3, 5, 16), randn(11, 16)
    for metric in METRICS:
        idx, dist = fastvq.nearest_code(x, c, metric)
        assert idx.shape == (2, 3, 5) and dist.shape == (2, 3, 5)
        _check_nearest(x, c, metric, idx, dist)
        flat_idx, flat_dist = fastvq.nearest_code(x.reshape(-1, 16), c, metric)
        assert torch.equal(idx.reshape(-1), flat_idx)


def test_noncontiguous(backend):
    x, c = randn(20, 12), randn(45, 12)
    x_nc, c_nc = noncontiguous(x), c.T.contiguous().T  # stride 2 along D; column-major codebook
    assert not x_nc.is_contiguous() and not c_nc.is_contiguous()
    xb = randn(4, 6, 12).transpose(0, 1)  # batch dims not viewable as rows
    for metric in METRICS:
        idx, dist = fastvq.nearest_code(x_nc, c_nc, metric)
        _check_nearest(x, c, metric, idx, dist)
        ref_idx, _ = fastvq.nearest_code(x.contiguous(), c.contiguous(), metric)
        assert torch.equal(idx, ref_idx)
        idx_b, dist_b = fastvq.nearest_code(xb, c_nc, metric)
        _check_nearest(xb, c, metric, idx_b, dist_b)


def test_mixed_dtypes_promote(backend):
    x, c = randn(9, 8, dtype=torch.bfloat16), randn(13, 8, dtype=torch.float16)
    idx, dist = fastvq.nearest_code(x, c)
    _check_nearest(x.float(), c.float(), "l2", idx, dist)
    idx2, _ = fastvq.nearest_code(randn(9, 8, dtype=torch.float16), c.float())
    assert idx2.shape == (9,)


def test_k1_and_d1(backend):
    x = randn(6, 1)
    idx, dist = fastvq.nearest_code(x, randn(1, 1))
    assert idx.tolist() == [0] * 6
    c = torch.tensor([[-2.0], [0.5], [3.0]])
    idx, dist = fastvq.nearest_code(torch.tensor([[-1.9], [0.4], [2.0], [100.0]]), c)
    assert idx.tolist() == [0, 1, 2, 2]
    assert_close(dist, torch.tensor([0.01, 0.01, 1.0, 97.0**2]), torch.float32)


def test_cosine_zero_vectors(backend):
    c = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    x = torch.tensor([[0.0, 0.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 5.0, 0.0]])
    idx, dist = fastvq.nearest_code(x, c, "cosine")
    # zero x: cosine 0 with every code, distance 1, tie -> index 0;
    # x = -e0: the zero code (distance 1) beats e0 (distance 2) and ties with 2e1 (distance 1) -> 0;
    # x = 5 e1: 2 e1 at distance 0.
    assert idx.tolist() == [0, 0, 2]
    assert_close(dist, torch.tensor([1.0, 1.0, 0.0]), torch.float32)


def test_dot_is_max_inner_product(backend):
    x, c = randn(10, 16), randn(50, 16)
    idx, dist = fastvq.nearest_code(x, c, "dot")
    assert torch.equal(idx, (x.double() @ c.double().T).argmax(1))
    assert_close(dist, -(x.double() @ c.double().T).max(1).values, torch.float32, 16)


def test_l2_never_negative_on_identical_rows(backend):
    c = randn(30, 33, scale=100.0)
    idx, dist = fastvq.nearest_code(c, c)
    assert torch.equal(idx, torch.arange(30))
    assert (dist >= 0).all() and (dist.double() <= 1e-5 * (c.double() ** 2).sum(-1)).all()


def test_allow_tf32_runs(backend):
    x, c = randn(8, 16), randn(20, 16)
    idx, dist = fastvq.nearest_code(x, c, allow_tf32=True)
    _check_nearest(x, c, "l2", idx, dist)


def test_nan_inputs_keep_indices_in_range(backend):
    x, c = randn(6, 8), randn(40, 8)
    x[1, 3] = float("nan")
    x[2] = float("nan")
    c[5] = float("nan")  # a NaN code never wins
    ok_rows, ok_codes = torch.tensor([0, 3, 4, 5]), torch.arange(40) != 5
    for metric in METRICS:
        idx, dist = fastvq.nearest_code(x, c, metric)
        assert ((idx >= 0) & (idx < 40)).all()
        assert (idx != 5).all()
        assert idx[1].item() == 0 and idx[2].item() == 0  # rows with no finite distance
        kept = idx[ok_rows] - (idx[ok_rows] > 5).long()  # index into c without code 5
        _check_nearest(x[ok_rows], c[ok_codes], metric, kept, dist[ok_rows])
    idx, _ = fastvq.nearest_code(x, torch.full((7, 8), float("nan")))
    assert idx.tolist() == [0] * 6


def test_backends_agree_exactly_on_integer_data():
    x, c = _int_codebook(50, 10, seed=2), _int_codebook(300, 10, seed=3)
    for metric in METRICS:
        with fastvq.backend("reference"):
            ref = fastvq.nearest_code(x, c, metric)
        with fastvq.backend("triton"):
            got = fastvq.nearest_code(x, c, metric)
        assert torch.equal(got[0], ref[0]), metric
        assert_close(got[1], ref[1], torch.float32, 10)


def test_requires_grad_inputs_give_outputs_without_grad(backend):
    x, c = randn(5, 4).requires_grad_(), randn(9, 4).requires_grad_()
    idx, dist = fastvq.nearest_code(x, c)
    assert not idx.requires_grad and not dist.requires_grad
    _check_nearest(x.detach(), c.detach(), "l2", idx, dist)


@pytest.mark.parametrize("lead", [(3,), (2, 0), (0,)], ids=["N3", "batch-empty", "N0"])
def test_zero_feature_dim(backend, lead):
    # D = 0: every code is at distance 0 (cosine: zero vectors, distance 1); a tie -> index 0.
    # x.reshape(-1, 0) is ambiguous in torch, so this used to raise a RuntimeError from inside.
    x, c = torch.empty(*lead, 0), torch.empty(5, 0)
    for metric, d in (("l2", 0.0), ("cosine", 1.0), ("dot", 0.0)):
        idx, dist = fastvq.nearest_code(x, c, metric)
        assert idx.shape == lead and dist.shape == lead
        assert (idx == 0).all() and (dist == d).all(), metric


@pytest.mark.parametrize("metric", METRICS)
def test_triton_backend_really_launches_the_kernel(monkeypatch, metric):
    import fastvq.kernels.nearest_code as knc

    calls = []
    real = knc.nearest_code_fwd
    monkeypatch.setattr(knc, "nearest_code_fwd", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, c = randn(4, 3, 8), randn(9, 8)
    with fastvq.backend("reference"):
        fastvq.nearest_code(x, c, metric)
    assert calls == []
    with fastvq.backend("triton"):
        idx, dist = fastvq.nearest_code(x, c, metric)
    assert calls == [1]
    _check_nearest(x, c, metric, idx, dist)


def test_prune_configs_fit_the_target():
    import triton

    from fastvq.kernels import _common
    from fastvq.kernels.nearest_code import CONFIGS_16BIT, CONFIGS_16BIT_SAMPLE, CONFIGS_FP32, _estimate, _prune_configs

    def key(c):
        return (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)

    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
               for bn, bk, w, s in dict.fromkeys(CONFIGS_16BIT_SAMPLE + CONFIGS_FP32)]
    x32, x16 = torch.empty(1, 256), torch.empty(1, 256, dtype=torch.bfloat16)
    for target in _common.TARGETS:
        with _common.compile_target(target) as tgt:
            for x in (x32, x16):
                for kw in (dict(BLOCK_D=256, ONE_D_BLOCK=True), dict(BLOCK_D=64, ONE_D_BLOCK=True),
                           dict(BLOCK_D=256, ONE_D_BLOCK=True, HAS_LOWER_BOUND=True),
                           dict(BLOCK_D=64, ONE_D_BLOCK=True, SAMPLE=True),
                           dict(BLOCK_D=256, ONE_D_BLOCK=True, SAMPLE=True), dict(BLOCK_D=64, ONE_D_BLOCK=False)):
                    own = CONFIGS_FP32 if x is x32 else CONFIGS_16BIT_SAMPLE if kw.get("SAMPLE") else CONFIGS_16BIT
                    kept = _prune_configs(configs, {"p_x": x}, **kw)
                    # the input's own list, and of it exactly what the estimate says fits the target
                    assert kept and {key(c) for c in kept} <= set(own), (target, kw)
                    fits = [c for c in configs if key(c) in own
                            and _common.fits_target(tgt, **_estimate(c, {"p_x": x}, **kw))]
                    assert kept == (fits or kept), (target, kw)
            # the 128 x 128 three-stage tiles at bf16 D = 256 need 256 KiB on sm_90 (issue 8)
            kept = _prune_configs(configs, {"p_x": x16}, BLOCK_D=256, ONE_D_BLOCK=True)
            assert not any(key(c)[:2] == (128, 128) and c.num_stages == 3 for c in kept)
            # the 64 x 64 two-stage tile (98 KiB of shared memory) is kept; since the per-code l2
            # units of issue 9 it needs ~230 registers, so on sm_90 only its 8-warp form fits
            # (one block per SM by registers: the two-blocks-per-SM overlap is lost there)
            assert (64, 64, 8, 2) in map(key, kept)
            # bf16 sampling at D = 256: no 64-row tile fits (64 x 32 at 8 warps spilled at 255
            # registers with triton 3.6); sampling's own 32-row tile does
            kept = _prune_configs(configs, {"p_x": x16}, BLOCK_D=256, ONE_D_BLOCK=True, SAMPLE=True)
            assert [key(c) for c in kept] == [(32, 32, 8, 2)], (target, [key(c) for c in kept])
    # sm_90 shared memory as compiled: the x tile plus num_stages codebook tiles (wgmma)
    with _common.compile_target("sm_90"):
        est = _estimate(triton.Config({"BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3), {"p_x": x16},
                        BLOCK_D=256, ONE_D_BLOCK=True)
        assert est["shared"] >= (128 + 3 * 128) * 256 * 2 > _common.TARGETS["sm_90"].smem
    # nothing fits: one config of the input's list is kept (the autotuner needs one)
    kept = _prune_configs(configs, {"p_x": torch.empty(1, 4096)}, BLOCK_D=4096, ONE_D_BLOCK=True)
    assert len(kept) == 1 and key(kept[0]) in CONFIGS_FP32


def test_tf32x3_prune_reads_the_launch_alignment():
    """float32 "tf32x3" tiles are listed per layout: a launch whose loads cannot vectorise (row
    strides not divisible by 16, a base pointer off 16 bytes) takes the unaligned list (on sm_90
    at D = 64 the 64 x 64 and 128 x 32 tiles spilled there), and the mma.sync fallback tile is
    kept only where no wgmma tile fits (sm_80, unaligned)."""
    import triton

    from fastvq.kernels import _common
    from fastvq.kernels.nearest_code import CONFIGS_X3, X3_FALLBACK, _aligned, _prune_configs

    def key(c):
        return (c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages)

    configs = [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
               for bn, bk, w, s in CONFIGS_X3 + [X3_FALLBACK, (128, 64, 8, 2)]]

    def args(x, c):
        return {"p_x": x, "p_c": c, "stride_xh": x.numel(), "stride_xn": x.stride(0), "stride_ch": c.numel(),
                "stride_ck": c.stride(0)}

    def kept(target, x, c, block_d, one_d=True):
        with _common.compile_target(target):
            return {key(k) for k in _prune_configs(configs, args(x, c), PRECISION="tf32x3", BLOCK_D=block_d,
                                                   ONE_D_BLOCK=one_d)}

    meta = dict(device="meta")
    x64, c64 = torch.empty(4096, 64, **meta), torch.empty(1024, 64, **meta)
    x60, c60 = torch.empty(4096, 60, **meta), torch.empty(1024, 60, **meta)
    padded = torch.empty(4096, 65, **meta)[:, :64]
    shifted = torch.empty(4096 * 64 + 1, **meta)[1:].view(4096, 64)
    assert _aligned(args(x64, c64)) and not _aligned(args(x60, c60))
    assert not _aligned(args(padded, c64)) and not _aligned(args(shifted, c64))
    # aligned: the wgmma tiles, never the fallback; 64 x 64 among them on sm_90
    assert (64, 64, 8, 2) in kept("sm_90", x64, c64, 64) and X3_FALLBACK not in kept("sm_90", x64, c64, 64)
    assert kept("sm_80", x64, c64, 64) and X3_FALLBACK not in kept("sm_80", x64, c64, 64)
    for x in (x60, padded, shifted):
        assert kept("sm_90", x, c64 if x is not x60 else c60, 64) == {(64, 32, 8, 2)}
        assert kept("sm_80", x, c64 if x is not x60 else c60, 64) == {X3_FALLBACK}
    # narrower and streamed unaligned rows keep wgmma tiles on sm_90
    x24, c24 = torch.empty(4096, 24, **meta), torch.empty(1024, 24, **meta)
    assert (64, 64, 8, 2) in kept("sm_90", x24, c24, 32) and X3_FALLBACK not in kept("sm_90", x24, c24, 32)
    x100, c100 = torch.empty(4096, 100, **meta), torch.empty(1024, 100, **meta)
    assert (64, 32, 4, 2) not in kept("sm_90", x100, c100, 32, one_d=False)
    assert kept("sm_80", x100, c100, 32, one_d=False) == {X3_FALLBACK}


def test_empty_rows_with_batch(backend):
    idx, dist = fastvq.nearest_code(randn(2, 0, 5), randn(3, 5))
    assert idx.shape == (2, 0) and dist.shape == (2, 0) and idx.dtype == torch.int64


@pytest.mark.parametrize(
    "x,c,kw,err",
    [
        (torch.randn(3, 4), torch.randn(5, 3), {}, ValueError),
        (torch.randn(3, 4), torch.randn(4), {}, ValueError),
        (torch.randn(3, 4), torch.randn(2, 5, 4), {}, ValueError),
        (torch.randn(3, 4), torch.randn(0, 4), {}, ValueError),
        (torch.randint(0, 3, (3, 4)), torch.randn(5, 4), {}, TypeError),
        (torch.randn(3, 4), torch.randint(0, 3, (5, 4)), {}, TypeError),
        (torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4), {}, TypeError),
        (torch.randn(3, 4), torch.randn(5, 4, device="meta"), {}, ValueError),
        (torch.randn(3, 4), torch.randn(5, 4), {"metric": "l1"}, ValueError),
        (torch.randn(3, 4), torch.randn(5, 4), {"metric": None}, TypeError),
        (torch.randn(3, 4), torch.randn(5, 4), {"allow_tf32": "yes"}, TypeError),
        ([[1.0]], torch.randn(5, 1), {}, TypeError),
        (torch.tensor(1.0), torch.randn(5, 1), {}, ValueError),
    ],
    ids=["D-mismatch", "codebook-1D", "codebook-3D", "K0", "int-x", "int-codebook", "float64",
         "devices-differ", "unknown-metric", "metric-not-str", "allow_tf32-not-bool", "not-tensor", "x-0D"],
)
def test_bad_input(x, c, kw, err):
    with pytest.raises(err, match="nearest_code"):
        fastvq.nearest_code(x, c, **kw)


def test_launcher_asserts_its_preconditions():
    # user-facing checks live in fastvq.ops; the launcher only asserts what it relies on
    from fastvq.kernels.nearest_code import nearest_code_fwd

    with pytest.raises(AssertionError, match="nearest_code_fwd"):
        nearest_code_fwd(torch.randn(3, 4), torch.randn(0, 4))
    with pytest.raises(AssertionError, match="nearest_code_fwd"):
        nearest_code_fwd(torch.randn(3, 4), torch.randn(5, 4, dtype=torch.float16))


@pytest.mark.parametrize("metric", METRICS)
def test_opcheck(metric):
    x, c = randn(2, 6, 5), randn(2, 4, 5)  # the custom op takes (H, N, D) and (H, K, D)
    for name in ("reference", "triton"):
        with fastvq.backend(name):
            torch.library.opcheck(torch.ops.fastvq.nearest_code.default, (x, c, metric, False))


def test_compile_fullgraph(backend):
    x, c = randn(7, 6), randn(10, 6)

    @torch.compile(fullgraph=True, backend="eager")
    def f(x, c):
        return fastvq.nearest_code(x, c, "cosine")

    idx, dist = f(x, c)
    _check_nearest(x, c, "cosine", idx, dist)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("metric", METRICS)
def test_large_gpu(dtype, metric):
    N, K, D = 65536, 4096, 256
    x, c = randn(N, D, dtype=dtype), randn(K, D, dtype=dtype)
    with fastvq.backend("triton"):
        idx, dist = fastvq.nearest_code(x, c, metric)
    with fastvq.backend("reference"):
        ref_idx, ref_dist = fastvq.nearest_code(x, c, metric)
    assert ((idx >= 0) & (idx < K)).all()
    # the distance (float64) at the chosen code equals the reference minimum within fp32 rounding
    x64, c64 = x.double(), c.double()[idx]
    if metric == "l2":
        chosen = ((x64 - c64) ** 2).sum(-1)
    elif metric == "dot":
        chosen = -(x64 * c64).sum(-1)
    else:
        chosen = 1 - torch.nn.functional.cosine_similarity(x64, c64, dim=-1)
    assert_close(chosen, ref_dist.double(), torch.float32, reduce_len=D * 100)
    assert_close(dist, ref_dist, torch.float32, reduce_len=D * 100)
    assert (idx == ref_idx).float().mean() > 0.999


@pytest.mark.gpu
@pytest.mark.about_devices("placement on the second GPU while the first is current")
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_gpu_while_current_is_first():
    # Triton launches on the current device; the launchers must switch to the tensors' device.
    x, c = randn(50, 32, device="cuda:1"), randn(3000, 32, device="cuda:1")
    assert torch.cuda.current_device() == 0
    with fastvq.backend("triton"):
        idx, dist = fastvq.nearest_code(x, c)
        m_idx, _ = fastvq.mine_negatives(x, x, c, "semi-hard")
    torch.cuda.synchronize(1)
    with fastvq.backend("reference"):
        ref_idx, ref_dist = fastvq.nearest_code(x, c)
    assert idx.device == x.device and (idx == ref_idx).float().mean() > 0.99
    assert_close(dist, ref_dist, torch.float32, reduce_len=32 * 100)
    assert ((m_idx >= 0) & (m_idx < 3000)).all()


@pytest.mark.gpu
@pytest.mark.parametrize("N", [1, 8, 100])
def test_split_gpu(N):
    x, c = randn(N, 128), randn(65536, 128)
    c[7] = torch.randint(-4, 5, (128,)).float()  # integers: exact dot products
    c[40000] = c[7]
    x[0] = c[7]
    with fastvq.backend("triton"):
        idx, dist = fastvq.nearest_code(x, c)
    with fastvq.backend("reference"):
        ref_idx, ref_dist = fastvq.nearest_code(x, c)
    assert idx[0].item() == 7
    assert_close(dist, ref_dist, torch.float32, reduce_len=128 * 100)
    assert (idx == ref_idx).float().mean() > 0.99


# --------------------------------------------------------------------------- several codebooks


@pytest.mark.parametrize("metric", METRICS + ["euclidean"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_multi_codebook_matches_each_codebook(backend, metric, dtype):
    H = 3
    x, c = randn(H, 2, 17, 12, dtype=dtype), randn(H, 45, 12, dtype=dtype)
    idx, dist = fastvq.nearest_code(x, c, metric)
    assert idx.shape == (H, 2, 17) and dist.shape == (H, 2, 17)
    for h in range(H):
        if metric == "euclidean":
            _check_nearest(x[h], c[h], "l2", idx[h], dist[h] ** 2)
        else:
            _check_nearest(x[h], c[h], metric, idx[h], dist[h])
        one = fastvq.nearest_code(x[h], c[h], metric)
        assert torch.equal(one[0], idx[h])


def test_multi_codebook_is_one_launch(monkeypatch):
    import fastvq.kernels.nearest_code as knc

    x, c = randn(5, 40, 8), randn(5, 64, 8)
    with fastvq.backend("triton"):
        launched = count_kernel_launches(monkeypatch, knc, "_code_terms_kernel", "_code_rescale_kernel",
                                         "_nearest_code_fwd_kernel", "_nearest_code_reduce_kernel")
        fastvq.nearest_code(x, c)
    assert launched == ["_code_terms_kernel", "_code_rescale_kernel", "_nearest_code_fwd_kernel"]


def test_multi_codebook_scaled_separately(backend):
    # one codebook far outside [2^-20, 2^20] (scaled copy), the others ordinary: each searched right
    x, c = randn(3, 6, 8), randn(3, 30, 8)
    c[1] *= 1e25
    x[1] = c[1, [3, 8, 13, 21, 22, 29]] * 1.001
    idx, dist = fastvq.nearest_code(x, c)
    assert idx[1].tolist() == [3, 8, 13, 21, 22, 29]
    for h in (0, 2):
        _check_nearest(x[h], c[h], "l2", idx[h], dist[h])


def test_multi_codebook_bad_shapes():
    with pytest.raises(ValueError, match="nearest_code.*H = 3"):
        fastvq.nearest_code(torch.randn(2, 5, 4), torch.randn(3, 7, 4))
    with pytest.raises(ValueError, match="nearest_code.*H = 3"):
        fastvq.nearest_code(torch.randn(4), torch.randn(3, 7, 4))
    with pytest.raises(ValueError, match="nearest_code"):
        fastvq.nearest_code(torch.randn(3, 5, 4), torch.randn(3, 0, 4))
    with pytest.raises(ValueError, match="nearest_code"):
        fastvq.nearest_code(torch.randn(3, 5, 4), torch.randn(1, 3, 7, 4))
    idx, dist = fastvq.nearest_code(torch.randn(0, 5, 4), torch.randn(0, 7, 4))
    assert idx.shape == (0, 5)


def test_multi_codebook_compile(backend):
    x, c = randn(2, 9, 6), randn(2, 11, 6)

    @torch.compile(fullgraph=True, backend="eager")
    def f(x, c):
        return fastvq.nearest_code(x, c, "dot")

    idx, _ = f(x, c)
    assert torch.equal(idx, fastvq.nearest_code(x, c, "dot")[0])


@pytest.mark.parametrize("dtype", [torch.float32], ids=str)
def test_euclidean_distance_of_subnormal_differences(backend, device, dtype):
    # |x - c| below 2^-126 (max-abs scale 2^127, scaled back by 2^-127): exp2i clamped 2^-127 to
    # 2^-126, so both backends returned twice the distance (2e-39 for 1e-39)
    x = torch.tensor([[1e-39, 0.0, 0.0], [3e-40, -2e-40, 0.0], [1e-45, 1e-45, 0.0], [1.0, 0.0, 0.0]],
                     dtype=dtype, device=device)
    c = torch.tensor([[0.0, 0.0, 0.0], [100.0, 100.0, 100.0]], dtype=dtype, device=device)
    idx, dist = fastvq.nearest_code(x, c, "euclidean")
    assert idx.tolist() == [0, 0, 0, 0]
    exact = x.double().norm(dim=-1)  # code 0 is the zero vector
    # within two float32 roundings; a subnormal result within two of its (absolute) steps, 2^-149
    torch.testing.assert_close(dist.double(), exact, rtol=2**-22, atol=2.0**-148)


# ------------------------------------------------------------------ mutation round D (mutD): behaviour no test pinned


def test_reference_row_chunks_cover_every_row(monkeypatch):
    # D11: the reference searches run in row chunks (ROW_CHUNK rows); no test had N past one chunk,
    # so a chunk that stops one row short (an unwritten torch.empty row) went unnoticed.
    from fastvq.reference import _chunks

    monkeypatch.setattr(_chunks, "ROW_CHUNK", 4)  # 10 rows: chunks of 4, 4 and 2
    x, c = randn(10, 8, seed=1), randn(16, 8, seed=2)
    want = torch.cdist(x.double(), c.double()).argmin(1)
    with fastvq.backend("reference"):
        for _ in range(3):  # (torch.empty may reuse memory that happens to hold the right answer)
            idx, dist = fastvq.nearest_code(x, c)
            assert torch.equal(idx, want)
            assert torch.allclose(dist.double(), ((x.double() - c.double()[want]) ** 2).sum(-1), rtol=1e-5)
            top, _ = fastvq.topk_codes(x, c, 3)
            assert torch.equal(top[:, 0], want)


def test_euclidean_distance_scales_by_the_difference_not_the_row(backend):
    # D09: the euclidean distance is formed as sqrt(sum((diff 2^-e)^2)) 2^e with e the exponent
    # of max|diff|; with the row's exponent instead, a tiny row and a huge code gave +inf
    # (diff 2^100 overflows) and a huge row with a tiny difference gave 0.
    x = torch.tensor([[1e-30, 0.0], [1e30, 1e-30]])
    c = torch.tensor([[1e30, 0.0], [1e30, 2e-30]])
    for i in range(2):
        _, dist = fastvq.nearest_code(x[i : i + 1], c[i : i + 1], "euclidean")
        assert torch.allclose(dist.double(), torch.tensor([1e30, 1e-30][i], dtype=torch.float64), rtol=1e-6)


def test_cosine_distance_of_a_row_to_itself_is_never_negative(backend):
    # D08: 1 - cos rounds to -1.2e-7 for about one row in five of randn(200, 16) against itself;
    # the contract's clamp to [0, 2] was checked only on random codes, which never come that close.
    x = randn(200, 16, seed=0)
    idx, dist = fastvq.nearest_code(x, x, "cosine")
    assert ((dist >= 0) & (dist <= 2)).all()
    _, dist = fastvq.nearest_code(x, -x, "cosine")
    assert ((dist >= 0) & (dist <= 2)).all()


def test_dot_distance_remainders_that_land_on_a_midpoint_are_split_again(backend):
    # D12: two products of +-2^70 put the split point at 2^74, so the products 1 + 2^-11 + 2^-24 (a
    # float32 rounding midpoint) and 2^-60 both fall into the remainders; summed plainly in float64
    # they round to the midpoint and the tie goes to even (-(1 + 2^-11)), where the exact sum rounds
    # to -(1 + 2^-11 + 2^-23). The second extraction keeps 2^-60.
    x = torch.tensor([[2.0**35, 2.0**35, 1 + 2**-12, 2.0**-30]])
    c = torch.tensor([[2.0**35, -(2.0**35), 1 + 2**-12, 2.0**-30]])
    _, dist = fastvq.nearest_code(x, c, "dot")
    assert dist.item() == -(1 + 2**-11 + 2**-23)


def test_cosine_search_of_a_subnormal_codebook_beside_unit_rows(backend):
    # D05: a codebook whose codes all lie below 2^-20 is searched as a power-of-two scaled copy;
    # unscaled, codes of 2^-140 are float32 subnormals whose products with unit rows keep a few bits,
    # and cosine chose codes far beyond the rounding bound (ratio 92). The tests' tiny codebooks
    # came with tiny rows (band 2), where the rows' own scaling hid it.
    x, c = randn(64, 8, seed=0), randn(200, 8, seed=1) * 2.0**-140
    for metric in ("l2", "cosine", "dot"):
        idx, _ = fastvq.nearest_code(x, c, metric)
        # (exact float32 products on the CPU; tf32x3's floor on a GPU, 2^-136 per entry, is looser and
        # admits the mutant's choices there)
        ft.assert_argmin_within_bound(x, c, idx, metric, ft.search_precision(x.dtype) if x.is_cuda else None)
