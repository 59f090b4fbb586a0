"""trainprobe: codebook training over many steps (EMA, k-means init, revival, usage warning,
train/eval, no_grad, gradient accumulation, copies, dtype moves).

Findings (fixed; each test failed before): T1 ``nonfinite_rows`` counted only on the k-means
batch of a module without EMA or revival (now documented: it counts where the update reads rows),
T2 a ``decay`` set later was unchecked on the revival-only usage EMA (NaN poisoned it for good;
it is checked at each update now). The rest hold what the probe checked and found right, cheaply.
"""

import copy
import pickle
import warnings

import pytest
import torch

from fastvq.nn import ResidualQuantizer, VectorQuantizer


def _quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


# -- findings ---------------------------------------------------------------------------

def test_nonfinite_rows_counts_where_the_update_reads_rows(backend, device):
    # (trainprobe T1: without EMA or revival only the k-means batch counts; the docstring said
    # "always" of the buffer without saying when it counts: it says so now)
    x = torch.randn(20, 2, device=device)
    x[:4] = float("nan")
    for kw, want in (({"kmeans_init": True}, 4), ({"kmeans_init": True, "ema": True}, 8),
                     ({"dead_code_threshold": 1.0}, 8)):
        vq = VectorQuantizer(8, 2, **kw).to(device)
        _quiet(lambda: vq(x))
        _quiet(lambda: vq(x))
        assert vq.nonfinite_rows.item() == want, kw


def test_decay_set_later_cannot_poison_code_usage(backend, device):
    vq = VectorQuantizer(8, 2, dead_code_threshold=1.0).to(device)
    vq.decay = float("nan")  # a schedule gone wrong; the EMA path raises ValueError for this
    try:
        _quiet(lambda: vq(torch.randn(16, 2, device=device)))
    except ValueError:
        pass
    vq.decay = 0.99
    _quiet(lambda: vq(torch.randn(16, 2, device=device)))
    assert torch.isfinite(vq.code_usage).all()


# -- what held ----------------------------------------------------------------------------

def test_ema_matches_float64_seed_formula_over_steps(backend, device):
    K, D, decay, eps = 8, 4, 0.9, 1e-5
    vq = VectorQuantizer(K, D, ema=True, decay=decay, eps=eps).to(device)
    w = vq.embeddings.weight.detach().double().clone()
    cs = torch.zeros(K, dtype=torch.float64, device=device)
    ea = w.clone()
    for _ in range(6):
        x = torch.randn(32, D, device=device)
        idx = _quiet(lambda: vq(x))[3]
        assert torch.equal(idx, torch.cdist(x.double(), w).argmin(1))
        oh = torch.nn.functional.one_hot(idx, K).double()
        cs = decay * cs + (1 - decay) * oh.sum(0)
        ea = decay * ea + (1 - decay) * oh.T @ x.double()
        n = cs.sum()
        w = ea / ((cs + eps) / (n + K * eps) * n)[:, None]
    torch.testing.assert_close(vq.cluster_size.double(), cs, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vq.embed_avg.double(), ea, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(vq.embeddings.weight.double(), w, rtol=1e-5, atol=1e-5)


def test_all_masked_and_empty_batches_change_nothing(backend, device):
    vq = VectorQuantizer(8, 4, ema=True, dead_code_threshold=1.0, kmeans_init=True).to(device)
    before = {k: v.clone() for k, v in vq.state_dict().items()}
    _quiet(lambda: vq(torch.randn(0, 4, device=device)))
    _quiet(lambda: vq(torch.randn(16, 4, device=device), torch.zeros(16, device=device)))
    _quiet(lambda: vq(torch.randn(16, 4, device=device), torch.zeros(16, dtype=torch.bool, device=device)))
    assert all(torch.equal(v, before[k]) for k, v in vq.state_dict().items())
    assert vq.codes_revived.item() == 0 and not vq.initted.item()


def test_revival_keeps_ema_consistent_and_skips_masked_rows(backend, device):
    vq = VectorQuantizer(8, 2, ema=True, dead_code_threshold=1.0).to(device)
    x = torch.randn(16, 2, device=device)
    x[8:] = 1000.0
    m = torch.ones(16, dtype=torch.bool, device=device)
    m[8:] = False
    _quiet(lambda: vq(x, m))
    assert vq.codes_revived.item() > 0 and vq.embeddings.weight.abs().max() < 100
    for _ in range(10):
        _quiet(lambda: vq(torch.randn(32, 2, device=device)))
    assert torch.isfinite(vq.embeddings.weight).all()
    torch.testing.assert_close(vq.embed_avg / vq.cluster_size[:, None], vq.embeddings.weight, rtol=1e-4, atol=1e-4)


def test_copies_continue_training_identically(backend, device):
    vq = VectorQuantizer(8, 2, ema=True, dead_code_threshold=1.0, kmeans_init=True).to(device)
    for _ in range(3):
        _quiet(lambda: vq(torch.randn(16, 2, device=device)))
    copies = [copy.deepcopy(vq), pickle.loads(pickle.dumps(vq))]
    x = torch.randn(16, 2, device=device)
    out = []
    for m in [vq, *copies]:
        torch.manual_seed(1)
        _quiet(lambda: m(x))
        out.append(m.embeddings.weight.clone())
    assert all(torch.equal(out[0], o) for o in out[1:])


def test_residual_quantizer_masked_nan_row_not_counted(backend, device):
    rq = ResidualQuantizer(2, 8, 2, ema=True, dead_code_threshold=1.0).to(device)
    x = torch.randn(16, 2, device=device)
    x[0] = float("nan")
    w = torch.ones(16, device=device)
    w[0] = 0
    _quiet(lambda: rq(x, w))
    assert rq.nonfinite_rows.item() == 0 and torch.isfinite(rq.embed_avg).all()
