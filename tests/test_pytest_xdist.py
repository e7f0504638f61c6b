"""``pytest cases -n 2``: the same verdicts and one merged run folder as a serial run.

Items of one case stay on one worker (each model loads once); every worker's pairs, verdicts,
findings and MTP rows come back to the controller, which writes the one report and gates it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ["--cases", "flash-mini,heads-6,ling3-plain", "--backends", "mlx",
         "--modes", "prefill,decode,mtp"]


def suite(tmp_path: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path]:
    reports = tmp_path / "reports"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "cases", *SUITE, "--report-dir", str(reports),
         "-p", "no:cacheprovider", "-q", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=900)
    (run,) = list(reports.iterdir())
    return proc, run


@pytest.mark.slow
def test_two_workers_give_the_serial_runs_verdicts_in_one_run_folder(tmp_path):
    serial, one = suite(tmp_path / "serial")
    parallel, two = suite(tmp_path / "parallel", "-n", "2")
    assert serial.returncode == parallel.returncode == 0, parallel.stdout[-3000:]
    assert "bringing up nodes" in parallel.stdout  # it really ran on xdist workers
    for table in ("verdicts.parquet", "parity.parquet", "mtp.parquet"):
        pd.testing.assert_frame_equal(pd.read_parquet(one / table).drop(columns=["detail"],
                                                                         errors="ignore"),
                                      pd.read_parquet(two / table).drop(columns=["detail"],
                                                                         errors="ignore"),
                                      check_exact=False, rtol=1e-6, atol=1e-12)
    a, b = (json.loads((r / "summary.json").read_text()) for r in (one, two))
    assert a["verdict"] == b["verdict"] and a["passed"] and b["passed"]
    assert list(a["pairs"]) == list(b["pairs"])
    assert a["findings"] == b["findings"]
