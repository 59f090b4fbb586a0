"""cliprobe: findings of an independent probe of the command line, the README, the example and
the vector-quantize-pytorch integration, all fixed (each test failed before its fix):

C1 ``patched()`` blocks overlapping in two threads (the first to end unpatched VQP under the
other); C2 ``--traffic --ops`` names (``--list --traffic`` prints them); C3 the example's
``--device cuda`` without CUDA (a usage error now); C4 the KL forward formed (-inf) - (-inf)
(numpy warned under the interpreter); C5 ``check --dtypes float32 float32`` ran twice; C6
RQVAE's unknown keywords named ResidualQuantizer; C7 the console script's usage line; C8 no
Bitcodes, topk_codes or sample_code traffic rows; C9, C12 README statements the sm_90 file
contradicted; C10 ``fastvq.bench.vqp --steps 0``; C11 ``fastvq.backend`` blocks overlapping in
two threads popped each other's entry; C13 the example's verdict on a tie. Nothing here writes
into the repository (tmp_path only)."""

import importlib.util
import pathlib
import threading
import warnings

import pytest
import torch

import fastvq
from fastvq.__main__ import main

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "qr_pairwise_geometry.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("qr_pairwise_geometry_cliprobe", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_c1_patched_blocks_in_two_threads_keep_the_patch():
    pytest.importorskip("vector_quantize_pytorch")
    from fastvq.integrations import vector_quantize_pytorch as fastvq_vqp

    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with fastvq_vqp.patched():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def second():
        a_in.wait(10)
        with fastvq_vqp.patched():
            b_in.set()
            a_out.wait(10)
            seen["patched"] = fastvq_vqp.is_patched()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(20)
    finally:
        fastvq_vqp.unpatch()
    assert seen["patched"], "the second thread's patched() block ran on unpatched VQP"


class _Reached(Exception):
    pass


def test_c2_traffic_takes_the_names_that_list_prints(monkeypatch, capsys, tmp_path):
    # (cliprobe C2: `--traffic --ops` takes words of the traffic rows' names, not --list's timing
    # groups, and nothing printed them: `--list --traffic` does now, and each is taken)
    from fastvq.bench import traffic

    assert main(["bench", "--list", "--traffic"]) == 0
    names = capsys.readouterr().out.splitlines()
    assert names == [c.name for c in traffic.all_cases()]

    def stop(*args, **kwargs):
        raise _Reached

    monkeypatch.setattr(traffic, "run_case", stop)
    for name in (names[0], names[-1]):
        with pytest.raises(_Reached):
            main(["bench", "--traffic", "--ops", name, "--out", str(tmp_path)])
    # a timing group is not a traffic row: a usage error (exit 2) that says so
    assert main(["bench", "--traffic", "--ops", "vector_quantizer_step", "--out", str(tmp_path)]) == 2
    assert "--list --traffic" in capsys.readouterr().err


@pytest.mark.about_devices("asks the example for CUDA on a machine without it")
@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_c3_example_device_without_cuda_is_a_usage_error():
    with pytest.raises(SystemExit):
        _load_example().main(["--device", "cuda", "--items", "64", "--epochs", "1", "--no-progress", "--qr-only"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter runs only without CUDA")
def test_c4_interpreted_pairwise_kl_loss_is_warning_free():
    torch.manual_seed(0)
    pred = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    target = torch.nn.functional.normalize(torch.randn(16, 8), dim=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        with fastvq.backend("triton"):
            fastvq.pairwise_kl_loss(pred, target, 0.5)


def test_c5_check_runs_each_op_and_dtype_once(monkeypatch, capsys):
    from fastvq import check

    calls = []
    monkeypatch.setattr(check, "CHECKS", {"fake_op": lambda device, dtype: calls.append(dtype) or 0.0})
    assert main(["check", "--dtypes", "float32", "float32"]) == 0
    assert len(calls) == 1


def test_c6_rqvae_unknown_keyword_names_rqvae():
    with pytest.raises(TypeError, match="RQVAE"):
        fastvq.nn.RQVAE(8, 16, 4, 2, 16, emma=True)


def test_c7_console_script_names_itself(monkeypatch, capsys):
    monkeypatch.setattr("sys.argv", ["fastvq", "--help"])
    with pytest.raises(SystemExit):
        main()
    assert "usage: fastvq " in capsys.readouterr().out


def test_c8_traffic_covers_every_module_and_op():
    # (cliprobe C8: the README said "every module's training step and every op" with no Bitcodes,
    # topk_codes or sample_code row; the rows exist now, and the README lists the modules)
    from fastvq.bench.traffic import all_cases

    rows = " ".join(c.name for c in all_cases())
    modules = [m for m in fastvq.nn.__all__ if m not in rows]
    ops = [op for op in ("nearest_code", "topk_codes", "sample_code", "pairwise_sqdist", "mine_negatives",
                         "residual_quantize", "code_statistics", "rotation_trick", "qr_lookup", "pairwise_kl_loss",
                         "to_bits", "to_decimal", "code_usage", "semantic_ids") if op not in rows]
    assert not modules and not ops, (modules, ops)


def test_c9_readme_spill_claim_matches_sm90_static_json():
    # (cliprobe C9: the README said no kept launch of the residual forward's 8-warp configs spills;
    # the chunked forward's do, a little: the README now says which, and how much)
    import json

    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "the chunked forward (D above the register blocks' limit) states no limit and keeps 8-56 B" in readme
    records = json.loads((ROOT / "benchmarks" / "results" / "sm90-static.json").read_text())["records"]
    kept = [r for r in records if r.get("ok") and r.get("kept") and "_residual_quantize_fwd" in r["kernel"]
            and "w=8" in r["config"]]
    assert not [r for r in kept if "chunked" not in r["kernel"] and r["spill"] > 0]
    chunked = [r["spill"] for r in kept if "chunked" in r["kernel"] and r["spill"] > 0]
    assert chunked and 8 <= min(chunked) and max(chunked) <= 56, sorted(set(chunked))


def test_c10_vqp_measurement_refuses_zero_steps():
    pytest.importorskip("vector_quantize_pytorch")
    from fastvq.bench import vqp

    with pytest.raises(SystemExit):
        vqp.main(["--steps", "0", "--n", "8", "--dim", "4", "--k", "4"])


def test_c11_backend_blocks_in_two_threads_keep_their_backend():
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with fastvq.backend("reference"):
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def second():
        a_in.wait(10)
        with fastvq.backend("triton"):
            b_in.set()
            a_out.wait(10)
            seen["inside"] = fastvq.get_backend()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen["inside"] == "triton"


def test_c12_readme_bf16_tile_claim_matches_sm90_static_json():
    # (cliprobe C12: the README said the bf16 search keeps only 64-row 8-warp tiles on sm_90;
    # at D = 32 others fit: the claim is now for D >= 64, and the D = 32 tiles are named)
    import json
    import re

    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "search at D >= 64 now keeps only 64-row tiles at 8 warps on sm_90" in readme
    records = json.loads((ROOT / "benchmarks" / "results" / "sm90-static.json").read_text())["records"]
    tiles = {}
    for r in records:
        if r["kernel"].endswith("_nearest_code_fwd_kernel") and r["target"] == "sm_90" and r.get("kept") and r.get("ok"):
            for call in r["calls"]:
                if " bf16 " in call and "nearest_code" in call and "pinned" not in r["config"]:
                    d = int(re.search(r" D=(\d+)", call).group(1))
                    tiles.setdefault(d >= 64, set()).add(re.sub(r",s=\d+", "", r["config"]))
    assert tiles[True] and all("BLOCK_N=64," in t and "w=8" in t for t in tiles[True]), tiles[True]
    assert {"BLOCK_N=128,BLOCK_K=64,w=8", "BLOCK_N=64,BLOCK_K=64,w=4"} <= tiles[False], tiles[False]


def test_c13_example_verdict_on_a_tie_is_not_trail(capsys):
    out = _load_example().main(["--items", "50", "--k", "100", "--epochs", "1", "--no-progress"])
    assert out["qr"] == out["full_same_budget"]  # k clamps to 49 of 49 other items: every model recalls all
    assert "tables trail" not in capsys.readouterr().out
