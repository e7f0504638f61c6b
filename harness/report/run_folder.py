"""Writes one run's outputs into a fresh folder: tables (parquet, CSV), summary and HTML report.

The folder is built under a temporary name and renamed when complete (``harness.core.atomic``), so a
run killed while writing leaves no folder that looks finished and its ``--out`` stays free.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from harness.checks.compare import PairResult, save_results
from harness.core import lifecycle
from harness.core.atomic import staged_dir
from harness.core.errors import InputError
from harness.core.verdict import RunVerdict
from harness.report.page import GateSummary, Section, free_run_dir, write_report


def check_out_dir(out: Path | None) -> None:
    """Refuse an unusable ``--out`` before any compute: an existing file, a folder that already
    holds something, a path under a file, or a parent that cannot be written."""
    if out is None:
        return
    out = Path(out)
    if out.is_file() or (out.exists() and not out.is_dir()):
        raise InputError(f"{out}: --out is an existing file; give a folder (new or empty)")
    if out.is_dir():
        if any(out.iterdir()):
            raise InputError(f"{out}: exists and is not empty; a report is never overwritten")
        return
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise InputError(f"{out}: --out lies under {parent}, which is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InputError(f"{out}: cannot create it: {parent} is not writable")


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
    verdict: RunVerdict | None = None,
    summary: dict[str, Any] | None = None,
    extra: Callable[[Path], object] | None = None,
    gate: GateSummary | None = None,
) -> Path:
    """A run folder holding every output: ``out`` if given (it must be empty or absent), else a
    new folder under ``reports_root``. Nothing existing is ever overwritten.

    ``verdict`` adds ``verdicts.parquet`` and the report's headline; ``summary`` is written as
    ``summary.json``; ``extra(folder)`` writes any further tables into the folder before it is
    published under its final name; ``gate`` puts the regression gate's verdict in the headline.
    """
    if out is None:
        out = free_run_dir(reports_root, name)
    else:
        check_out_dir(out)
    with staged_dir(out) as tmp:
        save_results(list(results), tmp)
        if verdict is not None:
            verdict.frame().to_parquet(tmp / "verdicts.parquet", index=False)
        if extra is not None:
            extra(tmp)
        if summary is not None:
            (tmp / "summary.json").write_text(json.dumps(summary, indent=2))
        lifecycle.stage("writing-report")
        write_report(list(results), tmp, title=title, environment=environment,
                     findings=list(dict.fromkeys(findings)), sections=sections,
                     verdict=verdict, gate=gate)
    return out
