"""probe8's module findings (/work/wt/probe8-FINDINGS.md) as regression tests. They fail today,
so they are marked ``xfail(strict=True)``: when a fix lands the test passes, the strict marker
turns that into a failure, and whoever fixed it removes the marker."""

import pytest
import torch

import fastvq

from tests.utils import DEVICE


@pytest.mark.xfail(strict=True, reason="probe8 RQ1: a batch given as a list of rows is read as (features, labels): "
                                       "its first row only")
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
