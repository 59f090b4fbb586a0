"""The pairwise-geometry example, end to end at tiny settings (seconds)."""

import importlib.util
import pathlib

import pytest

import fastvq
from tests.utils import DEVICE

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "qr_pairwise_geometry.py"


def _load():
    spec = importlib.util.spec_from_file_location("qr_pairwise_geometry", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY = ["--items", "512", "--epochs", "8", "--batch-size", "128", "--k", "20", "--no-progress", "--device", DEVICE]


def test_measures_qr_against_full_tables(capsys):
    recall = _load().main(TINY + ["--seed", "1"])
    chance = 20 / 511
    assert recall["chance"] == pytest.approx(chance)
    assert recall["qr"] > 4 * chance, f"recall@20 {recall['qr']:.3f} vs chance {chance:.3f}"
    out = capsys.readouterr().out
    assert "recall@20" in out and "10.0x fewer parameters" in out
    # what the compression is, plainly: rows per item, the width's share, chance
    assert "two 205 x 32 tables, 410 rows for 512 items (1.25x fewer rows than one per item" in out
    assert "of which 8.0x is the narrower width" in out
    # the claim is measured: a table of the three models with their parameter counts and recalls
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    assert "13,120" in lines["QR tables, two 205 x 32"] and "10.0x" in lines["QR tables, two 205 x 32"]
    assert "16,384" in lines["full table, same width, 512 x 32"]
    assert "12,800" in lines["full table, same budget, 512 x 25"]  # floor(13,120 / 512) = 25-d rows
    for key, label in (("qr", "QR tables, two 205 x 32"), ("full_same_width", "full table, same width, 512 x 32"),
                       ("full_same_budget", "full table, same budget, 512 x 25")):
        assert lines[label].endswith(f"{100 * recall[key]:.1f}%")
    assert f"{100 * chance:.1f}%" in lines["chance (random embeddings)"]
    verdict = "beat" if recall["qr"] > recall["full_same_budget"] else "trail"
    assert f"At the same parameter budget the QR tables {verdict} a plain table of 25-d rows" in out


def test_compression_of_rows(capsys):
    # 10x fewer table rows than items: two ceil(512 / 10 / 2) = 26-row tables
    out = _load().main(TINY + ["--epochs", "1", "--compression-of", "rows", "--qr-only"])
    assert set(out) == {"qr", "chance"}
    assert "two 26 x 32 tables, 52 rows for 512 items (9.85x fewer rows" in capsys.readouterr().out


def test_deterministic():
    ex = _load()
    assert ex.main(TINY + ["--epochs", "2"]) == ex.main(TINY + ["--epochs", "2"])


def test_trains_with_the_triton_kernel():
    # the same loop through the (interpreted) fused kernel: fewer, smaller steps, the QR model only
    with fastvq.backend("triton"):
        recall = _load().main(["--items", "256", "--epochs", "4", "--batch-size", "128", "--k", "10",
                               "--no-progress", "--device", DEVICE, "--seed", "1", "--qr-only"])
    assert recall["qr"] > 2 * 10 / 255


@pytest.mark.parametrize("argv", [["--items", "1"], ["--compression", "0"]], ids=["one-item", "zero-compression"])
def test_bad_settings_exit(argv):
    with pytest.raises(SystemExit):
        _load().main(argv + ["--no-progress", "--epochs", "1"])
