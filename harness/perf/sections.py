"""The throughput reports' sections as data: ``sweep``'s "Throughput" (prefill and decode tok/s
against context on log axes, the decode roofline per case, the llama-batched-bench columns) and
``sweep --mtp``'s "MTP speed" (the cost of a draft step by term, the culprit in words).

Figures are matplotlib objects (no pyplot); the report turns them into inline SVG and the
sections into HTML through ``harness/report/templates/sections/``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from harness.report.charts import Chart

__all__ = ["MtpSpeedSection", "ThroughputSection", "mtp_speed_section", "throughput_section"]


# ---------------------------------------------------------------------------------------------
# The report section


def _measured(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["skip_reason"] == ""]


def _series_label(key: tuple[Any, ...]) -> str:
    target, case, source, b = key
    label = f"{target} · {case}" if case else str(target)
    label += "" if source == "harness" else f" [{source}]"
    return label + (f" B={b}" if b != 1 else "")


def _figure(df: pd.DataFrame, phase: str) -> Figure:
    """tok/s against context on log-log axes, a line per target x case x source x B."""
    speed = "S_PP" if phase == "prefill" else "S_TG"
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax = fig.add_subplot()
    rows = _measured(df)
    rows = rows[rows[speed].notna() & (rows[speed] > 0)]
    depth = rows["depth"].fillna(0).astype(float)
    context = depth + rows["PP"].astype(float)
    if phase == "decode":
        context = context + rows["TG"].astype(float)
    rows = rows.assign(context=context)
    rows = rows[rows["context"] > 0]
    groups = rows.groupby(["target", "case", "source", "B"], sort=True)
    for i, (key, g) in enumerate(groups):
        g = g.sort_values("context")
        ax.plot(g["context"], g[speed], "o-", ms=4, color=f"C{i % 10}", label=_series_label(key))
    if phase == "decode":
        roofs = df[df["roofline_tgs"].notna()]
        styles = iter(["--", ":", "-.", (0, (5, 1))] * 10)
        for (case, value), g in roofs.groupby(["case", "roofline_tgs"], sort=True):
            dtypes = "/".join(sorted(set(g["dtype"]) - {""}))
            gbs = float(g["bandwidth_gbs"].iloc[0])
            ax.axhline(value, color="0.35", lw=1, ls=next(styles),
                       label=f"roofline {case} {dtypes}: {value:,.0f} t/s at {gbs:.1f} GB/s")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:,.0f}"))
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)" + (" after the prefill" if phase == "prefill" else
                                        " at the end of decode"))
    ax.set_ylabel(f"{phase} tok/s ({speed})")
    ax.grid(True, which="major", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax.text(0.5, 0.5, "no measured points", transform=ax.transAxes, ha="center")
    return fig


_TABLE = (  # (column, header, format)
    ("PP", "PP", "d"), ("TG", "TG", "d"), ("B", "B", "d"), ("N_KV", "N_KV", "d"),
    ("T_PP", "T_PP s", ".3f"), ("S_PP", "S_PP t/s", ".2f"), ("T_TG", "T_TG s", ".3f"),
    ("S_TG", "S_TG t/s", ".2f"), ("T", "T s", ".3f"), ("S", "S t/s", ".2f"),
    ("T_PP_spread", "T_PP spread s", ".3f"), ("T_TG_spread", "T_TG spread s", ".3f"),
    # a quantized candidate's roofline is its own: the bytes its GGUF / MLX files hold
    ("dtype", "weights", ""), ("weight_bytes_per_token", "weight bytes/token", ",d"),
    ("roofline_tgs", "roofline t/s", ",.0f"), ("roofline_frac", "roofline frac", ".4f"),
    ("peak_rss_mb", "peak RSS MiB", ",.0f"), ("peak_backend_mb", "peak backend MiB", ",.0f"),
)  # fmt: skip


_Column = tuple[str, str, str]  # (column, header, format)


@dataclass(frozen=True)
class ThroughputSection:
    """The report's "Throughput" section as data: prefill and decode charts, the measured
    points (llama-batched-bench columns), and the skipped points with their reasons."""

    machines: tuple[str, ...]
    charts: tuple[tuple[str, Chart], ...]  # (heading, chart)
    measured: tuple[dict[str, Any], ...]
    skipped: tuple[dict[str, Any], ...]
    title: str = "Throughput"
    keys: ClassVar[tuple[str, ...]] = ("target", "case", "source")
    columns: ClassVar[tuple[_Column, ...]] = (("depth", "depth", "d"), *_TABLE)
    template: ClassVar[str] = "throughput.html.j2"


def throughput_section(df: pd.DataFrame) -> ThroughputSection:
    """The report's "Throughput" section: prefill and decode charts, the table, skipped points."""
    charts = tuple(
        (phase.capitalize(), Chart(_figure(df, phase), f"throughput-{phase}",
                                   f"{phase} tokens per second against context length"))
        for phase in ("prefill", "decode")
    )
    measured = _measured(df).sort_values(["target", "case", "source", "B", "depth", "PP", "TG"])
    return ThroughputSection(
        machines=tuple(sorted(set(df["machine"]) - {""})),
        charts=charts,
        measured=tuple(measured.to_dict("records")),
        skipped=tuple(df[df["skip_reason"] != ""].to_dict("records")),
    )


# ---------------------------------------------------------------------------------------------
# The MTP speed section (sweep --mtp)

_SEGMENTS = (  # (column, label, colour): the cost of one draft step in trunk steps
    (None, "trunk step (1)", "0.75"), ("term_draft", "MTP head", "C0"),
    ("term_extra_verify", "extra verify", "C1"), ("term_rollback", "rollback", "C3"),
    ("term_bookkeeping", "bookkeeping", "C7"),
)  # fmt: skip


def _mtp_label(r: Any) -> str:
    return f"{r.backend} · {r.case} · ctx {r.context} · chain {r.chain}"


def _mtp_figure(rows: pd.DataFrame) -> Figure:
    """One bar per measured point: the cost of a draft step in trunk steps, stacked by term,
    against a black tick at what the step yields (1 + accepted drafts): a bar that ends right
    of its tick is a slowdown, and its widest coloured segment is the culprit."""
    fig = Figure(figsize=(12, 1.4 + 0.45 * max(len(rows), 1)), layout="constrained")
    ax = fig.add_subplot()
    labels = []
    right = 0.0
    for i, r in enumerate(rows.itertuples()):
        left = 0.0
        for col, name, colour in _SEGMENTS:
            width = 1.0 if col is None else max(float(getattr(r, col)), 0.0)
            ax.barh(i, width, left=left, color=colour, edgecolor="white", height=0.6,
                    label=name if i == 0 else None)
            left += width
        gain = 1.0 + float(r.accepted_per_step)
        right = max(right, left, gain)
        ax.plot([gain, gain], [i - 0.4, i + 0.4], color="black", lw=2.5,
                label="yield: 1 + accepted per step" if i == 0 else None)
        ax.text(max(left, gain) + 0.05, i,
                f"pred {r.predicted_run_speedup:.2f}× · meas {r.measured_speedup:.2f}× "
                f"({r.measured_speedup_min:.2f}–{r.measured_speedup_max:.2f}) · "
                f"break-even {_pct(r.break_even_acceptance)}", va="center", fontsize=8)
        labels.append(_mtp_label(r))
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("cost of one draft step, in plain trunk steps (T1)")
    ax.grid(True, axis="x", alpha=0.3)
    if labels:
        ax.set_xlim(0, right * 2.1)  # room for the figures written right of each bar
        ax.legend(fontsize=8, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=3, frameon=False)
    else:
        ax.text(0.5, 0.5, "no measured points", transform=ax.transAxes, ha="center")
    return fig


def _pct(value: float) -> str:
    return "never" if math.isnan(value) else f"{value:.0%}"


_MTP_TABLE = (  # (column, header, format)
    ("plain_tok_s", "tok/s plain", ".1f"), ("mtp_tok_s", "tok/s MTP", ".1f"),
    ("acceptance_rate", "acceptance", ".2f"), ("accepted_per_step", "accepted/step", ".2f"),
    ("t1_ms", "T1 ms", ".2f"), ("head_call", "head/T1", ".2f"), ("verify", "verify/T1", ".2f"),
    ("snapshot", "snapshot/T1", ".3f"), ("restore", "restore/T1", ".3f"),
    ("refeed", "re-feed/T1", ".2f"), ("term_bookkeeping", "bookkeeping/T1", ".3f"),
    ("predicted_speedup", "predicted ×", ".2f"), ("measured_speedup", "measured ×", ".2f"),
    ("measured_speedup_min", "min ×", ".2f"), ("measured_speedup_max", "max ×", ".2f"),
    ("prediction_within_spread", "pred. in spread", ""),
    ("break_even_acceptance", "break-even acc.", ".2f"),
)  # fmt: skip


@dataclass(frozen=True)
class MtpSpeedSection:
    """The report's "MTP speed" section as data: the breakdown chart, the culprit per point in
    words, the measurements, and the skipped points."""

    chart: Chart
    explanations: tuple[tuple[str, str], ...]  # (point label, what eats the gain)
    measured: tuple[dict[str, Any], ...]
    skipped: tuple[tuple[str, str], ...]  # (point label, reason)
    title: str = "MTP speed"
    keys: ClassVar[tuple[str, ...]] = ("backend", "case", "context", "chain")
    columns: ClassVar[tuple[_Column, ...]] = _MTP_TABLE
    template: ClassVar[str] = "mtp_speed.html.j2"


def mtp_speed_section(df: pd.DataFrame) -> MtpSpeedSection:
    """The report's "MTP speed" section: the breakdown chart, the culprit per point in words,
    the measurements, and skipped points."""
    measured = df[df["skip_reason"] == ""]
    skipped = df[df["skip_reason"] != ""]
    return MtpSpeedSection(
        chart=Chart(_mtp_figure(measured), "mtp-speed", "MTP step cost breakdown"),
        explanations=tuple((_mtp_label(r), str(r.explanation)) for r in measured.itertuples()),
        measured=tuple(measured.to_dict("records")),
        skipped=tuple((_mtp_label(r), str(r.skip_reason)) for r in skipped.itertuples()),
    )
