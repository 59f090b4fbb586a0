"""fastvq.nn.Bitcodes against bitcodes-pytorch's module (transcribed below from its source)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastvq
from fastvq.nn import Bitcodes
from tests.utils import raises_invalid


# --- oracle: bitcodes-pytorch's Bitcodes, transcribed (einops rearranges written as reshapes) ---
class PeerBitcodes(nn.Module):
    def __init__(self, features, num_bits, temperature):
        super().__init__()
        self.temperature = temperature
        self.codebook = nn.Parameter(torch.randn(2 * num_bits, features))

    def from_bits(self, bits):  # (b, m, num_bits)
        attn = F.one_hot(bits.long(), num_classes=2).float()  # b m p q
        attn = attn.reshape(*attn.shape[:2], attn.shape[2] * 2)  # b m (p q)
        return torch.einsum("bmn,nd->bmd", attn, self.codebook)

    def forward(self, x):  # (b, m, d) only
        sim = torch.einsum("bmd,nd->bmn", x, self.codebook)
        pairs = sim.reshape(*sim.shape[:2], sim.shape[2] // 2, 2)  # b m (p q) -> b m p q, q = 2
        if self.training:
            attn = F.gumbel_softmax(pairs, tau=self.temperature, dim=-1, hard=True)
        else:
            attn = F.one_hot(pairs.argmax(dim=-1), num_classes=2).float()
        attn = attn.reshape(*attn.shape[:2], attn.shape[2] * 2)
        out = torch.einsum("bmn,nd->bmd", attn, self.codebook)
        bits = pairs.argmax(dim=-1)  # the noiseless argmax, also in training
        return out, bits


def pair(features=8, num_bits=5, temperature=10.0, seed=0):
    torch.manual_seed(seed)
    ours = Bitcodes(features, num_bits, temperature)
    torch.manual_seed(seed)
    peer = PeerBitcodes(features, num_bits, temperature)
    return ours, peer


def test_same_init_and_state_dict():
    ours, peer = pair()
    assert list(ours.state_dict()) == list(peer.state_dict()) == ["codebook"]
    assert ours.codebook.shape == (10, 8)
    assert torch.equal(ours.codebook, peer.codebook)  # same init, same RNG draw
    other = PeerBitcodes(8, 5, 10.0)
    other.load_state_dict(ours.state_dict(), strict=True)
    ours.load_state_dict(PeerBitcodes(8, 5, 10.0).state_dict(), strict=True)


@pytest.mark.parametrize("shape", [(1, 6), (3, 17)], ids=["1x6", "3x17"])
def test_eval_matches_peer(shape):
    ours, peer = pair()
    ours.eval(), peer.eval()
    x = torch.randn(*shape, 8)
    y, bits = ours(x)
    y_ref, bits_ref = peer(x)
    assert bits.dtype == torch.int64 and torch.equal(bits, bits_ref)
    torch.testing.assert_close(y, y_ref)
    assert torch.equal(ours.from_bits(bits), y)
    torch.testing.assert_close(ours.from_bits(bits), peer.from_bits(bits))


@pytest.mark.parametrize("shape", [(8,), (11, 8), (2, 3, 4, 8), (0, 8)], ids=["1D", "2D", "4D", "empty"])
def test_leading_dims(shape):
    ours, peer = pair()
    ours.eval(), peer.eval()
    x = torch.randn(shape)
    y, bits = ours(x)
    assert y.shape == shape and bits.shape == (*shape[:-1], 5)
    y_ref, bits_ref = peer(x.reshape(1, x.numel() // 8, 8))
    assert torch.equal(bits.reshape(bits_ref.shape), bits_ref)
    torch.testing.assert_close(y.reshape(y_ref.shape), y_ref)
    assert torch.equal(ours.from_bits(bits), y)


def test_ties_pick_zero():
    ours, _ = pair()
    ours.eval()
    y, bits = ours(torch.zeros(4, 8))
    assert torch.equal(bits, torch.zeros(4, 5, dtype=torch.long))
    torch.testing.assert_close(y, ours.codebook[0::2].sum(0).expand(4, 8))


def test_training_matches_peer_output_and_bits_agree_with_it():
    ours, peer = pair(temperature=3.0)
    # small inputs: the Gumbel noise flips many bits away from the noiseless argmax
    x = torch.randn(4, 50, 8) * 0.05
    x_ours, x_peer = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(123)
    y, bits = ours(x_ours)
    torch.manual_seed(123)
    y_ref, bits_ref = peer(x_peer)
    torch.testing.assert_close(y, y_ref)  # same Gumbel draws, same quantized output
    # ours: the returned bits are the sampled ones, so they reproduce y
    torch.testing.assert_close(ours.from_bits(bits), y)
    # the peer's bits are the noiseless argmax: they disagree with its own y where noise flipped a bit
    assert not torch.equal(bits, bits_ref)
    assert not torch.allclose(peer.from_bits(bits_ref), y_ref)
    # the same straight-through gradients, into x and the codebook
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (y_ref * g).sum().backward()
    torch.testing.assert_close(x_ours.grad, x_peer.grad)
    torch.testing.assert_close(ours.codebook.grad, peer.codebook.grad)
    assert x_ours.grad.abs().sum() > 0


def test_eval_gradients_match_peer():
    ours, peer = pair()
    ours.eval(), peer.eval()
    x = torch.randn(2, 9, 8)
    g = torch.randn(2, 9, 8)
    (ours(x)[0] * g).sum().backward()
    (peer(x)[0] * g).sum().backward()
    torch.testing.assert_close(ours.codebook.grad, peer.codebook.grad)


def test_dtype_promotion():
    ours, _ = pair()
    ours.eval()
    x = torch.randn(3, 8, dtype=torch.float64)
    y, bits = ours(x)
    assert y.dtype == torch.float64
    sel = torch.arange(5) * 2 + bits  # (3, 5) codebook rows chosen
    torch.testing.assert_close(y, ours.codebook.double()[sel].sum(1))


def test_to_decimal_of_bits():
    ours, _ = pair(num_bits=12)
    ours.eval()
    _, bits = ours(torch.randn(2, 30, 8))
    codes = fastvq.to_decimal(bits)
    assert codes.shape == (2, 30) and (codes >= 0).all() and (codes < 4096).all()
    assert torch.equal(fastvq.to_bits(codes, 12), bits)


@pytest.mark.parametrize(
    "call,err",
    [
        (lambda m: m(torch.randn(3, 7)), ValueError),
        (lambda m: m(torch.randint(0, 3, (3, 8))), TypeError),
        (lambda m: m(torch.randn(3, 8).to(torch.float8_e4m3fn)), TypeError),  # fuzzD: torch's promotion error
        (lambda m: m(torch.tensor(1.0)), ValueError),
        (lambda m: m.from_bits(torch.zeros(3, 4, dtype=torch.long)), ValueError),
        (lambda m: m.from_bits(torch.full((3, 5), 2)), ValueError),
        (lambda m: m.from_bits([0, 1, 0, 1, 0]), TypeError),
        (lambda m: Bitcodes(0, 4, 1.0), ValueError),
        (lambda m: Bitcodes(8, 0, 1.0), ValueError),
        (lambda m: Bitcodes(8, 4.5, 1.0), ValueError),
        (lambda m: Bitcodes(True, 4, 1.0), TypeError),
        (lambda m: Bitcodes(8, False, 1.0), TypeError),
        (lambda m: Bitcodes(8, "4", 1.0), TypeError),
        (lambda m: Bitcodes(8, 4, 0.0), ValueError),
        (lambda m: Bitcodes(8, 4, -1.0), ValueError),
        (lambda m: Bitcodes(8, 4, float("inf")), ValueError),
        (lambda m: Bitcodes(8, 4, float("nan")), ValueError),
        (lambda m: Bitcodes(8, 4, 1e-46), ValueError),  # probe3 R7: 0 in float32, NaN gradients
        (lambda m: Bitcodes(8, 4, 1e39), ValueError),  # inf in float32
        (lambda m: Bitcodes(8, 4, True), TypeError),
        (lambda m: Bitcodes(8, 4, "hot"), TypeError),
    ],
    ids=["features-mismatch", "int-x", "float8-x", "0D-x", "bits-width", "bits-value", "bits-list",
         "features-0", "num_bits-0", "num_bits-nonintegral", "features-bool", "num_bits-bool", "num_bits-str",
         "temperature-0", "temperature-negative", "temperature-inf", "temperature-nan", "temperature-0-in-fp32",
         "temperature-inf-in-fp32", "temperature-bool",
         "temperature-str"],
)
def test_bad_input(request, call, err):
    ours, _ = pair()
    on_device = request.node.callspec.id == "bits-value"  # checked on the device: see raises_invalid
    with raises_invalid("Bitcodes") if on_device else pytest.raises(err, match="Bitcodes"):
        call(ours)


def test_compile_fullgraph_forward_and_from_bits():
    # from_bits checks its bit values inside a custom op: compiled with fullgraph it traces
    # (it used to fail on valid bits) and still rejects a 2
    ours, _ = pair()
    ours.eval()
    x = torch.randn(2, 7, 8)
    torch._dynamo.reset()
    y_c, bits_c = torch.compile(ours, fullgraph=True, backend="aot_eager")(x)
    y, bits = ours(x)
    assert torch.equal(bits_c, bits)
    torch.testing.assert_close(y_c, y)
    from_bits = torch.compile(ours.from_bits, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(from_bits(bits), y)
    with raises_invalid("Bitcodes.*0 or 1"):
        from_bits(torch.full((2, 7, 5), 2))


def test_checked_bits_opcheck():
    torch.library.opcheck(torch.ops.fastvq.checked_bits.default, (torch.randint(0, 2, (3, 5)), "Bitcodes"))


def test_integral_float_sizes_are_accepted():
    m = Bitcodes(8.0, 4.0, 2)
    assert (m.features, m.num_bits, m.temperature) == (8, 4, 2.0) and m.codebook.shape == (8, 8)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_nonfinite_x_gives_nan_rows_and_valid_bits(training):
    ours, _ = pair()
    ours.train(training)
    x = torch.randn(5, 8)
    x[1, 2] = float("nan")
    x[3] = float("inf")  # inf - inf in the scores: undefined
    y, bits = ours(x)
    assert torch.isnan(y[[1, 3]]).all()
    assert torch.isfinite(y[[0, 2, 4]]).all()
    assert ((bits == 0) | (bits == 1)).all()
    if not training:
        assert torch.equal(ours.from_bits(bits)[[0, 2, 4]], y[[0, 2, 4]])


@pytest.mark.parametrize("dtype, scale, temperature", [
    (torch.float16, 3.0, 1e-4), (torch.float16, 1.0, 1e-5), (torch.bfloat16, 1.0, 1e-38),
    (torch.bfloat16, 1.0, 1e-30), (torch.float32, 1.0, 1e-38), (torch.float32, 1e36, 1e-3)],
    ids=["fp16-3-1e-4", "fp16-1-1e-5", "bf16-1e-38", "bf16-1e-30", "fp32-1e-38", "fp32-1e36-1e-3"])
def test_training_sample_never_overflows(dtype, scale, temperature):
    # findings BC1: (score + gumbel) / T overflowed the dtype and the hard Gumbel-softmax gave NaN
    # rows for finite x and finite scores; the sample is argmax(score + g), whatever T is
    torch.manual_seed(5)
    ours = Bitcodes(16, 8, temperature).to(dtype).train()
    x = (torch.randn(64, 16) * scale).to(dtype).requires_grad_()
    torch.manual_seed(6)
    y, bits = ours(x)
    scores = F.linear(x.detach(), ours.codebook.detach()).unflatten(-1, (8, 2))
    assert scores.isfinite().all()
    torch.manual_seed(6)  # the same noise as F.gumbel_softmax draws (the scores' dtype and shape)
    g = -torch.empty_like(scores).exponential_().log()
    assert torch.equal(bits, (scores.double() + g.double()).argmax(-1))
    assert y.isfinite().all() and torch.equal(ours.from_bits(bits), y)
    (y.float() * torch.randn(y.shape)).sum().backward()
    if dtype == torch.bfloat16 and temperature < 1e-30:
        # bf16's coarse noise ties score + g exactly here (one pair): the soft gradient there
        # is 1 / (4 T) times the codebook, ~1e38 per element, which the float range cannot hold
        return
    assert x.grad.isfinite().all() and ours.codebook.grad.isfinite().all()


@pytest.mark.gpu
def test_cuda(device):
    ours, peer = pair()
    ours.to(device).eval(), peer.to(device).eval()
    x = torch.randn(2, 64, 8, device=device)
    y, bits = ours(x)
    y_ref, bits_ref = peer(x)
    assert torch.equal(bits, bits_ref)
    torch.testing.assert_close(y, y_ref)
    assert torch.equal(fastvq.to_bits(fastvq.to_decimal(bits), 5), bits)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("dtype, scale", [(torch.float16, 60000.0), (torch.float32, 1e38), (torch.bfloat16, 1e38)],
                         ids=["fp16-60000", "fp32-1e38", "bf16-1e38"])
def test_overflowing_scores_still_pick_the_exact_bits(training, dtype, scale):
    # the scores x.c of a finite x overflow the dtype inside the product (fp16 x = 60000, fp32
    # x = 1e38): the row came out NaN in train and eval. The bits only need the sign of
    # x.(c_1 - c_0): the row is scaled by a power of two first; y is the sum of codebook rows
    torch.manual_seed(7)
    ours = Bitcodes(16, 8, 1.0).to(dtype).train(training)
    x = (torch.randn(32, 16).sign() * scale).to(dtype)
    x[:4] = torch.randn(4, 16).to(dtype)  # ordinary rows alongside
    xg = x.clone().requires_grad_()
    y, bits = ours(xg)
    s64 = F.linear(x.double(), ours.codebook.detach().double()).unflatten(-1, (8, 2))
    assert not F.linear(x[4:], ours.codebook.detach()).isfinite().all()  # the case: overflow
    assert y.isfinite().all() and torch.equal(ours.from_bits(bits), y)
    if training:  # the noise is O(1), the score gaps of the big rows ~ scale: the noiseless bits
        assert torch.equal(bits[4:], s64[4:].argmax(-1))
        (y.float() * torch.randn(y.shape)).sum().backward()
        assert xg.grad.isfinite().all() and ours.codebook.grad.isfinite().all()
    else:
        assert torch.equal(bits, s64.argmax(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_y_is_finite_where_the_exact_sum_of_rows_is(backend, device, dtype, training):
    # P11: rows 3e38 + 3e38 - 3e38 summed in float32 in bit order gave +inf; exactly 3e38.
    # Column 1 holds ordinary values: bitwise the plain product; column 2: a sum beyond the
    # range stays +inf
    bc = Bitcodes(3, 3, 1.0).to(device=device, dtype=dtype).train(training)
    cb = torch.tensor([[3e38, 0.5, 3e38], [3e38, 0.25, 3e38], [3e38, -1.5, 3e38],
                       [3e38, 2.0, 3e38], [-3e38, 0.125, 3e38], [-3e38, 3.0, 3e38]])
    with torch.no_grad():
        bc.codebook.copy_(cb.to(dtype))
    torch.manual_seed(0)
    y, bits = bc(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], device=device, dtype=dtype))
    sel = F.one_hot(bits, 2).flatten(-2).double()
    exact = sel @ bc.codebook.detach().double()
    for out, want in ((y.detach(), exact), (bc.from_bits(bits).detach(), exact)):
        assert out[:, 0].isfinite().all() and torch.equal(out[:, 0], want[:, 0].to(dtype)), out
        assert torch.equal(out[:, 1], (sel.to(dtype) @ bc.codebook.detach()[:, 1:2]).squeeze(1)), out
        assert (out[:, 2] == float("inf")).all(), out


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_fp16_rows_at_the_range_pick_the_exact_bits(training):
    # probe2 Q4: x = (-65504, -65504) needs a scale 2^-19, below fp16's normals: the row scale
    # was clamped at 2^-14, both scores still overflowed to +inf and the tie picked bit 0.
    # float64 scores: row 0 4.29e9, row 1 8.58e9 -> bit 1 (x = -60000: 3.93e9 vs 7.86e9)
    bc = Bitcodes(2, 1, 1.0).half().train(training)
    with torch.no_grad():
        bc.codebook.copy_(torch.tensor([[-65504.0, -2.5e-6], [-65504.0, -65504.0]]))
    x = torch.tensor([[-65504.0, -65504.0], [-1.0, -1.0], [-60000.0, -60000.0]]).half()
    torch.manual_seed(0)
    y, bits = bc(x)
    s64 = F.linear(x.double(), bc.codebook.detach().double())
    assert torch.equal(bits.flatten(), s64.argmax(-1)) and bits.flatten().tolist() == [1, 1, 1]
    assert torch.equal(y.detach(), bc.codebook.detach()[bits.flatten()])


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_fp32_rows_at_the_range_pick_the_exact_bits(training):
    # the float32 analogue of probe2 Q4: x = 3e38 against rows near the range needs a scale
    # 2^-130 (bound 3.6e77 / 8.5e37), below fp32's normals: clamped at 2^-126, both scores
    # overflowed to +inf and the tie picked bit 0. float64 scores: 2.7e77 < 3.6e77 -> bit 1
    bc = Bitcodes(4, 1, 1.0).train(training)
    with torch.no_grad():
        bc.codebook.copy_(torch.tensor([[3e38, 3e38, 3e38, 1.0], [3e38, 3e38, 3e38, 3e38]]))
    x = torch.tensor([[3e38, 3e38, 3e38, 3e38], [1.0, 1.0, 1.0, 1.0], [-3e38, -3e38, -3e38, -3e38]])
    torch.manual_seed(0)
    y, bits = bc(x)
    s64 = F.linear(x.double(), bc.codebook.detach().double())
    assert torch.equal(bits.flatten(), s64.argmax(-1)) and bits.flatten().tolist() == [1, 1, 0]
    assert torch.equal(y.detach(), bc.codebook.detach()[bits.flatten()])


@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")], ids=["inf", "-inf", "nan"])
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_a_nonfinite_entry_reaches_only_the_sums_that_select_it(bad, training):
    # probe2 Q3: one infinite / NaN codebook entry made every row of its column NaN (0 * inf in
    # the one-hot product), also rows that do not select it. Exact sums (float64): bits [0, 1]
    # -> 1 + 3 = 4, [1, 1] -> 2 + 3 = 5, [1, 0] -> 2 + bad
    bc = Bitcodes(2, 2, 1.0).train(training)
    with torch.no_grad():
        bc.codebook.copy_(torch.tensor([[1.0, -1.0], [2.0, 0.5], [bad, 0.25], [3.0, 8.0]]))
    bits = torch.tensor([[0, 1], [1, 1], [1, 0]])
    out = bc.from_bits(bits).detach()
    assert out[:2].tolist() == [[4.0, 7.0], [5.0, 8.5]], out
    assert torch.equal(out[2, 1], torch.tensor(0.75)) and (out[2, 0] == bad or (out[2, 0].isnan() and bad != bad))
    if bad != bad:
        return  # forward: x.c is NaN for every x that meets the NaN entry: a NaN row (documented)
    torch.manual_seed(0)  # x = (-1, 0): bits [0, 1] (scores -1 > -2; -bad vs -3), y = 1 + 3 for bad = +inf
    y, b = bc(torch.tensor([[-1.0, 0.0]]))
    sel = F.one_hot(b, 2).flatten(-2).bool()[0]
    want = torch.tensor([bc.codebook.detach()[sel, 1].double().sum()])
    assert torch.equal(y.detach()[0, 1:].double(), want)
    if bad == float("inf") and not training:
        assert b.tolist() == [[0, 1]] and y.detach().tolist() == [[4.0, 7.0]]


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_fp16_sum_with_a_subnormal_term_is_the_exact_one(training):
    # probe2 Q5: -65504 + 65504 - 7.2718e-6 (an fp16 subnormal, 122 steps) came out 0: the fp16
    # product flushed the small term. Exact (float64): -7.271766662597656e-06, representable
    bc = Bitcodes(1, 3, 1.0).half().train(training)
    with torch.no_grad():
        bc.codebook.copy_(torch.tensor([[-65504.0], [1.0], [65504.0], [1.0], [-7.271766662597656e-06], [1.0]]))
    out = bc.from_bits(torch.tensor([[0, 0, 0], [1, 0, 1]])).detach()
    exact = torch.tensor([[-65504.0 + 65504.0 - 7.271766662597656e-06], [1.0 + 65504.0 + 1.0]], dtype=torch.float64)
    assert torch.equal(out, exact.half()), out
    y, bits = bc(torch.tensor([[1.0]]).half())  # scores: rows 1, 2, 5 win: 1 + 65504 + 1
    assert torch.equal(y.detach(), bc.from_bits(bits).detach())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_16bit_bits_are_decided_on_float32_scores(dtype, training):
    # probe3 R2: the scores of 16-bit x were rounded to its dtype before the comparison: 256.5
    # and 256.75 both became 256 in bf16, and the tie picked bit 0. Like every search op, the
    # bits now follow float32 products: the float64 choice wherever its gap exceeds their rounding
    bc = Bitcodes(4, 1, 1.0).to(dtype).eval()
    with torch.no_grad():
        bc.codebook.copy_(torch.tensor([[1.0, 1.0, 0.0, 0.0], [1.0, 0.0, 1.0, 1.0]]))
    x = torch.tensor([[256.0, 0.5, 0.25, 0.5]], dtype=dtype)
    assert bc(x)[1].item() == 1  # 256.75 > 256.5
    with torch.autocast(x.device.type, dtype=dtype):  # probe3 R2b: autocast rounded the product again
        assert bc(x)[1].item() == 1 and bc.float()(x.float())[1].item() == 1

    torch.manual_seed(3)
    bc = Bitcodes(64, 16, 1.0).to(dtype).train(training)
    x = (torch.randn(2048, 64) * 4).to(dtype)
    torch.manual_seed(4)
    _, bits = bc(x)
    s64 = F.linear(x.double(), bc.codebook.detach().double()).unflatten(-1, (16, 2))
    if training:  # the same Gumbel draw as the module's (F.gumbel_softmax's stream, x's dtype)
        torch.manual_seed(4)
        s64 = s64 + (-torch.empty(s64.shape, dtype=dtype).exponential_().log()).double()
    gap = (s64[..., 1] - s64[..., 0]).abs()
    bound = 2 * 64 * 2.0**-23 * (x.double().abs() @ bc.codebook.detach().double().abs().T).unflatten(-1, (16, 2)).amax(-1)
    clear = gap > bound + 4 * 2.0**-23 * s64.abs().amax(-1)  # (training: the noise's float32 rounding)
    assert clear.float().mean() > 0.99
    wrong = clear & (bits != s64.argmax(-1))
    assert not wrong.any(), f"{int(wrong.sum())} bits differ from float64 (gaps {gap[wrong][:4].tolist()})"


def test_the_smallest_float32_temperature_trains_with_finite_gradients():
    # probe3 R7: 1e-46 (0 in float32) was accepted and gave NaN gradients; the smallest accepted
    # temperature, one float32 subnormal, gives finite ones
    torch.manual_seed(0)
    bc = Bitcodes(4, 3, 1e-45).train()
    x = torch.randn(5, 4, requires_grad=True)
    y, _ = bc(x)
    (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
    assert x.grad.isfinite().all() and bc.codebook.grad.isfinite().all()
