"""Writes one run's outputs into a fresh folder: tables (parquet, CSV) and the HTML report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from harness.compare import PairResult, save_results
from harness.errors import InputError
from harness.report import Section, new_run_dir, write_report


def write_run(
    results: Sequence[PairResult],
    reports_root: Path,
    *,
    title: str,
    findings: Sequence[str],
    environment: dict[str, str],
    name: str | None = None,
    sections: Sequence[Section] = (),
    out: Path | None = None,
) -> Path:
    """A run folder holding every output: ``out`` if given (it must be empty or absent), else a
    new folder under ``reports_root``. Nothing existing is ever overwritten."""
    if out is None:
        out = new_run_dir(reports_root, name)
    elif out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: exists and is not empty; a report is never overwritten")
    else:
        out.mkdir(parents=True, exist_ok=True)
    save_results(list(results), out)
    write_report(list(results), out, title=title, environment=environment,
                 findings=list(dict.fromkeys(findings)), sections=sections)
    return out
