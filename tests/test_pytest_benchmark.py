"""``pytest --benchmark cases``: throughput items through pytest-benchmark's own fixture.

The same items ``nox -s bench`` runs: per case × backend × PP a ``prefill`` and a ``decode``
item; pytest-benchmark's JSON, autosave and compare work on them, and the run folder holds the
sweep's table in llama-batched-bench's columns.  Without ``--benchmark`` no such item exists.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backends", "mlx", "--bench-pp", "8,16", "--bench-tg", "2", "--bench-rounds", "2"]


def pytest_run(*args: str) -> subprocess.CompletedProcess:
    # An xdist worker's variables would make pytest-benchmark in the child disable itself.
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}
    return subprocess.run([sys.executable, "-m", "pytest", "cases", "-p", "no:cacheprovider",
                           "-q", *args], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)


@pytest.mark.slow
def test_benchmark_items_write_pytest_benchmark_json_and_the_sweep_table(tmp_path):
    reports, data = tmp_path / "reports", tmp_path / "bench.json"
    proc = pytest_run("--benchmark", "--cases", "flash-mini", *TINY, "--report-dir",
                      str(reports), f"--benchmark-json={data}")
    assert proc.returncode == 0, proc.stdout[-2000:]
    names = sorted(b["name"] for b in json.loads(data.read_text())["benchmarks"])
    assert names == [f"flash-mini::mlx-float32::pp{pp}-tg2::{step}" for pp in (16, 8)
                     for step in ("decode", "prefill")]
    extra = json.loads(data.read_text())["benchmarks"][0]["extra_info"]
    assert extra["case"] == "flash-mini" and extra["tok/s"] > 0
    (run,) = list(reports.iterdir())
    table = pd.read_parquet(run / "throughput.parquet")
    assert table["PP"].tolist() == [8, 16] and set(table["TG"]) == {2}
    assert (table["S_PP"] > 0).all() and (table["S_TG"] > 0).all()
    assert table["roofline_tgs"].notna().all() and set(table["source"]) == {"pytest-benchmark"}
    assert "| S_PP t/s |" in proc.stdout


@pytest.mark.slow
def test_a_saved_run_can_be_compared_against(tmp_path):
    storage = f"--benchmark-storage=file://{tmp_path / 'store'}"
    first = pytest_run("--benchmark", "-k", "flash-mini and pp8 and not hf-slope", *TINY,
                       "--benchmark-autosave", storage)
    assert first.returncode == 0, first.stdout[-2000:]
    second = pytest_run("--benchmark", "-k", "flash-mini and pp8 and not hf-slope", *TINY,
                        "--benchmark-compare", "--benchmark-compare-fail=mean:100000%", storage)
    assert second.returncode == 0, second.stdout[-2000:]
    assert "Comparing against benchmarks from: " in second.stdout + second.stderr


def test_without_benchmark_the_suite_collects_no_throughput_item():
    proc = pytest_run("--collect-only", "-k", "flash-mini", "--backends", "mlx")
    assert "::prefill" in proc.stdout and "pp32-tg4" not in proc.stdout
    bench = pytest_run("--collect-only", "--benchmark", "-k", "flash-mini", "--backends", "mlx")
    assert "flash-mini::mlx-float32::pp32-tg4::decode" in bench.stdout
    assert "-vs-" not in bench.stdout  # no parity item in a benchmark run


def test_a_bad_grid_is_a_usage_error():
    proc = pytest_run("--benchmark", "--bench-pp", "0,x", "--collect-only")
    assert proc.returncode == 4 and "--bench-pp" in proc.stderr
