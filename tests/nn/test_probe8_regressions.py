"""probe8's module findings as regression tests (written as ``xfail(strict=True)``; each fix
removed its marker)."""

import pytest
import torch

import fastvq

from tests.utils import DEVICE


@pytest.mark.parametrize("rows", ["tensor", "numpy"])
def test_probe8_rq1_semantic_ids_of_batches_given_as_lists_of_rows(rows):
    """Each batch a Python list of row vectors (a DataFrame column of arrays, sliced): every item
    gets its id, as for the same rows given as one tensor (or the form is refused, naming
    ``features``); today the output has one row per batch."""
    torch.manual_seed(0)
    m = fastvq.nn.RQVAE(6, 16, 4, num_quantizers=2, num_embeddings=8).to(DEVICE)
    X = torch.randn(10, 6)
    want = m.semantic_ids(X, progress=False)
    batches = [list(X[:5]), list(X[5:])]
    if rows == "numpy":
        batches = [[r.numpy() for r in b] for b in batches]
    try:
        got = m.semantic_ids(batches, progress=False)
    except (TypeError, ValueError) as e:  # refusing the form is fine too, if it names the argument
        assert "features" in str(e)
        return
    assert got.shape == want.shape, (tuple(got.shape), tuple(want.shape))
    assert torch.equal(got, want)


@pytest.mark.parametrize("num_bits", [63, 64, 300])
def test_probe8_b1_bitcodes_many_infinite_entries_keep_their_sign(num_bits):
    """B1: the count of selected +inf / -inf / NaN entries was packed in base 64, so 64 selected
    +inf entries read as one -inf (64 x 64 as NaN). Every bit picking +inf: +inf; one -inf among
    them: NaN; every bit picking -inf: -inf."""
    m = fastvq.nn.Bitcodes(2, num_bits, 1.0).eval().to(DEVICE)
    bits = torch.zeros(3, num_bits, dtype=torch.long, device=DEVICE)
    with torch.no_grad():
        m.codebook.fill_(1.0)
        m.codebook[0::2, 0] = float("inf")  # bit value 0's row of every bit: +inf in column 0
        m.codebook[1::2, 0] = float("-inf")
    bits[1, 5] = 1  # row 1: one -inf among the +infs
    bits[2] = 1
    y = m.from_bits(bits)
    assert y[0, 0].item() == float("inf") and y[1, 0].isnan() and y[2, 0].item() == float("-inf"), y[:, 0]
    assert torch.equal(y[:, 1], torch.full((3,), float(num_bits), device=DEVICE))
