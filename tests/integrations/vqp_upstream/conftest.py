"""Run vector-quantize-pytorch's own tests (vendored beside this file) with fastvq patched in.

Every selected upstream test runs inside ``fastvq.integrations.vector_quantize_pytorch.patched()``
under a fastvq backend: all of them on ``reference``, and on ``triton`` (interpreted on a CPU)
the subset in :data:`TRITON` that covers every routed path at sizes the interpreter runs in
seconds (VQP's heads are covered by the small parity cases of ``test_vector_quantize_pytorch``).
After each test, the fastvq calls it made are checked against :data:`ROUTED`: a path that stops
going through fastvq fails here, not silently.

Without vector-quantize-pytorch installed the vendored files are not collected
(``tests/integrations/test_vector_quantize_pytorch.py`` reports the skip and its reason).
"""

from __future__ import annotations

import importlib.util

import pytest

import fastvq

HAVE_VQP = importlib.util.find_spec("vector_quantize_pytorch") is not None
collect_ignore_glob = [] if HAVE_VQP else ["test_*.py"]

# Upstream tests of other quantizers (FSQ, LFQ, latent quantization: nothing fastvq routes), and
# one that needs a package VQP does not depend on.
NOT_RUN = {
    "test_fsq": "FSQ: no codebook search to route",
    "test_fsq_without_indices": "FSQ: no codebook search to route",
    "test_rfsq": "residual FSQ: no codebook search to route",
    "test_lfq": "LFQ: no codebook search to route",
    "test_lfq_video": "LFQ: no codebook search to route",
    "test_lfq2": "LFQ: no codebook search to route",
    "test_rflq": "residual LFQ: no codebook search to route",
    "test_latent_q": "latent quantization: no codebook search to route",
    "test_fvq": "needs x_transformers, which vector-quantize-pytorch does not depend on",
    # CI time (3 minutes for all of tests/integrations): the routed path is covered elsewhere
    "test_rq": "~30 s in VQP's own 4096 x 65536 projection; its path (16 separate cosine codebooks in eval) "
    "is test_vq_multiheaded's and the parity grid's",
}

# Parametrizations left out for CI time (upstream id -> why)
NOT_RUN_IDS = {
    **{f"test_residual_vq[0.1-{s}-{t}-{i}]": "quant_grad_frac only scales VQP's own residual gradient"
       for s in ("True", "False") for t in ("True", "False") for i in ("True-False", "False-True", "False-False")},
    "test_beam_search[256]": "same path as test_beam_search[128] (which adds the codebook_dim projection)",
    # QINCo (implicit neural codebook): levels after the first stay on VQP; one variant is kept
    **{f"test_residual_vq[0.0-{s}-{t}-True-False]": "QINCo levels are left to VQP; "
       "test_residual_vq[0.0-False-True-True-False] runs that path"
       for s, t in (("True", "True"), ("True", "False"), ("False", "False"))},
}

# Run on the triton backend too (interpreted on CPU): one upstream test unmodified through the
# kernels, at a size the interpreter runs in a second (ResidualVQ levels of 5, 128 and 256 codes:
# search and gather). test_vq[True-True-True] (cosine, EMA statistics, rotation) took 42 s of CI's
# 7 minutes interpreted at its 1024 x 256 x 512; that path runs on triton in the parity grid of
# ../test_vector_quantize_pytorch.py ("cosine-ema-rotation") and here on reference.
TRITON = {
    "test_tiger",
}
# (The l2 search, masks, k-means init, SimVQ, heads, residual levels, top-k, sampling and
# update_indices run on triton in ../test_vector_quantize_pytorch.py, at sizes the interpreter
# runs in seconds: VQP's test_residual_vq3 takes over 2 minutes interpreted, test_sim_vq half a
# minute, test_topk_and_manual_ema_update and test_vq_mask a quarter each.)

# The fastvq calls each upstream test must make (at least one of each kind; the whole test
# name or, for parametrized ones, its function name).
ROUTED = {
    "test_vq": {"search", "gather", "statistics"},
    # ids: input_requires_grad-rotation_trick-use_cosine_sim
    "test_vq[True-True-True]": {"search", "gather", "statistics", "rotation"},
    "test_vq[True-True-False]": {"search", "gather", "statistics", "rotation"},
    "test_vq_eval": {"search", "gather"},
    "test_vq_mask": {"search", "gather", "statistics"},
    "test_residual_vq": {"search", "gather"},
    "test_residual_vq2": {"sample", "gather", "statistics"},
    "test_grouped_residual_vq": {"search", "gather", "statistics"},
    "test_residual_vq3": {"kmeans", "search", "gather", "statistics"},
    "test_vq_lower_codebook": {"search", "gather", "statistics"},
    "test_vq_cosine_sim": {"search", "gather", "statistics"},
    "test_vq_expire_code": {"search", "gather", "statistics"},
    "test_vq_multiheaded": {"search", "gather", "statistics"},
    "test_rq": {"search", "gather"},
    "test_tiger": {"search", "gather"},
    "test_directional_reparam": {"search", "gather"},
    "test_sim_vq": {"simvq", "search", "gather", "rotation"},
    "test_residual_sim_vq": {"simvq", "search", "gather", "rotation"},
    "test_vq_custom_ema_update_weighting": {"search", "gather", "statistics"},
    "test_accum_ema_update": {"search", "gather", "statistics"},
    "test_vq_3d": {"search", "gather"},
    "test_hq": {"search", "gather", "statistics"},
    "test_diveq": {"search", "gather"},
    "test_topk_and_manual_ema_update": {"search", "topk", "gather", "statistics"},
    "test_beam_search": {"topk", "gather", "statistics", "rotation"},
}


def _names(item):
    """(function name, name with the upstream parameters, without the backend)."""
    name = item.name
    base = item.originalname or name.split("[")[0]
    if "[" in name:
        params = name[name.index("[") + 1 : -1].split("-")
        params = [p for p in params if p not in ("reference", "triton")]
        name = f"{base}[{'-'.join(params)}]" if params else base
    return base, name


def pytest_collection_modifyitems(config, items):
    here = __file__.rsplit("/", 1)[0]
    keep, drop = [], []
    for item in items:
        if not str(item.fspath).startswith(here):
            keep.append(item)
            continue
        base, name = _names(item)
        backend = item.callspec.params.get("fastvq_vqp_backend") if hasattr(item, "callspec") else None
        if base in NOT_RUN or name in NOT_RUN_IDS or (backend == "triton" and name not in TRITON and base not in TRITON):
            drop.append(item)
        else:
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(autouse=True, params=["reference", "triton"])
def fastvq_vqp_backend(request):
    """Run the upstream test patched, under one fastvq backend; then check what went through fastvq."""
    from fastvq.integrations import vector_quantize_pytorch as fastvq_vqp

    fastvq_vqp.reset_counts()
    with fastvq.backend(request.param), fastvq_vqp.patched():
        yield request.param
    made = fastvq_vqp.counts()
    base, name = _names(request.node)
    expected = ROUTED.get(name, ROUTED.get(base))
    assert expected is not None, f"{name}: add the fastvq calls it must make to ROUTED"
    missing = sorted(k for k in expected if not made.get(k))
    assert not missing, f"{name} made no {missing} call through fastvq (it made {made})"
