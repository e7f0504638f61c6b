"""``python -m harness gate --baseline FILE RUN``: exit 1 with a table when RUN regressed."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.table import Table

from harness.checks.gate import GateRules, failures, gate, load_baseline, load_run, save_baseline
from harness.core.errors import InputError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("gate", help="compare a run folder with a stored baseline")
    p.add_argument("run", type=Path, help="a run folder (reports/<time>/) with parity/mtp/"
                                          "throughput/verdicts parquet files")
    p.add_argument("--baseline", type=Path, required=True, help="baseline JSON file")
    p.add_argument("--update-baseline", action="store_true",
                   help="write RUN's tables as the new baseline (the only way one is replaced); "
                        "refused when RUN has a failure, unless --force")
    p.add_argument("--force", action="store_true",
                   help="with --update-baseline: write it even from a failing run")
    p.add_argument("--nmse-factor", type=float, default=GateRules.nmse_factor)
    p.add_argument("--min-drop", type=float, default=GateRules.min_drop,
                   help="smallest relative tok/s drop ever flagged (default 0.10)")
    p.set_defaults(func=run)


def regressions_table(df: pd.DataFrame) -> Table:
    table = Table(title=f"gate: {len(df)} regression(s)")
    for col in df.columns:
        table.add_column(col)
    for row in df.itertuples(index=False):
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    return table


def regressions_text(found: pd.DataFrame, baseline: object) -> str:
    """The gate's verdict as terminal text."""
    buf = io.StringIO()
    console = Console(file=buf, width=160, force_terminal=False, color_system=None)
    if found.empty:
        console.print(f"gate: PASS against {baseline}")
    else:
        console.print(regressions_table(found))
        console.print(f"gate: FAIL against {baseline}")
    return "\n" + buf.getvalue()


def run(args: argparse.Namespace) -> int:
    """Exit 0 when the run passes the gate, 1 on regressions; bad input raises InputError (2)."""
    tables = load_run(args.run)
    if args.update_baseline:
        return update_baseline(tables, args)
    rules = GateRules(nmse_factor=args.nmse_factor, min_drop=args.min_drop)
    found = gate(load_baseline(args.baseline), tables, rules)
    console = Console(width=160)
    if found.empty:
        console.print(f"gate: PASS ({', '.join(tables)} against {args.baseline})")
        return 0
    console.print(regressions_table(found))
    console.print(f"gate: FAIL ({len(found)} regression(s) against {args.baseline})")
    return 1


def update_baseline(tables: dict[str, pd.DataFrame], args: argparse.Namespace) -> int:
    """Write RUN as the baseline, unless it fails: a failing baseline would make its own
    failures the standard every later run is held to."""
    failed = failures(tables)
    if not failed.empty and not args.force:
        shown = "; ".join(f"{r.key} ({r.reason})" for r in failed.head(3).itertuples())
        more = f"; and {len(failed) - 3} more" if len(failed) > 3 else ""
        raise InputError(f"{args.run}: refusing to write a baseline from a failing run, "
                         f"{len(failed)} failure(s): {shown}{more}; pass --force to write it "
                         "anyway")
    path = save_baseline(tables, args.baseline)
    print(f"baseline written: {path} ({', '.join(tables)})"
          + (f" with {len(failed)} failure(s), forced" if len(failed) else ""))
    return 0
