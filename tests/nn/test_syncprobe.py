"""syncprobe: hidden costs of a training step (issue 10): host syncs, N x K buffers, K = 2^20,
and whether the traffic meter (fastvq.bench.traffic) can be fooled, in configurations the other
tests do not run (float masks, dot/cosine, rotation with EMA, bf16/fp16/autocast, 3-d and
non-contiguous inputs, eval, RQVAE with compute_loss, QR bags/weights/modes, Bitcodes).

Findings, all fixed (each test failed before its fix):

- Y1: the meter books a torch.library custom op outside the ``fastvq::`` namespace as one read
  and one write: clones of the activations and ``.item()`` host syncs inside its body are not
  counted (the README says custom-op bodies are included).
- Y2: the meter (and tests/_syncs.py's spy) cannot see ``.tolist()`` / ``.numpy()`` host reads on
  the CPU, where the meter says syncs are counted too: a ``QREmbedding(sparse=True)`` step, whose
  one documented sync is a ``.tolist()``, reads 0 syncs.
- Y3: ``sample_code(..., seed=int)`` builds its seed with ``torch.tensor(seed, device=x.device)``,
  a blocking host-to-device copy (a host sync on CUDA) on every call; the traffic row reports 0
  syncs, and the meter counts no host-to-device copy.
- Y4: nested ``metering()`` blocks book every Triton launch (and its kernel bytes) twice to the
  inner meter and not at all to the outer one.
- Y5: the ``code_usage (N=4096, K=512)`` traffic row keeps K = 512 when ``--traffic-scale`` divides
  N, so ``benchmarks/results/traffic.json`` (scale 8) reports 11.3 passes where the named shape
  moves 2.3, while the CLI prints "same pass counts".
- Y6: the suite's own sync spy (tests/_syncs.py ``count_host_syncs``) does not look inside
  fastvq's custom ops (its mode is off while an op's body runs), so the tests that hold
  ``code_statistics`` and the codebook training steps at zero syncs with it cannot fail for a
  sync in an op body: an ``.item()`` added to ``code_statistics``' body goes unseen.
- Y7: ``VectorQuantizer`` / ``ResidualQuantizer.forward`` evaluate
  ``inputs.detach().reshape(-1, D)`` for k-means init on every call, also with
  ``kmeans_init=False`` and in eval: for an input that is not viewable as rows (the image layout
  ``z.permute(0, 2, 3, 1)``) that is a full copy of the activations (2 passes) thrown away.
- Y8: the meter books ``aten._unsafe_view`` (what ``reshape`` of a non-viewable tensor and
  ``matmul`` of 3-d inputs return: an alias, no bytes moved) as a read and a write: a copying
  reshape counts 4 passes instead of 2.
- Y9: the search kernels form a code's offset ``o_k * stride_ck`` in int32
  (kernels/residual_quantize.py ``_search_level``; ``nearest_code`` with a 16-bit codebook too,
  float32 is right): a codebook whose codes lie 2^31 elements or more into its storage (a
  contiguous ``K x D`` one with ``K * D >= 2^31``, e.g. K = 2^20 codes of D = 2048; here a
  strided view, which the ops accept) is read outside it: the interpreter segfaults (the
  reference finds the codes). Fixed: nearest_code's 16-bit tiles form offsets in int64; the
  residual launcher copies such a view contiguous and refuses codebooks of 2^31 elements or
  more with a ValueError (tests/ops/test_residual_quantize.py).
"""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastvq
from fastvq.bench.traffic import measure
from fastvq.nn import RQVAE, Bitcodes, QREmbedding, ResidualQuantizer, VectorQuantizer
from tests._syncs import count_host_syncs
from tests.utils import generator, randn



def _step(mod, x, mask=None, autocast=None):
    """One training step of a quantizer (forward with its codebook update, backward)."""

    def step(meter=None):
        mod.zero_grad(set_to_none=True)
        x.grad = None
        if autocast is not None:
            with torch.autocast(x.device.type, dtype=autocast):
                q, commit, emb, _ = mod(x, mask)
        else:
            q, commit, emb, _ = mod(x, mask)
        if meter is not None:
            meter.phase = "bwd"
        outs, grads = [q], [torch.ones_like(q)]
        for loss in (commit, emb):
            if loss.requires_grad:
                outs.append(loss)
                grads.append(torch.ones_like(loss))
        torch.autograd.backward(outs, grads)

    return step


def _no_syncs(step, backend="triton"):
    """Warm up once (k-means init, the first step), then one metered step and one under the
    suite's spy: neither may see a host sync. Returns the meter's Traffic."""
    with fastvq.backend(backend):
        t = measure(step, 1)  # (warm-up inside measure)
        with count_host_syncs() as spy:
            step(None)
    assert t.syncs == 0, dict(t.sync_ops())
    assert spy == [], spy
    return t


# ------------------------------------------------------------------ zero host syncs where untested
N, K, D = 24, 8, 6
VQ_CONFIGS = {  # name -> (module, input dtype, input layout, mask kind, autocast)
    "vq-ema-dead-floatmask": (lambda: VectorQuantizer(K, D, ema=True, dead_code_threshold=1.0), None, None, "float",
                              None),
    "vq-dot-ema-dead": (lambda: VectorQuantizer(K, D, metric="dot", ema=True, dead_code_threshold=1.0), None, None,
                        None, None),
    "vq-cosine-kmeans-mask": (lambda: VectorQuantizer(K, D, metric="cosine", ema=True, kmeans_init=True, kmeans_iters=1,
                                                      dead_code_threshold=1.0), None, None, "bool", None),
    "vq-rotation-ema-dead-mask": (lambda: VectorQuantizer(K, D, grad="rotation", ema=True, dead_code_threshold=1.0),
                                  None, None, "bool", None),
    "vq-3d-noncontig-dead": (lambda: VectorQuantizer(K, D, dead_code_threshold=1.0), None, "3d-t", "bool", None),
    "vq-bf16-inputs-ema-dead": (lambda: VectorQuantizer(K, D, ema=True, dead_code_threshold=1.0), torch.bfloat16, None,
                                None, None),
    "vq-half-module-dead": (lambda: VectorQuantizer(K, D, dead_code_threshold=1.0).half(), torch.float16, None, None,
                            None),
    "vq-autocast-ema-dead": (lambda: VectorQuantizer(K, D, ema=True, dead_code_threshold=1.0), None, None, None,
                             torch.bfloat16),
    "rq-rotation-ema-dead-floatmask": (lambda: ResidualQuantizer(2, K, D, grad="rotation", ema=True,
                                                                 dead_code_threshold=1.0), None, None, "float", None),
}


@pytest.mark.parametrize("name", list(VQ_CONFIGS))
def test_quantizer_step_has_no_host_sync(device, name):
    make, dtype, layout, mask_kind, autocast = VQ_CONFIGS[name]
    torch.manual_seed(0)
    mod = make().to(device).train()
    x = randn(N, D, device=device, seed=1, dtype=dtype or torch.float32)
    mask = None
    if layout == "3d-t":  # (2, 12, D) with the row dims transposed: not contiguous
        x = x.reshape(12, 2, D).transpose(0, 1)
        assert not x.is_contiguous()
    if mask_kind == "bool":
        mask = torch.rand(x.shape[:-1], generator=generator(2, device), device=device) > 0.3
    elif mask_kind == "float":
        mask = torch.rand(x.shape[:-1], generator=generator(2, device), device=device)
    x.requires_grad_(True)
    _no_syncs(_step(mod, x, mask, autocast))


def test_eval_forward_has_no_host_sync(device):
    torch.manual_seed(0)
    mod = VectorQuantizer(K, D, ema=True, kmeans_init=True, dead_code_threshold=1.0).to(device).eval()
    x = randn(N, D, device=device, seed=1)
    t = _no_syncs(lambda meter=None: mod(x))
    assert t.launches <= 2  # no codebook update in eval


def test_rqvae_step_with_compute_loss_and_mask_has_no_host_sync(device):
    torch.manual_seed(0)
    model = RQVAE(10, 12, D, num_quantizers=2, num_embeddings=K, ema=True, dead_code_threshold=1.0).to(device).train()
    f = randn(N, 10, device=device, seed=1)
    mask = torch.rand(N, generator=generator(2, device), device=device) > 0.3

    def step(meter=None):
        model.zero_grad(set_to_none=True)
        rec, commit, emb, _ = model(f, mask)
        losses = model.compute_loss(f, rec, commit, emb, mask=mask)
        if meter is not None:
            meter.phase = "bwd"
        losses["total_loss"].backward()

    _no_syncs(step)


QR_CONFIGS = {
    "mult-mean-bags": (dict(op="mult", mode="mean"), True, False),
    "concat-bags-weights": (dict(op="concat"), True, True),
    "add-atomic-bags-weights-grad": (dict(deterministic=False), True, "grad"),
    "int32-2d-ids": (dict(), False, False),
}


@pytest.mark.parametrize("name", list(QR_CONFIGS))
def test_qr_embedding_step_has_no_host_sync(device, name):
    kw, bags, weights = QR_CONFIGS[name]
    torch.manual_seed(0)
    emb = QREmbedding(100, 4, **kw).to(device)
    ids = torch.randint(-2**40, 2**40, (16,), generator=generator(1, device), device=device)
    fwd = {}
    if bags:
        fwd["offsets"] = torch.tensor([0, 3, 3, 9], device=device)
    else:
        ids = ids.reshape(4, 4).to(torch.int32)
    if weights:
        fwd["per_sample_weights"] = torch.rand(16, generator=generator(2, device), device=device)
        if weights == "grad":
            fwd["per_sample_weights"].requires_grad_(True)

    def step(meter=None):
        emb.zero_grad(set_to_none=True)
        out = emb(ids, **fwd)
        if meter is not None:
            meter.phase = "bwd"
        out.backward(torch.ones_like(out))

    _no_syncs(step)


@pytest.mark.parametrize("variant", ["3d-train", "bf16-train", "eval"])
def test_bitcodes_step_has_no_host_sync(device, variant):
    torch.manual_seed(0)
    dtype = torch.bfloat16 if variant == "bf16-train" else torch.float32
    m = Bitcodes(D, 5, 0.5).to(device=device, dtype=dtype).train(variant != "eval")
    x = randn(3, 4, D, device=device, seed=1, dtype=dtype, requires_grad=True)

    out = []

    def step(meter=None):
        m.zero_grad(set_to_none=True)
        x.grad = None
        y, bits = m(x)
        if m.training:
            y.float().sum().backward()
        out[:] = [y.detach(), m.from_bits(bits)]

    _no_syncs(step, backend="reference")  # (plain torch: the backend does not matter)
    assert torch.equal(out[1], out[0])


# ------------------------------------------------------------------ no N x K buffer where untested
@pytest.mark.parametrize("name", ["dot-dead-mask", "rotation-ema-dead-bf16"])
def test_no_n_by_k_buffer_in_untested_configs(unpoisoned, device, name):
    n, k, d = 24, 512, 4
    torch.manual_seed(0)
    if name == "dot-dead-mask":
        mod = VectorQuantizer(k, d, metric="dot", dead_code_threshold=1.0).to(device)
        x = randn(n, d, device=device, seed=3, requires_grad=True)
    else:
        mod = VectorQuantizer(k, d, grad="rotation", ema=True, dead_code_threshold=1.0).to(device)
        x = randn(n, d, device=device, seed=3, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.arange(n, device=device) % 4 != 0
    with fastvq.backend("triton"):
        t = measure(_step(mod, x, mask), n * d * 4)
    assert t.largest_alloc < n * k // 4, t.largest_alloc  # K x D is the largest (n * k / 6 here)
    assert t.syncs == 0


# ------------------------------------------------------------------ K = 2^20 codes, reference backend
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_a_million_codes_with_mask_and_revival(device, metric):
    k, d = 1 << 20, 4
    torch.manual_seed(0)
    vq = VectorQuantizer(k, d, metric=metric, dead_code_threshold=0.5).to(device)
    x = randn(3, d, device=device, seed=5, requires_grad=True)
    with torch.no_grad():
        vq.embeddings.weight[k - 5] = 1e3 * x[0]  # the best cosine and dot code of row 0
    mask = torch.tensor([True, False, True], device=device)
    with fastvq.backend("reference"), count_host_syncs() as syncs:
        q, commit, emb, idx = vq(x, mask)
        (q.sum() + commit + emb).backward()
    assert syncs == []
    assert int(idx[0]) == k - 5
    assert vq.code_usage.shape == (k,) and x.grad.isfinite().all()


# ------------------------------------------------------------------ the traffic meter
_OPS = {}


def _make_ops():
    if _OPS:
        return _OPS

    def body(x: torch.Tensor) -> torch.Tensor:
        y = x.clone().clone().clone()  # 6 passes of glue hidden in the body
        if float(y[0, 0]) > 1e30:  # a host read (a sync on CUDA)
            y = y + 1
        return y

    for ns in ("fastvq", "syncprobe"):
        op = torch.library.custom_op(f"{ns}::syncprobe_wasteful_copy", body, mutates_args=())
        op.register_fake(lambda x: torch.empty_like(x))
        _OPS[ns] = op

    def ident(x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    op = torch.library.custom_op("fastvq::syncprobe_wasteful_backward", ident, mutates_args=())
    op.register_fake(lambda x: torch.empty_like(x))
    op.register_autograd(lambda ctx, g: g.clone().clone().clone())
    _OPS["backward"] = op
    return _OPS


def test_meter_counts_clones_and_syncs_inside_a_fastvq_custom_op(unpoisoned, device):
    op = _make_ops()["fastvq"]
    x = randn(64, 16, device=device, seed=0)
    t = measure(lambda meter: op(x), x.numel() * 4)
    assert (t.syncs, round(t.glue_passes, 2)) == (1, 6.0), (t.top_glue(), dict(t.sync_ops()))


def test_meter_counts_clones_inside_a_fastvq_custom_ops_backward(unpoisoned, device):
    op = _make_ops()["backward"]
    x = randn(64, 16, device=device, seed=0, requires_grad=True)
    g = randn(64, 16, device=device, seed=1)

    def step(meter):
        x.grad = None
        y = op(x)
        if meter is not None:
            meter.phase = "bwd"
        y.backward(g)

    t = measure(step, x.numel() * 4)
    assert t.glue("fwd") == 2 and t.glue("bwd") >= 6, t.top_glue()


def test_meter_counts_clones_and_syncs_inside_any_custom_op(unpoisoned, device):
    op = _make_ops()["syncprobe"]
    x = randn(64, 16, device=device, seed=0)
    t = measure(lambda meter: op(x), x.numel() * 4)
    # (the same body as the fastvq op above, which reads (1, 6.0); here (0, 2.0))
    assert (t.syncs, round(t.glue_passes, 2)) == (1, 6.0), (t.top_glue(), dict(t.sync_ops()))


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU blind spot: on CUDA .tolist() dispatches a device-to-host "
                                                     "copy, which the meter counts")
def test_meter_counts_tolist_host_reads_on_cpu(device):
    torch.manual_seed(0)
    emb = QREmbedding(100, 4, sparse=True).to(device)
    ids = torch.randint(0, 100, (16,), generator=generator(1, device), device=device)

    def step(meter):
        emb.zero_grad(set_to_none=True)
        out = emb(ids)
        if meter is not None:
            meter.phase = "bwd"
        out.backward(torch.ones_like(out))

    with fastvq.backend("triton"):
        t = measure(step, 16 * 4 * 4)
    assert emb._emb_q.weight.grad.is_sparse
    # qr_lookup's docstring: "the sparse backward reads it on the host (one sync)"
    assert t.syncs == 1, dict(t.sync_ops())


class _HostData(TorchDispatchMode):
    """Records tensors made from host data (``torch.tensor(...)``): their ``lift_fresh`` is all a
    dispatch mode sees; on CUDA the copy before it is a blocking host-to-device copy, which waits
    for the device (``cudaMemcpyAsync`` + ``cudaStreamSynchronize``; pytorch/pytorch#120996)."""

    def __init__(self):
        super().__init__()
        self.devices = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket.__name__.startswith("lift_fresh"):
            self.devices.append(out.device)
        return out


def test_nearest_code_and_training_step_make_no_device_tensor_from_host_data(device):
    torch.manual_seed(0)
    vq = VectorQuantizer(K, D, ema=True, dead_code_threshold=1.0).to(device)
    x = randn(N, D, device=device, seed=1, requires_grad=True)
    with fastvq.backend("triton"):
        _step(vq, x)()
        with _HostData() as seen:
            _step(vq, x)()
            fastvq.nearest_code(x.detach(), vq.embeddings.weight.detach())
    assert seen.devices == []


def test_sample_code_with_an_int_seed_makes_no_device_tensor_from_host_data(device):
    x = randn(32, D, device=device, seed=1)
    c = randn(K, D, device=device, seed=2)
    with fastvq.backend("triton"):
        with _HostData() as seen:
            idx, _ = fastvq.sample_code(x, c, 0.5, seed=0)
    assert idx.shape == (32,)
    assert x.device not in seen.devices, seen.devices


def test_nested_metering_counts_each_launch_once(unpoisoned, device):
    from fastvq.bench.traffic import metering

    x, c = randn(64, 8, device=device, seed=1), randn(16, 8, device=device, seed=2)
    with fastvq.backend("triton"):
        fastvq.nearest_code(x, c)  # (warm-up)
        with metering() as solo:
            fastvq.nearest_code(x, c)
        with metering() as outer:
            with metering() as inner:
                fastvq.nearest_code(x, c)
    one = solo.counts["fwd"]
    assert one.launches >= 1
    for m in (inner, outer):
        got = m.counts["fwd"]
        assert (got.launches, got.kernel_bytes) == (one.launches, one.kernel_bytes)


def test_code_usage_traffic_row_counts_the_same_at_every_scale(unpoisoned, device):
    from fastvq.bench import traffic

    case = traffic.find_case("code_usage (N=4096, K=512)")
    full = traffic.run_case(case, device, scale=1)
    scaled = traffic.run_case(case, device, scale=8)  # what the committed traffic.json and a CPU run use
    # ("Counting at 1/8 of the named row counts and codebook sizes (same pass counts ...)")
    assert scaled.total_passes == pytest.approx(full.total_passes, rel=0.05), (full.total_passes,
                                                                               scaled.total_passes)


def test_suite_sync_spy_sees_a_sync_inside_a_fastvq_op_body(monkeypatch, device):
    import fastvq.ops.code_statistics as cs

    real = cs.code_statistics_full_ref

    def with_a_sync(*args, **kwargs):
        out = real(*args, **kwargs)
        float(out[0].sum())  # a host read, as a careless change to the op body would add
        return out

    monkeypatch.setattr(cs, "code_statistics_full_ref", with_a_sync)
    x, idx = randn(N, D, device=device, seed=1), torch.arange(N, device=device) % K
    with fastvq.backend("reference"):
        t = measure(lambda meter: fastvq.code_statistics(x, idx, K), 1)
        with count_host_syncs() as spy:  # (what tests/ops/test_code_statistics.py holds at [])
            fastvq.code_statistics(x, idx, K)
    assert t.syncs == 1  # the meter runs op bodies under itself and sees it
    assert spy != [], "the spy saw no sync"


class _FullCopies(TorchDispatchMode):
    """Counts ops that copy a tensor of ``numel`` elements (clone, contiguous copies)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.copies = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        first = args[0] if args else None
        if name in ("clone", "copy_", "_to_copy") and isinstance(first, torch.Tensor) and first.numel() == self.numel:
            self.copies.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("module", ["vq-ema", "rq"])
def test_image_layout_input_is_copied_at_most_once(device, module):
    torch.manual_seed(0)
    mod = (VectorQuantizer(K, D, ema=True) if module == "vq-ema" else ResidualQuantizer(2, K, D)).to(device).eval()
    z = randn(2, D, 4, 4, device=device, seed=1)  # (B, D, H, W), an encoder's output
    x = z.permute(0, 2, 3, 1)  # (B, H, W, D): rows are not a view of it
    with fastvq.backend("triton"):
        mod(x)
        with _FullCopies(x.numel()) as seen:
            mod(x)
    # one copy is the op's own (a 2-d layout for the kernel); the other is k-means init's, unused
    assert len(seen.copies) <= 1, seen.copies


def test_meter_counts_a_copying_reshape_as_one_copy(unpoisoned, device):
    x = randn(64, 32, device=device, seed=0)
    t = measure(lambda meter: x.t().reshape(-1), x.numel() * 4)  # one copy: read x, write the result
    assert t.glue_passes == 2.0, t.top_glue()


_FAR_CODES = """
import sys, torch, fastvq
device, op = sys.argv[1], sys.argv[2]
stride = 2**30  # code k starts k * 2^30 elements in: code 2 at 2^31 (fp16: 4 GiB, only 3 rows' pages touched)
storage = torch.empty(2 * stride + 64, dtype=torch.float16, device=device)
cb = storage.as_strided((3, 4), (stride, 1))
cb.copy_(torch.tensor([[0.0, 0, 0, 0], [10, 10, 10, 10], [5, -5, 5, -5]]))
x = torch.tensor([[5.0, -5, 5, -5], [9, 9, 9, 9]], dtype=torch.float16, device=device)
for backend in ("reference", "triton"):  # (the reference first: the input is valid)
    with fastvq.backend(backend):
        if op == "residual_quantize":
            codes = fastvq.residual_quantize(x, cb.unsqueeze(0))[1]
        else:
            codes = fastvq.nearest_code(x, cb)[0]
    print(backend, op, codes.reshape(-1).tolist(), flush=True)
"""


def _far_codes(device, op):
    import os
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-c", _FAR_CODES, str(device), op], capture_output=True, text=True,
                          timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))


@pytest.mark.parametrize("op", ["residual_quantize", "nearest_code"])
def test_codes_far_into_the_codebook(device, op):
    r = _far_codes(device, op)
    assert f"reference {op} [2, 1]" in r.stdout, (r.returncode, r.stdout[-500:], r.stderr[-2000:])  # a valid input
    assert r.returncode == 0 and f"triton {op} [2, 1]" in r.stdout, (r.returncode, r.stdout[-500:], r.stderr[-2000:])
