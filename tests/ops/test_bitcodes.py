"""to_bits / to_decimal against bitcodes-pytorch's helpers (transcribed below from its source)."""

import pytest
import torch

import fastvq
from tests.utils import raises_invalid


# --- oracle: bitcodes-pytorch's helpers, transcribed (they build the mask on the CPU) ---
def peer_to_bits(indices, num_bits):
    bitmask = 2 ** torch.arange(num_bits - 1, -1, -1)
    return indices.unsqueeze(-1).bitwise_and(bitmask).ne(0).long()


def peer_to_decimal(bits):
    num_bits = bits.shape[-1]
    bitmask = 2 ** torch.arange(num_bits - 1, -1, -1)
    return torch.sum(bitmask * bits, dim=-1)


SHAPES = [pytest.param((), id="scalar"), pytest.param((7,), id="7"), pytest.param((2, 3, 5), id="2x3x5")]
NUM_BITS = [1, 4, 13, 62, 63]


def _ints(shape, num_bits, dtype=torch.int64):
    hi = 2**num_bits if num_bits < 63 else 2**63 - 1
    return torch.randint(0, hi, shape, dtype=torch.int64).to(dtype)


@pytest.mark.parametrize("num_bits", NUM_BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_to_bits_matches_peer(shape, num_bits):
    idx = _ints(shape, num_bits)
    bits = fastvq.to_bits(idx, num_bits)
    assert bits.shape == (*shape, num_bits) and bits.dtype == torch.int64
    assert torch.equal(bits, peer_to_bits(idx, num_bits))


@pytest.mark.parametrize("num_bits", NUM_BITS)
@pytest.mark.parametrize("shape", SHAPES)
def test_to_decimal_matches_peer_and_round_trips(shape, num_bits):
    bits = torch.randint(0, 2, (*shape, num_bits))
    dec = fastvq.to_decimal(bits)
    assert dec.shape == shape and dec.dtype == torch.int64
    assert torch.equal(dec, peer_to_decimal(bits))
    assert torch.equal(fastvq.to_bits(dec, num_bits), bits)
    idx = _ints(shape, num_bits)
    assert torch.equal(fastvq.to_decimal(fastvq.to_bits(idx, num_bits)), idx)


def test_readme_example():
    bits = torch.tensor([[[0, 0, 0, 0], [1, 0, 1, 1], [1, 0, 0, 1], [1, 0, 0, 0], [0, 1, 1, 1], [0, 0, 1, 0]]])
    assert torch.equal(fastvq.to_decimal(bits), torch.tensor([[0, 11, 9, 8, 7, 2]]))
    assert torch.equal(fastvq.to_bits(torch.tensor([[0, 11, 9, 8, 7, 2]]), num_bits=4), bits)


@pytest.mark.parametrize("dtype", [torch.int32, torch.int16, torch.uint8], ids=str)
def test_to_bits_other_int_dtypes(dtype):
    idx = _ints((50,), 7, dtype)
    assert torch.equal(fastvq.to_bits(idx, 7), peer_to_bits(idx.long(), 7))


@pytest.mark.parametrize("dtype", [torch.bool, torch.int32, torch.float32], ids=str)
def test_to_decimal_other_bit_dtypes(dtype):
    bits = torch.randint(0, 2, (9, 6))
    assert torch.equal(fastvq.to_decimal(bits.to(dtype)), peer_to_decimal(bits))


def test_empty():
    assert fastvq.to_bits(torch.zeros(0, dtype=torch.long), 5).shape == (0, 5)
    assert fastvq.to_decimal(torch.zeros(0, 5, dtype=torch.long)).shape == (0,)


@pytest.mark.parametrize(
    "fn,args,err",
    [
        ("to_bits", (torch.tensor([16]), 4), ValueError),
        ("to_bits", (torch.tensor([-1]), 4), ValueError),
        ("to_bits", (torch.tensor([1]), 0), ValueError),
        ("to_bits", (torch.tensor([1]), 64), ValueError),
        ("to_bits", (torch.tensor([1]), 4.5), ValueError),
        ("to_bits", (torch.tensor([1]), "4"), TypeError),
        ("to_bits", (torch.tensor([1]), True), TypeError),
        ("to_bits", (torch.tensor([1.0]), 4), TypeError),
        ("to_bits", (torch.tensor([True]), 4), TypeError),
        ("to_bits", ([1, 2], 4), TypeError),
        ("to_decimal", (torch.tensor([0, 2, 1]),), ValueError),
        ("to_decimal", (torch.tensor([0.5, 1.0]),), ValueError),
        ("to_decimal", (torch.tensor([float("nan"), 1.0]),), ValueError),
        ("to_decimal", (torch.tensor([float("inf"), 0.0]),), ValueError),
        ("to_decimal", (torch.tensor(1),), ValueError),
        ("to_decimal", (torch.zeros(3, 0, dtype=torch.long),), ValueError),
        ("to_decimal", (torch.zeros(3, 64, dtype=torch.long),), ValueError),
        ("to_decimal", ([0, 1],), TypeError),
    ],
    ids=["to_bits-too-big", "to_bits-negative", "to_bits-0-bits", "to_bits-64-bits", "to_bits-nonintegral-bits", "to_bits-str-bits",
         "to_bits-bool-bits", "to_bits-float-idx", "to_bits-bool-idx", "to_bits-list",
         "to_decimal-2", "to_decimal-half", "to_decimal-nan", "to_decimal-inf", "to_decimal-0D", "to_decimal-no-bits", "to_decimal-64-bits",
         "to_decimal-list"],
)
def test_bad_input(request, fn, args, err):
    # the values (indices in range, bits 0 or 1) are checked on the device: see raises_invalid
    on_device = request.node.callspec.id in ("to_bits-too-big", "to_bits-negative", "to_decimal-2", "to_decimal-half",
                                             "to_decimal-nan", "to_decimal-inf")
    with raises_invalid(fn) if on_device else pytest.raises(err, match=fn):
        getattr(fastvq, fn)(*args)


@pytest.mark.gpu
def test_cuda_tensors(device):
    # bitcodes-pytorch fails here: its mask is a CPU tensor
    idx = _ints((1000,), 20).to(device)
    bits = fastvq.to_bits(idx, 20)
    assert bits.is_cuda and torch.equal(bits, peer_to_bits(idx, 20).to(device))
    assert torch.equal(fastvq.to_decimal(bits), idx)


def test_compile_fullgraph_traces_and_still_checks():
    # the value checks sit in custom-op bodies: fullgraph tracing needs no data-dependent guard
    # (it used to fail on valid input) and a compiled graph still rejects bad values
    torch._dynamo.reset()
    to_bits = torch.compile(lambda i: fastvq.to_bits(i, 6), fullgraph=True, backend="aot_eager")
    to_decimal = torch.compile(fastvq.to_decimal, fullgraph=True, backend="aot_eager")
    idx = _ints((3, 5), 6)
    bits = to_bits(idx)
    assert torch.equal(bits, peer_to_bits(idx, 6))
    assert torch.equal(to_decimal(bits), idx)
    with raises_invalid("to_bits"):
        to_bits(torch.full((3, 5), 64))
    with raises_invalid("to_decimal"):
        to_decimal(torch.full((3, 6), 2))


def test_opcheck():
    torch.library.opcheck(torch.ops.fastvq.to_bits.default, (_ints((4, 3), 9), 9))
    torch.library.opcheck(torch.ops.fastvq.to_decimal.default, (torch.randint(0, 2, (4, 3, 7)),))


def test_valid_input_reads_nothing_on_the_host():
    from fastvq.bench.traffic import metering

    with metering() as meter:
        bits = fastvq.to_bits(torch.tensor([0, 11, 9]), 4)
        fastvq.to_decimal(bits)
    assert meter.counts["fwd"].syncs == 0, dict(meter.counts["fwd"].sync_ops)


def test_unsigned_values_named_as_given():
    # uint64 values >= 2**63 wrap negative as int64: the error names them as the caller wrote them
    ids = torch.tensor([2**63 + 5, 3, 7, 2**63 + 9], dtype=torch.uint64)
    with raises_invalid(r"to_bits: .*got values in \[3, 9223372036854775817\]"):
        fastvq.to_bits(ids, 8)
