"""The regression gate: a run against a stored baseline, per parity point, MTP row and grid point.

A baseline is one JSON file holding the three tables a run writes (``parity.parquet``,
``throughput.parquet``, ``mtp.parquet``) as records; it is only written by an explicit
``--update-baseline``.  Rules, each stated where it is applied:

- parity: a point regresses when it passed in the baseline and fails its tolerance now, when its
  NMSE grew more than ``nmse_factor``-fold (above a floor, so exact zeros stay quiet), or when
  top-1 or router-id agreement dropped;
- MTP: acceptance regresses when it falls by more than two binomial standard errors; draft
  logits as parity points (NMSE up more than the factor, top-1 down);
- throughput: tok/s regresses when it falls below the baseline by more than the measured spread
  makes plausible (``spread_k`` times the two runs' relative spreads, at least ``min_drop``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from harness.errors import InputError

PARITY_KEY = ["case", "prompt", "candidate", "reference", "mode", "point"]
MTP_KEY = ["case", "prompt", "backend"]
THROUGHPUT_KEY = ["target", "case", "PP", "TG", "B"]
TABLES = {"parity": "parity.parquet", "mtp": "mtp.parquet", "throughput": "throughput.parquet"}
COLUMNS = ["table", "key", "metric", "baseline", "current", "allowed", "reason"]


@dataclass(frozen=True)
class GateRules:
    """How much worse a metric may get before it counts as a regression."""

    nmse_factor: float = 100.0
    nmse_floor: float = 1e-16
    spread_k: float = 2.0
    min_drop: float = 0.10


def load_run(run_dir: Path) -> dict[str, pd.DataFrame]:
    """The tables a run folder holds (any subset of parity, mtp, throughput)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise InputError(f"{run_dir}: not a run folder")
    tables = {}
    for name, fname in TABLES.items():
        path = run_dir / fname
        if path.is_file():
            try:
                tables[name] = pd.read_parquet(path)
            except (OSError, ValueError) as e:
                raise InputError(f"{path}: unreadable parquet file ({e})") from None
    if not tables:
        raise InputError(f"{run_dir}: holds none of {', '.join(TABLES.values())}")
    return tables


def save_baseline(tables: dict[str, pd.DataFrame], path: Path) -> Path:
    """Write the baseline file (the explicit command; callers decide whether to replace)."""
    payload = {name: [_plain(row) for row in df[_kept(name, df)].to_dict(orient="records")]
               for name, df in tables.items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # One row per line: compact, and a baseline update reads as a line diff.
    lines = ['{"version": 1, "tables": {']
    for i, (name, rows) in enumerate(payload.items()):
        body = ",\n".join(json.dumps(row, sort_keys=True) for row in rows)
        lines.append(f"{json.dumps(name)}: [\n{body}\n]" + ("," if i < len(payload) - 1 else ""))
    lines.append("}}")
    path.write_text("\n".join(lines) + "\n")
    return path


# What a baseline keeps per table: the keys and the metrics the rules read, nothing else.
KEPT = {
    "parity": [*PARITY_KEY, "nmse", "passed", "top1", "index_agreement"],
    "mtp": [*MTP_KEY, "acceptance_rate", "num_draft_tokens", "draft_nmse_max", "draft_top1"],
    "throughput": [*THROUGHPUT_KEY, "S_PP", "T_PP", "T_PP_spread", "S_TG", "T_TG", "T_TG_spread"],
}


def _kept(name: str, df: pd.DataFrame) -> list[str]:
    return [c for c in KEPT.get(name, df.columns) if c in df.columns]


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready values at full precision (pandas' to_json rounds 1e-14 to 0.0)."""
    out = {}
    for k, v in row.items():
        v = v.item() if isinstance(v, np.generic) else v
        out[k] = None if (isinstance(v, float) and math.isnan(v)) or v is pd.NA else v
    return out


def load_baseline(path: Path) -> dict[str, pd.DataFrame]:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no baseline; create one with --update-baseline")
    try:
        raw = json.loads(path.read_text())
        return {name: pd.DataFrame.from_records(rows) for name, rows in raw["tables"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise InputError(f"{path}: not a baseline file ({e})") from None


def _joined(base: pd.DataFrame, cur: pd.DataFrame, key: list[str]) -> pd.DataFrame:
    missing = [k for k in key if k not in base.columns or k not in cur.columns]
    if missing:
        raise InputError(f"baseline and run tables must both have columns {missing}")
    return base.merge(cur, on=key, how="left", suffixes=("_base", "_cur"), indicator="presence")


def _key(row: Any, key: list[str]) -> str:
    return "/".join(str(getattr(row, k)) for k in key)


def _row(table: str, key: str, metric: str, base: float, cur: float, allowed: str,
         reason: str) -> dict[str, Any]:
    return dict(zip(COLUMNS, (table, key, metric, base, cur, allowed, reason), strict=True))


def parity_regressions(base: pd.DataFrame, cur: pd.DataFrame, rules: GateRules) -> list[dict]:
    out = []
    for r in _joined(base, cur, PARITY_KEY).itertuples(index=False):
        key = _key(r, PARITY_KEY)
        if r.presence == "left_only":
            out.append(_row("parity", key, "point", math.nan, math.nan, "present",
                            "missing from the run"))
            continue
        if bool(r.passed_base) and not bool(r.passed_cur):
            note = getattr(r, "note", "") or "see the report"
            out.append(_row("parity", key, "passed", 1, 0, str(getattr(r, "threshold", "")),
                            f"now fails its tolerance ({note})"))
            continue
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
    out = []
    for r in _joined(base, cur, MTP_KEY).itertuples(index=False):
        key = _key(r, MTP_KEY)
        if r.presence == "left_only":
            out.append(_row("mtp", key, "row", math.nan, math.nan, "present",
                            "missing from the run"))
            continue
        p, n = r.acceptance_rate_base, max(int(r.num_draft_tokens_cur or 0), 1)
        allowed = p - 2 * math.sqrt(max(p * (1 - p), 0.0) / n) - 1e-9
        if r.acceptance_rate_cur < allowed:
            out.append(_row("mtp", key, "acceptance_rate", p, r.acceptance_rate_cur,
                            f">= {allowed:.4g}", "acceptance fell beyond 2 binomial std errors"))
        # The draft logits, as the parity points: a head drifting inside its tolerance.
        nb, nc = getattr(r, "draft_nmse_max_base", math.nan), getattr(r, "draft_nmse_max_cur", 0)
        if pd.notna(nb) and pd.notna(nc):
            limit = max(nb, rules.nmse_floor) * rules.nmse_factor
            if nc > limit:
                out.append(_row("mtp", key, "draft_nmse_max", nb, nc, f"<= {limit:.3g}",
                                f"draft NMSE grew {nc / max(nb, rules.nmse_floor):.3g}-fold"))
        b, c = getattr(r, "draft_top1_base", math.nan), getattr(r, "draft_top1_cur", math.nan)
        if pd.notna(b) and pd.notna(c) and c < b - 1e-12:
            out.append(_row("mtp", key, "draft_top1", b, c, f">= {b:.4g}", "draft top-1 dropped"))
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


def gate(baseline: dict[str, pd.DataFrame], run: dict[str, pd.DataFrame],
         rules: GateRules = GateRules()) -> pd.DataFrame:
    """Every regression of ``run`` against ``baseline``; an empty frame means the gate passes."""
    checks = {"parity": parity_regressions, "mtp": mtp_regressions,
              "throughput": throughput_regressions}
    rows: list[dict] = []
    for name, check in checks.items():
        if name in baseline and not baseline[name].empty:
            if name not in run:
                rows.append(_row(name, "*", "table", math.nan, math.nan, "present",
                                 f"the baseline has {name} results; the run has none"))
                continue
            rows += check(baseline[name], run[name], rules)
    return pd.DataFrame(rows, columns=COLUMNS)
