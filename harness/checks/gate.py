"""The regression gate: a run against a stored baseline, per parity point, MTP row and grid point.

A baseline is one JSON file holding the tables a run writes (``parity.parquet``,
``throughput.parquet``, ``mtp.parquet``, ``verdicts.parquet``) as records; it is only written by
an explicit ``--update-baseline``.  The gate exists to say "nothing got worse", so it must never
pass a run that fails.  Rules, each stated where it is applied:

- failures (whatever the baseline holds): a verdict ``failed`` or ``error`` (a crashed port
  included), a parity point out of tolerance unless its pair is a known failure (``xfailed``), an
  MTP row whose check failed or crashed;
- coverage: every baseline point, MTP row and verdict the run lacks (or now skips) is a
  regression; a whole missing candidate, case or pair is one row, not thousands;
- parity: a point regresses when its NMSE grew more than ``nmse_factor``-fold (above a floor, so
  exact zeros stay quiet), or when top-1 or router-id agreement dropped;
- MTP: acceptance regresses when it falls by more than two binomial standard errors; draft
  logits as parity points (NMSE up more than the factor, top-1 down);
- throughput: tok/s regresses when it falls below the baseline by more than the measured spread
  makes plausible (``spread_k`` times the two runs' relative spreads, at least ``min_drop``).

A run that compared nothing and a baseline without rows are refused as bad input: a gate over
nothing would pass vacuously.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.core.atomic import write_text
from harness.core.errors import InputError

PARITY_KEY = ["case", "prompt", "candidate", "reference", "mode", "point"]
PAIR_KEY = PARITY_KEY[:-1]
MTP_KEY = ["case", "prompt", "backend"]
THROUGHPUT_KEY = ["target", "case", "PP", "TG", "B"]
VERDICT_KEY = ["case", "prompt", "candidate", "reference", "check"]
TABLES = {"parity": "parity.parquet", "mtp": "mtp.parquet", "throughput": "throughput.parquet",
          "verdicts": "verdicts.parquet"}
KEYS = {"parity": PARITY_KEY, "mtp": MTP_KEY, "throughput": THROUGHPUT_KEY,
        "verdicts": VERDICT_KEY}
COLUMNS = ["table", "key", "metric", "baseline", "current", "allowed", "reason"]
BASELINE_VERSION = 1

STATUSES = ("passed", "failed", "error", "xfailed", "skipped")
FAILING = frozenset({"failed", "error"})

# What a table must hold for the rules to read it; other metric columns may be absent (NaN).
REQUIRED = {"parity": [*PARITY_KEY, "passed"], "mtp": [*MTP_KEY, "acceptance_rate"],
            "throughput": THROUGHPUT_KEY, "verdicts": [*VERDICT_KEY, "status"]}
NUMERIC = {
    "parity": ["nmse", "top1", "index_agreement"],
    "mtp": ["acceptance_rate", "num_draft_tokens", "draft_nmse_max", "draft_top1"],
    "throughput": ["S_PP", "T_PP", "T_PP_spread", "S_TG", "T_TG", "T_TG_spread"],
    "verdicts": [],
}
# What a baseline keeps per table: the keys and the metrics the rules read, nothing else.
KEPT = {
    "parity": [*PARITY_KEY, "nmse", "passed", "top1", "index_agreement"],
    "mtp": [*MTP_KEY, "acceptance_rate", "num_draft_tokens", "draft_nmse_max", "draft_top1"],
    "throughput": [*THROUGHPUT_KEY, "S_PP", "T_PP", "T_PP_spread", "S_TG", "T_TG", "T_TG_spread"],
    "verdicts": [*VERDICT_KEY, "status"],
}


@dataclass(frozen=True)
class GateRules:
    """How much worse a metric may get before it counts as a regression."""

    nmse_factor: float = 100.0
    nmse_floor: float = 1e-16
    spread_k: float = 2.0
    min_drop: float = 0.10


# --------------------------------------------------------------------------------------------
# Reading and checking tables


def conform(name: str, df: pd.DataFrame, where: str) -> pd.DataFrame:
    """``df`` checked as the ``name`` table (keys, metric types, statuses), or InputError naming
    ``where``; absent optional metrics become NaN so every rule can read every column."""
    if name not in TABLES:
        raise InputError(f"{where}: unknown table {name!r}; expected one of {sorted(TABLES)}")
    missing = [c for c in REQUIRED[name] if c not in df.columns]
    if missing:
        raise InputError(f"{where}: no column(s) {missing}; a {name} table needs "
                         f"{REQUIRED[name]}")
    df = df.copy()
    for col in NUMERIC[name]:
        df[col] = _numeric(df, col, where)
    if name == "parity":
        if not df["passed"].isin([True, False]).all():
            raise InputError(f"{where}: column 'passed' must hold true/false only")
        df["passed"] = df["passed"].astype(bool)
    if name == "verdicts":
        unknown = sorted(set(df["status"].astype(str)) - set(STATUSES))
        if unknown:
            raise InputError(f"{where}: unknown status(es) {unknown}; expected one of "
                             f"{list(STATUSES)}")
        df["detail"] = df["detail"].fillna("").astype(str) if "detail" in df.columns else ""
    if name != "throughput" and df.duplicated(KEYS[name]).any():
        dup = df.loc[df.duplicated(KEYS[name]), KEYS[name]].iloc[0]
        raise InputError(f"{where}: more than one row for {'/'.join(map(str, dup))}")
    return df


def _numeric(df: pd.DataFrame, col: str, where: str) -> pd.Series:
    if col not in df.columns:
        return pd.Series(np.nan, index=df.index, dtype=float)
    try:
        return pd.to_numeric(df[col]).astype(float)
    except (ValueError, TypeError):
        raise InputError(f"{where}: column {col!r} must hold numbers") from None


def load_run(run_dir: Path) -> dict[str, pd.DataFrame]:
    """The tables a run folder holds (any subset of parity, mtp, throughput, verdicts)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: not a run folder")
    tables = {}
    for name, fname in TABLES.items():
        path = run_dir / fname
        if path.is_file():
            try:
                df = pd.read_parquet(path)
            except (OSError, ValueError) as e:
                raise InputError(f"{path}: unreadable parquet file ({e})") from None
            tables[name] = conform(name, df, str(path))
    if not compared(tables):
        held = ", ".join(tables) or f"none of {', '.join(TABLES.values())}"
        raise InputError(f"{run_dir}: the run compared nothing (it holds {held}, no row)")
    return tables


def load_baseline(path: Path) -> dict[str, pd.DataFrame]:
    """The baseline's tables, or InputError naming the file and the key that is wrong."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path}: is a folder, not a baseline file")
    if not path.exists():
        raise InputError(f"{path}: no baseline; create one with --update-baseline")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot be read ({e})") from None
    except ValueError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    tables = _baseline_tables(raw, path)
    if not _has_rows(tables):
        raise InputError(f"{path}: an empty baseline (no row in any table); write one from a "
                         "passing run with --update-baseline")
    return tables


def _baseline_tables(raw: Any, path: Path) -> dict[str, pd.DataFrame]:
    if not isinstance(raw, dict):
        raise InputError(f"{path}: expected an object {{\"version\": 1, \"tables\": {{...}}}}")
    if raw.get("version") != BASELINE_VERSION:
        raise InputError(f"{path}: \"version\" is {raw.get('version')!r}; this harness reads "
                         f"version {BASELINE_VERSION}")
    tables = raw.get("tables")
    if not isinstance(tables, dict):
        raise InputError(f"{path}: \"tables\" must be an object mapping a table name to its "
                         f"rows, not {type(tables).__name__}")
    out = {}
    for name, rows in tables.items():
        where = f"{path}: tables.{name}"
        if not isinstance(rows, list):
            raise InputError(f"{where} must be a list of row objects, not "
                             f"{type(rows).__name__}")
        bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
        if bad is not None:
            raise InputError(f"{where}[{bad}] is not an object")
        columns = KEPT.get(name) if not rows else None
        out[name] = conform(name, pd.DataFrame.from_records(rows, columns=columns), where)
    return out


def _has_rows(tables: dict[str, pd.DataFrame]) -> bool:
    return any(not df.empty for df in tables.values())


def compared(run: dict[str, pd.DataFrame]) -> bool:
    """Whether the run compared anything: a data row, or a verdict other than ``skipped``."""
    for name, df in run.items():
        if name == "verdicts":
            if (df["status"] != "skipped").any():
                return True
        elif not df.empty:
            return True
    return False


def save_baseline(tables: dict[str, pd.DataFrame], path: Path) -> Path:
    """Write the baseline file atomically (the explicit command; callers decide whether it may
    be written: see :func:`failures`)."""
    payload = {name: [_plain(row) for row in df[_kept(name, df)].to_dict(orient="records")]
               for name, df in tables.items()}
    # One row per line: compact, and a baseline update reads as a line diff.
    lines = [f'{{"version": {BASELINE_VERSION}, "tables": {{']
    for i, (name, rows) in enumerate(payload.items()):
        body = ",\n".join(json.dumps(row, sort_keys=True) for row in rows)
        lines.append(f"{json.dumps(name)}: [\n{body}\n]" + ("," if i < len(payload) - 1 else ""))
    lines.append("}}")
    return write_text(Path(path), "\n".join(lines) + "\n")


def _kept(name: str, df: pd.DataFrame) -> list[str]:
    return [c for c in KEPT.get(name, df.columns) if c in df.columns]


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready values at full precision (pandas' to_json rounds 1e-14 to 0.0)."""
    out = {}
    for k, v in row.items():
        v = v.item() if isinstance(v, np.generic) else v
        out[k] = None if (isinstance(v, float) and math.isnan(v)) or v is pd.NA else v
    return out


# --------------------------------------------------------------------------------------------
# Rows of the verdict table


def _key(row: Any, key: Sequence[str]) -> str:
    return "/".join(str(getattr(row, k)) for k in key)


def _row(table: str, key: str, metric: str, base: float, cur: float, allowed: str,
         reason: str) -> dict[str, Any]:
    return dict(zip(COLUMNS, (table, key, metric, base, cur, allowed, reason), strict=True))


# Whole groups the run lacks, coarsest first: (columns, how one is named).
PARITY_LEVELS = [(["candidate"], "candidate {candidate}"), (["case"], "case {case}"),
                 (["mode"], "mode {mode}"), (["case", "candidate"], "{candidate} on case {case}"),
                 (PAIR_KEY, "pair {case}/{prompt}/{candidate}/{reference}/{mode}")]
MTP_LEVELS = [(["backend"], "backend {backend}"), (["case"], "case {case}")]
VERDICT_LEVELS = [(["candidate"], "candidate {candidate}"), (["case"], "case {case}"),
                  (["check"], "check {check}"), (["case", "candidate"],
                                                  "{candidate} on case {case}")]


def summarised(table: str, lost: pd.DataFrame, cur: pd.DataFrame, key: list[str],
               levels: list[tuple[list[str], str]], how: str = "missing from the run",
               unit: str = "rows") -> list[dict]:
    """One regression per baseline row in ``lost`` (rows the run lacks), a whole candidate, case
    or pair the run lacks summarised in one row so the table stays readable."""
    out = []
    for cols, label in levels:
        if lost.empty:
            break
        present = set(cur[cols].itertuples(index=False, name=None))
        gone = np.array([t not in present for t in lost[cols].itertuples(index=False, name=None)],
                        dtype=bool)
        for group, sub in lost[gone].groupby(cols, sort=False, dropna=False):
            values = dict(zip(cols, group, strict=True))
            out.append(_row(table, "/".join(map(str, group)), "+".join(cols), math.nan,
                            math.nan, "present",
                            f"{label.format(**values)} {how} ({len(sub)} {unit})"))
        lost = lost[~gone]
    out += [_row(table, _key(r, key), "row", math.nan, math.nan, "present", how)
            for r in lost.itertuples(index=False)]
    return out


# --------------------------------------------------------------------------------------------
# Failures of the run itself (rule 1: whatever the baseline holds)


def _verdict_index(run: dict[str, pd.DataFrame]) -> dict[tuple, tuple[str, str]]:
    df = run.get("verdicts")
    if df is None:
        return {}
    return {tuple(k): (s, d) for k, s, d in zip(df[VERDICT_KEY].itertuples(index=False),
                                                df["status"], df["detail"], strict=True)}


def failures(run: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Everything in ``run`` that failed, one row per failing pair, check or MTP row: a failing
    run is a failing run whether or not the baseline ever saw that pair."""
    verdicts = _verdict_index(run)
    rows: list[dict] = []
    covered: set[tuple] = set()
    rows += _parity_failures(run.get("parity"), verdicts, covered)
    rows += _mtp_failures(run.get("mtp"), verdicts, covered)
    for key, (status, detail) in verdicts.items():
        if status in FAILING and key not in covered:
            rows.append(_row("verdicts", "/".join(map(str, key)), "status", math.nan, math.nan,
                             "passed or xfailed",
                             f"the {key[-1]} check {status}" + (f": {detail}" if detail else "")))
    return pd.DataFrame(rows, columns=COLUMNS)


def _parity_failures(df: pd.DataFrame | None, verdicts: dict[tuple, tuple[str, str]],
                     covered: set[tuple]) -> list[dict]:
    if df is None or df.empty:
        return []
    out = []
    for pair, sub in df[~df["passed"]].groupby(PAIR_KEY, sort=False, dropna=False):
        covered.add(pair)
        if verdicts.get(pair, ("", ""))[0] == "xfailed":
            continue
        first = sub.iloc[0]
        note = _text(first.get("note"), "see the report")
        out.append(_row("parity", "/".join(map(str, (*pair, first["point"]))), "passed",
                        math.nan, 0, _text(first.get("threshold"), "within tolerance"),
                        f"fails its tolerance at {len(sub)} point(s), first at {first['point']} "
                        f"({note})"))
    return out


def _text(value: Any, default: str) -> str:
    return str(value) if isinstance(value, str) and value else default


def _mtp_failures(df: pd.DataFrame | None, verdicts: dict[tuple, tuple[str, str]],
                  covered: set[tuple]) -> list[dict]:
    """MTP rows whose check failed (by its verdict) or, without a verdict, that crashed."""
    if df is None or df.empty:
        return []
    mtp_verdicts = {(k[0], k[1], k[2]): (k, v) for k, v in verdicts.items() if k[-1] == "mtp"}
    errors = df["error"].fillna("").astype(str) if "error" in df.columns else None
    out = []
    for i, r in enumerate(df.itertuples(index=False)):
        found = mtp_verdicts.get((r.case, r.prompt, r.backend))
        if found is not None:
            vkey, (status, detail) = found
            covered.add(vkey)
            if status not in FAILING:
                continue
            reason = f"the mtp check {status}" + (f": {detail}" if detail else "")
        elif errors is not None and errors.iloc[i]:
            reason = f"the mtp check crashed: {errors.iloc[i]}"
        else:
            continue
        out.append(_row("mtp", _key(r, MTP_KEY), "status", math.nan, math.nan,
                        "passed or xfailed", reason))
    return out


# --------------------------------------------------------------------------------------------
# Comparison with the baseline


def _joined(base: pd.DataFrame, cur: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    return base.merge(cur, on=key, how="left", suffixes=("_base", "_cur"), indicator="presence")


def _lost(joined: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    return joined.loc[joined["presence"] == "left_only", key]


def parity_regressions(base: pd.DataFrame, cur: pd.DataFrame, rules: GateRules) -> list[dict]:
    joined = _joined(base, cur, PARITY_KEY)
    out = summarised("parity", _lost(joined, PARITY_KEY), cur, PARITY_KEY, PARITY_LEVELS,
                     unit="points")
    both = joined[(joined["presence"] == "both") & joined["passed_cur"].astype(bool)]
    for r in both.itertuples(index=False):  # failing points are failures(), not drift
        key = _key(r, PARITY_KEY)
        nb, nc = r.nmse_base, r.nmse_cur
        if pd.notna(nb) and pd.notna(nc):
            limit = max(nb, rules.nmse_floor) * rules.nmse_factor
            if nc > limit:
                out.append(_row("parity", key, "nmse", nb, nc, f"<= {limit:.3g}",
                                f"NMSE grew {nc / max(nb, rules.nmse_floor):.3g}-fold"))
        for metric in ("top1", "index_agreement"):
            b, c = getattr(r, f"{metric}_base"), getattr(r, f"{metric}_cur")
            if pd.notna(b) and pd.notna(c) and c < b - 1e-12:
                out.append(_row("parity", key, metric, b, c, f">= {b:.4g}", f"{metric} dropped"))
    return out


def mtp_regressions(base: pd.DataFrame, cur: pd.DataFrame, rules: GateRules) -> list[dict]:
    joined = _joined(base, cur, MTP_KEY)
    out = summarised("mtp", _lost(joined, MTP_KEY), cur, MTP_KEY, MTP_LEVELS)
    for r in joined[joined["presence"] == "both"].itertuples(index=False):
        key = _key(r, MTP_KEY)
        p, c = r.acceptance_rate_base, r.acceptance_rate_cur
        n = max(_count(r.num_draft_tokens_cur), 1)
        if pd.notna(p) and pd.notna(c):
            allowed = p - 2 * math.sqrt(max(p * (1 - p), 0.0) / n) - 1e-9
            if c < allowed:
                out.append(_row("mtp", key, "acceptance_rate", p, c, f">= {allowed:.4g}",
                                "acceptance fell beyond 2 binomial std errors"))
        # The draft logits, as the parity points: a head drifting inside its tolerance.
        nb, nc = r.draft_nmse_max_base, r.draft_nmse_max_cur
        if pd.notna(nb) and pd.notna(nc):
            limit = max(nb, rules.nmse_floor) * rules.nmse_factor
            if nc > limit:
                out.append(_row("mtp", key, "draft_nmse_max", nb, nc, f"<= {limit:.3g}",
                                f"draft NMSE grew {nc / max(nb, rules.nmse_floor):.3g}-fold"))
        b, c = r.draft_top1_base, r.draft_top1_cur
        if pd.notna(b) and pd.notna(c) and c < b - 1e-12:
            out.append(_row("mtp", key, "draft_top1", b, c, f">= {b:.4g}", "draft top-1 dropped"))
    return out


def _count(value: Any) -> int:
    return int(value) if pd.notna(value) else 0


def verdict_regressions(base: pd.DataFrame, cur: pd.DataFrame, rules: GateRules) -> list[dict]:
    """Checks the baseline ran (anything but skipped) that the run lacks or now skips."""
    ran = base[base["status"] != "skipped"]
    joined = _joined(ran, cur, VERDICT_KEY)
    out = summarised("verdicts", _lost(joined, VERDICT_KEY), cur, VERDICT_KEY, VERDICT_LEVELS,
                     unit="checks")
    skipped = joined[joined["status_cur"] == "skipped"]
    out += summarised("verdicts", skipped[VERDICT_KEY], cur[cur["status"] != "skipped"],
                      VERDICT_KEY, VERDICT_LEVELS, how="skipped in the run", unit="checks")
    return out


def throughput_regressions(base: pd.DataFrame, cur: pd.DataFrame, rules: GateRules) -> list[dict]:
    out = []
    for r in _joined(base, cur, THROUGHPUT_KEY).itertuples(index=False):
        key = _key(r, THROUGHPUT_KEY)
        if r.presence == "left_only":
            continue  # a grid point this run did not measure (e.g. capped by memory)
        for speed, time, spread in (("S_PP", "T_PP", "T_PP_spread"),
                                    ("S_TG", "T_TG", "T_TG_spread")):
            b, c = getattr(r, f"{speed}_base"), getattr(r, f"{speed}_cur")
            if not (pd.notna(b) and pd.notna(c)) or b <= 0:
                continue
            rel = sum(_relative(getattr(r, f"{spread}_{s}"), getattr(r, f"{time}_{s}"))
                      for s in ("base", "cur"))
            drop = max(rules.min_drop, rules.spread_k * rel)
            if c < b * (1 - drop):
                out.append(_row("throughput", key, speed, b, c, f">= {b * (1 - drop):.4g}",
                                f"{1 - c / b:.0%} slower; spread allows {drop:.0%}"))
    return out


def _relative(spread: float, value: float) -> float:
    if not (pd.notna(spread) and pd.notna(value)) or value <= 0:
        return 0.0
    return float(spread) / float(value)


CHECKS: dict[str, Callable[[pd.DataFrame, pd.DataFrame, GateRules], list[dict]]] = {
    "verdicts": verdict_regressions, "parity": parity_regressions, "mtp": mtp_regressions,
    "throughput": throughput_regressions}


def gate(baseline: dict[str, pd.DataFrame], run: dict[str, pd.DataFrame],
         rules: GateRules = GateRules()) -> pd.DataFrame:
    """Every regression of ``run`` against ``baseline``; an empty frame means the gate passes.

    InputError when the baseline has no row or the run compared nothing (a vacuous pass)."""
    baseline = {n: conform(n, df, f"the baseline's {n} table") for n, df in baseline.items()}
    run = {n: conform(n, df, f"the run's {n} table") for n, df in run.items()}
    if not _has_rows(baseline):
        raise InputError("the baseline holds no row: nothing to gate against")
    if not compared(run):
        raise InputError("the run compared nothing (no parity, MTP or throughput row and no "
                         "check that ran): nothing to gate")
    rows = failures(run).to_dict(orient="records")
    for name, check in CHECKS.items():
        if name in baseline and not baseline[name].empty:
            if name not in run:
                rows.append(_row(name, "*", "table", math.nan, math.nan, "present",
                                 f"the baseline has {name} results; the run has none "
                                 f"({len(baseline[name])} rows)"))
                continue
            rows += check(baseline[name], run[name], rules)
    return pd.DataFrame(rows, columns=COLUMNS)
