"""``python -m harness sweep``: throughput against context length, plus imported tool output.

Writes ``throughput.parquet`` / ``throughput.csv`` and an HTML report whose "Throughput" section
(:func:`throughput_section`) charts prefill and decode tok/s per backend on log axes, with the
decode roofline per case, and tabulates the llama-batched-bench columns.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pandas as pd
from markupsafe import escape
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from harness.backends.targets import BACKENDS, parse_targets
from harness.checks.cases import CASES_DIR, load_cases
from harness.core.errors import InputError
from harness.perf.bench_import import (
    KINDS,
    import_file,
    parse_import_spec,
    to_batched_bench_markdown,
)
from harness.perf.roofline import measure_bandwidth_gbs
from harness.perf.sweep import (
    DEFAULT_MAX_POINT_S,
    ModelShape,
    fill_roofline,
    run_sweep,
    save_sweep,
    throughput_frame,
)
from harness.report.page import Section, _inline_svg

_SVG_LABEL = 'aria-label="per-layer NMSE ({prefix})"'  # what harness.report.page._inline_svg writes


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{option}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise InputError(f"{option}: no values given")
    return values


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``sweep`` on the harness CLI's subparsers."""
    p = subparsers.add_parser(
        "sweep", help="throughput (prefill/decode tok/s) against context length, with roofline",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--backends", default=",".join(BACKENDS),
                   help="targets to measure, e.g. 'torch,mlx' or 'mlx-float32'; 'none' to only "
                        f"import (default: every registered backend, {','.join(BACKENDS)})")
    p.add_argument("--cases", default="flash-mini", help="comma-separated case names")
    p.add_argument("--cases-dir", type=Path, default=None,
                   help="folder to find the --cases in (default: cases/); e.g. cases/bench for "
                        "benchmark shapes that are not parity cases")
    p.add_argument("--pp", default="128,512,2048,8192,32768", help="prompt lengths (PP)")
    p.add_argument("--tg", type=int, default=128, help="decode steps after each prefill (TG)")
    p.add_argument("--batch", default="1", help="parallel sequences B (torch/mlx: 1 only)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point (median)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per point first")
    p.add_argument("--bandwidth-gbs", type=float, default=None,
                   help="memory bandwidth for the decode roofline, e.g. 400 for an M2 Max "
                        "(default: measured here with a numpy copy, read+write bytes)")
    p.add_argument("--max-point-s", type=float, default=DEFAULT_MAX_POINT_S,
                   help="skip a point whose extrapolated time exceeds this many seconds")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (default: torch's own); 1 is steadiest on a "
                        "machine other jobs share")
    p.add_argument("--import", dest="imports", action="append", default=[],
                   metavar="FILE:KIND:TARGET[:CASE]",
                   help=f"add another tool's output; KIND one of {', '.join(KINDS)}; "
                        "e.g. bb.txt:llama-batched-bench:llamacpp-f32:flash-mini")
    p.add_argument("--mtp", action="store_true",
                   help="instead of the throughput grid: greedy decode tok/s without and with "
                        "MTP drafting per backend, case and --pp, its breakdown (draft, verify, "
                        "rollback, bookkeeping), predicted vs measured speed-up and the "
                        "break-even acceptance (mtp_speed.parquet); e.g. --backends "
                        "llamacpp,llamacpp:mtp_rollback=seq_rm,mlx --cases mtp-agree")
    p.add_argument("--mtp-chain", default="1",
                   help="with --mtp: draft chain lengths, comma-separated (default 1)")
    p.add_argument("--out", type=Path, default=None,
                   help="output folder (must be empty or absent); default reports/<time>-sweep")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    """Measure, import, write the tables and the report; 1 when nothing at all was measured."""
    from harness.pytest_plugin.plugin import environment
    from harness.report.run_folder import check_out_dir, write_run

    check_out_dir(args.out)
    if args.mtp:
        return run_mtp(args)
    case_names = [c.strip() for c in args.cases.split(",") if c.strip()]
    cases_dir = args.cases_dir if args.cases_dir is not None else CASES_DIR
    cases = load_cases(case_names, cases_dir) if case_names else []
    imports = [parse_import_spec(s) for s in args.imports]
    measure = args.backends.strip().lower() not in ("", "none")
    targets = parse_targets(args.backends) if measure else []
    bandwidth = args.bandwidth_gbs if args.bandwidth_gbs else measure_bandwidth_gbs()
    frames = []
    if targets and cases:
        frames.append(run_sweep(
            targets, cases, prompt_lengths=_ints(args.pp, "--pp"), tg=args.tg,
            batch=_ints(args.batch, "--batch"), repeats=args.repeats, warmup=args.warmup,
            progress=not args.no_progress, bandwidth_gbs=bandwidth, max_point_s=args.max_point_s,
            threads=args.threads,
        ))
    for path, kind, target, case in imports:
        frames.append(import_file(path, kind, target, case=case))
    df = pd.concat(frames, ignore_index=True) if frames else throughput_frame([])
    shapes = {c.name: ModelShape.of(c) for c in cases}
    configs = {name: shape.config for name, shape in shapes.items() if shape.config}
    df = fill_roofline(df, bandwidth, configs)
    findings = [f"{r.target} {r.case} PP={r.PP} B={r.B} skipped: {r.skip_reason}"
                for r in df.itertuples() if r.skip_reason]
    out = write_run([], Path("reports"), title=f"throughput: {', '.join(case_names) or 'imports'}",
                    findings=findings, environment=environment(), name="sweep",
                    sections=[throughput_section(df)], out=args.out,
                    extra=lambda folder: save_sweep(df, folder))
    print(to_batched_bench_markdown(df))
    for finding in findings:
        print(finding, file=sys.stderr)
    print(f"report: {out / 'index.html'}")
    return 0 if (df["skip_reason"] == "").any() else 1


def run_mtp(args: argparse.Namespace) -> int:
    """``sweep --mtp``: the MTP speed table and its report section; 1 when nothing measured."""
    from harness.perf.mtp_speed import run_mtp_sweep, save_mtp_speed
    from harness.pytest_plugin.plugin import environment
    from harness.report.run_folder import write_run

    case_names = [c.strip() for c in args.cases.split(",") if c.strip()]
    cases_dir = args.cases_dir if args.cases_dir is not None else CASES_DIR
    cases = load_cases(case_names, cases_dir)
    targets = parse_targets(args.backends)
    chains = _ints(args.mtp_chain, "--mtp-chain")
    if min(chains) < 1:
        raise InputError(f"--mtp-chain: chain lengths must be >= 1, got {args.mtp_chain!r}")
    if args.repeats < 1 or args.warmup < 0:
        raise InputError("--repeats must be >= 1 and --warmup >= 0")
    df = run_mtp_sweep(targets, cases, prompt_lengths=_ints(args.pp, "--pp"), tg=args.tg,
                       chains=chains, repeats=args.repeats, warmup=args.warmup,
                       threads=args.threads)
    findings = [f"{r.backend} {r.case} context={r.context} chain={r.chain} skipped: "
                f"{r.skip_reason}" for r in df.itertuples() if r.skip_reason]
    out = write_run([], Path("reports"), title=f"MTP speed: {', '.join(case_names)}",
                    findings=findings, environment=environment(), name="mtp-speed",
                    sections=[mtp_speed_section(df)], out=args.out,
                    extra=lambda folder: save_mtp_speed(df, folder))
    cols = ["backend", "case", "context", "chain", "plain_tok_s", "mtp_tok_s",
            "acceptance_rate", "predicted_speedup", "measured_speedup",
            "break_even_acceptance", "culprit"]
    print(df[df["skip_reason"] == ""][cols].to_string(index=False, float_format="%.3f"))
    for finding in findings:
        print(finding, file=sys.stderr)
    print(f"report: {out / 'index.html'}")
    return 0 if (df["skip_reason"] == "").any() else 1


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


def _svg(fig: Figure, prefix: str, label: str) -> str:
    svg = _inline_svg(fig, prefix)
    return svg.replace(_SVG_LABEL.format(prefix=prefix), f'aria-label="{escape(label)}"', 1)


def _cell(value: Any, spec: str) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return '<td class="num">–</td>'
    return f'<td class="num">{format(value, spec)}</td>'


_TABLE = (  # (column, header, format)
    ("PP", "PP", "d"), ("TG", "TG", "d"), ("B", "B", "d"), ("N_KV", "N_KV", "d"),
    ("T_PP", "T_PP s", ".3f"), ("S_PP", "S_PP t/s", ".2f"), ("T_TG", "T_TG s", ".3f"),
    ("S_TG", "S_TG t/s", ".2f"), ("T", "T s", ".3f"), ("S", "S t/s", ".2f"),
    ("T_PP_spread", "T_PP spread s", ".3f"), ("T_TG_spread", "T_TG spread s", ".3f"),
    ("roofline_tgs", "roofline t/s", ",.0f"), ("roofline_frac", "roofline frac", ".4f"),
    ("peak_rss_mb", "peak RSS MiB", ",.0f"), ("peak_backend_mb", "peak backend MiB", ",.0f"),
)  # fmt: skip


def _table(rows: Iterable[Any]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in ("target", "case", "source", "depth"))
    head += "".join(f"<th>{escape(h)}</th>" for _, h, _ in _TABLE)
    body = []
    for r in rows:
        cells = "".join(f"<td>{escape(str(r[c]))}</td>" for c in ("target", "case", "source"))
        cells += _cell(r["depth"], "d")
        cells += "".join(_cell(r[c], spec) for c, _, spec in _TABLE)
        body.append(f"<tr>{cells}</tr>")
    return f'<table class="throughput"><tr>{head}</tr>{"".join(body)}</table>'


def throughput_section(df: pd.DataFrame) -> Section:
    """The report's "Throughput" section: prefill and decode charts, the table, skipped points."""
    parts = [
        '<p class="muted">Columns as llama-batched-bench: S_PP = B·PP/T_PP, S_TG = B·TG/T_TG, '
        "T = T_PP + T_TG, S = all tokens / T; T_PP and T_TG are medians over the timed repeats, "
        "spreads are max − min. Decode roofline = bandwidth / weight bytes read per token (one "
        "embedding row, attention, norms, dense and shared FFN, router, only the active routed "
        "experts, lm_head); bandwidth counts read + write bytes of a memory copy. KV-cache "
        "reads are not in the roofline.</p>"
    ]
    machines = sorted(set(df["machine"]) - {""})
    if machines:
        parts.append('<p class="muted">Machine: ' + "; ".join(map(str, map(escape, machines)))
                     + "</p>")
    for phase in ("prefill", "decode"):
        label = f"{phase} tokens per second against context length"
        fig = _figure(df, phase)
        parts.append(f"<h3>{escape(phase.capitalize())}</h3>")
        parts.append(f'<div class="chart">{_svg(fig, f"throughput-{phase}", label)}</div>')
    measured = _measured(df).sort_values(["target", "case", "source", "B", "depth", "PP", "TG"])
    if len(measured):
        parts.append(f"<details><summary>Measurements ({len(measured)} points)</summary>"
                     f"{_table(r for _, r in measured.iterrows())}</details>")
    else:
        parts.append('<h3>Measurements</h3><p class="muted">No measured points.</p>')
    skipped = df[df["skip_reason"] != ""]
    if len(skipped):
        items = "".join(
            f"<li>{escape(r.target)} · {escape(r.case)} PP={r.PP} TG={r.TG} B={r.B}: "
            f"{escape(r.skip_reason)}</li>"
            for r in skipped.itertuples()
        )
        parts.append(f"<h3>Skipped points</h3><ul>{items}</ul>")
    return Section("Throughput", "\n".join(parts))


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


def mtp_speed_section(df: pd.DataFrame) -> Section:
    """The report's "MTP speed" section: the breakdown chart, the culprit per point in words,
    the measurements, and skipped points."""
    measured = df[df["skip_reason"] == ""]
    parts = [
        '<p class="muted">Greedy decoding with and without MTP drafting on the same prompt, '
        "plain and speculative runs interleaved. T1 = one plain trunk step. A draft step costs "
        "1 + MTP head + extra verify (the 1+k-token verification beyond one token) + rollback "
        "(snapshot each step; restore and re-feed on a rejection) + driver bookkeeping; it "
        "yields 1 + accepted drafts. Predicted speed-up = yield / cost; measured = median ratio "
        "of decode tok/s over the pairs (min–max in brackets). Break-even: the per-draft "
        "acceptance below which MTP cannot pay at these costs.</p>",
        f'<div class="chart">{_svg(_mtp_figure(measured), "mtp-speed", "MTP step cost breakdown")}'
        "</div>",
    ]
    if len(measured):
        items = "".join(f"<li><b>{escape(_mtp_label(r))}</b>: {escape(r.explanation)}</li>"
                        for r in measured.itertuples())
        parts.append(f"<h3>What eats the gain</h3><ul>{items}</ul>")
        head = "".join(f"<th>{escape(h)}</th>" for h in ("backend", "case", "context", "chain"))
        head += "".join(f"<th>{escape(h)}</th>" for _, h, _ in _MTP_TABLE)
        body = []
        for _, r in measured.iterrows():
            cells = "".join(f"<td>{escape(str(r[c]))}</td>"
                            for c in ("backend", "case", "context", "chain"))
            cells += "".join(_cell(r[c], spec) for c, _, spec in _MTP_TABLE)
            body.append(f"<tr>{cells}</tr>")
        parts.append(f'<table class="throughput"><tr>{head}</tr>{"".join(body)}</table>')
    skipped = df[df["skip_reason"] != ""]
    if len(skipped):
        items = "".join(f"<li>{escape(_mtp_label(r))}: {escape(r.skip_reason)}</li>"
                        for r in skipped.itertuples())
        parts.append(f"<h3>Skipped points</h3><ul>{items}</ul>")
    return Section("MTP speed", "\n".join(parts))
