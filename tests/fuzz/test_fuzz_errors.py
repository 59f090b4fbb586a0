"""Fuzz: what makes no sense is rejected with a ValueError (TypeError for a wrong type) that
names the argument: constructor sizes given as bools or non-integral floats, non-finite or
out-of-range temperatures, decays, epsilons and thresholds, bad flags and choices; and every
op's tensor arguments given with a wrong dtype, rank, type or device."""

from __future__ import annotations

import math
import re

import pytest
import torch

import fastvq


def _id(value) -> str:
    """A short test id for a bad value (``10**400`` in full is 400 digits)."""
    return "10**400" if value is BIG else repr(value)

# ---------------------------------------------------------------------------- bad values by kind

BIG = 10**400  # an int no float holds (float() raises OverflowError)

BAD = {
    "size": (True, False, 4.5, 2.0000001, -1, "4", None, math.nan, math.inf, 1j, 10**19, BIG),
    "size0": (True, 4.5, -1, "4", None, math.nan, math.inf, 10**19, BIG),  # sizes where 0 is allowed
    "size_or_none": (True, 4.5, 0, -1, "4", math.nan, 10**19, BIG),
    # (module options, used as float32 scalars: beyond float32's range is refused too)
    "nonneg": (math.nan, math.inf, -math.inf, -1.0, True, "0.1", None, BIG, 1e39, 3.5e38),
    "positive": (0.0, -1.0, math.nan, math.inf, -math.inf, True, False, "1", None, BIG),
    "positive32": (0.0, -1.0, math.nan, math.inf, -math.inf, True, False, "1", None, BIG, 1e39),
    "decay": (math.nan, math.inf, -0.1, 1.5, True, "0.9", None, BIG),
    "bool": (1, 0, "yes", None, 2.0),
    "choice": ("L2", "", None, 1, "nope"),
}

#: The values of a wrong type, by kind: a ``TypeError`` (as the ops raise), never a ValueError.
WRONG_TYPE = {
    "size": (True, False, "4", None, 1j), "size0": (True, "4", None), "size_or_none": (True, "4"),
    "nonneg": (True, "0.1", None), "positive": (True, False, "1", None), "positive32": (True, False, "1", None),
    "decay": (True, "0.9", None), "bool": (1, 0, "yes", None, 2.0), "choice": (None, 1),
}

# (constructor, valid kwargs, {argument: kind})
CTORS = {
    "VectorQuantizer": (
        lambda **kw: fastvq.nn.VectorQuantizer(**kw),
        dict(num_embeddings=4, embedding_dim=3),
        dict(num_embeddings="size", embedding_dim="size", commitment_cost="nonneg", metric="choice", grad="choice",
             ema="bool", decay="decay", eps="positive32", dead_code_threshold="nonneg", kmeans_init="bool",
             kmeans_iters="size0"),
    ),
    "ResidualQuantizer": (
        lambda **kw: fastvq.nn.ResidualQuantizer(**kw),
        dict(num_quantizers=2, num_embeddings=4, embedding_dim=3),
        dict(num_quantizers="size", num_embeddings="size", embedding_dim="size", commitment_cost="nonneg",
             ema="bool", decay="decay", eps="positive32", grad="choice", dead_code_threshold="nonneg",
             kmeans_init="bool", kmeans_iters="size0"),
    ),
    "RQVAE": (
        lambda **kw: fastvq.nn.RQVAE(**kw),
        dict(input_dim=5, hidden_dim=4, latent_dim=3, num_quantizers=2, num_embeddings=4),
        dict(input_dim="size", hidden_dim="size", latent_dim="size", num_quantizers="size", num_embeddings="size",
             commitment_cost="nonneg"),
    ),
    "QREmbedding": (
        lambda **kw: fastvq.nn.QREmbedding(**kw),
        dict(num_embeddings=100, embedding_dim=4),
        dict(num_embeddings="size", embedding_dim="size", num_collisions="size_or_none", op="choice",
             sparse="bool", mode="choice", deterministic="bool"),
    ),
    "Bitcodes": (
        lambda **kw: fastvq.nn.Bitcodes(**kw),
        dict(features=4, num_bits=3, temperature=1.0),
        dict(features="size", num_bits="size", temperature="positive"),
    ),
    "CodeUsageMeter": (
        lambda **kw: fastvq.CodeUsageMeter(**kw),
        dict(codebook_size=4),
        dict(codebook_size="size"),
    ),
}

CTOR_CASES = [
    pytest.param(ctor, arg, value, id=f"{ctor}-{arg}={_id(value)}")
    for ctor, (_, _, args) in CTORS.items() for arg, kind in args.items() for value in BAD[kind]
]


def _expect_rejected(what: str, arg: str, value, call):
    try:
        call()
    except (ValueError, TypeError) as err:
        if not re.search(rf"\b{re.escape(arg)}\b", str(err)):
            pytest.fail(f"{what}({arg}={value!r}) raised {type(err).__name__} without naming {arg!r}: {err}")
        return
    except Exception as err:  # noqa: BLE001
        pytest.fail(f"{what}({arg}={value!r}) raised {type(err).__name__}, not ValueError/TypeError: {err}")
    pytest.fail(f"{what}({arg}={value!r}) was accepted")


@pytest.mark.parametrize("ctor,arg,value", CTOR_CASES)
def test_constructor_rejects(ctor, arg, value):
    """Every documented argument, given a value of the wrong class (bool for an int, 4.5 for a
    size, NaN/inf for a float, a truthy string for a flag, ...), is refused by name. Every
    listed bad value is tried (a table, not a sample)."""
    make, valid, _ = CTORS[ctor]
    _expect_rejected(ctor, arg, value, lambda: make(**dict(valid, **{arg: value})))


WRONG_TYPE_CASES = [
    pytest.param(ctor, arg, value, id=f"{ctor}-{arg}={_id(value)}")
    for ctor, (_, _, args) in CTORS.items() for arg, kind in args.items() for value in WRONG_TYPE[kind]
]


@pytest.mark.parametrize("ctor,arg,value", WRONG_TYPE_CASES)
def test_constructor_wrong_type_is_type_error(ctor, arg, value):
    """A value of the wrong type (a bool for a number, a string, None, an int for a flag, a
    number for a choice) is a ``TypeError`` naming the argument in every constructor, as in
    the ops (``code_statistics(..., num_codes=True)``), never a ValueError."""
    make, valid, _ = CTORS[ctor]
    with pytest.raises(TypeError, match=rf"\b{re.escape(arg)}\b"):
        make(**dict(valid, **{arg: value}))


# (constructor, argument, value): each size within int64 but whose tensor torch cannot size
OVERSIZE = [
    ("VectorQuantizer", "num_embeddings", 2**62), ("VectorQuantizer", "embedding_dim", 2**62),
    ("ResidualQuantizer", "num_embeddings", 2**61), ("ResidualQuantizer", "num_quantizers", 2**62),
    ("RQVAE", "input_dim", 2**62), ("RQVAE", "hidden_dim", 2**62), ("RQVAE", "latent_dim", 2**62),
    ("QREmbedding", "embedding_dim", 2**62), ("QREmbedding", "num_collisions", 2**62),
    ("Bitcodes", "features", 2**62), ("Bitcodes", "num_bits", 2**62),
]


@pytest.mark.parametrize("ctor,arg,value", OVERSIZE, ids=[f"{c}-{a}" for c, a, _ in OVERSIZE])
def test_constructor_rejects_unsizable_tensor(ctor, arg, value):
    """Sizes whose float32 parameter would overflow torch's int64 byte count are a ValueError
    naming the argument (they were torch's 'Storage size calculation overflowed')."""
    make, valid, _ = CTORS[ctor]
    with pytest.raises(ValueError, match=rf"fastvq\.{ctor}: .*\b{arg}\b"):
        make(**dict(valid, **{arg: value}))


QR_PAIR_BAD = ((True, 3), (2.5, 3), (0, 3), (3, -1), (3,), (3, 3, 3))


@pytest.mark.parametrize("pair", QR_PAIR_BAD, ids=repr)
def test_qr_embedding_rejects_bad_width_pair(pair):
    _expect_rejected("QREmbedding", "embedding_dim", pair,
                     lambda: fastvq.nn.QREmbedding(100, pair, op="concat"))


# (function, valid call given a value, argument, kind)
FUNCS = {
    "code_statistics.num_codes": (lambda v: fastvq.code_statistics(torch.randn(3, 2), torch.zeros(3, dtype=torch.long), v),
                                  "num_codes", "size0"),
    "code_statistics.deterministic": (lambda v: fastvq.code_statistics(torch.randn(3, 2), torch.zeros(3, dtype=torch.long), 2,
                                                                       deterministic=v), "deterministic", "bool"),
    "code_usage.codebook_size": (lambda v: fastvq.code_usage(torch.zeros(3, dtype=torch.long), v), "codebook_size", "size"),
    "to_bits.num_bits": (lambda v: fastvq.to_bits(torch.zeros(3, dtype=torch.long), v), "num_bits", "size"),
    "pairwise_kl_loss.temperature": (lambda v: fastvq.pairwise_kl_loss(torch.randn(3, 2), torch.randn(3, 2), v),
                                     "temperature", "positive"),
    "nearest_code.metric": (lambda v: fastvq.nearest_code(torch.randn(3, 2), torch.randn(4, 2), v), "metric", "choice"),
    "nearest_code.allow_tf32": (lambda v: fastvq.nearest_code(torch.randn(3, 2), torch.randn(4, 2), allow_tf32=v),
                                "allow_tf32", "bool"),
    "mine_negatives.strategy": (lambda v: fastvq.mine_negatives(torch.randn(3, 2), torch.randn(3, 2), torch.randn(4, 2), v),
                                "strategy", "choice"),
    "qr_lookup.op": (lambda v: fastvq.qr_lookup(torch.arange(3), torch.randn(2, 2), torch.randn(2, 2), v), "op", "choice"),
    "qr_lookup.mode": (lambda v: fastvq.qr_lookup(torch.arange(3), torch.randn(2, 2), torch.randn(2, 2),
                                                  offsets=torch.tensor([0]), mode=v), "mode", "choice"),
    "qr_lookup.deterministic": (lambda v: fastvq.qr_lookup(torch.arange(3), torch.randn(2, 2), torch.randn(2, 2),
                                                           deterministic=v), "deterministic", "bool"),
    "qr_lookup.sparse": (lambda v: fastvq.qr_lookup(torch.arange(3), torch.randn(2, 2), torch.randn(2, 2), sparse=v),
                         "sparse", "bool"),
    "RQVAE.semantic_ids.batch_size": (lambda v: fastvq.nn.RQVAE(3, 4, 2, 1, 3).semantic_ids(torch.randn(5, 3), batch_size=v,
                                                                                             progress=False),
                                      "batch_size", "size"),
}


FUNC_CASES = [pytest.param(name, value, id=f"{name}={_id(value)}")
              for name, (_, _, kind) in FUNCS.items() for value in BAD[kind]]


@pytest.mark.parametrize("name,value", FUNC_CASES)
def test_function_rejects(backend, name, value):
    call, arg, _ = FUNCS[name]
    _expect_rejected(name, arg, value, lambda: call(value))


# ---------------------------------------------------------------------------- tensor arguments


def _f(*shape):
    return torch.randn(*shape)


# op -> (call(**tensors), valid tensors, {arg: [(corruption, expected exception)]})
def _ops():
    idx3 = torch.zeros(3, dtype=torch.long)
    return {
        "nearest_code": (lambda x, codebook: fastvq.nearest_code(x, codebook),
                         dict(x=_f(3, 2), codebook=_f(4, 2)),
                         dict(x=("float64", "int", "bool", "scalar", "list", "width", "meta"),
                              codebook=("float64", "int", "bool", "rank1", "rank4", "list", "width", "empty", "meta"))),
        "pairwise_sqdist": (lambda a, b: fastvq.pairwise_sqdist(a, b),
                            dict(a=_f(3, 2), b=_f(4, 2)),
                            dict(a=("float64", "int", "bool", "rank1", "rank3", "list", "width", "meta"),
                                 b=("float64", "int", "bool", "rank1", "rank3", "list", "width", "meta"))),
        "mine_negatives": (lambda anchor, positive, negatives: fastvq.mine_negatives(anchor, positive, negatives),
                           dict(anchor=_f(3, 2), positive=_f(3, 2), negatives=_f(4, 2)),
                           dict(anchor=("float64", "int", "rank1", "list", "meta"),
                                positive=("float64", "int", "rank1", "rows", "list", "meta"),
                                negatives=("float64", "int", "rank1", "width", "empty", "list", "meta"))),
        "residual_quantize": (lambda x, codebooks: fastvq.residual_quantize(x, codebooks),
                              dict(x=_f(3, 2), codebooks=_f(2, 4, 2)),
                              dict(x=("float64", "int", "bool", "scalar", "list", "width", "meta"),
                                   codebooks=("float64", "int", "rank2", "list", "width", "empty", "meta"))),
        "code_statistics": (lambda x, indices: fastvq.code_statistics(x, indices, 4),
                            dict(x=_f(3, 2), indices=idx3),
                            dict(x=("float64", "int", "list", "rows", "meta"),
                                 indices=("float32", "bool", "list", "rows", "meta"))),
        "rotation_trick": (lambda e, q: fastvq.rotation_trick(e, q),
                           dict(e=_f(3, 2), q=_f(3, 2)),
                           dict(e=("float64", "int", "scalar", "list", "width", "meta"),
                                q=("float64", "int", "scalar", "list", "width", "meta"))),
        "qr_lookup": (lambda ids, q_weight, r_weight: fastvq.qr_lookup(ids, q_weight, r_weight),
                      dict(ids=idx3, q_weight=_f(2, 2), r_weight=_f(2, 2)),
                      dict(ids=("float32", "bool", "list", "meta"),
                           q_weight=("float64", "int", "rank1", "list", "empty", "meta"),
                           r_weight=("float64", "int", "rank1", "list", "width", "empty", "meta"))),
        "pairwise_kl_loss": (lambda pred, target: fastvq.pairwise_kl_loss(pred, target, 1.0),
                             dict(pred=_f(3, 2), target=_f(3, 5)),
                             dict(pred=("float64", "int", "rank1", "list", "rows", "meta"),
                                  target=("float64", "int", "rank1", "list", "rows", "meta"))),
        "to_bits": (lambda indices: fastvq.to_bits(indices, 4), dict(indices=idx3),
                    dict(indices=("float32", "bool", "list"))),
        "to_decimal": (lambda bits: fastvq.to_decimal(bits), dict(bits=torch.zeros(3, 4, dtype=torch.long)),
                       dict(bits=("scalar", "list", "complex"))),
        "code_usage": (lambda indices: fastvq.code_usage(indices, 4), dict(indices=idx3),
                       dict(indices=("float32", "bool", "list"))),
        "semantic_ids": (lambda codes: fastvq.semantic_ids(codes), dict(codes=torch.zeros(3, 2, dtype=torch.long)),
                         dict(codes=("float32", "bool", "rank1", "rank3", "list"))),
    }


def _corrupt(t: torch.Tensor, how: str):
    if how == "float64":
        return t.double()
    if how == "float32":
        return t.float()
    if how == "int":
        return t.long()
    if how == "bool":
        return t.bool()
    if how == "complex":
        return t.to(torch.complex64)
    if how == "scalar":
        return t.reshape(-1)[0].clone() if t.numel() else torch.tensor(0.0)
    if how == "rank1":
        return t.reshape(-1)
    if how == "rank2":
        return t.reshape(-1, t.shape[-1])
    if how == "rank3":
        return t.unsqueeze(0)
    if how == "rank4":
        return t.unsqueeze(0).unsqueeze(0)
    if how == "list":
        return t.tolist()
    if how == "width":
        return torch.cat([t, t[..., :1]], dim=-1)
    if how == "rows":
        return torch.cat([t, t[:1]], dim=0)
    if how == "empty":
        return t[..., :0, :] if t.dim() >= 2 else t[:0]
    if how == "meta":
        return t.to("meta")
    raise ValueError(how)


OP_CASES = [pytest.param(op, arg, how, id=f"{op}-{arg}-{how}")
            for op, (_, _, args) in _ops().items() for arg, hows in args.items() for how in hows]


@pytest.mark.parametrize("op,arg,how", OP_CASES)
def test_op_rejects_bad_tensor(backend, op, arg, how):
    """A tensor argument of the wrong dtype, rank, type, width, row count or device (or an
    empty codebook) is a ValueError/TypeError naming that argument, on both backends."""
    call, valid, _ = _ops()[op]
    kwargs = dict(valid)
    kwargs[arg] = _corrupt(valid[arg], how)
    _expect_rejected(op, arg, how, lambda: call(**kwargs))
