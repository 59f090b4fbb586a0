"""modprobe: findings of an independent probe of fastvq.nn and the vector-quantize-pytorch switch.

Each test is a minimal reproduction of one finding (M1-M8, all fixed; each failed before its fix):
M1 QREmbedding's third positional argument is the seed's ``sparse``; M2 ``RQVAE.semantic_ids``
restores each submodule's train/eval mode; M3 the low-usage warning names the caller's line;
M4 ``RQVAE`` takes a padding mask; M5 ``kmeans_iters`` set later is checked; M6 float64 mask
weights are taken (as float32); M7 ``Bitcodes.temperature`` set later is checked; M8 a width
tuple of the wrong length says so."""

import os
import warnings

import pytest
import torch

from fastvq.nn import Bitcodes, QREmbedding, RQVAE, VectorQuantizer, _codebook
from tests.utils import randn


# ---------------------------------------------------------------------------------------- M1
def test_m1_qr_embedding_takes_the_seeds_positional_sparse(backend, device):
    # seed 000: QREmbedding(num_embeddings, emb_dim, sparse=False); README: "the seed's constructor"
    emb = QREmbedding(100, 4, True).to(device)
    assert emb.sparse is True
    assert emb._emb_q.num_embeddings == 10 and emb._emb_r.num_embeddings == 10
    out = emb(torch.tensor([3, -7, 250], device=device))
    out.sum().backward()
    assert emb._emb_q.weight.grad.is_sparse


# ---------------------------------------------------------------------------------------- M2
def test_m2_semantic_ids_restore_each_submodules_mode(backend, device):
    torch.manual_seed(0)
    model = RQVAE(4, 8, 3, num_quantizers=2, num_embeddings=5, ema=True).to(device)
    model.train()
    model.quantizer.eval()  # freeze the EMA codebook, keep training the encoder/decoder
    model.semantic_ids(randn(10, 4, device=device, seed=1), progress=False)
    assert not model.quantizer.training
    model.generate_semantic_ids(randn(10, 4, device=device, seed=2))
    assert not model.quantizer.training
    # the consequence: the next training step updates the "frozen" codebook
    before = model.quantizer.codebooks.detach().clone()
    model(randn(16, 4, device=device, seed=3))
    assert torch.equal(model.quantizer.codebooks.detach(), before)


# ---------------------------------------------------------------------------------------- M3
def test_m3_low_usage_warning_points_at_the_caller(backend, device, monkeypatch):
    monkeypatch.setattr(_codebook, "USAGE_WARMUP_STEPS", 2)
    monkeypatch.setattr(_codebook, "USAGE_WINDOW_STEPS", 3)
    torch.manual_seed(0)
    vq = VectorQuantizer(16, 4).to(device)
    with torch.no_grad():
        vq.embeddings.weight[1:] = 1e3  # every row picks code 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", UserWarning)
        for step in range(8):
            vq(randn(20, 4, device=device, seed=step))
    caught = [w for w in caught if "collapsed" in str(w.message)]
    assert len(caught) == 1
    torch_dir = os.path.dirname(torch.__file__)
    assert not os.path.abspath(caught[0].filename).startswith(torch_dir), caught[0].filename


# ---------------------------------------------------------------------------------------- M4
def test_m4_rqvae_takes_a_padding_mask(backend, device):
    torch.manual_seed(0)
    model = RQVAE(4, 8, 3, num_quantizers=2, num_embeddings=5).to(device)
    features = randn(2, 6, 4, device=device, seed=1)
    mask = torch.tensor([[True] * 6, [True] * 3 + [False] * 3], device=device)
    _, commit, emb, codes = model(features, mask=mask)
    _, commit_kept, emb_kept, _ = model(features[mask])
    assert codes.shape == (2, 6, 2)
    torch.testing.assert_close(commit, commit_kept)
    torch.testing.assert_close(emb, emb_kept)


# ---------------------------------------------------------------------------------------- M5
def test_m5_kmeans_iters_set_later_is_checked(backend, device):
    for bad in (2.5, -1, True):
        vq = VectorQuantizer(4, 3, kmeans_init=True).to(device)
        with pytest.raises((TypeError, ValueError), match="kmeans_iters"):
            vq.kmeans_iters = bad
            vq(randn(20, 3, device=device, seed=0))


# ---------------------------------------------------------------------------------------- M6
def test_m6_float64_mask_weights(backend, device):
    torch.manual_seed(0)
    vq = VectorQuantizer(5, 3).to(device)
    x = randn(6, 3, device=device, seed=1)
    w = torch.rand(6, device=device)
    try:
        _, commit64, _, _ = vq(x, w.double())
    except TypeError as e:  # refusing is fine, if the message says what is accepted
        assert "float32" in str(e), str(e)
    else:
        _, commit32, _, _ = vq(x, w)
        torch.testing.assert_close(commit64, commit32)


# ---------------------------------------------------------------------------------------- M7
def test_m7_bitcodes_temperature_set_later(backend, device):
    torch.manual_seed(0)
    bitcodes = Bitcodes(4, 3, 1.0).to(device).train()
    x = randn(5, 4, device=device, seed=1).requires_grad_(True)
    try:
        bitcodes.temperature = 0.0
        y, _ = bitcodes(x)
        y.sum().backward()
    except ValueError as e:  # refusing it, naming the argument, is fine
        assert "temperature" in str(e)
    else:
        assert torch.isfinite(x.grad).all(), x.grad


# ---------------------------------------------------------------------------------------- M8
def test_m8_qr_width_tuple_of_wrong_length_names_the_length(backend, device):
    for widths in ((2,), (2, 3, 4)):
        with pytest.raises(ValueError, match="embedding_dim") as info:
            QREmbedding(100, widths, op="concat")
        assert "needs op='concat'" not in str(info.value), str(info.value)


def test_qr_embedding_takes_the_seeds_narrow_integer_ids(backend, device):
    # (modprobe, noticed: the seed's module takes int8/int16/uint8/bool ids; ours refused them)
    from fastvq.bench.seed_modules import QREmbedding as SeedQREmbedding

    torch.manual_seed(0)
    seed, ours = SeedQREmbedding(100, 4).to(device), QREmbedding(100, 4).to(device)
    ours.load_state_dict(seed.state_dict())
    for ids in (torch.tensor([3, 99, 0], dtype=torch.int8), torch.tensor([300, 7], dtype=torch.int16),
                torch.tensor([255, 1], dtype=torch.uint8), torch.tensor([True, False])):
        ids = ids.to(device)
        torch.testing.assert_close(ours(ids), seed(ids), rtol=0, atol=0)
