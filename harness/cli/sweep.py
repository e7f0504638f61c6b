"""``python -m harness sweep``: throughput against context length, plus imported tool output.

Writes ``throughput.parquet`` / ``throughput.csv`` and an HTML report whose "Throughput" section
(:func:`harness.perf.sections.throughput_section`) charts prefill and decode tok/s per backend on
log axes, with the decode roofline per case, and tabulates the llama-batched-bench columns.
A quantized target (``llamacpp:quant=Q4_K_M``, ``gguf=``, ``mlx:bits=4``, ``model_dir=``) gets
its own roofline, from the bytes its GGUF or MLX files really hold.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import pandas as pd

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
from harness.perf.sections import mtp_speed_section, throughput_section
from harness.perf.sweep import (
    DEFAULT_MAX_POINT_S,
    ModelShape,
    fill_roofline,
    run_sweep,
    save_sweep,
    throughput_frame,
)


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
                   help="targets to measure, e.g. 'torch,mlx' or 'mlx-float32', quantized "
                        "'llamacpp:quant=Q4_K_M,mlx:bits=4' (judged against the bytes their "
                        "own files hold); 'none' to only import (default: every registered "
                        f"backend, {','.join(BACKENDS)})")
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
    from harness.report.environment import environment
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
    from harness.report.environment import environment
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
