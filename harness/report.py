"""The HTML report: one self-contained ``index.html`` per run, never overwritten.

Charts are inline SVG drawn by matplotlib without pyplot (no GUI backend, no global state), and
the page carries its own CSS, so the file opens offline and can be attached to an issue as is.
"""

from __future__ import annotations

import io
import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jinja2
import matplotlib as mpl
import numpy as np
import pandas as pd
from markupsafe import Markup
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from harness.capture_points import Kind
from harness.compare import PairResult, explain_divergence

__all__ = ["new_run_dir", "render_report", "write_report"]

_TEMPLATES = Path(__file__).parent / "templates"
_TEMPLATE = "report.html.j2"
# Lowest NMSE drawn on a log axis; exact matches (0) sit on the axis floor instead of vanishing.
_MIN_FLOOR = 1e-300
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


@dataclass(frozen=True)
class Section:
    """A report section produced by another module (throughput, MTP, gate): a title and the
    HTML it renders itself. The HTML is inserted as is, so it must come from our own code and
    escape any user text (``markupsafe.escape``); charts go in as inline SVG in a
    ``<div class="chart">``."""

    title: str
    html: str


def _timestamp() -> str:
    return datetime.now().astimezone().strftime("%Y%m%d-%H%M%S")


def new_run_dir(reports_root: Path, name: str | None = None) -> Path:
    """Create a fresh ``<root>/<YYYYmmdd-HHMMSS>[-name][-N]``, so no run ever overwrites another."""
    root = Path(reports_root)
    root.mkdir(parents=True, exist_ok=True)
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", name or "").strip("-.")
    base = f"{_timestamp()}-{safe}" if safe else _timestamp()
    for n in itertools.count(1):
        candidate = root / (base if n == 1 else f"{base}-{n}")
        try:
            candidate.mkdir()
        except FileExistsError:
            continue
        return candidate
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------------------------
# Chart


def _plot_values(table: pd.DataFrame) -> pd.DataFrame:
    """Per-layer DENSE/LOGITS rows with a plottable NMSE (NaN on a failed row means 'inf')."""
    rows = table[table["kind"].isin([Kind.DENSE.value, Kind.LOGITS.value]) & table["layer"].notna()]
    nmse = rows["nmse"].astype(np.float64)
    nmse = nmse.where(~(nmse.isna() & ~rows["passed"]), math.inf)
    return rows.assign(nmse=nmse, layer=rows["layer"].astype(np.int64)).dropna(subset=["nmse"])


def _axis_range(frames: Iterable[pd.DataFrame], tolerances: Iterable[float]) -> tuple[float, float]:
    """Floor and ceiling of the y axis: zeros are drawn on the floor, infinities on the ceiling."""
    values = np.concatenate([f["nmse"].to_numpy(np.float64) for f in frames] + [np.array([])])
    values = np.concatenate([values, np.asarray(list(tolerances), dtype=np.float64)])
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size == 0:
        return 1e-20, 1.0
    return max(_MIN_FLOOR, float(positive.min()) / 100), max(1.0, float(positive.max()) * 100)


def _case_figure(results: Sequence[PairResult]) -> Figure:
    """NMSE per layer on a log axis: a line per pair (l_out-N), a cross at each layer's worst."""
    fig = Figure(figsize=(9, 3.8), layout="constrained")
    ax = fig.add_subplot()
    frames = [_plot_values(r.table) for r in results]
    tolerances = {r.table.attrs.get("tolerance", {}).get("nmse") for r in results} - {None}
    floor, ceiling = _axis_range(frames, tolerances)
    several_prompts = len({r.prompt for r in results}) > 1
    for i, (r, frame) in enumerate(zip(results, frames, strict=True)):
        color = f"C{i % 10}"
        label = f"{r.candidate} vs {r.reference} ({r.mode})"
        label += f" · {r.prompt}" if several_prompts else ""
        y = frame["nmse"].clip(lower=floor, upper=ceiling)
        lout = frame["point"].str.startswith("l_out-")
        ax.plot(frame.loc[lout, "layer"], y[lout], "o-", color=color, ms=3, label=label)
        if frame.empty:
            continue
        worst = frame.loc[frame.groupby("layer")["nmse"].idxmax()]
        ax.plot(worst["layer"], y[worst.index], "x", color=color, ms=7)
        if r.first_divergence in set(frame["point"]):
            at = frame.index[frame["point"] == r.first_divergence][0]
            ax.annotate(
                r.first_divergence,
                (frame.at[at, "layer"], y[at]),
                color=color,
                fontsize=8,
                xytext=(4, 6),
                textcoords="offset points",
            )
    for tol in sorted(tolerances):
        ax.axhline(tol, color="0.4", ls="--", lw=0.8, label=f"tolerance {tol:g}")
    ax.plot([], [], "x", color="0.3", label="worst point in layer")
    ax.set_yscale("log")
    ax.set_ylim(floor / 3, ceiling * 3)
    _mark_level(ax, floor, "exact match (0)")
    if any(np.isinf(f["nmse"]).any() for f in frames):
        _mark_level(ax, ceiling, "not comparable / inf", below=True)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel("NMSE vs reference")
    ax.grid(True, which="major", alpha=0.3)
    if any(not f.empty for f in frames):
        ax.legend(fontsize=8, loc="best")
    else:
        ax.text(0.5, 0.5, "no per-layer points captured", transform=ax.transAxes, ha="center")
    return fig


def _mark_level(ax: Any, y: float, text: str, *, below: bool = False) -> None:
    """A dotted line with a caption at a clipped level (the axis floor or ceiling)."""
    ax.axhline(y, color="0.7", ls=":", lw=0.8)
    ax.annotate(
        text,
        xy=(1, y),
        xycoords=("axes fraction", "data"),
        ha="right",
        va="top" if below else "bottom",
        fontsize=7,
        color="0.45",
        xytext=(-2, -2 if below else 1),
        textcoords="offset points",
    )


def _inline_svg(fig: Figure, prefix: str) -> str:
    """The figure as an SVG element for inline HTML, with ids made unique per chart."""
    buf = io.StringIO()
    with mpl.rc_context({"svg.fonttype": "none", "svg.hashsalt": prefix}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    svg = buf.getvalue()
    svg = svg[svg.index("<svg") :]
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, flags=re.DOTALL)
    # Inline SVG in HTML needs no namespace declarations; dropping them keeps the page URL-free.
    svg = re.sub(r'\s+xmlns(?::\w+)?="[^"]*"', "", svg)
    svg = re.sub(r'\bid="([^"]+)"', rf'id="{prefix}-\1"', svg)
    svg = re.sub(r'href="#([^"]+)"', rf'href="#{prefix}-\1"', svg)
    svg = re.sub(r"url\(#([^)]+)\)", rf"url(#{prefix}-\1)", svg)
    return svg.replace("<svg", f'<svg role="img" aria-label="per-layer NMSE ({prefix})"', 1)


# --------------------------------------------------------------------------------------------
# Context


def _fmt(value: Any, spec: str) -> str:
    """A number for a table cell; blank dash for 'not applicable'."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return "–"
    return format(float(value), spec)


def _point_rows(table: pd.DataFrame, first: str | None) -> list[dict[str, Any]]:
    rows = []
    for rec in table.to_dict("records"):
        css = "first" if rec["point"] == first else ("" if rec["passed"] else "fail")
        rows.append(
            {
                "point": rec["point"],
                "kind": rec["kind"],
                "nmse": _fmt(rec["nmse"], ".2e"),
                "max_abs": _fmt(rec["max_abs"], ".2e"),
                "cosine": _fmt(rec["cosine"], ".9f"),
                "top1": _fmt(rec["top1"], ".4f"),
                "index_agreement": _fmt(rec["index_agreement"], ".4f"),
                "mean_kld": _fmt(rec["mean_kld"], ".2e"),
                "kld_max": _fmt(rec["kld_max"], ".2e"),
                "threshold": rec["threshold"],
                "passed": bool(rec["passed"]),
                "css": css,
                "note": rec["note"],
            }
        )
    return rows


def _pair_context(r: PairResult, anchor: str) -> dict[str, Any]:
    tol = r.table.attrs.get("tolerance", {})
    return {
        "anchor": anchor,
        "candidate": r.candidate,
        "reference": r.reference,
        "prompt": r.prompt,
        "mode": r.mode,
        "passed": r.passed,
        "summary": r.summary_line(),
        "first_divergence": r.first_divergence,
        "explanation": explain_divergence(r.first_divergence) if r.first_divergence else "",
        "tolerance": ", ".join(f"{k} {v:g}" for k, v in tol.items()),
        "only_candidate": r.table.attrs.get("only_candidate", []),
        "only_reference": r.table.attrs.get("only_reference", []),
        "kld": [(k, _fmt(r.kld[k], ".3e")) for k in _KLD_KEYS if k in r.kld],
        "rows": _point_rows(r.table, r.first_divergence),
    }


def _context(
    results: Sequence[PairResult],
    title: str,
    environment: Mapping[str, str],
    findings: Iterable[str],
    sections: Sequence[Section] = (),
) -> dict[str, Any]:
    by_case: dict[str, list[tuple[int, PairResult]]] = {}
    for i, r in enumerate(results):
        by_case.setdefault(r.case, []).append((i, r))
    cases = []
    for c, (name, members) in enumerate(by_case.items(), start=1):
        fig = _case_figure([r for _, r in members])
        cases.append(
            {
                "name": name,
                "anchor": f"case-{c}",
                "chart_id": f"chart-{c}",
                "svg": Markup(_inline_svg(fig, f"chart-{c}")),  # trusted: our own SVG
                "pairs": [_pair_context(r, f"pair-{i + 1}") for i, r in members],
            }
        )
    overview = [
        {
            "case": r.case,
            "prompt": r.prompt,
            "candidate": r.candidate,
            "reference": r.reference,
            "mode": r.mode,
            "passed": r.passed,
            "first_divergence": r.first_divergence,
            "anchor": f"pair-{i + 1}",
        }
        for i, r in enumerate(results)
    ]
    return {
        "title": title,
        "generated": datetime.now().astimezone().isoformat(timespec="seconds"),
        "environment": [(str(k), str(v)) for k, v in environment.items()],
        "findings": [str(f) for f in findings],
        "overview": overview,
        "cases": cases,
        "sections": [
            {"title": s.title, "anchor": f"section-{i}", "html": Markup(s.html)}  # trusted: ours
            for i, s in enumerate(sections, start=1)
        ],
    }


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(_TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_report(
    results: Sequence[PairResult],
    *,
    title: str,
    environment: Mapping[str, str],
    findings: Iterable[str] = (),
    sections: Sequence[Section] = (),
) -> str:
    """The report as one HTML string (for tests and for callers that store it elsewhere)."""
    context = _context(results, title, environment, findings, sections)
    return _environment().get_template(_TEMPLATE).render(**context)


def write_report(
    results: list[PairResult],
    out_dir: Path,
    *,
    title: str,
    environment: dict[str, str],
    findings: Sequence[str] = (),
    sections: Sequence[Section] = (),
) -> Path:
    """Write ``out_dir/index.html``; refuses to replace an existing report (FileExistsError)."""
    path = Path(out_dir) / "index.html"
    message = f"refusing to overwrite the existing report {path}; write to a new run directory"
    if path.exists():
        raise FileExistsError(message)
    html = render_report(
        results, title=title, environment=environment, findings=findings, sections=sections
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("x", encoding="utf-8") as f:
            f.write(html)
    except FileExistsError:
        raise FileExistsError(message) from None
    return path
