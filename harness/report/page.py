"""The HTML report: one self-contained ``index.html`` per run, never overwritten.

Laid out for a reviewer with a minute: the run's verdict and the gate's first, then a verdict
matrix (case × prompt × candidate rows, a column per check, each cell linking to its detail),
the findings grouped by severity, the other sections (MTP, slopes, throughput, gate), and per
pair a layer × capture-point heatmap with its tables collapsed unless the pair failed.  Charts
are inline SVG drawn by matplotlib without pyplot, heatmaps are HTML tables, and the page
carries its own CSS and a few lines of filtering script, so the file opens offline and can be
attached to an issue as is.

Sections are data: each check or perf module returns a typed object naming its partial under
``templates/sections/``, and only Jinja (autoescaping on) turns it into HTML.
"""

from __future__ import annotations

import itertools
import re
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import jinja2
import numpy as np
import pandas as pd

from harness.checks.compare import PairResult
from harness.core.capture_points import explain_divergence
from harness.core.verdict import CheckVerdict, RunVerdict, Status
from harness.report.charts import inline_svg
from harness.report.findings import group_findings
from harness.report.format import fmt_number, is_missing
from harness.report.heatmap import heatmap
from harness.report.heatmap import legend as heatmap_legend

__all__ = [
    "GateSummary",
    "Section",
    "free_run_dir",
    "render_report",
    "render_section",
    "write_report",
]

_TEMPLATES = Path(__file__).parent / "templates"
_TEMPLATE = "report.html.j2"
_KLD_KEYS: tuple[str, ...] = (
    "mean_kld",
    "kld_99.9",
    "kld_99",
    "kld_max",
    "same_top_p",
    "same_top_p_unc",
    "mean_delta_p",
    "rms_delta_p",
)


# --------------------------------------------------------------------------------------------
# Run directories


@runtime_checkable
class Section(Protocol):
    """A report section produced by another module (throughput, MTP, slopes, gate): its data,
    a title, and the partial under ``templates/sections/`` that renders it (as ``s``)."""

    @property
    def title(self) -> str: ...

    @property
    def template(self) -> str: ...


def _timestamp() -> str:
    return datetime.now().astimezone().strftime("%Y%m%d-%H%M%S")


def free_run_dir(reports_root: Path, name: str | None = None) -> Path:
    """A fresh, not yet existing ``<root>/<YYYYmmdd-HHMMSS>[-name][-N]`` (created by the caller,
    atomically), so no run ever overwrites another."""
    root = Path(reports_root)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name or "").strip("-.")
    base = f"{_timestamp()}-{safe}" if safe else _timestamp()
    for n in itertools.count(1):
        candidate = root / (base if n == 1 else f"{base}-{n}")
        if not candidate.exists():
            return candidate
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# The gate and the verdict matrix


@dataclass(frozen=True)
class GateSummary:
    """The regression gate's verdict for the headline: the baseline it was held to and the
    regressions it found (``harness.checks.gate.gate``'s frame: table, key, metric, baseline,
    current,
    allowed, reason); no regression is a pass."""

    baseline: str
    regressions: pd.DataFrame

    @property
    def passed(self) -> bool:
        return self.regressions.empty

    def groups(self) -> list[tuple[str, pd.DataFrame]]:
        """Regressions by what they mean: checks failing now, results gone, metrics drifted."""
        df = self.regressions
        failing = df["metric"].isin(["status", "passed", "gate"])
        missing = ~failing & (df["allowed"] == "present")
        drift = ~failing & ~missing
        named = [("failing now", failing), ("missing from the run", missing),
                 ("drifted beyond the baseline", drift)]
        return [(name, df[mask]) for name, mask in named if mask.any()]


# Checks in the order a pair is examined; checks not listed follow alphabetically.
_CHECK_ORDER = ("prefill", "decode", "greedy", "mtp", "slopes")
_STATUS_ORDER = tuple(s.value for s in (Status.FAILED, Status.ERROR, Status.XFAILED,
                                        Status.SKIPPED, Status.PASSED))
_PairKey = tuple[str, str, str, str]  # case, prompt, candidate, mode


def _verdict_of(results: Sequence[PairResult]) -> RunVerdict:
    """A verdict from the pairs alone, for callers that pass none (a pair is one check)."""
    return RunVerdict([
        CheckVerdict(r.case, r.prompt, r.candidate, r.reference, r.mode,
                     Status.PASSED if r.passed else Status.FAILED, r.summary_line())
        for r in results if not r.informational  # reported, never a check
    ])


def _worst_nmse(r: PairResult) -> str:
    values = r.table["nmse"].astype(np.float64).dropna() if not r.table.empty else pd.Series()
    if values.empty:
        return "pass"
    worst = float(values.max())
    return "exact" if worst == 0 else f"{worst:.1e}"


def _cell_text(c: CheckVerdict, pair: PairResult | None) -> str:
    """What a matrix cell says: the worst NMSE of a passing pair, the failing point otherwise."""
    status = Status(c.status)
    if status is Status.ERROR:
        return "port failure"
    if status is Status.SKIPPED:
        return "skipped"
    if pair is not None:
        if status is Status.PASSED:
            return _worst_nmse(pair)
        point = pair.first_divergence or "FAIL"
        return f"xfail · {point}" if status is Status.XFAILED else point
    if status is Status.PASSED:
        m = re.search(r"(\d+/\d+) tokens identical", c.detail)
        return m.group(1) if m else "pass"
    return "xfail" if status is Status.XFAILED else "FAIL"


def _section_anchor(sections: Sequence[Section], check: str) -> str | None:
    words = {"mtp": "mtp", "slopes": "slope", "greedy": "greedy"}.get(check, check)
    return next((f"section-{i}" for i, s in enumerate(sections, start=1)
                 if words in s.title.lower()), None)


def _cell_href(c: CheckVerdict, pair_anchor: str | None, sections: Sequence[Section]) -> str:
    if pair_anchor is not None:
        return pair_anchor
    if c.status in (Status.ERROR, Status.SKIPPED):
        return "findings"
    if c.check == "greedy":
        return "greedy"
    return _section_anchor(sections, c.check) or "findings"


def _matrix(
    verdict: RunVerdict, pairs: Mapping[_PairKey, tuple[str, PairResult]],
    sections: Sequence[Section],
) -> dict[str, Any]:
    """Rows case × prompt × candidate, a column per check, one cell per ``verdict.checks``."""
    checks = sorted({c.check for c in verdict.checks},
                    key=lambda k: (_CHECK_ORDER.index(k) if k in _CHECK_ORDER else 99, k))
    rows: dict[tuple[str, str, str, str], dict[str, Any]] = {}
    for c in verdict.checks:
        key = (c.case, c.prompt, c.candidate, c.reference)
        row = rows.setdefault(key, {"case": c.case, "prompt": c.prompt, "candidate": c.candidate,
                                    "reference": c.reference, "cells": {}})
        anchor, pair = pairs.get((c.case, c.prompt, c.candidate, c.check), (None, None))
        detail = c.detail or (pair.summary_line() if pair is not None else "")
        row["cells"][c.check] = {
            "status": Status(c.status).value, "text": _cell_text(c, pair),
            "title": f"{c.check} {Status(c.status).value}" + (f": {detail}" if detail else ""),
            "href": _cell_href(c, anchor, sections), "check": c.check,
        }
    # The usual reference goes in the headline; a row against another one names it.
    usual = next(iter(Counter(c.reference for c in verdict.checks).most_common(1)), ("", 0))[0]
    for row in rows.values():
        row["statuses"] = " ".join(sorted({cell["status"] for cell in row["cells"].values()}))
        row["other_reference"] = row["reference"] if row["reference"] != usual else ""
    return {"checks": checks, "rows": list(rows.values())}


# --------------------------------------------------------------------------------------------
# Context


def _point_rows(table: pd.DataFrame, first: str | None) -> list[dict[str, Any]]:
    rows = []
    for rec in table.to_dict("records"):
        css = "first" if rec["point"] == first else ("" if rec["passed"] else "fail")
        rows.append(
            {
                "point": rec["point"],
                "kind": rec["kind"],
                "nmse": fmt_number(rec["nmse"], ".2e"),
                "max_abs": fmt_number(rec["max_abs"], ".2e"),
                "cosine": fmt_number(rec["cosine"], ".9f"),
                "top1": fmt_number(rec["top1"], ".4f"),
                "index_agreement": fmt_number(rec["index_agreement"], ".4f"),
                "mean_kld": fmt_number(rec["mean_kld"], ".2e"),
                "kld_max": fmt_number(rec["kld_max"], ".2e"),
                "threshold": rec["threshold"],
                "passed": bool(rec["passed"]),
                "css": css,
                "note": rec["note"],
            }
        )
    return rows


def _pair_context(r: PairResult, anchor: str, status: str) -> dict[str, Any]:
    tol = r.tolerance
    return {
        "anchor": anchor,
        "case": r.case,
        "candidate": r.candidate,
        "reference": r.reference,
        "prompt": r.prompt,
        "mode": r.mode,
        "passed": r.passed,
        "status": status,
        "summary": r.summary_line().split(": ", 1)[-1],  # the pair is named in the title
        "first_divergence": r.first_divergence,
        "explanation": explain_divergence(r.first_divergence) if r.first_divergence else "",
        "tolerance": ", ".join(f"{f.name} {getattr(tol, f.name):g}" for f in fields(tol))
        if tol is not None else "",
        "only_candidate": list(r.only_candidate),
        "only_reference": list(r.only_reference),
        "kld": [(k, fmt_number(r.kld[k], ".3e")) for k in _KLD_KEYS if k in r.kld],
        "heatmap": heatmap(r.table, r.first_divergence, tol.nmse if tol is not None else None),
        "rows": _point_rows(r.table, r.first_divergence),
        "n_failing": int((~r.table["passed"].astype(bool)).sum()) if not r.table.empty else 0,
    }


def _gate_context(gate: GateSummary | None) -> dict[str, Any] | None:
    if gate is None:
        return None
    return {
        "passed": gate.passed,
        "baseline": gate.baseline,
        "count": len(gate.regressions),
        "columns": list(gate.regressions.columns),
        "groups": [(name, df.to_dict("records")) for name, df in gate.groups()],
    }


def _context(
    results: Sequence[PairResult],
    title: str,
    environment: Mapping[str, str],
    findings: Iterable[str],
    sections: Sequence[Section] = (),
    verdict: RunVerdict | None = None,
    gate: GateSummary | None = None,
) -> dict[str, Any]:
    given = verdict is not None
    verdict = verdict if verdict is not None else _verdict_of(results)
    status_of = {(c.case, c.prompt, c.candidate, c.check): Status(c.status).value
                 for c in verdict.checks}
    anchors = {(r.case, r.prompt, r.candidate, r.mode): (f"pair-{i + 1}", r)
               for i, r in enumerate(results)}
    by_case: dict[str, list[dict[str, Any]]] = {}
    for key, (anchor, r) in anchors.items():
        fallback = ("info" if r.informational
                    else Status.PASSED.value if r.passed else Status.FAILED.value)
        by_case.setdefault(r.case, []).append(
            _pair_context(r, anchor, status_of.get(key, fallback)))
    counts = verdict.counts()
    greedy = [c for c in verdict.checks if c.check == "greedy"]
    error_details = [c.detail for c in verdict.checks if c.status == Status.ERROR]
    return {
        "title": title,
        # A report of no checks at all (a throughput sweep) has no verdict to state.
        "headline": verdict.headline() if given or verdict.checks else None,
        "run_passed": verdict.passed if given or verdict.checks else None,
        "gate": _gate_context(gate),
        "counts": [(s, counts[Status(s)]) for s in _STATUS_ORDER if counts[Status(s)]],
        "references": [r for r, _ in Counter(c.reference for c in verdict.checks).most_common()],
        "matrix": _matrix(verdict, anchors, sections),
        "filters": {
            "case": sorted({c.case for c in verdict.checks} | set(by_case)),
            "candidate": sorted({c.candidate for c in verdict.checks}
                                | {r.candidate for r in results}),
            "status": [s for s in _STATUS_ORDER if counts[Status(s)]],
        },
        "generated": datetime.now().astimezone().isoformat(timespec="seconds"),
        "environment": [(str(k), str(v)) for k, v in environment.items()],
        "finding_groups": group_findings([str(f) for f in findings], error_details),
        "cases": [{"name": name, "anchor": f"case-{i}", "pairs": pairs}
                  for i, (name, pairs) in enumerate(by_case.items(), start=1)],
        "greedy": [{**asdict(c), "status": Status(c.status).value} for c in greedy],
        "greedy_all_passed": all(c.status == Status.PASSED for c in greedy),
        "legend": heatmap_legend(),
        "sections": [
            {"title": s.title, "anchor": f"section-{i}", "data": s,
             "template": f"sections/{s.template}"}
            for i, s in enumerate(sections, start=1)
        ],
    }


def _environment() -> jinja2.Environment:
    """The one Jinja environment: autoescaping on, the number formatter and charts as filters."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(_TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["num"] = fmt_number
    env.filters["svg"] = inline_svg
    env.tests["missing"] = is_missing
    return env


def render_section(section: Section) -> str:
    """One section's body as HTML, as the report renders it (for tests and other pages)."""
    return _environment().get_template(f"sections/{section.template}").render(s=section)


def render_report(
    results: Sequence[PairResult],
    *,
    title: str,
    environment: Mapping[str, str],
    findings: Iterable[str] = (),
    sections: Sequence[Section] = (),
    verdict: RunVerdict | None = None,
    gate: GateSummary | None = None,
) -> str:
    """The report as one HTML string (for tests and for callers that store it elsewhere).

    ``verdict`` is the run's verdict (harness.core.verdict): its headline comes first and its checks
    are the verdict matrix (without it, each pair is one check); ``gate`` is the regression
    gate's verdict, shown under the headline."""
    context = _context(results, title, environment, findings, sections, verdict, gate)
    return _environment().get_template(_TEMPLATE).render(**context)


def write_report(
    results: list[PairResult],
    out_dir: Path,
    *,
    title: str,
    environment: dict[str, str],
    findings: Sequence[str] = (),
    sections: Sequence[Section] = (),
    verdict: RunVerdict | None = None,
    gate: GateSummary | None = None,
) -> Path:
    """Write ``out_dir/index.html``; refuses to replace an existing report (FileExistsError)."""
    path = Path(out_dir) / "index.html"
    message = f"refusing to overwrite the existing report {path}; write to a new run directory"
    if path.exists():
        raise FileExistsError(message)
    html = render_report(
        results, title=title, environment=environment, findings=findings, sections=sections,
        verdict=verdict, gate=gate,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("x", encoding="utf-8") as f:
            f.write(html)
    except FileExistsError:
        raise FileExistsError(message) from None
    return path
