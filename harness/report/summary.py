"""The one-screen summary table printed after a parity run (pytest, nox and the CLI), and the
run's ``summary.json``."""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
from rich.console import Console
from rich.table import Table

from harness.checks.compare import PairResult
from harness.core.capture_points import explain_divergence
from harness.core.verdict import RunVerdict


def summary_table(results: Sequence[PairResult]) -> Table:
    """One row per compared pair: verdict, first divergence, worst point and logits agreement."""
    table = Table(title="parity: candidate vs reference", show_lines=False)
    for col in ("case/prompt", "mode", "candidate", "reference", "verdict", "first divergence",
                "worst nmse", "top-1"):
        table.add_column(col)
    for r in results:
        dense = r.table.dropna(subset=["nmse"])
        worst = dense.loc[dense["nmse"].idxmax()] if len(dense) else None
        logits = r.table[r.table["point"] == "result_output"]
        top1 = f"{logits['top1'].iloc[0]:.1%}" if len(logits) else "-"
        table.add_row(
            f"{r.case}/{r.prompt}", r.mode, r.candidate, r.reference,
            "info" if r.informational else "[green]PASS[/]" if r.passed else "[red]FAIL[/]",
            r.first_divergence or "-",
            f"{worst['nmse']:.2e} ({worst['point']})" if worst is not None else "-",
            top1,
        )
    return table


def print_summary(
    results: Sequence[PairResult], findings: Sequence[str], write: Callable[[str], object] = print
) -> None:
    """Render the table (and any findings) as text through ``write``."""
    buf = io.StringIO()
    console = Console(file=buf, width=160, force_terminal=False, color_system=None)
    console.print(summary_table(results))
    for f in dict.fromkeys(findings):
        console.print(f"finding: {f}")
    write("\n" + buf.getvalue())


def summary_json(results: Sequence[PairResult], verdict: RunVerdict) -> dict:
    """The run's verdict (harness.core.verdict: the one source of ``passed`` and the exit code),
    then per pair: first divergence (name or null), NMSE per capture point, top-1 agreement."""
    pairs = {}
    for r in results:
        key = f"{r.candidate} vs {r.reference}" + ("" if r.mode == "prefill" else f" ({r.mode})")
        t = r.table
        logits = t[t["point"] == "result_output"]
        pairs[key] = {
            "candidate": r.candidate,
            "reference": r.reference,
            "mode": r.mode,
            "passed": bool(r.passed),
            "informational": r.informational,
            "first_divergence": r.first_divergence,
            "explanation": explain_divergence(r.first_divergence) if r.first_divergence else None,
            "nmse": {p: float(v) for p, v in zip(t["point"], t["nmse"], strict=True)
                     if not np.isnan(v)},
            "top1_agreement": float(logits["top1"].iloc[0]) if len(logits) else None,
        }
    return {**verdict.to_json(), "pairs": pairs}
