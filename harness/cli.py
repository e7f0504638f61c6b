"""Command line: ``python -m harness parity --checkpoint DIR ...`` for a checkpoint no case made.

Exit codes: 0 every compared pair passed, 1 some pair failed (or a port broke), 2 bad input.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from harness.backends.llamacpp_backend import model_findings
from harness.cases import DEFAULT_TOLERANCES
from harness.compare import PairResult, explain_divergence
from harness.errors import ArchitectureNotSupported, InputError, PortFailure
from harness.families import load_checkpoint_config
from harness.pytest_plugin import environment
from harness.reporting import write_run
from harness.runner import MODES, Runner
from harness.summary import print_summary
from harness.targets import REFERENCE, Target, parse_targets

DEFAULT_PROMPT_LENGTH = 64
# Other subcommands live in their own modules, each with add_parser(subparsers) and run(args).
SUBCOMMAND_MODULES = (
    "harness.sweep_cli", "harness.gate_cli", "harness.mtp_cli", "harness.browser_check",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("parity", help="compare backends with the float64 reference, per layer")
    p.set_defaults(func=run_parity)
    p.add_argument("--checkpoint", type=Path, required=True,
                   help="HF-layout directory: config.json + model*.safetensors (+ index)")
    p.add_argument("--backends", default="torch,mlx",
                   help="candidates, e.g. 'torch,mlx' or 'mlx-float32' (default torch,mlx)")
    p.add_argument("--reference", default=REFERENCE, help=f"default {REFERENCE}")
    p.add_argument("--prompt-tokens", type=Path,
                   help='JSON file {"tokens": [...]}; default: 64 seeded random ids')
    p.add_argument("--mlx-model-module", type=Path,
                   help="a user's MLX port (shaped like mlx-lm's bailing_hybrid.py) under test")
    p.add_argument("--modes", default="prefill", help=f"any of {','.join(MODES)}")
    p.add_argument("--decode-steps", type=int, default=8,
                   help="decode mode: tokens fed one at a time after the prefill")
    p.add_argument("--out", type=Path,
                   help="output folder (must not hold a report); default reports/<time>-parity")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:
                raise
            continue
        module.add_parser(sub)
    return parser


def read_prompt(path: Path | None, vocab_size: int) -> list[int]:
    """The prompt's token ids, validated against the vocabulary."""
    if path is None:
        return np.random.default_rng(0).integers(0, vocab_size, DEFAULT_PROMPT_LENGTH).tolist()
    try:
        raw = json.loads(path.read_text())
    except OSError as e:
        raise InputError(f"{path}: cannot be read ({e.strerror})") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None
    tokens = raw.get("tokens") if isinstance(raw, dict) else None
    if not isinstance(tokens, list) or not tokens:
        raise InputError(f'{path}: expected {{"tokens": [id, ...]}} with at least one id')
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise InputError(f"{path}: 'tokens' must hold integers only")
    bad = [t for t in tokens if not 0 <= t < vocab_size]
    if bad:
        raise InputError(f"{path}: token ids {bad[:5]} outside the vocabulary [0, {vocab_size})")
    return tokens


def summary_json(results: Sequence[PairResult]) -> dict:
    """Per pair: first divergence (name or null), NMSE per capture point, top-1 agreement."""
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
            "first_divergence": r.first_divergence,
            "explanation": explain_divergence(r.first_divergence) if r.first_divergence else None,
            "nmse": {p: float(v) for p, v in zip(t["point"], t["nmse"], strict=True)
                     if not np.isnan(v)},
            "top1_agreement": float(logits["top1"].iloc[0]) if len(logits) else None,
        }
    return {"passed": all(r.passed for r in results), "pairs": pairs}


def run_parity(args: argparse.Namespace) -> int:
    _, cfg = load_checkpoint_config(args.checkpoint)
    out = args.out
    if out is not None and out.exists() and any(out.iterdir()):
        raise InputError(f"{out}: exists and is not empty; a report is never overwritten")
    tokens = read_prompt(args.prompt_tokens, cfg.vocab_size)
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in MODES:
            raise InputError(f"--modes: unknown mode {m!r}; known: {', '.join(MODES)}")
    extra = {}
    if args.mlx_model_module is not None:
        if not args.mlx_model_module.is_file():
            raise InputError(f"{args.mlx_model_module}: --mlx-model-module file not found")
        extra["mlx"] = {"model_module": str(args.mlx_model_module.resolve())}
    candidates = parse_targets(args.backends, extra)
    reference = Target.parse(args.reference)
    runner = Runner()
    broken = 0
    ok, why = runner.availability(reference)
    if not ok:
        raise InputError(f"the reference {reference.label} cannot run here: {why}")
    checkpoint = args.checkpoint.resolve()
    # Validate the checkpoint with the reference before any candidate runs.
    runner.model(reference, checkpoint)
    for cand in candidates:
        ok, why = runner.availability(cand)
        if not ok:
            runner.findings.append(f"{cand.label} not run: {why}")
            continue
        for mode in modes:
            try:
                runner.compare(case=checkpoint.name, prompt=f"{len(tokens)} tokens",
                               checkpoint=checkpoint, tokens=tokens, candidate=cand,
                               reference=reference, tolerance=DEFAULT_TOLERANCES[cand.dtype],
                               mode=mode, n_decode=args.decode_steps)
            except ArchitectureNotSupported as e:  # the port's coverage: a finding, not bad input
                runner.findings.append(f"{cand.label}: {e}")
                break
            except PortFailure as e:
                runner.findings.append(str(e))
                broken += 1
    runner.findings += [f for f in model_findings(runner.models.values())
                        if f not in runner.findings]
    out = write_run(runner.results, Path("reports"), title=f"parity: {checkpoint}",
                    findings=runner.findings, environment=environment(), name="parity", out=out)
    summary = summary_json(runner.results)
    summary["findings"] = runner.findings
    summary["checkpoint"] = str(checkpoint)
    summary["n_tokens"] = len(tokens)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print_summary(runner.results, runner.findings)
    print(f"report: {out / 'index.html'}")
    return 1 if broken or not runner.results or not summary["passed"] else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
