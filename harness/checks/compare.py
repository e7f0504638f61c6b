"""The comparison engine: turns two sets of captures into per-point verdicts and result tables.

It knows the core only (capture points, :data:`~harness.core.captures.Captures`, tolerances and
metrics from :mod:`harness.core`), never backends: a candidate and a reference are just captures
plus a label.  What usually breaks at a point is the vocabulary's
(:func:`harness.core.capture_points.explain_divergence`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.core.capture_points import Kind, in_forward_order, parse
from harness.core.captures import Captures
from harness.core.metrics import cosine, index_agreement, kld_stats, max_abs, nmse
from harness.core.tolerances import Tolerance

__all__ = [
    "COLUMNS",
    "PAIR_COLUMNS",
    "PAIR_KEYS",
    "Comparison",
    "PairResult",
    "compare",
    "compare_captures",
    "compare_pair",
    "first_divergence",
    "pairs_frame",
    "results_frame",
    "save_results",
]

# Columns of the per-point table, in order.
COLUMNS: tuple[str, ...] = (
    "point",
    "layer",
    "kind",
    "nmse",
    "max_abs",
    "cosine",
    "top1",
    "index_agreement",
    "mean_kld",
    "kld_99",
    "kld_max",
    "passed",
    "threshold",
    "note",
)
# Columns that identify a pair, prepended to the long table.
PAIR_KEYS: tuple[str, ...] = ("case", "prompt", "candidate", "reference", "mode")
# Columns of pairs.csv, one row per pair.
PAIR_COLUMNS: tuple[str, ...] = (
    *PAIR_KEYS,
    "passed",
    "first_divergence",
    "worst_point",
    "worst_nmse",
    "top1",
    "mean_kld",
)
# The numeric columns: every metric between "point/layer/kind" and "passed".
_FLOAT_COLUMNS: tuple[str, ...] = COLUMNS[COLUMNS.index("nmse") : COLUMNS.index("passed")]
# Targets are next-token ids, which only ``result_output`` predicts (MTP logits predict t+2).
_TARGETS_POINT = "result_output"


# --------------------------------------------------------------------------------------------
# Per-point table


def _blank_row(name: str, kind: Kind, layer: int | None, tol: Tolerance) -> dict[str, Any]:
    row: dict[str, Any] = {c: math.nan for c in _FLOAT_COLUMNS}
    row.update(point=name, layer=layer, kind=kind.value, passed=False, note="")
    row["threshold"] = tol.threshold(kind)
    return row


def _problem(cand: np.ndarray, ref: np.ndarray) -> str:
    """Why two arrays cannot be compared at all, or '' if they can."""
    if cand.shape != ref.shape:
        return f"shape {cand.shape} vs reference {ref.shape}"
    for label, x in (("candidate", cand), ("reference", ref)):
        if x.dtype.kind in "fc" and not np.all(np.isfinite(x)):
            return f"non-finite values in {label}"
    return ""


def _compare_point(
    name: str, cand: np.ndarray, ref: np.ndarray, tol: Tolerance, targets: np.ndarray | None
) -> tuple[dict[str, Any], dict[str, float] | None]:
    """One table row, plus the KLD summary for LOGITS points."""
    spec, layer = parse(name)
    row = _blank_row(name, spec.kind, layer, tol)
    cand, ref = np.asarray(cand), np.asarray(ref)
    row["note"] = _problem(cand, ref)
    if row["note"]:
        return row, None
    if spec.kind is Kind.INDEX:
        row["index_agreement"] = index_agreement(cand, ref)
        row["passed"] = bool(row["index_agreement"] >= tol.index_agreement)
        return row, None
    row["nmse"], row["max_abs"], row["cosine"] = (
        nmse(cand, ref),
        max_abs(cand, ref),
        cosine(cand, ref),
    )
    row["passed"] = bool(row["nmse"] <= tol.nmse)
    if spec.kind is not Kind.LOGITS:
        return row, None
    stats = kld_stats(cand, ref, targets if name == _TARGETS_POINT else None)
    row["top1"] = stats["same_top_p"]
    row["mean_kld"], row["kld_99"], row["kld_max"] = (
        stats[k] for k in ("mean_kld", "kld_99", "kld_max")
    )
    row["passed"] = bool(row["passed"] and stats["same_top_p"] >= tol.top1)
    return row, stats


def _table(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """Rows as a DataFrame with stable dtypes, even when empty."""
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    df["layer"] = df["layer"].astype("Int64")
    df["passed"] = df["passed"].astype(bool)
    for c in _FLOAT_COLUMNS:
        df[c] = df[c].astype(np.float64)
    for c in ("point", "kind", "threshold", "note"):
        df[c] = df[c].astype(str)
    return df


@dataclass(frozen=True)
class Comparison:
    """What :func:`compare` found: the per-point table and, as typed fields beside it, what a
    table cannot carry (``DataFrame.attrs`` is lost on copy)."""

    table: pd.DataFrame
    # Points only one side produced: not failures (a backend may not expose them), not compared.
    only_candidate: tuple[str, ...]
    only_reference: tuple[str, ...]
    kld: dict[str, dict[str, float]]  # each compared LOGITS point -> its kld_stats
    tolerance: Tolerance


def compare(
    candidate: Captures,
    reference: Captures,
    tol: Tolerance,
    *,
    targets: np.ndarray | None = None,
) -> Comparison:
    """One row per point captured by both sides, in forward order, with what was left out and
    the logits' KL statistics; ``targets`` apply to ``result_output``."""
    common = in_forward_order(set(candidate) & set(reference))
    rows, klds = [], {}
    for name in common:
        row, stats = _compare_point(name, candidate[name], reference[name], tol, targets)
        rows.append(row)
        if stats is not None:
            klds[name] = stats
    return Comparison(
        table=_table(rows),
        only_candidate=tuple(sorted(set(candidate) - set(reference))),
        only_reference=tuple(sorted(set(reference) - set(candidate))),
        kld=klds,
        tolerance=tol,
    )


def compare_captures(
    candidate: Captures,
    reference: Captures,
    tol: Tolerance,
    *,
    targets: np.ndarray | None = None,
) -> pd.DataFrame:
    """The per-point table of :func:`compare`, for callers that need only the verdicts."""
    return compare(candidate, reference, tol, targets=targets).table


def first_divergence(df: pd.DataFrame) -> str | None:
    """The first failing point in forward order: where to start looking for the bug."""
    failing = df.loc[~df["passed"].astype(bool), "point"]
    if failing.empty:
        return None
    return in_forward_order(list(failing))[0]


# --------------------------------------------------------------------------------------------
# Pairs


@dataclass
class PairResult:
    """One candidate compared against one reference on one prompt of one case."""

    case: str
    prompt: str
    candidate: str
    reference: str
    mode: str  # "prefill" or "decode"
    table: pd.DataFrame
    first_divergence: str | None
    passed: bool
    kld: dict[str, float] = field(default_factory=dict)
    tolerance: Tolerance | None = None  # what the table was held to
    only_candidate: tuple[str, ...] = ()  # points the reference lacks (not compared)
    only_reference: tuple[str, ...] = ()  # points the candidate lacks (not compared)

    @property
    def informational(self) -> bool:
        """Held to no bound (a quantized port's quantization-error table): reported, never a
        verdict."""
        return self.tolerance is not None and math.isinf(self.tolerance.nmse)

    def summary_line(self) -> str:
        """One line for logs and test failure messages."""
        mode = "" if self.mode == "prefill" else f" ({self.mode})"
        head = f"{self.candidate} vs {self.reference} on {self.case}/{self.prompt}{mode}"
        if self.table.empty:
            return f"{head}: FAIL, no capture points in common"
        if not self.passed:
            why = _failure_text(self.table, self.first_divergence, self.tolerance)
            return f"{head}: FAIL, {why}"
        n = len(self.table)
        worst = _worst(self.table)
        if self.informational:
            head = f"{head}: reported, not judged"
            return head if worst is None else f"{head}, worst nmse {worst[1]:.1e} at {worst[0]}"
        if worst is None:
            return f"{head}: PASS ({n} points compared)"
        return f"{head}: PASS, worst nmse {worst[1]:.1e} at {worst[0]} ({n} points compared)"


def _failure_text(table: pd.DataFrame, point: str | None, tolerance: Tolerance | None) -> str:
    """'first divergence at X (why)' for the failing point ``point``."""
    if point is None:
        return "no failing point"
    row = table.loc[table["point"] == point].iloc[0]
    tol = {f.name: getattr(tolerance, f.name) for f in fields(tolerance)} if tolerance else {}
    if row["note"]:
        why = row["note"]
    elif row["kind"] == Kind.INDEX.value:
        why = f"index agreement {row['index_agreement']:.3g} < {tol.get('index_agreement', 1):g}"
    elif row["kind"] == Kind.LOGITS.value and not row["nmse"] > tol.get("nmse", math.inf):
        why = f"top1 {row['top1']:.3g} < {tol.get('top1', 1):g}"
    else:
        why = f"nmse {row['nmse']:.1e} > {tol.get('nmse', math.nan):g}"
    return f"first divergence at {point} ({why})"


def _worst(table: pd.DataFrame) -> tuple[str, float] | None:
    """The point with the largest NMSE, or None if no point has one."""
    values = table["nmse"]
    if values.isna().all():
        return None
    i = values.idxmax()
    return str(table.at[i, "point"]), float(values[i])


def compare_pair(
    case: str,
    prompt: str,
    candidate_label: str,
    reference_label: str,
    candidate_caps: Captures,
    reference_caps: Captures,
    tol: Tolerance,
    mode: str = "prefill",
    targets: np.ndarray | None = None,
) -> PairResult:
    """Compare two capture sets and wrap the verdict with what was compared."""
    if mode not in ("prefill", "decode"):
        raise ValueError(f"mode must be 'prefill' or 'decode', got {mode!r}")
    found = compare(candidate_caps, reference_caps, tol, targets=targets)
    table = found.table
    return PairResult(
        case=case,
        prompt=prompt,
        candidate=candidate_label,
        reference=reference_label,
        mode=mode,
        table=table,
        first_divergence=first_divergence(table),
        passed=bool(len(table)) and bool(table["passed"].all()),
        kld=dict(found.kld.get("result_output", {})),
        tolerance=found.tolerance,
        only_candidate=found.only_candidate,
        only_reference=found.only_reference,
    )


def results_frame(results: list[PairResult]) -> pd.DataFrame:
    """All pairs' rows in one long table, keyed by the pair columns."""
    parts = []
    for r in results:
        if r.table.empty:
            continue
        part = r.table.copy()
        for i, key in enumerate(PAIR_KEYS):
            part.insert(i, key, getattr(r, key))
        parts.append(part)
    if not parts:
        empty = _table([])
        for i, key in enumerate(PAIR_KEYS):
            empty.insert(i, key, pd.Series(dtype=str))
        return empty
    return pd.concat(parts, ignore_index=True)


def pairs_frame(results: list[PairResult]) -> pd.DataFrame:
    """One row per pair: the verdict, where it diverged and the logits summary."""
    rows = []
    for r in results:
        worst = _worst(r.table) if not r.table.empty else None
        logits = r.table.loc[r.table["point"] == "result_output", "top1"]
        rows.append(
            {
                **{key: getattr(r, key) for key in PAIR_KEYS},
                "passed": r.passed,
                "first_divergence": r.first_divergence,
                "worst_point": worst[0] if worst else None,
                "worst_nmse": worst[1] if worst else math.nan,
                "top1": float(logits.iloc[0]) if not logits.empty else math.nan,
                "mean_kld": r.kld.get("mean_kld", math.nan),
            }
        )
    return pd.DataFrame(rows, columns=list(PAIR_COLUMNS))


def save_results(results: list[PairResult], out_dir: Path) -> dict[str, Path]:
    """Write parity.parquet / parity.csv (long table) and pairs.csv (one row per pair)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "parquet": out_dir / "parity.parquet",
        "csv": out_dir / "parity.csv",
        "pairs": out_dir / "pairs.csv",
    }
    long = results_frame(results)
    long.to_parquet(paths["parquet"], index=False)
    long.to_csv(paths["csv"], index=False)
    pairs_frame(results).to_csv(paths["pairs"], index=False)
    return paths
