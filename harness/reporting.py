"""Writes one run's outputs into a fresh folder: tables (parquet, CSV) and the HTML report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from harness.compare import PairResult, save_results
from harness.report import new_run_dir, write_report


def write_run(
    results: Sequence[PairResult],
    reports_root: Path,
    *,
    title: str,
    findings: Sequence[str],
    environment: dict[str, str],
    name: str | None = None,
) -> Path:
    """A new run folder under ``reports_root`` (never an existing one) holding every output."""
    out = new_run_dir(reports_root, name)
    save_results(list(results), out)
    write_report(list(results), out, title=title, environment=environment,
                 findings=list(dict.fromkeys(findings)))
    return out
