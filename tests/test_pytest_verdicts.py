"""The pytest front end writes the same verdict as the CLI: ``summary.json``'s ``passed``, the
``verdicts.parquet`` table the gate reads, and the report headline all follow pytest's outcome
of each parity item (a port failure is ``error``, a wrong port ``failed``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
MLX_MODULE = Path(__import__("mlx_lm").__file__).parent / "models" / "bailing_hybrid.py"


def suite(tmp_path: Path, *extra: str) -> tuple[int, dict, pd.DataFrame]:
    reports = tmp_path / "reports"
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "cases", "--cases", "flash-mini", "--backends", "mlx",
         "--modes", "prefill", "--report-dir", str(reports), "-q", "-p", "no:cacheprovider",
         *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    (run,) = list(reports.iterdir())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["verdict"] in (run / "index.html").read_text()
    assert f"parity verdict: {summary['verdict']}" in proc.stdout
    return proc.returncode, summary, pd.read_parquet(run / "verdicts.parquet")


def port(tmp_path: Path, old: str, new: str) -> str:
    source = MLX_MODULE.read_text()
    assert old in source
    path = tmp_path / "port.py"
    path.write_text(source.replace(old, new, 1))
    return str(path)


@pytest.mark.slow
def test_a_passing_suite_records_every_item_as_passed(tmp_path):
    code, summary, verdicts = suite(tmp_path)
    assert code == 0 and summary["passed"] is True
    assert set(verdicts["status"]) == {"passed"} and len(verdicts) == 3  # three prompts


@pytest.mark.slow
@pytest.mark.parametrize(
    ("old", "new", "status"),
    [
        ("self.layer_idx / denom", "(self.layer_idx - 1) / denom", "failed"),
        ("        return self.lm_head(out)\n", "        return None\n", "error"),
    ],
    ids=["wrong-slope-fails", "no-logits-is-a-port-failure"],
)
def test_a_failing_suite_says_so_in_every_output(tmp_path, old, new, status):
    code, summary, verdicts = suite(tmp_path, "--mlx-model-module", port(tmp_path, old, new))
    assert code == 1 and summary["passed"] is False and summary["exit_code"] == 1
    assert set(verdicts["status"]) == {status}
