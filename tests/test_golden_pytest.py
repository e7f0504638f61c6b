"""``pytest cases --golden DIR``: the pytest front end's golden runs.  ``python -m harness capture
--cases NAMES --out DIR`` writes one golden run per case and prompt (DIR/<case>/<prompt>/), and
the plugin's items judge candidates against them with a direct run's verdicts and tables, never
loading the reference; a case prompt without its golden run, or with one of another model, fails
its items naming the file; checks that run the reference itself are a usage error."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from harness.checks.golden import MANIFEST
from harness.cli.main import main

ROOT = Path(__file__).resolve().parents[1]
CASES = "flash-mini"
TABLES = ("verdicts.parquet", "parity.parquet", "mtp.parquet")


@pytest.fixture(scope="module")
def golden(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("golden") / "runs"
    assert main(["capture", "--cases", CASES, "--out", str(out)]) == 0
    return out


def suite(reports: Path, *extra: str) -> tuple[subprocess.CompletedProcess, Path | None]:
    """``pytest cases`` on flash-mini with mlx; the run folder it wrote (None: none)."""
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "cases", "--cases", CASES, "--backends", "mlx",
         "--report-dir", str(reports), "-q", "-p", "no:cacheprovider", *extra],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    runs = list(reports.iterdir()) if reports.is_dir() else []
    return proc, runs[0] if runs else None


def test_capture_cases_writes_one_golden_run_per_case_and_prompt(golden):
    assert sorted(p.relative_to(golden).as_posix() for p in golden.glob("*/*")) == [
        "flash-mini/random-96", "flash-mini/short", "flash-mini/text"]
    first = json.loads((golden / "flash-mini" / "short" / MANIFEST).read_text())
    second = json.loads((golden / "flash-mini" / "random-96" / MANIFEST).read_text())
    assert "mtp" in first and "mtp" not in second  # the mtp check runs on a case's first prompt
    assert first["decode_steps"] == 16  # the case's own settings


@pytest.mark.slow
def test_pytest_golden_gives_the_direct_runs_verdicts_and_tables(golden, tmp_path):
    modes = ("--modes", "prefill,decode,mtp")
    direct, direct_run = suite(tmp_path / "direct", *modes)
    via, via_run = suite(tmp_path / "golden", *modes, "--golden", str(golden))
    assert direct.returncode == via.returncode == 0, via.stdout[-3000:]
    assert "reference captures read from the golden runs" in via.stdout
    verdicts = pd.read_parquet(via_run / "verdicts.parquet")
    assert len(verdicts) == 7 and set(verdicts["status"]) == {"passed"}  # 3x2 pairs + mtp
    for table in TABLES:
        pd.testing.assert_frame_equal(pd.read_parquet(via_run / table),
                                      pd.read_parquet(direct_run / table), obj=table)


def test_the_default_modes_under_golden_are_those_it_serves_and_weighty_ones_are_refused(
        golden, tmp_path):
    proc, _ = suite(tmp_path / "r", "--golden", str(golden), "--collect-only")
    assert proc.returncode == 0
    collected = [line for line in proc.stdout.splitlines() if "::" in line]
    assert {line.rsplit("::", 1)[-1] for line in collected} == {"prefill", "decode", "mtp"}
    refused, _ = suite(tmp_path / "r2", "--golden", str(golden), "--modes", "prefill,slopes")
    assert refused.returncode == 4  # pytest's usage error
    assert "--modes slopes: these checks run the reference itself" in refused.stderr


def _another_prompts(golden: Path, tmp_path: Path) -> Path:
    """flash-mini's 'short' golden run replaced by its 'random-96' one (another prompt)."""
    mixed = tmp_path / "mixed"
    shutil.copytree(golden, mixed)
    shutil.rmtree(mixed / "flash-mini" / "short")
    shutil.copytree(golden / "flash-mini" / "random-96", mixed / "flash-mini" / "short")
    return mixed


def _missing_prompt(golden: Path, tmp_path: Path) -> Path:
    partial = tmp_path / "partial"
    shutil.copytree(golden, partial)
    shutil.rmtree(partial / "flash-mini" / "short")
    return partial


@pytest.mark.parametrize(
    ("make", "said"),
    [(_missing_prompt, "holds no golden run of case flash-mini prompt short"),
     (_another_prompts, "case flash-mini prompt short: tokens differ from the golden run's")],
    ids=["missing", "another-prompt"],
)
def test_a_case_prompt_without_its_golden_run_fails_its_items_naming_the_file(
        golden, tmp_path, make, said):
    where = make(golden, tmp_path)
    proc, run = suite(tmp_path / "r", "--golden", str(where), "--modes", "prefill")
    assert proc.returncode == 1
    assert f"{where / 'flash-mini' / 'short' / MANIFEST}" in proc.stdout
    assert "bad input: " in proc.stdout and said in proc.stdout
    verdicts = pd.read_parquet(run / "verdicts.parquet").set_index("prompt")["status"]
    assert verdicts.to_dict() == {"short": "failed", "random-96": "passed", "text": "passed"}
