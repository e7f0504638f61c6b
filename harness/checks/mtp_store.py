"""MTP results on disk: ``mtp.parquet`` and ``mtp.csv``, one row per (case, prompt, backend).

The regression gate reads :data:`MTP_COLUMNS`; :data:`EXTRA_COLUMNS` follow them for a reader
who needs to trust or debug a row.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd

__all__ = ["EXTRA_COLUMNS", "MTP_COLUMNS", "mtp_frame", "save_mtp"]

# Columns of mtp.parquet / mtp.csv; the regression gate reads these names.
MTP_COLUMNS: tuple[str, ...] = (
    "case",
    "prompt",
    "backend",
    "num_drafts",
    "num_draft_tokens",
    "num_accepted_tokens",
    "acceptance_rate",
    "mean_acceptance_length",
    "draft_nmse_max",
    "draft_top1",
)
# Written after MTP_COLUMNS: what a reader needs to trust or debug the row.
EXTRA_COLUMNS: tuple[str, ...] = (
    "chain",
    "steps",
    "accepted_per_pos",
    "drafts_match_reference",
    "greedy_unchanged",
    "draft_tolerance",
    "mtp_first_divergence",
    "error",
)


class _Row(Protocol):
    def row(self) -> dict[str, Any]: ...


def mtp_frame(runs: Sequence[_Row]) -> pd.DataFrame:
    """One row per (case, prompt, backend): the gate's columns first, then the extras."""
    df = pd.DataFrame([r.row() for r in runs], columns=[*MTP_COLUMNS, *EXTRA_COLUMNS])
    for c in ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "chain", "steps"):
        df[c] = df[c].astype(np.int64)
    for c in ("acceptance_rate", "mean_acceptance_length", "draft_nmse_max", "draft_top1",
              "draft_tolerance"):
        df[c] = df[c].astype(np.float64)
    for c in ("drafts_match_reference", "greedy_unchanged"):
        df[c] = df[c].astype(bool)
    for c in ("case", "prompt", "backend", "accepted_per_pos", "mtp_first_divergence", "error"):
        df[c] = df[c].astype(str)
    return df


def save_mtp(df: pd.DataFrame, out_dir: Path) -> dict[str, Path]:
    """Write ``mtp.parquet`` and ``mtp.csv`` (the regression gate reads MTP_COLUMNS)."""
    missing = [c for c in MTP_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"save_mtp: missing column(s) {missing}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"parquet": out_dir / "mtp.parquet", "csv": out_dir / "mtp.csv"}
    df.to_parquet(paths["parquet"], index=False)
    df.to_csv(paths["csv"], index=False)
    return paths
