"""The storage dtype of a golden run, measured against the default tolerances
(harness.checks.cases.DEFAULT_TOLERANCES): a float32 store's rounding sits far below the float32 and
bfloat16 candidates' NMSE tolerances but above the float64 candidates' 1e-18, which is why
float64 is the default and a float32 store is refused for float64 candidates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from harness.checks.cases import DEFAULT_TOLERANCES
from harness.checks.golden import open_golden
from harness.cli.main import main
from harness.core.metrics import nmse
from tests.upstream_writer import write_upstream_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return write_upstream_checkpoint(tmp_path_factory.mktemp("upstream") / "ling26")


@pytest.fixture(scope="module")
def stores(checkpoint, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("stores")
    for dtype in ("float64", "float32"):
        assert main(["capture", "--checkpoint", str(checkpoint), "--store-dtype", dtype,
                     "--out", str(root / dtype)]) == 0
    return {dtype: root / dtype for dtype in ("float64", "float32")}


def float32_store_error(stores: dict[str, Path]) -> dict[str, float]:
    """NMSE of every float capture point stored in float32, against the float64 store."""
    wide = open_golden(stores["float64"]).captures()
    narrow = open_golden(stores["float32"]).captures()
    return {p: nmse(narrow[p].astype(np.float64), wide[p]) for p in wide
            if wide[p].dtype.kind == "f"}


def test_a_float32_store_rounds_far_below_the_float32_tolerance_but_above_float64s(stores):
    errors = float32_store_error(stores)
    worst = max(errors.values())
    assert len(errors) >= 40
    assert 1e-17 < worst < 1e-13  # float32's unit roundoff squared: ~2**-48
    assert worst < DEFAULT_TOLERANCES["float32"].nmse * 1e-4
    assert worst > DEFAULT_TOLERANCES["float64"].nmse


def test_router_choices_are_stored_exactly_whatever_the_store_dtype(stores):
    wide = open_golden(stores["float64"]).captures()
    narrow = open_golden(stores["float32"]).captures()
    ints = [p for p in wide if wide[p].dtype.kind in "iu"]
    assert ints and all(np.array_equal(wide[p], narrow[p]) for p in ints)
    assert all(narrow[p].dtype == wide[p].dtype for p in ints)


def test_a_float32_store_is_half_the_size(stores):
    sizes = {d: sum(f.stat().st_size for f in p.glob("*.safetensors")) for d, p in stores.items()}
    assert 0.45 < sizes["float32"] / sizes["float64"] < 0.56


def test_a_float32_store_still_judges_float32_candidates(checkpoint, stores, tmp_path):
    assert main(["parity", "--checkpoint", str(checkpoint), "--golden", str(stores["float32"]),
                 "--backends", "mlx", "--out", str(tmp_path / "out")]) == 0


def test_a_float32_store_is_refused_for_a_float64_candidate(checkpoint, stores, tmp_path, capsys):
    code = main(["parity", "--checkpoint", str(checkpoint), "--golden", str(stores["float32"]),
                 "--backends", "torch-float64", "--out", str(tmp_path / "out")])
    assert code == 2
    assert "too coarse for the float64 candidate(s) torch-float64" in capsys.readouterr().err
